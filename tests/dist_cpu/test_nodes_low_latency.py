"""Low-latency mode in a multi-node ``Buffer`` (nodes simulated with ``Settings(ranks_per_node=...)``
and ``num_rdma_bytes > 0``) on the reference backend, against the naive oracle: 2 nodes x 2 ranks,
4 x 1 and 2 x 4 (1 x 4, one node, for the mixed-mode call). The workers are those of
``test_low_latency``, given the ranks per node."""

from __future__ import annotations

import pytest

from .cases import RunOnRanks, make_case
from .workers_low_latency import (
    combine_variant_worker,
    dispatch_combine_worker,
    normal_and_low_latency_worker,
    two_outstanding_worker,
)

# (nodes, ranks per node)
LAYOUTS = [(2, 2), (4, 1), (2, 4)]
LAYOUT_IDS = [f"{n}x{p}" for n, p in LAYOUTS]
SPARE_CAPACITY = 8


@pytest.mark.parametrize(("num_nodes", "ranks_per_node"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("mode", ["bf16", "fp8", "fp8_round_scale", "fp8_ue8m0"])
def test_nodes_dispatch_combine(
    run_on_ranks: RunOnRanks, num_nodes: int, ranks_per_node: int, mode: str
) -> None:
    world_size = num_nodes * ranks_per_node
    case = make_case(f"ll_nodes_{mode}_{ranks_per_node}", world_size, "masked_slots", hidden=640)
    run_on_ranks(
        world_size,
        dispatch_combine_worker,
        case,
        case.num_tokens + SPARE_CAPACITY,
        mode,
        "",
        "",
        ranks_per_node,
    )


@pytest.mark.parametrize(("num_nodes", "ranks_per_node"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("variant", ["zero_copy", "out", "recv_hook"])
def test_nodes_combine_variants(
    run_on_ranks: RunOnRanks, num_nodes: int, ranks_per_node: int, variant: str
) -> None:
    world_size = num_nodes * ranks_per_node
    case = make_case(f"ll_nodes_variant_{ranks_per_node}", world_size, "masked_slots")
    run_on_ranks(
        world_size, combine_variant_worker, case, case.num_tokens + SPARE_CAPACITY, variant, ranks_per_node
    )


@pytest.mark.parametrize(("num_nodes", "ranks_per_node"), LAYOUTS, ids=LAYOUT_IDS)
def test_nodes_two_outstanding_and_clean(
    run_on_ranks: RunOnRanks, num_nodes: int, ranks_per_node: int
) -> None:
    world_size = num_nodes * ranks_per_node
    case = make_case(f"ll_nodes_two_{ranks_per_node}", world_size, "hot_rank_0")
    run_on_ranks(
        world_size, two_outstanding_worker, case, case.num_tokens + SPARE_CAPACITY, ranks_per_node, True
    )


@pytest.mark.parametrize(
    ("num_nodes", "ranks_per_node", "odd_rank"), [(2, 2, 1), (4, 1, 0), (1, 4, 2)], ids=["2x2", "4x1", "1x4"]
)
def test_nodes_normal_and_low_latency_modes(
    run_on_ranks: RunOnRanks, num_nodes: int, ranks_per_node: int, odd_rank: int
) -> None:
    """Both modes in one multi-node ``Buffer``; a rank in a normal-mode call while its peers are in
    a low-latency call is an ``InconsistentCallError`` on every rank, at once, naming the operation."""
    world_size = num_nodes * ranks_per_node
    case = make_case("ll_nodes_modes", world_size, "masked_slots")
    outcomes = run_on_ranks(
        world_size,
        normal_and_low_latency_worker,
        case,
        case.num_tokens + SPARE_CAPACITY,
        ranks_per_node,
        odd_rank,
    )
    for rank, outcome in enumerate(outcomes):
        assert outcome["kind"] == "InconsistentCallError", f"rank {rank}: {outcome}"
        assert "operation differs" in outcome["message"], outcome["message"]
        assert outcome["elapsed_s"] < 5.0, f"rank {rank} waited {outcome['elapsed_s']:.1f} s"
