"""The low-latency symmetric layout: flags, dispatch counts and staging areas do not overlap, and
the size hint is the layout's size."""

from __future__ import annotations

import pytest

from epcomm.config import NUM_MAX_NVL_PEERS
from epcomm.ll_layout import (
    MAX_LOW_LATENCY_TOPK,
    LowLatencyLayout,
    count_offset,
    flag_offset,
    low_latency_rdma_size_hint,
)


@pytest.mark.parametrize(
    ("num_ranks", "capacity", "hidden", "num_topk"), [(2, 1, 128, 1), (4, 128, 7168, 8), (8, 256, 640, 32)]
)
def test_areas_are_disjoint_and_aligned(num_ranks: int, capacity: int, hidden: int, num_topk: int) -> None:
    layout = LowLatencyLayout(num_ranks, capacity, hidden, num_topk)
    words: set[int] = set()
    areas = [
        range(flag_offset(phase, parity), flag_offset(phase, parity) + NUM_MAX_NVL_PEERS)
        for phase in (0, 1)
        for parity in (0, 1)
    ]
    areas += [range(count_offset(parity), count_offset(parity) + NUM_MAX_NVL_PEERS) for parity in (0, 1)]
    for parity in (0, 1):
        assert layout.dispatch_offset(parity) % 32 == 0
        assert layout.combine_offset(parity) % 32 == 0
        areas.append(
            range(layout.dispatch_offset(parity), layout.dispatch_offset(parity) + layout.dispatch_words)
        )
        areas.append(
            range(layout.combine_offset(parity), layout.combine_offset(parity) + layout.combine_words)
        )
    for area in areas:
        assert not words & set(area), area
        words |= set(area)
    assert max(words) < layout.total_words


def test_size_hint_is_the_layout_size() -> None:
    layout = LowLatencyLayout(4, 128, 7168, MAX_LOW_LATENCY_TOPK)
    assert low_latency_rdma_size_hint(128, 7168, 4, 256) == layout.total_words * 4
