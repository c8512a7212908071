"""Benchmark shapes: named settings (tokens per rank, hidden size, top-k of experts) and payload sizes.

The routing of a setting comes from ``epcomm.testing.make_routing`` (the tests' generator).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FP8_GROUP", "SETTINGS", "Setting", "payload_bytes"]

FP8_GROUP = 128
"""Channels per FP8 scale (one float32 scale per token and 128 channels)."""


@dataclass(frozen=True)
class Setting:
    """One benchmark shape: tokens per rank, hidden size and top-k of ``num_experts`` experts."""

    name: str
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int

    def shape(self) -> dict[str, int]:
        """The shape as a JSON-able dict."""
        return {
            "num_tokens": self.num_tokens,
            "hidden": self.hidden,
            "num_topk": self.num_topk,
            "num_experts": self.num_experts,
        }

    def describe(self) -> str:
        """``"4096 tokens/rank x hidden 7168, top-8 of 256 experts"``."""
        return (
            f"{self.num_tokens} tokens/rank x hidden {self.hidden}, top-{self.num_topk} of "
            f"{self.num_experts} experts"
        )


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # DeepSeek-V3 prefill: the shape of DeepEP's published normal-mode numbers.
        Setting("prefill", 4096, 7168, 8, 256),
        Setting("small", 512, 4096, 8, 64),
        # --quick on GPUs: seconds, still several MB per rank.
        Setting("quick", 256, 2048, 8, 64),
        # CPU (gloo) smoke runs.
        Setting("tiny", 64, 256, 4, 16),
    )
}


def payload_bytes(num_rows: int, hidden: int, fp8: bool) -> int:
    """Bytes of ``num_rows`` token rows: bf16, or FP8 plus one float32 scale per 128 channels.

    FP8 bytes = BF16 bytes x (1 + 4/128) / 2, as DeepEP's tests count them.
    """
    if fp8:
        return num_rows * (hidden + hidden // FP8_GROUP * 4)
    return num_rows * hidden * 2
