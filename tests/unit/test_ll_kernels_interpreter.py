"""The low-latency kernels' logic on the CPU: ``ll_kernel_interpreter_checks.py`` runs dispatch send /
receive, combine send / receive and the bounded wait on simulated ranks in Triton's interpreter (a
subprocess, since ``TRITON_INTERPRET`` must be set before the kernels are defined) and compares
every output with torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter runs on numpy

SCRIPT = Path(__file__).with_name("ll_kernel_interpreter_checks.py")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("check", ["dispatch_send", "dispatch_combine", "dispatch_fp8", "wait"])
def test_ll_kernel_in_interpreter(check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), check],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{check}: ok" in done.stdout
