"""The hierarchical multi-node algorithm (each token crosses to a node once, forwarded inside the
node; partials reduced inside the node) over torch.distributed legs, against the reference
backend's multi-node mode: equal bit for bit, and the legs send exactly the scheme's bytes."""

from __future__ import annotations

from typing import Any

import pytest

from .cases import RunOnRanks
from .workers_hierarchical import hierarchical_against_reference

SETTINGS: list[dict[str, Any]] = [
    {"seed": 1, "num_tokens": 40, "hidden": 64, "num_experts": 16, "num_topk": 4, "biases": 1},
    {"seed": 2, "num_tokens": 24, "hidden": 256, "num_experts": 8, "num_topk": 3, "fp8": True, "biases": 2},
    {"seed": 3, "num_tokens": 17, "hidden": 32, "num_experts": 16, "num_topk": 6, "num_worst_tokens": 136},
    {
        "seed": 4,
        "num_tokens": 30,
        "hidden": 48,
        "num_experts": 8,
        "num_topk": 2,
        "alignment": 4,
        "empty_rank": 1,
    },
    {
        "seed": 5,
        "num_tokens": 20,
        "hidden": 32,
        "num_experts": 16,
        "num_topk": 4,
        "allowed": 2,
    },  # all to rank 0
]


@pytest.mark.parametrize(("world_size", "ranks_per_node"), [(4, 2), (4, 1), (8, 4), (8, 2)])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_hierarchical_equals_reference(
    run_on_ranks: RunOnRanks, world_size: int, ranks_per_node: int, setting: int
) -> None:
    results = run_on_ranks(world_size, hierarchical_against_reference, ranks_per_node, SETTINGS[setting])
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])
