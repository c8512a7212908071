"""The low-latency (decode) and shrink-mode methods of ``Buffer``, kept in their own file.

``Buffer`` inherits them; like the rest of the facade they validate arguments, pick the stream
and delegate to the backend, launching no kernel themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from epcomm import validation
from epcomm._logging import log_once
from epcomm.backends.base import Backend, LowLatencyCombineRequest, LowLatencyDispatchRequest
from epcomm.backends.nvlink.symmetric_buffer import MAX_LOW_LATENCY_TOPK, low_latency_rdma_size_hint
from epcomm.env import Settings
from epcomm.event import EventOverlap, comm_stream_scope
from epcomm.handles import LowLatencyHandle, as_handle
from epcomm.validation import check_dtype, check_int, check_same_device, check_shape, check_tensor

__all__ = ["LowLatencyMethods"]


def _noop_hook() -> None:
    """The receive hook returned when ``return_recv_hook=False``: nothing left to do."""


class LowLatencyMethods:
    """Mixin of ``Buffer``: ``low_latency_*``, ``clean_low_latency_buffer`` and the shrink mask."""

    group_size: int
    low_latency_mode: bool
    num_rdma_bytes: int
    enable_shrink: bool
    settings: Settings

    @property
    def backend(self) -> Backend:  # provided by Buffer
        raise NotImplementedError

    def _stream_for(self, tensor: torch.Tensor) -> torch.cuda.Stream | None:  # provided by Buffer
        raise NotImplementedError

    # ---- low-latency mode ---------------------------------------------------------------------
    def _check_low_latency(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        if not self.low_latency_mode:
            raise ValueError(
                "low-latency calls need Buffer(..., low_latency_mode=True); got low_latency_mode=False"
            )
        needed = low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts
        )
        if self.num_rdma_bytes < needed:
            raise ValueError(
                f"num_rdma_bytes={self.num_rdma_bytes} is too small for low-latency mode with "
                f"num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank}, hidden={hidden}, "
                f"num_ranks={self.group_size}, num_experts={num_experts}: needs {needed} "
                "(Buffer.get_low_latency_rdma_size_hint)"
            )

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[
        torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        torch.Tensor,
        LowLatencyHandle,
        EventOverlap,
        Callable[[], None],
    ]:
        """Decode-time dispatch into fixed-capacity, expert-major buffers (no CPU synchronization).

        Arguments:
            x: ``[num_tokens, hidden]`` bf16, ``num_tokens <= num_max_dispatch_tokens_per_rank``,
                ``hidden`` a multiple of 128.
            topk_idx: ``[num_tokens, num_topk]`` int64, ``-1`` = no expert.
            num_max_dispatch_tokens_per_rank: capacity per rank (same on every rank).
            num_experts: total experts, a multiple of the group size.
            cumulative_local_expert_recv_stats: ``[num_local_experts]`` int32, incremented by the
                received counts, or ``None``.
            dispatch_wait_recv_cost_stats: ``[num_ranks, num_ranks]`` int64 (as DeepEP, the time
                waited for source rank ``s`` is added at flat index ``s``), or ``None``.
            use_fp8: cast to FP8 with per-token, per-128-channel scales.
            round_scale: round scales up to powers of two.
            use_ue8m0: pack the (power-of-two) scales as UE8M0 bytes, 4 per int32.
            async_finish: return an event instead of ordering the current stream after the work.
            return_recv_hook: only issue the sends; ``hook()`` completes the receive.

        Returns:
            ``recv_x``: bf16 ``[num_local_experts, num_ranks * M, hidden]``, or with ``use_fp8``
            ``(float8_e4m3fn [same], scales)`` where scales are float32 ``[.., .., hidden // 128]``
            or, with ``use_ue8m0``, int32 ``[.., .., ceil(hidden / 512)]``, column-major in their
            last two dims. Only the first ``recv_count[e]`` rows of expert ``e`` are valid, ordered
            by source rank then source token. ``recv_count [num_local_experts]`` int32, the
            handle, the event and the hook (a no-op without ``return_recv_hook``).

        Masked ranks (shrink mode) are neither sent to nor waited for and count as sources that
        sent nothing. With ``enable_shrink=True``, a peer that does not arrive within
        ``EPCOMM_SHRINK_TIMEOUT_S`` is masked (``PeerMaskedWarning``) and counts the same way.

        Raises:
            PeerTimeoutError: without shrink mode, a peer did not arrive within ``EPCOMM_TIMEOUT_S``
                (in ``hook()`` with ``return_recv_hook``).
        """
        data = check_tensor("x", x)
        check_dtype("x", data, torch.bfloat16)
        check_shape("x", data, [None, None])
        capacity = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        num_tokens, hidden = data.shape
        if num_tokens > capacity:
            raise ValueError(
                f"x has {num_tokens} tokens but num_max_dispatch_tokens_per_rank={capacity}: too many tokens "
                "for the low-latency capacity"
            )
        if hidden % 128 != 0 or hidden == 0:
            raise ValueError(
                f"x.size(1) (hidden) must be a positive multiple of 128 in low-latency mode; got {hidden}"
            )
        validation.check_num_experts("num_experts", num_experts, self.group_size)
        idx, _ = validation.check_topk(topk_idx, None, num_tokens, data.device)
        if idx.size(1) > MAX_LOW_LATENCY_TOPK:
            raise ValueError(
                f"topk_idx has {idx.size(1)} columns; low-latency mode supports num_topk <= {MAX_LOW_LATENCY_TOPK}"
            )
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError(
                f"use_ue8m0=True needs use_fp8=True and round_scale=True; got use_fp8={use_fp8}, round_scale={round_scale}"
            )
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be True")
        num_local_experts = num_experts // self.group_size
        if cumulative_local_expert_recv_stats is not None:
            stats = check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats)
            check_dtype("cumulative_local_expert_recv_stats", stats, torch.int32)
            check_shape("cumulative_local_expert_recv_stats", stats, [num_local_experts])
            check_same_device("cumulative_local_expert_recv_stats", stats, data.device, "x")
        self._check_wait_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)
        self._check_low_latency(capacity, hidden, num_experts)
        if validation.should_check_values(idx, self.settings.check_values):
            validation.check_expert_ids("topk_idx", idx, num_experts)
        request = LowLatencyDispatchRequest(
            data,
            idx,
            capacity,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            return_recv_hook,
        )
        backend = self.backend
        stream = None if return_recv_hook else self._stream_for(data)
        with comm_stream_scope(stream, None, [data, idx]) as scope:
            result = backend.low_latency_dispatch(request)
            event = scope.finish((result.recv_x, result.recv_count), async_finish, False)
        return result.recv_x, result.recv_count, result.handle, event, result.hook or _noop_hook

    def _check_wait_stats(self, name: str, stats: torch.Tensor | None) -> None:
        if stats is None:
            return
        check_tensor(name, stats)
        check_dtype(name, stats, torch.int64)
        if stats.numel() < self.group_size:
            raise ValueError(
                f"{name} must have shape [{self.group_size}, {self.group_size}]; got {list(stats.shape)}"
            )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle | tuple[Any, ...],
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None]]:
        """Bring expert outputs back and reduce them: ``sum_k topk_weights[t, k] * out[expert_k, t]``.

        Arguments:
            x: ``[num_local_experts, num_ranks * M, hidden]`` bf16 expert outputs in the layout
                ``low_latency_dispatch`` delivered.
            topk_idx: ``[num_tokens, num_topk]`` int64, the same as given to the dispatch.
            topk_weights: ``[num_tokens, num_topk]`` float32.
            handle: the dispatch's handle.
            use_logfmt: DeepEP's lossy LogFMT compression; accepted, the data travel as bf16.
            zero_copy: read the expert outputs from ``get_next_low_latency_combine_buffer(handle)``.
            async_finish, return_recv_hook: as in ``low_latency_dispatch``.
            out: optional ``[num_tokens, hidden]`` bf16 result tensor.
            combine_wait_recv_cost_stats: ``[num_ranks, num_ranks]`` int64 or ``None``.

        Returns:
            ``combined_x [num_tokens, hidden]`` bf16, the event and the hook.

        Top-k slots whose expert lives on a masked rank (shrink mode) count as ``-1``. With
        ``enable_shrink=True``, a rank whose expert outputs do not arrive within
        ``EPCOMM_SHRINK_TIMEOUT_S`` is masked (``PeerMaskedWarning``) and its slots count as ``-1``.

        Raises:
            PeerTimeoutError: without shrink mode, a peer did not arrive within ``EPCOMM_TIMEOUT_S``
                (in ``hook()`` with ``return_recv_hook``).
        """
        handle = as_handle(handle, LowLatencyHandle, "low_latency_dispatch")
        num_local_experts = handle.num_experts // self.group_size
        rows = self.group_size * handle.num_max_dispatch_tokens_per_rank
        data = check_tensor("x", x)
        check_dtype("x", data, torch.bfloat16)
        check_shape("x", data, [num_local_experts, rows, handle.hidden])
        idx, weights = validation.check_topk(topk_idx, topk_weights, None, data.device)
        if weights is None:
            raise TypeError("topk_weights must be a torch.Tensor; got None")
        if idx.size(0) > handle.num_max_dispatch_tokens_per_rank:
            raise ValueError(
                f"topk_idx has {idx.size(0)} tokens but the dispatch capacity is {handle.num_max_dispatch_tokens_per_rank}"
            )
        if idx.size(1) != handle.combine_gather_idx.size(2):
            raise ValueError(
                f"topk_idx must have the dispatch's num_topk={handle.combine_gather_idx.size(2)} columns; got {idx.size(1)}"
            )
        if out is not None:
            check_tensor("out", out)
            check_dtype("out", out, torch.bfloat16)
            check_shape("out", out, [idx.size(0), handle.hidden])
            check_same_device("out", out, data.device, "x")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be True")
        self._check_wait_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats)
        self._check_low_latency(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        if use_logfmt:
            log_once(
                "logfmt",
                "low_latency_combine: use_logfmt is accepted but data travel as bf16",
                logging.WARNING,
            )
        request = LowLatencyCombineRequest(
            data, idx, weights, handle, zero_copy, return_recv_hook, out, combine_wait_recv_cost_stats
        )
        backend = self.backend
        stream = None if return_recv_hook else self._stream_for(data)
        with comm_stream_scope(stream, None, [data, idx, weights]) as scope:
            result = backend.low_latency_combine(request)
            event = scope.finish((result.combined_x,), async_finish, False)
        return result.combined_x, event, result.hook or _noop_hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle | tuple[Any, ...]) -> torch.Tensor:
        """The buffer zero-copy combine reads: ``[num_local_experts, num_ranks * M, hidden]`` bf16."""
        handle = as_handle(handle, LowLatencyHandle, "low_latency_dispatch")
        return self.backend.get_next_low_latency_combine_buffer(handle)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Reset the low-latency state; required between normal-mode and low-latency use.

        Collective: it ends in a barrier among the unmasked ranks, bounded like every wait. A peer
        missing there raises ``PeerTimeoutError`` naming ``clean_low_latency_buffer`` and the peer;
        with ``enable_shrink=True`` the peer is masked instead after ``EPCOMM_SHRINK_TIMEOUT_S``
        (with a ``PeerMaskedWarning``) and the call returns.

        Arguments:
            num_max_dispatch_tokens_per_rank: the low-latency capacity per rank (>= 1).
            hidden: the hidden size (>= 1).
            num_experts: total experts, a multiple of the group size.
        """
        check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        check_int("hidden", hidden, 1)
        validation.check_num_experts("num_experts", num_experts, self.group_size)
        self.backend.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # ---- shrink mode --------------------------------------------------------------------------
    def _check_shrink(self) -> None:
        if not self.enable_shrink:
            raise ValueError(
                "shrink-mode calls need Buffer(..., enable_shrink=True); got enable_shrink=False"
            )

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``) or unmask ``rank_to_mask`` on this rank: masked ranks are neither
        sent to nor waited for by this rank's later low-latency calls (dispatch, combine, clean).

        Every rank that goes on should mask the same ranks. Unmasking a rank masked after a
        timeout only helps if that rank is back in step; on the reference backend a rank masked
        after a timeout cannot be reached again over the same group (README, "Shrink mode").

        Arguments:
            rank_to_mask: a rank of the group, ``0 <= rank_to_mask < num_ranks``.
            mask: ``True`` to mask, ``False`` to unmask.
        """
        self._check_shrink()
        check_int("rank_to_mask", rank_to_mask, 0)
        if rank_to_mask >= self.group_size:
            raise ValueError(f"rank_to_mask must be < {self.group_size}; got {rank_to_mask}")
        self.backend.set_rank_mask(rank_to_mask, bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy this rank's mask into ``mask_status``: 1 for every rank masked by
        ``low_latency_update_mask_buffer`` or automatically (a wait for it timed out in shrink
        mode), 0 for the others.

        Arguments:
            mask_status: ``[num_ranks]`` int32, overwritten.
        """
        self._check_shrink()
        check_tensor("mask_status", mask_status)
        check_dtype("mask_status", mask_status, torch.int32)
        check_shape("mask_status", mask_status, [self.group_size])
        mask_status.copy_(self.backend.rank_mask())

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank on this rank (the masks made by hand and those made after timeouts)."""
        self._check_shrink()
        for rank in range(self.group_size):
            self.backend.set_rank_mask(rank, False)
