"""GPU tier: training integration on the NVLink backend (``epcomm.autograd``, ``epcomm.moe``) and a
compiled low-latency decode step in a CUDA graph (``epcomm.ops``), against the reference backend.

Placed as the other multi-rank GPU tests (``placement.py``): one GPU per rank when there are
enough, otherwise every rank sharing ``cuda:0``. Skipped without a CUDA GPU.
"""

from __future__ import annotations

import pytest
from placement import NUM_GPUS, PLACEMENTS, backend_or_skip
from training_workers import run_checks

from epcomm.testing import parallel_launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multigpu,
    pytest.mark.skipif(NUM_GPUS < 1, reason="needs a CUDA GPU"),
]


def _run(world_size: int, placement: str, name: str, *args: object) -> None:
    backend = backend_or_skip(world_size, placement)
    results = parallel_launch(world_size, run_checks, name, *args, backend=backend, timeout_s=900)
    failures = [line for rank_failures in results for line in rank_failures]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_autograd_matches_reference(world_size: int, placement: str) -> None:
    """Forward and every gradient of dispatch -> experts -> combine, bf16 / FP8 / float32 / float64."""
    _run(world_size, placement, "autograd", ["bfloat16", "fp8", "float32", "float64"])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_gradcheck_float64(world_size: int, placement: str) -> None:
    _run(world_size, placement, "gradcheck")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("compiled", [False, True])
def test_moe_training_matches_reference(world_size: int, placement: str, compiled: bool) -> None:
    _run(world_size, placement, "moe", compiled)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("use_fp8", [False, True])
def test_compiled_decode_step_in_cuda_graph(world_size: int, placement: str, use_fp8: bool) -> None:
    _run(world_size, placement, "decode_graph", use_fp8)
