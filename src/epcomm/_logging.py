"""The ``epcomm`` logger, with a log-once helper for backend choices and fallbacks."""

from __future__ import annotations

import logging

_logged_once: set[str] = set()


def get_logger() -> logging.Logger:
    """The package logger (its level is set from ``Settings.log_level`` by ``set_log_level``)."""
    return logging.getLogger("epcomm")


def set_log_level(level: str) -> None:
    """Set the package logger's level (a ``logging`` level name, as ``EPCOMM_LOG_LEVEL``)."""
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"EPCOMM_LOG_LEVEL must be a logging level name (DEBUG, INFO, ...); got {level!r}")
    get_logger().setLevel(level)


def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key in _logged_once:
        return
    _logged_once.add(key)
    get_logger().log(level, message)
