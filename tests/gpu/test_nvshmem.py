"""The ``nvshmem`` backend against the reference backend. Within one node: NVSHMEM symmetric memory
(peers' addresses from ``nvshmem_ptr`` on the device, no rendezvous) under the NVLink-mode kernels.
Across simulated nodes (``EPCOMM_RANKS_PER_NODE``): the hierarchical normal mode over NVSHMEM legs
(put-with-signal between nodes, even where a store would reach; NVLink stores within), every
setting of the CPU tier's hierarchical check, bit for bit, with the legs' bytes equal to the
scheme's (also with blocks larger than a slot, in rounds), async calls, a mismatched call and a
skipped dispatch; and the low-latency kernels' put path (puts to the ranks of other nodes). Several
processes on one GPU run in NVSHMEM's multi-process-per-GPU mode: correctness only."""

from __future__ import annotations

import pytest
from nvshmem_workers import (
    nvshmem_against_reference,
    nvshmem_multi_node_against_reference,
    nvshmem_multi_node_events_and_mismatch,
    nvshmem_multi_node_low_latency,
    nvshmem_then_nvlink,
)
from placement import NUM_GPUS, PLACEMENTS, backend_or_skip

from dist_cpu.workers_hierarchical import hierarchical_skipped_dispatch
from epcomm.testing import SHARED_GPU, parallel_launch

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
    assert message.startswith("RuntimeError: backend 'nvlink'"), message
    assert "one backend per process" in message, message


@pytest.mark.parametrize(("world_size", "ranks_per_node"), [(2, 1), (4, 2), (4, 1)])
def test_nvshmem_multi_node_matches_reference(world_size: int, ranks_per_node: int) -> None:
    _nvshmem_or_skip()
    backend = backend_or_skip(world_size, SHARED_GPU if world_size > NUM_GPUS else "nccl")
    results = parallel_launch(
        world_size, nvshmem_multi_node_against_reference, ranks_per_node, backend=backend, timeout_s=300
    )
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])


def test_nvshmem_multi_node_events_and_mismatched_call() -> None:
    _nvshmem_or_skip()
    backend = backend_or_skip(4, SHARED_GPU if NUM_GPUS < 4 else "nccl")
    outcomes = parallel_launch(4, nvshmem_multi_node_events_and_mismatch, 2, backend=backend, timeout_s=300)
    failures = [line for outcome in outcomes for line in outcome["async"]]
    assert not failures, "\n".join(failures[:20])
    for rank, outcome in enumerate(outcomes):
        mismatch = outcome["mismatch"]
        assert mismatch["kind"] == "InconsistentCallError", (rank, mismatch)
        assert len(mismatch["message"]) <= 300, mismatch["message"]
        assert mismatch["recovered"], (rank, "the consistent call after the error failed")


def test_nvshmem_multi_node_skipped_dispatch_is_a_named_timeout() -> None:
    _nvshmem_or_skip()
    backend = backend_or_skip(4, SHARED_GPU if NUM_GPUS < 4 else "nccl")
    outcomes = parallel_launch(
        4, hierarchical_skipped_dispatch, 2, 1, "nvshmem", backend=backend, timeout_s=300
    )
    assert outcomes[1] == {"kind": "skipped"}
    for rank in (0, 2, 3):
        assert outcomes[rank]["kind"] == "PeerTimeoutError", (rank, outcomes[rank])
        assert outcomes[rank]["message"].startswith("dispatch"), outcomes[rank]["message"]
        assert outcomes[rank]["seconds"] < 10, outcomes[rank]
    for rank in (0, 3):
        assert "[1]" in outcomes[rank]["message"], outcomes[rank]["message"]


@pytest.mark.parametrize(("world_size", "ranks_per_node"), [(2, 1), (4, 2), (4, 1)])
def test_nvshmem_multi_node_low_latency_matches_reference(world_size: int, ranks_per_node: int) -> None:
    """Low-latency mode across simulated nodes: peers of other nodes through NVSHMEM puts (even
    where a store would reach them), of this node through stores."""
    _nvshmem_or_skip()
    backend = backend_or_skip(world_size, SHARED_GPU if world_size > NUM_GPUS else "nccl")
    results = parallel_launch(
        world_size, nvshmem_multi_node_low_latency, ranks_per_node, backend=backend, timeout_s=300
    )
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])
