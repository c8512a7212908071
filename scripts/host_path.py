"""Where does a cold normal-mode call spend its time? Host launch times vs device activity.

For each op (layout, dispatch BF16/FP8, cached dispatch, combine), one cold call (device idle,
as in bench_normal's end-to-end column) is traced with torch.profiler on rank 0, and every device
activity is listed with: when the host *launched* it (us after the call began), when it *started*
on the device, and how long it ran. A launch later than the previous activity's end means the
device waited for the host there. Also: cProfile of the host path (cumulative) per op.

Runs at any rank count, 1 included (one GPU: every row is local, the host path is the same):
``python3 scripts/host_path.py [--num-ranks N] [--tokens 4096] [--quick]``; to time another
checkout's code, name its ``src`` in ``PYTHONPATH`` (the functions below that it lacks are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

# scripts/ is on sys.path (this file's folder); profile_normal puts src/ there unless PYTHONPATH
# names a src (A/B runs of another commit).
from profile_normal import cprofile_calls, normal_ops

from epcomm.testing import parallel_launch


def _timeline(trace_path: str) -> list[str]:
    """Device activities of the traced call: (launch, start, duration) relative to the call's begin."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    call = next(e for e in events if e.get("name") == "host_path_call" and e.get("ph") == "X")
    begin, end = call["ts"], call["ts"] + call["dur"]
    launches = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver":
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launches[corr] = e
    rows = []
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            corr = e.get("args", {}).get("correlation")
            launch = launches.get(corr)
            if launch is None or not (begin <= launch["ts"] <= end):
                continue
            rows.append((launch["ts"] - begin, e["ts"] - begin, e["dur"], e["name"][:60]))
    rows.sort(key=lambda r: r[1])
    lines = [f"host call {call['dur']:.0f} us; device activities (launch / start / dur us):"]
    for launch_us, start_us, dur, name in rows:
        lines.append(f"  {launch_us:8.1f} {start_us:8.1f} {dur:8.1f}  {name}")
    if rows:
        last_end = max(r[1] + r[2] for r in rows)
        busy = sum(r[2] for r in rows)
        lines.append(
            f"  device busy {busy:.0f} us, last activity ends {last_end:.0f} us after the call began"
        )
    return lines


# (module, attribute path) of the host functions the breakdown times, inclusive.
_TIMED = [
    ("epcomm.buffer", "Buffer.dispatch"),
    ("epcomm.buffer", "Buffer.combine"),
    ("epcomm.buffer", "validation.split_x"),
    ("epcomm.buffer", "validation.check_topk"),
    ("epcomm.buffer", "check_tensor"),
    ("epcomm.buffer", "check_shape"),
    ("epcomm.buffer", "check_dtype"),
    ("epcomm.buffer", "check_same_device"),
    ("epcomm.buffer", "Buffer.get_dispatch_config"),
    ("epcomm.buffer", "Buffer._stream_for"),
    ("epcomm.event", "StreamContext.finish"),
    ("epcomm.backends.nvlink.backend", "NvlinkBackend.dispatch"),
    ("epcomm.backends.nvlink.backend", "NvlinkBackend.combine"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal.dispatch"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal._cached_dispatch"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal.combine"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal._copy_out_payload"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal._ensure_rows"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal._words"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal.check_worst"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal._dispatch_areas"),
    ("epcomm.backends.nvlink.normal", "NvlinkNormal._barriers"),
    ("epcomm.backends.nvlink.normal", "launch_dispatch_counts"),
    ("epcomm.backends.nvlink.normal", "launch_push_rows"),
    ("epcomm.backends.nvlink.normal", "launch_copy_out_meta"),
    ("epcomm.backends.nvlink.normal", "launch_combine_rows"),
    ("epcomm.backends.nvlink.normal", "launch_combine_reduce"),
    ("epcomm.backends.nvlink.normal", "DispatchHandle"),
    ("epcomm.backends.nvlink.normal", "DispatchRegions"),
    ("epcomm.backends.nvlink.normal", "_HostCounts.read_table"),
    ("epcomm.backends.nvlink.symmetric_buffer", "SymmetricBuffer.check_error"),
    ("epcomm.backends.nvlink.symmetric_buffer", "SymmetricBuffer.view"),
    ("epcomm.event", "stream_wait"),
    ("torch.cuda", "current_stream"),
    ("torch", "empty"),
    ("torch", "Tensor.clone"),
    ("torch", "Tensor.view"),
    ("torch", "Tensor.contiguous"),
    ("epcomm.kernels.barrier", "launch"),
    ("epcomm.kernels.normal_push", "launch"),
    ("epcomm.kernels.normal_rows", "launch"),
    ("epcomm.kernels.normal_copy_out", "launch"),
    ("epcomm.kernels.normal_combine", "launch"),
]


# Context managers timed at entry and at exit separately.
_TIMED_CONTEXTS = [("epcomm.buffer", "comm_stream_scope"), ("torch.cuda", "stream")]


