"""GPU reliability: a peer killed between calls gives the survivor epcomm's named error within the
bound, and the survivor can destroy its Buffer and build a new group and Buffer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from placement import NUM_GPUS, PLACEMENTS, backend_or_skip
from reliability_workers import dead_peer

from epcomm.testing import parallel_launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NUM_GPUS < 1, reason="needs a CUDA GPU")]

TIMEOUT_S = 3.0


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("operation", ["dispatch", "low_latency_dispatch"])
def test_dead_peer_is_a_named_error(tmp_path: Path, operation: str, placement: str) -> None:
    backend = backend_or_skip(2, placement)
    result_file = tmp_path / "rank0.json"
    with pytest.raises(RuntimeError, match="rank 1"):  # the launch reports the killed rank
        parallel_launch(
            2,
            dead_peer,
            operation,
            TIMEOUT_S,
            str(result_file),
            backend=backend,
            timeout_s=180,
            failure_grace_s=120,  # rank 0 outlives the killed rank 1 and records what it saw
        )
    result = json.loads(result_file.read_text())
    assert result["kind"] in ("PeerTimeoutError", "PeerLostError"), result
    assert operation in result["message"], result
    assert "rank 0" in result["message"], result
    assert "[1]" in result["message"], result
    assert result["elapsed_s"] <= 2 * TIMEOUT_S + 5, result
    assert result.get("fresh_buffer_ranks") == 1, result
