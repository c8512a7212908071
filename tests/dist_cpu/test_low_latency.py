"""Low-latency (decode) mode on gloo with 2 and 4 processes against the naive oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epcomm.testing import parallel_launch

from .cases import SCENARIOS, WORLD_SIZES, RunOnRanks, make_case
from .workers_low_latency import (
    DISPATCH_MODES,
    combine_variant_worker,
    dispatch_combine_worker,
    shrink_worker,
    two_outstanding_worker,
)
from .workers_shrink import (
    NO_SHRINK_TIMEOUT_S,
    OPERATIONS,
    SHRINK_TIMEOUT_S,
    killed_peer_worker,
    no_shrink_timeout_worker,
    shrink_drop_worker,
    unmask_after_timeout_worker,
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
@pytest.mark.parametrize("default_device", ["", "meta"])
def test_caller_defaults(run_on_ranks: RunOnRanks, default_device: str, mode: str, world_size: int) -> None:
    """Low-latency dispatch (and combine) built and called under ``torch.set_default_dtype(bfloat16)``
    and a default device (``meta``: an internal allocation that names no device fails)."""
    case = make_case("ll_dispatch_combine", world_size, "masked_slots")
    run_on_ranks(
        world_size,
        dispatch_combine_worker,
        case,
        case.num_tokens + SPARE_CAPACITY,
        mode,
        "bfloat16",
        default_device,
    )


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_two_outstanding_dispatches(run_on_ranks: RunOnRanks, world_size: int) -> None:
    case = make_case("ll_two_outstanding", world_size, "masked_slots")
    run_on_ranks(world_size, two_outstanding_worker, case, case.num_tokens + SPARE_CAPACITY)


@pytest.mark.parametrize(("world_size", "masked_rank"), [(2, 1), (4, 2), (4, 0)])
def test_shrink_masked_rank(run_on_ranks: RunOnRanks, world_size: int, masked_rank: int) -> None:
    case = make_case("ll_shrink", world_size, "balanced", drop_prob=0.1)
    run_on_ranks(world_size, shrink_worker, case, case.num_tokens + SPARE_CAPACITY, masked_rank)


# (world size, rank -> the call at which it stops): 8 ranks lose one rank at each call of the first
# round; 2 and 4 ranks lose rank 1 at its first dispatch.
SHRINK_DROPS = [
    (8, {1: "low_latency_dispatch", 3: "low_latency_combine", 5: "clean_low_latency_buffer"}),
    (2, {1: "low_latency_dispatch"}),
    (4, {1: "low_latency_dispatch"}),
]


@pytest.mark.parametrize(("world_size", "stops"), SHRINK_DROPS, ids=["8_ranks", "2_ranks", "4_ranks"])
def test_shrink_masks_a_rank_that_stops(
    run_on_ranks: RunOnRanks, tmp_path: Path, world_size: int, stops: dict[int, str]
) -> None:
    """Shrink mode: ranks stop calling (alive) at a dispatch, a combine or a clean; every other
    rank finishes each call, masks them (query and warning) and gets the naive results with
    their experts masked, over two rounds (the worker checks; see ``shrink_drop_worker``)."""
    case = make_case("ll_shrink_drop", world_size, "masked_slots")
    records = run_on_ranks(
        world_size, shrink_drop_worker, case, case.num_tokens + SPARE_CAPACITY, stops, 2, str(tmp_path)
    )
    for rank, rank_records in enumerate(records):
        calls = 0 if rank in stops else 2 * len(OPERATIONS)
        assert len(rank_records) == calls, f"rank {rank} recorded {len(rank_records)} calls, expected {calls}"


@pytest.mark.parametrize("operation", OPERATIONS)
def test_no_shrink_timeout_names_operation_and_peer(
    run_on_ranks: RunOnRanks, tmp_path: Path, operation: str
) -> None:
    """Without shrink mode the same stop is a ``PeerTimeoutError`` naming the call, rank 0 and
    peer 1, after ``EPCOMM_TIMEOUT_S``."""
    case = make_case("ll_no_shrink_timeout", 2, "balanced")
    outcome = run_on_ranks(2, no_shrink_timeout_worker, case, case.num_tokens, operation, str(tmp_path))[0]
    assert outcome["operation"] == operation, outcome
    assert outcome["rank"] == 0, outcome
    assert outcome["missing_peers"] == [1], outcome
    message = outcome["message"]
    for part in (operation, "rank 0", "[1]"):
        assert part in message, message
    assert NO_SHRINK_TIMEOUT_S - 0.2 <= outcome["elapsed_s"] <= NO_SHRINK_TIMEOUT_S + 5.0, outcome


def test_shrink_masks_a_killed_rank(tmp_path: Path) -> None:
    """Shrink mode with a peer whose process died (connection reset, not a silent peer): the
    survivor masks it with a warning instead of raising ``PeerLostError``, and its results are
    the naive ones with that rank masked, in this call and the next."""
    case = make_case("ll_shrink_killed", 2, "masked_slots")
    result_file = tmp_path / "rank0.json"
    with pytest.raises(RuntimeError, match="rank 1"):  # the launch reports the killed rank
        parallel_launch(
            2, killed_peer_worker, case, case.num_tokens, str(result_file), backend="gloo", timeout_s=120
        )
    outcome = json.loads(result_file.read_text())
    assert outcome["error"] is None, outcome["error"]
    first, *later = outcome["records"]
    assert first["mask"] == [0, 1], first
    assert [w[:3] for w in first["warnings"]] == [["low_latency_dispatch", 0, 1]], first["warnings"]
    message = first["warnings"][0][3]
    assert message.startswith("epcomm: low_latency_dispatch on rank 0: peer 1 "), message
    assert first["elapsed_s"] <= SHRINK_TIMEOUT_S + 5.0, first
    for record in later:
        assert record["mask"] == [0, 1], record
        assert record["warnings"] == [], record
        assert record["elapsed_s"] < SHRINK_TIMEOUT_S, record


def test_shrink_unmasked_late_rank_gets_no_stale_message(run_on_ranks: RunOnRanks, tmp_path: Path) -> None:
    """A rank masked after a timeout and unmasked by hand while it is still one call behind: its
    late message (meant for the earlier call) must not be taken for the next one; it is masked
    again and the results are those without it (the worker checks)."""
    case = make_case("ll_shrink_unmask", 2, "masked_slots")
    records = run_on_ranks(2, unmask_after_timeout_worker, case, case.num_tokens, str(tmp_path))
    assert len(records[0]) == 2, records[0]
