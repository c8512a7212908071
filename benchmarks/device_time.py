"""Device time of one benchmarked call, as DeepEP's ``bench_kineto`` measures it.

``profile_op`` runs ``timing.time_op``'s protocol under ``torch.profiler`` (CPU + CUDA activity) with
a ``record_function`` range around each call, and ``gpu_activity_us`` sums, per range, the busy time
of the GPU activities the call launched (attributed by CUPTI correlation, not by kernel names); host
gaps are not counted.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["GPU_MARKER", "gpu_activity_us", "profile_op"]

GPU_MARKER = "epcomm_bench_op"
"""Name of the ``torch.profiler.record_function`` range ``profile_op`` puts around each call."""

_DEVICE_ACTIVITIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
"""Kineto activity types counted as device time (not ``gpu_user_annotation``, ``cuda_sync``, ...)."""

_TORCH_OPS = frozenset({"cpu_op", "user_annotation"})
"""Kineto activity types of host-side torch ops and ``record_function`` ranges."""


def _activity_type(event: Any) -> str | None:
    """Kineto's activity type of a raw profiler event (``None`` on a torch without the accessor)."""
    getter = getattr(event, "activity_type", None)
    if getter is None:
        return None
    kind = getter()
    return str(kind) if kind is not None else None


def _is_launch_api(event: Any, kind: str | None) -> bool:
    """A host-side CUDA runtime / driver API call (``cudaLaunchKernel``, ``cuLaunchKernelEx``, ...)."""
    if kind is not None:
        return kind.endswith(("_runtime", "_driver"))
    return str(event.name()).startswith("cu")


def _duration_ns(event: Any) -> int:
    if hasattr(event, "duration_ns"):
        return int(event.duration_ns())
    return int(event.duration_us() * 1000)


