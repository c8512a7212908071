"""Timing of one benchmarked call: CUDA events (wall clock on CPU), back to back, CUDA graphs.

``time_op``: per iteration an L2 flush, ``cuda.synchronize()``, a host barrier, then on CUDA a
device barrier (an NCCL ``all_reduce`` of one int32 enqueued on the stream, not waited for by the
host) right before the start event, so every rank's GPU starts the timed call together and the host
barrier's skew between ranks (up to ~100s of us) is not timed; the same for every backend and
baseline. Host work inside the timed call (a dispatch's CPU read of its counts) is still timed.

``time_back_to_back``: DeepEP's ``bench`` method (calls back to back, the host running ahead).
Device time (DeepEP's ``bench_kineto`` method) is in ``device_time.py``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["capture_graph", "maybe_nvtx", "median", "time_back_to_back", "time_op"]


def capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` captured in a CUDA graph (after one eager call on a side stream, as PyTorch asks),
    with the output of the captured call (its tensors are the graph's; replays overwrite them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    torch.cuda.synchronize()
    return graph, output


def time_op(
    fn: Callable[[int], object],
    *,
    num_slots: int,
    warmup: int,
    iters: int,
    barrier: Callable[[], None],
    cuda: bool,
    refresh: Callable[[int], None] | None = None,
    flush: torch.Tensor | None = None,
    device_barrier: Callable[[], None] | None = None,
) -> list[float]:
    """Time ``fn(slot)`` once per iteration; return the ``iters`` times in microseconds.

    Every iteration: overwrite the L2 flush buffer (if any), wait for the device, ``barrier()`` (all
    ranks start together), ``device_barrier()`` (if given), then time ``fn`` alone with CUDA events
    (wall clock on CPU), then ``refresh(slot)`` (fresh random data in the input set just used; not
    timed). Iteration ``i`` uses input set ``i % num_slots``, so with enough slots the inputs are not
    served from L2.

    Why a device barrier: ranks leave the host barrier up to ~100s of us apart, so without it the
    first collective kernel of ``fn`` waits on the GPU for the slowest rank and that host skew is
    timed. ``device_barrier`` enqueues a collective on the stream (the benchmarks pass an NCCL
    ``all_reduce`` of one element) without blocking the host: the start event then fires only when
    every rank's stream has reached it, while the host already enqueues ``fn`` behind it. Host work
    inside ``fn`` (e.g. a dispatch reading its counts on the CPU) is still timed.

    Arguments:
        fn: the operation; called with the input slot.
        num_slots: how many preallocated input sets ``fn`` rotates through.
        warmup: untimed iterations first (compilation, buffer growth, allocator).
        iters: timed iterations.
        barrier: host barrier over all ranks (after the device finished).
        cuda: use CUDA events (else ``time.perf_counter``).
        refresh: called with the slot after each iteration.
        flush: a large device buffer to overwrite before each iteration (evicts L2).
        device_barrier: enqueues a barrier over all ranks on the current stream, called after
            ``barrier()`` and before the start event (CUDA only; ignored when ``cuda`` is false).

    Returns:
        ``iters`` times in microseconds.
    """
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    wall: list[float] = []
    for it in range(warmup + iters):
        slot = it % num_slots
        if flush is not None:
            flush.zero_()
        if cuda:
            torch.cuda.synchronize()
        barrier()
        if cuda:
            if device_barrier is not None:
                device_barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(slot)
            end.record()
            if it >= warmup:
                events.append((start, end))
        else:
            t0 = time.perf_counter()
            fn(slot)
            elapsed = time.perf_counter() - t0
            if it >= warmup:
                wall.append(elapsed * 1e6)
        if refresh is not None:
            refresh(slot)
    if cuda:
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e3 for start, end in events]
    return wall


def time_back_to_back(
    fn: Callable[[int], object],
    *,
    num_slots: int,
    iters: int,
    barrier: Callable[[], None],
    cuda: bool,
    device_barrier: Callable[[], None] | None = None,
) -> list[float]:
    """DeepEP's ``bench`` method: after one host and one device barrier, ``iters + 1`` calls back
    to back with CUDA events around each (no synchronization, barrier or flush in between, so the
    host enqueues ahead while the device works, except where ``fn`` itself synchronizes); the first
    call is dropped. Input set ``i % num_slots`` each call (rotated, so not served from L2 with
    enough slots). Returns ``iters`` times in microseconds (wall clock on CPU). Run it after
    ``time_op`` (warmed up).
    """
    if cuda:
        torch.cuda.synchronize()
    barrier()
    if cuda and device_barrier is not None:
        device_barrier()
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    wall: list[float] = []
    for it in range(iters + 1):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(it % num_slots)
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            fn(it % num_slots)
            wall.append((time.perf_counter() - t0) * 1e6)
    if cuda:
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e3 for start, end in events[1:]]
    return wall[1:]


def median(values: Sequence[float]) -> float:
    """The median of ``values`` as a float (``statistics.median``): one rank's time from its samples."""
    return float(statistics.median(values))


@contextlib.contextmanager
def maybe_nvtx(name: str, enabled: bool) -> Iterator[None]:
    """An NVTX range around a block when profiling (``--nvtx``), else nothing."""
    if enabled and torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield
