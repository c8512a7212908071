"""The symmetric buffer's map (``backends/nvlink/symmetric_buffer.py``): for any number of ranks the
header and the low-latency areas do not overlap, every area is aligned, every flag array is readable
for a whole wait's lanes, and the low-latency size hint is the layout's size."""

from __future__ import annotations

import itertools

import pytest

from epcomm.backends.nvlink.symmetric_buffer import (
    MAX_EXPERTS,
    MAX_LOW_LATENCY_TOPK,
    CombineRegions,
    DispatchRegions,
    HeaderLayout,
    LowLatencyLayout,
    low_latency_rdma_size_hint,
)
from epcomm.fingerprint import FINGERPRINT_WORDS
from epcomm.kernels.symmetric_peers import flag_block


def _assert_disjoint(areas: list[range], end: int) -> None:
    """No two areas share a word, and all end by ``end`` (sorted intervals: areas of millions of
    words stay cheap)."""
    spans = sorted((area.start, area.stop) for area in areas if len(area))
    for (_, stop), (start, _) in itertools.pairwise(spans):
        assert stop <= start, spans
    assert spans[-1][1] <= end


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 8, 9, 16, 72])
def test_header_areas_are_disjoint_and_aligned(num_ranks: int) -> None:
    header = HeaderLayout(num_ranks, count_table=True)
    block = flag_block(num_ranks)
    assert block >= num_ranks
    assert block & (block - 1) == 0
    _assert_disjoint(
        [
            range(header.flags, header.flags + block),  # a wait reads `block` lanes
            range(header.counter, header.counter + 1),
            range(header.table, header.table + num_ranks * (FINGERPRINT_WORDS + num_ranks + MAX_EXPERTS)),
        ],
        header.payload,
    )
    assert header.payload % 1024 == 0  # 4 KB: the rows' copies keep that alignment
    assert HeaderLayout(num_ranks, count_table=False).payload <= header.payload


@pytest.mark.parametrize(
    ("capacity", "x_words", "scale_words", "num_topk"), [(1, 4, 0, 1), (4096, 3584, 56, 8)]
)
def test_normal_regions_fit_the_row_size(
    capacity: int, x_words: int, scale_words: int, num_topk: int
) -> None:
    payload = 4160
    dispatch = DispatchRegions(payload, capacity, x_words, scale_words, num_topk)
    fields = [dispatch.x, dispatch.scales, dispatch.topk_idx, dispatch.topk_weights, dispatch.src_idx]
    assert all(offset % 32 == 0 for offset in fields)
    end = dispatch.src_idx + capacity
    assert end - payload <= capacity * DispatchRegions.row_words(x_words, scale_words, num_topk) + 8 * 32
    combine = CombineRegions(payload, capacity, x_words, num_topk)
    assert combine.topk_weights % 32 == 0
    end = combine.topk_weights + capacity * num_topk
    assert end - payload <= capacity * CombineRegions.row_words(x_words, num_topk) + 8 * 32


@pytest.mark.parametrize(
    ("num_ranks", "capacity", "hidden", "num_topk"),
    [(2, 1, 128, 1), (4, 128, 7168, 8), (8, 256, 640, 32), (16, 128, 7168, 8), (72, 8, 256, 4)],
)
@pytest.mark.parametrize("put_path", [False, True])
def test_low_latency_areas_are_disjoint_and_aligned(
    num_ranks: int, capacity: int, hidden: int, num_topk: int, put_path: bool
) -> None:
    layout = LowLatencyLayout(num_ranks, capacity, hidden, num_topk, put_path, 3)
    # The put path's flags are uint64 (two words each, read over 2 * flag_block words).
    block = flag_block(num_ranks) * (2 if put_path else 1)
    assert layout.flag_stride >= block
    assert layout.flag_stride % 4 == 0  # 16-byte aligned rows
    areas = [
        range(layout.flags(phase, parity), layout.flags(phase, parity) + block)
        for phase in (0, 1)
        for parity in (0, 1)
    ]
    areas += [range(layout.counts(parity), layout.counts(parity) + block) for parity in (0, 1)]
    for parity in (0, 1):
        assert layout.dispatch_staging(parity) % 32 == 0
        assert layout.combine_staging(parity) % 32 == 0
        areas.append(
            range(layout.dispatch_staging(parity), layout.dispatch_staging(parity) + layout.dispatch_words)
        )
        areas.append(
            range(layout.combine_staging(parity), layout.combine_staging(parity) + layout.combine_words)
        )
        if put_path:
            assert layout.topk(parity) % 32 == 0
            areas.append(range(layout.topk(parity), layout.topk(parity) + num_ranks * capacity * num_topk))
    if put_path:
        areas.append(range(layout.mine(0), layout.mine(0) + 16 + capacity * num_topk))
        areas.append(range(layout.mine(1), layout.mine(1) + 16))
        areas.append(range(layout.dispatch_outbox, layout.dispatch_outbox + capacity * layout.message_words))
        areas.append(
            range(layout.combine_outbox, layout.combine_outbox + 3 * num_ranks * capacity * hidden // 2)
        )
        assert all(offset % 32 == 0 for offset in (layout.mine(0), layout.mine(1), layout.dispatch_outbox))
        assert layout.flags(0, 0) % 2 == 0  # uint64 flags 8-byte aligned
        assert layout.flag_stride % 2 == 0
    _assert_disjoint(areas, layout.total_words)


def test_size_hint_is_the_layout_size() -> None:
    layout = LowLatencyLayout(4, 128, 7168, MAX_LOW_LATENCY_TOPK)
    assert low_latency_rdma_size_hint(128, 7168, 4, 256) == layout.total_words * 4


def test_size_hint_across_nodes_covers_the_put_path() -> None:
    """``across_nodes=True`` sizes the put path's layout (its send copies on top), so a multi-node
    NVSHMEM buffer of that size never grows for calls of those sizes; the plain hint is the
    NVLink layout's."""
    from epcomm.backends.nvlink.symmetric_buffer import LowLatencyLayout, low_latency_rdma_size_hint

    for capacity, hidden, num_ranks, num_experts, num_topk in ((128, 7168, 16, 256, 8), (7, 512, 4, 8, 3)):
        plain = low_latency_rdma_size_hint(capacity, hidden, num_ranks, num_experts)
        across = low_latency_rdma_size_hint(capacity, hidden, num_ranks, num_experts, across_nodes=True)
        put = LowLatencyLayout(capacity=capacity, hidden=hidden, num_ranks=num_ranks, num_topk=num_topk,
                               put_path=True, num_local_experts=num_experts // num_ranks)  # fmt: skip
        assert across >= put.total_words * 4
        assert across > plain
        assert plain >= LowLatencyLayout(num_ranks, capacity, hidden, num_topk).total_words * 4
