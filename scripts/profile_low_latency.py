"""Where does the fixed cost of low-latency dispatch / combine go? A per-kernel breakdown on rank 0.

For each token count (default 1 and 128 tokens per rank; capacity 128, hidden 7168, top-8 of 256,
FP8 dispatch, bf16 combine, DeepEP-style routing from ``epcomm.testing.make_routing``), on every visible
GPU:

(a) eager calls under ``torch.profiler`` (CPU + CUDA activity), after warm-up, ``--iters`` times
    each: ``low_latency_dispatch``, ``low_latency_combine``, the send-only dispatch
    (``return_recv_hook=True``) and its hook, the send-only combine and its hook. Every kernel /
    memcpy / memset each call launched (count per call, GPU time), the CUDA runtime/driver calls
    and torch ops it made on the host, and its host time. A barrier (device sync + host barrier)
    precedes every call and a device sync follows it, outside the measured range, so each call's
    GPU work is attributed to it alone; the receive phase's time still includes waiting for the
    peers' sends of the same call, the hook's does not (its peers' sends are done).
(b) the same calls captured in CUDA graphs, ``--replays`` replays back to back timed with CUDA
    events (median of 3 such runs; rank 0 and the slowest rank): dispatch, combine, send only,
    hook alone (flags already set, so it never waits: the receive phase's own cost), send + hook,
    the same for combine, and graphs of 1 and 4 tiny dependent kernels (the per-node floor).
(c) the graph replays of (b) under the profiler: each kernel's GPU time inside the graph and the
    idle gaps between them (span - busy).

    python3 scripts/profile_low_latency.py [--tokens 1,128] [--iters 5]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import epcomm
from epcomm import quant
from epcomm.testing import ProcessGroupInfo, make_routing, parallel_launch
from timing import capture_graph

_PREFIX = "epc|"
_DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
_API_CATEGORIES = ("cuda_runtime", "cuda_driver")
_NAME_WIDTH = 72


class _Calls:
    """The low-latency calls of one setting, with the state they pass to each other."""

    def __init__(
        self,
        buffer: epcomm.Buffer,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        weights: torch.Tensor,
        capacity: int,
        experts: int,
    ) -> None:
        self.buffer, self.x, self.topk_idx, self.weights = buffer, x, topk_idx, weights
        self.capacity, self.experts = capacity, experts
        self.recv: Any = None
        self.handle: Any = None
        self.dispatch_hook: Callable[[], None] = _nothing
        self.combine_hook: Callable[[], None] = _nothing
        self.expert_out: torch.Tensor | None = None
        self.combine_handle: Any = None

    def dispatch(self, hook: bool = False) -> None:
        recv, _, handle, _, recv_hook = self.buffer.low_latency_dispatch(
            self.x, self.topk_idx, self.capacity, self.experts, use_fp8=True, return_recv_hook=hook
        )
        self.recv, self.handle, self.dispatch_hook = recv, handle, recv_hook

    def dispatch_send(self) -> None:
        self.dispatch(hook=True)

    def run_dispatch_hook(self) -> None:
        self.dispatch_hook()

    def combine(self, hook: bool = False) -> None:
        assert self.expert_out is not None
        _, _, recv_hook = self.buffer.low_latency_combine(
            self.expert_out, self.topk_idx, self.weights, self.combine_handle, return_recv_hook=hook
        )
        self.combine_hook = recv_hook

    def combine_send(self) -> None:
        self.combine(hook=True)

    def run_combine_hook(self) -> None:
        self.combine_hook()


def _nothing() -> None:
    """Placeholder hook before the first call."""


def _back_to_back_us(
    fns: Sequence[Callable[[], Any]], replays: int, barrier: Callable[[], None], repeats: int = 3
) -> float:
    """Microseconds per round of ``fns`` issued ``replays`` times back to back; median of ``repeats``."""
    times = []
    for _ in range(repeats):
        barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            for fn in fns:
                fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return statistics.median(times)


# ---- trace parsing ------------------------------------------------------------------------------


def _trace_events(prof: Any) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e]


def _attribute(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per annotated call: its host time, API calls, torch ops and device activities.

    A host event belongs to the annotation that contains it; a device activity to the call whose
    launch (same correlation id) it came from (none if launched outside every call, as the
    barriers' all_reduce), else, when its launch was not recorded, to the call whose window (its
    start to the next call's start) contains it (every call is followed by a device sync).
    """
    marks = sorted(
        (
            e
            for e in events
            if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(_PREFIX)
        ),
        key=lambda e: float(e["ts"]),
    )
    calls = [
        {
            "label": str(m["name"]).split("|")[1],
            "start": float(m["ts"]),
            "end": float(m["ts"]) + float(m.get("dur", 0)),
            "host_us": float(m.get("dur", 0)),
            "api": [],
            "ops": [],
            "device": [],
        }
        for m in marks
    ]
    starts = [c["start"] for c in calls]

    def window(ts: float, inside: bool) -> dict[str, Any] | None:
        index = bisect.bisect_right(starts, ts) - 1
        if index < 0:
            return None
        call = calls[index]
        return call if not inside or ts <= call["end"] else None

    by_correlation: dict[Any, dict[str, Any] | None] = {}
    for e in events:
        category = e.get("cat")
        if category in _API_CATEGORIES or category == "cpu_op":
            call = window(float(e["ts"]), inside=True)
            correlation = e.get("args", {}).get("correlation")
            if category in _API_CATEGORIES and correlation is not None:
                by_correlation[correlation] = call  # None: launched outside the calls (barriers)
            if call is not None:
                call["api" if category in _API_CATEGORIES else "ops"].append(e)
    for e in events:
        if e.get("cat") in _DEVICE_CATEGORIES:
            correlation = e.get("args", {}).get("correlation")
            if correlation in by_correlation:
                call = by_correlation[correlation]
            else:
                call = window(float(e["ts"]), inside=False)
            if call is not None:
                call["device"].append(e)
    return calls


