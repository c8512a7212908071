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
