"""Exceptions epcomm raises beyond ``ValueError``/``TypeError`` for bad arguments."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PeerLostError", "PeerTimeoutError"]


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
