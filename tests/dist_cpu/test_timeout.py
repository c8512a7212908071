"""A peer that skips a call makes the waiting rank fail with ``PeerTimeoutError`` within the bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epcomm.testing import parallel_launch

from .cases import make_case
from .workers_timeout import TIMEOUT_S, absent_peer_worker, dead_peer_worker, skipped_peer_worker

# Slack over EPCOMM_TIMEOUT_S for a loaded 2-core machine; the error must not wait much longer.
TIMEOUT_SLACK_S = 7.0


@pytest.mark.parametrize("operation", ["dispatch", "low_latency_dispatch"])
def test_skipped_peer_times_out(tmp_path: Path, operation: str) -> None:
    case = make_case("timeout", 2, "balanced")
    done_file = tmp_path / "rank0_done"
    outcomes = parallel_launch(
        2, skipped_peer_worker, case, operation, str(done_file), backend="gloo", timeout_s=120
    )
    result = outcomes[0]
    assert result["message"] is not None, (
        f"{operation}: returned after {result['elapsed_s']:.1f} s instead of raising PeerTimeoutError"
    )
    message = result["message"]
    assert TIMEOUT_S - 0.5 <= result["elapsed_s"] <= TIMEOUT_S + TIMEOUT_SLACK_S, (
        f"{operation} raised after {result['elapsed_s']:.1f} s; the bound is EPCOMM_TIMEOUT_S={TIMEOUT_S}"
    )
    assert result["operation"].startswith(operation), result["operation"]
    assert operation in message, message
    assert result["rank"] == 0
    assert "rank 0" in message, message
    assert result["missing_peers"] == [1], result["missing_peers"]
    assert "[1]" in message, message


@pytest.mark.parametrize("local_world_size", [2, None])
def test_absent_peer_bounds_buffer_construction(tmp_path: Path, local_world_size: int | None) -> None:
    """A peer that never builds its ``Buffer``: ``Buffer()`` raises the named timeout within the
    bound, with ``LOCAL_WORLD_SIZE`` known (no host-name exchange) or not."""
    done_file = tmp_path / "rank0_done"
    outcomes = parallel_launch(
        2, absent_peer_worker, local_world_size, str(done_file), backend="gloo", timeout_s=120
    )
    result = outcomes[0]
    assert result["message"] is not None, f"Buffer() returned after {result['elapsed_s']:.1f} s"
    assert TIMEOUT_S - 0.5 <= result["elapsed_s"] <= TIMEOUT_S + TIMEOUT_SLACK_S, result
    assert result["operation"].startswith("Buffer()"), result["operation"]
    assert result["missing_peers"] == [1], result["missing_peers"]
    assert "rank 0" in result["message"], result["message"]


@pytest.mark.parametrize("operation", ["dispatch", "low_latency_dispatch"])
def test_dead_peer_is_a_named_error(tmp_path: Path, operation: str) -> None:
    """A peer killed between calls: the survivor's next call raises epcomm's error naming the
    operation, this rank and the lost peer within the bound (not gloo's raw error), and the
    survivor can destroy its Buffer and build a new group and Buffer."""
    case = make_case("timeout", 2, "balanced")
    result_file = tmp_path / "rank0_result.json"
    with pytest.raises(RuntimeError, match="rank 1"):  # the launch reports the killed rank
        parallel_launch(2, dead_peer_worker, case, operation, str(result_file), backend="gloo", timeout_s=120)
    result = json.loads(result_file.read_text())
    assert result["message"] is not None, f"{operation} returned after {result['elapsed_s']:.1f} s"
    assert result["kind"] in ("PeerLostError", "PeerTimeoutError"), result
    assert result["elapsed_s"] <= TIMEOUT_S + TIMEOUT_SLACK_S, result
    assert result["operation"].startswith(operation), result["operation"]
    assert result["rank"] == 0
    assert result["missing_peers"] == [1], result
    assert result["fresh_buffer_ranks"] == 1
