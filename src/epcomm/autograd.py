"""Differentiable normal-mode dispatch and combine, for training (and ``torch.compile``).

``Buffer.dispatch`` / ``Buffer.combine`` are DeepEP's calls: their results carry no ``grad_fn``.
The two functions here are the same communication as ``torch.library`` custom ops
(``torch.ops.epcomm.dispatch``, ``combine``, ``cached_dispatch``) with autograd formulas and fake
implementations, so a model built on them trains with ``loss.backward()`` and compiles without
graph breaks at the epcomm calls::

    from epcomm import Buffer, autograd as ep

    out = ep.dispatch(buffer, x, topk_idx, topk_weights, num_experts)
    y = run_experts(out.recv_x, out.recv_topk_idx, out.recv_topk_weights)  # weights applied here
    combined = ep.combine(buffer, y, out.handle).combined_x  # [num_tokens, hidden], has a grad_fn

Gradients: the backward of ``dispatch`` combines the gradients of ``recv_x`` and
``recv_topk_weights`` (the latter zeroed where ``recv_topk_idx`` is ``-1``: those weights are the
constant 0.0) through the same handle, giving the gradients of ``x`` and ``topk_weights``; the
backward of ``combine`` is a cached dispatch of the output gradient with the handle (and of the
gradient of the combined weights). Every rank must run the same epcomm calls in the same order,
backward included (true when every rank runs the same model); a mismatch raises
``epcomm.InconsistentCallError``.

Payloads: ``x`` bf16 (the Buffer's own calls; combine sums in float32 and rounds to bf16), bf16
sent as FP8 (``use_fp8=True``), or float32 / float64 (moved bit for bit, summed in that dtype:
exact, for float32 training and float64 gradient checks; about twice the bytes of bf16 and one
more count exchange per combine). Every wait is bounded by ``EPCOMM_TIMEOUT_S`` as in the Buffer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from epcomm import _normal_ops
from epcomm.buffer import Buffer
from epcomm.config import Config
from epcomm.event import EventHandle, EventOverlap
from epcomm.handles import DispatchHandle, TensorHandle, as_handle
from epcomm.validation import check_dtype, check_shape, check_tensor

__all__ = ["CombineOutput", "DispatchOutput", "TensorHandle", "combine", "dispatch"]

_PAYLOAD_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


class DispatchOutput(NamedTuple):
    """What ``dispatch`` returns (``num_recv_rows``: received rows, ``num_worst_tokens`` if given).

    Fields:
        recv_x: ``[num_recv_rows, hidden]``, ``x``'s dtype (bf16 with ``use_fp8``: the dequantized
            rows); rows ordered by source rank, then source token. Differentiable.
        recv_topk_idx: ``[num_recv_rows, num_topk]`` int64, expert ids local to this rank, ``-1``
            elsewhere (and in padding rows).
        recv_topk_weights: ``[num_recv_rows, num_topk]``, ``topk_weights``' dtype, ``0`` where
            ``recv_topk_idx`` is ``-1``. Differentiable.
        num_recv_tokens_per_expert: ``[num_local_experts]`` int32, rows naming each local expert,
            rounded up to ``expert_alignment`` (a tensor, not DeepEP's list: its values are data).
        handle: the ``TensorHandle`` to pass to ``combine``.
        event: an ``EventOverlap``; with ``async_finish=True`` one that can be waited on.
    """

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor
    handle: TensorHandle
    event: EventOverlap


class CombineOutput(NamedTuple):
    """What ``combine`` returns.

    Fields:
        combined_x: ``[num_tokens, hidden]``, ``x``'s dtype. Differentiable.
        combined_topk_weights: ``[num_tokens, num_topk]``, ``topk_weights``' dtype, or ``None``.
        event: an ``EventOverlap``; with ``async_finish=True`` one that can be waited on.
    """

    combined_x: torch.Tensor
    combined_topk_weights: torch.Tensor | None
    event: EventOverlap


def _check_buffer(buffer: Any) -> Buffer:
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer must be an epcomm.Buffer; got {type(buffer).__name__}")
    return buffer


def _wait_previous(previous_event: Any) -> None:
    """The autograd path orders its work on the current stream: it makes the current stream wait
    for ``previous_event`` (read as DeepEP does, ``getattr(previous_event, "event", None)``)."""
    handle: EventHandle | None = getattr(previous_event, "event", None)
    if handle is not None:
        handle.current_stream_wait()


def _event(async_finish: bool) -> EventOverlap:
    """``async_finish``: an event recorded on the current stream after the call (done as soon as
    the stream reaches it); otherwise none, as the Buffer returns."""
    return EventOverlap(EventHandle()) if async_finish else EventOverlap(None)


def _check_weights(name: str, weights: torch.Tensor, x_dtype: torch.dtype) -> None:
    allowed = (torch.float32, torch.float64) if x_dtype == torch.float64 else (torch.float32,)
    check_dtype(f"{name} (with x of dtype {x_dtype})", weights, allowed)


def dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    *,
    use_fp8: bool = False,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    config: Config | None = None,
    previous_event: EventOverlap | None = None,
    async_finish: bool = False,
) -> DispatchOutput:
    """Differentiable normal-mode dispatch: ``get_dispatch_layout`` and ``Buffer.dispatch`` in one op.

    Arguments:
        buffer: the ``Buffer`` of the expert-parallel group (normal mode).
        x: ``[num_tokens, hidden]`` bf16, float32 or float64; differentiable.
        topk_idx: ``[num_tokens, num_topk]`` int64 global expert ids, ``-1`` = none.
        topk_weights: ``[num_tokens, num_topk]`` float32 (float32 or float64 with a float64 ``x``);
            differentiable.
        num_experts: experts in total, a multiple of the group size.
        use_fp8: send bf16 ``x`` as FP8 (e4m3, one float32 scale per token and 128 channels,
            ``epcomm.quant.per_token_cast_to_fp8``; ``hidden`` a multiple of 128). ``recv_x`` is the
            dequantized bf16; the backward treats the quantization as the identity
            (straight-through): the gradient of ``x`` is the bf16 combine of the gradient of
            ``recv_x``, i.e. the gradient with respect to the dequantized ``x``.
        expert_alignment: round ``num_recv_tokens_per_expert`` up to this.
        num_worst_tokens: ``> 0``: receive exactly this many rows (static shapes under
            ``torch.compile``); padding rows have ``recv_topk_idx == -1`` and zero data.
        config: ``Config`` for the dispatch, its backward and the combine that follows it
            (default: the Buffer's presets).
        previous_event: the current stream waits for it before the op (no overlap: the op runs
            in stream order).
        async_finish: also return an event recorded after the op on the current stream, so code
            written for DeepEP's overlap (``event.current_stream_wait()``) runs unchanged; the
            op itself is ordered on the current stream, forward and backward.

    Returns:
        ``DispatchOutput(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert,
        handle, event)``.
    """
    _check_buffer(buffer)
    data = check_tensor("x", x)
    check_dtype("x", data, _PAYLOAD_DTYPES)
    check_shape("x", data, [None, None])
    weights = check_tensor("topk_weights", topk_weights)
    _check_weights("topk_weights", weights, data.dtype)
    if use_fp8 and data.dtype != torch.bfloat16:
        raise TypeError(f"use_fp8=True needs x of dtype torch.bfloat16; got {data.dtype}")
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an epcomm.Config or None; got {type(config).__name__}")
    _wait_previous(previous_event)
    outputs = _normal_ops.dispatch_op(
        data,
        topk_idx,
        weights,
        buffer.op_id,
        num_experts,
        use_fp8,
        expert_alignment,
        num_worst_tokens,
        _normal_ops.config_values(config),
    )
    return DispatchOutput(
        outputs[0], outputs[1], outputs[2], outputs[3], TensorHandle(*outputs[4:]), _event(async_finish)
    )


def combine(
    buffer: Buffer,
    x: torch.Tensor,
    handle: TensorHandle | DispatchHandle,
    topk_weights: torch.Tensor | None = None,
    *,
    config: Config | None = None,
    previous_event: EventOverlap | None = None,
    async_finish: bool = False,
) -> CombineOutput:
    """Differentiable normal-mode combine: sums each received row back onto its token (unweighted;
    apply the top-k weights to the expert outputs before).

    Arguments:
        buffer: the ``Buffer`` the dispatch ran on.
        x: ``[num_recv_rows, hidden]`` bf16, float32 or float64 expert outputs, in the dispatch's
            row order; differentiable. Padding rows (``num_worst_tokens``) are ignored.
        handle: the ``TensorHandle`` of ``dispatch`` (a ``DispatchHandle`` of ``Buffer.dispatch``
            is accepted too).
        topk_weights: ``[num_recv_rows, num_topk]`` summed the same way, or ``None``; float32
            (float32 or float64 with a float64 ``x``); differentiable.
        config, previous_event, async_finish: as in ``dispatch``.

    Returns:
        ``CombineOutput(combined_x [num_tokens, hidden] in x's dtype, combined_topk_weights
        [num_tokens, num_topk] or None, event)``.
    """
    _check_buffer(buffer)
    data = check_tensor("x", x)
    check_dtype("x", data, _PAYLOAD_DTYPES)
    check_shape("x", data, [None, None])
    if not isinstance(handle, TensorHandle):
        handle = TensorHandle.of(as_handle(handle, DispatchHandle, "epcomm.autograd.dispatch"))
    xs = [data]
    if topk_weights is not None:
        weights = check_tensor("topk_weights", topk_weights)
        _check_weights("topk_weights", weights, data.dtype)
        xs.append(weights)
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an epcomm.Config or None; got {type(config).__name__}")
    _wait_previous(previous_event)
    sums = _normal_ops.combine_op(xs, *handle, buffer.op_id, _normal_ops.config_values(config))
    return CombineOutput(sums[0], sums[1] if len(sums) > 1 else None, _event(async_finish))
