"""Multi-GPU tier: the NVLink backend's normal mode against the reference backend (same processes)."""

from __future__ import annotations

import pytest
import torch
from nvlink_workers import (
    compare_normal_mode,
    inconsistent_dispatch,
    inconsistent_push_call,
    skip_one_combine,
    skip_one_dispatch,
)
from placement import NUM_GPUS, PLACEMENTS, backend_or_skip

from epcomm.testing import parallel_launch

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

SETTINGS = [
    {"seed": 1, "num_tokens": 128, "hidden": 256, "num_experts": 16, "num_topk": 4},
    {"seed": 2, "num_tokens": 300, "hidden": 7168, "num_experts": 32, "num_topk": 8, "bias": True},
    {"seed": 3, "num_tokens": 200, "hidden": 1024, "num_experts": 16, "num_topk": 8, "fp8": True},
    {"seed": 4, "num_tokens": 100, "hidden": 512, "num_experts": 8, "num_topk": 6, "zero_tokens_rank": 1},
    {
        "seed": 5,
        "num_tokens": 64,
        "hidden": 256,
        "num_experts": 16,
        "num_topk": 2,
        "num_worst_tokens": "max",
    },
    {"seed": 6, "num_tokens": 96, "hidden": 384, "num_experts": 8, "num_topk": 3, "alignment": 4},
]


def _assert_matches_reference(
    world_size: int, placement: str, settings: list[dict], options: dict | None = None
) -> None:
    """Every setting on the NVLink backend (its ``Settings`` fields from ``options``) against the
    reference backend in the same processes (``compare_normal_mode``): no check may fail on any rank."""
    backend = backend_or_skip(world_size, placement)
    results = parallel_launch(
        world_size, compare_normal_mode, settings, options, backend=backend, timeout_s=900
    )
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16])  # 1: every row local; 16: past DeepEP's 8
def test_nvlink_matches_reference(world_size: int, placement: str) -> None:
    _assert_matches_reference(world_size, placement, SETTINGS if world_size <= 8 else SETTINGS[:3])


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_kernel_knobs(placement: str) -> None:
    """The kernel knobs of ``Settings`` (rows and warps of the push, tokens and warps of the
    reduce) change speed, never results."""
    options = {"push_rows": 1, "push_warps": 8, "reduce_tokens": 2, "reduce_warps": 4}
    _assert_matches_reference(4, placement, SETTINGS[:4], options)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_skipped_call_raises_named_timeout(placement: str) -> None:
    backend = backend_or_skip(2, placement)
    results = parallel_launch(2, skip_one_dispatch, 3.0, backend=backend, timeout_s=120)
    assert results[0].startswith("raised"), results[0]
    for expected in ("dispatch", "rank 0", "[1]"):
        assert expected in results[0], results[0]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_skipped_combine_raises_named_timeout(placement: str) -> None:
    """A rank skips a combine: the other's combine ends within its bounded waits and its next call
    raises naming combine and the missing rank."""
    backend = backend_or_skip(2, placement)
    results = parallel_launch(2, skip_one_combine, 2.0, backend=backend, timeout_s=120)
    assert results[0].startswith("raised"), results[0]
    for expected in ("combine", "rank 0", "[1]"):
        assert expected in results[0], results[0]
    ended = float(results[0].split("after ")[1].split("s:")[0])
    assert ended < 2.0 * 5, results[0]


@pytest.mark.skipif(NUM_GPUS < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("num_tokens", "num_topk", "num_experts", "num_ranks", "per_node"),
    [(4096, 8, 256, 4, None), (4096, 8, 256, 8, 4), (130, 4, 32, 2, 1), (0, 8, 16, 4, None)],
)
def test_layout_kernel(
    num_tokens: int, num_topk: int, num_experts: int, num_ranks: int, per_node: int | None
) -> None:
    """kernels/layout.py (the NVLink backend's get_dispatch_layout) against the torch definition."""
    from epcomm.kernels.layout import launch_dispatch_layout
    from epcomm.layout import compute_dispatch_layout

    torch.manual_seed(num_tokens + num_ranks)
    idx = torch.randint(-1, num_experts, (num_tokens, num_topk), device="cuda")
    for _ in range(2):  # the second call reuses the cached launch path
        got = launch_dispatch_layout(idx, num_experts, num_ranks, per_node)
        want = compute_dispatch_layout(idx, num_experts, num_ranks, per_node)
        for got_part, want_part in zip(got, want):
            assert (got_part is None and want_part is None) or torch.equal(got_part, want_part)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("row", ["hidden", "num_topk", "fp8_vs_bf16", "num_experts"])
