"""Run a function on N local processes, each with an initialized ``torch.distributed`` process group.

This is the harness behind epcomm's multi-process tests (gloo on CPU, nccl on GPUs) and its CLI demo.

Two entry points are provided:

* :func:`parallel_launch` spawns ``world_size`` fresh processes, runs one function on every rank and tears
  everything down again. Simple, but each call pays the cost of starting Python + importing torch in every
  child (seconds).
* :class:`ProcessGroupPool` keeps ``world_size`` processes with an initialized group alive and runs many
  functions on them in sequence, so that e.g. a parametrized pytest module pays the spawn cost once.

In both cases the function is called as ``worker(pgi, *args)`` on every rank, where ``pgi`` is a
:class:`ProcessGroupInfo`. The function (and its arguments) must be picklable by reference, i.e. defined at
module level in an importable module, because children are started with the ``spawn`` start method. Its
return value must be picklable too; tensors are pickled *by value* (they are copied, not shared), so
returning large tensors works but costs a copy. Prefer returning CPU tensors: a CUDA tensor is rebuilt on
the same CUDA device in the parent process.

Failure semantics (shared by both entry points):

* If any rank raises, a :class:`RuntimeError` is raised in the parent whose message contains the formatted
  traceback of every failing rank (and the exit code of ranks that died without reporting).
* After the first failure the remaining ranks get a short grace period (``failure_grace_s`` of
  :func:`parallel_launch`, 5 s by default) to report
  too; ranks still running after that (typically blocked in a collective that the failed rank never
  joined) are killed and listed in the message.
* If not every rank reported within ``timeout_s``, all children are killed and a :class:`TimeoutError`
  naming the ranks that did not report is raised.
* Children are always terminated and joined before the call returns or raises: no zombies are left behind.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import multiprocessing
import multiprocessing.process
import multiprocessing.queues
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

__all__ = ["SHARED_GPU", "ProcessGroupInfo", "ProcessGroupPool", "find_free_port", "parallel_launch"]

SHARED_GPU = "gloo-shared-gpu"
"""``backend=`` of :func:`parallel_launch` / :class:`ProcessGroupPool` that puts every rank on ``cuda:0``
with a gloo group: multi-rank GPU runs on a single GPU (the protocol, not the speed)."""

_MASTER_ADDR = "127.0.0.1"
# Seconds the other ranks get to report after the first rank failed, before they are killed.
_FAILURE_GRACE_S = 5.0
# How often the parent checks for children that died without reporting.
_POLL_INTERVAL_S = 0.2
# Seconds to wait for a child to exit on its own (after it reported) before terminating it.
_JOIN_TIMEOUT_S = 30.0
# Attempts to start a group when the rendezvous port was grabbed by someone else in the meantime.
_PORT_ATTEMPTS = 3

# Message kinds sent from the children to the parent.
_OK = "ok"
_ERROR = "error"
_INIT_ERROR = "init_error"

# (run_id, rank, kind, payload): payload is the pickled return value for _OK, a traceback string otherwise.
_Message = tuple[int, int, str, Any]
if TYPE_CHECKING:
    _Queue: TypeAlias = multiprocessing.queues.Queue[Any]


@dataclass(frozen=True)
class ProcessGroupInfo:
    """What a worker needs to know about its rank and process group.

    Attributes:
        world_size: Number of processes in the group.
        rank: Global rank of this process, in ``[0, world_size)``.
        local_rank: Rank of this process on this host (equal to ``rank``: all processes are local).
        device: Device this rank should use: ``cpu`` for gloo, ``cuda:<local_rank>`` for nccl, ``cuda:0``
            for :data:`SHARED_GPU` (already made the current CUDA device).
        backend: The ``torch.distributed`` backend of the group (``"gloo"`` or ``"nccl"``).
        group: The process group itself (the default ``WORLD`` group), to pass to collectives.
    """

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    group: Any


def find_free_port() -> int:
    """Find a TCP port on the loopback interface that is currently free.

    The port is released before returning, so another process may grab it before it is used; callers in
    this module retry with a new port when the rendezvous fails with "address already in use".

    Returns:
        A port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_MASTER_ADDR, 0))
        port: int = sock.getsockname()[1]
        return port


def _default_backend(world_size: int) -> str:
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def _resolve_backend(world_size: int, backend: str | None) -> str:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return _default_backend(world_size) if backend is None else backend


