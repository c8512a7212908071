"""Every environment variable epcomm reads, in one place, into one frozen ``Settings``.

A ``Buffer`` reads them once, when it is created (``read_settings``), and passes the object down;
no other module reads the environment. ``Buffer(..., settings=Settings(...))`` sets them without
the environment (tests do).

| variable | default | meaning |
|---|---|---|
| ``EPCOMM_BACKEND`` | ``auto`` | ``auto``, ``reference``, ``nvlink`` or ``nvshmem``: which transport a new ``Buffer`` uses |
| ``EPCOMM_TIMEOUT_S`` | ``30`` | seconds any wait for a peer may last before it fails with an error naming the peer |
| ``EPCOMM_SHRINK_TIMEOUT_S`` | ``3`` | ``Buffer(..., enable_shrink=True)``: seconds a low-latency wait (dispatch, combine, ``clean_low_latency_buffer``) gives a peer before masking it |
| ``EPCOMM_CHECK_VALUES`` | ``auto`` | ``1``: check tensor *values* (expert ids in range) even where that costs a device-to-host read; ``0``: never; ``auto``: only on CPU tensors (on GPUs the read would stall the host) |
| ``EPCOMM_LOG_LEVEL`` | ``WARNING`` | level of the ``epcomm`` logger |
| ``LOCAL_WORLD_SIZE`` | unset | ranks per node (set by torchrun); unset: counted from host names |
| ``EPCOMM_RANKS_PER_NODE`` | unset | ranks per node, overriding the two above: simulates nodes of consecutive ranks on one host (multi-node semantics, ``epcomm.topology``); must divide the group size |
| ``EPCOMM_PUSH_ROWS`` | ``0`` | NVLink push kernel: rows in flight per program step (``0``: the measured rule, ``kernels/normal_push.py``) |
| ``EPCOMM_PUSH_WARPS`` | ``16`` | NVLink push kernel: warps per program |
| ``EPCOMM_REDUCE_TOKENS`` | ``0`` | NVLink combine reduce: tokens per program step (``0``: the measured rule, ``kernels/normal_combine.py``) |
| ``EPCOMM_REDUCE_WARPS`` | ``16`` | NVLink combine reduce: warps per program |
| ``EPCOMM_LAYOUT_KERNEL`` | ``triton`` | NVLink ``get_dispatch_layout``: ``triton`` (one kernel) or ``torch`` (device torch ops) |

The kernel knobs exist for side-by-side measurements; their defaults are the measured best
(docs/performance.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "BackendChoice",
    "LayoutKernel",
    "Settings",
    "ValueCheck",
    "read_settings",
]


class BackendChoice(str, Enum):
    """Transport a ``Buffer`` is asked to use."""

    AUTO = "auto"
    REFERENCE = "reference"
    NVLINK = "nvlink"
    NVSHMEM = "nvshmem"


class ValueCheck(str, Enum):
    """When argument *values* (not just shapes and dtypes) are checked."""

    AUTO = "auto"
    ALWAYS = "1"
    NEVER = "0"


class LayoutKernel(str, Enum):
    """How the NVLink backend computes ``get_dispatch_layout``."""

    TRITON = "triton"
    TORCH = "torch"


@dataclass(frozen=True)
class Settings:
    """Every option epcomm takes from the environment (the table in this module's docstring).

    Attributes:
        backend: ``EPCOMM_BACKEND``.
        timeout_s: ``EPCOMM_TIMEOUT_S``, > 0.
        shrink_timeout_s: ``EPCOMM_SHRINK_TIMEOUT_S``, > 0.
        check_values: ``EPCOMM_CHECK_VALUES``.
        log_level: ``EPCOMM_LOG_LEVEL``, a ``logging`` level name.
        local_world_size: ``LOCAL_WORLD_SIZE``, or ``None``.
        ranks_per_node: ``EPCOMM_RANKS_PER_NODE``, or ``None``.
        push_rows: ``EPCOMM_PUSH_ROWS``, 0 or 1..64.
        push_warps: ``EPCOMM_PUSH_WARPS``, a power of two 1..32.
        reduce_tokens: ``EPCOMM_REDUCE_TOKENS``, 0 or 1..64.
        reduce_warps: ``EPCOMM_REDUCE_WARPS``, a power of two 1..32.
        layout_kernel: ``EPCOMM_LAYOUT_KERNEL``.
    """

    backend: BackendChoice = BackendChoice.AUTO
    timeout_s: float = 30.0
    shrink_timeout_s: float = 3.0
    check_values: ValueCheck = ValueCheck.AUTO
    log_level: str = "WARNING"
    local_world_size: int | None = None
    ranks_per_node: int | None = None
    push_rows: int = 0
    push_warps: int = 16
    reduce_tokens: int = 0
    reduce_warps: int = 16
    layout_kernel: LayoutKernel = LayoutKernel.TRITON

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"EPCOMM_TIMEOUT_S must be > 0; got {self.timeout_s}")
        if not self.shrink_timeout_s > 0:
            raise ValueError(f"EPCOMM_SHRINK_TIMEOUT_S must be > 0; got {self.shrink_timeout_s}")
        if self.local_world_size is not None and self.local_world_size <= 0:
            raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer; got {self.local_world_size}")
        if self.ranks_per_node is not None and self.ranks_per_node <= 0:
            raise ValueError(f"EPCOMM_RANKS_PER_NODE must be a positive integer; got {self.ranks_per_node}")
        for name, value in (
            ("EPCOMM_PUSH_ROWS", self.push_rows),
            ("EPCOMM_REDUCE_TOKENS", self.reduce_tokens),
        ):
            if not 0 <= value <= 64 or (value & (value - 1)):
                raise ValueError(
                    f"{name} must be 0 (the measured rule) or a power of two up to 64; got {value}"
                )
        for name, value in (
            ("EPCOMM_PUSH_WARPS", self.push_warps),
            ("EPCOMM_REDUCE_WARPS", self.reduce_warps),
        ):
            if not 1 <= value <= 32 or (value & (value - 1)):
                raise ValueError(f"{name} must be a power of two from 1 to 32; got {value}")


def _enum(environ: Mapping[str, str], name: str, default: str, kind: type[Enum], lower: bool = True) -> Enum:
    value = environ.get(name, default).strip()
    value = value.lower() if lower else value
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(c.value) for c in kind)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}") from None


def _number(environ: Mapping[str, str], name: str, default: str, kind: type[int] | type[float]) -> float:
    text = environ.get(name, default).strip()
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}; got {text!r}") from None


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every variable of the table above from ``environ`` (default ``os.environ``).

    Returns:
        The ``Settings``; a malformed value raises ``ValueError`` naming the variable.
    """
    environ = os.environ if environ is None else environ
    local = environ.get("LOCAL_WORLD_SIZE", "").strip()
    local_world_size = int(_number(environ, "LOCAL_WORLD_SIZE", local, int)) if local else None
    per_node = environ.get("EPCOMM_RANKS_PER_NODE", "").strip()
    ranks_per_node = int(_number(environ, "EPCOMM_RANKS_PER_NODE", per_node, int)) if per_node else None
    return Settings(
        backend=BackendChoice(_enum(environ, "EPCOMM_BACKEND", "auto", BackendChoice)),
        timeout_s=float(_number(environ, "EPCOMM_TIMEOUT_S", "30", float)),
        shrink_timeout_s=float(_number(environ, "EPCOMM_SHRINK_TIMEOUT_S", "3", float)),
        check_values=ValueCheck(_enum(environ, "EPCOMM_CHECK_VALUES", "auto", ValueCheck)),
        log_level=environ.get("EPCOMM_LOG_LEVEL", "WARNING").strip().upper(),
        local_world_size=local_world_size,
        ranks_per_node=ranks_per_node,
        push_rows=int(_number(environ, "EPCOMM_PUSH_ROWS", "0", int)),
        push_warps=int(_number(environ, "EPCOMM_PUSH_WARPS", "16", int)),
        reduce_tokens=int(_number(environ, "EPCOMM_REDUCE_TOKENS", "0", int)),
        reduce_warps=int(_number(environ, "EPCOMM_REDUCE_WARPS", "16", int)),
        layout_kernel=LayoutKernel(_enum(environ, "EPCOMM_LAYOUT_KERNEL", "triton", LayoutKernel)),
    )