def test_inconsistent_dispatch_raises_on_both_ranks(placement: str, row: str) -> None:
    """Rank 1 dispatches with another ``row``: the count kernel sees the fingerprints differ and
    numbers no row (nothing is pushed); both ranks raise ``InconsistentCallError`` naming both, and a
    matching dispatch and combine afterwards are right."""
    backend = backend_or_skip(2, placement)
    results = parallel_launch(2, inconsistent_dispatch, row, backend=backend, timeout_s=300)
    for rank, result in enumerate(results):
        message = result["message"]
        assert message is not None, f"rank {rank}: no InconsistentCallError"
        assert f"rank {rank}:" in message, message
        assert f"rank {1 - rank}:" in message, message
        assert result["recovered"], f"rank {rank}: the calls after the error were wrong"


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_inconsistent_worst_tokens_dispatch_raises_at_the_next_call(placement: str) -> None:
    """``num_worst_tokens`` (no CPU synchronization): the differing dispatch delivers no row (every
    ``recv_topk_idx`` is -1) and the next call raises on both ranks."""
    backend = backend_or_skip(2, placement)
    results = parallel_launch(2, inconsistent_dispatch, "worst_hidden", backend=backend, timeout_s=300)
    for rank, result in enumerate(results):
        assert result["message"] is None, result["message"]
        assert result["worst_idx_max"] == -1, f"rank {rank}: rows delivered despite the difference"
        assert result["next_message"] is not None, f"rank {rank}: the next call raised nothing"
        assert "hidden differs" in result["next_message"], result["next_message"]
        assert result["recovered"], f"rank {rank}: the calls after the error were wrong"


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_dispatch_against_combine(placement: str) -> None:
    """Rank 0 dispatches while rank 1 combines: both write their fingerprint into the same place.
    Rank 0's count kernel sees rank 1's combine and raises when it reads the table; rank 1's
    combine (no host synchronization) writes nothing, records the difference and returns, and rank
    1's next call raises."""
    backend = backend_or_skip(2, placement)
    results = parallel_launch(2, inconsistent_dispatch, "call_order", backend=backend, timeout_s=300)
    assert results[0]["message"] is not None, "rank 0: no InconsistentCallError"
    assert "operation differs" in results[0]["message"], results[0]["message"]
    assert results[1]["message"] is None, results[1]["message"]
    assert results[1]["next_message"] is not None, "rank 1: the next call raised nothing"
    assert "operation differs" in results[1]["next_message"], results[1]["next_message"]
    assert all(result["recovered"] for result in results), results


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    ("row", "field"),
    [
        ("cached_hidden", "hidden differs"),
        ("cached_vs_combine", "operation differs"),
        ("combine_num_topk", "num_topk"),
        ("combine_other_handle", "handle differs"),
    ],
)
def test_inconsistent_cached_dispatch_or_combine_raises_at_the_next_call(
    placement: str, row: str, field: str
) -> None:
    """Rank 1's cached dispatch or combine differs from rank 0's: the push's entry barrier carries
    the fingerprints, so neither rank writes a row, what the call returns holds no peer's row, and
    (no host synchronization in these calls) the next call raises on both ranks, naming both."""
    backend = backend_or_skip(2, placement)
    results = parallel_launch(2, inconsistent_push_call, row, backend=backend, timeout_s=300)
    for rank, result in enumerate(results):
        assert result["message"] is None, result["message"]
        assert result["empty"], f"rank {rank}: the differing call returned rows"
        message = result["next_message"]
        assert message is not None, f"rank {rank}: the next call raised nothing"
        assert f"rank {rank}:" in message, message
        assert f"rank {1 - rank}:" in message, message
        assert field in message, message
        assert len(message) <= 300, message
        assert "\n" not in message, message
        assert result["recovered"], f"rank {rank}: the calls after the error were wrong"
