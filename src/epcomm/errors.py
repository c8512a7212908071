"""Exceptions epcomm raises beyond ``ValueError``/``TypeError`` for bad arguments, and the warning
of shrink mode."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["InconsistentCallError", "PeerLostError", "PeerMaskedWarning", "PeerTimeoutError"]


class PeerTimeoutError(TimeoutError):
    """A wait for one or more peers exceeded its bound.

    The message names the operation, this rank and the peers that never arrived, e.g.
    ``"dispatch: rank 0 waited 30.0 s for rank(s) [3] (EPCOMM_TIMEOUT_S)"``.
    """

    def __init__(self, operation: str, rank: int, missing_peers: Sequence[int], waited_s: float) -> None:
        self.operation = operation
        self.rank = rank
        self.missing_peers = list(missing_peers)
        self.waited_s = waited_s
        super().__init__(
            f"{operation}: rank {rank} waited {waited_s:.1f} s for rank(s) {self.missing_peers} "
            "that never arrived (bound set by EPCOMM_TIMEOUT_S). Did that rank skip the call, "
            "raise on bad input, or die?"
        )


class PeerLostError(ConnectionError):
    """The transport lost its connection to one or more peers (the peer process died or closed it).

    The message names the operation, this rank, the lost peers and the transport's own error, e.g.
    ``"dispatch: rank 0 lost rank(s) [1]: the connection failed (Connection closed by peer ...)"``.
    """

    def __init__(self, operation: str, rank: int, lost_peers: Sequence[int], cause: str) -> None:
        self.operation = operation
        self.rank = rank
        self.lost_peers = list(lost_peers)
        first_line = cause.strip().splitlines()[0] if cause.strip() else "no detail"
        super().__init__(
            f"{operation}: rank {rank} lost rank(s) {self.lost_peers}: the connection failed "
            f"({first_line[:200]}). Did that rank die?"
        )


class PeerMaskedWarning(RuntimeWarning):
    """Shrink mode (``Buffer(..., enable_shrink=True)``): a low-latency wait gave up on a peer and
    masked it; the call went on without it.

    One line naming the operation, this rank and the peer, e.g.
    ``"epcomm: low_latency_dispatch on rank 0: peer 1 did not arrive within 3.0 s; masked (shrink mode)"``,
    or, when the peer's connection failed, ``"... peer 1 lost its connection (...); masked (shrink mode)"``.

    Attributes:
        operation: ``low_latency_dispatch``, ``low_latency_combine`` or ``clean_low_latency_buffer``.
        rank: this rank.
        peer: the masked rank.
        waited_s: how long the wait gave the peer.
        cause: the transport's error when the connection failed, else ``None``.
    """

    def __init__(
        self, operation: str, rank: int, peer: int, waited_s: float, cause: str | None = None
    ) -> None:
        self.operation = operation
        self.rank = rank
        self.peer = peer
        self.waited_s = waited_s
        self.cause = cause
        if cause is None:
            what = f"did not arrive within {waited_s:.1f} s"
        else:
            first_line = cause.strip().splitlines()[0] if cause.strip() else "no detail"
            what = f"lost its connection ({first_line[:200]})"
        super().__init__(f"epcomm: {operation} on rank {rank}: peer {peer} {what}; masked (shrink mode)")


class InconsistentCallError(ValueError):
    """Ranks made different collective calls: another operation, another call number, or other
    sizes (``hidden``, FP8 or BF16 and the scale format, ``num_experts``, ``num_topk``, another
    dispatch's handle, a handle whose rows the peer does not send).

    Raised on every rank that sees the difference, before any payload moves (NVLink low-latency
    calls: each receiver ignores the payload a differing peer already sent; calls with no host
    synchronization raise at their receive hook or the next call); the message names this
    rank, the peer and both calls in one line, e.g. ``"dispatch: rank 0 and rank 1 made different
    calls (hidden differs): rank 0: dispatch #3 hidden=7168 bf16 experts=256 topk=8+weights;
    rank 1: dispatch #3 hidden=4096 bf16 experts=256 topk=8+weights"``.

    Attributes:
        operation: the operation this rank called.
        rank: this rank.
        peer: the (first) peer whose call differs.
        mine: this rank's call, readable.
        theirs: the peer's call, readable.
    """

    MAX_MESSAGE_CHARS = 300

    def __init__(self, operation: str, rank: int, peer: int, mine: str, theirs: str, reason: str) -> None:
        self.operation = operation
        self.rank = rank
        self.peer = peer
        self.mine = mine
        self.theirs = theirs
        head = f"{operation}: rank {rank} and rank {peer} made different calls ({_clip(reason, 100)}): "
        labels = f"rank {rank}: ; rank {peer}: "
        # Both calls share what is left of the line (they only come near it with huge numbers).
        room = max(20, (self.MAX_MESSAGE_CHARS - len(head) - len(labels)) // 2)
        super().__init__(f"{head}rank {rank}: {_clip(mine, room)}; rank {peer}: {_clip(theirs, room)}")


def _clip(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters (ending in ``...``) when longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
