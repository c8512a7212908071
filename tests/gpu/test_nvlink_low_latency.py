"""Multi-GPU tier: NVLink low-latency kernels against the reference backend, graph replay, shrink, timeouts."""

from __future__ import annotations

import pytest
from ll_workers import (
    compare_low_latency,
    graph_replay,
    inconsistent_low_latency,
    shrink_drops,
    shrink_masked_rank,
    skip_low_latency,
    two_outstanding,
)
from placement import NUM_GPUS, PLACEMENTS, backend_or_skip

from epcomm.testing import parallel_launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multigpu,
    pytest.mark.skipif(NUM_GPUS < 1, reason="needs a CUDA GPU"),
]

SETTINGS = [
    {"seed": 1, "capacity": 128, "hidden": 7168, "num_experts": 64, "num_topk": 8},
    {"seed": 7, "capacity": 64, "hidden": 1024, "num_experts": 32, "num_topk": 4, "duplicate": True},
    {"seed": 2, "capacity": 128, "hidden": 7168, "num_experts": 64, "num_topk": 8, "fp8": True},
    {"seed": 3, "capacity": 64, "hidden": 2048, "num_experts": 32, "num_topk": 6, "fp8": True, "round": True},
    {
        "seed": 4,
        "capacity": 64,
        "hidden": 640,
        "num_experts": 16,
        "num_topk": 4,
        "fp8": True,
        "round": True,
        "ue8m0": True,
        "num_tokens": 37,
    },
    {
        "seed": 5,
        "capacity": 100,
        "hidden": 384,
        "num_experts": 32,
        "num_topk": 16,
        "num_tokens": 3,
        "hook": True,
    },
]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16])  # 16: past DeepEP's 8
def test_low_latency_matches_reference(world_size: int, placement: str) -> None:
    backend = backend_or_skip(world_size, placement)
    settings = SETTINGS if world_size <= 8 else SETTINGS[1:3]
    results = parallel_launch(world_size, compare_low_latency, settings, backend=backend, timeout_s=900)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_cuda_graph_replay(world_size: int, placement: str) -> None:
    backend = backend_or_skip(world_size, placement)
    results = parallel_launch(
        world_size, graph_replay, 64, 1024, 8 * world_size, 4, backend=backend, timeout_s=600
    )
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_shrink_mode_skips_masked_rank(placement: str) -> None:
    world_size = min(NUM_GPUS, 4) if placement == "nccl" else 4
    backend = backend_or_skip(max(world_size, 2), placement)
    results = parallel_launch(world_size, shrink_masked_rank, backend=backend, timeout_s=300)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_skipped_low_latency_call_raises_named_timeout(placement: str) -> None:
    backend = backend_or_skip(2, placement)
    results = parallel_launch(2, skip_low_latency, 3.0, backend=backend, timeout_s=120)
    assert results[0].startswith("raised"), results[0]
    for expected in ("low_latency_dispatch", "rank 0", "[1]"):
        assert expected in results[0], results[0]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_two_outstanding_dispatches_and_wait_stats(placement: str) -> None:
    world_size = min(NUM_GPUS, 4) if placement == "nccl" else 4
    backend = backend_or_skip(max(world_size, 2), placement)
    results = parallel_launch(world_size, two_outstanding, backend=backend, timeout_s=300)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    ("world_size", "drops"),
    [(2, {1: "dispatch"}), (4, {1: "dispatch"}), (8, {1: "dispatch", 3: "combine", 5: "clean"})],
)
def test_shrink_mode_masks_dead_ranks_by_itself(
    world_size: int, drops: dict[int, str], placement: str
) -> None:
    backend = backend_or_skip(world_size, placement)
    results = parallel_launch(world_size, shrink_drops, drops, 2, 2.0, backend=backend, timeout_s=300)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    ("row", "field"),
    [
        ("ll_hidden", "hidden differs"),
        ("ll_hidden_hook", "hidden differs"),
        ("ll_capacity", "capacity differs"),
        ("ll_fp8_vs_bf16", "x format differs"),
        ("ll_num_experts", "num_experts differs"),
        ("ll_other_handle", "handle differs"),
    ],
)
def test_inconsistent_low_latency_call_raises_at_the_next_call(placement: str, row: str, field: str) -> None:
    """Rank 1's low-latency call differs from rank 0's: the fingerprints travel with the count and
    the flag, each receive phase takes nothing from the peer and records the difference, and (no
    host synchronization in this mode) the next call raises on both ranks, naming both; a matching
    dispatch afterwards is right."""
    backend = backend_or_skip(2, placement)
    results = parallel_launch(2, inconsistent_low_latency, row, backend=backend, timeout_s=300)
    for rank, result in enumerate(results):
        assert result["message"] is None, result["message"]
        if result["nothing_from_peer"] is not None:
            assert result["nothing_from_peer"], f"rank {rank}: rows received from the differing peer"
        message = result["next_message"]
        assert message is not None, f"rank {rank}: the next call raised nothing"
        assert f"rank {rank}:" in message, message
        assert f"rank {1 - rank}:" in message, message
        assert field in message, message
        assert len(message) <= 300, message
        assert result["recovered"], f"rank {rank}: the calls after the error were wrong"
