"""``epcomm.env``: every variable is read into one frozen ``Settings`` (defaults, accepted values,
errors that name the variable), and a ``Buffer`` takes its options from that object."""

from __future__ import annotations

import dataclasses

import pytest

from epcomm.env import BackendChoice, LayoutKernel, Settings, ValueCheck, read_settings


def test_defaults_without_variables() -> None:
    assert read_settings({}) == Settings()
    settings = Settings()
    assert settings.backend is BackendChoice.AUTO
    assert settings.timeout_s == 30.0
    assert settings.shrink_timeout_s == 3.0
    assert settings.check_values is ValueCheck.AUTO
    assert settings.local_world_size is None
    assert settings.ranks_per_node is None
    assert (settings.push_rows, settings.push_warps, settings.reduce_tokens, settings.reduce_warps) == (
        0,
        16,
        0,
        16,
    )
    assert settings.layout_kernel is LayoutKernel.TRITON


def test_every_variable_is_read() -> None:
    environ = {
        "EPCOMM_BACKEND": " Reference ",
        "EPCOMM_TIMEOUT_S": "2.5",
        "EPCOMM_SHRINK_TIMEOUT_S": "0.5",
        "EPCOMM_CHECK_VALUES": "1",
        "EPCOMM_LOG_LEVEL": "debug",
        "LOCAL_WORLD_SIZE": "4",
        "EPCOMM_RANKS_PER_NODE": "2",
        "EPCOMM_PUSH_ROWS": "4",
        "EPCOMM_PUSH_WARPS": "8",
        "EPCOMM_REDUCE_TOKENS": "2",
        "EPCOMM_REDUCE_WARPS": "32",
        "EPCOMM_LAYOUT_KERNEL": "torch",
    }
    assert read_settings(environ) == Settings(
        backend=BackendChoice.REFERENCE,
        timeout_s=2.5,
        shrink_timeout_s=0.5,
        check_values=ValueCheck.ALWAYS,
        log_level="DEBUG",
        local_world_size=4,
        ranks_per_node=2,
        push_rows=4,
        push_warps=8,
        reduce_tokens=2,
        reduce_warps=32,
        layout_kernel=LayoutKernel.TORCH,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EPCOMM_BACKEND", "infiniband"),
        ("EPCOMM_TIMEOUT_S", "soon"),
        ("EPCOMM_TIMEOUT_S", "0"),
        ("EPCOMM_SHRINK_TIMEOUT_S", "0"),
        ("EPCOMM_SHRINK_TIMEOUT_S", "-1"),
        ("EPCOMM_SHRINK_TIMEOUT_S", "later"),
        ("EPCOMM_CHECK_VALUES", "always"),
        ("LOCAL_WORLD_SIZE", "two"),
        ("LOCAL_WORLD_SIZE", "0"),
        ("EPCOMM_RANKS_PER_NODE", "two"),
        ("EPCOMM_RANKS_PER_NODE", "0"),
        ("EPCOMM_RANKS_PER_NODE", "-4"),
        ("EPCOMM_PUSH_ROWS", "3"),
        ("EPCOMM_PUSH_WARPS", "0"),
        ("EPCOMM_REDUCE_TOKENS", "-2"),
        ("EPCOMM_REDUCE_WARPS", "64"),
        ("EPCOMM_LAYOUT_KERNEL", "cuda"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        read_settings({name: value})


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().timeout_s = 1.0  # type: ignore[misc]


def test_read_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPCOMM_TIMEOUT_S", "7")
    assert read_settings().timeout_s == 7.0


def test_nothing_else_reads_the_environment() -> None:
    """Only ``env.py`` reads ``EPCOMM_*`` variables (the test harness sets the launcher's own)."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "epcomm"
    readers = [
        path.relative_to(src).as_posix()
        for path in src.rglob("*.py")
        if ("os.environ" in path.read_text() or "getenv" in path.read_text())
        and path.name != "env.py"
        and "testing" not in path.parts
    ]
    assert readers == [], readers
