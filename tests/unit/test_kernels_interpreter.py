"""The kernels' logic on the CPU: ``kernel_interpreter_checks.py`` (normal mode, layout, barrier) and
``ll_kernel_interpreter_checks.py`` (low-latency dispatch / combine send and receive on simulated
ranks, the bounded wait) run each kernel in Triton's interpreter (a subprocess, since
``TRITON_INTERPRET`` must be set before the kernels are defined) and compare it with torch. The
simulated ranks reach each other through a table of their buffers' addresses, as on the GPU; the
push, barrier, count exchange, low-latency and wait checks include cases with more than 8 ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter runs on numpy

HERE = Path(__file__).parent
SRC = Path(__file__).resolve().parents[2] / "src"
CHECKS = [
    *(
        ("kernel_interpreter_checks.py", check)
        for check in (
            "layout",
            "push",
            "push_barriers",
            "push_fingerprint",
            "barrier",
            "rows",
            "copy_out",
            "reduce",
            "leg_exchange",
        )
    ),
    *(
        ("ll_kernel_interpreter_checks.py", check)
        for check in (
            "dispatch_send",
            "dispatch_combine",
            "dispatch_fp8",
            "fingerprints",
            "put_path",
            "row_blocks",
            "wait",
            "one_launch",
            "shrink_waits",
            "put_barrier",
        )
    ),
]


@pytest.mark.parametrize(("script", "check"), CHECKS)
def test_kernel_in_interpreter(script: str, check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(HERE / script), check],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{check}: ok" in done.stdout
