"""Benchmark shapes: named settings (tokens per rank, hidden size, top-k of experts), routing and
payload sizes.

Plain ``torch`` only (no epcomm import), like the rest of the benchmark helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FP8_GROUP", "SETTINGS", "Setting", "make_routing", "payload_bytes"]

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


def make_routing(
    setting: Setting,
    rank: int,
    device: torch.device,
    seed: int,
    num_masked: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP-style random routing of one rank's tokens.

    ``scores = randn(num_tokens, num_experts).abs() + 1``, ``topk_idx = topk(scores).indices``
    (as DeepEP's tests), then ``num_masked`` random entries set to ``-1``.

    Arguments:
        setting: the shape.
        rank: this rank (enters the seed, so ranks route differently).
        device: where the tensors live.
        seed: base seed of the run.
        num_masked: how many random ``(token, k)`` entries become ``-1`` (no expert).

    Returns:
        ``topk_idx [num_tokens, num_topk]`` int64 and ``topk_weights`` float32 (uniform in [0.5, 1.5)).
    """
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)
    scores = torch.randn(setting.num_tokens, setting.num_experts, generator=gen, device=device).abs() + 1
    topk_idx = torch.topk(scores, setting.num_topk, dim=1).indices.to(torch.int64)
    if num_masked > 0 and setting.num_tokens > 0:
        rows = torch.randint(0, setting.num_tokens, (num_masked,), generator=gen, device=device)
        cols = torch.randint(0, setting.num_topk, (num_masked,), generator=gen, device=device)
        topk_idx[rows, cols] = -1
    topk_weights = torch.rand(setting.num_tokens, setting.num_topk, generator=gen, device=device) + 0.5
    return topk_idx.contiguous(), topk_weights.to(torch.float32).contiguous()


def payload_bytes(num_rows: int, hidden: int, fp8: bool) -> int:
    """Bytes of ``num_rows`` token rows: bf16, or FP8 plus one float32 scale per 128 channels.

    FP8 bytes = BF16 bytes x (1 + 4/128) / 2, as DeepEP's tests count them.
    """
    if fp8:
        return num_rows * (hidden + hidden // FP8_GROUP * 4)
    return num_rows * hidden * 2
