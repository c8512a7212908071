"""``checkpoint_segments``: the rows each (source, range) of a checkpointed push fills at a receiver,
against the receive order DeepEP defines (``rows_in_order``)."""

from __future__ import annotations

import pytest
import torch

from epcomm.backends.nvlink.copy_engine import Segment, checkpoint_segments
from epcomm.layout import rows_in_order


def _table_row(in_rank: torch.Tensor, num_experts: int, checkpoints: int) -> list[int]:
    """One source's counts row as ``dispatch_counts_kernel`` writes it (per-expert counts are not
    used by the segments: arbitrary)."""
    size = -(-in_rank.size(0) // checkpoints)
    below = [in_rank[: k * size].sum(0) for k in range(1, checkpoints)]
    return [int(v) for v in torch.cat([in_rank.sum(0), torch.arange(num_experts), *below])]


@pytest.mark.parametrize("checkpoints", [1, 2, 4, 8])
@pytest.mark.parametrize("num_ranks", [1, 3, 4])
def test_segments_cover_each_range(checkpoints: int, num_ranks: int) -> None:
    torch.manual_seed(checkpoints * 10 + num_ranks)
    num_experts = 2 * num_ranks
    routings = [torch.rand(int(torch.randint(0, 40, ())), num_ranks) < 0.5 for _ in range(num_ranks)]
    table = [_table_row(r, num_experts, checkpoints) for r in routings]
    counts = torch.tensor([row[:num_ranks] for row in table])
    prefix = counts.cumsum(0)
    for me in range(num_ranks):
        segments = checkpoint_segments(table, me, num_ranks, num_experts, checkpoints)
        assert segments == sorted(segments), "not in completion order"
        covered: list[int] = []
        for seg in segments:
            assert seg.end > seg.begin, "empty segment"
            covered.extend(range(seg.begin, seg.end))
        assert sorted(covered) == list(range(int(counts[:, me].sum()))), "rows not covered exactly once"
        for source, routing in enumerate(routings):
            before = prefix[source - 1] if source > 0 else torch.zeros(num_ranks, dtype=torch.int64)
            rows = rows_in_order(routing, before.to(torch.int32))[:, me]
            size = -(-routing.size(0) // checkpoints)
            for k in range(checkpoints):
                want = sorted(int(r) for r in rows[k * size : (k + 1) * size] if r >= 0)
                got = [
                    r
                    for seg in segments
                    if (seg.source, seg.checkpoint) == (source, k)
                    for r in range(seg.begin, seg.end)
                ]
                assert got == want, (me, source, k)


def test_segment_fields() -> None:
    # 2 ranks, 2 experts, 2 checkpoints; rows: [per rank (2), per expert (2), below checkpoint 1 (2)].
    # Source 0 sends rank 1 one token, past checkpoint 1; source 1 sends it 3, 2 below checkpoint 1.
    table = [[2, 1, 0, 0, 1, 0], [0, 3, 0, 0, 0, 2]]
    assert checkpoint_segments(table, 1, 2, 2, 2) == [
        Segment(0, 1, 1, 3),
        Segment(1, 0, 0, 1),
        Segment(1, 1, 3, 4),
    ]
