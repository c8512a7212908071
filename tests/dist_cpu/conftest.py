"""Fixtures of the multi-process CPU tier: one gloo ``ProcessGroupPool`` per world size per session.

Spawning processes that import torch costs seconds (more on a 2-core CI machine), so every test of
this tier runs its worker on a shared pool instead of spawning its own processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from epcomm.testing import ProcessGroupPool

from .cases import RunOnRanks

# Seconds one pool run may take before its ranks are killed (the pool restarts on the next run).
# A normal case takes well under a second; a hung one waits EPCOMM_TIMEOUT_S (30 s) first.
RUN_TIMEOUT_S = 120.0


# Package scope: the pools' processes end when this tier ends, before other tiers (test_launch
# checks that no child process is left) run.
@pytest.fixture(scope="package")
def _pools() -> Iterator[dict[int, ProcessGroupPool]]:
    pools: dict[int, ProcessGroupPool] = {}
    yield pools
    for pool in pools.values():
        pool.close()


@pytest.fixture
def run_on_ranks(_pools: dict[int, ProcessGroupPool]) -> RunOnRanks:
    """``run_on_ranks(world_size, worker, *args)``: run ``worker(pgi, *args)`` on a gloo pool.

    The pool of each world size is started on first use and shared by the whole tier.
    """

    def run(world_size: int, worker: Callable[..., Any], *args: Any) -> list[Any]:
        if world_size not in _pools:
            _pools[world_size] = ProcessGroupPool(world_size, backend="gloo", timeout_s=RUN_TIMEOUT_S)
        return _pools[world_size].run(worker, *args)

    return run
