"""Point-to-point exchanges over ``torch.distributed`` with bounded, peer-naming waits.

The reference backend moves every message with ``isend``/``irecv`` (batched for NCCL), so that
(1) masked ranks in shrink mode are simply left out and (2) a peer that never arrives is named in
the error instead of hanging a collective. Gloo groups need CPU tensors: data on CUDA travels
through host copies there (vLLM hands a gloo group with GPU data).

Shrink mode needs a wait that can give up on a peer and leave the group usable; gloo has none
(checked with the torch 2.13 wheel, gloo's TCP transport):

* ``work.wait(timeout)`` that expires closes *every* connection of the group (gloo signals the
  timeout to the whole context: the next message to any peer fails with "Application timeout
  caused pair closure"). That is why ``PendingExchange.wait`` leaves the group unusable.
* A posted ``irecv`` cannot be cancelled, and ``work.is_completed()`` stays false until ``wait()``
  returns, so it cannot be polled. Left alone, the receive stays posted: the peer's next message
  with the same tag lands in its buffer (so the buffer must stay allocated), and every later
  receive from that peer would get the message after the one meant for it.
* A thread blocked in ``wait()`` on such a receive cannot be released; when it wakes up while the
  interpreter shuts down (the peer exits at about the same time) the process aborts.
* A lost connection (the peer's process died) fails only that peer's messages; the others go on.

So ``PeerGroup.post_tolerant`` never waits on a message it is not sure of: each message starts
with an arrival byte, gloo's TCP transport writes a message into the receive tensor as it comes
in, first byte first, before anyone waits (the shrink tests of tests/dist_cpu fail if it stops
doing so), and only a receive whose arrival byte is set is waited on (bounded by ``timeout_s``:
the peer is there, the rest of its message is on the way). A peer whose byte is not set by the
deadline is dropped: its posted messages and their buffers are kept for the life of the process
(``_ABANDONED``), and this rank moves to a new tag for that peer on that group
(``_CHANNEL_TAGS``), so that no later message from it can be matched to an abandoned receive or
deliver an abandoned send. NCCL transfers cannot be abandoned at all (a receive that never
completes blocks the stream), so ``supports_tolerant_waits`` is false there.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from epcomm.errors import PeerLostError, PeerTimeoutError

__all__ = ["DroppedPeer", "PeerGroup", "PendingExchange", "TolerantExchange"]

# After the first peer times out, the remaining ones get this long each, so the error can name
# every missing peer without multiplying the wait.
_PROBE_TIMEOUT_S = 0.05
# A tolerant wait looks at the arrival bytes this often.
_POLL_INTERVAL_S = 0.0002

# What was posted to and from dropped peers (group, works, receive and send buffers), kept until
# the process ends: gloo may still write a late message into the receive buffer, or read the
# unsent one. Holding the group also keeps its id(), the key below, from being reused.
_ABANDONED: list[tuple[Any, list[Any], torch.Tensor, torch.Tensor]] = []
# (id of the group, peer's group rank) -> tag of the messages to and from that peer on that group;
# raised each time an exchange with the peer is abandoned. (Group names are reused when the
# default group is destroyed and made again; the object is not.)
_CHANNEL_TAGS: dict[tuple[int, int], int] = {}


@dataclass
class PendingExchange:
    """Messages posted by ``PeerGroup.post``; ``wait()`` completes them and fills the receives."""

    group: PeerGroup
    operation: str
    works: list[tuple[Any, list[int]]]
    host_recvs: dict[int, tuple[torch.Tensor, torch.Tensor]]
    keep_alive: list[torch.Tensor] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    wait_ns: dict[int, int] = field(default_factory=dict)
    done: bool = False

    def wait(self) -> None:
        """Wait for every message, at most ``timeout_s`` in all.

        Raises:
            PeerTimeoutError: naming the operation, this rank and the peers that never arrived.
        """
        if self.done:
            return
        timeout_s = self.group.timeout_s
        deadline = time.monotonic() + timeout_s
        missing: list[int] = []
        for work, peers in self.works:
            remaining = deadline - time.monotonic()
            budget = max(remaining, _PROBE_TIMEOUT_S) if not missing else _PROBE_TIMEOUT_S
            begin = time.monotonic_ns()
            try:
                work.wait(datetime.timedelta(seconds=budget))
            except RuntimeError as error:
                if "imed out" not in str(error) and "imeout" not in str(error):
                    # Not a timeout: the transport lost the peer (gloo: connection closed or reset).
                    raise PeerLostError(self.operation, self.group.rank, peers, str(error)) from error
                missing.extend(peers)
                continue
            for peer in peers:
                self.wait_ns[peer] = self.wait_ns.get(peer, 0) + time.monotonic_ns() - begin
        if missing:
            raise PeerTimeoutError(self.operation, self.group.rank, sorted(set(missing)), timeout_s)
        for device_tensor, host_tensor in self.host_recvs.values():
            device_tensor.copy_(host_tensor)
        self.done = True


class DroppedPeer(NamedTuple):
    """A peer that a tolerant wait gave up on.

    Fields:
        peer: its rank in the group.
        waited_s: how long the wait gave it.
        cause: the transport's error when its connection failed; ``None`` when it did not arrive.
    """

    peer: int
    waited_s: float
    cause: str | None


def _with_arrival_byte(tensor: torch.Tensor) -> torch.Tensor:
    """One byte ``1``, then ``tensor``'s bytes, on the host: uint8 ``[1 + nbytes]``."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return torch.cat([torch.ones(1, dtype=torch.uint8, device="cpu"), data])