def _dumps_call(worker: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """Pickle ``(worker, args)`` eagerly, so that unpicklable input fails here with a clear message."""
    try:
        return pickle.dumps((worker, args), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"worker {worker!r} and its arguments must be picklable (define the worker at module level in an "
            f"importable module; lambdas and closures do not work with the 'spawn' start method): {exc}"
        ) from exc


def _is_port_conflict(text: str) -> bool:
    lowered = text.lower()
    return "eaddrinuse" in lowered or "address already in use" in lowered


# ----------------------------------------------------------------------------------------------------------
# Child side
# ----------------------------------------------------------------------------------------------------------


def _child_init(rank: int, world_size: int, port: int, backend: str, timeout_s: float) -> ProcessGroupInfo:
    """Set the rendezvous environment and initialize the default process group in a child process."""
    local_rank = rank
    os.environ["MASTER_ADDR"] = _MASTER_ADDR
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    if "OMP_NUM_THREADS" not in os.environ:
        # The OpenMP runtime has read its environment when torch was imported: set the thread count directly,
        # and export the variable for any subprocess of the worker.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)

    timeout = datetime.timedelta(seconds=timeout_s)
    if "nccl" in backend:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, device_id=device)
    elif backend == SHARED_GPU:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        backend = "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return ProcessGroupInfo(
        world_size=world_size,
        rank=rank,
        local_rank=local_rank,
        device=device,
        backend=backend,
        group=dist.group.WORLD,
    )


def _child_call(pgi: ProcessGroupInfo, blob: bytes) -> tuple[str, Any]:
    """Run one pickled ``(worker, args)`` call; return ``(kind, payload)`` for the parent.

    ``Exception`` is reported and swallowed; other ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``)
    is reported by the caller's handler and then ends the child.
    """
    try:
        worker, args = pickle.loads(blob)
        value = worker(pgi, *args)
    except Exception:
        return _ERROR, traceback.format_exc()
    try:
        return _OK, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return _ERROR, (
            f"the return value of rank {pgi.rank} (of type {type(value).__name__}) is not picklable:\n"
            + traceback.format_exc()
        )


def _destroy_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _launch_child(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    blob: bytes,
    result_q: _Queue,
    all_reported: Any,
) -> None:
    """Entry point of a :func:`parallel_launch` child: init, run once, report, wait until every rank
    has reported (``all_reported``, a ``multiprocessing`` event, at most ``_JOIN_TIMEOUT_S``), tear down.

    The wait is for ranks on GPUs: they map each other's buffers through CUDA IPC, and a rank that
    exits while a peer still maps its buffer makes torch warn "Producer process has been terminated
    before all shared CUDA tensors released". A rank reports after its worker returned and its
    garbage is collected, so once every rank has reported none maps another's buffer.
    """
    try:
        try:
            pgi = _child_init(rank, world_size, port, backend, timeout_s)
        except Exception:
            result_q.put((0, rank, _INIT_ERROR, traceback.format_exc()))
            return
        try:
            kind, payload = _child_call(pgi, blob)
            gc.collect()
        except BaseException:
            result_q.put((0, rank, _ERROR, traceback.format_exc()))
            raise
        result_q.put((0, rank, kind, payload))
        all_reported.wait(_JOIN_TIMEOUT_S)
    finally:
        _destroy_group()


def _pool_child(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    cmd_q: _Queue,
    result_q: _Queue,
) -> None:
    """Entry point of a :class:`ProcessGroupPool` child: init, then serve commands until ``None``."""
    try:
        try:
            pgi = _child_init(rank, world_size, port, backend, timeout_s)
        except Exception:
            result_q.put((0, rank, _INIT_ERROR, traceback.format_exc()))
            return
        result_q.put((0, rank, _OK, None))
        while True:
            cmd = cmd_q.get()
            if cmd is None:
                return
            run_id, blob = cmd
            try:
                kind, payload = _child_call(pgi, blob)
            except BaseException:
                result_q.put((run_id, rank, _ERROR, traceback.format_exc()))
                raise
            result_q.put((run_id, rank, kind, payload))
    finally:
        _destroy_group()


# ----------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What the parent collected from one round of messages."""

    results: dict[int, Any]  # rank -> pickled return value (or None for the pool's "ready" message)
    errors: dict[int, str]  # rank -> traceback / reason
    missing: list[int]  # ranks that did not report
    port_conflict: bool  # rendezvous failed because the port was taken


def _get(result_q: _Queue, timeout: float) -> _Message | None:
    try:
        msg: _Message = result_q.get(timeout=max(timeout, 0.0))
    except queue.Empty:
        return None
    return msg


