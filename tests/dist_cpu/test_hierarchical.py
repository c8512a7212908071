"""The hierarchical multi-node algorithm (each token crosses to a node once, forwarded inside the
node; partials reduced inside the node) over torch.distributed legs, against the reference
backend's multi-node mode: equal bit for bit, and the legs send exactly the scheme's bytes."""

from __future__ import annotations

import pytest

from epcomm.testing import parallel_launch

from .cases import RunOnRanks
from .workers_hierarchical import (
    SETTINGS,
    hierarchical_against_reference,
    hierarchical_async_calls,
    hierarchical_inconsistent_call,
    hierarchical_skipped_dispatch,
)


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


@pytest.mark.parametrize(("world_size", "ranks_per_node"), [(4, 2)])
def test_async_calls_equal_plain_calls(
    run_on_ranks: RunOnRanks, world_size: int, ranks_per_node: int
) -> None:
    results = run_on_ranks(world_size, hierarchical_async_calls, ranks_per_node)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])


def test_a_skipped_dispatch_is_a_named_timeout() -> None:
    # 2 nodes of 2; rank 1 skips. Ranks 0 (its node) and 3 (its RDMA peer) wait for it and raise
    # PeerTimeoutError naming the dispatch and rank 1, within a few timeouts. Rank 2 waits for one of
    # them, and a gloo wait that times out closes every connection of its group: when rank 0's or
    # 3's timeout comes first, rank 2 sees that peer's connection close (PeerLostError naming it)
    # before its own timeout. Fresh processes: the timed-out messages leave the connections closed.
    outcomes = parallel_launch(4, hierarchical_skipped_dispatch, 2, 1, backend="gloo", timeout_s=120)
    assert outcomes[1] == {"kind": "skipped"}
    for rank in (0, 2, 3):
        outcome = outcomes[rank]
        kinds = ("PeerTimeoutError", "PeerLostError") if rank == 2 else ("PeerTimeoutError",)
        assert outcome["kind"] in kinds, (rank, outcome)
        assert outcome["message"].startswith("dispatch"), outcome["message"]
        assert outcome["seconds"] < 10, outcome
    for rank in (0, 3):
        assert "[1]" in outcomes[rank]["message"], outcomes[rank]["message"]
    if outcomes[2]["kind"] == "PeerLostError":
        assert "lost rank(s) [0]" in outcomes[2]["message"] or "lost rank(s) [3]" in outcomes[2]["message"]
