"""Shared pieces of epcomm's benchmarks: settings, routing, the "user path" baseline, timing, reports.

Everything here is plain ``torch`` / ``torch.distributed`` (no epcomm import), so the baseline is
independent of the library it is compared with, and the file imports on a CPU-only machine.

The "user path" (``user_dispatch`` / ``user_combine``) is what a user writes without an EP library
(see ``/work/shared/PERFORMANCE.md``): exchange the per-rank counts with ``all_to_all_single``,
``.tolist()`` them, ``index_select`` the rows into a send buffer grouped by destination rank and
``all_to_all_single`` the rows; combine sends the rows back with the reverse ``all_to_all_single``
and sums them onto their tokens with ``index_add_``. Each token goes once to every rank that holds
one of its experts (as epcomm's and DeepEP's dispatch), and rows arrive ordered by source rank,
then source token index: exactly epcomm's order, so its ``recv_x`` is comparable bit for bit.

Timing (``time_op``): per iteration an L2 flush, ``cuda.synchronize()``, a host barrier, then on
CUDA a device barrier (an NCCL ``all_reduce`` of one int32 enqueued on the stream, not waited for
by the host) right before the start event, so every rank's GPU starts the timed call together and
the host barrier's skew between ranks (up to ~100s of us) is not timed; the same for every backend
and baseline. Host work inside the timed call (a dispatch's CPU read of its counts) is still timed.

Device time (``profile_op``): a second, shorter loop with the same protocol under
``torch.profiler`` (CPU + CUDA activity), summing the durations of the GPU activities each call
launched (DeepEP's ``bench_kineto`` method: host gaps are not counted); see ``gpu_activity_us``.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

__all__ = [
    "BASELINE_BACKENDS",
    "FP8_GROUP",
    "GPU_MARKER",
    "SETTINGS",
    "Progress",
    "ResultRow",
    "Setting",
    "UserHandle",
    "append_jsonl",
    "best_baseline_us",
    "environment_info",
    "format_table",
    "gpu_activity_us",
    "make_progress",
    "make_routing",
    "payload_bytes",
    "plot_rows",
    "profile_op",
    "time_back_to_back",
    "time_op",
    "user_combine",
    "user_dispatch",
    "user_dispatch_cached",
]

FP8_GROUP = 128
"""Channels per FP8 scale (one float32 scale per token and 128 channels)."""

BASELINE_BACKENDS = ("reference", "user")
"""Rows of these backends are the baselines: a speed-up is ``best baseline time / time``."""


# ---- settings and routing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One benchmark shape: tokens per rank, hidden size and top-k of ``num_experts`` experts."""

    name: str
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int

    def shape(self) -> dict[str, int]:
        """The shape as a JSON-able dict."""
        return {
            "num_tokens": self.num_tokens,
            "hidden": self.hidden,
            "num_topk": self.num_topk,
            "num_experts": self.num_experts,
        }

    def describe(self) -> str:
        """``"4096 tok x 7168, top-8 of 256"``."""
        return (
            f"{self.num_tokens} tokens/rank x hidden {self.hidden}, top-{self.num_topk} of "
            f"{self.num_experts} experts"
        )


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # PERFORMANCE.md's "prefill": DeepSeek-V3 shapes, the peer tables were measured here.
        Setting("prefill", 4096, 7168, 8, 256),
        Setting("small", 512, 4096, 8, 64),
        # --quick on GPUs: seconds, still several MB per rank.
        Setting("quick", 256, 2048, 8, 64),
        # CPU (gloo) smoke runs.
        Setting("tiny", 64, 256, 4, 16),
    )
}


