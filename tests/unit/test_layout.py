"""``epcomm.layout.compute_dispatch_layout`` against a naive Python loop."""

from __future__ import annotations

import pytest
import torch

from epcomm import topk_idx_t
from epcomm.layout import DispatchLayout, compute_dispatch_layout
from epcomm.testing import make_routing


def _random_routing(
    num_tokens: int, num_topk: int, num_experts: int, seed: int, empty_fraction: float = 0.25
) -> torch.Tensor:
    """Distinct experts per token, about ``empty_fraction`` of the slots ``-1``."""
    return make_routing(num_tokens, num_experts, num_topk, seed=seed, masked_prob=empty_fraction).topk_idx


def _naive_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int | None
) -> tuple[list[int], list[int] | None, list[int], list[list[bool]]]:
    num_local_experts = num_experts // num_ranks
    per_rank = [0] * num_ranks
    per_expert = [0] * num_experts
    in_rank: list[list[bool]] = []
    per_node: list[int] | None = None
    if num_ranks_per_node is not None and num_ranks_per_node < num_ranks:
        per_node = [0] * (num_ranks // num_ranks_per_node)
    for row in topk_idx.tolist():
        ranks = set()
        for expert in row:
            if expert == -1:
                continue
            per_expert[expert] += 1
            ranks.add(expert // num_local_experts)
        for rank in ranks:
            per_rank[rank] += 1
        if per_node is not None:
            assert num_ranks_per_node is not None
            for node in {rank // num_ranks_per_node for rank in ranks}:
                per_node[node] += 1
        in_rank.append([rank in ranks for rank in range(num_ranks)])
    return per_rank, per_node, per_expert, in_rank


def _assert_matches_naive(
    layout: DispatchLayout,
    topk_idx: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    num_ranks_per_node: int | None,
) -> None:
    per_rank, per_node, per_expert, in_rank = _naive_layout(
        topk_idx, num_experts, num_ranks, num_ranks_per_node
    )
    num_tokens = topk_idx.size(0)
    assert layout.num_tokens_per_rank.dtype == torch.int32
    assert layout.num_tokens_per_expert.dtype == torch.int32
    assert layout.is_token_in_rank.dtype == torch.bool
    assert list(layout.is_token_in_rank.shape) == [num_tokens, num_ranks]
    assert layout.num_tokens_per_rank.tolist() == per_rank
    assert layout.num_tokens_per_expert.tolist() == per_expert
    assert layout.is_token_in_rank.tolist() == in_rank
    if per_node is None:
        assert layout.num_tokens_per_rdma_rank is None
    else:
        assert layout.num_tokens_per_rdma_rank is not None
        assert layout.num_tokens_per_rdma_rank.dtype == torch.int32
        assert layout.num_tokens_per_rdma_rank.tolist() == per_node


@pytest.mark.parametrize(
    ("num_tokens", "num_topk", "num_experts", "num_ranks"),
    [
        (1, 1, 1, 1),
        (17, 2, 8, 2),
        (64, 8, 64, 8),
        (128, 6, 48, 4),
        (33, 16, 256, 16),
        (50, 9, 24, 24),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_loop(
    num_tokens: int, num_topk: int, num_experts: int, num_ranks: int, seed: int
) -> None:
    topk_idx = _random_routing(num_tokens, num_topk, num_experts, seed)
    layout = compute_dispatch_layout(topk_idx, num_experts, num_ranks)
    _assert_matches_naive(layout, topk_idx, num_experts, num_ranks, None)


@pytest.mark.parametrize(
    ("num_ranks", "num_ranks_per_node"),
    [(16, 8), (32, 8), (8, 2), (6, 3), (4, 1)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_per_node_counts(num_ranks: int, num_ranks_per_node: int, seed: int) -> None:
    num_experts = num_ranks * 4
    topk_idx = _random_routing(40, 8, num_experts, seed)
    layout = compute_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)
    _assert_matches_naive(layout, topk_idx, num_experts, num_ranks, num_ranks_per_node)
    assert layout.num_tokens_per_rdma_rank is not None
    assert list(layout.num_tokens_per_rdma_rank.shape) == [num_ranks // num_ranks_per_node]


@pytest.mark.parametrize("num_ranks_per_node", [None, 8, 16])
def test_no_per_node_counts_within_one_node(num_ranks_per_node: int | None) -> None:
    topk_idx = _random_routing(10, 4, 32, seed=3)
    layout = compute_dispatch_layout(topk_idx, 32, 8, num_ranks_per_node)
    assert layout.num_tokens_per_rdma_rank is None


@pytest.mark.parametrize("num_ranks_per_node", [None, 2])
def test_zero_tokens(num_ranks_per_node: int | None) -> None:
    topk_idx = torch.empty(0, 4, dtype=topk_idx_t)
    layout = compute_dispatch_layout(topk_idx, 16, 4, num_ranks_per_node)
    assert layout.num_tokens_per_rank.tolist() == [0, 0, 0, 0]
    assert layout.num_tokens_per_expert.tolist() == [0] * 16
    assert list(layout.is_token_in_rank.shape) == [0, 4]
    if num_ranks_per_node is not None:
        assert layout.num_tokens_per_rdma_rank is not None
        assert layout.num_tokens_per_rdma_rank.tolist() == [0, 0]


def test_all_slots_empty() -> None:
    topk_idx = torch.full((5, 3), -1, dtype=topk_idx_t)
    layout = compute_dispatch_layout(topk_idx, 8, 2, 1)
    _assert_matches_naive(layout, topk_idx, 8, 2, 1)
    assert not bool(layout.is_token_in_rank.any())


def test_token_counts_once_per_rank() -> None:
    # Experts 0 and 1 both live on rank 0 (4 experts over 2 ranks): the token counts once there.
    topk_idx = torch.tensor([[0, 1], [1, 3]], dtype=topk_idx_t)
    layout = compute_dispatch_layout(topk_idx, 4, 2)
    assert layout.num_tokens_per_rank.tolist() == [2, 1]
    assert layout.num_tokens_per_expert.tolist() == [1, 2, 0, 1]


def test_docstring_example() -> None:
    layout = compute_dispatch_layout(torch.tensor([[0, 3], [1, -1]], dtype=topk_idx_t), 4, 2)
    assert layout.is_token_in_rank.tolist() == [[True, True], [True, False]]
    assert layout.num_tokens_per_rank.tolist() == [2, 1]
    assert layout.num_tokens_per_expert.tolist() == [1, 1, 0, 1]


def test_non_contiguous_input() -> None:
    topk_idx = _random_routing(8, 20, 32, seed=5).t().contiguous().t()[:, ::2]
    assert not topk_idx.is_contiguous()
    layout = compute_dispatch_layout(topk_idx, 32, 4, 2)
    _assert_matches_naive(layout, topk_idx, 32, 4, 2)


def test_returns_a_named_tuple_in_deepep_order() -> None:
    layout = compute_dispatch_layout(_random_routing(4, 2, 8, seed=0), 8, 2)
    assert isinstance(layout, tuple)
    assert DispatchLayout._fields == (
        "num_tokens_per_rank",
        "num_tokens_per_rdma_rank",
        "num_tokens_per_expert",
        "is_token_in_rank",
    )


@pytest.mark.parametrize(("num_tokens", "num_ranks", "seed"), [(0, 2, 0), (1, 4, 1), (37, 4, 2), (300, 8, 3)])
def test_rows_in_order_matches_a_loop(num_tokens: int, num_ranks: int, seed: int) -> None:
    from epcomm.layout import rows_in_order

    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_tokens, num_ranks, generator=generator) < 0.6
    first_row = torch.randint(0, 1000, (num_ranks,), generator=generator)
    expected = [[-1] * num_ranks for _ in range(num_tokens)]
    for rank in range(num_ranks):
        row = int(first_row[rank])
        for token in range(num_tokens):
            if mask[token, rank]:
                expected[token][rank] = row
                row += 1
    got = rows_in_order(mask, first_row)
    assert got.dtype == torch.int32
    assert got.shape == (num_tokens, num_ranks)
    assert got.tolist() == expected
