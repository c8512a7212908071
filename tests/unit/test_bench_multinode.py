"""``benchmarks/bench_multinode.summarize``: the dedup check fails a rank whose bytes across nodes
exceed the minimum, passes one at the minimum and reports a backend without counters as n/a."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_multinode import BenchSpec, RankResult, summarize
from epcomm.traffic import CallBytes

SPEC = BenchSpec("reference", 2, 1, 4, 128, 8, 2, 2, True, 0, 1, 0, 1 << 20)


def _result(rank: int, inter_rows: int, minimum_rows: int) -> RankResult:
    calls = {op: CallBytes(op, 10, inter_rows * 10, 0, inter_rows * 20, 0) for op in ("dispatch", "combine")}
    return RankResult(
        rank,
        {"dispatch": 1.0, "combine": 2.0},
        dict(calls),
        {"dispatch": minimum_rows, "combine": minimum_rows},
    )


def test_dedup_check() -> None:
    _, records = summarize(SPEC, [_result(0, 3, 3), _result(1, 2, 2)])
    assert [r["dedup_check"] for r in records] == ["PASS", "PASS"]
    _, records = summarize(SPEC, [_result(0, 3, 3), _result(1, 3, 2)])
    assert [r["dedup_check"] for r in records] == ["FAIL", "FAIL"]
    assert records[0]["inter_node_bytes_ranks"] == [30, 30]
    assert records[0]["min_inter_node_bytes_ranks"] == [30, 20]
    none = RankResult(
        0,
        {"dispatch": 1.0, "combine": 2.0},
        {"dispatch": None, "combine": None},
        {"dispatch": 1, "combine": 1},
    )
    table, records = summarize(SPEC, [none, _result(1, 2, 2)])
    assert [r["dedup_check"] for r in records] == ["n/a", "n/a"]
    assert "n/a" in table


def test_low_latency_bytes_count_each_scheme() -> None:
    """2 nodes of 1 rank, 4 experts (2 a rank), 3 tokens a rank, hidden 128: hand-counted bytes."""
    import torch

    from bench_multinode import low_latency_bytes

    spec = BenchSpec("reference", 2, 1, 3, 128, 4, 2, 2, True, 0, 1, 0, 1 << 20)
    topk = [
        torch.tensor([[0, 2], [2, 3], [0, 1]]),  # rank 0: tokens 0 and 1 need rank 1 (1 and 2 experts)
        torch.tensor([[0, 1], [2, 3], [-1, 3]]),  # rank 1: token 0 needs rank 0 (2 experts)
    ]
    message, row = 128 + 4, 256  # FP8 row and one float32 scale; a BF16 row
    counted = low_latency_bytes(topk, spec, 0)
    # Dispatch: 2 messages to rank 1, then 3 top-k rows of 2 ids, the count and the fingerprint.
    assert counted["dispatch"]["epcomm"] == 2 * message + (3 * 2 * 4 + 4 + 32)
    assert counted["dispatch"]["deepep"] == 3 * (128 + 4 + 16)  # (token, expert) pairs on rank 1
    assert counted["dispatch"]["minimum"] == 2 * message  # 2 tokens need the other node
    # Combine: rows back for rank 1's (token, expert) pairs on rank 0: token 0, experts 0 and 1.
    assert counted["combine"]["epcomm"] == counted["combine"]["deepep"] == 2 * row
    assert counted["combine"]["minimum"] == 1 * row  # one partial for that token
