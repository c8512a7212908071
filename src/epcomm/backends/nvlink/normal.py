"""Normal mode on the NVLink symmetric buffer: which kernel runs when (write-once push).

Dispatch: one kernel publishes the call's fingerprint and the counts to every peer, waits for theirs
and computes every row number (it copies the table to host-mapped memory, which the host reads while
the push runs; ``num_worst_tokens`` skips the read); the push kernel writes each token row straight
into its final row of every destination's receive area and ends with the exit barrier; a copy engine
then copies the rows out and one kernel the per-row metadata. When a peer's fingerprint differs the
count kernel numbers no row, so the push writes nothing, and the host raises
``InconsistentCallError`` when it reads the table (``num_worst_tokens``: the dispatch delivers no row,
every ``recv_topk_idx`` is -1, and the next call on the buffer raises).

Cached dispatch: the push alone, with an entry barrier. Combine: one kernel derives the row maps
from the handle, the push kernel (entry barrier, push, exit barrier) writes each received row back
into the token rank's area in (rank, token) order, then a reduce kernel sums in float32 in rank
order. Both send the call's fingerprint in the push's entry barrier, into the place of the count
table where dispatch puts it (so any two normal-mode calls that meet compare their fingerprints).
On a difference the push writes no row, the rows the call returns hold no peer's data (cached
dispatch: zeros; combine: only the biases), and the kernel records both fingerprints in host-mapped
memory: there is no host synchronization in these calls, so the next normal-mode call on the buffer
raises ``InconsistentCallError`` (once the kernel has run), as a device timeout is raised.
"""

from __future__ import annotations

import ctypes
import time
from typing import NamedTuple

import torch

from epcomm.backends.base import CombineRequest, CombineResult, DispatchRequest, DispatchResult
from epcomm.backends.nvlink.symmetric_buffer import (
    MAX_EXPERTS,
    REGION_SLACK_WORDS,
    CombineRegions,
    DispatchRegions,
    Operation,
    SymmetricBuffer,
    row_capacity,
)
from epcomm.env import LayoutKernel, Settings
from epcomm.fingerprint import FINGERPRINT_WORDS, CallFingerprint, CallNumbers, check_fingerprints
from epcomm.handles import DispatchHandle, intranode_handle
from epcomm.kernels.layout import launch_dispatch_layout
from epcomm.kernels.normal_combine import launch_combine_reduce
from epcomm.kernels.normal_copy_out import launch_copy_out_meta
from epcomm.kernels.normal_push import (
    PushBarriers,
    PushFingerprint,
    PushRegions,
    launch_push_rows,
    push_record_words,
)
from epcomm.kernels.normal_rows import (
    HOST_MISMATCH_WORD,
    HOST_TABLE_WORD,
    counts_row_words,
    launch_combine_rows,
    launch_dispatch_counts,
)
from epcomm.layout import DispatchLayout, compute_dispatch_layout

__all__ = ["HostRecord", "NvlinkNormal", "device_words"]

# The host waits at most this long for the count table (DeepEP's CPU timeout is 100 s as well): the
# device may be busy with the caller's earlier work; a missing peer is reported by the kernel's own,
# shorter bound.
HOST_WAIT_S = 100.0


class _DispatchAreas(NamedTuple):
    """Views of the receive area: x ``[capacity, x_words]`` int32, scales ``[capacity, s_words]``
    int32, source index ``[capacity]`` int32, top-k ids ``[capacity * k]`` int64, weights float32."""

    x: torch.Tensor
    scales: torch.Tensor
    src_idx: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def _push_regions(regions: DispatchRegions | CombineRegions) -> PushRegions:
    if isinstance(regions, DispatchRegions):
        return PushRegions(regions.x, regions.scales, regions.topk_idx, regions.topk_weights, regions.src_idx)
    return PushRegions(x=regions.x, topk_weights=regions.topk_weights)


def device_words(fingerprint: CallFingerprint) -> list[int]:
    """The fingerprint's ``FINGERPRINT_WORDS`` words as the kernels carry them: int32,
    non-negative (the call number wraps at 2**31; equal calls still give equal words)."""
    return [word & 0x7FFFFFFF for word in fingerprint.words()]