def _collect(
    result_q: _Queue,
    procs: Sequence[multiprocessing.process.BaseProcess],
    run_id: int,
    deadline: float,
    failure_grace_s: float = _FAILURE_GRACE_S,
) -> _Outcome:
    """Read one message per rank from ``result_q`` (ignoring stale runs) until done, failed or timed out.

    Children that exit without reporting are detected (after draining what they may have sent) and recorded
    as errors. After the first error the others get ``failure_grace_s`` seconds to report.
    """
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    pending = set(range(len(procs)))
    give_up_at = deadline
    port_conflict = False

    def handle(msg: _Message) -> None:
        nonlocal give_up_at, port_conflict
        msg_run, rank, kind, payload = msg
        if msg_run != run_id or rank not in pending:
            return  # stale message from an earlier, abandoned run
        pending.discard(rank)
        if kind == _OK:
            results[rank] = payload
            return
        errors[rank] = payload
        give_up_at = min(give_up_at, time.monotonic() + failure_grace_s)
        if kind == _INIT_ERROR and _is_port_conflict(payload):
            port_conflict = True

    while pending and not port_conflict:
        now = time.monotonic()
        if now >= give_up_at:
            break
        msg = _get(result_q, min(give_up_at - now, _POLL_INTERVAL_S))
        if msg is not None:
            handle(msg)
            continue
        dead = [rank for rank in sorted(pending) if procs[rank].exitcode is not None]
        if not dead:
            continue
        # A child that exited has flushed everything it sent: drain before declaring it silent.
        while (msg := _get(result_q, 0.05)) is not None:
            handle(msg)
        for rank in dead:
            if rank in pending:
                handle(
                    (
                        run_id,
                        rank,
                        _ERROR,
                        f"rank {rank} exited with code {procs[rank].exitcode} without reporting",
                    )
                )
    return _Outcome(results, errors, sorted(pending), port_conflict)


def _stop_processes(procs: Sequence[multiprocessing.process.BaseProcess], join_timeout_s: float) -> None:
    """Join ``procs``, terminating/killing whichever does not exit within ``join_timeout_s``; reap all."""
    deadline = time.monotonic() + join_timeout_s
    for p in procs:
        if p.pid is not None:  # started
            p.join(max(deadline - time.monotonic(), 0.0))
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            p.terminate()
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            p.join(2.0)
            if p.exitcode is None:
                p.kill()
                p.join()
    for p in procs:
        with contextlib.suppress(ValueError):
            p.close()


def _close_queue(q: _Queue) -> None:
    q.cancel_join_thread()  # never block on data the (dead) readers will not consume
    q.close()


def _outcome_to_results(
    outcome: _Outcome, what: str, world_size: int, timeout_s: float, failure_grace_s: float = _FAILURE_GRACE_S
) -> list[Any]:
    """Turn a finished :class:`_Outcome` into the per-rank return values, or raise."""
    if outcome.errors:
        lines = [f"{what}: {len(outcome.errors)} of {world_size} ranks failed."]
        for rank in sorted(outcome.errors):
            lines.append(f"---------- rank {rank} ----------")
            lines.append(outcome.errors[rank].rstrip())
        if outcome.missing:
            lines.append(
                f"ranks {outcome.missing} did not report (they get {failure_grace_s} s after the first "
                "failure, within the overall timeout) and were killed."
            )
        raise RuntimeError("\n".join(lines))
    if outcome.missing:
        raise TimeoutError(
            f"{what}: timed out after {timeout_s} s; ranks {outcome.missing} did not report and were killed."
        )
    values: list[Any] = []
    for rank in range(world_size):
        try:
            values.append(pickle.loads(outcome.results[rank]))
        except Exception as exc:
            raise RuntimeError(f"{what}: cannot unpickle the return value of rank {rank}: {exc!r}") from exc
    return values


