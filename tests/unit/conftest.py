"""Fixtures of the unit tier."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from epcomm import _cli


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Pretend, for the command-line checks (``epcomm._cli``), that this machine has ``num_gpus``
    GPUs, Triton installed or not (``triton``), and these ``EPCOMM_*`` variables and no others."""
    for name in [name for name in os.environ if name.startswith("EPCOMM_")]:
        monkeypatch.delenv(name)

    def set_machine(num_gpus: int, triton: bool = True, **environ: str) -> None:
        monkeypatch.setattr(_cli, "cuda_device_count", lambda: num_gpus)
        monkeypatch.setattr(_cli, "has_triton", lambda: triton)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)

    return set_machine
