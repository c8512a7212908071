"""Module-level workers for the tests of :mod:`epcomm.testing.launch`.

They live in the package (not in ``tests/``) so that spawned children can import them by module name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from epcomm.testing.launch import ProcessGroupInfo


def allreduce_worker(pgi: ProcessGroupInfo, payload_numel: int = 0) -> dict[str, Any]:
    """All-reduce ``rank + 1`` over the group; also return a payload of ``payload_numel`` float32 elements.

    Arguments:
        pgi: This rank's process group info.
        payload_numel: Size of an extra tensor returned (to exercise large results).

    Returns:
        ``rank``, ``world_size``, ``sum`` (the all-reduced value), ``pid`` and ``payload``.
    """
    t = torch.tensor([float(pgi.rank + 1)], device=pgi.device)
    dist.all_reduce(t, group=pgi.group)
    return {
        "rank": pgi.rank,
        "world_size": pgi.world_size,
        "sum": t.item(),
        "pid": os.getpid(),
        "payload": torch.full((payload_numel,), float(pgi.rank)),
    }


def raise_on_rank_worker(pgi: ProcessGroupInfo, bad_rank: int, message: str) -> int:
    """Raise ``ValueError(message)`` on ``bad_rank``; return the rank elsewhere.

    Arguments:
        pgi: This rank's process group info.
        bad_rank: The rank that raises.
        message: The exception message.

    Returns:
        The rank (on the ranks that do not raise).
    """
    if pgi.rank == bad_rank:
        _fail_deliberately(message)
    return pgi.rank


def raise_then_finish_worker(pgi: ProcessGroupInfo, bad_rank: int, seconds: float, done_dir: str) -> int:
    """Raise on ``bad_rank`` at once; elsewhere sleep ``seconds``, then write ``rank<r>.done`` in
    ``done_dir`` (the survivor of a failed rank that still has work to finish).

    Arguments:
        pgi: This rank's process group info.
        bad_rank: The rank that raises.
        seconds: How long the other ranks work before they finish.
        done_dir: Directory in which ``rank<r>.done`` is written.

    Returns:
        The rank (on the ranks that do not raise).
    """
    if pgi.rank == bad_rank:
        _fail_deliberately("failed first")
    time.sleep(seconds)
    Path(done_dir, f"rank{pgi.rank}.done").write_text("done")
    return pgi.rank


def still_running_worker(pgi: ProcessGroupInfo, seconds: float) -> bool:
    """Rank 0 returns at once; the others return after ``seconds`` whether rank 0's process is then
    still running (Linux ``/proc``: neither gone nor a zombie).

    Arguments:
        pgi: This rank's process group info.
        seconds: How long the other ranks work before they look.

    Returns:
        ``True`` on rank 0; elsewhere whether rank 0's process was still running.
    """
    pids: list[int] = [0] * pgi.world_size
    dist.all_gather_object(pids, os.getpid(), group=pgi.group)
    if pgi.rank == 0:
        return True
    time.sleep(seconds)
    try:
        state = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _fail_deliberately(message: str) -> None:
    raise ValueError(message)


def sleep_worker(pgi: ProcessGroupInfo, seconds: float, pid_dir: str | None = None) -> int:
    """Record this process's pid in ``pid_dir`` (if given), then sleep.

    Arguments:
        pgi: This rank's process group info.
        seconds: How long to sleep.
        pid_dir: Directory in which ``rank<r>.pid`` is written.

    Returns:
        The rank.
    """
    if pid_dir is not None:
        Path(pid_dir, f"rank{pgi.rank}.pid").write_text(str(os.getpid()))
    time.sleep(seconds)
    return pgi.rank


def info_worker(pgi: ProcessGroupInfo, env_names: list[str]) -> dict[str, Any]:
    """Report the rank's view of the world: gathered ranks, environment, threads, pid.

    Arguments:
        pgi: This rank's process group info.
        env_names: Environment variables to report.

    Returns:
        ``gathered`` (all ranks, via all_gather), ``env``, ``num_threads``, ``pid``, ``device``, ``backend``.
    """
    mine = torch.tensor([pgi.rank], device=pgi.device)
    gathered = [torch.empty_like(mine) for _ in range(pgi.world_size)]
    dist.all_gather(gathered, mine, group=pgi.group)
    return {
        "gathered": [int(t.item()) for t in gathered],
        "env": {name: os.environ.get(name) for name in env_names},
        "num_threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "device": str(pgi.device),
        "backend": pgi.backend,
        "local_rank": pgi.local_rank,
    }