def _instrument() -> dict[str, list[int]]:
    """Wrap every ``_TIMED`` function with a perf_counter_ns accumulator: name -> [ns, calls]."""
    import contextlib
    import functools
    import importlib
    import time

    totals: dict[str, list[int]] = {}
    for module_name, attr in _TIMED_CONTEXTS:
        module = importlib.import_module(module_name)
        original_cm = getattr(module, attr)
        enter = totals.setdefault(f"{module_name}:{attr} (enter)", [0, 0])
        leave = totals.setdefault(f"{module_name}:{attr} (exit)", [0, 0])

        @contextlib.contextmanager
        def timed_cm(*args, _original=original_cm, _enter=enter, _leave=leave, **kwargs):
            begin = time.perf_counter_ns()
            manager = _original(*args, **kwargs)
            value = manager.__enter__()
            _enter[0] += time.perf_counter_ns() - begin
            _enter[1] += 1
            try:
                yield value
            finally:
                begin = time.perf_counter_ns()
                manager.__exit__(None, None, None)
                _leave[0] += time.perf_counter_ns() - begin
                _leave[1] += 1

        setattr(module, attr, timed_cm)
    for module_name, path in _TIMED:
        try:
            owner = importlib.import_module(module_name)
        except ModuleNotFoundError:  # not in the code under test: nothing to time
            continue
        *parents, attr = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        original = getattr(owner, attr, None)
        if original is None:  # not in the code under test
            continue
        key = f"{module_name.rsplit('.', 1)[-1]}:{path}"
        slot = totals.setdefault(key, [0, 0])

        def wrapped(*args, _original=original, _slot=slot, **kwargs):
            begin = time.perf_counter_ns()
            try:
                return _original(*args, **kwargs)
            finally:
                _slot[0] += time.perf_counter_ns() - begin
                _slot[1] += 1

        functools.update_wrapper(wrapped, original)
        if isinstance(owner, type) and isinstance(owner.__dict__.get(attr), staticmethod):
            setattr(owner, attr, staticmethod(wrapped))
        else:
            setattr(owner, attr, wrapped)
    return totals


def _calibrate(device: torch.device) -> str:
    """Host cost of one bare launch on this machine: a torch op."""
    t = torch.zeros(16, device=device)
    for _ in range(20):
        t.add_(1)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(200):
        t.add_(1)
    torch_us = (time.perf_counter() - begin) / 200 * 1e6
    torch.cuda.synchronize()
    return f"calibration: torch add_ {torch_us:.1f} us host per launch"


def _host_walls(fn: Callable[[], object], calls: int = 20) -> list[float]:
    """Sorted host wall times (us) of ``calls`` cold calls (device idle, ranks together before each)."""
    walls = []
    for _ in range(calls):
        torch.cuda.synchronize()
        dist.barrier()
        begin = time.perf_counter()
        fn()
        walls.append((time.perf_counter() - begin) * 1e6)
    torch.cuda.synchronize()
    return sorted(walls)


def worker(pgi, tokens: int, hidden: int, experts: int, topk: int, sms: int, quick: bool = False) -> str:
    ops = list(normal_ops(pgi, tokens, hidden, experts, topk, sms).items())
    lines = [f"== rank {pgi.rank} of {pgi.world_size}, {tokens} tokens, {sms} SMs"]
    for name, fn in ops:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        # Cold call, end-to-end with events (device idle at the start, as in bench_normal).
        times = []
        for _ in range(10):
            dist.barrier()
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        times.sort()
        lines.append(
            f"== {name}: cold call end-to-end median {times[len(times) // 2]:.0f} us (min {times[0]:.0f})"
        )
        if quick:
            walls = _host_walls(fn)
            lines.append(f"   {name}: host call wall median {walls[10]:.0f} us (min {walls[0]:.0f})")
            continue
        text = cprofile_calls(pgi, fn, "cumulative", 25)
        if text is not None:
            lines.append(f"-- cProfile {name} (10 calls, cumulative)\n" + text)
        dist.barrier()
        torch.cuda.synchronize()
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            with torch.profiler.record_function("host_path_call"):
                fn()
            torch.cuda.synchronize()
        if pgi.rank == 0:
            path = os.path.join(tempfile.gettempdir(), f"host_path_{name}.json")
            prof.export_chrome_trace(path)
            lines.extend(_timeline(path))
    if quick:
        return "\n".join(lines)
    # Host breakdown: inclusive wall time of every wrapped function per cold call (device idle
    # before each call, as in the end-to-end column), and the whole call's host wall time.
    totals = _instrument()
    lines.append(_calibrate(pgi.device))
    for name, fn in ops[1:]:
        for slot in totals.values():
            slot[0] = slot[1] = 0
        walls = _host_walls(fn)
        lines.append(f"== host breakdown {name}: call wall median {walls[10]:.0f} us (min {walls[0]:.0f})")
        for key, (ns, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
            if calls:
                lines.append(f"  {ns / 20 / 1e3:8.1f} us/call  {calls / 20:4.1f} x  {key}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-ranks", type=int, default=torch.cuda.device_count())
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--sms", type=int, default=24)
    p.add_argument("--quick", action="store_true", help="cold-call times and host wall only (any commit)")
    args = p.parse_args()
    results = parallel_launch(
        args.num_ranks, worker, args.tokens, 7168, 256, 8, args.sms, args.quick, backend="nccl", timeout_s=600
    )
    print(results[0])


if __name__ == "__main__":
    main()
