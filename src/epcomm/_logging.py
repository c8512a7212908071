"""The ``epcomm`` logger, with a log-once helper for backend choices and fallbacks."""

from __future__ import annotations

import logging

from epcomm import env

_logged_once: set[str] = set()


def get_logger() -> logging.Logger:
    """The package logger, its level taken from ``EPCOMM_LOG_LEVEL``."""
    logger = logging.getLogger("epcomm")
    logger.setLevel(env.log_level())
    return logger


def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key in _logged_once:
        return
    _logged_once.add(key)
    get_logger().log(level, message)
