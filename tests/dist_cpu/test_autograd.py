"""``epcomm.autograd`` on gloo with 2 and 4 processes: forward and backward of dispatch -> experts ->
combine against a dense float64 computation of the same MoE math, and float64 gradient checks."""

from __future__ import annotations

import pytest

from .cases import WORLD_SIZES, RunOnRanks
from .workers_autograd import MoECase, autograd_vs_dense_worker, gradcheck_worker


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("payload", ["bfloat16", "float32", "float64", "fp8"])
def test_matches_dense(run_on_ranks: RunOnRanks, payload: str, world_size: int) -> None:
    case = MoECase(seed=11 + world_size, empty_rank=1 if payload == "float32" else -1)
    run_on_ranks(world_size, autograd_vs_dense_worker, case, payload)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(
    ("payload", "variant"),
    [("bfloat16", "num_worst_tokens"), ("float32", "num_worst_tokens"), ("bfloat16", "events")],
)
def test_variants(run_on_ranks: RunOnRanks, payload: str, variant: str, world_size: int) -> None:
    case = MoECase(seed=23 + world_size, num_topk=2)
    run_on_ranks(world_size, autograd_vs_dense_worker, case, payload, variant)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gradcheck_float64(run_on_ranks: RunOnRanks, world_size: int) -> None:
    """Finite differences against the backward in float64 (second order too at 2 ranks: the
    backward ops are differentiable themselves)."""
    case = MoECase(seed=5, num_tokens=3, hidden=4, experts_per_rank=2, num_topk=2, same_tokens=True)
    run_on_ranks(world_size, gradcheck_worker, case, world_size == 2)
