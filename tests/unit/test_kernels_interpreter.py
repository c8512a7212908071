"""The normal-mode kernels' logic on the CPU: ``kernel_interpreter_checks.py`` runs each kernel in
Triton's interpreter (a subprocess, since ``TRITON_INTERPRET`` must be set before the kernels are
defined) and compares it with the torch definition it replaces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter runs on numpy

SCRIPT = Path(__file__).with_name("kernel_interpreter_checks.py")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("check", ["layout", "push", "rows", "copy_out", "reduce"])
def test_kernel_in_interpreter(check: str) -> None:
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
