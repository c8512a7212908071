"""The normal-mode custom ops (``torch.ops.epcomm.*``): dispatch, cached dispatch and combine, each
with a fake implementation (``torch.compile`` traces shapes through it) and an autograd formula.

The public, documented entry points are ``epcomm.autograd.dispatch`` / ``combine``; these ops are
their graph nodes. How the ops carry what is not a tensor:

* the ``Buffer``: its ``op_id`` (an int argument; ``epcomm._registry`` maps it back);
* the handle: the six tensors of a ``TensorHandle`` are op outputs (dispatch) and op inputs
  (cached dispatch, combine); the host integers of ``DispatchHandle`` are a tensor size
  (``num_recv_rows``) or the CPU tensor ``meta`` (``num_max_rows``, ``sequence``);
* the ``Config``: its five ints (an empty list: the default).

The number of received rows is known only after the count exchange: without ``num_worst_tokens``
the fake dispatch returns it as an unbacked symbolic size (``get_ctx().new_dynamic_size()``);
with ``num_worst_tokens`` every shape is static.

Autograd: the backward of dispatch is a combine of the gradients of ``recv_x`` and
``recv_topk_weights`` (the latter zeroed where ``recv_topk_idx`` is ``-1``), the backward of
combine is a cached dispatch of the output gradients, and the backward of cached dispatch is a
combine again, so gradients of any order go through the same three ops.

Payload dtypes: bf16 rows use the Buffer's own calls (bf16 sums in float32, rounded to bf16);
every other combination (float32 or float64 rows, bf16 rows with float32 weights in a cached
dispatch) moves through ``epcomm._exact``, bit for bit, with sums in the rows' own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from epcomm._exact import exact_cached_dispatch, exact_combine, exact_dispatch
from epcomm._registry import lookup_buffer
from epcomm.config import Config
from epcomm.handles import DispatchHandle, TensorHandle
from epcomm.quant import per_token_cast_back, per_token_cast_to_fp8

__all__ = ["cached_dispatch_op", "combine_op", "config_values", "dispatch_op"]

Tensor = torch.Tensor

_DispatchResult = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def config_values(config: Config | None) -> list[int]:
    """A ``Config`` as the ``int[]`` argument of the ops (``[]`` for ``None``: the default)."""
    if config is None:
        return []
    return [
        config.num_sms,
        config.num_max_nvl_chunked_send_tokens,
        config.num_max_nvl_chunked_recv_tokens,
        config.num_max_rdma_chunked_send_tokens,
        config.num_max_rdma_chunked_recv_tokens,
    ]


def _config(values: Sequence[int]) -> Config | None:
    return Config(*values) if values else None


def _count_per_expert(recv_topk_idx: Tensor, num_local_experts: int, alignment: int) -> Tensor:
    """``[num_local_experts]`` int32: rows naming each local expert, rounded up to ``alignment``."""
    experts = torch.arange(num_local_experts, dtype=recv_topk_idx.dtype, device=recv_topk_idx.device)
    hits = (recv_topk_idx.unsqueeze(-1) == experts).any(dim=1).sum(dim=0)
    return ((hits + alignment - 1) // alignment * alignment).to(torch.int32)


# ---- dispatch ----------------------------------------------------------------------------------


@torch.library.custom_op("epcomm::dispatch", mutates_args=())
def dispatch_op(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    buffer_id: int,
    num_experts: int,
    use_fp8: bool,
    expert_alignment: int,
    num_worst_tokens: int,
    config: list[int],
) -> _DispatchResult:
    """Layout and dispatch in one op; see ``epcomm.autograd.dispatch``.

    Returns:
        ``recv_x``, ``recv_topk_idx``, ``recv_topk_weights``, ``num_recv_tokens_per_expert
        [num_local_experts]`` int32, then the six ``TensorHandle`` tensors.
    """
    buffer = lookup_buffer(buffer_id)
    cfg = _config(config)
    if x.dtype == torch.bfloat16:
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            per_token_cast_to_fp8(x) if use_fp8 else x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            config=cfg,
        )
        recv_x = per_token_cast_back(*recv) if isinstance(recv, tuple) else recv
    else:
        (recv_x, recv_w), recv_idx, counts, handle = exact_dispatch(
            buffer, [x, topk_weights], topk_idx, num_experts, expert_alignment, num_worst_tokens, cfg
        )
        assert recv_idx is not None
        recv_w = torch.where(recv_idx >= 0, recv_w, torch.zeros_like(recv_w))  # as Buffer.dispatch
    assert recv_idx is not None
    assert recv_w is not None
    assert handle is not None
    assert counts is not None
    num_local_experts = num_experts // buffer.group_size
    if counts:
        per_expert_recv = torch.tensor(counts, dtype=torch.int32, device=x.device)
    else:
        per_expert_recv = _count_per_expert(recv_idx, num_local_experts, expert_alignment)
    if not isinstance(handle, DispatchHandle):
        raise NotImplementedError(
            "epcomm.autograd: multi-node mode (an InternodeHandle) is not supported yet"
        )
    return (recv_x, recv_idx, recv_w, per_expert_recv, *TensorHandle.of(handle))


@dispatch_op.register_fake
def _dispatch_fake(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    buffer_id: int,
    num_experts: int,
    use_fp8: bool,
    expert_alignment: int,
    num_worst_tokens: int,
    config: list[int],
) -> _DispatchResult:
    num_ranks = lookup_buffer(buffer_id).group_size
    rows = num_worst_tokens if num_worst_tokens > 0 else torch.library.get_ctx().new_dynamic_size()
    num_tokens, hidden = x.shape
    num_topk = topk_idx.size(1)
    device = x.device
    return (
        x.new_empty(rows, hidden),
        topk_idx.new_empty(rows, num_topk),
        topk_weights.new_empty(rows, num_topk),
        torch.empty(num_experts // num_ranks, dtype=torch.int32, device=device),
        torch.empty(num_ranks, num_ranks, dtype=torch.int32, device=device),
        torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device),
        torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=device),
        torch.empty(rows, dtype=torch.int32, device=device),
        torch.empty(1, dtype=torch.int32, device=device),
        torch.empty(2, dtype=torch.int64, device="cpu"),
    )


def _dispatch_setup(ctx: Any, inputs: tuple[object, ...], output: _DispatchResult) -> None:
    x, _, topk_weights, buffer_id, *_, config = inputs
    assert isinstance(x, Tensor)
    assert isinstance(topk_weights, Tensor)
    ctx.buffer_id = buffer_id
    ctx.config = config
    ctx.dtypes = (x.dtype, topk_weights.dtype)
    ctx.hidden = x.size(1)
    # recv_topk_idx (to mask the weights' gradient) and the handle; not the received rows.
    ctx.save_for_backward(output[1], *output[4:])


def _dispatch_backward(
    ctx: Any,
    grad_recv_x: Tensor | None,
    _: object,
    grad_recv_w: Tensor | None,
    *rest: object,
) -> tuple[object, ...]:
    recv_idx, *handle = ctx.saved_tensors
    x_dtype, w_dtype = ctx.dtypes
    num_rows, device = recv_idx.size(0), recv_idx.device
    if grad_recv_x is None:
        grad_recv_x = torch.zeros(num_rows, ctx.hidden, dtype=x_dtype, device=device)
    grad_w = torch.zeros(recv_idx.shape, dtype=w_dtype, device=device) if grad_recv_w is None else grad_recv_w
    # recv_topk_weights is 0.0 (a constant) wherever the received top-k id is -1.
    grad_w = torch.where(recv_idx >= 0, grad_w, torch.zeros_like(grad_w))
    grads = combine_op(
        [grad_recv_x.to(x_dtype), grad_w.to(w_dtype)],
        *handle,
        ctx.buffer_id,
        ctx.config,
    )
    return grads[0], None, grads[1], None, None, None, None, None, None


dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


# ---- combine -----------------------------------------------------------------------------------


def _native_combine(xs: Sequence[Tensor]) -> bool:
    """Whether ``Buffer.combine`` sums these rows: bf16 ``x``, optionally float32 weights."""
    return xs[0].dtype == torch.bfloat16 and (len(xs) == 1 or (len(xs) == 2 and xs[1].dtype == torch.float32))


@torch.library.custom_op("epcomm::combine", mutates_args=())
def combine_op(
    xs: list[Tensor],
    rank_prefix_matrix: Tensor,
    is_token_in_rank: Tensor,
    recv_row_of_token: Tensor,
    recv_src_idx: Tensor,
    num_recv_tokens: Tensor,
    meta: Tensor,
    buffer_id: int,
    config: list[int],
) -> list[Tensor]:
    """Sum each of ``xs`` (``[num_recv_rows, *]``) back onto the tokens: ``[num_tokens, *]`` each,
    same dtypes. bf16 ``x`` (with float32 weights) through ``Buffer.combine``, others exactly."""
    buffer = lookup_buffer(buffer_id)
    handle = TensorHandle(
        rank_prefix_matrix, is_token_in_rank, recv_row_of_token, recv_src_idx, num_recv_tokens, meta
    ).dispatch_handle()
    cfg = _config(config)
    if _native_combine(xs):
        combined, combined_w, _ = buffer.combine(
            xs[0], handle, topk_weights=xs[1] if len(xs) == 2 else None, config=cfg
        )
        return [combined] if combined_w is None else [combined, combined_w]
    return exact_combine(buffer, handle, xs, cfg)


@combine_op.register_fake
def _combine_fake(
    xs: list[Tensor],
    rank_prefix_matrix: Tensor,
    is_token_in_rank: Tensor,
    recv_row_of_token: Tensor,
    recv_src_idx: Tensor,
    num_recv_tokens: Tensor,
    meta: Tensor,
    buffer_id: int,
    config: list[int],
) -> list[Tensor]:
    return [x.new_empty(is_token_in_rank.size(0), x.size(1)) for x in xs]


def _handle_setup(ctx: Any, inputs: tuple[object, ...], output: object) -> None:
    xs, *handle, buffer_id, config = inputs
    assert isinstance(xs, list)
    ctx.buffer_id = buffer_id
    ctx.config = config
    ctx.shapes = [(x.shape, x.dtype, x.device) for x in xs]
    ctx.save_for_backward(*(t for t in handle if isinstance(t, Tensor)))


def _config_grad(config: list[int]) -> list[None] | None:
    """The "gradient" of the ``config`` argument of an op that takes a tensor list: torch's
    structure check reads an empty list as a list of tensors (so ``[]``) and any other as one
    value (so ``None``)."""
    return [] if not config else None


def _filled(ctx: Any, grads: Sequence[Tensor | None], num_rows: int) -> list[Tensor]:
    """The output gradients (``num_rows`` rows each) in the inputs' dtypes, zeros where autograd
    passes none."""
    filled = []
    for grad, (shape, dtype, device) in zip(grads, ctx.shapes):
        filled.append(
            torch.zeros(num_rows, shape[1], dtype=dtype, device=device) if grad is None else grad.to(dtype)
        )
    return filled


def _combine_backward(ctx: Any, grads: list[Tensor | None]) -> tuple[object, ...]:
    handle = ctx.saved_tensors
    filled = _filled(ctx, grads, handle[1].size(0))  # is_token_in_rank: [num_tokens, num_ranks]
    recv = cached_dispatch_op(filled, *handle, ctx.buffer_id, ctx.config)
    return (recv, *([None] * (len(handle) + 1)), _config_grad(ctx.config))


combine_op.register_autograd(_combine_backward, setup_context=_handle_setup)


# ---- cached dispatch ---------------------------------------------------------------------------


@torch.library.custom_op("epcomm::cached_dispatch", mutates_args=())
def cached_dispatch_op(
    xs: list[Tensor],
    rank_prefix_matrix: Tensor,
    is_token_in_rank: Tensor,
    recv_row_of_token: Tensor,
    recv_src_idx: Tensor,
    num_recv_tokens: Tensor,
    meta: Tensor,
    buffer_id: int,
    config: list[int],
) -> list[Tensor]:
    """Send each of ``xs`` (``[num_tokens, *]``) along the handle's routing: ``[num_recv_rows, *]``
    each, same dtypes. A lone bf16 ``x`` through ``Buffer.dispatch(x, handle=...)``, others
    exactly (bytes)."""
    buffer = lookup_buffer(buffer_id)
    handle = TensorHandle(
        rank_prefix_matrix, is_token_in_rank, recv_row_of_token, recv_src_idx, num_recv_tokens, meta
    ).dispatch_handle()
    cfg = _config(config)
    if len(xs) == 1 and xs[0].dtype == torch.bfloat16:
        recv, *_ = buffer.dispatch(xs[0], handle=handle, config=cfg)
        assert isinstance(recv, Tensor)
        return [recv]
    return exact_cached_dispatch(buffer, handle, xs, cfg)


@cached_dispatch_op.register_fake
def _cached_dispatch_fake(
    xs: list[Tensor],
    rank_prefix_matrix: Tensor,
    is_token_in_rank: Tensor,
    recv_row_of_token: Tensor,
    recv_src_idx: Tensor,
    num_recv_tokens: Tensor,
    meta: Tensor,
    buffer_id: int,
    config: list[int],
) -> list[Tensor]:
    return [x.new_empty(recv_src_idx.size(0), x.size(1)) for x in xs]


def _cached_dispatch_backward(ctx: Any, grads: list[Tensor | None]) -> tuple[object, ...]:
    handle = ctx.saved_tensors
    filled = _filled(ctx, grads, handle[3].size(0))  # recv_src_idx: [num_recv_rows]
    sums = combine_op(filled, *handle, ctx.buffer_id, ctx.config)
    return (sums, *([None] * (len(handle) + 1)), _config_grad(ctx.config))


cached_dispatch_op.register_autograd(_cached_dispatch_backward, setup_context=_handle_setup)
