"""Probe: can a copy-engine copy wait on a flag a Triton kernel releases (``cuStreamWaitValue32``)?

Checks, on one GPU: the stream-memory-operation attributes; that a ``cuMemcpyDtoDAsync`` queued
behind ``cuStreamWaitValue32`` on a side stream does not start before a kernel on the main stream
releases the flag, and then copies the kernel's data; the host cost of the two driver calls; and
whether the profiler attributes such copies to a ``record_function`` range (the bench's ``GPU us``).

    PYTHONPATH=src:benchmarks python3 scripts/probe_stream_wait.py   (the same fence / release as the push)
"""

from __future__ import annotations

import ctypes
import time

import torch
import triton
import triton.language as tl

from epcomm.kernels.primitives import fence_acq_rel_sys, signal_release_sys


@triton.jit
def _write_then_release(data_ptr, flag_ptr, value, epoch, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(data_ptr + offs, value, mask=offs < n)
    fence_acq_rel_sys()
    tl.debug_barrier()
    done = tl.atomic_add(flag_ptr + 1, 1, sem="acq_rel", scope="sys")
    if done == tl.num_programs(0) - 1:
        tl.store(flag_ptr + 1, 0)
        signal_release_sys(flag_ptr, epoch)


def main() -> None:
    cuda = ctypes.CDLL("libcuda.so.1")
    torch.zeros(1, device="cuda")
    for name, code in [
        ("STREAM_MEM_OPS(v1)", 92),
        ("64_BIT_MEM_OPS", 122),
        ("WAIT_VALUE_NOR", 123),
        ("FLUSH_REMOTE_WRITES", 98),
    ]:
        value = ctypes.c_int()
        rc = cuda.cuDeviceGetAttribute(ctypes.byref(value), code, 0)
        print(f"attribute {name} ({code}): rc={rc} value={value.value}")
    wait = getattr(cuda, "cuStreamWaitValue32_v2", None)
    print("cuStreamWaitValue32_v2 exported:", wait is not None)
    if wait is None:
        wait = cuda.cuStreamWaitValue32
    wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    copy = cuda.cuMemcpyDtoDAsync_v2
    copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]

    n = 16 << 20  # int32 words (64 MB)
    flag = torch.zeros(2, dtype=torch.int32, device="cuda")
    src = torch.zeros(n, dtype=torch.int32, device="cuda")
    dst = torch.zeros(n, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    main_stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    for epoch in range(1, 4):
        torch.cuda._sleep(200_000_000)  # ~0.1 s on the main stream before the kernel
        _write_then_release[(triton.cdiv(n, 4096),)](src, flag, 7 + epoch, epoch, n, BLOCK=4096)
        rc_w = wait(ctypes.c_void_p(side.cuda_stream), flag.data_ptr(), epoch, 0)  # GEQ
        rc_c = copy(dst.data_ptr(), src.data_ptr(), n * 4, ctypes.c_void_p(side.cuda_stream))
        done = torch.cuda.Event()
        done.record(side)
        time.sleep(0.02)
        early = done.query()
        main_stream.wait_event(done)
        torch.cuda.synchronize()
        ok = bool((dst == 7 + epoch).all())
        print(
            f"epoch {epoch}: rc wait={rc_w} copy={rc_c}; copy done before the kernel released: {early}; data ok: {ok}"
        )

    # Host cost of wait + copy (flag already satisfied), 1000 pairs.
    small = 4096
    t0 = time.perf_counter()
    for _ in range(1000):
        wait(ctypes.c_void_p(side.cuda_stream), flag.data_ptr(), 1, 0)
        copy(dst.data_ptr(), src.data_ptr(), small, ctypes.c_void_p(side.cuda_stream))
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"host cost per (wait + copy) pair: {(t1 - t0) * 1e3:.2f} us")
    t0 = time.perf_counter()
    for _ in range(1000):
        dst[:1024].copy_(src[:1024])
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"host cost per torch slice copy_: {(t1 - t0) * 1e3:.2f} us")

    # Copy-engine rate of one 64 MB device copy and of 16 4 MB copies behind satisfied waits.
    for parts in (1, 16):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(side)
        step = n // parts
        for i in range(parts):
            wait(ctypes.c_void_p(side.cuda_stream), flag.data_ptr(), 1, 0)
            copy(
                dst.data_ptr() + 4 * i * step,
                src.data_ptr() + 4 * i * step,
                step * 4,
                ctypes.c_void_p(side.cuda_stream),
            )
        end.record(side)
        torch.cuda.synchronize()
        ms = start.elapsed_time(end)
        print(
            f"{parts} copies of 64 MB total: {ms * 1e3:.1f} us = {n * 4 * 2 / ms / 1e6:.0f} GB/s (read+write)"
        )

    # Does the profiler attribute driver-API copies to a record_function range?
    try:
        from common import GPU_MARKER, gpu_activity_us

        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(3):
                with torch.profiler.record_function(GPU_MARKER):
                    wait(ctypes.c_void_p(side.cuda_stream), flag.data_ptr(), 1, 0)
                    copy(dst.data_ptr(), src.data_ptr(), n * 4, ctypes.c_void_p(side.cuda_stream))
                    ev = torch.cuda.Event()
                    ev.record(side)
                    main_stream.wait_event(ev)
                torch.cuda.synchronize()
        print("profiled sums (us):", gpu_activity_us(prof.profiler.kineto_results.events(), GPU_MARKER))
    except Exception as exc:
        print("profiler attribution failed:", repr(exc))


if __name__ == "__main__":
    main()
