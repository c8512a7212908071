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
