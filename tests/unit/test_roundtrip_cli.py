"""Tests of ``python -m epcomm`` (``epcomm.roundtrip``): the self-checking round trip on 2 gloo processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from epcomm import roundtrip

_SRC = Path(__file__).resolve().parents[2] / "src"
_SMALL = [
    "--dist-backend", "gloo", "--hidden", "256", "--num-experts", "8", "--num-topk", "4",
    "--num-tokens", "64", "--num-decode-tokens", "8",
]  # fmt: skip


def _run_cli(*args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m epcomm ARGS`` with ``src`` on ``PYTHONPATH``; returns the finished process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SRC), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "epcomm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.parametrize("dtype_flag", ["--fp8", "--no-fp8"])
def test_round_trip_passes(dtype_flag: str) -> None:
    proc = _run_cli("--num-processes", "2", "--iters", "1", dtype_flag, *_SMALL)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "PASS" in proc.stdout, output
    assert "FAIL" not in output, output
    for phase in roundtrip.Phase:
        assert phase.value in proc.stdout, output
    assert "world size: 2" in proc.stdout


def test_help_explains_every_knob() -> None:
    proc = _run_cli("--help", timeout_s=60.0)
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--num-processes", "--dist-backend", "--transport", "--hidden", "--num-experts", "--num-topk",
        "--num-tokens", "--num-decode-tokens", "--iters", "--seed", "--fp8", "--no-fp8",
    ):  # fmt: skip
        assert flag in proc.stdout
    assert "round trip" in proc.stdout
    # Two backends, two unambiguous flags: the deprecated --backend is not advertised.
    assert "--backend " not in proc.stdout
    assert "torch.distributed backend" in proc.stdout
    assert "Buffer(backend=...)" in proc.stdout


def test_transport_and_dist_backend_are_distinct_flags() -> None:
    parser = roundtrip.build_parser()
    args = parser.parse_args(["--dist-backend", "gloo", "--transport", "reference"])
    assert (args.dist_backend, args.transport) == ("gloo", "reference")
    defaults = parser.parse_args([])
    assert (defaults.dist_backend, defaults.transport) == ("auto", None)
    for wrong in (["--dist-backend", "nvlink"], ["--transport", "nccl"]):
        with pytest.raises(SystemExit):
            parser.parse_args(wrong)


def test_old_backend_flag_is_a_deprecated_alias(capsys: pytest.CaptureFixture[str]) -> None:
    args = roundtrip.build_parser().parse_args(["--backend", "gloo"])
    assert args.dist_backend == "gloo"
    assert "--dist-backend" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad_args",
    [["--hidden", "100"], ["--num-experts", "7", "--num-processes", "2"], ["--num-topk", "0"]],
)
def test_bad_arguments_exit_2(bad_args: list[str]) -> None:
    proc = _run_cli(*bad_args, timeout_s=60.0)
    assert proc.returncode == 2
    assert "error" in proc.stderr


def test_report_fails_when_one_rank_fails() -> None:
    cfg = roundtrip.RoundtripConfig(256, 8, 4, 64, 8, 1, 1, 0, True, ("normal",), None)
    good = roundtrip.CheckResult(True, 0.01, 0.08, "rel. err 0.0100 <= 0.08")
    bad = roundtrip.CheckResult(False, 0.5, 0.08, "rel. err 0.5000 > 0.08")
    reports = [
        roundtrip.RankReport(
            rank, "cpu", "reference", (roundtrip.PhaseResult(roundtrip.Phase.COMBINE, 1e-3, 1000, check),)
        )
        for rank, check in enumerate([good, bad])
    ]
    text, passed = roundtrip.format_report(reports, "gloo", cfg)
    assert not passed
    assert "FAIL on ranks [1]" in text
    text, passed = roundtrip.format_report(reports[:1], "gloo", cfg)
    assert passed
    assert "FAIL" not in text
