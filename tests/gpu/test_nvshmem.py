"""The ``nvshmem`` backend within one node: NVSHMEM symmetric memory (peers' addresses from
``nvshmem_ptr`` on the device, no rendezvous) under the NVLink-mode kernels, against the reference
backend. Several processes on one GPU run in NVSHMEM's multi-process-per-GPU mode: correctness only."""

from __future__ import annotations

import pytest
from nvshmem_workers import nvshmem_against_reference, nvshmem_then_nvlink
from placement import NUM_GPUS, PLACEMENTS, backend_or_skip

from epcomm.testing import parallel_launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NUM_GPUS < 1, reason="needs a CUDA GPU")]


def _nvshmem_or_skip() -> None:
    import torch.distributed._symmetric_memory as symm_mem

    if not symm_mem.is_nvshmem_available():
        pytest.skip("NVSHMEM is not available to PyTorch here")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_nvshmem_matches_reference(world_size: int, placement: str) -> None:
    _nvshmem_or_skip()
    backend = backend_or_skip(world_size, placement)
    results = parallel_launch(world_size, nvshmem_against_reference, backend=backend, timeout_s=600)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])


def test_one_symmetric_memory_backend_per_process() -> None:
    _nvshmem_or_skip()
    backend = backend_or_skip(1, "nccl")
    (message,) = parallel_launch(1, nvshmem_then_nvlink, backend=backend, timeout_s=300)
    assert message.startswith("RuntimeError") or "NVSHMEM" in message, message