def parallel_launch(
    world_size: int,
    worker: Callable[..., Any],
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 300.0,
    failure_grace_s: float = _FAILURE_GRACE_S,
) -> list[Any]:
    """Run ``worker(pgi, *args)`` on ``world_size`` fresh local processes with an initialized process group.

    Each child sets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` (and ``OMP_NUM_THREADS=1`` unless already set; the rest of the environment is
    inherited unchanged), initializes the default group, runs the worker, sends back its return value and,
    once every rank has sent its own (ranks on GPUs map each other's buffers), destroys the group.

    Arguments:
        world_size: Number of processes to start.
        worker: Module-level (picklable) function called as ``worker(pgi, *args)`` on every rank, where
            ``pgi`` is a :class:`ProcessGroupInfo`. Its return value must be picklable.
        *args: Extra picklable arguments passed to ``worker`` on every rank.
        backend: ``torch.distributed`` backend. Default: ``"nccl"`` if CUDA is available with at least
            ``world_size`` devices (rank ``r`` uses ``cuda:r``), else ``"gloo"`` (on CPU).
            :data:`SHARED_GPU` puts every rank on ``cuda:0`` with a gloo group (multi-rank GPU tests
            on one GPU).
        timeout_s: Limit for the whole launch (start-up included), also used as the process group timeout.
        failure_grace_s: Seconds the other ranks may still run after the first rank failed or died
            (a test that kills a rank on purpose gives the survivors time to finish).

    Returns:
        The workers' return values, in rank order.

    Raises:
        RuntimeError: If any rank raised (the message holds every failing rank's traceback) or died.
        TimeoutError: If some ranks did not report within ``timeout_s`` (they are killed).
        TypeError: If ``worker`` or ``args`` cannot be pickled.

    Example:
        >>> import torch, torch.distributed as dist
        >>> def allreduce_rank(pgi: ProcessGroupInfo) -> float:  # at module level in an importable module
        ...     t = torch.tensor([float(pgi.rank)], device=pgi.device)
        ...     dist.all_reduce(t, group=pgi.group)
        ...     return t.item()
        >>> parallel_launch(4, allreduce_rank, backend="gloo")  # doctest: +SKIP
        [6.0, 6.0, 6.0, 6.0]
    """
    resolved = _resolve_backend(world_size, backend)
    blob = _dumps_call(worker, args)
    start = time.monotonic()
    deadline = start + timeout_s
    what = f"parallel_launch({getattr(worker, '__qualname__', worker)!r}, world_size={world_size})"
    ctx = torch_mp.get_context("spawn")
    for attempt in range(_PORT_ATTEMPTS):
        port = find_free_port()
        result_q: _Queue = ctx.Queue()
        all_reported = ctx.Event()
        procs: list[multiprocessing.process.BaseProcess] = []
        clean = False
        try:
            for rank in range(world_size):
                p = ctx.Process(
                    target=_launch_child,
                    args=(rank, world_size, port, resolved, timeout_s, blob, result_q, all_reported),
                    name=f"epcomm-rank{rank}",
                    daemon=True,
                )
                p.start()
                procs.append(p)
            outcome = _collect(result_q, procs, run_id=0, deadline=deadline, failure_grace_s=failure_grace_s)
            clean = not outcome.errors and not outcome.missing
            if clean:
                all_reported.set()
        finally:
            # Results are drained (by _collect) before joining: a child cannot exit before its message left
            # the queue's pipe. Finished children get time to exit on their own; others are killed.
            _stop_processes(procs, _JOIN_TIMEOUT_S if clean else 0.0)
            _close_queue(result_q)
        if outcome.port_conflict and attempt + 1 < _PORT_ATTEMPTS and time.monotonic() < deadline:
            continue
        return _outcome_to_results(outcome, what, world_size, timeout_s, failure_grace_s)
    raise AssertionError("unreachable")