def _short(name: str) -> str:
    name = name.removeprefix("void ")
    return name if len(name) <= _NAME_WIDTH else name[: _NAME_WIDTH - 3] + "..."


def _table(
    title: str, groups: dict[str, list[float]], num_calls: int, streams: dict[str, set[Any]]
) -> list[str]:
    lines = [
        f"    {title:{_NAME_WIDTH}} {'n/call':>6} {'avg us':>8} {'min us':>8} {'max us':>8} {'us/call':>8}"
    ]
    for name, durations in sorted(groups.items(), key=lambda item: -sum(item[1])):
        stream = (
            f"  stream {','.join(str(s) for s in sorted(streams[name], key=str))}"
            if streams.get(name)
            else ""
        )
        lines.append(
            f"    {_short(name):{_NAME_WIDTH}} {len(durations) / num_calls:6.1f} {statistics.mean(durations):8.2f} "
            f"{min(durations):8.2f} {max(durations):8.2f} {sum(durations) / num_calls:8.2f}{stream}"
        )
    return lines


def _summarize(calls: list[dict[str, Any]], title: str) -> list[str]:
    lines = []
    for label in dict.fromkeys(c["label"] for c in calls):
        group = [c for c in calls if c["label"] == label]
        n = len(group)
        spans, busy, launches = [], [], []
        kernels: dict[str, list[float]] = defaultdict(list)
        streams: dict[str, set[Any]] = defaultdict(set)
        api: dict[str, list[float]] = defaultdict(list)
        ops: dict[str, list[float]] = defaultdict(list)
        for call in group:
            device = call["device"]
            launches.append(len(device))
            busy.append(sum(float(e.get("dur", 0)) for e in device))
            if device:
                spans.append(
                    max(float(e["ts"]) + float(e.get("dur", 0)) for e in device)
                    - min(float(e["ts"]) for e in device)
                )
            for e in device:
                kernels[str(e["name"])].append(float(e.get("dur", 0)))
                streams[str(e["name"])].add(e.get("args", {}).get("stream"))
            for e in call["api"]:
                api[str(e["name"])].append(float(e.get("dur", 0)))
            for e in call["ops"]:
                ops[str(e["name"])].append(float(e.get("dur", 0)))
        host = statistics.median(c["host_us"] for c in group)
        api_us = sum(sum(v) for v in api.values()) / n
        span = statistics.median(spans) if spans else 0.0
        gpu_busy = statistics.median(busy)
        lines.append(
            f"  == {title} {label} ({n} calls, medians): host {host:.1f} us/call (CUDA API {api_us:.1f}, "
            f"the rest Python); GPU {statistics.mean(launches):.1f} activities/call, busy {gpu_busy:.1f} us, "
            f"span {span:.1f} us, gaps {span - gpu_busy:.1f} us"
        )
        if kernels:
            lines += _table("GPU kernel / memcpy / memset", kernels, n, streams)
        else:
            lines.append("    (no GPU activity recorded)")
        if api:
            lines += _table("host: CUDA runtime / driver call", api, n, {})
        if ops:
            lines += _table("host: torch op (nested ones counted too)", ops, n, {})
    return lines


# ---- the worker -----------------------------------------------------------------------------------


