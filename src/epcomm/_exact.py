"""Bit-exact normal-mode transport of rows the ``Buffer`` does not carry natively.

``Buffer.dispatch`` moves bf16 (or FP8) rows and ``Buffer.combine`` sums bf16 rows into a bf16
result. The differentiable ops (``epcomm.autograd``) also take float32 and float64 payloads, and
move float32 top-k weights (and their gradients) where the Buffer has no field for them. This
module moves such rows exactly, through the public ``Buffer`` calls only:

* dispatch and cached dispatch copy rows byte for byte, so any per-token columns (several
  tensors of any dtypes) are packed into one byte row (``RowLayout``), padded to a multiple of
  16 bytes (the NVLink backend moves rows as 16-byte words) and sent as a bf16 row of half that
  many columns; the receiver unpacks the same bytes;
* combine sums, so it cannot carry packed bytes: the expert side *dispatches* its rows back to
  the ranks they came from (a fresh dispatch whose routing sends each received row to its
  source rank), and the token's rank sums them itself, in the payload's dtype, in ascending
  rank order (the order the reference backend's combine sums in).

The row order on both sides follows the dispatch contract (rows ordered by source rank, then
by source index), so no index travels with the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from epcomm.backends.rows import RowLayout
from epcomm.config import Config
from epcomm.handles import DispatchHandle

if TYPE_CHECKING:
    from epcomm.buffer import Buffer

__all__ = ["exact_cached_dispatch", "exact_combine", "exact_dispatch"]

ROW_ALIGN_BYTES = 16
"""Packed rows are padded to a multiple of this (the NVLink backend's word size)."""


def _layout(tensors: Sequence[torch.Tensor]) -> RowLayout:
    fields = [(t.size(1), t.dtype) for t in tensors]
    row_bytes = sum(columns * dtype.itemsize for columns, dtype in fields)
    pad = -row_bytes % ROW_ALIGN_BYTES if row_bytes else ROW_ALIGN_BYTES
    if pad:
        fields.append((pad, torch.uint8))
    return RowLayout(fields)


def _pack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, RowLayout]:
    """``[num_rows, row_bytes // 2]`` bf16 rows holding the bytes of every ``[num_rows, *]`` tensor."""
    layout = _layout(tensors)
    parts = list(tensors)
    if len(layout.fields) > len(parts):
        num_rows, device = tensors[0].size(0), tensors[0].device
        parts.append(torch.zeros(num_rows, layout.fields[-1][0], dtype=torch.uint8, device=device))
    packed = layout.pack(parts).contiguous()
    return packed.view(torch.bfloat16), layout


def _unpack(rows: torch.Tensor, layout: RowLayout, count: int) -> list[torch.Tensor]:
    """The first ``count`` fields of bf16 ``rows`` packed with ``layout`` (fresh tensors)."""
    return layout.unpack(rows.contiguous().view(torch.uint8))[:count]


def exact_dispatch(
    buffer: Buffer,
    tensors: Sequence[torch.Tensor],
    topk_idx: torch.Tensor,
    num_experts: int,
    expert_alignment: int,
    num_worst_tokens: int,
    config: Config | None,
) -> tuple[list[torch.Tensor], torch.Tensor, list[int], DispatchHandle]:
    """A fresh dispatch of ``tensors`` (``[num_tokens, *]``, any dtypes) routed by ``topk_idx``.

    Returns:
        The received tensors (``[num_recv_rows, *]``, same dtypes, bit for bit; zero rows past
        the real count with ``num_worst_tokens``), ``recv_topk_idx [num_recv_rows, num_topk]``
        int64, the per-expert receive counts (empty with ``num_worst_tokens``) and the handle.
    """
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    packed, layout = _pack(tensors)
    recv, recv_topk_idx, _, counts, handle, _ = buffer.dispatch(
        packed,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        expert_alignment=expert_alignment,
        num_worst_tokens=num_worst_tokens,
        config=config,
    )
    assert isinstance(recv, torch.Tensor)
    assert recv_topk_idx is not None
    assert counts is not None
    assert handle is not None
    if not isinstance(handle, DispatchHandle):
        raise NotImplementedError(
            "epcomm.autograd: multi-node mode (an InternodeHandle) is not supported yet"
        )
    return _unpack(recv, layout, len(tensors)), recv_topk_idx, counts, handle


def exact_cached_dispatch(
    buffer: Buffer, handle: DispatchHandle, tensors: Sequence[torch.Tensor], config: Config | None
) -> list[torch.Tensor]:
    """Cached dispatch of ``tensors`` (``[num_tokens, *]``, any dtypes) with ``handle``.

    Returns:
        ``[num_recv_rows, *]`` tensors of the same dtypes, bit for bit (zero padding rows).
    """
    packed, layout = _pack(tensors)
    recv, *_ = buffer.dispatch(packed, handle=handle, config=config)
    assert isinstance(recv, torch.Tensor)
    return _unpack(recv, layout, len(tensors))


def exact_combine(
    buffer: Buffer, handle: DispatchHandle, tensors: Sequence[torch.Tensor], config: Config | None
) -> list[torch.Tensor]:
    """Sum the received rows of ``tensors`` (``[num_recv_rows, *]``) back onto their tokens.

    The rows go back to their source ranks by a fresh dispatch (each row's routing: its source
    rank; padding rows go nowhere) and each token's rows are summed here, in each tensor's dtype,
    starting from zero and adding the rows in ascending rank order.

    Returns:
        ``[num_tokens, *]`` tensors of the same dtypes.
    """
    num_ranks, rank = buffer.group_size, buffer.rank
    device = tensors[0].device
    num_rows = handle.num_recv_rows
    # Rows from source rank s occupy [column[s-1], column[s]) of this rank's received rows.
    column = handle.rank_prefix_matrix[:, rank].to(device=device, dtype=torch.int64).contiguous()
    row = torch.arange(num_rows, dtype=torch.int64, device=device)
    source = torch.searchsorted(column, row, right=True)  # num_ranks for padding rows
    is_valid = source < num_ranks
    to_rank = torch.zeros(num_rows, num_ranks, dtype=torch.bool, device=device)
    to_rank[row[is_valid], source[is_valid]] = True
    per_rank = torch.diff(column, prepend=column.new_zeros(1)).to(torch.int32)
    packed, layout = _pack(tensors)
    recv, *_ = buffer.dispatch(
        packed,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=to_rank,
        num_tokens_per_expert=per_rank.clone(),  # one "expert" per rank
        config=config,
    )
    assert isinstance(recv, torch.Tensor)
    parts = _unpack(recv, layout, len(tensors))
    # What came back from rank r are this rank's tokens sent to r, in token order.
    is_token_in_rank = handle.is_token_in_rank
    num_tokens = is_token_in_rank.size(0)
    sums = [torch.zeros(num_tokens, t.size(1), dtype=t.dtype, device=device) for t in tensors]
    start = 0
    for dst in range(num_ranks):
        token_idx = is_token_in_rank[:, dst].nonzero().view(-1)
        end = start + token_idx.numel()
        for total, part in zip(sums, parts):
            total.index_add_(0, token_idx, part[start:end])
        start = end
    return sums
