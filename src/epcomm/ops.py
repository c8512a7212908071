"""Low-latency (decode) dispatch and combine as ``torch.library`` custom ops, for ``torch.compile``.

``torch.ops.epcomm.low_latency_dispatch`` / ``low_latency_combine`` wrap the ``Buffer``'s calls of
the same names; every shape is static (fixed capacity, expert-major), so a compiled decode step
has no graph break at them and, on GPUs, can be captured in a CUDA graph like the eager calls.
The normal-mode ops (differentiable, for training and prefill) are in ``epcomm.autograd``.

How the ops carry what is not a tensor: the ``Buffer`` by its ``op_id``; the handle as the three
tensors of ``LowLatencyHandle`` plus ``meta``, a ``[1]`` int64 CPU tensor holding the buffer
parity (which of the two result buffers the dispatch used); the capacity, ``hidden`` and
``num_experts`` follow from the tensors' shapes.

Differences from the ``Buffer`` calls: no gradient (decode); no ``async_finish`` or
``return_recv_hook`` (the op is ordered on the current stream); ``recv_x`` is copied out of the
buffer's receive area (a compiled graph owns its ops' outputs and may reuse their memory), so it
stays valid past the next two calls, and the FP8 scales are returned contiguous (row-major).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from epcomm._registry import lookup_buffer
from epcomm.buffer import Buffer
from epcomm.handles import LowLatencyHandle
from epcomm.quant import num_packed_ue8m0, num_scales

__all__ = [
    "LowLatencyDispatchOutput",
    "LowLatencyTensorHandle",
    "low_latency_combine",
    "low_latency_dispatch",
]

Tensor = torch.Tensor
_DispatchResult = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


class LowLatencyTensorHandle(NamedTuple):
    """A ``LowLatencyHandle`` as tensors (the handle ``low_latency_dispatch`` here returns).

    Fields:
        recv_src_info: ``[num_local_experts, num_ranks * M]`` int32.
        recv_layout_range: ``[num_local_experts, num_ranks]`` int64.
        combine_gather_idx: ``[num_ranks, M, num_topk]`` int64.
        meta: ``[1]`` int64 on the CPU: the buffer parity.
    """

    recv_src_info: Tensor
    recv_layout_range: Tensor
    combine_gather_idx: Tensor
    meta: Tensor


class LowLatencyDispatchOutput(NamedTuple):
    """What ``low_latency_dispatch`` returns (``M``: ``num_max_dispatch_tokens_per_rank``).

    Fields:
        recv_x: ``[num_local_experts, num_ranks * M, hidden]`` bf16, or with ``use_fp8`` a tuple
            ``(float8_e4m3fn [same], scales)``, scales float32 ``[.., .., hidden // 128]`` or
            (``use_ue8m0``) int32 ``[.., .., ceil(hidden / 512)]``, contiguous.
        recv_count: ``[num_local_experts]`` int32, valid rows per local expert.
        handle: the ``LowLatencyTensorHandle`` to pass to ``low_latency_combine``.
    """

    recv_x: Tensor | tuple[Tensor, Tensor]
    recv_count: Tensor
    handle: LowLatencyTensorHandle


def _scale_columns(hidden: int, use_fp8: bool, use_ue8m0: bool) -> tuple[int, torch.dtype]:
    if not use_fp8:
        return 0, torch.float32
    if use_ue8m0:
        return num_packed_ue8m0(hidden), torch.int32
    return num_scales(hidden), torch.float32


@torch.library.custom_op("epcomm::low_latency_dispatch", mutates_args=())
def low_latency_dispatch_op(
    x: Tensor,
    topk_idx: Tensor,
    buffer_id: int,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
) -> _DispatchResult:
    """``Buffer.low_latency_dispatch``; returns ``recv_x`` data, scales (``[.., .., 0]`` without
    FP8), ``recv_count`` and the four ``LowLatencyTensorHandle`` tensors."""
    buffer = lookup_buffer(buffer_id)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        use_fp8=use_fp8,
        round_scale=round_scale,
        use_ue8m0=use_ue8m0,
    )
    if isinstance(recv_x, tuple):
        data, scales = recv_x
        scales = scales.clone(memory_format=torch.contiguous_format)
    else:
        data = recv_x
        scales = torch.empty(*data.shape[:2], 0, dtype=torch.float32, device=data.device)
    return (
        data.clone(memory_format=torch.contiguous_format),
        scales,
        recv_count.clone(),
        handle.recv_src_info.to(torch.int32),
        handle.recv_layout_range.to(torch.int64),
        handle.combine_gather_idx.to(torch.int64),
        torch.tensor([handle.buffer_parity], dtype=torch.int64, device="cpu"),
    )


@low_latency_dispatch_op.register_fake
def _low_latency_dispatch_fake(
    x: Tensor,
    topk_idx: Tensor,
    buffer_id: int,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
) -> _DispatchResult:
    num_ranks = lookup_buffer(buffer_id).group_size
    num_local_experts = num_experts // num_ranks
    capacity = num_max_dispatch_tokens_per_rank
    num_rows = num_ranks * capacity
    hidden, device = x.size(1), x.device
    scale_columns, scale_dtype = _scale_columns(hidden, use_fp8, use_ue8m0)
    return (
        torch.empty(
            num_local_experts,
            num_rows,
            hidden,
            dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
            device=device,
        ),
        torch.empty(num_local_experts, num_rows, scale_columns, dtype=scale_dtype, device=device),
        torch.empty(num_local_experts, dtype=torch.int32, device=device),
        torch.empty(num_local_experts, num_rows, dtype=torch.int32, device=device),
        torch.empty(num_local_experts, num_ranks, dtype=torch.int64, device=device),
        torch.empty(num_ranks, capacity, topk_idx.size(1), dtype=torch.int64, device=device),
        torch.empty(1, dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("epcomm::low_latency_combine", mutates_args=())
def low_latency_combine_op(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    recv_src_info: Tensor,
    recv_layout_range: Tensor,
    combine_gather_idx: Tensor,
    meta: Tensor,
    buffer_id: int,
) -> Tensor:
    """``Buffer.low_latency_combine``: ``[num_tokens, hidden]`` bf16."""
    buffer = lookup_buffer(buffer_id)
    num_ranks, capacity = combine_gather_idx.size(0), combine_gather_idx.size(1)
    handle = LowLatencyHandle(
        recv_src_info,
        recv_layout_range,
        capacity,
        x.size(2),
        x.size(0) * num_ranks,
        combine_gather_idx,
        int(meta.tolist()[0]),
    )
    combined, _, _ = buffer.low_latency_combine(x, topk_idx, topk_weights, handle)
    return combined


@low_latency_combine_op.register_fake
def _low_latency_combine_fake(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    recv_src_info: Tensor,
    recv_layout_range: Tensor,
    combine_gather_idx: Tensor,
    meta: Tensor,
    buffer_id: int,
) -> Tensor:
    return x.new_empty(topk_idx.size(0), x.size(2), dtype=torch.bfloat16)


def low_latency_dispatch(
    buffer: Buffer,
    x: Tensor,
    topk_idx: Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    *,
    use_fp8: bool = True,
    round_scale: bool = False,
    use_ue8m0: bool = False,
) -> LowLatencyDispatchOutput:
    """``Buffer.low_latency_dispatch`` as a custom op (static shapes, no graph break).

    Arguments:
        buffer: a ``Buffer`` with ``low_latency_mode=True``.
        x: ``[num_tokens, hidden]`` bf16, ``num_tokens <= num_max_dispatch_tokens_per_rank``,
            ``hidden`` a multiple of 128.
        topk_idx: ``[num_tokens, num_topk]`` int64, ``-1`` = none.
        num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0: as in
            ``Buffer.low_latency_dispatch``.

    Returns:
        ``LowLatencyDispatchOutput(recv_x, recv_count, handle)``.
    """
    outputs = low_latency_dispatch_op(
        x,
        topk_idx,
        buffer.op_id,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        use_fp8,
        round_scale,
        use_ue8m0,
    )
    recv_x: Tensor | tuple[Tensor, Tensor] = (outputs[0], outputs[1]) if use_fp8 else outputs[0]
    return LowLatencyDispatchOutput(recv_x, outputs[2], LowLatencyTensorHandle(*outputs[3:]))


def low_latency_combine(
    buffer: Buffer,
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    handle: LowLatencyTensorHandle,
) -> Tensor:
    """``Buffer.low_latency_combine`` as a custom op.

    Arguments:
        buffer: the ``Buffer`` the dispatch ran on.
        x: ``[num_local_experts, num_ranks * M, hidden]`` bf16 expert outputs.
        topk_idx: ``[num_tokens, num_topk]`` int64, as given to the dispatch.
        topk_weights: ``[num_tokens, num_topk]`` float32.
        handle: the ``LowLatencyTensorHandle`` of ``low_latency_dispatch``.

    Returns:
        ``[num_tokens, hidden]`` bf16: ``sum_k topk_weights[t, k] * x[expert_k, row of t]``.
    """
    combined: Tensor = low_latency_combine_op(x, topk_idx, topk_weights, *handle, buffer.op_id)
    return combined
