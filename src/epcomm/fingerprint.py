"""What every rank must agree on in one call (both modes), as a few integer words.

Each normal-mode call (dispatch, cached dispatch, combine) sends its fingerprint to every peer in
its first message and compares what the peers sent with its own before any payload moves. A peer
whose call differs (another operation, another call number, other sizes, another dispatch's
handle) makes every rank that sees it raise ``InconsistentCallError`` naming both ranks and both
calls, instead of a transport abort or a silently wrong result. ``get_dispatch_layout`` does not
communicate and carries none.

The words, in this order (``FINGERPRINT_WORDS``; int64 in the reference backend's messages)::

    0 operation       NormalOperation: 1 dispatch, 2 cached dispatch, 3 combine,
                      4 low_latency_dispatch, 5 low_latency_combine, 6 clean_low_latency_buffer
    1 sequence        the Buffer's normal-mode call number (1, 2, ...), counted when a call starts
                      communicating (a call rejected for its arguments takes no number)
    2 handle          the sequence number of the dispatch whose handle the call uses (0: none)
    3 hidden
    4 x format        XFormat: 0 bf16, 1 fp8 + float32 scales, 2 fp8 + packed UE8M0 int32 scales
    5 num_experts     0 where the call takes none (cached dispatch, combine)
    6 num_topk        columns of topk_idx (dispatch) or of topk_weights (combine); 0: none given
    7 with weights    1 when dispatch is given topk_weights (combine: when num_topk > 0);
                      the low-latency operations: num_max_dispatch_tokens_per_rank

The low-latency operations (4, 5, 6) use the same words: the reference backend's low-latency calls
send them in a first message of their own (fixed size) and compare before the payload is posted;
``clean_low_latency_buffer``'s barrier is that message alone.

Together they fix the size of every message that follows (rows of ``hidden`` and ``x format``,
top-k columns, per-expert counts), so ranks that agree on them cannot disagree on a message size.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from epcomm.errors import InconsistentCallError

__all__ = [
    "FINGERPRINT_WORDS",
    "CallFingerprint",
    "CallNumbers",
    "NormalOperation",
    "XFormat",
    "check_fingerprints",
    "check_row_counts",
]

FINGERPRINT_WORDS = 8


class NormalOperation(enum.IntEnum):
    """Word 0 of a fingerprint (the low-latency operations included)."""

    DISPATCH = 1
    CACHED_DISPATCH = 2
    COMBINE = 3
    LOW_LATENCY_DISPATCH = 4
    LOW_LATENCY_COMBINE = 5
    CLEAN_LOW_LATENCY_BUFFER = 6


_LOW_LATENCY = (
    NormalOperation.LOW_LATENCY_DISPATCH,
    NormalOperation.LOW_LATENCY_COMBINE,
    NormalOperation.CLEAN_LOW_LATENCY_BUFFER,
)


class XFormat(enum.IntEnum):
    """Word 4 of a fingerprint: the element type of ``x`` and of its scales."""

    BF16 = 0
    FP8_FLOAT_SCALES = 1
    FP8_UE8M0_SCALES = 2

    @staticmethod
    def for_low_latency(use_fp8: bool, use_ue8m0: bool) -> XFormat:
        """The format a low-latency dispatch casts to (``use_fp8`` / ``use_ue8m0`` as it is called)."""
        if not use_fp8:
            return XFormat.BF16
        return XFormat.FP8_UE8M0_SCALES if use_ue8m0 else XFormat.FP8_FLOAT_SCALES

    @staticmethod
    def of(x: torch.Tensor, x_scales: torch.Tensor | None) -> XFormat:
        """The format of ``x`` (bf16 or float8_e4m3fn) with ``x_scales`` (``None``, float32 or int32)."""
        if x_scales is None:
            return XFormat.BF16
        return XFormat.FP8_UE8M0_SCALES if x_scales.dtype == torch.int32 else XFormat.FP8_FLOAT_SCALES


_OPERATION_NAMES: dict[int, str] = {
    NormalOperation.DISPATCH: "dispatch",
    NormalOperation.CACHED_DISPATCH: "cached dispatch",
    NormalOperation.COMBINE: "combine",
    NormalOperation.LOW_LATENCY_DISPATCH: "low_latency_dispatch",
    NormalOperation.LOW_LATENCY_COMBINE: "low_latency_combine",
    NormalOperation.CLEAN_LOW_LATENCY_BUFFER: "clean_low_latency_buffer",
}
_FORMAT_NAMES: dict[int, str] = {
    XFormat.BF16: "bf16",
    XFormat.FP8_FLOAT_SCALES: "fp8/f32-scales",
    XFormat.FP8_UE8M0_SCALES: "fp8/ue8m0-scales",
}
# Field -> the words naming it when it differs.
_FIELD_NAMES = {
    "operation": "operation",
    "sequence": "call number",
    "handle_sequence": "handle",
    "hidden": "hidden",
    "x_format": "x format",
    "num_experts": "num_experts",
    "num_topk": "num_topk",
    "with_weights": "topk_weights",
}


def _name(names: Mapping[int, str], code: int, what: str) -> str:
    return names.get(code, f"{what} {code}")


class CallFingerprint(NamedTuple):
    """One normal-mode call's fingerprint (see the module docstring for the words).

    Fields are plain ints, so a fingerprint rebuilt from a peer's words (``from_words``) can hold
    codes this version does not know; ``describe`` prints those as numbers.
    """

    operation: int
    sequence: int
    handle_sequence: int
    hidden: int
    x_format: int
    num_experts: int
    num_topk: int
    with_weights: int

    @staticmethod
    def for_dispatch(
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        num_experts: int,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
    ) -> CallFingerprint:
        """A fresh dispatch of ``x [num_tokens, hidden]`` (sequence 0 until the backend numbers it)."""
        num_topk = topk_idx.size(1) if topk_idx is not None else 0
        return CallFingerprint(
            NormalOperation.DISPATCH,
            0,
            0,
            x.size(1),
            XFormat.of(x, x_scales),
            num_experts,
            num_topk,
            int(topk_weights is not None),
        )

    @staticmethod
    def for_cached_dispatch(
        x: torch.Tensor, x_scales: torch.Tensor | None, handle_sequence: int
    ) -> CallFingerprint:
        """A cached dispatch of ``x`` with the handle of dispatch number ``handle_sequence``."""
        return CallFingerprint(
            NormalOperation.CACHED_DISPATCH, 0, handle_sequence, x.size(1), XFormat.of(x, x_scales), 0, 0, 0
        )

    @staticmethod
    def for_combine(
        x: torch.Tensor, topk_weights: torch.Tensor | None, handle_sequence: int
    ) -> CallFingerprint:
        """A combine of ``x [num_recv_rows, hidden]`` bf16 with the handle of dispatch ``handle_sequence``."""
        num_topk = topk_weights.size(1) if topk_weights is not None else 0
        return CallFingerprint(
            NormalOperation.COMBINE,
            0,
            handle_sequence,
            x.size(1),
            XFormat.BF16,
            0,
            num_topk,
            int(num_topk > 0),
        )

    @staticmethod
    def for_low_latency_dispatch(
        hidden: int, x_format: XFormat, num_experts: int, num_topk: int, capacity: int
    ) -> CallFingerprint:
        """A low-latency dispatch (``x_format``: the cast it asks for); word 7 is the capacity
        (``num_max_dispatch_tokens_per_rank``)."""
        return CallFingerprint(
            NormalOperation.LOW_LATENCY_DISPATCH, 0, 0, hidden, x_format, num_experts, num_topk, capacity
        )

    @staticmethod
    def for_low_latency_combine(
        hidden: int, num_experts: int, num_topk: int, capacity: int, handle_sequence: int
    ) -> CallFingerprint:
        """A low-latency combine with the handle of low-latency dispatch ``handle_sequence``."""
        return CallFingerprint(
            NormalOperation.LOW_LATENCY_COMBINE,
            0,
            handle_sequence,
            hidden,
            XFormat.BF16,
            num_experts,
            num_topk,
            capacity,
        )

    @staticmethod
    def for_clean_low_latency_buffer(hidden: int, num_experts: int, capacity: int) -> CallFingerprint:
        """``clean_low_latency_buffer(capacity, hidden, num_experts)``: its barrier carries it."""
        return CallFingerprint(
            NormalOperation.CLEAN_LOW_LATENCY_BUFFER, 0, 0, hidden, XFormat.BF16, num_experts, 0, capacity
        )

    def words(self) -> list[int]:
        """The ``FINGERPRINT_WORDS`` words, in field order."""
        return [int(value) for value in self]

    @staticmethod
    def from_words(words: Sequence[int]) -> CallFingerprint:
        """The fingerprint of ``FINGERPRINT_WORDS`` words (as a peer sent them)."""
        return CallFingerprint(*(int(word) for word in words[:FINGERPRINT_WORDS]))

    @property
    def operation_name(self) -> str:
        """``"dispatch"``, ``"cached dispatch"`` or ``"combine"``."""
        return _name(_OPERATION_NAMES, self.operation, "operation")

    def describe(self) -> str:
        """One short line, e.g. ``"dispatch #3 hidden=7168 bf16 experts=256 topk=8+weights"``."""
        head = f"{self.operation_name} #{self.sequence}"
        if self.operation in _LOW_LATENCY:
            if self.operation == NormalOperation.LOW_LATENCY_COMBINE:
                head += f" of #{self.handle_sequence}"
            elif self.operation == NormalOperation.CLEAN_LOW_LATENCY_BUFFER:
                return f"{head} hidden={self.hidden} experts={self.num_experts} capacity={self.with_weights}"
            else:
                head += f" {_name(_FORMAT_NAMES, self.x_format, 'format')}"
            return (
                f"{head} hidden={self.hidden} experts={self.num_experts} topk={self.num_topk} "
                f"capacity={self.with_weights}"
            )
        if self.operation != NormalOperation.DISPATCH:
            head += f" of #{self.handle_sequence}"
        head += f" hidden={self.hidden}"
        if self.operation == NormalOperation.COMBINE:
            return f"{head} topk_weights={self.num_topk or 'none'}"
        head += f" {_name(_FORMAT_NAMES, self.x_format, 'format')}"
        if self.operation != NormalOperation.DISPATCH:
            return head
        topk = f"{self.num_topk}{'+weights' if self.with_weights else ''}" if self.num_topk else "none"
        return f"{head} experts={self.num_experts} topk={topk}"

    def differences(self, other: CallFingerprint) -> list[str]:
        """Names of the fields that differ from ``other`` (only ``operation`` when that differs)."""
        if self.operation != other.operation:
            return [_FIELD_NAMES["operation"]]
        names = dict(_FIELD_NAMES)
        if self.operation in _LOW_LATENCY:
            names["with_weights"] = "capacity"
        return [names[field] for field, a, b in zip(self._fields, self, other) if a != b]


def check_fingerprints(rank: int, mine: CallFingerprint, theirs: Mapping[int, CallFingerprint]) -> None:
    """Raise ``InconsistentCallError`` if any peer's fingerprint differs from ``mine``.

    Arguments:
        rank: this rank.
        mine: this rank's fingerprint.
        theirs: peer rank -> the fingerprint it sent.

    Raises:
        InconsistentCallError: naming this rank, the lowest differing peer, both calls and the
            differing fields (and how many other peers differ).
    """
    differing = [peer for peer in sorted(theirs) if theirs[peer] != mine]
    if not differing:
        return
    peer = differing[0]
    names = mine.differences(theirs[peer])
    reason = f"{', '.join(names)} differ{'s' if len(names) == 1 else ''}"
    if len(differing) > 1:
        reason += f"; {len(differing) - 1} more rank(s) differ"
    raise InconsistentCallError(
        mine.operation_name, rank, peer, mine.describe(), theirs[peer].describe(), reason
    )


def check_row_counts(
    rank: int, mine: CallFingerprint, expected: Sequence[int], sent: Mapping[int, int]
) -> None:
    """Raise ``InconsistentCallError`` if a peer sends this rank another number of rows than this
    rank's handle expects from it (equal fingerprints, but not the same dispatch's handle).

    Arguments:
        rank: this rank.
        mine: this rank's fingerprint (the peers' are equal to it).
        expected: rows this rank expects from each rank.
        sent: peer rank -> rows that peer announced it sends here.
    """
    for peer in sorted(sent):
        if sent[peer] != expected[peer]:
            reason = (
                f"rank {peer} sends {sent[peer]} rows, rank {rank} expects {expected[peer]}: "
                "handles of different dispatches"
            )
            raise InconsistentCallError(
                mine.operation_name, rank, peer, mine.describe(), mine.describe(), reason
            )


class CallNumbers:
    """A ``Buffer``'s call counter: ``stamp`` gives a call its sequence number when it starts
    communicating (word 1 of its fingerprint). The reference backend counts the calls of both modes
    with one counter."""

    def __init__(self) -> None:
        self.count = 0

    def stamp(self, fingerprint: CallFingerprint) -> CallFingerprint:
        """``fingerprint`` with the next sequence number (1 for a ``Buffer``'s first call)."""
        self.count += 1
        return fingerprint._replace(sequence=self.count)
