"""Low-latency mode on NVLink symmetric memory: Triton send (which also signals) / receive kernels,
no host synchronization anywhere (capturable in a CUDA graph), a receive hook that holds no SM.

The symmetric payload layout is ``epcomm.ll_layout.LowLatencyLayout`` (also the size hint). Sequence
numbers live in device memory on both sides, so replays of a captured graph stay in step.
"""

from __future__ import annotations

from typing import Any

import torch
import triton

from epcomm import quant
from epcomm.backends.base import (
    LowLatencyCombineRequest,
    LowLatencyCombineResult,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
    ResultBuffers,
    finish_receive,
)
from epcomm.backends.nvlink.transport import PAYLOAD_OFFSET, SymmetricTransport
from epcomm.handles import LowLatencyHandle
from epcomm.kernels.exchange import MAX_PEERS
from epcomm.kernels.low_latency_combine import ll_combine_recv_kernel, ll_combine_send_kernel
from epcomm.kernels.low_latency_dispatch import ll_dispatch_recv_kernel, ll_dispatch_send_kernel
from epcomm.ll_layout import LowLatencyLayout, count_offset, flag_offset

__all__ = ["NvlinkLowLatency"]

_DISPATCH, _COMBINE = 0, 1


class NvlinkLowLatency:
    """Low-latency dispatch/combine over NVLink with two alternating result buffers.

    Arguments:
        group: the process group.
        device: this rank's CUDA device.
        timeout_s: bound of every wait.
        num_rdma_bytes: bytes of symmetric memory to allocate (validated against the size hint).
        shared_device: ranks share a GPU (buffers mapped through CUDA IPC).
    """

    def __init__(
        self, group: Any, device: torch.device, timeout_s: float, num_rdma_bytes: int, shared_device: bool
    ) -> None:
        self.transport = SymmetricTransport(group, device, timeout_s, num_rdma_bytes, shared_device)
        self.device = device
        self.rank = self.transport.rank
        self.num_ranks = self.transport.num_ranks
        self.mask = torch.zeros(self.num_ranks, dtype=torch.int32)
        self._mask_device = torch.zeros(self.num_ranks, dtype=torch.int32, device=device)
        # Per (phase, parity): sequence numbers per peer, and the send kernels' arrival counter (0
        # between calls). Rows padded to MAX_PEERS words keep every row 16-byte aligned, so both
        # parities share one kernel specialization.
        self._send_seq = torch.zeros(2, 2, MAX_PEERS, dtype=torch.int32, device=device)
        self._recv_expected = torch.zeros(2, 2, MAX_PEERS, dtype=torch.int32, device=device)
        self._arrivals = torch.zeros(2, 2, MAX_PEERS, dtype=torch.int32, device=device)
        self._parity = 0
        self._buffers = ResultBuffers()
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._buffer_id = self.transport.local.data_ptr()

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
        self.transport.check_error()
        self.transport.ensure_payload(layout.total_words)
        if self.transport.local.data_ptr() != self._buffer_id:  # reallocated: flags start over
            self._buffer_id = self.transport.local.data_ptr()
            self._send_seq.zero_()
            self._recv_expected.zero_()
            self._arrivals.zero_()

    def _peers(self) -> list[torch.Tensor]:
        views = [buffer[PAYLOAD_OFFSET:] for buffer in self.transport.peer_buffers]
        return views + [views[0]] * (MAX_PEERS - len(views))

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
        num_tokens, hidden = x.shape
        num_topk = topk_idx.size(1)
        capacity = request.num_max_dispatch_tokens_per_rank
        num_ranks, rank = self.num_ranks, self.rank
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
        x_words = hidden // 4 if request.use_fp8 else hidden // 2
        g_block = max(4, triton.next_power_of_2(num_groups))
        peers = self._peers()
        # One program per token up to the SMs (the grid is fixed per captured shape); with no token,
        # one program that only fills combine_gather_idx and signals (count 0).
        ll_dispatch_send_kernel[(max(1, min(num_tokens, self.num_sms)),)](
            *peers,
            x,
            topk_idx,
            self._mask_device,
            combine_gather_idx,
            *self._signal_state(_DISPATCH, parity),
            num_tokens,
            rank,
            flag_offset(_DISPATCH, parity),
            count_offset(parity),
            layout.dispatch_offset(parity),
            NUM_RANKS=num_ranks,
            NUM_LOCAL_EXPERTS=num_local_experts,
            CAPACITY=capacity,
            HIDDEN=hidden,
            NUM_TOPK=num_topk,
            K_BLOCK=triton.next_power_of_2(num_topk),
            MESSAGE_WORDS=layout.message_words,
            X_WORDS=x_words,
            X_BLOCK=triton.next_power_of_2(x_words),
            G_BLOCK=g_block,
            USE_FP8=request.use_fp8,
            ROUND_SCALE=request.round_scale,
            num_warps=8,
        )
        cumulative = request.cumulative_local_expert_recv_stats
        wait_stats = request.dispatch_wait_recv_cost_stats
        local = self.transport.local[PAYLOAD_OFFSET:]

        def receive() -> None:
            ll_dispatch_recv_kernel[(num_local_experts,)](
                local,
                self._mask_device,
                self._recv_expected[_DISPATCH, parity],
                scratch,
                recv_data.view(torch.int32)
                if not request.use_fp8
                else recv_data.view(torch.uint8).view(torch.int32),
                scale_storage.view(torch.int32),
                recv_count,
                recv_src_info,
                recv_layout_range,
                combine_gather_idx,
                cumulative if cumulative is not None else recv_count,
                wait_stats if wait_stats is not None else recv_layout_range,
                rank,
                self.transport.timeout_ns,
                self.transport.error_word.data_ptr(),
                flag_offset(_DISPATCH, parity),
                count_offset(parity),
                layout.dispatch_offset(parity),
                NUM_RANKS=num_ranks,
                NUM_LOCAL_EXPERTS=num_local_experts,
                CAPACITY=capacity,
                HIDDEN=hidden,
                NUM_TOPK=num_topk,
                K_BLOCK=triton.next_power_of_2(num_topk),
                ROWS_BLOCK=triton.next_power_of_2(num_rows),
                MESSAGE_WORDS=layout.message_words,
                X_WORDS=x_words,
                X_BLOCK=triton.next_power_of_2(x_words),
                G_BLOCK=g_block,
                USE_FP8=request.use_fp8,
                USE_UE8M0=request.use_ue8m0,
                SCALE_COLUMNS=scale_columns,
                HAS_CUMULATIVE_STATS=cumulative is not None,
                HAS_WAIT_STATS=wait_stats is not None,
                num_warps=16,
            )

        return finish_receive(
            LowLatencyDispatchResult(recv_x, recv_count, handle, None), receive, request.return_recv_hook
        )

    def _signal_state(self, phase: int, parity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The send kernel's signal arguments: arrival counter, send sequence, expected sequence."""
        return (
            self._arrivals[phase, parity],
            self._send_seq[phase, parity],
            self._recv_expected[phase, parity],
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
        x_words = hidden // 2
        items = self.num_ranks * capacity * num_topk
        ll_combine_send_kernel[(min(items, 4 * self.num_sms),)](
            *self._peers(),
            x.view(torch.int32),
            handle.combine_gather_idx,
            self._mask_device,
            *self._signal_state(_COMBINE, parity),
            self.rank,
            flag_offset(_COMBINE, parity),
            layout.combine_offset(parity),
            NUM_RANKS=self.num_ranks,
            CAPACITY=capacity,
            NUM_TOPK=num_topk,
            X_WORDS=x_words,
            X_BLOCK=triton.next_power_of_2(x_words),
            num_warps=8,
        )
        out = (
            request.out
            if request.out is not None
            else torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        )
        topk_idx, topk_weights = request.topk_idx.contiguous(), request.topk_weights.contiguous()
        wait_stats = request.combine_wait_recv_cost_stats
        local = self.transport.local[PAYLOAD_OFFSET:]
        num_local_experts = handle.num_experts // self.num_ranks

        def receive() -> None:
            ll_combine_recv_kernel[(max(1, min(num_tokens, self.num_sms)),)](
                local,
                self._mask_device,
                self._recv_expected[_COMBINE, parity],
                topk_idx,
                topk_weights,
                out,
                wait_stats if wait_stats is not None else topk_idx,
                num_tokens,
                self.rank,
                self.transport.timeout_ns,
                self.transport.error_word.data_ptr(),
                flag_offset(_COMBINE, parity),
                layout.combine_offset(parity),
                NUM_RANKS=self.num_ranks,
                NUM_LOCAL_EXPERTS=num_local_experts,
                HIDDEN=hidden,
                H_BLOCK=triton.next_power_of_2(hidden),
                NUM_TOPK=num_topk,
                HAS_WAIT_STATS=wait_stats is not None,
                num_warps=16,
            )

        return finish_receive(LowLatencyCombineResult(out, None), receive, request.return_recv_hook)

    def destroy(self) -> None:
        """Release the symmetric buffer."""
        self.transport.destroy()
        self._buffers.clear()