class ProcessGroupPool:
    """A persistent pool of ``world_size`` local processes with an initialized process group.

    Spawning processes that import torch costs seconds, so tests that run many small distributed functions
    (e.g. a parametrized pytest module) should create one pool and call :meth:`run` repeatedly. Children are
    set up exactly as in :func:`parallel_launch`; each has one command queue, and all share one result
    queue.

    Failure handling: if a worker raises on some ranks but every rank comes back (the raising ranks return
    to the command loop), :meth:`run` raises :class:`RuntimeError` and the pool stays usable. If some ranks
    do not come back (timeout, a crash, or ranks left blocked in a collective after another rank failed),
    the pool's processes are killed right away and the pool is *transparently restarted* (fresh processes,
    fresh group) on the next :meth:`run`. Workers must therefore not rely on state kept in the children
    across runs.

    The pool is not thread-safe. Always :meth:`close` it (or use it as a context manager): ``__del__`` only
    makes a best-effort attempt to kill the children (they are daemonic, so they also die with the parent).

    Example:
        >>> with ProcessGroupPool(2, backend="gloo") as pool:  # doctest: +SKIP
        ...     sums = pool.run(allreduce_rank)
        ...     other = pool.run(another_worker, 42)
    """

    def __init__(self, world_size: int, backend: str | None = None, timeout_s: float = 300.0) -> None:
        """Start the pool's processes and wait until every rank has initialized its process group.

        Arguments:
            world_size: Number of processes.
            backend: ``torch.distributed`` backend; same default as :func:`parallel_launch`.
            timeout_s: Limit for starting the pool and default limit for each :meth:`run`; also the process
                group timeout.
        """
        self.world_size: int = world_size
        self.backend: str = _resolve_backend(world_size, backend)
        self.timeout_s: float = timeout_s
        self._ctx = torch_mp.get_context("spawn")
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._cmd_qs: list[_Queue] = []
        self._result_q: _Queue | None = None
        self._run_id = 0
        self._closed = False
        self._start()

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the pool currently has live processes (False after a failure until the next run).

        Returns:
            True if the children are up.
        """
        return bool(self._procs)

    def _start(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(_PORT_ATTEMPTS):
            port = find_free_port()
            self._result_q = self._ctx.Queue()
            self._cmd_qs = [self._ctx.Queue() for _ in range(self.world_size)]
            self._procs = []
            ok = False
            try:
                for rank in range(self.world_size):
                    p = self._ctx.Process(
                        target=_pool_child,
                        args=(
                            rank,
                            self.world_size,
                            port,
                            self.backend,
                            self.timeout_s,
                            self._cmd_qs[rank],
                            self._result_q,
                        ),
                        name=f"epcomm-pool-rank{rank}",
                        daemon=True,
                    )
                    p.start()
                    self._procs.append(p)
                outcome = _collect(self._result_q, self._procs, run_id=0, deadline=deadline)
                ok = not outcome.errors and not outcome.missing
            finally:
                if not ok:
                    self._teardown(graceful=False)
            if ok:
                return
            if outcome.port_conflict and attempt + 1 < _PORT_ATTEMPTS and time.monotonic() < deadline:
                continue
            _outcome_to_results(
                outcome,
                f"ProcessGroupPool(world_size={self.world_size}) start",
                self.world_size,
                self.timeout_s,
            )
        raise AssertionError("unreachable")

    def _teardown(self, graceful: bool) -> None:
        """Stop the children (asking them to exit first if ``graceful``) and release the queues."""
        procs, cmd_qs, result_q = self._procs, self._cmd_qs, self._result_q
        self._procs, self._cmd_qs, self._result_q = [], [], None
        if graceful:
            for p, q in zip(procs, cmd_qs, strict=True):
                if p.exitcode is None:
                    with contextlib.suppress(Exception):
                        q.put(None)
        _stop_processes(procs, _JOIN_TIMEOUT_S if graceful else 0.0)
        for q in cmd_qs:
            _close_queue(q)
        if result_q is not None:
            _close_queue(result_q)

    def close(self) -> None:
        """Ask the children to destroy their group and exit, then join them (killing stragglers).

        Idempotent; :meth:`run` raises after it.
        """
        if self._closed:
            return
        self._closed = True
        self._teardown(graceful=True)

    def __enter__(self) -> ProcessGroupPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort only: kill whatever is still running, without waiting on queues.
        with contextlib.suppress(Exception):
            for p in getattr(self, "_procs", []):
                if p.exitcode is None:
                    p.kill()
                    p.join(1.0)

    # -- running ---------------------------------------------------------------------------------------------

    def run(self, worker: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Run ``worker(pgi, *args)`` on every rank of the pool.

        Arguments:
            worker: Module-level (picklable) function called as ``worker(pgi, *args)`` on every rank, where
                ``pgi`` is a :class:`ProcessGroupInfo`. Its return value must be picklable.
            *args: Extra picklable arguments passed to ``worker`` on every rank.
            timeout_s: Limit for this run; default: the pool's ``timeout_s``. (Restarting a pool broken by
                an earlier run is bounded by the pool's ``timeout_s``, separately.)

        Returns:
            The workers' return values, in rank order.

        Raises:
            RuntimeError: If any rank raised (the message holds every failing rank's traceback) or died, or
                if the pool is closed.
            TimeoutError: If some ranks did not report within ``timeout_s`` (the pool is then killed, and
                restarted on the next run).
            TypeError: If ``worker`` or ``args`` cannot be pickled.
        """
        if self._closed:
            raise RuntimeError("ProcessGroupPool is closed")
        limit = self.timeout_s if timeout_s is None else timeout_s
        blob = _dumps_call(worker, args)
        if not self._procs:
            self._start()
        assert self._result_q is not None
        self._run_id += 1
        deadline = time.monotonic() + limit
        for q in self._cmd_qs:
            q.put((self._run_id, blob))
        try:
            outcome = _collect(self._result_q, self._procs, run_id=self._run_id, deadline=deadline)
        except BaseException:
            self._teardown(graceful=False)
            raise
        if outcome.missing or any(p.exitcode is not None for p in self._procs):
            self._teardown(graceful=False)  # some ranks are stuck or dead: restart on the next run
        what = (
            f"ProcessGroupPool(world_size={self.world_size}).run({getattr(worker, '__qualname__', worker)!r})"
        )
        return _outcome_to_results(outcome, what, self.world_size, limit)
