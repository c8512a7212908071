"""Shared set-up of the kernel checks that run in Triton's CPU interpreter
(``kernel_interpreter_checks.py``, ``ll_kernel_interpreter_checks.py``): refuses to run without
``TRITON_INTERPRET=1`` (it must be set before any kernel is defined) and makes Triton 3.6's
interpreter work with numpy 2."""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1")

import triton.runtime.interpreter as interpreter

# Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2 rejects for
# non-0-d arrays: convert through the first element instead.
_original_patch = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor: object, scope: object) -> None:
    _original_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]


interpreter._patch_lang_tensor = _patch_lang_tensor
