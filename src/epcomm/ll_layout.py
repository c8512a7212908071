"""Layout and size of the low-latency symmetric buffer (``Buffer.get_low_latency_rdma_size_hint``).

Pure Python (no Triton), shared by the size hint, the facade's checks and the NVLink backend, so
the hint is the real size the backend uses. Payload layout in int32 words:
``[flags: 2 phases x 2 parities x NUM_MAX_NVL_PEERS]``, ``[dispatch token counts: 2 parities x
NUM_MAX_NVL_PEERS]`` (per source rank, written by the source before it releases its dispatch
flag), padded to 128 bytes, then per parity the dispatch staging area
``[num_ranks, M, message_words]`` (slot = source rank, token) and the combine staging area
``[M, num_topk, hidden / 2]`` (slot = token, top-k slot).
"""

from __future__ import annotations

from dataclasses import dataclass

from epcomm.config import NUM_MAX_NVL_PEERS

__all__ = [
    "MAX_LOW_LATENCY_TOPK",
    "LowLatencyLayout",
    "count_offset",
    "flag_offset",
    "low_latency_rdma_size_hint",
]

MAX_LOW_LATENCY_TOPK = 32
"""Largest ``num_topk`` of low-latency mode (DeepEP: 11; API.md asks for at least 16). The size
hint reserves the combine staging area for this many slots per token."""

_ALIGN_WORDS = 32  # 128 bytes
_SEQUENCE_WORDS = 2 * 2 * NUM_MAX_NVL_PEERS
_FLAG_WORDS = _SEQUENCE_WORDS + 2 * NUM_MAX_NVL_PEERS  # sequence flags, then dispatch counts


def _align(words: int) -> int:
    return (words + _ALIGN_WORDS - 1) // _ALIGN_WORDS * _ALIGN_WORDS


@dataclass(frozen=True)
class LowLatencyLayout:
    """Payload offsets (int32 words) for one ``(num_ranks, M, hidden, num_topk)``, the same on
    every rank."""

    num_ranks: int
    capacity: int
    hidden: int
    num_topk: int

    @property
    def message_words(self) -> int:
        """Words of one dispatch message: bf16 row (the larger format) + top-k ids, 16-byte aligned."""
        return (self.hidden // 2 + self.num_topk + 3) // 4 * 4

    @property
    def dispatch_words(self) -> int:
        """Words of one parity's dispatch staging area."""
        return _align(self.num_ranks * self.capacity * self.message_words)

    @property
    def combine_words(self) -> int:
        """Words of one parity's combine staging area."""
        return _align(self.capacity * self.num_topk * self.hidden // 2)

    def dispatch_offset(self, parity: int) -> int:
        """Word offset of ``parity``'s dispatch staging area."""
        return _align(_FLAG_WORDS) + parity * (self.dispatch_words + self.combine_words)

    def combine_offset(self, parity: int) -> int:
        """Word offset of ``parity``'s combine staging area."""
        return self.dispatch_offset(parity) + self.dispatch_words

    @property
    def total_words(self) -> int:
        """Payload words both parities need."""
        return self.dispatch_offset(2)


def flag_offset(phase: int, parity: int) -> int:
    """Word offset of the flags of ``phase`` (0 dispatch, 1 combine) and ``parity``."""
    return (phase * 2 + parity) * NUM_MAX_NVL_PEERS


def count_offset(parity: int) -> int:
    """Word offset of ``parity``'s dispatch token counts, one word per source rank: how many of
    its slots ``[source, 0 : count]`` the source wrote in its last dispatch of that parity."""
    return _SEQUENCE_WORDS + parity * NUM_MAX_NVL_PEERS


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of ``num_rdma_bytes`` low-latency mode needs: the real size of the layout above for
    ``min(num_experts, MAX_LOW_LATENCY_TOPK)`` top-k slots (DeepEP's formula asks for ~17x more at
    128 tokens, hidden 7168, 256 experts; any larger buffer works too).

    Arguments:
        num_max_dispatch_tokens_per_rank: capacity ``M`` per rank.
        hidden: hidden size (a multiple of 128).
        num_ranks: ranks of the group.
        num_experts: total experts.

    Returns:
        int, a multiple of 128.
    """
    num_topk = max(1, min(num_experts, MAX_LOW_LATENCY_TOPK))
    layout = LowLatencyLayout(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_topk)
    return layout.total_words * 4
