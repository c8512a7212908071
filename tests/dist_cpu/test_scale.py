"""Scale and multi-node layouts on gloo: 8 ranks (EP8), and 4 ranks as 2x2, 4x1 and 1x4 nodes.

Nothing may assume at most 4 ranks or a single node: 8 processes run a normal-mode and a
low-latency (bf16 and FP8) round trip against the naive oracle, and 4 processes with
``LOCAL_WORLD_SIZE`` below 4 get per-node layout counts and still dispatch and combine correctly.
"""

from __future__ import annotations

import pytest

from .cases import RunOnRanks, make_case
from .naive import make_all_inputs, naive_layout
from .workers_low_latency import dispatch_combine_worker
from .workers_normal import layout_dispatch_combine_worker
from .workers_scale import (
    gather_bytes_worker,
    low_latency_fp8_round_trip_worker,
    multi_node_worker,
    naive_tokens_per_node,
)

EP8 = 8
# 32 tokens per rank, hidden 256 (two FP8 scale groups), 64 experts (8 per rank), top-8.
EP8_SHAPE = {"num_tokens": 32, "hidden": 256, "experts_per_rank": 8, "num_topk": 8}


def test_ep8_normal_round_trip(run_on_ranks: RunOnRanks) -> None:
    case = make_case("ep8_normal", EP8, "masked_slots", **EP8_SHAPE)
    run_on_ranks(EP8, layout_dispatch_combine_worker, case)


def test_ep8_low_latency_bf16_round_trip(run_on_ranks: RunOnRanks) -> None:
    case = make_case("ep8_low_latency", EP8, "masked_slots", **EP8_SHAPE)
    run_on_ranks(EP8, dispatch_combine_worker, case, case.num_tokens + 8, "bf16")


@pytest.mark.parametrize("mode", ["fp8", "fp8_ue8m0"])
def test_ep8_low_latency_fp8_round_trip(run_on_ranks: RunOnRanks, mode: str) -> None:
    case = make_case("ep8_low_latency_fp8", EP8, "masked_slots", **EP8_SHAPE)
    run_on_ranks(EP8, low_latency_fp8_round_trip_worker, case, case.num_tokens, mode)


# (nodes, ranks per node) of 4 ranks.
LAYOUTS = [(2, 2), (4, 1), (1, 4)]


@pytest.mark.parametrize("scenario", ["masked_slots", "hot_rank_0", "empty_rank_1"])
@pytest.mark.parametrize(("num_nodes", "ranks_per_node"), LAYOUTS, ids=[f"{n}x{r}" for n, r in LAYOUTS])
def test_multi_node_layout(
    run_on_ranks: RunOnRanks, num_nodes: int, ranks_per_node: int, scenario: str
) -> None:
    world_size = num_nodes * ranks_per_node
    overrides = {"drop_prob": 0.6} if scenario == "masked_slots" else {}
    case = make_case("multi_node_layout", world_size, scenario, **overrides)
    if scenario == "masked_slots" and num_nodes == 2:
        # The case must tell per-node counts apart from per-rank sums and from the token count.
        all_inputs = make_all_inputs(case, world_size)
        per_node = [
            naive_tokens_per_node(inputs.topk_idx, case.num_experts, world_size, ranks_per_node)
            for inputs in all_inputs
        ]
        per_rank = [
            naive_layout(inputs.topk_idx, case.num_experts, world_size).num_tokens_per_rank
            for inputs in all_inputs
        ]
        assert any(
            nodes[n] < sum(ranks[n * ranks_per_node : (n + 1) * ranks_per_node])
            for nodes, ranks in zip(per_node, per_rank, strict=True)
            for n in range(num_nodes)
        ), "no token has two experts on different ranks of one node"
        assert any(count < case.num_tokens for nodes in per_node for count in nodes), (
            "every token reaches every node"
        )
    run_on_ranks(world_size, multi_node_worker, case, ranks_per_node)


def test_all_gather_bytes(run_on_ranks: RunOnRanks) -> None:
    """The byte gather that exchanges CUDA IPC handles when ranks share one GPU."""
    want = [bytes(range(rank * 3)) for rank in range(4)]
    assert run_on_ranks(4, gather_bytes_worker) == [want] * 4