class _HostCounts:
    """Host-mapped words the dispatch count kernel writes (``launch_dispatch_counts``): the table
    (every rank's fingerprint, then the count rows) with its epoch, the receive count with its epoch
    and the epoch of a fingerprint difference (``num_worst_tokens`` mode)."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        fingerprint_words = num_ranks * FINGERPRINT_WORDS
        self.num_words = (
            HOST_TABLE_WORD + fingerprint_words + num_ranks * counts_row_words(num_ranks, MAX_EXPERTS)
        )
        self.words = torch.zeros(self.num_words, dtype=torch.int32, device="cpu", pin_memory=True)
        self.address = self.words.data_ptr()
        # Read through ctypes (sliced into Python lists at C speed, no tensor op per call).
        self._fingerprints = (ctypes.c_int32 * fingerprint_words).from_address(
            self.address + 4 * HOST_TABLE_WORD
        )
        counts_word = HOST_TABLE_WORD + fingerprint_words
        self._table = (ctypes.c_int32 * (self.num_words - counts_word)).from_address(
            self.address + 4 * counts_word
        )
        self._table_epoch = ctypes.c_int32.from_address(self.address)
        self._recv_count = ctypes.c_int32.from_address(self.address + 4)
        self._recv_epoch = ctypes.c_int32.from_address(self.address + 8)
        self._mismatch_epoch = ctypes.c_int32.from_address(self.address + 4 * HOST_MISMATCH_WORD)

    def read_table(self, buffer: SymmetricBuffer, epoch: int, num_counts: int) -> list[list[int]]:
        """Wait (host spin, bounded) for the table of the count exchange at ``epoch`` and return
        its ``num_ranks`` rows of ``num_counts`` ints; raise a peer's timeout. Epochs only
        increase, so an older table's word never equals ``epoch``."""
        flag = self._table_epoch
        if flag.value != epoch:
            limit = max(HOST_WAIT_S, buffer.timeout_s)
            deadline = time.monotonic() + limit
            spins = 0
            while flag.value != epoch:
                buffer.check_error()
                spins += 1
                if spins % 4096 == 0 and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"dispatch (count read): rank {buffer.rank} did not get the count table from its "
                        f"device within {limit:.0f} s (device busy or stuck)"
                    )
        buffer.check_error()
        table = self._table
        return [table[r * num_counts : (r + 1) * num_counts] for r in range(self.num_ranks)]

    def check_fingerprints(self, rank: int, mine: list[int]) -> None:
        """Raise ``InconsistentCallError`` if a peer's fingerprint in the host copy differs from
        ``mine`` (the words this rank gave the count kernel). Valid once ``read_table`` returned,
        or once ``mismatch_seen`` is true."""
        words = self._fingerprints[:]
        theirs = {
            peer: CallFingerprint.from_words(words[peer * FINGERPRINT_WORDS : (peer + 1) * FINGERPRINT_WORDS])
            for peer in range(self.num_ranks)
            if peer != rank
        }
        check_fingerprints(rank, CallFingerprint.from_words(mine), theirs)

    def mismatch_seen(self, epoch: int) -> bool:
        """Whether the count exchange at ``epoch`` (``num_worst_tokens`` mode) saw a peer's
        fingerprint differ; final once ``received_count(epoch)`` is not ``None`` (written before it)."""
        return self._mismatch_epoch.value == epoch

    def received_count(self, epoch: int) -> int | None:
        """The receive count of the count exchange at ``epoch`` without a host read, or ``None``
        while the device has not written it (or a later call replaced it)."""
        if self._recv_epoch.value != epoch:
            return None
        return int(self._recv_count.value)


