"""``benchmarks/device_time.gpu_activity_us`` on hand-made Kineto-like events: what belongs to a range
and the busy time (overlapping activities count once)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from device_time import GPU_MARKER, _union_ns, gpu_activity_us


class _Event:
    def __init__(
        self, name: str, kind: str, cpu: bool, corr: int, start: int, end: int, linked: int = 0
    ) -> None:
        self._name, self._kind, self._cpu = name, kind, cpu
        self._corr, self._start, self._end, self._linked = corr, start, end, linked

    def name(self) -> str:
        return self._name

    def activity_type(self) -> str:
        return self._kind

    def device_type(self) -> Any:
        return torch.profiler.DeviceType.CPU if self._cpu else torch.profiler.DeviceType.CUDA

    def correlation_id(self) -> int:
        return self._corr

    def linked_correlation_id(self) -> int:
        return self._linked

    def start_ns(self) -> int:
        return self._start

    def end_ns(self) -> int:
        return self._end

    def duration_ns(self) -> int:
        return self._end - self._start


def test_union_of_intervals() -> None:
    assert _union_ns([]) == 0
    assert _union_ns([(0, 10), (20, 25)]) == 15
    assert _union_ns([(0, 10), (5, 12), (11, 13), (30, 31)]) == 14
    assert _union_ns([(0, 100), (10, 20)]) == 100


def test_overlap_counts_once_and_untraced_copies_belong_by_time() -> None:
    events = [
        # A range per iteration (host clock), and a flush launched before each (excluded).
        _Event(GPU_MARKER, "user_annotation", True, 1, 1000, 2000),
        _Event(GPU_MARKER, "user_annotation", True, 2, 10_000, 11_000),
        _Event("cudaLaunchKernel", "cuda_runtime", True, 100, 900, 910),  # flush, before range 1
        _Event("flush", "kernel", False, 100, 950, 1050),
        _Event("cuLaunchKernelEx", "cuda_driver", True, 101, 1100, 1110),  # push, in range 1
        _Event("push", "kernel", False, 101, 3000, 5000),
        # A driver-API copy with no traced launch: overlaps the push, then runs 200 ns past it.
        _Event("Memcpy DtoD", "gpu_memcpy", False, 555, 4000, 5200),
        _Event("cuLaunchKernelEx", "cuda_driver", True, 102, 10_100, 10_110),  # range 2
        _Event("push", "kernel", False, 102, 12_000, 13_000),
    ]
    assert gpu_activity_us(events) == [2.2, 1.0]
