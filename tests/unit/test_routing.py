"""``epcomm.testing.make_routing``: shapes, dtypes, determinism, distinct experts, masking, restriction."""

from __future__ import annotations

import inspect

import pytest
import torch

import epcomm.testing
from epcomm import topk_idx_t
from epcomm.testing import TopkRouting, make_routing


def _assert_distinct_experts(topk_idx: torch.Tensor) -> None:
    for row in topk_idx.tolist():
        experts = [e for e in row if e >= 0]
        assert len(experts) == len(set(experts)), row


@pytest.mark.parametrize(("num_tokens", "num_experts", "num_topk"), [(0, 8, 2), (1, 4, 4), (64, 256, 8)])
def test_shapes_dtypes_and_distinct_experts(num_tokens: int, num_experts: int, num_topk: int) -> None:
    routing = make_routing(num_tokens, num_experts, num_topk, seed=3, rank=1)
    assert isinstance(routing, TopkRouting)
    assert routing.topk_idx.shape == (num_tokens, num_topk)
    assert routing.topk_idx.dtype == topk_idx_t
    assert routing.topk_weights.shape == (num_tokens, num_topk)
    assert routing.topk_weights.dtype == torch.float32
    assert routing.topk_idx.is_contiguous()
    assert routing.topk_weights.is_contiguous()
    assert bool(((routing.topk_idx >= 0) & (routing.topk_idx < num_experts)).all())
    assert bool(((routing.topk_weights >= 0.5) & (routing.topk_weights < 1.5)).all())
    _assert_distinct_experts(routing.topk_idx)


def test_deterministic_per_seed_and_rank() -> None:
    first = make_routing(32, 16, 4, seed=5, rank=2)
    again = make_routing(32, 16, 4, seed=5, rank=2, device=torch.device("cpu"))
    assert torch.equal(first.topk_idx, again.topk_idx)
    assert torch.equal(first.topk_weights, again.topk_weights)
    for other in (make_routing(32, 16, 4, seed=5, rank=3), make_routing(32, 16, 4, seed=6, rank=2)):
        assert not torch.equal(first.topk_idx, other.topk_idx)


def test_masked_prob_masks_about_that_fraction() -> None:
    unmasked = make_routing(512, 64, 8, seed=1)
    routing = make_routing(512, 64, 8, seed=1, masked_prob=0.25)
    masked = routing.topk_idx == -1
    assert 0.2 < masked.float().mean().item() < 0.3
    # The other draws do not depend on the masking: unmasked slots and weights are unchanged.
    assert torch.equal(routing.topk_idx[~masked], unmasked.topk_idx[~masked])
    assert torch.equal(routing.topk_weights, unmasked.topk_weights)
    assert bool((make_routing(16, 8, 2, seed=1, masked_prob=1.0).topk_idx == -1).all())


def test_num_masked_masks_at_most_that_many_slots() -> None:
    routing = make_routing(128, 32, 8, seed=2, num_masked=10)
    num_masked = int((routing.topk_idx == -1).sum())
    assert 1 <= num_masked <= 10  # drawn with replacement
    _assert_distinct_experts(routing.topk_idx)


def test_allowed_experts_restrict_the_choice() -> None:
    routing = make_routing(64, 32, 6, seed=4, allowed_experts=range(4))
    topk_idx = routing.topk_idx
    # Four allowed experts for six slots: the best four are the allowed ones, the last two are -1.
    assert bool((topk_idx[:, :4] >= 0).all())
    assert bool((topk_idx[:, :4] < 4).all())
    assert bool((topk_idx[:, 4:] == -1).all())
    _assert_distinct_experts(topk_idx)
    picked = make_routing(64, 32, 2, seed=4, allowed_experts=[3, 17, 30]).topk_idx
    assert set(picked.unique().tolist()) <= {3, 17, 30}


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((-1, 8, 2), {}, "num_tokens"),
        ((4, 8, 0), {}, "num_topk"),
        ((4, 8, 9), {}, "num_topk"),
        ((4, 8, 2), {"masked_prob": 1.5}, "masked_prob"),
        ((4, 8, 2), {"num_masked": -1}, "num_masked"),
        ((4, 8, 2), {"allowed_experts": [8]}, "allowed_experts"),
    ],
)
def test_bad_arguments_raise(args: tuple[int, int, int], kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_routing(*args, seed=0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", epcomm.testing.__all__)
def test_public_testing_api_is_documented(name: str) -> None:
    """Every public function of ``epcomm.testing`` documents its arguments and what it returns."""
    obj = getattr(epcomm.testing, name)
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return
    doc = inspect.getdoc(obj) or ""
    assert doc, f"epcomm.testing.{name} has no docstring"
    if inspect.isfunction(obj):
        if inspect.signature(obj).parameters:
            assert "Arguments:" in doc, f"epcomm.testing.{name}: no 'Arguments:' section"
        assert "Returns:" in doc, f"epcomm.testing.{name}: no 'Returns:' section"
