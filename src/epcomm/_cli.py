"""What ``python -m epcomm`` and ``python -m epcomm soak`` share: the check, before any process
starts, that the ``torch.distributed`` backend and the transport asked for can run on this machine
(``resolve_placement``: one ``parser.error`` line, exit code 2, otherwise), and rank 0's progress
lines (``Progress``)."""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch

from epcomm.env import BackendChoice, read_settings
from epcomm.testing import SHARED_GPU

__all__ = [
    "PROGRESS_INTERVAL_S",
    "Placement",
    "Progress",
    "cuda_device_count",
    "format_seconds",
    "has_triton",
    "resolve_placement",
]

PROGRESS_INTERVAL_S = 1.0
"""Least seconds between two per-iteration progress lines: the default CPU run's iterations take
~50 ms, so it prints only its stages; a run whose iterations take seconds prints every one."""


def cuda_device_count() -> int:
    """The CUDA GPUs this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def has_triton() -> bool:
    """Whether Triton is installed (the NVLink transport's kernels need it), without importing it."""
    return importlib.util.find_spec("triton") is not None


def format_seconds(seconds: float) -> str:
    """``seconds`` for a progress line: ``"42 ms"`` below a second, else ``"3.1 s"``."""
    return f"{seconds * 1e3:.0f} ms" if seconds < 1.0 else f"{seconds:.1f} s"


@dataclass(frozen=True)
class Placement:
    """Where the ranks of a run go and which transport their ``Buffer`` uses, checked.

    Attributes:
        dist_backend: the ``torch.distributed`` backend of the processes: ``"gloo"`` (ranks on
            CPU), ``"nccl"`` (one GPU per rank) or ``SHARED_GPU`` (every rank on GPU 0).
        transport: the transport asked for: ``"auto"``, ``"reference"`` or ``"nvlink"``.
        transport_source: how an error names where it came from (``"--transport nvlink"`` or
            ``"EPCOMM_BACKEND=nvlink"``).
        uses_nvlink: the NVLink backend will run: asked for by name, or ``auto`` with one GPU per
            process (where ``auto`` picks it).
    """

    dist_backend: str
    transport: str
    transport_source: str
    uses_nvlink: bool


def resolve_placement(
    parser: argparse.ArgumentParser,
    *,
    num_processes: int,
    dist_backend: str,
    transport: str | None,
    num_gpus: int,
) -> Placement:
    """Resolve ``auto`` and refuse every combination that cannot run here, before any process starts.

    Arguments:
        parser: the command's parser; ``parser.error`` (one line on stderr after the usage, exit
            code 2) reports a refused combination.
        num_processes: ranks to start (``--num-processes``).
        dist_backend: ``--dist-backend``: ``"auto"``, ``"gloo"``, ``"nccl"`` or ``SHARED_GPU``.
            ``auto``: ``nccl`` when there is a GPU per process, else ``gloo``.
        transport: ``--transport`` (``"auto"``, ``"reference"``, ``"nvlink"``); ``None``: the
            ``EPCOMM_BACKEND`` environment variable, as ``Buffer(backend=None)`` reads it.
        num_gpus: CUDA GPUs of this machine (``cuda_device_count()``).

    Returns:
        The checked placement.
    """

    def refuse(message: str) -> NoReturn:
        parser.error(message)

    if num_processes < 1:
        refuse(f"--num-processes must be >= 1; got {num_processes}")
    try:
        settings = read_settings()  # every EPCOMM_* variable: a malformed one fails here, not in each rank
    except ValueError as exc:
        refuse(str(exc))
    if transport is None:
        transport = settings.backend.value
        source = f"EPCOMM_BACKEND={transport}"
    else:
        source = f"--transport {transport}"
    if transport == BackendChoice.NVSHMEM.value:
        refuse(
            f"{source}: the main job runs the reference or nvlink transport (nvshmem: Buffer(backend='nvshmem'))"
        )
    asked_backend = dist_backend
    if dist_backend == "auto":
        dist_backend = "nccl" if num_gpus >= num_processes else "gloo"
    if dist_backend == "nccl" and num_gpus < num_processes:
        refuse(
            f"--dist-backend nccl needs one CUDA GPU per process: {num_processes} processes, {num_gpus} GPUs"
        )
    if dist_backend == SHARED_GPU and num_gpus == 0:
        refuse(f"--dist-backend {SHARED_GPU} puts every rank on GPU 0: this machine has no CUDA GPU")
    if transport == BackendChoice.NVLINK.value:
        if dist_backend == "gloo" and asked_backend == "auto":
            refuse(
                f"{source} needs one CUDA GPU per process: {num_processes} processes, {num_gpus} GPUs "
                "(--transport reference runs anywhere)"
            )
        if dist_backend == "gloo":
            refuse(
                f"{source} needs the processes on GPUs, and --dist-backend gloo runs them on CPU "
                "(use --dist-backend nccl, or --transport reference)"
            )
        if not has_triton():
            refuse(f"{source} needs Triton, which is not installed (pip install triton)")
    uses_nvlink = transport == BackendChoice.NVLINK.value or (
        transport == BackendChoice.AUTO.value and dist_backend == "nccl"
    )
    return Placement(dist_backend, transport, source, uses_nvlink)


class Progress:
    """Progress lines on stdout, each flushed at once, printed by one rank (``enabled``).

    ``stage`` lines are always printed. ``iteration`` lines (``[normal] iteration 3/10 ok (42 ms)``)
    are printed when ``interval_s`` seconds have passed since the last line, or when forced (the
    first, checked iteration): a short run prints its stages and not every iteration.

    Arguments:
        enabled: whether this process prints (rank 0 does; the others pass ``False``).
        interval_s: least seconds between two iteration lines (0: every iteration).
        clock: seconds from a monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        enabled: bool,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.interval_s = interval_s
        self._clock = clock
        self._last_line = clock()

    def _print(self, text: str) -> None:
        print(text, flush=True)
        self._last_line = self._clock()

    def stage(self, tag: str, text: str) -> None:
        """Print ``[tag] text``."""
        if self.enabled:
            self._print(f"[{tag}] {text}")

    def iteration(
        self, tag: str, index: int, total: int, seconds: float, verdict: str = "ok", force: bool = False
    ) -> None:
        """Print ``[tag] iteration index/total verdict (time)`` if forced or ``interval_s`` has passed.

        Arguments:
            tag: the stage (``"normal"``, ``"low-latency"``, ``"soak"``).
            index: this iteration, counted from 1.
            total: iterations of the stage.
            seconds: how long this iteration took.
            verdict: what to say about it (``"ok"``; a failed check's line).
            force: print even if the last line is recent.
        """
        if self.enabled and (force or self._clock() - self._last_line >= self.interval_s):
            self._print(f"[{tag}] iteration {index}/{total} {verdict} ({format_seconds(seconds)})")
