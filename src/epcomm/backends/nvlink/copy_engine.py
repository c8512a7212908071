"""Dispatch copy-out on a copy engine while the push still runs (0 SMs).

The push kernel pushes a source's tokens in ``checkpoints`` consecutive ranges and, once a range
has landed at a destination, releases a progress flag there (``PushBarriers.checkpoints``). The
count table tells each receiver which of its rows every (source, range) fills
(``checkpoint_segments``). ``CheckpointCopier`` then queues, on a side stream, one
``cuStreamWaitValue32`` on that flag and one ``cuMemcpyDtoDAsync`` per segment: the copy engine
copies a segment out of the symmetric area as soon as it has landed, instead of after the whole
push. The waits cannot hang: the push's last program sets every progress flag after its bounded
exit wait, whether or not the peers arrived (the host then raises their timeout).

Driver calls go through ``ctypes`` on ``libcuda.so.1`` (torch has no stream-wait-value call).
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["CheckpointCopier", "Segment", "checkpoint_segments", "copy_checkpoints"]

_WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0, so epochs may wrap


def copy_checkpoints() -> int:
    """Progress ranges per dispatch push, from ``EPCOMM_COPY_CHECKPOINTS``: ``0`` (default) copies
    out after the push on the caller's stream; ``1..8`` copy out on a copy engine behind the
    push's progress flags. Off by default: on one H200 (EP1) it measured slower (push +10 us from
    the per-range fences, split copies +9 us, and the host queues the copies only after the
    64 us push is over); the EP4 push (~470 us) is long enough to hide the copy-out, which is
    still to be measured (docs/performance.md, session 6)."""
    return int(os.environ.get("EPCOMM_COPY_CHECKPOINTS", "0"))


class Segment(NamedTuple):
    """Rows ``[begin, end)`` of this rank's receive area, filled by ``source``'s range ``checkpoint``."""

    checkpoint: int
    source: int
    begin: int
    end: int


def checkpoint_segments(
    table: Sequence[Sequence[int]], rank: int, num_ranks: int, num_experts: int, checkpoints: int
) -> list[Segment]:
    """The non-empty segments of this rank's received rows, in the order they complete.

    Arguments:
        table: the count table, one row per source rank as ``launch_dispatch_counts`` writes it
            with ``checkpoints``: ``[tokens per rank (num_ranks), tokens per expert (num_experts),
            then for k in 1..checkpoints-1 the tokens below checkpoint k per rank (num_ranks)]``.
        rank: this rank (the receiver).
        num_ranks, num_experts: the table's shape.
        checkpoints: the push's ranges (``>= 1``).

    Returns:
        Segments sorted by (checkpoint, source): rows from source ``s`` sit at
        ``[sum of earlier sources' counts, + table[s][rank])`` (DeepEP's receive order), and its
        range ``k`` holds the tokens between checkpoints ``k`` and ``k + 1``.
    """
    segments: list[Segment] = []
    first = 0
    below = num_ranks + num_experts
    for source in range(num_ranks):
        row = table[source]
        count = row[rank]
        bounds = [0, *(row[below + (k - 1) * num_ranks + rank] for k in range(1, checkpoints)), count]
        for k in range(checkpoints):
            if bounds[k + 1] > bounds[k]:
                segments.append(Segment(k, source, first + bounds[k], first + bounds[k + 1]))
        first += count
    segments.sort()
    return segments


class _Driver:
    """The two CUDA driver calls, resolved once."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        self.wait = lib.cuStreamWaitValue32_v2
        self.wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self.wait.restype = ctypes.c_int
        self.copy = lib.cuMemcpyDtoDAsync_v2
        self.copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        self.copy.restype = ctypes.c_int


_DRIVER: _Driver | None = None


def _driver() -> _Driver:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = _Driver()
    return _DRIVER


class CheckpointCopier:
    """Copies received rows out of the symmetric area on a side stream, each segment behind its
    progress flag.

    Arguments:
        device: this rank's CUDA device.

    Use: ``mark_push(stream)`` right before launching the push on ``stream``; once the count table
    is known, ``copy_out(stream, ...)`` returns the output tensors, ready in ``stream`` order.
    """

    def __init__(self, device: torch.device) -> None:
        self.driver = _driver()
        self.stream = torch.cuda.Stream(device)
        self._handle = ctypes.c_void_p(self.stream.cuda_stream)
        self._started = torch.cuda.Event()
        self._finished = torch.cuda.Event()

    def mark_push(self, stream: Any) -> None:
        """Record, on ``stream``, the point the side stream starts from (before the push, so the
        copies may run while it does)."""
        self._started.record(stream)

    def copy_out(
        self,
        stream: Any,
        areas: Sequence[torch.Tensor],
        num_rows: int,
        segments: Sequence[Segment],
        flag_address: Any,
        epoch: int,
    ) -> list[torch.Tensor]:
        """Copy rows ``[0, num_rows)`` of each area into new tensors, segment by segment.

        Arguments:
            stream: the caller's stream (the push's); the outputs are ready in its order.
            areas: ``[capacity, words]`` views of the symmetric receive area (contiguous rows).
            num_rows: rows to copy (the segments cover exactly ``[0, num_rows)``).
            segments: from ``checkpoint_segments``, in completion order.
            flag_address: ``(source, checkpoint) -> int``, the device address of a progress flag.
            epoch: the value each flag reaches once its segment has landed (the push's exit epoch).

        Returns:
            One ``[num_rows, words]`` tensor per area (same dtype), allocated on the side stream
            and recorded on ``stream``.
        """
        side = self.stream
        side.wait_event(self._started)
        with torch.cuda.stream(side):
            outputs = [
                torch.empty((num_rows, *area.shape[1:]), dtype=area.dtype, device=area.device)
                for area in areas
            ]
        copies = []
        for out, area in zip(outputs, areas):
            if not area.is_contiguous():
                raise ValueError("dispatch copy-out: receive areas must be contiguous")
            copies.append((out.data_ptr(), area.data_ptr(), math.prod(area.shape[1:]) * area.element_size()))
        wait, copy, handle = self.driver.wait, self.driver.copy, self._handle
        for checkpoint, source, begin, end in segments:
            rc = wait(handle, flag_address(source, checkpoint), epoch, _WAIT_GEQ)
            if rc != 0:
                raise RuntimeError(f"dispatch copy-out: cuStreamWaitValue32 failed with CUDA error {rc}")
            for dst, src, row_bytes in copies:
                rc = copy(dst + begin * row_bytes, src + begin * row_bytes, (end - begin) * row_bytes, handle)
                if rc != 0:
                    raise RuntimeError(f"dispatch copy-out: cuMemcpyDtoDAsync failed with CUDA error {rc}")
        self._finished.record(side)
        stream.wait_event(self._finished)
        for out in outputs:
            out.record_stream(stream)
        return outputs