class HostRecord:
    """The host-mapped record of a fingerprint difference seen in a push's entry barrier (cached
    dispatch, combine; ``normal_push.push_record_words``): word 0 the epoch of that call (0: none),
    then every rank's fingerprint words. The device writes it only while word 0 is 0; ``check``
    clears word 0 after reading. ``pin_memory=False``: a plain CPU buffer (the interpreter checks)."""

    def __init__(self, num_ranks: int, pin_memory: bool = True) -> None:
        self.num_ranks = num_ranks
        self.words = torch.zeros(
            push_record_words(num_ranks), dtype=torch.int32, device="cpu", pin_memory=pin_memory
        )
        self.address = self.words.data_ptr()
        self._epoch = ctypes.c_int32.from_address(self.address)
        self._rows = (ctypes.c_int32 * (num_ranks * FINGERPRINT_WORDS)).from_address(self.address + 4)

    def check(self, rank: int) -> None:
        """Raise ``InconsistentCallError`` (naming this rank, the first differing peer and both
        calls) if a push recorded a fingerprint difference; the record is then cleared. No device
        synchronization: a kernel that has not run yet is seen by a later check."""
        if self._epoch.value == 0:
            return
        words = self._rows[:]
        self._epoch.value = 0
        rows = [
            CallFingerprint.from_words(words[s * FINGERPRINT_WORDS : (s + 1) * FINGERPRINT_WORDS])
            for s in range(self.num_ranks)
        ]
        theirs = {peer: rows[peer] for peer in range(self.num_ranks) if peer != rank}
        check_fingerprints(rank, rows[rank], theirs)