@dataclass
class TolerantExchange:
    """Messages posted by ``PeerGroup.post_tolerant``; ``wait()`` fills the receives of the peers
    that arrive in time and drops the others (the module docstring says why it works this way).

    Fields:
        group: the peers.
        operation: name used in errors and warnings.
        peer_works: peer -> its posted send and receive.
        recvs: peer -> (the caller's tensor, the uint8 ``[1 + nbytes]`` host tensor gloo fills).
        sent: peer -> the uint8 ``[1 + nbytes]`` host tensor sent to it (shared between peers
            that get the same tensor).
        lost: peer -> the transport's error, for the peers whose messages could not be posted.
    """

    group: PeerGroup
    operation: str
    peer_works: dict[int, list[Any]]
    recvs: dict[int, tuple[torch.Tensor, torch.Tensor]]
    sent: dict[int, torch.Tensor]
    lost: dict[int, str]
    wait_ns: dict[int, int] = field(default_factory=dict)
    dropped: list[DroppedPeer] | None = None

    def _arrived(self, peer: int) -> bool:
        return int(self.recvs[peer][1][0]) != 0

    def _complete(self, peer: int) -> str | None:
        """Wait for ``peer``'s send and receive (its message is in); its connection's error, if any.

        Raises:
            PeerTimeoutError: the messages did not complete within ``timeout_s``.
        """
        timeout_s = self.group.timeout_s
        deadline = time.monotonic() + timeout_s
        for work in self.peer_works[peer]:
            budget = max(deadline - time.monotonic(), _PROBE_TIMEOUT_S)
            try:
                work.wait(datetime.timedelta(seconds=budget))
            except RuntimeError as error:
                if "imed out" in str(error) or "imeout" in str(error):
                    raise PeerTimeoutError(self.operation, self.group.rank, [peer], timeout_s) from error
                return str(error)
        return None

    def wait(self, arrival_timeout_s: float, give_up: Collection[int] = ()) -> list[DroppedPeer]:
        """Give each peer ``arrival_timeout_s`` to arrive, complete the messages of those that did
        and drop the others; the receives of the peers not dropped are filled.

        Arguments:
            arrival_timeout_s: seconds, from the start of this wait, a peer's message may take.
            give_up: peers not to wait for (e.g. masked since the messages were posted): they are
                completed if their message is already in, else dropped at once.

        Returns:
            The dropped peers by rank (the same list on a second call).

        Raises:
            PeerTimeoutError: a peer's message arrived but its send or receive did not complete
                within ``timeout_s`` (then, as in ``PendingExchange.wait``, gloo has closed the
                group's connections).
        """
        if self.dropped is not None:
            return self.dropped
        begin, begin_ns = time.monotonic(), time.monotonic_ns()
        dropped = [DroppedPeer(peer, 0.0, cause) for peer, cause in self.lost.items()]
        waiting = set(self.peer_works) - set(self.lost)
        deadlines = {peer: begin + (0.0 if peer in give_up else arrival_timeout_s) for peer in waiting}
        while waiting:
            now = time.monotonic()
            for peer in sorted(waiting):
                if self._arrived(peer):
                    self.wait_ns[peer] = time.monotonic_ns() - begin_ns
                    cause = self._complete(peer)
                    if cause is not None:
                        dropped.append(DroppedPeer(peer, time.monotonic() - begin, cause))
                    waiting.discard(peer)
                elif now >= deadlines[peer]:
                    dropped.append(DroppedPeer(peer, now - begin, None))
                    waiting.discard(peer)
            if waiting:
                time.sleep(_POLL_INTERVAL_S)
        gone = {d.peer for d in dropped}
        if gone:
            self.group.abandon(self, gone)
        for peer, (target, incoming) in self.recvs.items():
            if peer not in gone:
                target.view(-1).view(torch.uint8).copy_(incoming[1:])
        self.dropped = sorted(dropped)
        return self.dropped


