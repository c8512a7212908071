"""Host cost of one launch on this machine, by path: torch ops, Triton's own call path, epcomm's
cached ``launch`` and the bare compiled launcher (one GPU, no process group).

``PYTHONPATH=src python3 scripts/launch_cost.py``
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl

sys.path.insert(0, "src")
from epcomm.kernels.launch import launch


@triton.jit(do_not_specialize=["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9"])
def wide_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, N: tl.constexpr
):
    if tl.program_id(0) == 0:
        tl.store(p0, a0 + a9)


@triton.jit
def narrow_kernel(p0, N: tl.constexpr):
    if tl.program_id(0) == 0:
        tl.store(p0, 1)


def per_call_us(fn: Callable[[], object], n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(n):
        fn()
    spent = time.perf_counter() - begin
    torch.cuda.synchronize()
    return spent / n * 1e6


def main() -> None:
    t = torch.zeros(64, dtype=torch.int32, device="cuda")
    tensors = [t[i * 4 :] for i in range(10)]
    ints = list(range(3, 13))
    args = (*tensors, *ints)
    launch(wide_kernel, (4,), args, {"N": 1}, 4)
    launch(wide_kernel, (4,), args, {"N": 1}, 4)
    compiled = wide_kernel[(4,)](*args, N=1, num_warps=4)
    stream = torch.cuda.current_stream().cuda_stream
    addresses = (*(x.data_ptr() for x in tensors), *ints)
    run = compiled.run
    rows = [
        ("torch.empty(16)", lambda: torch.empty(16, device="cuda")),
        ("tensor.add_(1)", lambda: t.add_(1)),
        ("tensor[4:] view", lambda: t[4:]),
        ("tensor.data_ptr()", lambda: t.data_ptr()),
        ("torch.cuda.current_device()", torch.cuda.current_device),
        ("torch.cuda.Event().record()", lambda: torch.cuda.Event().record()),
        ("triton narrow kernel[grid](1 arg)", lambda: narrow_kernel[(1,)](t, N=1)),
        ("epcomm launch narrow (1 arg)", lambda: launch(narrow_kernel, (1,), (t,), {"N": 1}, 4)),
        ("triton wide kernel[grid](20 args)", lambda: wide_kernel[(4,)](*args, N=1, num_warps=4)),
        ("epcomm launch wide (20 args)", lambda: launch(wide_kernel, (4,), args, {"N": 1}, 4)),
        (
            "compiled.run wide, ints",
            lambda: run(
                4, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *addresses, 1
            ),
        ),
        (
            "compiled.run wide, tensors",
            lambda: run(
                4, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, 1
            ),
        ),
        (
            "launcher C call only, ints",
            lambda: run.launch(
                4,
                1,
                1,
                stream,
                compiled.function,
                False,
                False,
                None,
                None,
                compiled.packed_metadata,
                None,
                None,
                None,
                *addresses,
                1,
            ),
        ),
    ]
    for name, fn in rows:
        print(f"{per_call_us(fn):8.2f} us  {name}")


if __name__ == "__main__":
    main()
