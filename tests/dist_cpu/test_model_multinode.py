"""``benchmarks/model_multinode.py`` counts, without processes, the bytes that
``Buffer.last_call_bytes()`` reports after real multi-node calls of the reference backend (nodes
simulated with ``Settings(ranks_per_node=...)``), for the same group-limited routing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .cases import RunOnRanks
from .workers_model import model_calls_worker

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from model_multinode import ModelSpec, model_call_bytes, model_rows

# (nodes, ranks per node, node groups per token, FP8 dispatch, combine with weights)
SPECS = [(2, 2, 2, True, False), (2, 4, 1, True, True), (2, 4, 2, False, False)]


@pytest.mark.parametrize(
    ("num_nodes", "ranks_per_node", "max_nodes", "fp8", "weights"),
    SPECS,
    ids=[f"{n}x{p}-limit{g}-{'fp8' if f else 'bf16'}{'-w' if w else ''}" for n, p, g, f, w in SPECS],
)
def test_model_equals_reference_counters(
    run_on_ranks: RunOnRanks, num_nodes: int, ranks_per_node: int, max_nodes: int, fp8: bool, weights: bool
) -> None:
    world_size = num_nodes * ranks_per_node
    spec = ModelSpec(
        num_ranks=world_size,
        ranks_per_node=ranks_per_node,
        num_tokens=48,
        hidden=256,
        num_experts=16,
        num_topk=4,
        max_nodes_per_token=max_nodes,
        seed=7,
        dispatch_fp8=fp8,
        combine_weights=weights,
    )
    measured = run_on_ranks(world_size, model_calls_worker, spec)
    modelled = model_call_bytes(spec)
    for rank, (got, want) in enumerate(zip(measured, modelled, strict=True)):
        assert got == want, f"rank {rank}: Buffer.last_call_bytes() {got}, model {want}"
    # The hierarchical scheme moves the minimum across nodes, and never more than the flat one.
    for row in model_rows(spec):
        assert row.hier_mb == pytest.approx(row.min_mb), row
        assert row.hier_mb <= row.flat_mb, row
    if max_nodes == 1:  # each token needs one node: at most one row of it crosses
        assert all(d.inter_node <= spec.num_tokens * d.row_bytes for d, _ in modelled), modelled