class PeerGroup:
    """Ranks of one process group, addressed by group rank, with a bounded wait.

    Arguments:
        group: the ``torch.distributed`` process group.
        timeout_s: bound of every wait.
    """

    def __init__(self, group: Any, timeout_s: float) -> None:
        self.group = group
        self.rank: int = dist.get_rank(group)
        self.num_ranks: int = dist.get_world_size(group)
        self.timeout_s = timeout_s
        backend = str(dist.get_backend(group)).lower()
        self.supports_cuda = "nccl" in backend
        self._global_ranks = [dist.get_global_rank(group, r) for r in range(self.num_ranks)]

    @property
    def supports_tolerant_waits(self) -> bool:
        """Whether ``post_tolerant`` can drop a peer and keep the group usable (gloo: yes; NCCL: no)."""
        return not self.supports_cuda

    def tag(self, peer: int) -> int:
        """The tag of this rank's messages to and from ``peer`` (raised when an exchange is abandoned)."""
        return _CHANNEL_TAGS.get((id(self.group), peer), 0)

    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_cuda and not self.supports_cuda:
            return tensor.cpu()
        return tensor.contiguous()

    def post(
        self, operation: str, sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor]
    ) -> PendingExchange:
        """Post ``sends[peer]`` to each peer and receive ``recvs[peer]`` from each peer.

        Arguments:
            operation: name used in errors, e.g. ``"dispatch"``.
            sends: peer rank -> contiguous tensor to send (never this rank).
            recvs: peer rank -> contiguous tensor to fill (never this rank).

        Returns:
            ``PendingExchange``; its ``wait()`` must be called before reading ``recvs``.
        """
        ops: list[dist.P2POp] = []
        op_peers: list[int] = []
        keep_alive: list[torch.Tensor] = []
        host_recvs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for peer in sorted(set(sends) | set(recvs)):
            if peer == self.rank:
                raise ValueError(f"{operation}: a rank does not message itself (peer {peer})")
            global_rank, tag = self._global_ranks[peer], self.tag(peer)
            if peer in sends and sends[peer].numel() > 0:
                staged = self._staged(sends[peer])
                keep_alive.append(staged)
                ops.append(dist.P2POp(dist.isend, staged, global_rank, self.group, tag))
                op_peers.append(peer)
            if peer in recvs and recvs[peer].numel() > 0:
                target = recvs[peer]
                if target.is_cuda and not self.supports_cuda:
                    host = torch.empty(target.shape, dtype=target.dtype, device="cpu")
                    host_recvs[peer] = (target, host)
                    target = host
                keep_alive.append(target)
                ops.append(dist.P2POp(dist.irecv, target, global_rank, self.group, tag))
                op_peers.append(peer)
        works: list[tuple[Any, list[int]]] = []
        if ops and not self.supports_cuda:
            # Gloo: one message at a time, so a peer whose connection is gone is named at once.
            for op, peer in zip(ops, op_peers):
                try:
                    works.append((op.op(op.tensor, op.peer, op.group, op.tag), [peer]))
                except RuntimeError as error:
                    raise PeerLostError(operation, self.rank, [peer], str(error)) from error
        elif ops:
            issued = dist.batch_isend_irecv(ops)
            if len(issued) == len(ops):
                works = [(work, [peer]) for work, peer in zip(issued, op_peers)]
            else:
                # NCCL coalesces the batch into one work: the missing peer is one of these.
                works = [(work, sorted(set(op_peers))) for work in issued]
        return PendingExchange(self, operation, works, host_recvs, keep_alive)

    def post_tolerant(
        self, operation: str, sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor]
    ) -> TolerantExchange:
        """Post a message to and from each peer, each with an arrival byte (shrink mode, gloo).

        Arguments:
            operation: name used in errors and warnings.
            sends: peer rank -> tensor to send (never this rank; the same tensor object may go to
                several peers and is copied once).
            recvs: peer rank -> contiguous tensor to fill, for the same peers as ``sends``.

        Returns:
            ``TolerantExchange``; its ``wait(arrival_timeout_s)`` must be called before reading
            ``recvs``. A peer whose connection is already gone is reported by that wait, not here.
        """
        if not self.supports_tolerant_waits:
            raise RuntimeError(f"{operation}: a wait that can drop a peer needs a gloo group")
        if set(sends) != set(recvs):
            raise ValueError(
                f"{operation}: a tolerant exchange sends to and receives from the same peers; "
                f"got sends to {sorted(sends)} and receives from {sorted(recvs)}"
            )
        outgoing: dict[int, torch.Tensor] = {}
        peer_works: dict[int, list[Any]] = {}
        incoming: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        sent: dict[int, torch.Tensor] = {}
        lost: dict[int, str] = {}
        for peer in sorted(sends):
            if peer == self.rank:
                raise ValueError(f"{operation}: a rank does not message itself (peer {peer})")
            target = recvs[peer]
            if not target.is_contiguous():
                raise ValueError(f"{operation}: the receive tensor of peer {peer} must be contiguous")
            if id(sends[peer]) not in outgoing:
                outgoing[id(sends[peer])] = _with_arrival_byte(sends[peer])
            sent[peer] = outgoing[id(sends[peer])]
            host = torch.zeros(1 + target.numel() * target.element_size(), dtype=torch.uint8, device="cpu")
            incoming[peer] = (target, host)
            works: list[Any] = []
            try:
                global_rank, tag = self._global_ranks[peer], self.tag(peer)
                works.append(dist.isend(sent[peer], global_rank, self.group, tag))
                works.append(dist.irecv(host, global_rank, self.group, tag))
            except RuntimeError as error:
                lost[peer] = str(error)
            peer_works[peer] = works
        return TolerantExchange(self, operation, peer_works, incoming, sent, lost)

    def abandon(self, exchange: TolerantExchange, peers: Collection[int]) -> None:
        """Keep what ``exchange`` posted to and from ``peers`` (works and buffers) for the life of
        the process and move this rank's messages with them to a new tag on this group."""
        for peer in peers:
            _ABANDONED.append(
                (self.group, exchange.peer_works[peer], exchange.recvs[peer][1], exchange.sent[peer])
            )
            key = (id(self.group), peer)
            _CHANNEL_TAGS[key] = _CHANNEL_TAGS.get(key, 0) + 1
