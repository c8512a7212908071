"""``benchmarks/model_multinode.py`` counts, without processes, the bytes that
``Buffer.last_call_bytes()`` reports after real multi-node calls of the reference backend (nodes
simulated with ``Settings(ranks_per_node=...)``), for the same group-limited routing; and, in
low-latency mode, the messages between ranks that the reference backend's low-latency dispatch
delivers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from .cases import RunOnRanks
from .workers_model import low_latency_delivery_worker, model_calls_worker

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from model_multinode import (
    LowLatencySpec,
    ModelSpec,
    cross_node_messages,
    low_latency_messages,
    low_latency_routing,
    low_latency_rows,
    model_call_bytes,
    model_rows,
)

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


# (nodes, ranks per node, node groups per token: None = plain top-k)
LOW_LATENCY_SPECS = [(2, 2, None), (2, 2, 1)]


@pytest.mark.parametrize(
    ("num_nodes", "ranks_per_node", "max_nodes"),
    LOW_LATENCY_SPECS,
    ids=[f"{n}x{p}-{'top-k' if g is None else f'limit{g}'}" for n, p, g in LOW_LATENCY_SPECS],
)
def test_low_latency_model_equals_reference_delivery(
    run_on_ranks: RunOnRanks, num_nodes: int, ranks_per_node: int, max_nodes: int | None
) -> None:
    """The model's messages per (token, expert) and per (token, destination rank), between every
    pair of ranks and through every NIC, are what the reference backend's low-latency dispatch
    delivers (``recv_layout_range`` / ``recv_count`` per source rank, distinct ``recv_src_info``)."""
    world_size = num_nodes * ranks_per_node
    spec = LowLatencySpec(
        num_ranks=world_size,
        ranks_per_node=ranks_per_node,
        num_tokens=24,
        hidden=256,
        num_experts=16,
        num_topk=4,
        max_nodes_per_token=max_nodes,
        seed=11,
    )
    delivered = run_on_ranks(world_size, low_latency_delivery_worker, spec)
    # delivered[destination] = (per source: (token, expert) rows, distinct tokens)
    got_expert = torch.tensor([d[0] for d in delivered], dtype=torch.int64).T
    got_rank = torch.tensor([d[1] for d in delivered], dtype=torch.int64).T
    routing = [low_latency_routing(spec, rank) for rank in range(world_size)]
    per_expert, per_rank = low_latency_messages(routing, spec.num_experts, world_size)
    assert torch.equal(got_expert, per_expert), (
        f"delivered {got_expert.tolist()}, model {per_expert.tolist()}"
    )
    assert torch.equal(got_rank, per_rank), f"delivered {got_rank.tolist()}, model {per_rank.tolist()}"
    topology = spec.topology
    for got, want in ((got_expert, per_expert), (got_rank, per_rank)):
        for a, b in zip(cross_node_messages(got, topology), cross_node_messages(want, topology), strict=True):
            assert torch.equal(a, b), (a.tolist(), b.tolist())
    # Per node: what each node's ranks send across nodes, from the delivered counts.
    node = torch.arange(world_size) // ranks_per_node
    for n in range(num_nodes):
        sent = int(got_expert[node == n][:, node != n].sum())
        assert sent == int(cross_node_messages(per_expert, topology)[0][node == n].sum()), n
    # Dedup: never more messages per rank than per expert; fewer whenever a token has two experts
    # on one rank (4 experts per rank, top-4: some token does).
    assert bool((per_rank <= per_expert).all())
    assert int(per_rank.sum()) < int(per_expert.sum())
    rows = low_latency_rows(spec)
    assert rows[0].expert_msgs == pytest.approx(
        float(cross_node_messages(per_expert, topology)[0].double().mean())
    )
    if max_nodes == 1:  # each token stays within one node's experts
        for src, idx in enumerate(routing):
            nodes = torch.div(idx, spec.num_experts // num_nodes, rounding_mode="floor")
            assert bool((nodes == nodes[:, :1]).all()), src
