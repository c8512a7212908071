"""Backend placement: one GPU per rank on one host is the NVLink node; ranks sharing a GPU take the
CUDA IPC path (only when asked for); other hosts or missing peer access mean no NVLink path."""

from __future__ import annotations

import pytest

from .cases import RunOnRanks
from .workers_placement import placement_worker

CASES = [
    ([0, 1, 2, 3], ["a"] * 4, [True] * 4, "peers"),
    ([0, 0, 1, 1], ["a"] * 4, [True] * 4, "shared"),
    ([0, 0, 0, 0], ["a"] * 4, [True] * 4, "shared"),
    ([0, 1, 0, 1], ["a", "a", "b", "b"], [True] * 4, "None"),
    ([0, 1, 2, 3], ["a"] * 4, [True, True, False, True], "None"),
]


@pytest.mark.parametrize(("gpus", "hosts", "peer_access", "expected"), CASES)
def test_nvlink_placement(
    run_on_ranks: RunOnRanks, gpus: list[int], hosts: list[str], peer_access: list[bool], expected: str
) -> None:
    assert run_on_ranks(4, placement_worker, gpus, hosts, peer_access) == [expected] * 4
