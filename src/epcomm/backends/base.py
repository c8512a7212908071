"""The mode interface every transport implements, with the validated requests it receives.

The facade (``epcomm.buffer``) validates arguments, picks a backend and runs it on the right
stream; a backend only moves data. Requests carry already-checked tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

import torch

from epcomm.config import Config
from epcomm.fingerprint import CallFingerprint
from epcomm.handles import LowLatencyHandle, NormalHandle
from epcomm.layout import DispatchLayout

__all__ = [
    "Backend",
    "CombineRequest",
    "CombineResult",
    "DispatchRequest",
    "DispatchResult",
    "LowLatencyCombineRequest",
    "LowLatencyCombineResult",
    "LowLatencyDelegation",
    "LowLatencyDispatchRequest",
    "LowLatencyDispatchResult",
    "LowLatencyEngine",
    "RecvHook",
    "ResultBuffers",
    "finish_receive",
]

RecvHook = Callable[[], None]


@dataclass(frozen=True)
class DispatchRequest:
    """A checked normal-mode dispatch (fresh layout when ``handle`` is ``None``, else cached).

    Fields:
        x: ``[num_tokens, hidden]`` bf16 or float8_e4m3fn.
        x_scales: ``[num_tokens, num_scales]`` float32 or int32 (packed UE8M0), any strides, or
            ``None`` for bf16.
        topk_idx: ``[num_tokens, num_topk]`` int64 or ``None``.
        topk_weights: ``[num_tokens, num_topk]`` float32 or ``None``.
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
        num_tokens_per_expert: ``[num_experts]`` int32 (``None`` in cached mode).
        handle: the layout of an earlier dispatch (cached mode) or ``None``: a ``DispatchHandle``,
            or in multi-node mode an ``InternodeHandle``.
        expert_alignment: per-expert counts are rounded up to this.
        num_worst_tokens: ``> 0``: receive exactly this many rows, no CPU synchronization.
        config: performance knobs.
        fingerprint: what every rank must agree on (sequence 0: the backend numbers the call
            with its ``CallNumbers`` when it starts communicating).
        num_tokens_per_rdma_rank: ``[num_nodes]`` int32 in multi-node mode (fresh layout), else
            ``None``.
    """

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor | None
    topk_weights: torch.Tensor | None
    is_token_in_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor | None
    handle: NormalHandle | None
    expert_alignment: int
    num_worst_tokens: int
    config: Config
    fingerprint: CallFingerprint
    num_tokens_per_rdma_rank: torch.Tensor | None = None


class DispatchResult(NamedTuple):
    """What a backend's dispatch returns (``recv_x_scales`` is ``None`` for bf16)."""

    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    num_recv_tokens_per_expert_list: list[int]
    handle: NormalHandle


@dataclass(frozen=True)
class CombineRequest:
    """A checked normal-mode combine.

    Fields:
        x: ``[num_recv_rows, hidden]`` bf16, the rows dispatch delivered (after the experts).
        handle: the dispatch's handle (``InternodeHandle`` in multi-node mode).
        topk_weights: ``[num_recv_rows, num_topk]`` float32 or ``None``.
        bias: 0, 1 or 2 tensors ``[num_tokens, hidden]`` bf16 added to the result.
        config: performance knobs.
        fingerprint: what every rank must agree on (numbered by the backend, as in dispatch).
    """

    x: torch.Tensor
    handle: NormalHandle
    topk_weights: torch.Tensor | None
    bias: tuple[torch.Tensor, ...]
    config: Config
    fingerprint: CallFingerprint


class CombineResult(NamedTuple):
    """``combined_x [num_tokens, hidden]`` bf16 and the summed weights (or ``None``)."""

    combined_x: torch.Tensor
    combined_topk_weights: torch.Tensor | None


@dataclass(frozen=True)
class LowLatencyDispatchRequest:
    """A checked low-latency dispatch (see ``Buffer.low_latency_dispatch``)."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    cumulative_local_expert_recv_stats: torch.Tensor | None
    dispatch_wait_recv_cost_stats: torch.Tensor | None
    use_fp8: bool
    round_scale: bool
    use_ue8m0: bool
    return_recv_hook: bool


class LowLatencyDispatchResult(NamedTuple):
    """``recv_x`` (a tensor, or ``(x_fp8, scales)``), ``recv_count``, handle, receive hook."""

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    recv_count: torch.Tensor
    handle: LowLatencyHandle
    hook: RecvHook | None


@dataclass(frozen=True)
class LowLatencyCombineRequest:
    """A checked low-latency combine (see ``Buffer.low_latency_combine``)."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    handle: LowLatencyHandle
    zero_copy: bool
    return_recv_hook: bool
    out: torch.Tensor | None
    combine_wait_recv_cost_stats: torch.Tensor | None


class LowLatencyCombineResult(NamedTuple):
    """``combined_x [num_tokens, hidden]`` bf16 and the receive hook (or ``None``)."""

    combined_x: torch.Tensor
    hook: RecvHook | None


