"""Shared set-up of the kernel checks that run in Triton's CPU interpreter
(``kernel_interpreter_checks.py``, ``ll_kernel_interpreter_checks.py``): refuses to run without
``TRITON_INTERPRET=1`` (it must be set before any kernel is defined) and makes Triton 3.6's
interpreter work with numpy 2."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import ModuleType

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1")

import triton
import triton.language as tl
import triton.runtime.interpreter as interpreter

# Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2 rejects for
# non-0-d arrays: convert through the first element instead.
_original_patch = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor: object, scope: object) -> None:
    _original_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]


interpreter._patch_lang_tensor = _patch_lang_tensor


# CPU stand-ins for the inline-assembly primitives (interpreted kernels resolve them through their
# module's globals at call time): a monotonic clock and a plain load.
_T0 = time.monotonic_ns()


@triton.jit
def _cpu_timer_ns():
    return tl.full([], time.monotonic_ns() - _T0, tl.int64)


@triton.jit
def _cpu_load(pointer):
    return tl.load(pointer)


@triton.jit
def _cpu_fence():
    pass


def use_cpu_primitives(*modules: ModuleType) -> None:
    """Replace the global timer, the system-scope loads and the fence in ``modules`` (kernel
    modules, and ``epcomm.kernels.primitives`` for the helpers that call them) with CPU stand-ins
    (the interpreter runs one program at a time: there is nothing to order)."""
    for module in modules:
        module.global_timer_ns = _cpu_timer_ns  # type: ignore[attr-defined]
        module.load_acquire_sys = _cpu_load  # type: ignore[attr-defined]
        module.load_relaxed_sys = _cpu_load  # type: ignore[attr-defined]
        module.fence_acq_rel_sys = _cpu_fence  # type: ignore[attr-defined]


def run_checks(checks: dict[str, Callable[[], None]]) -> None:
    """Run the checks named on the command line (all without names), printing each one's time."""
    for name in sys.argv[1:] or list(checks):
        start = time.monotonic()
        checks[name]()
        print(f"{name}: ok ({time.monotonic() - start:.1f} s)", flush=True)
