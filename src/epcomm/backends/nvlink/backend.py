"""The NVLink backend: normal mode on symmetric memory with Triton kernels (write-once push).

Dispatch: one kernel publishes the counts to every peer, waits for theirs and computes every row
number (it copies the count table to host-mapped memory, which the host reads while the push runs;
``num_worst_tokens`` skips the read); the push kernel writes each token row straight into its final
row of every destination's receive area and ends with the exit barrier; the rows are then copied
out (by a copy engine after the push, or, with ``EPCOMM_COPY_CHECKPOINTS``, range by range while it
runs: ``copy_engine.py``). Combine: the push kernel (entry barrier, push, exit barrier) writes each received row back
into the token rank's area in (rank, token) order, then a reduce kernel sums in float32 in rank
order (after the push, or, with ``EPCOMM_COMBINE_OVERLAP``, beside it on a side stream behind its
progress flags). Low-latency mode is ``NvlinkLowLatency`` (``low_latency.py``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from epcomm._collectives import all_gather_ints, host_id
from epcomm.backends.base import (
    CombineRequest,
    CombineResult,
    DispatchRequest,
    DispatchResult,
    LowLatencyDelegation,
)
from epcomm.backends.nvlink.copy_engine import CheckpointCopier, checkpoint_segments, copy_checkpoints
from epcomm.backends.nvlink.low_latency import NvlinkLowLatency
from epcomm.backends.nvlink.regions import CombineRegions, DispatchRegions
from epcomm.backends.nvlink.transport import Operation, SymmetricTransport
from epcomm.handles import DispatchHandle
from epcomm.kernels.exchange import PeerArgs
from epcomm.kernels.layout import launch_dispatch_layout
from epcomm.kernels.normal_combine import (
    ReduceProgress,
    combine_overlap,
    launch_combine_reduce,
    overlap_reduce_sms,
)
from epcomm.kernels.normal_copy_out import launch_copy_out_meta
from epcomm.kernels.normal_push import MAX_CHECKPOINTS, balanced_combine_push, launch_push_rows
from epcomm.kernels.normal_rows import counts_row_words, launch_combine_rows
from epcomm.layout import DispatchLayout, compute_dispatch_layout

__all__ = ["NvlinkBackend", "nvlink_placement"]


class _DispatchAreas(NamedTuple):
    """Views of the receive area: x ``[capacity, x_words]`` int32, scales ``[capacity, s_words]``
    int32, source index ``[capacity]`` int32, top-k ids ``[capacity * k]`` int64, weights float32."""

    x: torch.Tensor
    scales: torch.Tensor
    src_idx: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


@dataclass
class _BufferViews:
    """What the backend derives from one allocation of the symmetric buffer: the receive / combine
    area views per region layout."""

    buffers: list[torch.Tensor]
    dispatch: dict[DispatchRegions, _DispatchAreas] = field(default_factory=dict)
    combine: dict[CombineRegions, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


# Up to five regions per area, each aligned to 32 words: this much slack always covers them.
_REGION_SLACK_WORDS = 8 * 32
# get_dispatch_layout implementation: "triton" (default, kernels/layout.py) or "torch".
_LAYOUT_KERNEL = os.environ.get("EPCOMM_LAYOUT_KERNEL", "triton")


def nvlink_placement(group: Any) -> str | None:
    """How the ranks of ``group`` can reach each other's GPU memory (collective).

    Returns:
        ``"peers"``: one host, every rank on its own GPU with peer access to all others (the
        NVLink node). ``"shared"``: one host, but some ranks share a GPU; the backend then maps
        peer buffers through CUDA IPC and the kernels of different processes time-slice, which is
        for testing only and used only when asked for by name. ``None``: no NVLink path.
    """
    import torch.distributed as dist

    if not torch.cuda.is_available() or dist.get_world_size(group) > 8:
        return None
    device = torch.cuda.current_device()
    local_ok = all(
        torch.cuda.can_device_access_peer(device, other)
        for other in range(torch.cuda.device_count())
        if other != device
    )
    rows = all_gather_ints([host_id(socket.gethostname()), device, int(local_ok)], group)
    if len({host for host, _, _ in rows}) != 1 or not all(ok for _, _, ok in rows):
        return None
    return "peers" if len({gpu for _, gpu, _ in rows}) == len(rows) else "shared"


class NvlinkBackend(LowLatencyDelegation):
    """Normal and low-latency modes over NVLink symmetric memory.

    Arguments:
        group: the process group.
        timeout_s: bound of every wait.
        num_ranks_per_node: ranks per node.
        enable_shrink: keep a rank mask (shrink mode).
        num_nvl_bytes: initial symmetric buffer size (grown when a call needs more).
        low_latency_mode: allocate the low-latency buffer (``num_rdma_bytes`` bytes).
        num_rdma_bytes: size of the low-latency symmetric buffer.
        shared_device: ranks share a GPU (``nvlink_placement`` said ``"shared"``): buffers are
            mapped through CUDA IPC instead of symmetric memory.
    """

    name = "nvlink"

    def __init__(
        self,
        group: Any,
        timeout_s: float,
        num_ranks_per_node: int,
        enable_shrink: bool,
        num_nvl_bytes: int,
        low_latency_mode: bool = False,
        num_rdma_bytes: int = 0,
        shared_device: bool = False,
    ) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.transport = SymmetricTransport(group, self.device, timeout_s, num_nvl_bytes, shared_device)
        self.rank = self.transport.rank
        self.num_ranks = self.transport.num_ranks
        self.num_ranks_per_node = num_ranks_per_node
        # Low-latency mode gets its own symmetric buffer (``num_rdma_bytes``), as DeepEP's.
        self.low_latency: NvlinkLowLatency | None = None
        if low_latency_mode:
            self.low_latency = NvlinkLowLatency(group, self.device, timeout_s, num_rdma_bytes, shared_device)
        self._views: _BufferViews | None = None
        # Dispatch copy-out on a copy engine behind the push's progress flags (copy_engine.py) with
        # EPCOMM_COPY_CHECKPOINTS=1..8; 0 (default) copies out after the push.
        self._checkpoints = max(0, min(copy_checkpoints(), MAX_CHECKPOINTS))
        self._copier: CheckpointCopier | None = None
        # Combine push order (EPCOMM_COMBINE_PUSH): contiguous parts (default) or balanced over
        # the destinations.
        self._balanced_combine = balanced_combine_push()
        # Combine reduce beside the push (EPCOMM_COMBINE_OVERLAP=1..8 ranges; 0: after it), on
        # this side stream with its two events (made on first use).
        self._overlap = combine_overlap()
        self._reduce_side: tuple[Any, Any, Any] | None = None
        # num_worst_tokens mode cannot read the receive count without a sync: the count kernel
        # writes it to host-mapped memory and a later call checks it (epoch, allowed rows).
        self._worst_check: tuple[int, int] | None = None

    # ---- layout -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """``epcomm.layout.compute_dispatch_layout`` as one Triton kernel (``kernels/layout.py``;
        tests/gpu/test_nvlink_normal.py::test_layout_kernel checks it on GPUs), or as sync-free torch
        ops on the device with ``EPCOMM_LAYOUT_KERNEL=torch``."""
        if _LAYOUT_KERNEL == "triton":
            return launch_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)
        return compute_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)

    # ---- helpers ------------------------------------------------------------------------------
    def _check_worst(self) -> None:
        """Raise if an earlier ``num_worst_tokens`` dispatch received more rows than it allowed
        (checked once its count has reached the host; a later such dispatch replaces the check)."""
        if self._worst_check is not None:
            epoch, allowed = self._worst_check
            received = self.transport.received_count(epoch)
            if received is not None:
                self._worst_check = None
                if received > allowed:
                    raise ValueError(
                        f"dispatch: num_worst_tokens={allowed} but rank {self.rank} received {received} "
                        "tokens in an earlier call (rows past num_worst_tokens were dropped); "
                        "num_worst_tokens must be >= the largest receive count"
                    )

    def _capacity(self, row_words: int) -> int:
        """Rows of ``row_words`` words the payload holds, the same on every rank (same buffer size);
        ``_REGION_SLACK_WORDS`` covers the 32-word alignment of each field's region."""
        return max(0, (self.transport.payload_words - _REGION_SLACK_WORDS) // row_words)

    def _ensure_rows(self, num_rows: int, row_words: int) -> None:
        """Grow the payload to ``num_rows`` rows (collective: every rank passes the same numbers)."""
        if num_rows > self._capacity(row_words):
            self.transport.ensure_payload(num_rows * row_words + _REGION_SLACK_WORDS)

    @staticmethod
    def _words(tensor: torch.Tensor, name: str) -> torch.Tensor:
        contiguous = tensor.contiguous()
        if contiguous.size(1) * contiguous.element_size() % 16 != 0:
            raise ValueError(
                f"{name}: the NVLink backend needs rows of a multiple of 16 bytes; "
                f"got {contiguous.size(1)} x {contiguous.element_size()} bytes"
            )
        return contiguous.view(torch.int32)

    def _sms(self, request_sms: int) -> int:
        return max(1, request_sms)

    # ---- dispatch -----------------------------------------------------------------------------
    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Normal-mode dispatch; see ``Buffer.dispatch``.

        The count table is read on the host *while* the push runs: the push targets the capacity
        the buffer already has (the same on every rank); if the table shows a rank needs more,
        every rank sees it, grows the buffer and pushes again.
        """
        self.transport.check_error()
        self._check_worst()
        if request.handle is not None:
            return self._cached_dispatch(request, request.handle)
        assert request.num_tokens_per_expert is not None
        x, is_token_in_rank = request.x, request.is_token_in_rank.contiguous()
        rank, num_ranks = self.rank, self.num_ranks
        num_experts = request.num_tokens_per_expert.numel()
        num_local_experts = num_experts // num_ranks
        worst = request.num_worst_tokens
        # The copy engine copies each (source, range) segment out as soon as it has landed; it needs
        # the host to know the segments, so not with num_worst_tokens (no host read).
        checkpoints = self._checkpoints if worst == 0 else 0
        num_counts = counts_row_words(num_ranks, num_experts, max(1, checkpoints))
        # One kernel counts the tokens per rank, publishes [per-rank, per-expert] counts into every
        # peer's table, waits for theirs, turns the table into every row number and (unless
        # num_worst_tokens) copies it to host-mapped memory, which the host reads while the push runs.
        # It is launched first (after the row-size checks, which must fail before any communication):
        # the host prepares the push while it runs. Epochs are taken in launch order (the count
        # exchange's, then the push's exit barrier's).
        x_words = self._words(x, "x")
        scale_words = self._words(request.x_scales, "x_scales") if request.x_scales is not None else None
        counts_epoch = self.transport.next_epoch()
        recv_row_of_token, rank_prefix_matrix, num_recv_tokens = self.transport.dispatch_counts(
            counts_epoch,
            request.num_tokens_per_expert.contiguous(),
            is_token_in_rank,
            read_on_host=worst == 0,
            checkpoints=max(1, checkpoints),
        )
        num_topk = max(
            1,
            request.topk_idx.size(1)
            if request.topk_idx is not None
            else (request.topk_weights.size(1) if request.topk_weights is not None else 0),
        )
        num_scale_words = scale_words.size(1) if scale_words is not None else 0
        # One capacity for the dispatch rows and the bf16 rows of the combine that follows.
        row_words = max(
            DispatchRegions.row_words(x_words.size(1), num_scale_words, num_topk),
            CombineRegions.row_words(x.size(1) // 2, num_topk),
        )
        self._ensure_rows(worst, row_words)

        # The caller's stream, where the copy-engine copy-out (if on) starts and ends.
        stream = torch.cuda.current_stream(self.device) if checkpoints else None

        def push() -> tuple[DispatchRegions, int]:
            regions = DispatchRegions(self._capacity(row_words), x_words.size(1), num_scale_words, num_topk)
            # No entry barrier: the count exchange was one (every peer had published its counts,
            # so it was done reading its area).
            barriers = self.transport.push_barriers(None, Operation.DISPATCH, checkpoints)
            if stream is not None:
                self._checkpoint_copier().mark_push(stream)
            launch_push_rows(
                self._peers(),
                x_words,
                scale_words,
                request.topk_idx,
                request.topk_weights,
                recv_row_of_token,
                regions.push,
                regions.capacity,
                rank,
                num_local_experts,
                localize_topk=request.topk_idx is not None,
                write_src_idx=True,
                num_sms=self._sms(request.config.num_sms),
                barriers=barriers,
            )
            return regions, barriers.exit_epoch

        regions, push_epoch = push()
        per_expert_list: list[int] = []
        segments = None
        if worst > 0:
            num_rows = num_max_rows = worst
            self._worst_check = (counts_epoch, worst)
        else:
            # Plain Python on lists: a dozen small CPU tensor ops cost ~200 us here.
            host = self.transport.read_counts(counts_epoch, num_counts)
            sent = [row[:num_ranks] for row in host]
            num_rows = sum(row[rank] for row in sent)
            num_max_rows = max(max(map(sum, sent)), max(map(sum, zip(*sent))))
            if num_max_rows > regions.capacity:  # every rank reads the same table: all grow and push again
                self._ensure_rows(num_max_rows, row_words)
                regions, push_epoch = push()
            if checkpoints:
                segments = checkpoint_segments(host, rank, num_ranks, num_experts, checkpoints)
            start = num_ranks + rank * num_local_experts
            per_expert_list = list(map(sum, zip(*(row[start : start + num_local_experts] for row in host))))
            alignment = request.expert_alignment
            if alignment > 1:
                per_expert_list = [
                    (count + alignment - 1) // alignment * alignment for count in per_expert_list
                ]

        if segments is not None and stream is not None:
            areas = self._dispatch_areas(regions)
            payload = [areas.x] if request.x_scales is None else [areas.x, areas.scales]
            copied = self._checkpoint_copier().copy_out(
                stream, payload, num_rows, segments, self.transport.progress_address, push_epoch
            )
            recv_x = copied[0].view(x.dtype)
            recv_scales = copied[1].view(request.x_scales.dtype) if request.x_scales is not None else None
        else:
            recv_x, recv_scales = self._copy_out_payload(regions, num_rows, x.dtype, request.x_scales)
        areas = self._dispatch_areas(regions)
        recv_src_idx, recv_topk_idx, recv_topk_weights = launch_copy_out_meta(
            areas.src_idx,
            areas.topk_idx if request.topk_idx is not None else None,
            areas.topk_weights if request.topk_weights is not None else None,
            num_rows,
            regions.num_topk,
            num_recv_tokens if worst > 0 else None,
            self._sms(request.config.num_sms),
        )
        handle = DispatchHandle(
            rank_prefix_matrix=rank_prefix_matrix,
            is_token_in_rank=is_token_in_rank,
            recv_row_of_token=recv_row_of_token,
            recv_src_idx=recv_src_idx,
            num_recv_tokens=num_recv_tokens,
            num_recv_rows=num_rows,
            num_max_rows=num_max_rows,
        )
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle)

    def _checkpoint_copier(self) -> CheckpointCopier:
        """The side-stream copier of dispatch's copy-out (made on first use)."""
        if self._copier is None:
            self._copier = CheckpointCopier(self.device)
        return self._copier

    def _buffer_views(self) -> _BufferViews:
        """Views of the current symmetric buffer (rebuilt when it is reallocated)."""
        buffers = self.transport.peer_buffers
        if self._views is None or self._views.buffers is not buffers:
            self._views = _BufferViews(buffers)
        return self._views

    def _peers(self) -> PeerArgs:
        """Every rank's whole buffer, resolved for the push kernel (it adds the payload offset)."""
        assert self.transport.peer_args is not None
        return self.transport.peer_args

    def _dispatch_areas(self, regions: DispatchRegions) -> _DispatchAreas:
        """Views of this rank's receive area for ``regions`` (cached per buffer allocation: each
        view costs a few microseconds of host time per call otherwise)."""
        cache = self._buffer_views().dispatch
        areas = cache.get(regions)
        if areas is None:
            push, capacity, k = regions.push, regions.capacity, regions.num_topk
            payload = self.transport.payload
            areas = cache[regions] = _DispatchAreas(
                payload(push.x, capacity * regions.x_words, torch.int32).view(capacity, regions.x_words),
                payload(push.scales, capacity * regions.scale_words, torch.int32).view(
                    capacity, regions.scale_words
                ),
                payload(push.src_idx, capacity, torch.int32),
                payload(push.topk_idx, capacity * k * 2, torch.int32).view(torch.int64),
                payload(push.topk_weights, capacity * k, torch.float32),
            )
        return areas

    def _combine_areas(self, regions: CombineRegions) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x as bf16, topk weights as float32)`` views of this rank's combine area (cached)."""
        cache = self._buffer_views().combine
        areas = cache.get(regions)
        if areas is None:
            push, capacity = regions.push, regions.capacity
            payload = self.transport.payload
            areas = cache[regions] = (
                payload(push.x, capacity * regions.x_words, torch.int32).view(torch.bfloat16),
                payload(push.topk_weights, capacity * regions.num_topk, torch.float32),
            )
        return areas

    def _copy_out_payload(
        self, regions: DispatchRegions, num_rows: int, x_dtype: torch.dtype, x_scales: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copy the first ``num_rows`` received rows (and scales) out of the symmetric area, by copy
        engine (0 SMs); the metadata, when needed, goes through ``launch_copy_out_meta``."""
        areas = self._dispatch_areas(regions)
        recv_x = areas.x[:num_rows].clone().view(x_dtype)
        recv_scales = None
        if x_scales is not None:
            recv_scales = areas.scales[:num_rows].clone().view(x_scales.dtype)
        return recv_x, recv_scales

    def _cached_dispatch(self, request: DispatchRequest, handle: DispatchHandle) -> DispatchResult:
        x_words = self._words(request.x, "x")
        scale_words = self._words(request.x_scales, "x_scales") if request.x_scales is not None else None
        num_scale_words = scale_words.size(1) if scale_words is not None else 0
        row_words = DispatchRegions.row_words(x_words.size(1), num_scale_words, 1)
        self._ensure_rows(handle.num_max_rows, row_words)
        regions = DispatchRegions(self._capacity(row_words), x_words.size(1), num_scale_words, 1)
        launch_push_rows(
            self._peers(),
            x_words,
            scale_words,
            None,
            None,
            handle.recv_row_of_token,
            regions.push,
            regions.capacity,
            self.rank,
            1,
            localize_topk=False,
            write_src_idx=False,
            num_sms=self._sms(request.config.num_sms),
            barriers=self.transport.push_barriers(Operation.CACHED_DISPATCH_ENTRY, Operation.CACHED_DISPATCH),
        )
        recv_x, recv_scales = self._copy_out_payload(
            regions, handle.num_recv_rows, request.x.dtype, request.x_scales
        )
        return DispatchResult(recv_x, recv_scales, None, None, [], handle)

    # ---- combine ------------------------------------------------------------------------------
    def combine(self, request: CombineRequest) -> CombineResult:
        """Normal-mode combine; see ``Buffer.combine``.

        The push writes each row back into its token rank's combine area, then the reduce sums
        them. With ``EPCOMM_COMBINE_OVERLAP`` the reduce runs beside the push instead, on a side
        stream with part of the SMs, behind the push's progress flags.
        """
        self.transport.check_error()
        self._check_worst()
        handle, x = request.handle, request.x
        rank = self.rank
        num_topk = request.topk_weights.size(1) if request.topk_weights is not None else 1
        row_words = CombineRegions.row_words(x.size(1) // 2, num_topk)
        self._ensure_rows(handle.num_max_rows, row_words)
        regions = CombineRegions(self._capacity(row_words), x.size(1) // 2, num_topk)
        in_rank = handle.is_token_in_rank
        num_sms = self._sms(request.config.num_sms)
        overlap = self._overlap if num_sms >= 2 else 0
        reduce_sms = overlap_reduce_sms(num_sms) if overlap else num_sms
        rank_prefix = handle.rank_prefix_matrix.to(torch.int32).contiguous()
        dst_row, token_slot = launch_combine_rows(
            rank_prefix,
            handle.recv_row_of_token.contiguous(),
            x.size(0),
            rank,
            num_sms,
        )
        area_x, area_weights = self._combine_areas(regions)
        combined_weights = None
        num_tokens = in_rank.size(0)
        if request.topk_weights is not None:
            combined_weights = torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self.device)
        combined = torch.empty(num_tokens, x.size(1), dtype=torch.bfloat16, device=self.device)
        bias = tuple(b.contiguous() for b in request.bias)
        barriers = self.transport.push_barriers(Operation.COMBINE_ENTRY, Operation.COMBINE, overlap)
        side = None
        if overlap:
            # Everything the reduce reads or writes exists now; the side stream starts from here.
            stream = torch.cuda.current_stream(self.device)
            if self._reduce_side is None:
                self._reduce_side = (torch.cuda.Stream(self.device), torch.cuda.Event(), torch.cuda.Event())
            side, ready, done = self._reduce_side
            ready.record(stream)
        launch_push_rows(
            self._peers(),
            self._words(x, "x"),
            None,
            None,
            request.topk_weights,
            dst_row,
            regions.push,
            regions.capacity,
            rank,
            1,
            localize_topk=False,
            write_src_idx=False,
            num_sms=num_sms - reduce_sms if overlap else num_sms,
            barriers=barriers,
            one_destination=True,
            segments=rank_prefix if self._balanced_combine or overlap else None,
        )
        weights_area = area_weights if request.topk_weights is not None else None
        reduce_args = (area_x, weights_area, token_slot, bias, combined, combined_weights)
        if side is None:
            launch_combine_reduce(*reduce_args, num_sms)
            return CombineResult(combined, combined_weights)
        progress = ReduceProgress(
            overlap,
            MAX_CHECKPOINTS,
            rank_prefix,
            self.transport.progress_address(0, 0),
            rank,
            barriers.exit_epoch,
            barriers.timeout_ns,
            barriers.error_address,
            int(Operation.COMBINE),
        )
        with torch.cuda.stream(side):
            side.wait_event(ready)
            launch_combine_reduce(*reduce_args, reduce_sms, progress)
            done.record(side)
        # The caller's stream goes on after the reduce: every tensor the side stream touched is
        # ordered before any later reuse of its memory there.
        stream.wait_event(done)
        return CombineResult(combined, combined_weights)

    # ---- low-latency mode: LowLatencyDelegation forwards to NvlinkLowLatency -------------------
    def _low_latency_engine(self) -> NvlinkLowLatency | None:
        return self.low_latency

    def destroy(self) -> None:
        """Release the symmetric buffers."""
        self._views = None
        self.transport.destroy()
        if self.low_latency is not None:
            self.low_latency.destroy()
