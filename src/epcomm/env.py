"""Every environment variable epcomm reads, in one place, each with its documented default.

| variable | default | meaning |
|---|---|---|
| ``EPCOMM_BACKEND`` | ``auto`` | ``auto``, ``reference``, ``nvlink`` or ``nvshmem``: which transport a new ``Buffer`` uses |
| ``EPCOMM_TIMEOUT_S`` | ``30`` | seconds any wait for a peer may last before it fails with an error naming the peer |
| ``EPCOMM_CHECK_VALUES`` | ``auto`` | ``1``: check tensor *values* (expert ids in range) even where that costs a device-to-host read; ``0``: never; ``auto``: only on CPU tensors (on GPUs the read would stall the host) |
| ``EPCOMM_LOG_LEVEL`` | ``WARNING`` | level of the ``epcomm`` logger |
| ``LOCAL_WORLD_SIZE`` | unset | ranks per node (set by torchrun); unset: counted from host names |

Values are read when asked for (no import-time side effects), so tests may change them.
"""

from __future__ import annotations

import os
from enum import Enum

__all__ = [
    "BackendChoice",
    "ValueCheck",
    "backend_choice",
    "local_world_size",
    "log_level",
    "timeout_s",
    "value_check",
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


DEFAULT_TIMEOUT_S = 30.0


def _read(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def backend_choice() -> BackendChoice:
    """``EPCOMM_BACKEND`` as a ``BackendChoice`` (default ``auto``)."""
    value = _read("EPCOMM_BACKEND", "auto").lower()
    try:
        return BackendChoice(value)
    except ValueError:
        choices = ", ".join(c.value for c in BackendChoice)
        raise ValueError(f"EPCOMM_BACKEND must be one of {choices}; got {value!r}") from None


def timeout_s() -> float:
    """``EPCOMM_TIMEOUT_S``: seconds a wait for a peer may last (default 30)."""
    value = _read("EPCOMM_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"EPCOMM_TIMEOUT_S must be a number of seconds; got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"EPCOMM_TIMEOUT_S must be > 0; got {seconds}")
    return seconds


def value_check() -> ValueCheck:
    """``EPCOMM_CHECK_VALUES`` as a ``ValueCheck`` (default ``auto``)."""
    value = _read("EPCOMM_CHECK_VALUES", "auto").lower()
    try:
        return ValueCheck(value)
    except ValueError:
        raise ValueError(f"EPCOMM_CHECK_VALUES must be one of auto, 1, 0; got {value!r}") from None


def log_level() -> str:
    """``EPCOMM_LOG_LEVEL``: level name for the ``epcomm`` logger (default ``WARNING``)."""
    return _read("EPCOMM_LOG_LEVEL", "WARNING").upper()


def local_world_size() -> int | None:
    """``LOCAL_WORLD_SIZE`` (ranks per node, as torchrun sets it), or ``None`` when unset."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is None or not value.strip():
        return None
    try:
        ranks = int(value)
    except ValueError:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer; got {value!r}") from None
    if ranks <= 0:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer; got {ranks}")
    return ranks