def gpu_activity_us(events: Iterable[Any], marker: str = GPU_MARKER) -> list[float]:
    """Per ``marker`` range, the busy time (us) of the GPU activities launched inside it.

    ``events`` are torch's raw Kineto events (``prof.profiler.kineto_results.events()``). How an
    activity is attributed to a range, without relying on kernel names:

    * every GPU activity (kernel, memcpy, memset) carries the CUPTI correlation id of the host API
      call that launched it (``cudaLaunchKernel``, ``cuLaunchKernelEx`` for Triton and NCCL,
      ``cudaMemcpyAsync``, ...);
    * that host call belongs to the range when it was made inside it. When the call was made inside
      a torch op (``aten::...``, ``c10d::...``; its ``linked_correlation_id``), the op's start time is
      used, which is on the same clock as the range, so a launch made by the NCCL ``all_reduce`` of
      the device barrier (an op that ends before the range starts) is never counted; a call made
      outside any op (a Triton kernel launched straight from Python) is placed by its own CUPTI
      time stamp;
    * a GPU activity whose launch call was not recorded falls back to its own linked op, and
      without one to its own start time: it belongs to the last range that began before it (a
      driver-API copy such as ``cuMemcpyDtoDAsync``, which Kineto does not trace as a launch; the
      profiled loop synchronizes the device before each range, so a range's work never runs after
      the next range began).

    So the L2-flush fill, the device barrier and the input refresh, all launched outside the range,
    are excluded, and everything the op launched (on any stream: NCCL's, the copy engines') is
    counted. The time of a range is the union of its activities' intervals: the device's busy time,
    where activities that overlap in time (a copy engine beside a kernel) count once; for
    activities that run one after another it is the sum of their durations, as a sum of kernel
    times. Host gaps between them are not counted. ``gpu_user_annotation`` spans and ``cuda_sync``
    waits are not activities.

    Arguments:
        events: raw Kineto events of one profiled loop.
        marker: name of the ``record_function`` range around each call; nested ranges of that name
            count as their outermost one.

    Returns:
        One busy time (us) per outermost range, in time order.

    Raises:
        RuntimeError: no range, no GPU activity at all (CUPTI unavailable), or none attributed.
    """
    windows: list[tuple[int, int]] = []
    op_start: dict[int, int] = {}  # torch op correlation id -> start (ns)
    launches: list[tuple[int, int, int]] = []  # (CUPTI correlation id, start ns, linked op id)
    device: list[tuple[int, int, int, int]] = []  # (CUPTI correlation id, linked op id, start, end ns)
    for ev in events:
        kind = _activity_type(ev)
        name = str(ev.name())
        if ev.device_type() == torch.profiler.DeviceType.CPU:
            if _is_launch_api(ev, kind):
                launches.append(
                    (int(ev.correlation_id()), int(ev.start_ns()), int(ev.linked_correlation_id()))
                )
                continue
            if kind is None or kind in _TORCH_OPS:
                op_start[int(ev.correlation_id())] = int(ev.start_ns())
                if name == marker:
                    windows.append((int(ev.start_ns()), int(ev.end_ns())))
        elif kind in _DEVICE_ACTIVITIES or (kind is None and name != marker):
            start_ns = int(ev.start_ns())
            device.append(
                (
                    int(ev.correlation_id()),
                    int(ev.linked_correlation_id()),
                    start_ns,
                    start_ns + _duration_ns(ev),
                )
            )
    if not windows:
        raise RuntimeError(f"no {marker!r} range in the profile")
    if not device:
        raise RuntimeError("the profile holds no GPU activity (CUPTI unavailable?)")
    windows.sort()
    outer: list[tuple[int, int]] = []
    for start, end in windows:
        if outer and start <= outer[-1][1]:
            continue  # nested in (or touching) the previous range
        outer.append((start, end))
    starts = [start for start, _ in outer]

    def window_of(t_ns: int) -> int | None:
        i = bisect.bisect_right(starts, t_ns) - 1
        return i if i >= 0 and t_ns <= outer[i][1] else None

    def place(own_ns: int | None, linked: int) -> int | None:
        t = op_start.get(linked) if linked > 0 else None
        if t is None:
            t = own_ns
        return None if t is None else window_of(t)

    launch_window: dict[int, int | None] = {}
    for corr, start_ns, linked in launches:
        launch_window[corr] = place(start_ns, linked)
    intervals: list[list[tuple[int, int]]] = [[] for _ in outer]
    for corr, linked, start_ns, end_ns in device:
        if corr in launch_window:
            where = launch_window[corr]
        else:
            where = place(None, linked)
            if where is None:  # no launch call recorded, no op in a range: by its own time
                last = bisect.bisect_right(starts, start_ns) - 1
                where = last if last >= 0 else None
        if where is not None:
            intervals[where].append((start_ns, end_ns))
    if not any(intervals):
        raise RuntimeError(f"no GPU activity could be attributed to a {marker!r} range")
    return [_union_ns(spans) / 1e3 for spans in intervals]


def _union_ns(spans: list[tuple[int, int]]) -> int:
    """Total length of the union of ``[start, end)`` intervals."""
    total, reach = 0, None
    for start, end in sorted(spans):
        if reach is None or start >= reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


@contextlib.contextmanager
def _quiet_fds() -> Iterator[Callable[[], str]]:
    """Send file descriptors 1 and 2 to a temporary file (Kineto prints on every start and stop).

    Yields a function returning what was captured once the block is left (its tail goes into
    failure notes). Does nothing when the descriptors cannot be duplicated.
    """
    captured = ""

    def read() -> str:
        return captured

    with contextlib.ExitStack() as stack:
        saved: list[int] = []
        try:
            sink = stack.enter_context(tempfile.TemporaryFile(mode="w+b"))
            for fd in (1, 2):
                saved.append(os.dup(fd))
        except OSError:
            for fd in saved:
                os.close(fd)
            saved = []
        if not saved:
            yield read
            return
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield read
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured = sink.read().decode(errors="replace")


def _tail(text: str, limit: int = 300) -> str:
    """The last lines of captured output, on one line (for a note), without start/stop chatter."""
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.rstrip().endswith(("profiler_start", "profiler_stop"))
    ]
    joined = " | ".join(lines[-3:])
    return joined[-limit:]


