"""Where each field of a dispatch or combine lives in the symmetric payload (int32 words).

Offsets depend only on values every rank shares (row capacity, hidden, scales, top-k), so a
sender computes the same addresses the receiver reads.
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

    @property
    def total_words(self) -> int:
        """Payload words the area needs."""
        return self.push.src_idx + _align(self.capacity)


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

    @property
    def total_words(self) -> int:
        """Payload words the area needs."""
        return self.push.topk_weights + _align(self.capacity * self.num_topk)