class Backend(Protocol):
    """A transport: moves the data of every mode for one ``Buffer``."""

    name: str

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """Routing counts for ``topk_idx [num_tokens, num_topk]``."""
        ...

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Normal-mode dispatch, fresh or cached (``request.handle``)."""
        ...

    def combine(self, request: CombineRequest) -> CombineResult:
        """Normal-mode combine."""
        ...

    def low_latency_dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """Low-latency dispatch into the expert-major fixed-capacity layout."""
        ...

    def low_latency_combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """Low-latency weighted combine back onto each token's rank."""
        ...

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The ``[num_local_experts, num_ranks * M, hidden]`` bf16 buffer zero-copy combine reads."""
        ...

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Reset low-latency state after normal-mode use of the same memory, then a barrier among
        the unmasked ranks bounded like every wait (DeepEP's clean ends in one).

        A peer missing at the barrier raises ``PeerTimeoutError`` naming
        ``clean_low_latency_buffer`` and the peer; in shrink mode it is masked instead, after the
        shrink timeout (``Settings.shrink_timeout_s``), with a ``PeerMaskedWarning`` (as for every
        mask a backend makes by itself: the backend warns, once per masking, when the wait expires
        or, if it waits on the device, when the host next looks).
        """
        ...

    def set_rank_mask(self, rank: int, masked: bool) -> None:
        """Shrink mode: mark ``rank`` as masked (skipped) or unmasked."""
        ...

    def rank_mask(self) -> torch.Tensor:
        """Shrink mode: ``[num_ranks]`` int32, 1 where a rank is masked: by ``set_rank_mask`` or by
        the backend itself when a wait for the rank timed out."""
        ...

    def destroy(self) -> None:
        """Release every resource."""
        ...


# ---- shared by the low-latency engines (reference and NVLink) ------------------------------------

_Result = TypeVar("_Result", LowLatencyDispatchResult, LowLatencyCombineResult)


def finish_receive(result: _Result, receive: RecvHook, return_recv_hook: bool) -> _Result:
    """Hand ``receive`` back as the hook, or run it now when no hook was asked for."""
    if return_recv_hook:
        return result._replace(hook=receive)
    receive()
    return result


class ResultBuffers:
    """Tensors reused across calls, one set per parity: the two alternating result buffers."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[object, ...], torch.Tensor] = {}

    def get(
        self, parity: int, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The zero-initialized ``shape``/``dtype`` tensor ``name`` of ``parity`` (made on first use)."""
        key = (parity, name, shape, dtype, device)
        if key not in self._tensors:
            storage_dtype = torch.uint8 if dtype.itemsize == 1 else dtype  # float8 has no zero fill
            self._tensors[key] = torch.zeros(shape, dtype=storage_dtype, device=device).view(dtype)
        return self._tensors[key]

    def clear(self) -> None:
        """Forget every tensor."""
        self._tensors.clear()


class LowLatencyEngine(Protocol):
    """What a backend's low-latency implementation offers (see ``LowLatencyDelegation``)."""

    @property
    def mask(self) -> torch.Tensor:
        """Shrink mode: ``[num_ranks]`` int32, 1 where a rank is masked (CPU or the device)."""
        ...

    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """Low-latency dispatch."""
        ...

    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """Low-latency combine."""
        ...

    def combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The zero-copy combine buffer of ``handle``'s parity."""
        ...

    def set_mask(self, rank: int, masked: bool) -> None:
        """Shrink mode: mask or unmask ``rank``."""
        ...

    def clean(self) -> None:
        """Forget the result buffers."""
        ...


class LowLatencyDelegation:
    """Backend mixin: the low-latency and shrink-mode methods of ``Backend``, forwarded to the
    engine ``_low_latency_engine()`` returns (``None`` when the buffer has no low-latency mode)."""

    def _low_latency_engine(self) -> LowLatencyEngine | None:
        raise NotImplementedError

    def _engine(self) -> LowLatencyEngine:
        engine = self._low_latency_engine()
        if engine is None:
            raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")
        return engine

    def low_latency_dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """See ``Buffer.low_latency_dispatch``."""
        return self._engine().dispatch(request)

    def low_latency_combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """See ``Buffer.low_latency_combine``."""
        return self._engine().combine(request)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """See ``Buffer.get_next_low_latency_combine_buffer``."""
        return self._engine().combine_buffer(handle)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Drop the low-latency result buffers (flags need no cleaning: they carry sequence numbers).

        ``Backend.clean_low_latency_buffer`` also asks for a barrier among the unmasked ranks: the
        engine's ``clean`` runs it (NVLink), or the backend overrides this method (reference, whose
        ``destroy`` also calls ``clean``).
        """
        engine = self._low_latency_engine()
        if engine is not None:
            engine.clean()

    def set_rank_mask(self, rank: int, masked: bool) -> None:
        """Shrink mode: ``rank`` is skipped (no send, no wait) while masked."""
        self._engine().set_mask(rank, masked)

    def rank_mask(self) -> torch.Tensor:
        """``[num_ranks]`` int32, 1 where a rank is masked."""
        return self._engine().mask
