"""Multi-node mode of the reference backend (DeepEP V1's internode semantics) with nodes simulated on
one host through ``Settings(ranks_per_node=...)``: 2 nodes x 2 ranks, 4 x 1 and 2 x 4."""

from __future__ import annotations

import pytest
import torch

from .cases import RunOnRanks, make_case
from .naive import make_all_inputs, make_x, naive_combine
from .naive_nodes import Topology, naive_combine_by_node
from .workers_nodes import internode_errors_worker, internode_round_trip_worker, internode_worst_tokens_worker

# (nodes, ranks per node, Config.num_sms (0: the default 20), biases in combine).
LAYOUTS = [(2, 2, 0, 0), (4, 1, 4, 1), (2, 4, 6, 2)]


@pytest.mark.parametrize(
    ("num_nodes", "ranks_per_node", "num_sms", "num_biases"),
    LAYOUTS,
    ids=[f"{n}x{p}-sms{s or 20}-bias{b}" for n, p, s, b in LAYOUTS],
)
def test_internode_round_trip(
    run_on_ranks: RunOnRanks, num_nodes: int, ranks_per_node: int, num_sms: int, num_biases: int
) -> None:
    world_size = num_nodes * ranks_per_node
    case = make_case("internode_round_trip", world_size, "masked_slots", num_tokens=20, drop_prob=0.4)
    if ranks_per_node > 1:
        # The case must tell DeepEP's per-node bf16 partials apart from one flat rounding.
        topology = Topology(world_size, ranks_per_node, 1, case.num_experts)
        differs = False
        for rank, inputs in enumerate(make_all_inputs(case, world_size)):
            biases = tuple(make_x(case, rank, salt=10 + i) for i in range(num_biases))
            by_node, _ = naive_combine_by_node(inputs, topology, biases)
            flat, _ = naive_combine(inputs, world_size, case.num_experts, biases=biases)
            differs |= not torch.equal(by_node, flat)
        assert differs, "the per-node and flat sums agree everywhere: the case proves nothing"
    run_on_ranks(world_size, internode_round_trip_worker, case, ranks_per_node, num_sms, num_biases)


def test_internode_skewed_routing(run_on_ranks: RunOnRanks) -> None:
    """An empty rank and tokens of one node only: empty channels, empty RDMA peers."""
    case = make_case("internode_skewed", 4, "empty_rank_1")
    run_on_ranks(4, internode_round_trip_worker, case, 2, 8, 0)
    case = make_case("internode_hot", 4, "hot_rank_0")
    run_on_ranks(4, internode_round_trip_worker, case, 2, 0, 1)


def test_internode_num_worst_tokens(run_on_ranks: RunOnRanks) -> None:
    case = make_case("internode_worst", 4, "masked_slots")
    run_on_ranks(4, internode_worst_tokens_worker, case, 2, case.num_tokens * 4 + 3)


def test_internode_argument_errors(run_on_ranks: RunOnRanks) -> None:
    case = make_case("internode_errors", 4, "balanced")
    for errors in run_on_ranks(4, internode_errors_worker, case):
        assert [line.split(":")[0] for line in errors] == [
            "ranks_per_node",
            "missing",
            "shape",
            "num_sms",
            "handle",
            "handle kind",
        ], errors
        text = "\n".join(errors)
        assert "EPCOMM_RANKS_PER_NODE" in text, text
        assert "divide the group size 4; got 3" in text, text
        assert "num_tokens_per_rdma_rank is required in multi-node mode" in text, text
        assert "num_tokens_per_rdma_rank" in errors[2], errors[2]
        assert "[2]" in errors[2], errors[2]
        assert "config.num_sms differs" in text, text
        assert "handle differs" in errors[4], errors[4]
        assert "InternodeHandle" in errors[5], errors[5]
