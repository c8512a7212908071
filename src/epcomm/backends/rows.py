"""Pack several per-token tensors into one byte row per token, and back (reference backend).

One message per peer instead of four keeps the reference simple and moves any dtype (bf16, fp8,
int64) over gloo, which only knows a few.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RowLayout", "pad_rows"]


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
