"""The combine options read from the environment: defaults, accepted values and clear errors."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from epcomm.kernels.normal_combine import combine_overlap, overlap_reduce_sms
from epcomm.kernels.normal_push import balanced_combine_push


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EPCOMM_COMBINE_PUSH", "EPCOMM_COMBINE_OVERLAP", "EPCOMM_COMBINE_REDUCE_SMS"):
        monkeypatch.delenv(name, raising=False)
    assert balanced_combine_push() is False
    assert combine_overlap() == 0
    assert overlap_reduce_sms(24) == 8


def test_accepted_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPCOMM_COMBINE_PUSH", " Balanced ")
    assert balanced_combine_push() is True
    monkeypatch.setenv("EPCOMM_COMBINE_OVERLAP", "8")
    assert combine_overlap() == 8
    monkeypatch.setenv("EPCOMM_COMBINE_REDUCE_SMS", "12")
    assert overlap_reduce_sms(24) == 12
    assert overlap_reduce_sms(8) == 7  # the push keeps one SM
    monkeypatch.setenv("EPCOMM_COMBINE_REDUCE_SMS", "0")
    assert overlap_reduce_sms(2) == 1


@pytest.mark.parametrize(
    ("name", "value", "call"),
    [
        ("EPCOMM_COMBINE_PUSH", "strided", balanced_combine_push),
        ("EPCOMM_COMBINE_OVERLAP", "9", combine_overlap),
        ("EPCOMM_COMBINE_OVERLAP", "two", combine_overlap),
        ("EPCOMM_COMBINE_REDUCE_SMS", "-1", lambda: overlap_reduce_sms(24)),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, call: object
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        call()  # type: ignore[operator]
