"""The hierarchical multi-node algorithm (each token crosses to a node once, forwarded inside the
node; partials reduced inside the node) over torch.distributed legs, against the reference
backend's multi-node mode: equal bit for bit, and the legs send exactly the scheme's bytes."""

from __future__ import annotations

import pytest

from .cases import RunOnRanks
from .workers_hierarchical import SETTINGS, hierarchical_against_reference


@pytest.mark.parametrize(("world_size", "ranks_per_node"), [(4, 2), (4, 1), (8, 4), (8, 2)])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_hierarchical_equals_reference(
    run_on_ranks: RunOnRanks, world_size: int, ranks_per_node: int, setting: int
) -> None:
    results = run_on_ranks(world_size, hierarchical_against_reference, ranks_per_node, SETTINGS[setting])
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])
