"""Named scenarios of the tier, turned into ``Case``s for a world size (fresh seed per test and size)."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .naive import Case, Routing

WORLD_SIZES = (2, 4)

RunOnRanks = Callable[..., list[Any]]
"""The ``run_on_ranks`` fixture: ``run_on_ranks(world_size, worker, *args) -> per-rank results``."""

# name -> overrides of the default case (24 tokens per rank, hidden 128, 4 experts per rank, top-4).
SCENARIOS: dict[str, dict[str, Any]] = {
    "balanced": {},
    "hot_rank_0": {"routing": Routing.HOT_RANK_0},
    "masked_slots": {"drop_prob": 0.3},
    "empty_rank_1": {"empty_ranks": (1,), "drop_prob": 0.1},
    "no_tokens_anywhere": {"num_tokens": 0},
    "topk_gt_local_experts": {"experts_per_rank": 2, "num_topk": 3},
    "topk_16": {"experts_per_rank": 8, "num_topk": 16, "drop_prob": 0.2},
    "single_token": {"num_tokens": 1, "empty_ranks": (1, 2, 3)},
    "hidden_256": {"hidden": 256, "drop_prob": 0.1},
    "hidden_7168": {"hidden": 7168, "num_tokens": 5, "drop_prob": 0.1},
}


def make_case(test: str, world_size: int, scenario: str = "balanced", **overrides: Any) -> Case:
    """The ``Case`` of ``scenario`` on ``world_size`` ranks, seeded from the test's name."""
    params: dict[str, Any] = {
        "num_tokens": 24,
        "hidden": 128,
        "experts_per_rank": 4,
        "num_topk": 4,
        **SCENARIOS[scenario],
        **overrides,
    }
    experts_per_rank = params.pop("experts_per_rank")
    seed = zlib.crc32(f"{test}/{scenario}/{world_size}/{sorted(overrides.items())}".encode())
    return Case(seed=seed, num_experts=experts_per_rank * world_size, **params)


# Scenarios in which some rank receives at most one token in normal mode.
FEW_ROWS_SCENARIOS = frozenset({"hot_rank_0", "no_tokens_anywhere", "single_token"})


def normal_mode_scenarios() -> list[Any]:
    """Every scenario (those in ``FEW_ROWS_SCENARIOS`` once exposed a row-unpacking bug)."""
    return list(SCENARIOS)


@contextlib.contextmanager
def caller_defaults(dtype_name: str, device_name: str = "") -> Iterator[None]:
    """Run the block under ``torch.set_default_dtype`` of ``dtype_name`` and ``torch.set_default_device``
    of ``device_name`` (``""``: unchanged), as scripts written for DeepEP do before they create a
    ``Buffer``; both are restored after. ``"meta"`` as the device makes every allocation that does
    not name its device a meta tensor, which fails the first time it meets real data: on a CPU
    machine it finds what ``set_default_device("cuda")`` would move off the host."""
    previous_dtype = torch.get_default_dtype()
    if dtype_name:
        torch.set_default_dtype(getattr(torch, dtype_name))
    if device_name:
        torch.set_default_device(device_name)
    try:
        yield
    finally:
        if device_name:
            torch.set_default_device(None)
        torch.set_default_dtype(previous_dtype)
