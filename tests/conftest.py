"""Shared by every tier: import epcomm from this checkout's ``src/`` when it is not installed, and
count a run in which no test passed as a failure, not a success."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# ``python -m pytest`` from a plain checkout (no ``pip install -e .``) finds epcomm in ``src/``.
# Spawned children (``epcomm.testing.parallel_launch``) inherit this ``sys.path``: multiprocessing's
# spawn hands the parent's path to the child.
if importlib.util.find_spec("epcomm") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter is not None else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