def make_routing(
    setting: Setting,
    rank: int,
    device: torch.device,
    seed: int,
    num_masked: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP-style random routing of one rank's tokens.

    ``scores = randn(num_tokens, num_experts).abs() + 1``, ``topk_idx = topk(scores).indices``
    (as DeepEP's tests), then ``num_masked`` random entries set to ``-1``.

    Arguments:
        setting: the shape.
        rank: this rank (enters the seed, so ranks route differently).
        device: where the tensors live.
        seed: base seed of the run.
        num_masked: how many random ``(token, k)`` entries become ``-1`` (no expert).

    Returns:
        ``topk_idx [num_tokens, num_topk]`` int64 and ``topk_weights`` float32 (uniform in [0.5, 1.5)).
    """
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)
    scores = torch.randn(setting.num_tokens, setting.num_experts, generator=gen, device=device).abs() + 1
    topk_idx = torch.topk(scores, setting.num_topk, dim=1).indices.to(torch.int64)
    if num_masked > 0 and setting.num_tokens > 0:
        rows = torch.randint(0, setting.num_tokens, (num_masked,), generator=gen, device=device)
        cols = torch.randint(0, setting.num_topk, (num_masked,), generator=gen, device=device)
        topk_idx[rows, cols] = -1
    topk_weights = torch.rand(setting.num_tokens, setting.num_topk, generator=gen, device=device) + 0.5
    return topk_idx.contiguous(), topk_weights.to(torch.float32).contiguous()


def payload_bytes(num_rows: int, hidden: int, fp8: bool) -> int:
    """Bytes of ``num_rows`` token rows: bf16, or FP8 plus one float32 scale per 128 channels.

    FP8 bytes = BF16 bytes x (1 + 4/128) / 2, as in PERFORMANCE.md and DeepEP's tests.
    """
    if fp8:
        return num_rows * (hidden + hidden // FP8_GROUP * 4)
    return num_rows * hidden * 2


# ---- the user path --------------------------------------------------------------------------------

TokenRows = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class UserHandle:
    """What the user path's combine (and cached dispatch) needs from a dispatch.

    Attributes:
        send_idx: ``[num_send_rows]`` int64 token indices, grouped by destination rank, each group
            in token order.
        send_splits: rows sent to each rank.
        recv_splits: rows received from each rank.
        num_tokens: tokens on this rank (rows of the combine result).
    """

    send_idx: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


def _a2a_rows(rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group: Any) -> torch.Tensor:
    """``all_to_all_single`` of token rows with row splits (FP8 travels as bytes)."""
    wire = rows.view(torch.uint8) if rows.dtype == torch.float8_e4m3fn else rows
    out = wire.new_empty((sum(recv_splits), *wire.shape[1:]))
    dist.all_to_all_single(out, wire.contiguous(), recv_splits, send_splits, group=group)
    return out.view(rows.dtype) if wire is not rows else out


def _select_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``index_select`` of rows; FP8 is moved as bytes (not every device supports FP8 there)."""
    if rows.dtype == torch.float8_e4m3fn:
        return rows.view(torch.uint8).index_select(0, index).view(rows.dtype)
    return rows.index_select(0, index)


def _send_rows(x: TokenRows, handle: UserHandle, group: Any) -> TokenRows:
    if isinstance(x, tuple):
        data, scales = x
        return (
            _a2a_rows(_select_rows(data, handle.send_idx), handle.recv_splits, handle.send_splits, group),
            _a2a_rows(
                _select_rows(scales.contiguous(), handle.send_idx),
                handle.recv_splits,
                handle.send_splits,
                group,
            ),
        )
    return _a2a_rows(_select_rows(x, handle.send_idx), handle.recv_splits, handle.send_splits, group)


def user_dispatch(
    x: TokenRows, num_tokens_per_rank: torch.Tensor, is_token_in_rank: torch.Tensor, group: Any
) -> tuple[TokenRows, UserHandle]:
    """Dispatch as a user writes it with ``torch.distributed`` alone.

    Arguments:
        x: ``[num_tokens, hidden]`` bf16, or ``(x_fp8, scales [num_tokens, hidden // 128] float32)``.
        num_tokens_per_rank: ``[num_ranks]`` rows for each rank (a token counts once per rank).
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
        group: the process group.

    Returns:
        The received rows (same form as ``x``; ordered by source rank, then source token) and the
        handle for ``user_combine`` / ``user_dispatch_cached``.
    """
    send_counts = num_tokens_per_rank.to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits: list[int] = send_counts.tolist()
    recv_splits: list[int] = recv_counts.tolist()
    # [num_ranks, num_tokens].nonzero() lists (rank, token) pairs sorted by rank, then token.
    send_idx = is_token_in_rank.t().nonzero()[:, 1]
    handle = UserHandle(send_idx, send_splits, recv_splits, is_token_in_rank.size(0))
    return _send_rows(x, handle, group), handle


def user_dispatch_cached(x: TokenRows, handle: UserHandle, group: Any) -> TokenRows:
    """Dispatch with the counts and indices of an earlier ``user_dispatch`` (no count exchange)."""
    return _send_rows(x, handle, group)


def user_combine(y: torch.Tensor, handle: UserHandle, group: Any) -> torch.Tensor:
    """Send rows back (reverse ``all_to_all_single``) and sum them onto their tokens (``index_add_``).

    Arguments:
        y: ``[num_recv_rows, hidden]`` bf16 in the order ``user_dispatch`` delivered.
        handle: the dispatch's handle.
        group: the process group.

    Returns:
        ``[num_tokens, hidden]`` bf16.
    """
    back = _a2a_rows(y, handle.send_splits, handle.recv_splits, group)
    out = torch.zeros(handle.num_tokens, y.size(1), dtype=y.dtype, device=y.device)
    out.index_add_(0, handle.send_idx, back)
    return out


# ---- timing -----------------------------------------------------------------------------------------


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


# ---- device time (torch.profiler) ---------------------------------------------------------------------

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


# ---- results ---------------------------------------------------------------------------------------


@dataclass
class ResultRow:
    """One measurement (one op, backend, SM count and setting), as written to the JSONL file.

    Times: each rank takes the median of its ``iters`` samples; ``time_us`` is the max of those
    medians over ranks (the slowest rank is the real time), ``time_us_median`` their median. These
    are end to end: CUDA events around one call, host work inside it included.
    ``gpu_time_us``: device time (``profile_op``: busy time of the GPU activities the call
    launched, DeepEP's ``bench_kineto`` method), the median per rank, then the max over ranks
    (``gpu_time_us_ranks`` per rank); ``None`` on CPU, when not measured or when the profiler failed.
    ``b2b_time_us``: calls back to back (``time_back_to_back``, DeepEP's ``bench`` method: the host
    runs ahead except where the call synchronizes), median per rank, max over ranks.
    Bandwidths: mean bytes per rank / ``time_us``. ``logical``: all received rows (local ones
    included); ``nvlink``: rows that crossed to another rank. Combine counts the rows it sends
    back (the same rows as the dispatch received), as DeepEP does.
    """

    setting: str
    shape: dict[str, int]
    op: str
    backend: str
    num_sms: int | None
    time_us: float | None
    time_us_median: float | None
    time_us_ranks: list[float]
    logical_gbps: float | None
    nvlink_gbps: float | None
    logical_bytes_per_rank: float
    nvlink_bytes_per_rank: float
    gpu_time_us: float | None = None
    gpu_time_us_ranks: list[float] = field(default_factory=list)
    b2b_time_us: float | None = None
    b2b_time_us_ranks: list[float] = field(default_factory=list)
    speedup_vs_best_baseline: float | None = None
    best_baseline: str | None = None
    check: str = "n/a"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, env: dict[str, Any]) -> dict[str, Any]:
        """The row with the environment fields in front."""
        row = dict(env)
        row.update(asdict(self))
        extra = row.pop("extra")
        row.update(extra)
        return row


def best_baseline_us(rows: Sequence[ResultRow], op: str, gpu: bool = False) -> tuple[float, str] | None:
    """The fastest baseline (``BASELINE_BACKENDS``) time of ``op`` and its label, or ``None``.

    ``gpu``: compare ``gpu_time_us`` (device time) instead of ``time_us`` (end to end).
    """
    best: tuple[float, str] | None = None
    for row in rows:
        value = row.gpu_time_us if gpu else row.time_us
        if row.op != op or row.backend not in BASELINE_BACKENDS or value is None:
            continue
        label = row.backend if row.num_sms is None else f"{row.backend}@{row.num_sms}"
        if best is None or value < best[0]:
            best = (value, label)
    return best


def _fmt(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if spec == "gbps":  # 3 significant digits below 10 GB/s (CPU runs), one decimal above
        return format(value, ".1f") if value >= 10 else format(value, ".3g")
    return format(value, spec)


def format_table(rows: Sequence[ResultRow], title: str) -> str:
    """A fixed-width table: op x backend x SMs, times, bandwidths and speed-up vs the best baseline.

    ``us (max rk)`` / ``us (med rk)``: end to end; ``GPU us``: device time (``gpu_time_us``);
    ``b2b us``: back to back (``b2b_time_us``).
    Bandwidths and the speed-up are end to end.
    """
    headers = [
        "op",
        "backend",
        "SMs",
        "us (max rk)",
        "us (med rk)",
        "GPU us",
        "b2b us",
        "logical GB/s",
        "NVLink GB/s",
        "vs best base",
        "check",
    ]
    body: list[list[str]] = []
    for row in rows:
        speedup = "-"
        if row.speedup_vs_best_baseline is not None:
            speedup = f"{row.speedup_vs_best_baseline:.2f}x"
        body.append(
            [
                row.op,
                row.backend,
                "-" if row.num_sms is None else str(row.num_sms),
                "ERROR" if row.error else _fmt(row.time_us, ".1f"),
                _fmt(row.time_us_median, ".1f"),
                _fmt(row.gpu_time_us, ".1f"),
                _fmt(row.b2b_time_us, ".1f"),
                _fmt(row.logical_gbps, "gbps"),
                _fmt(row.nvlink_gbps, "gbps"),
                speedup,
                row.check,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    left = {0, 1, len(headers) - 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [title, line(headers), "  ".join("-" * w for w in widths)]
    previous_op: str | None = None
    for cells in body:
        if previous_op is not None and cells[0] != previous_op:
            out.append("")
        previous_op = cells[0]
        out.append(line(cells))
    errors = [row for row in rows if row.error]
    for row in errors:
        out.append(f"  ERROR {row.op}/{row.backend}/{row.num_sms}: {row.error}")
    return "\n".join(out)


def append_jsonl(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """Append ``records`` to a JSON-lines file (one object per line), creating parent folders."""
    target = Path(path)
    if target.parent != Path():
        target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=False) + "\n")


# ---- environment -----------------------------------------------------------------------------------


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment_info(world_size: int, device_kind: str) -> dict[str, Any]:
    """GPU model, world size, git commit (``'unknown'`` outside a checkout), versions, host, time,
    and the ``EPCOMM_*`` options set (side-by-side runs differ only there)."""
    repo = Path(__file__).resolve().parent.parent
    # EPCOMM_GIT_COMMIT first: the GPU machines get a copy of the working tree whose .git may lag.
    pinned = os.environ.get("EPCOMM_GIT_COMMIT")
    commit = pinned or _git(["rev-parse", "HEAD"], repo) or "unknown"
    dirty: bool | None = None
    if commit != "unknown" and not pinned:
        status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
        dirty = bool(status) if status is not None else None
    try:
        import triton

        triton_version: str | None = str(triton.__version__)
    except ImportError:
        triton_version = None
    # The GPU model is filled in by rank 0 (asking here would create a CUDA context in the parent).
    gpu = "cuda" if device_kind == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    now = datetime.datetime.now(datetime.timezone.utc)
    host = socket.gethostname()
    return {
        "run_id": f"{now:%Y%m%dT%H%M%S}-{host}-{os.getpid()}",
        "gpu": gpu,
        "world_size": world_size,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": host,
        "timestamp": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "options": {
            name: value
            for name, value in sorted(os.environ.items())
            if name.startswith("EPCOMM_") and name != "EPCOMM_GIT_COMMIT"
        },
    }


def median(values: Sequence[float]) -> float:
    """``statistics.median`` (re-exported for the workers)."""
    return float(statistics.median(values))


# ---- progress ----------------------------------------------------------------------------------------


class Progress(Protocol):
    """What the benchmark needs of a progress bar (tqdm's subset)."""

    def update(self, n: int = 1) -> object: ...

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None: ...

    def write(self, text: str) -> None: ...

    def close(self) -> None: ...


class _PlainProgress:
    """Fallback without tqdm: one line per finished measurement."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.desc = ""

    def update(self, n: int = 1) -> object:
        self.done += n
        if self.enabled:
            print(f"[{self.done}/{self.total}] {self.desc}", flush=True)
        return None

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def write(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        pass


class _TqdmProgress:
    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        # Not a terminal (a log file, a captured pipe): refresh rarely so the log stays short.
        interactive = sys.stderr.isatty()
        self._bar = tqdm(
            total=total,
            dynamic_ncols=True,
            file=sys.stderr,
            leave=False,
            mininterval=0.1 if interactive else 15.0,
            maxinterval=10.0 if interactive else 60.0,
        )

    def update(self, n: int = 1) -> object:
        return self._bar.update(n)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self._bar.set_description(desc, refresh=refresh)

    def write(self, text: str) -> None:
        self._tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()


def make_progress(total: int, enabled: bool, use_tqdm: bool = True) -> Progress:
    """A tqdm bar when enabled and tqdm is importable, else plain prints (silent when disabled)."""
    if enabled and use_tqdm:
        try:
            return _TqdmProgress(total)
        except ImportError:
            pass
    return _PlainProgress(total, enabled)


# ---- plot ----------------------------------------------------------------------------------------------


def plot_rows(records: Sequence[dict[str, Any]], path: str) -> str:
    """Plot logical GB/s vs SMs, one panel per (setting, op); baselines measured once are dashed lines.

    Returns:
        A one-line note of what happened (matplotlib missing, nothing to plot, or the file written).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib), {path} not written"
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        if rec.get("op") == "layout" or rec.get("logical_gbps") is None:
            continue
        panels.setdefault((rec["setting"], rec["op"]), []).append(rec)
    if not panels:
        return "plot skipped: no bandwidth rows"
    settings = list(dict.fromkeys(key[0] for key in panels))
    ops = list(dict.fromkeys(key[1] for key in panels))
    fig, axes = plt.subplots(
        len(settings), len(ops), figsize=(4.6 * len(ops), 3.6 * len(settings)), squeeze=False
    )
    for i, setting_name in enumerate(settings):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            recs = panels.get((setting_name, op), [])
            backends = list(dict.fromkeys(r["backend"] for r in recs))
            for k, backend in enumerate(backends):
                color = f"C{k % 10}"
                mine = [r for r in recs if r["backend"] == backend]
                swept = sorted((r for r in mine if r["num_sms"] is not None), key=lambda r: r["num_sms"])
                if swept:
                    ax.plot(
                        [r["num_sms"] for r in swept],
                        [r["logical_gbps"] for r in swept],
                        marker="o",
                        color=color,
                        label=backend,
                    )
                for r in mine:
                    if r["num_sms"] is None:
                        ax.axhline(
                            r["logical_gbps"],
                            linestyle="--",
                            linewidth=1.2,
                            color=color,
                            label=f"{backend} (baseline)",
                        )
            ax.set_title(f"{setting_name}: {op}", fontsize=10)
            ax.set_xlabel("num_sms")
            ax.set_ylabel("logical GB/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    first = records[0]
    fig.suptitle(
        f"epcomm normal mode, {first.get('gpu')} x{first.get('world_size')}, "
        f"commit {str(first.get('git_commit'))[:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    target = Path(path)
    if target.parent != Path():
        target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


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
