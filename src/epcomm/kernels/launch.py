"""Launch Triton kernels without Triton's per-call Python binding on the hot path.

``JITFunction.__getitem__(grid)(...)`` binds every argument, computes the specialization key and
looks the kernel up on every call: 50-100 us of host time per launch for our kernels with ~30
arguments on the H200 hosts (a torch.profiler trace of one normal dispatch showed four such gaps
before the four ``cuLaunchKernelEx``; ``scripts/profile_normal.py``). ``launch`` goes through
Triton once per specialization and afterwards calls the compiled kernel's launcher directly.

The cache key is at least as fine as Triton's own specialization: per tensor its dtype and whether
its address is 16-byte aligned; per integer whether it needs 64 bits and, unless the kernel marks
it ``do_not_specialize``, whether it equals 1 and whether it is a multiple of 16; plus every
constexpr value and ``num_warps``. So an argument Triton would compile differently for never
reuses a kernel compiled for another.

On the cached path tensors are passed to the launcher as their addresses (Python ints): Triton's
launcher otherwise calls ``data_ptr()`` and ``cuPointerGetAttribute`` for every tensor argument on
every launch. The key records that each tensor is a CUDA tensor, so a CPU tensor never takes the
cached path (Triton's own path rejects it with its error).
"""

from __future__ import annotations

from typing import Any

import torch
from triton import knobs

__all__ = ["launch"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class _KernelInfo:
    """Per-kernel facts: which runtime arguments Triton specializes, the constexpr order."""

    def __init__(self, kernel: Any) -> None:
        self.compiled: dict[tuple[Any, ...], Any] = {}
        # Under Triton's CPU interpreter there are no compiled kernels: always the plain path.
        self.cacheable = hasattr(kernel, "params")
        if not self.cacheable:
            return
        params = kernel.params
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        runtime = [p for p in params if not p.is_constexpr]
        if [p.name for p in params[len(runtime) :]] != self.constexpr_names:
            raise TypeError(f"{kernel.__name__}: launch() needs every constexpr after the runtime arguments")
        self.specialize = tuple(not p.do_not_specialize for p in runtime)


_INFO: dict[int, _KernelInfo] = {}


def _tensor_key(tensor: torch.Tensor, address: int) -> Any:
    return (tensor.dtype, tensor.is_cuda, address % 16 == 0)


def _arg_key(value: Any, specialize: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return _tensor_key(value, value.data_ptr())
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        wide = not _INT32_MIN <= value <= _INT32_MAX
        if not specialize:
            return ("i", wide)
        return ("i", wide, value == 1, value % 16 == 0)
    if isinstance(value, float):
        return ("f",)
    return (type(value).__name__, value)


def _current_stream_fn() -> Any:
    """``device -> raw CUDA stream`` as Triton gets it (a C function when torch has CUDA)."""
    try:
        from torch._C import _cuda_getCurrentRawStream  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - CPU-only torch never launches here
        return lambda device: torch.cuda.current_stream(device).cuda_stream
    return _cuda_getCurrentRawStream


_current_stream = _current_stream_fn()


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    args: tuple[Any, ...],
    constexprs: dict[str, Any],
    num_warps: int,
) -> None:
    """Launch ``kernel[grid](*args, **constexprs, num_warps=num_warps)`` on the current stream.

    Arguments:
        kernel: a ``triton.jit`` function whose constexpr parameters all follow its runtime ones.
        grid: 1 to 3 program counts.
        args: the runtime arguments, in declaration order.
        constexprs: every constexpr parameter by name.
        num_warps: warps per program.
    """
    info = _INFO.get(id(kernel))
    if info is None:
        info = _INFO[id(kernel)] = _KernelInfo(kernel)
    if not info.cacheable:
        kernel[grid](*args, **constexprs, num_warps=num_warps)
        return
    ordered = tuple(constexprs[name] for name in info.constexpr_names)
    device = torch.cuda.current_device()
    keys: list[Any] = []
    values: list[Any] = []
    for value, specialize in zip(args, info.specialize):
        if isinstance(value, torch.Tensor):
            address = value.data_ptr()
            keys.append(_tensor_key(value, address))
            values.append(address)
        else:
            keys.append(_arg_key(value, specialize))
            values.append(value)
    key = (tuple(keys), ordered, num_warps, device)
    compiled = info.compiled.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps)
        if hasattr(compiled, "packed_metadata") and hasattr(compiled, "run"):
            info.compiled[key] = compiled
        else:
            info.cacheable = False
        return
    runtime = knobs.runtime
    # Triton passes its hook chains (empty unless a profiler such as proton registered one).
    enter_hook: Any = runtime.launch_enter_hook
    exit_hook: Any = runtime.launch_exit_hook
    metadata = None
    if getattr(enter_hook, "calls", True) or getattr(exit_hook, "calls", True):
        metadata = compiled.launch_metadata(grid, _current_stream(device), *args, *ordered)
    else:
        enter_hook = exit_hook = None
    stream = _current_stream(device)
    compiled.run(
        grid[0],
        grid[1] if len(grid) > 1 else 1,
        grid[2] if len(grid) > 2 else 1,
        stream,
        compiled.function,
        compiled.packed_metadata,
        metadata,
        enter_hook,
        exit_hook,
        *values,
        *ordered,
    )