def _profiled(
    sequence: Sequence[tuple[str, Callable[[], Any]]], iters: int, barrier: Callable[[], None], rank: int
) -> list[dict[str, Any]] | str:
    """Run ``sequence`` ``iters`` times under the profiler; rank 0 gets the attributed calls.

    Only the profiler's own start / stop failures are caught (the same on every rank); a failing
    call raises, and ``parallel_launch`` reports it and stops the other ranks.
    """
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    prof = torch.profiler.profile(activities=activities)
    try:
        prof.start()
    except Exception as exc:
        return f"  profiler failed to start: {type(exc).__name__}: {exc}"
    barrier()
    for _ in range(iters):
        for label, fn in sequence:
            barrier()
            with torch.profiler.record_function(f"{_PREFIX}{label}"):
                fn()
            torch.cuda.synchronize()
    barrier()
    try:
        prof.stop()
    except Exception as exc:
        return f"  profiler failed to stop: {type(exc).__name__}: {exc}"
    if rank != 0:
        return []
    try:
        return _attribute(_trace_events(prof))
    except Exception as exc:  # keep the ranks in step: the other ranks go on regardless
        return f"  trace parsing failed: {type(exc).__name__}: {exc}"


def _setting(
    pgi: ProcessGroupInfo,
    buffer: epcomm.Buffer,
    tokens: int,
    capacity: int,
    hidden: int,
    experts: int,
    topk: int,
    iters: int,
    replays: int,
    barrier: Callable[..., None],
) -> tuple[list[str], dict[str, float]]:
    generator = torch.Generator(device=pgi.device).manual_seed(1000 + pgi.rank)
    x = torch.randn(tokens, hidden, generator=generator, device=pgi.device).bfloat16()
    topk_idx, weights = make_routing(tokens, experts, topk, seed=0, rank=pgi.rank, device=pgi.device)
    calls = _Calls(buffer, x, topk_idx, weights, capacity, experts)

    # Warm-up: compile every kernel with the GPU idle (a module load can wait behind a spinning
    # kernel), then a few plain rounds.
    calls.dispatch()
    barrier(device=False)  # no NCCL work in flight while compiling and capturing graphs
    calls.expert_out = quant.per_token_cast_back(*calls.recv).contiguous()
    calls.combine_handle = calls.handle
    eager = [
        ("dispatch", calls.dispatch),
        ("combine", calls.combine),
        ("dispatch_send", calls.dispatch_send),
        ("dispatch_hook", calls.run_dispatch_hook),
        ("combine_send", calls.combine_send),
        ("combine_hook", calls.run_combine_hook),
    ]
    for _ in range(3):
        for _label, fn in eager:
            fn()
            barrier(device=False)
    calls.combine_handle = calls.handle  # a received handle of the hook dispatch, kept for graphs

    # (b) graphs and their timings.
    graphs = {
        "dispatch": capture_graph(calls.dispatch)[0],
        "combine": capture_graph(calls.combine)[0],
        "dispatch_send": capture_graph(calls.dispatch_send)[0],
    }
    graphs["dispatch_hook"] = capture_graph(calls.run_dispatch_hook)[0]
    graphs["combine_send"] = capture_graph(calls.combine_send)[0]
    graphs["combine_hook"] = capture_graph(calls.run_combine_hook)[0]
    tiny = torch.zeros(1, device=pgi.device)
    one = capture_graph(lambda: tiny.add_(1))[0]
    four = capture_graph(lambda: [tiny.add_(1) for _ in range(4)])[0]
    barrier()
    g = graphs
    timings = {
        "dispatch": _back_to_back_us([g["dispatch"].replay], replays, barrier),
        "combine": _back_to_back_us([g["combine"].replay], replays, barrier),
        "dispatch + combine": _back_to_back_us([g["dispatch"].replay, g["combine"].replay], replays, barrier),
        "dispatch send only (return_recv_hook)": _back_to_back_us(
            [g["dispatch_send"].replay], replays, barrier
        ),
        "dispatch hook alone (never waits)": _back_to_back_us([g["dispatch_hook"].replay], replays, barrier),
        "dispatch send + hook": _back_to_back_us(
            [g["dispatch_send"].replay, g["dispatch_hook"].replay], replays, barrier
        ),
        "combine send only (return_recv_hook)": _back_to_back_us(
            [g["combine_send"].replay], replays, barrier
        ),
        "combine hook alone (never waits)": _back_to_back_us([g["combine_hook"].replay], replays, barrier),
        "combine send + hook": _back_to_back_us(
            [g["combine_send"].replay, g["combine_hook"].replay], replays, barrier
        ),
        "graph of 1 tiny kernel": _back_to_back_us([one.replay], replays, barrier),
        "graph of 4 dependent tiny kernels": _back_to_back_us([four.replay], replays, barrier),
    }

    # (a) eager and (c) graph replays under the profiler.
    lines: list[str] = []
    result = _profiled(eager, iters, barrier, pgi.rank)
    if isinstance(result, str):
        lines.append(result)
    elif pgi.rank == 0:
        lines += _summarize(result, "eager")
    graph_sequence = [(f"graph:{name}", g[name].replay) for name in g]
    result = _profiled(graph_sequence, iters, barrier, pgi.rank)
    if isinstance(result, str):
        lines.append(result)
    elif pgi.rank == 0:
        lines += _summarize(result, "replay of")
    barrier(device=False)
    del graphs, g, one, four
    return lines, timings