class NvlinkNormal:
    """Normal-mode dispatch, cached dispatch and combine over one symmetric buffer.

    Arguments:
        buffer: the symmetric buffer (with a count table).
        settings: the kernel knobs.
        num_ranks_per_node: ranks per node (for ``get_dispatch_layout``'s per-node counts).
    """

    def __init__(self, buffer: SymmetricBuffer, settings: Settings, num_ranks_per_node: int) -> None:
        self.buffer = buffer
        self.settings = settings
        self.device = buffer.device
        self.rank = buffer.rank
        self.num_ranks = buffer.num_ranks
        self.num_ranks_per_node = num_ranks_per_node
        self.host_counts = _HostCounts(self.num_ranks)
        # Views of the areas per region layout, for one generation of the buffer (each view costs
        # a few microseconds of host time per call otherwise).
        self._views_generation = -1
        self._dispatch_views: dict[DispatchRegions, _DispatchAreas] = {}
        self._combine_views: dict[CombineRegions, tuple[torch.Tensor, torch.Tensor]] = {}
        # num_worst_tokens mode cannot read the receive count without a sync: the count kernel
        # writes it to host-mapped memory and a later call checks it (epoch, allowed rows, the
        # fingerprint words of that call).
        self._worst_check: tuple[int, int, list[int]] | None = None
        # Cached dispatch and combine: a push that saw a peer's fingerprint differ records it here.
        self.push_record = HostRecord(self.num_ranks)
        self.calls = CallNumbers()

    # ---- layout -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """``epcomm.layout.compute_dispatch_layout`` as one Triton kernel (``kernels/layout.py``),
        or as sync-free torch ops on the device with ``Settings.layout_kernel`` ``torch``."""
        if self.settings.layout_kernel is LayoutKernel.TRITON:
            return launch_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)
        return compute_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)

    # ---- helpers ------------------------------------------------------------------------------
    def check_worst(self) -> None:
        """Raise if an earlier cached dispatch or combine saw a peer make a different call, or an
        earlier ``num_worst_tokens`` dispatch did (``InconsistentCallError``; that call moved no
        row), or such a dispatch received more rows than it allowed (each checked once the kernel
        has written it to host-mapped memory; a later ``num_worst_tokens`` dispatch replaces the
        check). Reads host-mapped words only: no device synchronization."""
        self.push_record.check(self.rank)
        if self._worst_check is not None:
            epoch, allowed, fingerprint = self._worst_check
            received = self.host_counts.received_count(epoch)
            if received is not None:
                self._worst_check = None
                if self.host_counts.mismatch_seen(epoch):
                    self.host_counts.check_fingerprints(self.rank, fingerprint)
                if received > allowed:
                    raise ValueError(
                        f"dispatch: num_worst_tokens={allowed} but rank {self.rank} received {received} "
                        "tokens in an earlier call (rows past num_worst_tokens were dropped); "
                        "num_worst_tokens must be >= the largest receive count"
                    )

    def _capacity(self, row_words: int) -> int:
        """Rows of ``row_words`` words the payload holds, the same on every rank (same buffer size)."""
        return row_capacity(self.buffer.payload_words, row_words)

    def _ensure_rows(self, num_rows: int, row_words: int) -> None:
        """Grow the payload to ``num_rows`` rows (collective: every rank passes the same numbers)."""
        if num_rows > self._capacity(row_words):
            self.buffer.ensure_payload(num_rows * row_words + REGION_SLACK_WORDS)

    @staticmethod
    def _words(tensor: torch.Tensor, name: str) -> torch.Tensor:
        contiguous = tensor.contiguous()
        if contiguous.size(1) * contiguous.element_size() % 16 != 0:
            raise ValueError(
                f"{name}: the NVLink backend needs rows of a multiple of 16 bytes; "
                f"got {contiguous.size(1)} x {contiguous.element_size()} bytes"
            )
        return contiguous.view(torch.int32)

    def _push_fingerprint(
        self, fingerprint: CallFingerprint, fills: tuple[tuple[torch.Tensor, int], ...]
    ) -> PushFingerprint:
        """What a push with an entry barrier sends and compares: the stamped ``fingerprint``'s
        words, the count table's fingerprint rows, the host record and the ``fills``."""
        return PushFingerprint(
            device_words(fingerprint), self.buffer.header.table, self.push_record.address, fills
        )

    def _barriers(self, entry: Operation | None, exit_: Operation) -> PushBarriers:
        """Epochs of the barriers folded into the next push (taken in launch order)."""
        entry_epoch = self.buffer.next_epoch() if entry is not None else 0
        return PushBarriers(
            entry_epoch, self.buffer.next_epoch(), int(entry) if entry is not None else 0, int(exit_)
        )

    def _fresh_views(self) -> None:
        if self._views_generation != self.buffer.generation:
            self._views_generation = self.buffer.generation
            self._dispatch_views.clear()
            self._combine_views.clear()

    def _dispatch_areas(self, regions: DispatchRegions) -> _DispatchAreas:
        """Views of this rank's receive area for ``regions`` (cached per buffer allocation)."""
        self._fresh_views()
        areas = self._dispatch_views.get(regions)
        if areas is None:
            capacity, k, view = regions.capacity, regions.num_topk, self.buffer.view
            areas = self._dispatch_views[regions] = _DispatchAreas(
                view(regions.x, capacity * regions.x_words, torch.int32).view(capacity, regions.x_words),
                view(regions.scales, capacity * regions.scale_words, torch.int32).view(
                    capacity, regions.scale_words
                ),
                view(regions.src_idx, capacity, torch.int32),
                view(regions.topk_idx, capacity * k * 2, torch.int32).view(torch.int64),
                view(regions.topk_weights, capacity * k, torch.float32),
            )
        return areas

    def _combine_areas(self, regions: CombineRegions) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x as bf16, topk weights as float32)`` views of this rank's combine area (cached)."""
        self._fresh_views()
        areas = self._combine_views.get(regions)
        if areas is None:
            capacity, view = regions.capacity, self.buffer.view
            areas = self._combine_views[regions] = (
                view(regions.x, capacity * regions.x_words, torch.int32).view(torch.bfloat16),
                view(regions.topk_weights, capacity * regions.num_topk, torch.float32),
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

    # ---- dispatch -----------------------------------------------------------------------------
    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Normal-mode dispatch; see ``Buffer.dispatch``.

        The count table is read on the host *while* the push runs: the push targets the capacity
        the buffer already has (the same on every rank); if the table shows a rank needs more,
        every rank sees it, grows the buffer and pushes again.
        """
        if request.handle is not None:
            return self._cached_dispatch(request, intranode_handle(request.handle))
        assert request.num_tokens_per_expert is not None
        x, is_token_in_rank = request.x, request.is_token_in_rank.contiguous()
        rank, num_ranks = self.rank, self.num_ranks
        num_experts = request.num_tokens_per_expert.numel()
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"the NVLink backend supports up to {MAX_EXPERTS} experts; got {num_experts}")
        num_local_experts = num_experts // num_ranks
        worst = request.num_worst_tokens
        num_counts = counts_row_words(num_ranks, num_experts)
        # One kernel counts the tokens per rank, publishes [per-rank, per-expert] counts into every
        # peer's table, waits for theirs, turns the table into every row number and (unless
        # num_worst_tokens) copies it to host-mapped memory, which the host reads while the push runs.
        # It is launched first (after the row-size checks, which must fail before any communication):
        # the host prepares the push while it runs. Epochs are taken in launch order (the count
        # exchange's, then the push's exit barrier's).
        x_words = self._words(x, "x")
        scale_words = self._words(request.x_scales, "x_scales") if request.x_scales is not None else None
        stamped = self.calls.stamp(request.fingerprint)
        fingerprint = device_words(stamped)
        counts_epoch = self.buffer.next_epoch()
        recv_row_of_token, rank_prefix_matrix, num_recv_tokens = launch_dispatch_counts(
            peers=self.buffer.peers,
            num_tokens_per_expert=request.num_tokens_per_expert.contiguous(),
            is_token_in_rank=is_token_in_rank,
            epoch=counts_epoch,
            operation_code=int(Operation.DISPATCH_COUNTS),
            table_offset=self.buffer.header.table,
            host_address=self.host_counts.address,
            write_host=worst == 0,
            fingerprint=fingerprint,
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

        def push() -> DispatchRegions:
            regions = DispatchRegions(
                self.buffer.header.payload,
                self._capacity(row_words),
                x_words.size(1),
                num_scale_words,
                num_topk,
            )
            # No entry barrier: the count exchange was one (every peer had published its counts,
            # so it was done reading its area).
            launch_push_rows(
                peers=self.buffer.peers,
                x_words=x_words,
                dst_row=recv_row_of_token,
                regions=_push_regions(regions),
                capacity=regions.capacity,
                num_sms=max(1, request.config.num_sms),
                num_warps=self.settings.push_warps,
                rows_per_step=self.settings.push_rows,
                barriers=self._barriers(None, Operation.DISPATCH),
                scales_words=scale_words,
                topk_idx=request.topk_idx,
                topk_weights=request.topk_weights,
                num_local_experts=num_local_experts,
                localize_topk=request.topk_idx is not None,
                write_src_idx=True,
            )
            return regions

        regions = push()
        per_expert_list: list[int] = []
        if worst > 0:
            num_rows = num_max_rows = worst
            self._worst_check = (counts_epoch, worst, fingerprint)
        else:
            # Plain Python on lists: a dozen small CPU tensor ops cost ~200 us here.
            host = self.host_counts.read_table(self.buffer, counts_epoch, num_counts)
            # Before the counts are trusted (a peer's may follow another num_experts): on a
            # difference the kernel numbered no row, so the push wrote nothing.
            self.host_counts.check_fingerprints(rank, fingerprint)
            sent = [row[:num_ranks] for row in host]
            num_rows = sum(row[rank] for row in sent)
            num_max_rows = max(max(map(sum, sent)), max(map(sum, zip(*sent))))
            if num_max_rows > regions.capacity:  # every rank reads the same table: all grow and push again
                self._ensure_rows(num_max_rows, row_words)
                regions = push()
            start = num_ranks + rank * num_local_experts
            per_expert_list = list(map(sum, zip(*(row[start : start + num_local_experts] for row in host))))
            alignment = request.expert_alignment
            if alignment > 1:
                per_expert_list = [
                    (count + alignment - 1) // alignment * alignment for count in per_expert_list
                ]

        recv_x, recv_scales = self._copy_out_payload(regions, num_rows, x.dtype, request.x_scales)
        areas = self._dispatch_areas(regions)
        recv_src_idx, recv_topk_idx, recv_topk_weights = launch_copy_out_meta(
            src_idx_area=areas.src_idx,
            topk_idx_area=areas.topk_idx if request.topk_idx is not None else None,
            topk_weights_area=areas.topk_weights if request.topk_weights is not None else None,
            num_rows=num_rows,
            num_topk=regions.num_topk,
            num_real_rows=num_recv_tokens if worst > 0 else None,
            num_sms=max(1, request.config.num_sms),
        )
        handle = DispatchHandle(
            rank_prefix_matrix=rank_prefix_matrix,
            is_token_in_rank=is_token_in_rank,
            recv_row_of_token=recv_row_of_token,
            recv_src_idx=recv_src_idx,
            num_recv_tokens=num_recv_tokens,
            num_recv_rows=num_rows,
            num_max_rows=num_max_rows,
            sequence=stamped.sequence,
        )
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle)

    def _cached_dispatch(self, request: DispatchRequest, handle: DispatchHandle) -> DispatchResult:
        x_words = self._words(request.x, "x")
        scale_words = self._words(request.x_scales, "x_scales") if request.x_scales is not None else None
        stamped = self.calls.stamp(request.fingerprint)
        num_scale_words = scale_words.size(1) if scale_words is not None else 0
        row_words = DispatchRegions.row_words(x_words.size(1), num_scale_words, 1)
        self._ensure_rows(handle.num_max_rows, row_words)
        regions = DispatchRegions(
            self.buffer.header.payload, self._capacity(row_words), x_words.size(1), num_scale_words, 1
        )
        # On a fingerprint difference the rows this call returns are zeroed, not an earlier call's.
        areas = self._dispatch_areas(regions)
        num_rows = handle.num_recv_rows
        fills = [(areas.x[:num_rows].view(-1), 0)]
        if scale_words is not None:
            fills.append((areas.scales[:num_rows].view(-1), 0))
        launch_push_rows(
            peers=self.buffer.peers,
            x_words=x_words,
            dst_row=handle.recv_row_of_token,
            regions=_push_regions(regions),
            capacity=regions.capacity,
            num_sms=max(1, request.config.num_sms),
            num_warps=self.settings.push_warps,
            rows_per_step=self.settings.push_rows,
            barriers=self._barriers(Operation.CACHED_DISPATCH_ENTRY, Operation.CACHED_DISPATCH),
            scales_words=scale_words,
            fingerprint=self._push_fingerprint(stamped, tuple(fills)),
        )
        recv_x, recv_scales = self._copy_out_payload(
            regions, handle.num_recv_rows, request.x.dtype, request.x_scales
        )
        return DispatchResult(recv_x, recv_scales, None, None, [], handle)

    # ---- combine ------------------------------------------------------------------------------
    def combine(self, request: CombineRequest) -> CombineResult:
        """Normal-mode combine; see ``Buffer.combine``: the push writes each row back into its token
        rank's combine area, then the reduce sums them."""
        handle, x = intranode_handle(request.handle), request.x
        x_words = self._words(x, "x")
        stamped = self.calls.stamp(request.fingerprint)
        num_topk = request.topk_weights.size(1) if request.topk_weights is not None else 1
        row_words = CombineRegions.row_words(x.size(1) // 2, num_topk)
        self._ensure_rows(handle.num_max_rows, row_words)
        regions = CombineRegions(
            self.buffer.header.payload, self._capacity(row_words), x.size(1) // 2, num_topk
        )
        num_sms = max(1, request.config.num_sms)
        dst_row, token_slot = launch_combine_rows(
            rank_prefix_matrix=handle.rank_prefix_matrix.to(torch.int32).contiguous(),
            recv_row_of_token=handle.recv_row_of_token.contiguous(),
            num_rows=x.size(0),
            rank=self.rank,
            num_sms=num_sms,
        )
        area_x, area_weights = self._combine_areas(regions)
        num_tokens = handle.is_token_in_rank.size(0)
        combined_weights = None
        if request.topk_weights is not None:
            combined_weights = torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self.device)
        combined = torch.empty(num_tokens, x.size(1), dtype=torch.bfloat16, device=self.device)
        launch_push_rows(
            peers=self.buffer.peers,
            x_words=x_words,
            dst_row=dst_row,
            regions=_push_regions(regions),
            capacity=regions.capacity,
            num_sms=num_sms,
            num_warps=self.settings.push_warps,
            rows_per_step=self.settings.push_rows,
            barriers=self._barriers(Operation.COMBINE_ENTRY, Operation.COMBINE),
            topk_weights=request.topk_weights,
            one_destination=True,
            # On a fingerprint difference the reduce finds no row (only the biases).
            fingerprint=self._push_fingerprint(stamped, ((token_slot, -1),)),
        )
        launch_combine_reduce(
            area_x=area_x,
            area_weights=area_weights if request.topk_weights is not None else None,
            slot=token_slot,
            bias=tuple(b.contiguous() for b in request.bias),
            out_x=combined,
            out_weights=combined_weights,
            num_sms=num_sms,
            num_warps=self.settings.reduce_warps,
            tokens_per_step=self.settings.reduce_tokens,
        )
        return CombineResult(combined, combined_weights)
