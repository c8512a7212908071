"""Low-latency mode on the NVLink symmetric buffer: Triton send (which also signals) / receive
kernels, no host synchronization anywhere (capturable in a CUDA graph), a receive hook that holds
no SM.

The payload layout is ``symmetric_buffer.LowLatencyLayout`` (also the size hint). Sequence numbers
live in device memory on both sides, so replays of a captured graph stay in step.
"""

from __future__ import annotations

import torch

from epcomm import quant
from epcomm._math import align_up
from epcomm.backends.base import (
    LowLatencyCombineRequest,
    LowLatencyCombineResult,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
    ResultBuffers,
    finish_receive,
)
from epcomm.backends.nvlink.symmetric_buffer import LowLatencyLayout, Operation, SymmetricBuffer
from epcomm.handles import LowLatencyHandle
from epcomm.kernels.low_latency_combine import launch_ll_combine_recv, launch_ll_combine_send
from epcomm.kernels.low_latency_dispatch import (
    LowLatencyWords,
    SignalState,
    launch_ll_dispatch_recv,
    launch_ll_dispatch_send,
)

__all__ = ["NvlinkLowLatency"]

_DISPATCH, _COMBINE = 0, 1


class NvlinkLowLatency:
    """Low-latency dispatch/combine over NVLink with two alternating result buffers.

    Arguments:
        buffer: the symmetric buffer (``num_rdma_bytes`` of payload, validated against the size hint).
    """

    def __init__(self, buffer: SymmetricBuffer) -> None:
        self.buffer = buffer
        self.device = device = buffer.device
        self.rank = buffer.rank
        self.num_ranks = buffer.num_ranks
        self.mask = torch.zeros(self.num_ranks, dtype=torch.int32, device="cpu")
        self._mask_device = torch.zeros(self.num_ranks, dtype=torch.int32, device=device)
        # Per (phase, parity): sequence numbers per peer, and the send kernels' arrival counter (0
        # between calls). Rows padded to a multiple of 4 words keep every row 16-byte aligned, so
        # both parities share one kernel specialization.
        stride = align_up(self.num_ranks, 4)
        self._send_seq = torch.zeros(2, 2, stride, dtype=torch.int32, device=device)
        self._recv_expected = torch.zeros(2, 2, stride, dtype=torch.int32, device=device)
        self._arrivals = torch.zeros(2, 2, 4, dtype=torch.int32, device=device)
        self._parity = 0
        self._buffers = ResultBuffers()
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._generation = buffer.generation

    # ---- state --------------------------------------------------------------------------------
    def set_mask(self, rank: int, masked: bool) -> None:
        """Shrink mode: skip ``rank`` (no send, no wait) while masked."""
        self.mask[rank] = int(masked)
        self._mask_device[rank] = int(masked)

    def clean(self) -> None:
        """Forget the result buffers."""
        self._buffers.clear()

    def _buffer(self, parity: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._buffers.get(parity, name, shape, dtype, self.device)

    def _prepare(self, layout: LowLatencyLayout) -> None:
        self.buffer.check_error()
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
            payload + layout.flags(phase, parity), payload + layout.counts(parity), payload + staging
        )

    def _signals(self, phase: int, parity: int) -> SignalState:
        """The send kernel's signal state: arrival counter, send sequence, expected sequence."""
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
        layout = LowLatencyLayout(num_ranks, capacity, hidden, num_topk)
        self._prepare(layout)
        parity, self._parity = self._parity, self._parity ^ 1

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
        # -1 everywhere, written by the send kernel (no separate fill launch); the receive kernel
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
        )
        words = self._words(layout, _DISPATCH, parity)
        peers = self.buffer.peers
        # One program per token up to the SMs (the grid is fixed per captured shape); with no token,
        # one program that only fills combine_gather_idx and signals (count 0).
        launch_ll_dispatch_send(
            peers=peers,
            x=x,
            topk_idx=topk_idx,
            rank_mask=self._mask_device,
            combine_gather_idx=combine_gather_idx,
            signals=self._signals(_DISPATCH, parity),
            words=words,
            num_local_experts=num_local_experts,
            capacity=capacity,
            message_words=layout.message_words,
            use_fp8=request.use_fp8,
            round_scale=request.round_scale,
            num_sms=self.num_sms,
        )
        cumulative = request.cumulative_local_expert_recv_stats
        wait_stats = request.dispatch_wait_recv_cost_stats
        local = self.buffer.local
        recv_words = (
            recv_data.view(torch.uint8).view(torch.int32) if request.use_fp8 else recv_data.view(torch.int32)
        )

        def receive() -> None:
            launch_ll_dispatch_recv(
                peers=peers,
                local=local,
                rank_mask=self._mask_device,
                recv_expected=self._recv_expected[_DISPATCH, parity],
                words=words,
                operation_code=int(Operation.LOW_LATENCY_DISPATCH),
                scratch=scratch,
                recv_x_words=recv_words,
                recv_scales_words=scale_storage.view(torch.int32),
                recv_count=recv_count,
                recv_src_info=recv_src_info,
                recv_layout_range=recv_layout_range,
                combine_gather_idx=combine_gather_idx,
                cumulative_stats=cumulative,
                wait_stats=wait_stats,
                capacity=capacity,
                hidden=hidden,
                num_topk=num_topk,
                message_words=layout.message_words,
                use_fp8=request.use_fp8,
                use_ue8m0=request.use_ue8m0,
                scale_columns=scale_columns,
            )

        return finish_receive(
            LowLatencyDispatchResult(recv_x, recv_count, handle, None), receive, request.return_recv_hook
        )

    # ---- combine ------------------------------------------------------------------------------
    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """See ``Buffer.low_latency_combine``."""
        handle = request.handle
        capacity, hidden = handle.num_max_dispatch_tokens_per_rank, handle.hidden
        num_tokens, num_topk = request.topk_idx.shape
        parity = handle.buffer_parity
        layout = LowLatencyLayout(self.num_ranks, capacity, hidden, num_topk)
        self._prepare(layout)
        x = self.combine_buffer(handle) if request.zero_copy else request.x.contiguous()
        peers = self.buffer.peers
        words = self._words(layout, _COMBINE, parity)
        launch_ll_combine_send(
            peers=peers,
            x_words=x.view(torch.int32),
            combine_gather_idx=handle.combine_gather_idx,
            rank_mask=self._mask_device,
            signals=self._signals(_COMBINE, parity),
            words=words,
            num_sms=self.num_sms,
        )
        out = (
            request.out
            if request.out is not None
            else torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        )
        topk_idx, topk_weights = request.topk_idx.contiguous(), request.topk_weights.contiguous()
        wait_stats = request.combine_wait_recv_cost_stats
        local = self.buffer.local
        num_local_experts = handle.num_experts // self.num_ranks

        def receive() -> None:
            launch_ll_combine_recv(
                peers=peers,
                local=local,
                rank_mask=self._mask_device,
                recv_expected=self._recv_expected[_COMBINE, parity],
                words=words,
                operation_code=int(Operation.LOW_LATENCY_COMBINE),
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                out=out,
                wait_stats=wait_stats,
                num_local_experts=num_local_experts,
                num_sms=self.num_sms,
            )

        return finish_receive(LowLatencyCombineResult(out, None), receive, request.return_recv_hook)

    def destroy(self) -> None:
        """Release the symmetric buffer."""
        self.buffer.destroy()
        self._buffers.clear()
