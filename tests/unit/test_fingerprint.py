"""The normal-mode call fingerprint: its words, its readable form and the errors it raises."""

from __future__ import annotations

import itertools

import pytest
import torch

import epcomm
from epcomm.errors import InconsistentCallError
from epcomm.fingerprint import (
    FINGERPRINT_WORDS,
    CallFingerprint,
    CallNumbers,
    NormalOperation,
    XFormat,
    check_fingerprints,
    check_row_counts,
)

MAX_MESSAGE_CHARS = 300


def _x(hidden: int = 7168, fp8: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    if not fp8:
        return torch.zeros(3, hidden, dtype=torch.bfloat16), None
    x = torch.zeros(3, hidden, dtype=torch.float8_e4m3fn)
    if fp8 == "float":
        return x, torch.ones(hidden // 128, 3, dtype=torch.float32).t()  # column-major, as clients pass
    return x, torch.zeros(3, hidden // 512, dtype=torch.int32)


def test_exported_as_a_value_error() -> None:
    assert epcomm.InconsistentCallError is InconsistentCallError
    assert issubclass(InconsistentCallError, ValueError)


@pytest.mark.parametrize(
    ("fp8", "x_format"),
    [("", XFormat.BF16), ("float", XFormat.FP8_FLOAT_SCALES), ("ue8m0", XFormat.FP8_UE8M0_SCALES)],
)
def test_dispatch_fingerprint_words(fp8: str, x_format: XFormat) -> None:
    x, scales = _x(7168, fp8)
    topk_idx = torch.zeros(3, 8, dtype=torch.int64)
    fingerprint = CallFingerprint.for_dispatch(x, scales, 256, topk_idx, torch.zeros(3, 8))
    words = CallNumbers().stamp(fingerprint).words()
    assert len(words) == FINGERPRINT_WORDS
    assert words == [NormalOperation.DISPATCH, 1, 0, 7168, x_format, 256, 8, 1]
    assert CallFingerprint.from_words(words).words() == words


def test_cached_dispatch_and_combine_name_their_handle() -> None:
    x, scales = _x(4096, "ue8m0")
    cached = CallFingerprint.for_cached_dispatch(x, scales, handle_sequence=5)
    assert cached.words() == [NormalOperation.CACHED_DISPATCH, 0, 5, 4096, XFormat.FP8_UE8M0_SCALES, 0, 0, 0]
    combine = CallFingerprint.for_combine(torch.zeros(2, 4096, dtype=torch.bfloat16), torch.zeros(2, 6), 5)
    assert combine.words() == [NormalOperation.COMBINE, 0, 5, 4096, XFormat.BF16, 0, 6, 1]
    without = CallFingerprint.for_combine(torch.zeros(2, 4096, dtype=torch.bfloat16), None, 5)
    assert (without.num_topk, without.with_weights) == (0, 0)


def test_call_numbers_count_from_one() -> None:
    numbers = CallNumbers()
    x, _ = _x()
    base = CallFingerprint.for_dispatch(x, None, 8, None, None)
    assert [numbers.stamp(base).sequence for _ in range(3)] == [1, 2, 3]


def test_describe() -> None:
    x, _ = _x(7168)
    dispatch = CallFingerprint.for_dispatch(x, None, 256, torch.zeros(3, 8, dtype=torch.int64), None)
    assert dispatch._replace(sequence=3).describe() == "dispatch #3 hidden=7168 bf16 experts=256 topk=8"
    no_topk = CallFingerprint.for_dispatch(x, None, 256, None, None)._replace(sequence=1)
    assert no_topk.describe() == "dispatch #1 hidden=7168 bf16 experts=256 topk=none"
    combine = CallFingerprint.for_combine(x, None, 3)._replace(sequence=4)
    assert combine.describe() == "combine #4 of #3 hidden=7168 topk_weights=none"
    fp8, scales = _x(7168, "float")
    cached = CallFingerprint.for_cached_dispatch(fp8, scales, 3)._replace(sequence=5)
    assert cached.describe() == "cached dispatch #5 of #3 hidden=7168 fp8/f32-scales"
    garbage = CallFingerprint.from_words([9, 1, 2, 3, 77, 5, 6, 7])
    assert garbage.describe().startswith("operation 9 #1 of #2 hidden=3 format 77")


def test_check_names_both_ranks_and_calls() -> None:
    x, _ = _x(7168)
    topk_idx = torch.zeros(3, 8, dtype=torch.int64)
    mine = CallFingerprint.for_dispatch(x, None, 256, topk_idx, None)._replace(sequence=3)
    theirs = mine._replace(hidden=4096)
    check_fingerprints(0, mine, {1: mine, 2: mine})
    with pytest.raises(InconsistentCallError) as caught:
        check_fingerprints(0, mine, {1: mine, 2: theirs, 3: theirs})
    error = caught.value
    assert (error.rank, error.peer, error.operation) == (0, 2, "dispatch")
    assert str(error) == (
        "dispatch: rank 0 and rank 2 made different calls (hidden differs; 1 more rank(s) differ): "
        "rank 0: dispatch #3 hidden=7168 bf16 experts=256 topk=8; "
        "rank 2: dispatch #3 hidden=4096 bf16 experts=256 topk=8"
    )


def _extremes() -> list[CallFingerprint]:
    big = 2**31 - 1  # the largest a word of the NVLink count table holds
    huge = 2**62  # only garbage words: the descriptions are cut to fit
    return [
        CallFingerprint(NormalOperation.DISPATCH, big, 0, big, XFormat.FP8_UE8M0_SCALES, big, big, 1),
        CallFingerprint(NormalOperation.CACHED_DISPATCH, big, big, big, XFormat.FP8_FLOAT_SCALES, 0, 0, 0),
        CallFingerprint(NormalOperation.COMBINE, big, big, big, XFormat.BF16, 0, big, 1),
        CallFingerprint(-big, -big, -big, -big, -big, -big, -big, -big),  # garbage words
        CallFingerprint(NormalOperation.DISPATCH, huge, huge, huge, huge, huge, huge, huge),
        CallFingerprint(NormalOperation.DISPATCH, 1, 0, 128, XFormat.BF16, 8, 0, 0),
    ]


@pytest.mark.parametrize(("mine", "theirs"), list(itertools.permutations(_extremes(), 2)))
def test_message_is_one_short_line(mine: CallFingerprint, theirs: CallFingerprint) -> None:
    with pytest.raises(InconsistentCallError) as caught:
        check_fingerprints(12345, mine, {12346: theirs, 12347: theirs})
    message = str(caught.value)
    assert "\n" not in message
    assert len(message) <= MAX_MESSAGE_CHARS, (len(message), message)


def test_row_counts_of_another_handle() -> None:
    x, _ = _x(128)
    mine = CallFingerprint.for_combine(x, None, 1)._replace(sequence=2)
    check_row_counts(0, mine, [4, 5, 6], {1: 5, 2: 6})
    with pytest.raises(InconsistentCallError, match=r"rank 2 sends 7 rows, rank 0 expects 6") as caught:
        check_row_counts(0, mine, [4, 5, 6], {1: 5, 2: 7})
    assert caught.value.peer == 2
    assert len(str(caught.value)) <= MAX_MESSAGE_CHARS
