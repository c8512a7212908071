"""Tests of ``python -m epcomm`` (``epcomm.roundtrip``): the self-checking round trip on 2 gloo
processes, its progress lines, and the combinations it refuses before any process starts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from epcomm import _cli, roundtrip

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


_NORMAL_PHASES = (roundtrip.Phase.LAYOUT, roundtrip.Phase.DISPATCH, roundtrip.Phase.COMBINE)


@pytest.mark.parametrize(
    ("extra", "modes"),
    [
        (["--fp8"], ("normal", "low-latency")),
        (["--no-fp8"], ("normal", "low-latency")),
        # No FP8 and no low-latency mode: any hidden size.
        (["--mode", "normal", "--no-fp8", "--hidden", "200"], ("normal",)),
    ],
    ids=["fp8", "bf16", "normal-bf16-hidden-200"],
)
def test_round_trip_passes_and_shows_progress_first(extra: list[str], modes: tuple[str, ...]) -> None:
    proc = _run_cli("--num-processes", "2", "--iters", "1", "--progress-interval", "0", *_SMALL, *extra)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "FAIL" not in output, output
    summary = proc.stdout.index("RESULT: PASS")
    phases = [p for p in roundtrip.Phase if ("normal" if p in _NORMAL_PHASES else "low-latency") in modes]
    table = proc.stdout[proc.stdout.index("\nphase ") :]
    assert [p for p in roundtrip.Phase if p.value in table] == phases, output
    assert "world size: 2" in proc.stdout
    # Progress from rank 0, in order, before the table: start-up, the Buffer, every iteration of each mode
    # (--progress-interval 0; the first one checked).
    expected = ["epcomm round trip: starting 2 processes", "[setup] 2 processes up", "[setup] Buffer ready"]
    for mode in modes:
        expected += [f"[{mode}] 1 warm-up + 1 timed", f"[{mode}] iteration 1/2 ok, checked on rank 0"]
        expected += [f"[{mode}] iteration 2/2 ok (", f"[{mode}] 2 iterations in"]
    positions = [proc.stdout.find(line) for line in expected]
    assert -1 not in positions, output
    assert positions == sorted(positions), output
    assert positions[-1] < proc.stdout.index("\nphase ") < summary


def test_help_explains_every_knob() -> None:
    proc = _run_cli("--help", timeout_s=60.0)
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--num-processes", "--dist-backend", "--transport", "--hidden", "--num-experts", "--num-topk",
        "--num-tokens", "--num-decode-tokens", "--iters", "--seed", "--fp8", "--no-fp8", "--mode",
        "--progress-interval",
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


# (GPUs, environment, arguments, what the one error line says): every combination that cannot run.
_REFUSED: list[tuple[int, dict[str, str], list[str], str]] = [
    (0, {}, ["--transport", "nvlink"], "--transport nvlink needs one CUDA GPU per process: 2 processes, 0 GPUs"),
    (2, {}, ["--transport", "nvlink", "--num-processes", "4"], "4 processes, 2 GPUs"),
    (4, {}, ["--transport", "nvlink", "--dist-backend", "gloo"], "--dist-backend gloo runs them on CPU"),
    (0, {"EPCOMM_BACKEND": "nvlink"}, [], "EPCOMM_BACKEND=nvlink needs one CUDA GPU per process"),
    (0, {"EPCOMM_BACKEND": "nvshmem"}, [], "EPCOMM_BACKEND=nvshmem: the main job runs the reference or nvlink transport"),
    (0, {"EPCOMM_TIMEOUT_S": "soon"}, [], "EPCOMM_TIMEOUT_S must be a number"),
    (0, {}, ["--dist-backend", "nccl"], "--dist-backend nccl needs one CUDA GPU per process"),
    (1, {}, ["--dist-backend", "nccl"], "2 processes, 1 GPUs"),
    (0, {}, ["--num-processes", "0"], "--num-processes must be >= 1"),
    (0, {}, ["--hidden", "100"], "low-latency mode needs a multiple of 128; normal mode with FP8"),
    (0, {}, ["--hidden", "100", "--mode", "normal"], "--hidden 100: normal mode with FP8 (--fp8, the default)"),
    (0, {}, ["--hidden", "100", "--mode", "low-latency", "--no-fp8"], "low-latency mode needs a multiple of 128"),
    (0, {}, ["--hidden", "0", "--mode", "normal", "--no-fp8"], "--hidden must be positive"),
    (4, {}, ["--hidden", "640", "--mode", "normal"], "FP8 on the nvlink transport (--transport auto picks it"),
    (4, {}, ["--hidden", "100", "--mode", "normal", "--no-fp8"], "BF16 on the nvlink transport"),
    (4, {}, ["--transport", "nvlink"], "--transport nvlink needs Triton"),
    (4, {}, ["--mode", "normal", "--num-experts", "8192"], "--num-experts 8192: normal mode on the nvlink transport"),
    (0, {}, ["--num-topk", "33", "--num-experts", "64"], "low-latency mode takes at most 32"),
    (0, {}, ["--num-experts", "7", "--num-processes", "2"], "--num-experts must be a positive multiple"),
    (0, {}, ["--num-topk", "0"], "--num-topk must be in [1, num_experts=64]"),
    (0, {}, ["--iters", "0"], "--iters must be >= 1"),
    (0, {}, ["--timeout", "0"], "--timeout must be > 0"),
    (0, {}, ["--progress-interval", "-1"], "--progress-interval must be >= 0"),
]  # fmt: skip


@pytest.mark.parametrize(("num_gpus", "environ", "argv", "message"), _REFUSED)
def test_impossible_combination_is_one_line_exit_2_before_any_process(
    machine: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
    num_gpus: int,
    environ: dict[str, str],
    argv: list[str],
    message: str,
) -> None:
    machine(num_gpus, triton="Triton" not in message, **environ)
    with pytest.raises(SystemExit) as exit_info:
        roundtrip.run(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing started
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert error_lines == [err.splitlines()[-1]], err
    assert error_lines[0].startswith("python -m epcomm: error: "), err
    assert message in error_lines[0], err


@pytest.mark.parametrize(
    ("num_gpus", "argv", "dist_backend", "hidden", "modes"),
    [
        (0, [], "gloo", 1024, ("normal", "low-latency")),  # the default run is unchanged
        (0, ["--mode", "normal", "--no-fp8", "--hidden", "200"], "gloo", 200, ("normal",)),
        (4, [], "nccl", 7168, ("normal", "low-latency")),
        (4, ["--transport", "reference", "--mode", "normal", "--hidden", "384"], "nccl", 384, ("normal",)),
        (4, ["--transport", "reference", "--dist-backend", "gloo", "--hidden", "100", "--mode", "normal", "--no-fp8"],
         "gloo", 100, ("normal",)),
    ],
)  # fmt: skip
def test_possible_combinations_resolve(
    machine: Callable[..., None],
    num_gpus: int,
    argv: list[str],
    dist_backend: str,
    hidden: int,
    modes: tuple[str, ...],
) -> None:
    machine(num_gpus)
    parser = roundtrip.build_parser()
    num_processes, placement, cfg = roundtrip._resolve(parser.parse_args(argv), parser)
    assert num_processes == max(num_gpus, 2)
    assert (placement.dist_backend, cfg.hidden, cfg.modes) == (dist_backend, hidden, modes)
    assert cfg.use_fp8 == ("--no-fp8" not in argv)


def test_impossible_combination_from_the_shell_is_one_line() -> None:
    # Impossible on any machine: gloo puts the ranks on CPU.
    proc = _run_cli("--dist-backend", "gloo", "--transport", "nvlink", timeout_s=60.0)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("python -m epcomm: error: --transport nvlink needs")


def test_progress_prints_stages_and_spaces_iterations(capsys: pytest.CaptureFixture[str]) -> None:
    now = [100.0]
    progress = _cli.Progress(True, interval_s=1.0, clock=lambda: now[0])
    progress.stage("setup", "2 processes up")
    for index, step_s in enumerate([0.3, 0.3, 0.3, 0.3, 0.3, 2.0], start=1):
        now[0] += step_s
        progress.iteration("normal", index, 6, step_s, force=index == 1)
    assert capsys.readouterr().out.splitlines() == [
        "[setup] 2 processes up",
        "[normal] iteration 1/6 ok (300 ms)",  # forced: the checked one
        "[normal] iteration 5/6 ok (300 ms)",  # the first 1 s or more after the last line
        "[normal] iteration 6/6 ok (2.0 s)",
    ]
    quiet = _cli.Progress(False, interval_s=0.0)
    quiet.stage("setup", "x")
    quiet.iteration("normal", 1, 1, 0.1, force=True)
    assert capsys.readouterr().out == ""


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
