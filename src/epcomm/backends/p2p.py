"""Point-to-point exchanges over ``torch.distributed`` with bounded, peer-naming waits.

The reference backend moves every message with ``isend``/``irecv`` (batched for NCCL), so that
(1) masked ranks in shrink mode are simply left out and (2) a peer that never arrives is named in
the error instead of hanging a collective. Gloo groups need CPU tensors: data on CUDA travels
through host copies there (vLLM hands a gloo group with GPU data).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from epcomm.errors import PeerLostError, PeerTimeoutError

__all__ = ["PeerGroup", "PendingExchange"]

# After the first peer times out, the remaining ones get this long each, so the error can name
# every missing peer without multiplying the wait.
_PROBE_TIMEOUT_S = 0.05


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
            if peer in sends and sends[peer].numel() > 0:
                staged = self._staged(sends[peer])
                keep_alive.append(staged)
                ops.append(dist.P2POp(dist.isend, staged, self._global_ranks[peer], self.group))
                op_peers.append(peer)
            if peer in recvs and recvs[peer].numel() > 0:
                target = recvs[peer]
                if target.is_cuda and not self.supports_cuda:
                    host = torch.empty(target.shape, dtype=target.dtype, device="cpu")
                    host_recvs[peer] = (target, host)
                    target = host
                keep_alive.append(target)
                ops.append(dist.P2POp(dist.irecv, target, self._global_ranks[peer], self.group))
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