def worker(
    pgi: ProcessGroupInfo,
    token_counts: list[int],
    capacity: int,
    hidden: int,
    experts: int,
    topk: int,
    iters: int,
    replays: int,
) -> dict[str, Any]:
    """Profile every token count on this rank; rank 0 returns the breakdown text."""
    host_group = dist.new_group(backend="gloo")
    sync = torch.zeros(1, dtype=torch.int32, device=pgi.device)

    def barrier(device: bool = True) -> None:
        torch.cuda.synchronize()
        dist.barrier(group=host_group)
        if device:
            # Device barrier (as bench_low_latency.py): enqueued, not waited for by the host, so
            # the ranks' GPUs start the next call together despite the host barrier's skew.
            dist.all_reduce(sync, group=pgi.group)

    size = epcomm.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, pgi.world_size, experts)
    buffer = epcomm.Buffer(pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend="nvlink")
    profiles: dict[int, list[str]] = {}
    timings: dict[int, dict[str, float]] = {}
    try:
        for tokens in token_counts:
            profiles[tokens], timings[tokens] = _setting(
                pgi, buffer, tokens, capacity, hidden, experts, topk, iters, replays, barrier
            )
    finally:
        torch.cuda.synchronize()
        buffer.destroy()
    return {"profiles": profiles if pgi.rank == 0 else {}, "timings": timings}


def main(argv: Sequence[str] | None = None) -> int:
    """Launch one process per GPU and print rank 0's breakdown and the graph timings."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-ranks", type=int, default=torch.cuda.device_count())
    parser.add_argument("--tokens", default="1,128", help="tokens per rank, comma separated")
    parser.add_argument("--capacity", type=int, default=128, help="num_max_dispatch_tokens_per_rank (min)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5, help="profiled calls of each kind")
    parser.add_argument("--replays", type=int, default=50, help="graph replays per timing")
    args = parser.parse_args(argv)
    if args.num_ranks < 2:
        print("needs 2 or more CUDA GPUs", file=sys.stderr)
        return 2
    begin = time.perf_counter()
    token_counts = [int(v) for v in args.tokens.split(",")]
    capacity = max(args.capacity, *token_counts)
    results = parallel_launch(
        args.num_ranks,
        worker,
        token_counts,
        capacity,
        args.hidden,
        args.experts,
        args.topk,
        args.iters,
        args.replays,
        backend="nccl",
        timeout_s=240,
    )
    print(
        f"EP{args.num_ranks} on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton "
        f"{triton.__version__}; capacity {capacity}, hidden {args.hidden}, top-{args.topk} of {args.experts}, "
        f"FP8 dispatch, bf16 combine"
    )
    for tokens in token_counts:
        print(f"\n######## {tokens} tokens per rank ########")
        print(f"(b) CUDA graphs, {args.replays} replays back to back, us per replay (median of 3):")
        print(f"    {'graph':44} {'rank 0':>8} {'slowest':>8}")
        for name, value in results[0]["timings"][tokens].items():
            slowest = max(r["timings"][tokens][name] for r in results)
            print(f"    {name:44} {value:8.1f} {slowest:8.1f}")
        rank0 = results[0]["timings"][tokens]
        print(
            f"    => dispatch recv phase (send + hook - send): "
            f"{rank0['dispatch send + hook'] - rank0['dispatch send only (return_recv_hook)']:.1f} us; "
            f"combine recv phase: {rank0['combine send + hook'] - rank0['combine send only (return_recv_hook)']:.1f} us"
        )
        print(f"\n(a) eager and (c) graph replays under torch.profiler, rank 0, {args.iters} calls each:")
        print("\n".join(results[0]["profiles"][tokens]))
    print(f"\ntotal wall time {time.perf_counter() - begin:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
