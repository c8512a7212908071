"""Where each field of a dispatch or combine lives in the symmetric payload (int32 words).

Offsets depend only on values every rank shares (row capacity, hidden, scales, top-k), so a
sender computes the same addresses the receiver reads. Each field's region is aligned to 32
words, so a payload of ``capacity * row_words + 8 * 32`` words holds every region.
"""

from __future__ import annotations

from dataclasses import dataclass

from epcomm.kernels.normal_push import PushRegions

__all__ = ["CombineRegions", "DispatchRegions"]

_ALIGN_WORDS = 32  # 128 bytes


def _align(words: int) -> int:
    return (words + _ALIGN_WORDS - 1) // _ALIGN_WORDS * _ALIGN_WORDS


@dataclass(frozen=True)
class DispatchRegions:
    """Receive area of a dispatch: ``capacity`` rows of x, scales, top-k ids/weights, source index."""

    capacity: int
    x_words: int
    scale_words: int
    num_topk: int

    @property
    def push(self) -> PushRegions:
        """Offsets for the push kernel."""
        x = 0
        scales = x + _align(self.capacity * self.x_words)
        topk_idx = scales + _align(self.capacity * self.scale_words)
        topk_weights = topk_idx + _align(self.capacity * self.num_topk * 2)
        src_idx = topk_weights + _align(self.capacity * self.num_topk)
        return PushRegions(x, scales, topk_idx, topk_weights, src_idx)

    @staticmethod
    def row_words(x_words: int, scale_words: int, num_topk: int) -> int:
        """Words one row takes over all fields (int64 top-k ids count twice, plus the source index)."""
        return x_words + scale_words + 3 * num_topk + 1


@dataclass(frozen=True)
class CombineRegions:
    """Receive area of a combine: ``capacity`` rows of bf16 x and float32 top-k weights."""

    capacity: int
    x_words: int
    num_topk: int

    @property
    def push(self) -> PushRegions:
        """Offsets for the push kernel."""
        return PushRegions(x=0, topk_weights=_align(self.capacity * self.x_words))

    @staticmethod
    def row_words(x_words: int, num_topk: int) -> int:
        """Words one row takes over all fields."""
        return x_words + num_topk
