"""Shared set-up of the kernel checks that run in Triton's CPU interpreter
(``kernel_interpreter_checks.py``, ``ll_kernel_interpreter_checks.py``): refuses to run without
``TRITON_INTERPRET=1`` (it must be set before any kernel is defined), makes Triton 3.6's
interpreter work with numpy 2, replaces the inline-assembly primitives and the NVSHMEM puts with CPU
stand-ins (``use_cpu_primitives``, ``use_cpu_puts``) and builds the peers of simulated ranks
(``symmetric_peers``)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
from collections.abc import Callable

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1")

import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as interpreter

from epcomm.kernels.symmetric_peers import SymmetricPeers

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


_STAND_INS = {
    "global_timer_ns": _cpu_timer_ns,
    "load_acquire_sys": _cpu_load,
    "load_relaxed_sys": _cpu_load,
    "fence_acq_rel_sys": _cpu_fence,
}

# Every kernel module that reaches a primitive (directly or through the helpers of
# ``primitives``): ``use_cpu_primitives`` patches them all and checks that no other module of
# ``epcomm.kernels`` holds an inline-assembly primitive.
KERNEL_MODULES = (
    "epcomm.kernels.primitives",
    "epcomm.kernels.barrier",
    "epcomm.kernels.normal_push",
    "epcomm.kernels.normal_rows",
    "epcomm.kernels.low_latency_dispatch",
    "epcomm.kernels.low_latency_combine",
    "epcomm.kernels.leg_exchange",
)


def use_cpu_primitives() -> None:
    """Replace the global timer, the system-scope loads and the fence in every kernel module
    (``KERNEL_MODULES``, ``epcomm.kernels.primitives`` included for the helpers that call them)
    with CPU stand-ins (the interpreter runs one program at a time: there is nothing to order).
    ``peer_pointer`` needs none: the interpreter loads the table entry and turns it into a pointer.
    Raises if a module of ``epcomm.kernels`` outside ``KERNEL_MODULES`` holds a primitive."""
    import epcomm.kernels

    def is_primitive(value: object) -> bool:
        fn = getattr(value, "fn", None)
        return getattr(fn, "__module__", None) == "epcomm.kernels.primitives" and fn.__name__ in _STAND_INS

    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, stand_in in _STAND_INS.items():
            if hasattr(module, name):
                setattr(module, name, stand_in)
    for info in pkgutil.iter_modules(epcomm.kernels.__path__, "epcomm.kernels."):
        module = importlib.import_module(info.name)
        left = sorted(name for name, value in vars(module).items() if is_primitive(value))
        if left:
            raise RuntimeError(
                f"{info.name} holds inline-assembly primitives {left}: add it to KERNEL_MODULES"
            )


# CPU stand-ins for the NVSHMEM puts (``epcomm.kernels.puts``) on simulated ranks: copies through
# the peer's address (``remote``), the signal's low word (the sequence's half of the uint64).
@triton.jit
def _cpu_put_bytes(local, remote, dst_word, src, num_bytes, pe):
    num_words = num_bytes // 4
    for start in range(0, num_words, 256):
        offsets = start + tl.arange(0, 256)
        mask = offsets < num_words
        tl.store(remote + dst_word + offsets, tl.load(src + offsets, mask=mask), mask=mask)


@triton.jit
def _cpu_put_block(local, remote, dst_word, src, num_bytes, signal_word, value, pe):
    _cpu_put_bytes(local, remote, dst_word, src, num_bytes, pe)
    tl.store(remote + signal_word, value.to(tl.int32))


@triton.jit
def _cpu_put_quiet():
    pass


@triton.jit
def _cpu_put_signal(local, remote, signal_word, value, pe):
    tl.store(remote + signal_word, value.to(tl.int32))


def use_cpu_puts() -> None:
    """Replace the NVSHMEM puts of ``epcomm.kernels.puts`` (which the kernels call through that
    module) with copies through the peer's address in the peer table."""
    import epcomm.kernels.puts as puts

    puts.put_bytes = _cpu_put_bytes
    puts.put_block = _cpu_put_block
    puts.put_quiet = _cpu_put_quiet
    puts.put_signal = _cpu_put_signal


def symmetric_peers(
    buffers: list[torch.Tensor],
    rank: int,
    error: torch.Tensor,
    timeout_ns: int = 10**12,
    flag_offset: int = 0,
    counter_offset: int = 32,
) -> SymmetricPeers:
    """Rank ``rank``'s ``SymmetricPeers`` over simulated ranks: ``buffers`` (one CPU int32 tensor per
    rank, 16-byte aligned) reached through a table of their addresses, as the symmetric buffer
    builds it; ``error`` a CPU int32 ``[4]`` error word."""
    addresses = [buffer.data_ptr() for buffer in buffers]
    assert all(address % 16 == 0 for address in addresses), "simulated buffers must be 16-byte aligned"
    return SymmetricPeers(
        peer_table=torch.tensor(addresses, dtype=torch.int64),
        rank=rank,
        num_ranks=len(buffers),
        timeout_ns=timeout_ns,
        error_address=error.data_ptr(),
        flag_offset=flag_offset,
        counter_offset=counter_offset,
    )


def run_checks(checks: dict[str, Callable[[], None]]) -> None:
    """Run the checks named on the command line (all without names), printing each one's time."""
    for name in sys.argv[1:] or list(checks):
        start = time.monotonic()
        checks[name]()
        print(f"{name}: ok ({time.monotonic() - start:.1f} s)", flush=True)