def profile_op(
    fn: Callable[[int], object],
    *,
    num_slots: int,
    iters: int,
    barrier: Callable[[], None],
    refresh: Callable[[int], None] | None = None,
    flush: torch.Tensor | None = None,
    device_barrier: Callable[[], None] | None = None,
    marker: str = GPU_MARKER,
) -> tuple[list[float] | None, str | None]:
    """Device time of ``fn(slot)`` per iteration, as DeepEP's ``bench_kineto`` measures (CUDA only).

    Runs ``iters`` iterations of ``time_op``'s protocol (L2 flush, ``cuda.synchronize()``,
    ``barrier()``, ``device_barrier()``, the call, ``refresh(slot)``) under ``torch.profiler``
    (CPU + CUDA activity), with ``torch.profiler.record_function(marker)`` around the call alone,
    and returns per iteration the busy time (union of intervals) of the GPU activities (kernels, memcpy, memset)
    that the call launched: ``gpu_activity_us`` says how they are told apart from the flush, the
    device barrier and the refresh (by CUPTI correlation with the host calls made inside the range,
    not by kernel names). Host time (Python, launch latency, the gaps between kernels) is not in it.

    A profiler that fails (does not start or stop, CUPTI unavailable, nothing attributed) gives
    ``None`` and the reason instead of raising; the iterations (and so the collectives and barriers
    every rank must match) run anyway. An exception raised by ``fn`` itself propagates, as in
    ``time_op``. Kineto's own output during start and stop is swallowed (its tail lands in the
    reason on failure).

    Arguments:
        fn: the operation; called with the input slot.
        num_slots: how many preallocated input sets ``fn`` rotates through.
        iters: profiled iterations (no warm-up: run it after ``time_op``).
        barrier: host barrier over all ranks (after the device finished).
        refresh: called with the slot after each iteration (outside the range).
        flush: a large device buffer to overwrite before each iteration (evicts L2).
        device_barrier: enqueues a barrier over all ranks on the current stream, before the range.
        marker: name of the range around each call.

    Returns:
        ``(samples, None)`` with ``iters`` device times in microseconds, or ``(None, reason)``.
    """
    prof: Any = None
    reason: str | None = None
    with _quiet_fds() as start_output:
        try:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.start()
        except Exception as exc:
            reason = f"profiler did not start ({type(exc).__name__}: {exc})"
            if prof is not None:  # half started: leave no session behind for the next measurement
                with contextlib.suppress(Exception):
                    prof.stop()
            prof = None
    if reason is not None and _tail(start_output()):
        reason += f"; kineto: {_tail(start_output())}"
    try:
        for it in range(iters):
            slot = it % num_slots
            if flush is not None:
                flush.zero_()
            torch.cuda.synchronize()
            barrier()
            if device_barrier is not None:
                device_barrier()
            scope = torch.profiler.record_function(marker) if prof is not None else contextlib.nullcontext()
            with scope:
                fn(slot)
            if refresh is not None:
                refresh(slot)
        torch.cuda.synchronize()
    finally:
        if prof is not None:
            with _quiet_fds() as stop_output:
                try:
                    prof.stop()
                except Exception as exc:
                    prof = None
                    reason = f"profiler did not stop ({type(exc).__name__}: {exc})"
            if prof is None and _tail(stop_output()):
                reason = f"{reason}; kineto: {_tail(stop_output())}"
    if prof is None:
        return None, reason
    try:
        samples = gpu_activity_us(prof.profiler.kineto_results.events(), marker)
    except Exception as exc:
        note = f"{type(exc).__name__}: {exc}"
        kineto = _tail(start_output() + "\n" + stop_output())
        if kineto:
            note += f"; kineto: {kineto}"
        return None, note
    if len(samples) != iters:
        return None, f"{len(samples)} {marker!r} ranges in the profile, {iters} expected"
    return samples, None
