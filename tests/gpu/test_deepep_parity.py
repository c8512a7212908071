"""DeepEP drop-in behaviour on GPUs: buffers made and used under the caller's default device and
dtype, and one profiler row per low-latency op (DeepEP users time the kernels by name)."""

from __future__ import annotations

import pytest
from parity_workers import profiled_kernel_names, under_caller_defaults
from placement import NUM_GPUS, PLACEMENTS, backend_or_skip

from epcomm.testing import parallel_launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NUM_GPUS < 1, reason="needs a CUDA GPU")]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_caller_default_device_and_dtype(world_size: int, placement: str) -> None:
    backend = backend_or_skip(world_size, placement)
    results = parallel_launch(world_size, under_caller_defaults, backend=backend, timeout_s=600)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_profiler_shows_one_kernel_per_low_latency_op(world_size: int, placement: str) -> None:
    backend = backend_or_skip(world_size, placement)
    results = parallel_launch(world_size, profiled_kernel_names, 5, backend=backend, timeout_s=600)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])
