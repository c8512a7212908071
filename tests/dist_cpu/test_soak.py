"""``python -m epcomm soak`` on CPU with a small run: random scenarios of both modes (empty ranks,
skewed routing, ``-1`` slots, repeated experts, FP8, cached dispatch) complete on 2 and 4 ranks
with no mismatch."""

from __future__ import annotations

import pytest

from epcomm.soak import run


@pytest.mark.parametrize("num_processes", [2, 4])
def test_small_soak_has_no_mismatch(num_processes: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["--iterations", "40", "--num-processes", str(num_processes), "--max-tokens", "24"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 mismatches" in out, out


def test_max_seconds_stops_every_rank_after_the_same_iteration(capsys: pytest.CaptureFixture[str]) -> None:
    # 100,000 scenarios cannot run in 3 s: the run stops cleanly, reports, and says where to go on.
    code = run(
        ["--iterations", "100000", "--first-iteration", "500", "--max-seconds", "3", "--max-tokens", "8"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    summary, phases = out.strip().splitlines()[-2:]
    assert phases.startswith("epcomm soak: rank 0's time by phase: transport "), phases
    assert "(stopped at --max-seconds 3)" in summary, summary
    assert "0 mismatches" in summary, summary
    done = int(summary.split("epcomm soak: ")[1].split(" iterations")[0])
    assert 0 < done < 100000, summary
    assert f"(500-{499 + done})" in summary, summary
