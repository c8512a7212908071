"""The hierarchical multi-node algorithm (each token crosses to a node once, forwarded inside the
node; partials reduced inside the node) over torch.distributed legs, against the reference
backend's multi-node mode: equal bit for bit, and the legs send exactly the scheme's bytes."""

from __future__ import annotations

import pytest

from .cases import RunOnRanks
from .workers_hierarchical import SETTINGS, hierarchical_against_reference, hierarchical_inconsistent_call


@pytest.mark.parametrize(("world_size", "ranks_per_node"), [(4, 2), (4, 1), (8, 4), (8, 2)])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_hierarchical_equals_reference(
    run_on_ranks: RunOnRanks, world_size: int, ranks_per_node: int, setting: int
) -> None:
    results = run_on_ranks(world_size, hierarchical_against_reference, ranks_per_node, SETTINGS[setting])
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize(("world_size", "ranks_per_node", "odd_rank"), [(4, 2, 3), (4, 1, 0)])
def test_inconsistent_call_raises_on_every_rank(
    run_on_ranks: RunOnRanks, world_size: int, ranks_per_node: int, odd_rank: int
) -> None:
    outcomes = run_on_ranks(world_size, hierarchical_inconsistent_call, ranks_per_node, odd_rank)
    for rank, outcome in enumerate(outcomes):
        assert outcome["kind"] == "InconsistentCallError", (rank, outcome)
        assert outcome["is_value_error"]
        peer = min(r for r in range(world_size) if r != rank) if rank == odd_rank else odd_rank
        assert f"rank {peer}" in outcome["message"], (rank, outcome["message"])
        assert len(outcome["message"]) <= 300, outcome["message"]
        assert outcome["recovered"], (rank, "the consistent call after the error failed")
