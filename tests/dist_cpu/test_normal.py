"""Normal (high-throughput) mode on gloo with 2 and 4 processes against the naive oracle."""

from __future__ import annotations

import pytest

from .cases import SCENARIOS, WORLD_SIZES, RunOnRanks, make_case, normal_mode_scenarios
from .workers_normal import (
    combine_bias_worker,
    expert_alignment_worker,
    fp8_dispatch_worker,
    layout_dispatch_combine_worker,
    layout_worker,
    no_topk_worker,
    worst_tokens_worker,
)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_get_dispatch_layout(run_on_ranks: RunOnRanks, scenario: str, world_size: int) -> None:
    case = make_case("get_dispatch_layout", world_size, scenario)
    run_on_ranks(world_size, layout_worker, case)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("scenario", normal_mode_scenarios())
def test_layout_dispatch_combine(run_on_ranks: RunOnRanks, scenario: str, world_size: int) -> None:
    case = make_case("layout_dispatch_combine", world_size, scenario)
    run_on_ranks(world_size, layout_dispatch_combine_worker, case)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("default_device", ["", "meta"])
def test_caller_defaults(run_on_ranks: RunOnRanks, default_device: str, world_size: int) -> None:
    """DeepEP scripts call ``torch.set_default_dtype(torch.bfloat16)`` (and set the default device)
    before building the ``Buffer``: every internal allocation names its dtype and device, so results
    are unchanged (``meta``: an allocation that names no device fails)."""
    case = make_case("layout_dispatch_combine", world_size, "masked_slots")
    run_on_ranks(world_size, layout_dispatch_combine_worker, case, "bfloat16", default_device)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("num_biases", [1, 2])
def test_combine_bias(run_on_ranks: RunOnRanks, num_biases: int, world_size: int) -> None:
    case = make_case("combine_bias", world_size, "masked_slots")
    run_on_ranks(world_size, combine_bias_worker, case, num_biases)


@pytest.mark.parametrize(
    ("world_size", "scenario"), [(2, "balanced"), (4, "masked_slots"), (2, "hidden_7168")]
)
@pytest.mark.parametrize(
    "scale_kind", ["float32", "float32_column_major", "ue8m0_int32", "ue8m0_int32_column_major"]
)
def test_fp8_dispatch(run_on_ranks: RunOnRanks, scale_kind: str, world_size: int, scenario: str) -> None:
    case = make_case("fp8_dispatch", world_size, scenario, hidden=SCENARIOS[scenario].get("hidden", 640))
    run_on_ranks(world_size, fp8_dispatch_worker, case, scale_kind)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("scenario", ["balanced", "empty_rank_1"])
def test_num_worst_tokens(run_on_ranks: RunOnRanks, scenario: str, world_size: int) -> None:
    case = make_case("num_worst_tokens", world_size, scenario)
    # The most a rank can receive is every token of every rank.
    run_on_ranks(world_size, worst_tokens_worker, case, case.num_tokens * world_size + 3)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("expert_alignment", [4, 128])
def test_expert_alignment(run_on_ranks: RunOnRanks, expert_alignment: int, world_size: int) -> None:
    case = make_case("expert_alignment", world_size, "masked_slots")
    run_on_ranks(world_size, expert_alignment_worker, case, expert_alignment)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_dispatch_without_topk(run_on_ranks: RunOnRanks, world_size: int) -> None:
    case = make_case("dispatch_without_topk", world_size, "masked_slots")
    run_on_ranks(world_size, no_topk_worker, case)
