"""Pack several per-token tensors into one byte row per token, and back (reference backend).

One message per peer instead of four keeps the reference simple and moves any dtype (bf16, fp8,
int64) over gloo, which only knows a few.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["ReceivedRows", "RowLayout", "expert_counts_list", "pad_rows", "received_rows"]


class RowLayout:
    """Byte layout of a packed row: one column block per field.

    Arguments:
        fields: per field ``(columns, dtype)``; a field of a ``[num_tokens, columns]`` tensor.
    """

    def __init__(self, fields: Sequence[tuple[int, torch.dtype]]) -> None:
        self.fields = list(fields)
        self.offsets: list[int] = []
        offset = 0
        for columns, dtype in self.fields:
            self.offsets.append(offset)
            offset += columns * dtype.itemsize
        self.row_bytes = offset

    @staticmethod
    def of(tensors: Sequence[torch.Tensor | None]) -> tuple[RowLayout, list[torch.Tensor]]:
        """The layout of the given ``[num_tokens, columns]`` tensors (``None`` entries left out,
        each field its tensor's width and dtype) and those tensors, in order."""
        present = [t for t in tensors if t is not None]
        return RowLayout([(t.size(1), t.dtype) for t in present]), present

    def pack(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[num_tokens, row_bytes]`` uint8 from tensors ``[num_tokens, columns]`` (any strides)."""
        parts = [
            _dense(t).view(torch.uint8).reshape(t.size(0), columns * dtype.itemsize)
            for t, (columns, dtype) in zip(tensors, self.fields)
        ]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Contiguous ``[num_rows, columns]`` tensors of each field from ``[num_rows, row_bytes]`` uint8."""
        out = []
        for (columns, dtype), offset in zip(self.fields, self.offsets):
            # A fresh copy, not .contiguous(): a 0- or 1-row slice counts as contiguous but keeps
            # its unaligned storage offset / row stride, and the dtype view below needs alignment.
            block = packed[:, offset : offset + columns * dtype.itemsize].clone(
                memory_format=torch.contiguous_format
            )
            out.append(block.view(dtype).reshape(packed.size(0), columns))
        return out


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with unit stride in its last dimension. ``.contiguous()`` alone is not enough: an
    empty or one-row tensor counts as contiguous whatever its strides (stride 0 from an expand), and
    a byte view needs stride 1."""
    dense = tensor.contiguous()
    if dense.dim() and dense.stride(-1) != 1:
        dense = tensor.clone(memory_format=torch.contiguous_format)
    return dense


def pad_rows(tensor: torch.Tensor, num_rows: int, value: float) -> torch.Tensor:
    """``tensor [n, ...]`` followed by ``num_rows - n`` rows of ``value`` (``num_worst_tokens``
    results); ``tensor`` itself when ``n == num_rows``. Zero padding is bytes of zeros (float8 too)."""
    if tensor.size(0) == num_rows:
        return tensor
    padded = torch.empty((num_rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    if value == 0:
        padded.view(torch.uint8).zero_()  # also for float8, which has no fill kernel
    else:
        padded.fill_(value)
    padded[: tensor.size(0)] = tensor
    return padded


class ReceivedRows(NamedTuple):
    """The rows a dispatch returns, as ``Buffer.dispatch`` gives them (padded to ``num_rows``)."""

    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    num_rows: int


def received_rows(
    columns: Sequence[torch.Tensor],
    has_scales: bool,
    has_topk_idx: bool,
    has_topk_weights: bool,
    rank: int,
    num_local_experts: int,
    num_worst_tokens: int,
) -> ReceivedRows:
    """A dispatch's received rows from their unpacked columns.

    Arguments:
        columns: ``[num_recv, ...]`` tensors in row order: ``x``, then the scales, the global top-k
            ids (int64) and the top-k weights (float32) where the call sent them.
        has_scales, has_topk_idx, has_topk_weights: which of those follow ``x``.
        rank: this rank (its experts are ``rank * num_local_experts`` onward).
        num_local_experts: experts per rank.
        num_worst_tokens: ``> 0``: pad every result to this many rows (``x`` and scales with zero
            bytes, ids with ``-1``, weights with 0).

    Returns:
        ``ReceivedRows``: top-k ids made local (``-1`` for another rank's expert or a ``-1`` slot),
        their weights zeroed there.

    Raises:
        ValueError: more rows arrived than ``num_worst_tokens``.
    """
    recv_x = columns[0]
    rest = iter(columns[1:])
    recv_scales = next(rest) if has_scales else None
    recv_topk_idx = recv_topk_weights = None
    if has_topk_idx:
        global_idx = next(rest)
        local_idx = global_idx - rank * num_local_experts
        is_local = (global_idx >= 0) & (local_idx >= 0) & (local_idx < num_local_experts)
        recv_topk_idx = torch.where(is_local, local_idx, torch.full_like(local_idx, -1))
        if has_topk_weights:
            weights = next(rest)
            recv_topk_weights = torch.where(is_local, weights, torch.zeros_like(weights))
    num_recv = recv_x.size(0)
    if num_worst_tokens <= 0:
        return ReceivedRows(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, num_recv)
    if num_recv > num_worst_tokens:
        raise ValueError(
            f"dispatch: num_worst_tokens={num_worst_tokens} but rank {rank} receives {num_recv} tokens; "
            "num_worst_tokens must be >= the largest receive count (at most num_tokens * num_ranks)"
        )
    return ReceivedRows(
        pad_rows(recv_x, num_worst_tokens, 0),
        None if recv_scales is None else pad_rows(recv_scales, num_worst_tokens, 0),
        None if recv_topk_idx is None else pad_rows(recv_topk_idx, num_worst_tokens, -1),
        None if recv_topk_weights is None else pad_rows(recv_topk_weights, num_worst_tokens, 0),
        num_worst_tokens,
    )


def expert_counts_list(per_expert: torch.Tensor, alignment: int, num_worst_tokens: int) -> list[int]:
    """``num_recv_tokens_per_expert_list``: each count of ``per_expert`` (``[num_local_experts]``
    int64, on the CPU) rounded up to ``alignment``; ``[]`` with ``num_worst_tokens`` (no host read)."""
    if num_worst_tokens > 0:
        return []
    return [(int(c) + alignment - 1) // alignment * alignment for c in per_expert.tolist()]
