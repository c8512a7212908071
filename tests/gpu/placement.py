"""Where a multi-rank GPU test's ranks run: one GPU per rank (NCCL group) or all on one GPU.

``SHARED_GPU`` puts every rank on ``cuda:0`` with a gloo group; the NVLink backend then maps peer
buffers through CUDA IPC and the processes' kernels time-slice. That proves the cross-rank protocol
(flags, epochs, barriers, row maps, timeouts) on a machine with a single GPU, not the speed.

By default a shared case runs only where its one-GPU-per-rank twin cannot (fewer GPUs than ranks);
``EPCOMM_SHARED_GPU_TESTS=all`` runs both, ``=none`` neither.
"""

from __future__ import annotations

import os

import pytest
import torch

from epcomm.testing import SHARED_GPU

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
PLACEMENTS = ["nccl", SHARED_GPU]
SHARED_CASES = os.environ.get("EPCOMM_SHARED_GPU_TESTS", "auto")


def backend_or_skip(world_size: int, placement: str) -> str:
    """The ``parallel_launch`` backend for ``world_size`` ranks placed as ``placement`` (skips the
    test when the machine cannot hold it, or when the case adds nothing)."""
    if NUM_GPUS < 1:
        pytest.skip("needs a CUDA GPU")
    if placement == SHARED_GPU:
        if world_size < 2:
            pytest.skip("one rank: the one-GPU-per-rank case is the same run")
        if SHARED_CASES == "none" or (SHARED_CASES == "auto" and world_size <= NUM_GPUS):
            pytest.skip("the one-GPU-per-rank case runs (EPCOMM_SHARED_GPU_TESTS=all runs both)")
        return SHARED_GPU
    if world_size > NUM_GPUS:
        pytest.skip(f"needs {world_size} GPUs")
    return placement
