"""Random MoE routing (``topk_idx`` / ``topk_weights``) for tests, benchmarks and the round-trip CLI.

One generator, so that every test tier, benchmark and demo routes tokens the same way: DeepEP's
tests' recipe (``scores = |randn(num_tokens, num_experts)| + 1``, ``topk_idx = topk(scores).indices``,
so each token's experts are distinct), optionally restricted to some experts (unbalanced routing) and
with some slots masked to ``-1`` (no expert).

The routing is a pure function of ``(seed, rank)`` and the sizes, drawn on the CPU whatever
``device`` is, so every process (and every device type) rebuilds every rank's routing bit for bit
without communication.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["TopkRouting", "make_routing"]

_RANK_STRIDE = 1_000_003
"""The generator of ``(seed, rank)`` is seeded with ``seed * _RANK_STRIDE + rank``: a prime larger than
any rank count, so two ``(seed, rank)`` pairs with ``rank < _RANK_STRIDE`` never share a stream."""

_WEIGHT_OFFSET = 0.5
"""``topk_weights`` are uniform in ``[_WEIGHT_OFFSET, _WEIGHT_OFFSET + 1)``: positive and away from 0, so a
combine that drops or double-counts a row changes the result by a visible amount."""


class TopkRouting(NamedTuple):
    """One rank's routing, as ``Buffer.get_dispatch_layout`` / ``dispatch`` / ``low_latency_*`` take it.

    Attributes:
        topk_idx: ``[num_tokens, num_topk]`` int64 (``epcomm.topk_idx_t``): global expert ids, distinct
            within a row, or ``-1`` (masked: no expert).
        topk_weights: ``[num_tokens, num_topk]`` float32, uniform in ``[0.5, 1.5)`` (also where
            ``topk_idx`` is ``-1``, as DeepEP's tests).
    """

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def make_routing(
    num_tokens: int,
    num_experts: int,
    num_topk: int,
    *,
    seed: int,
    rank: int = 0,
    masked_prob: float = 0.0,
    num_masked: int = 0,
    allowed_experts: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> TopkRouting:
    """Random top-k routing of one rank's tokens, deterministic from ``(seed, rank)``.

    Steps, all drawn from one CPU ``torch.Generator`` seeded with ``seed * 1_000_003 + rank``:

    1. ``scores = randn(num_tokens, num_experts).abs() + 1``; experts not in ``allowed_experts`` get
       ``-inf``;
    2. ``topk_idx = topk(scores, num_topk).indices`` (distinct experts per token, best score first);
       slots whose score is ``-inf`` (fewer allowed experts than ``num_topk``) become ``-1``;
    3. each slot becomes ``-1`` with probability ``masked_prob`` (a ``[num_tokens, num_topk]``
       uniform draw is made even when it is 0, so the other draws do not depend on it);
    4. ``num_masked`` random ``(token, slot)`` pairs, drawn with replacement, become ``-1`` (DeepEP's
       tests mask 10 this way);
    5. ``topk_weights = rand(num_tokens, num_topk) + 0.5``.

    Arguments:
        num_tokens: tokens of this rank (0 is allowed: empty tensors).
        num_experts: experts in total, over all ranks.
        num_topk: experts per token, in ``[1, num_experts]``.
        seed: seed of the run; the same ``(seed, rank)`` gives the same routing on every process.
        rank: the rank whose tokens are routed (so ranks route differently, and any process can
            rebuild any rank's routing).
        masked_prob: probability, in ``[0, 1]``, that a slot is masked to ``-1``.
        num_masked: how many random slots are masked to ``-1`` (after ``masked_prob``).
        allowed_experts: the only experts tokens may pick (e.g. ``range(num_local_experts)``: every
            token goes to rank 0 only, a hot rank); ``None``: all experts.
        device: where the returned tensors live (they are drawn on the CPU, then copied).

    Returns:
        ``TopkRouting(topk_idx [num_tokens, num_topk] int64, topk_weights [num_tokens, num_topk]
        float32)``, contiguous, on ``device``.

    Raises:
        ValueError: a size or probability out of range, or an expert of ``allowed_experts`` outside
            ``[0, num_experts)``.

    Example:
        >>> routing = make_routing(4, 16, 2, seed=0, rank=1)
        >>> routing.topk_idx.shape, routing.topk_idx.dtype, routing.topk_weights.dtype
        (torch.Size([4, 2]), torch.int64, torch.float32)
        >>> bool((make_routing(4, 16, 2, seed=0, rank=1).topk_idx == routing.topk_idx).all())
        True
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0; got {num_tokens}")
    if not 1 <= num_topk <= num_experts:
        raise ValueError(f"num_topk must be in [1, num_experts={num_experts}]; got {num_topk}")
    if not 0.0 <= masked_prob <= 1.0:
        raise ValueError(f"masked_prob must be in [0, 1]; got {masked_prob}")
    if num_masked < 0:
        raise ValueError(f"num_masked must be >= 0; got {num_masked}")
    gen = torch.Generator(device="cpu").manual_seed(seed * _RANK_STRIDE + rank)
    scores = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float32, device="cpu").abs() + 1
    if allowed_experts is not None:
        allowed = torch.tensor(list(allowed_experts), dtype=torch.int64, device="cpu")
        if allowed.numel() and not bool(((allowed >= 0) & (allowed < num_experts)).all()):
            raise ValueError(
                f"allowed_experts must be in [0, num_experts={num_experts}); got {allowed.tolist()}"
            )
        is_allowed = torch.zeros(num_experts, dtype=torch.bool, device="cpu")
        is_allowed[allowed] = True
        scores[:, ~is_allowed] = -math.inf
    values, topk_idx = torch.topk(scores, num_topk, dim=1)
    no_expert = torch.full_like(topk_idx, -1)
    topk_idx = torch.where(values == -math.inf, no_expert, topk_idx)
    masked = torch.rand(num_tokens, num_topk, generator=gen, dtype=torch.float32, device="cpu") < masked_prob
    topk_idx = torch.where(masked, no_expert, topk_idx).to(torch.int64)
    if num_masked > 0 and num_tokens > 0:
        rows = torch.randint(0, num_tokens, (num_masked,), generator=gen, device="cpu")
        slots = torch.randint(0, num_topk, (num_masked,), generator=gen, device="cpu")
        topk_idx[rows, slots] = -1
    topk_weights = (
        torch.rand(num_tokens, num_topk, generator=gen, dtype=torch.float32, device="cpu") + _WEIGHT_OFFSET
    )
    return TopkRouting(
        topk_idx.contiguous().to(device), topk_weights.to(torch.float32).contiguous().to(device)
    )
