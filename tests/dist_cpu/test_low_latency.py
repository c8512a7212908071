"""Low-latency (decode) mode on gloo with 2 and 4 processes against the naive oracle."""

from __future__ import annotations

import pytest

from .cases import SCENARIOS, WORLD_SIZES, RunOnRanks, make_case
from .workers_low_latency import (
    DISPATCH_MODES,
    combine_variant_worker,
    dispatch_combine_worker,
    shrink_worker,
    two_outstanding_worker,
)

# Capacity above the token count: num_tokens < num_max_dispatch_tokens_per_rank.
SPARE_CAPACITY = 8


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_dispatch_combine_bf16(run_on_ranks: RunOnRanks, scenario: str, world_size: int) -> None:
    case = make_case("ll_dispatch_combine", world_size, scenario)
    capacity = case.num_tokens + SPARE_CAPACITY
    run_on_ranks(world_size, dispatch_combine_worker, case, capacity, "bf16")


@pytest.mark.parametrize(
    ("world_size", "scenario"), [(2, "balanced"), (4, "masked_slots"), (2, "hidden_7168")]
)
@pytest.mark.parametrize("mode", [m for m in DISPATCH_MODES if m != "bf16"])
def test_dispatch_fp8(run_on_ranks: RunOnRanks, mode: str, world_size: int, scenario: str) -> None:
    # hidden 640 has 5 scale groups: packed UE8M0 needs a padded second int32 word.
    case = make_case("ll_dispatch_fp8", world_size, scenario, hidden=SCENARIOS[scenario].get("hidden", 640))
    run_on_ranks(world_size, dispatch_combine_worker, case, case.num_tokens, mode)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("variant", ["zero_copy", "out", "recv_hook"])
def test_combine_variants(run_on_ranks: RunOnRanks, variant: str, world_size: int) -> None:
    case = make_case("ll_combine_variant", world_size, "masked_slots")
    run_on_ranks(world_size, combine_variant_worker, case, case.num_tokens + SPARE_CAPACITY, variant)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_caller_default_dtype_bf16(run_on_ranks: RunOnRanks, mode: str, world_size: int) -> None:
    """Low-latency dispatch (and combine) built and called under ``torch.set_default_dtype(bfloat16)``."""
    case = make_case("ll_dispatch_combine", world_size, "masked_slots")
    run_on_ranks(
        world_size, dispatch_combine_worker, case, case.num_tokens + SPARE_CAPACITY, mode, "bfloat16"
    )


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_two_outstanding_dispatches(run_on_ranks: RunOnRanks, world_size: int) -> None:
    case = make_case("ll_two_outstanding", world_size, "masked_slots")
    run_on_ranks(world_size, two_outstanding_worker, case, case.num_tokens + SPARE_CAPACITY)


@pytest.mark.parametrize(("world_size", "masked_rank"), [(2, 1), (4, 2), (4, 0)])
def test_shrink_masked_rank(run_on_ranks: RunOnRanks, world_size: int, masked_rank: int) -> None:
    case = make_case("ll_shrink", world_size, "balanced", drop_prob=0.1)
    run_on_ranks(world_size, shrink_worker, case, case.num_tokens + SPARE_CAPACITY, masked_rank)
