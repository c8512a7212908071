"""Low-latency mode on the NVLink symmetric buffer: one Triton kernel per op (``ll_dispatch_kernel``,
``ll_combine_kernel``), launched once (both phases) or, with a receive hook, twice (send, which also
signals, then receive on ``hook()``); no host synchronization anywhere (capturable in a CUDA
graph), a receive hook that holds no SM.

The payload layout is ``symmetric_buffer.LowLatencyLayout`` (also the size hint). Sequence numbers
live in device memory on both sides, so replays of a captured graph stay in step.

Every call carries its fingerprint (``epcomm.fingerprint``; the call number counts this mode's
calls on the buffer): the send phase writes it to every unmasked peer with the count, before the
flag; the receive phase compares and treats a source whose call differs as one that sent nothing
(``kernels/low_latency_dispatch.py``), recording both calls in host-mapped memory. The host raises
``InconsistentCallError`` from that record at the receive hook or the next low-latency call (once
the kernel has run; never while a CUDA graph is being captured). The comparison needs the ranks'
waits to meet: a peer in the other operation or parity signals other flags, and the wait ends
with a ``PeerTimeoutError`` as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from epcomm import quant
from epcomm._math import align_up
from epcomm.backends.base import (
    LowLatencyCombineRequest,
    LowLatencyCombineResult,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
    ResultBuffers,
)
from epcomm.backends.nvlink.normal import HostRecord, device_words
from epcomm.backends.nvlink.symmetric_buffer import (
    LowLatencyLayout,
    Operation,
    SymmetricBuffer,
    operation_name,
)
from epcomm.errors import PeerMaskedWarning
from epcomm.fingerprint import CallFingerprint, CallNumbers, XFormat
from epcomm.handles import LowLatencyHandle
from epcomm.kernels.barrier import launch_masked_barrier
from epcomm.kernels.low_latency_combine import launch_ll_combine, ll_combine_put_kernel
from epcomm.kernels.low_latency_dispatch import (
    CallCheck,
    DispatchOutputs,
    LowLatencyWords,
    Phase,
    PutPath,
    SignalState,
    launch_ll_dispatch,
    ll_dispatch_put_kernel,
)
from epcomm.kernels.nvshmem_primitives import launchable
from epcomm.kernels.symmetric_peers import SymmetricPeers

__all__ = ["NvlinkLowLatency"]

_Result = TypeVar("_Result", LowLatencyDispatchResult, LowLatencyCombineResult)

_DISPATCH, _COMBINE = 0, 1


class NvlinkLowLatency:
    """Low-latency dispatch/combine over NVLink with two alternating result buffers.

    Shrink mode: the rank mask lives on the device. A wait that gives up on a peer (after
    ``shrink_timeout_s``) masks it there and logs it in the host-mapped error word; the host warns
    (``PeerMaskedWarning``) when it next looks: at the next call, ``clean``, or a query of the mask.

    Put path (a buffer with ``barrier_put``: multi-node NVSHMEM): the ranks outside
    ``buffer.store_ranks`` (other nodes) are reached by NVSHMEM puts
    (``kernels.low_latency_dispatch.PutPath``, with the buffer's ``reach`` and ``pes``), the others
    by stores; the kernels are the put variants, launched through ``requires_nvshmem``, and so is
    ``clean``'s barrier.

    Arguments:
        buffer: the symmetric buffer (``num_rdma_bytes`` of payload, validated against the size hint).
        enable_shrink: a peer that misses a wait is masked instead of failing the call.
        shrink_timeout_s: the wait's bound in shrink mode (``EPCOMM_SHRINK_TIMEOUT_S``).
    """

    def __init__(
        self, buffer: SymmetricBuffer, enable_shrink: bool = False, shrink_timeout_s: float = 3.0
    ) -> None:
        self.buffer = buffer
        self.device = device = buffer.device
        self.rank = buffer.rank
        self.num_ranks = buffer.num_ranks
        self.enable_shrink = enable_shrink
        self.shrink_timeout_s = shrink_timeout_s
        self._mask_device = torch.zeros(self.num_ranks, dtype=torch.int32, device=device)
        self._warned: set[int] = set()
        # Per (phase, parity): sequence numbers per peer, and the send phases' arrival counter (0
        # between calls). Rows padded to a multiple of 4 words keep every row 16-byte aligned, so
        # both parities share one kernel specialization.
        stride = align_up(self.num_ranks, 4)
        self._send_seq = torch.zeros(2, 2, stride, dtype=torch.int32, device=device)
        self._recv_expected = torch.zeros(2, 2, stride, dtype=torch.int32, device=device)
        self._arrivals = torch.zeros(2, 2, 4, dtype=torch.int32, device=device)
        # Per (phase, parity): 1 for each source whose call differed (the receive phase's work space).
        self._differs = torch.zeros(2, 2, stride, dtype=torch.int32, device=device)
        # A receive phase that saw a peer's fingerprint differ records both calls here.
        self.record = HostRecord(self.num_ranks)
        self.calls = CallNumbers()
        self._parity = 0
        self._buffers = ResultBuffers()
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._generation = buffer.generation
        self.put_path = buffer.put_barriers

    def _put(self, layout: LowLatencyLayout, phase: int, parity: int) -> PutPath | None:
        """The put path of ``(phase, parity)`` (``None`` without one)."""
        if not self.put_path:
            return None
        payload = self.buffer.header.payload
        reach, pes = self.buffer.barrier_put.reach, self.buffer.barrier_put.pes
        if phase == _DISPATCH:
            return PutPath(
                reach,
                pes,
                payload + layout.topk(parity),
                payload + layout.dispatch_outbox,
                payload + layout.mine(_DISPATCH),
                launchable(ll_dispatch_put_kernel),
            )
        return PutPath(
            reach,
            pes,
            0,
            payload + layout.combine_outbox,
            payload + layout.mine(_COMBINE),
            launchable(ll_combine_put_kernel),
        )

    def layout(self, capacity: int, hidden: int, num_topk: int, num_experts: int) -> LowLatencyLayout:
        """The payload layout of calls of these sizes (with the put path's areas on it)."""
        return LowLatencyLayout(
            self.num_ranks, capacity, hidden, num_topk, self.put_path, num_experts // self.num_ranks
        )

    # ---- state --------------------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor:
        """``[num_ranks]`` int32 on the device, 1 where a rank is masked (stream-ordered: a copy of
        it on the current stream sees every earlier call's masking)."""
        self._warn_masked()
        return self._mask_device

    def set_mask(self, rank: int, masked: bool) -> None:
        """Shrink mode: skip ``rank`` (no send, no wait) while masked."""
        self._warn_masked()
        self._mask_device[rank] = int(masked)
        if not masked:
            self.buffer.forget_masked(rank)
            self._warned.discard(rank)

    def clean(self) -> None:
        """Forget the result buffers, then a barrier over the unmasked ranks (bounded; in shrink
        mode a rank that misses it is masked). Synchronizes the stream, so a timeout raises (or
        warns, in shrink mode) here."""
        self._buffers.clear()
        launch_masked_barrier(
            peers=self._wait_peers(),
            rank_mask=self._mask_device,
            epoch=self.buffer.next_epoch(),
            operation_code=int(Operation.LOW_LATENCY_CLEAN),
            shrink=self.enable_shrink,
            put=self.buffer.barrier_put,
        )
        torch.cuda.current_stream(self.device).synchronize()
        self.buffer.check_error()
        self._warn_masked()

    def _wait_peers(self) -> SymmetricPeers:
        """The peer record the kernels get: in shrink mode, waits bounded by the shrink timeout."""
        peers = self.buffer.peers
        if self.enable_shrink:
            return peers._replace(timeout_ns=int(self.shrink_timeout_s * 1e9))
        return peers

    def _warn_masked(self) -> None:
        """Warn once for each peer a kernel masked on its own (read without synchronizing), naming
        the operation by its method (the first word of its error name)."""
        if not self.enable_shrink:
            return
        for peer, code in self.buffer.masked_by_timeout().items():
            if peer not in self._warned:
                self._warned.add(peer)
                warnings.warn(
                    PeerMaskedWarning(
                        operation_name(code).split(" ")[0], self.rank, peer, self.shrink_timeout_s
                    ),
                    stacklevel=4,
                )

    def _buffer(self, parity: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._buffers.get(parity, name, shape, dtype, self.device)

    def check_record(self) -> None:
        """Raise ``InconsistentCallError`` if an earlier receive phase saw a peer make a different
        call (read from host-mapped memory, no device synchronization; skipped while the current
        stream is being captured into a CUDA graph)."""
        if not torch.cuda.is_current_stream_capturing():
            self.record.check(self.rank)

    def _check(self, words: list[int], phase: int, parity: int) -> CallCheck:
        """The ``CallCheck`` of a call with fingerprint ``words`` in ``(phase, parity)``."""
        return CallCheck(words, self._differs[phase, parity], self.record.address)

    def _prepare(self, layout: LowLatencyLayout) -> None:
        self.buffer.check_error()
        self.check_record()
        self._warn_masked()
        self.buffer.ensure_payload(layout.total_words)
        if self.buffer.generation != self._generation:  # reallocated: flags start over
            self._generation = self.buffer.generation
            self._send_seq.zero_()
            self._recv_expected.zero_()
            self._arrivals.zero_()

    def _words(self, layout: LowLatencyLayout, phase: int, parity: int) -> LowLatencyWords:
        """Offsets from word 0 of the buffer of ``(phase, parity)``'s flags, counts and staging."""
        payload = self.buffer.header.payload
        staging = layout.dispatch_staging(parity) if phase == _DISPATCH else layout.combine_staging(parity)
        return LowLatencyWords(
            payload + layout.flags(phase, parity),
            payload + layout.counts(parity),
            payload + staging,
            payload + layout.fingerprints(phase, parity),
        )

    def _signals(self, phase: int, parity: int) -> SignalState:
        """The send phase's signal state: arrival counter, send sequence, expected sequence."""
        return SignalState(
            self._arrivals[phase, parity],
            self._send_seq[phase, parity],
            self._recv_expected[phase, parity],
        )

    def combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The zero-copy combine buffer of ``handle``'s parity, ``[L, R * M, hidden]`` bf16."""
        shape = (
            handle.num_experts // self.num_ranks,
            self.num_ranks * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        return self._buffer(handle.buffer_parity, "combine", shape, torch.bfloat16)

    # ---- dispatch -----------------------------------------------------------------------------
    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """See ``Buffer.low_latency_dispatch``."""
        x, topk_idx = request.x.contiguous(), request.topk_idx.contiguous()
        hidden = x.size(1)
        num_topk = topk_idx.size(1)
        capacity = request.num_max_dispatch_tokens_per_rank
        num_ranks = self.num_ranks
        num_local_experts = request.num_experts // num_ranks
        num_rows = num_ranks * capacity
        layout = self.layout(capacity, hidden, num_topk, request.num_experts)
        self._prepare(layout)
        x_format = XFormat.for_low_latency(request.use_fp8, request.use_ue8m0)
        stamped = self.calls.stamp(
            CallFingerprint.for_low_latency_dispatch(
                hidden, x_format, request.num_experts, num_topk, capacity
            )
        )
        parity, self._parity = self._parity, self._parity ^ 1
        check = self._check(device_words(stamped), _DISPATCH, parity)

        shape = (num_local_experts, num_rows, hidden)
        num_groups = hidden // 128
        scale_columns = quant.num_packed_ue8m0(hidden) if request.use_ue8m0 else num_groups
        if request.use_fp8:
            recv_data = self._buffer(parity, "x_fp8", shape, torch.float8_e4m3fn)
            scale_dtype = torch.int32 if request.use_ue8m0 else torch.float32
            scale_storage = self._buffer(
                parity, "scales", (num_local_experts, scale_columns, num_rows), scale_dtype
            )
            recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = (
                recv_data,
                scale_storage.transpose(1, 2),
            )
        else:
            recv_data = self._buffer(parity, "x_bf16", shape, torch.bfloat16)
            scale_storage = recv_data
            recv_x = recv_data
        recv_count = self._buffer(parity, "count", (num_local_experts,), torch.int32)
        scratch = self._buffer(parity, "scratch", (num_local_experts, num_rows), torch.int32)
        recv_src_info = torch.empty(num_local_experts, num_rows, dtype=torch.int32, device=self.device)
        recv_layout_range = torch.empty(num_local_experts, num_ranks, dtype=torch.int64, device=self.device)
        # -1 everywhere, written by the send phase (no separate fill launch); the receive phase
        # then writes the hits.
        combine_gather_idx = torch.empty(num_ranks, capacity, num_topk, dtype=torch.int64, device=self.device)
        handle = LowLatencyHandle(
            recv_src_info,
            recv_layout_range,
            capacity,
            hidden,
            request.num_experts,
            combine_gather_idx,
            parity,
            stamped.sequence,
        )
        recv_words = (
            recv_data.view(torch.uint8).view(torch.int32) if request.use_fp8 else recv_data.view(torch.int32)
        )
        outputs = DispatchOutputs(
            scratch,
            recv_words,
            scale_storage.view(torch.int32),
            recv_count,
            recv_src_info,
            recv_layout_range,
            request.cumulative_local_expert_recv_stats,
            request.dispatch_wait_recv_cost_stats,
        )
        signals = self._signals(_DISPATCH, parity)
        words = self._words(layout, _DISPATCH, parity)
        peers = self._wait_peers()
        local = self.buffer.local
        put = self._put(layout, _DISPATCH, parity)

        def run(phase: Phase) -> None:
            launch_ll_dispatch(
                phase=phase,
                peers=peers,
                local=local,
                x=x,
                topk_idx=topk_idx,
                rank_mask=self._mask_device,
                combine_gather_idx=combine_gather_idx,
                signals=signals,
                words=words,
                outputs=outputs,
                operation_code=int(Operation.LOW_LATENCY_DISPATCH),
                num_local_experts=num_local_experts,
                message_words=layout.message_words,
                use_fp8=request.use_fp8,
                round_scale=request.round_scale,
                use_ue8m0=request.use_ue8m0,
                num_sms=self.num_sms,
                check=check,
                shrink=self.enable_shrink,
                put=put,
            )

        return self._run(
            LowLatencyDispatchResult(recv_x, recv_count, handle, None), run, request.return_recv_hook
        )

    # ---- combine ------------------------------------------------------------------------------
    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """See ``Buffer.low_latency_combine``."""
        handle = request.handle
        capacity, hidden = handle.num_max_dispatch_tokens_per_rank, handle.hidden
        num_tokens, num_topk = request.topk_idx.shape
        parity = handle.buffer_parity
        layout = self.layout(capacity, hidden, num_topk, handle.num_experts)
        self._prepare(layout)
        stamped = self.calls.stamp(
            CallFingerprint.for_low_latency_combine(
                hidden, handle.num_experts, num_topk, capacity, handle.sequence
            )
        )
        check = self._check(device_words(stamped), _COMBINE, parity)
        x = self.combine_buffer(handle) if request.zero_copy else request.x.contiguous()
        out = (
            request.out
            if request.out is not None
            else torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        )
        topk_idx, topk_weights = request.topk_idx.contiguous(), request.topk_weights.contiguous()
        signals = self._signals(_COMBINE, parity)
        words = self._words(layout, _COMBINE, parity)
        peers = self._wait_peers()
        local = self.buffer.local
        put = self._put(layout, _COMBINE, parity)

        def run(phase: Phase) -> None:
            launch_ll_combine(
                phase=phase,
                peers=peers,
                local=local,
                x_words=x.view(torch.int32),
                combine_gather_idx=handle.combine_gather_idx,
                rank_mask=self._mask_device,
                signals=signals,
                words=words,
                operation_code=int(Operation.LOW_LATENCY_COMBINE),
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                out=out,
                wait_stats=request.combine_wait_recv_cost_stats,
                num_local_experts=handle.num_experts // self.num_ranks,
                num_sms=self.num_sms,
                check=check,
                shrink=self.enable_shrink,
                put=put,
            )

        return self._run(LowLatencyCombineResult(out, None), run, request.return_recv_hook)

    def _run(self, result: _Result, run: Callable[[Phase], None], return_recv_hook: bool) -> _Result:
        """One launch of both phases, or the send phase now and the receive phase as the hook
        (which first raises what an earlier receive phase recorded, ``check_record``)."""
        if not return_recv_hook:
            run(Phase.BOTH)
            return result

        def hook() -> None:
            self.check_record()
            run(Phase.RECEIVE)

        run(Phase.SEND)
        return result._replace(hook=hook)

    def destroy(self) -> None:
        """Release the symmetric buffer."""
        self.buffer.destroy()
        self._buffers.clear()
