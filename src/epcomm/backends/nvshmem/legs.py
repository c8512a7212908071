"""The two legs of the hierarchical multi-node scheme on NVSHMEM (``backends.hierarchical.Legs``).

One NVSHMEM symmetric buffer per ``Buffer`` (``num_rdma_bytes``), the same map on every rank, in
int32 words::

    [0, 4 * N)                  RDMA leg flags: parity p, peer i at 2 * (p * N + i) (uint64 signals)
    [align32(4 * N), +4 * P)    NVLink leg flags, likewise
    then per leg (RDMA: N peers, S_r words per slot; NVLink: P peers, S_n):
        send staging [peers][slot], receive areas of parity 0 and 1 [peers][slot]

Each exchange of a leg stages this rank's blocks, then ``kernels.leg_exchange`` moves them (RDMA
leg: put-with-signal to the peer's PE, whatever reaches it; NVLink leg: stores through
``nvshmem_ptr``) and waits, bounded, for every peer's block. Consecutive exchanges of a leg
alternate the receive area: a rank writes a peer's area of parity ``p`` again only after that
peer's next exchange reached it, which the peer launches after reading the area on its stream.
The host waits for the exchange (its sizes and the orchestrator need it) and raises
``PeerTimeoutError`` naming the operation and the missing peer.

The slot size is the leg's half of ``num_rdma_bytes`` over three slots per peer. A block larger
than a slot moves in rounds, one slot each (``NvshmemLegs._exchange``): every rank of the leg runs
as many rounds as the leg's largest block needs, agreed through a prefix of each block of the first
round, so a small ``num_rdma_bytes`` costs rounds, never an error.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from epcomm._math import align_up
from epcomm.backends.nvshmem.runtime import group_pes, nvshmem_symmetric_memory, retain
from epcomm.errors import PeerTimeoutError
from epcomm.kernels.leg_exchange import launch_leg_exchange, leg_put_kernel, leg_store_kernel
from epcomm.kernels.nvshmem_peers import build_peer_table
from epcomm.kernels.nvshmem_primitives import launchable
from epcomm.topology import NodeTopology

__all__ = ["NvshmemLegs"]

_ALIGN_WORDS = 32
_LEG_CODE = 1  # operation code in the error word (the host names the operation itself)
# Bytes before each block of a round: int64 rounds its sender needs, int64 zero (16-byte rows).
_PREFIX_BYTES = 16


class _Leg:
    """One leg's peers, slots and flags."""

    def __init__(
        self,
        ranks: list[int],
        pes: list[int],
        me_index: int,
        flag_word: int,
        area_word: int,
        slot_words: int,
        device: torch.device,
    ) -> None:
        self.ranks = ranks
        self.pes = pes
        self.me_index = me_index
        self.flag_word = flag_word
        self.slot_words = slot_words
        self.staging_word = area_word
        self.recv_words = (area_word + len(ranks) * slot_words, area_word + 2 * len(ranks) * slot_words)
        self.end_word = area_word + 3 * len(ranks) * slot_words
        self.exchanges = 0
        self.device_ranks = torch.tensor(ranks, dtype=torch.int32, device="cpu").to(device)
        self.device_pes = torch.tensor(pes, dtype=torch.int32, device="cpu").to(device)


class NvshmemLegs:
    """``Legs`` over NVSHMEM for one rank.

    Arguments:
        group: the process group (every process of the job: NVSHMEM allocations are collectives).
        topology: its nodes.
        device: this rank's GPU.
        num_bytes: size of the leg buffer (``num_rdma_bytes``).
        timeout_s: bound of every wait.
    """

    def __init__(
        self, group: Any, topology: NodeTopology, device: torch.device, num_bytes: int, timeout_s: float
    ) -> None:
        self.device = device
        self.timeout_s = timeout_s
        self.num_bytes = num_bytes
        self.rank, pes = self._group(group)
        per_node, num_nodes = topology.num_ranks_per_node, topology.num_nodes
        node, local = topology.node_of(self.rank), topology.local_rank_of(self.rank)
        rdma_ranks = [m * per_node + local for m in range(num_nodes)]
        nvl_ranks = [node * per_node + j for j in range(per_node)]
        rdma_flags = 0
        nvl_flags = align_up(4 * num_nodes, _ALIGN_WORDS)
        areas = align_up(nvl_flags + 4 * per_node, _ALIGN_WORDS)
        half = max(0, num_bytes // 4 - areas) // 2
        rdma_slot = half // (3 * num_nodes) // 4 * 4
        nvl_slot = half // (3 * per_node) // 4 * 4
        if 4 * min(rdma_slot, nvl_slot) <= _PREFIX_BYTES:
            raise ValueError(
                f"num_rdma_bytes={num_bytes} is too small for {num_nodes} nodes of {per_node} ranks"
            )
        self._rdma_leg = _Leg(
            rdma_ranks, [pes[r] for r in rdma_ranks], node, rdma_flags, areas, rdma_slot, device
        )
        self._nvl_leg = _Leg(
            nvl_ranks,
            [pes[r] for r in nvl_ranks],
            local,
            nvl_flags,
            self._rdma_leg.end_word,
            nvl_slot,
            device,
        )
        total_words = self._nvl_leg.end_word
        self.buffer, self.peer_table = self._allocate(total_words, pes)
        addresses = self.peer_table.tolist()  # synchronizes: the zeroed buffer, the table
        unreachable = [r for r in nvl_ranks if addresses[r] == 0]
        if unreachable:
            raise RuntimeError(
                f"backend 'nvshmem': rank {self.rank} cannot reach its node's ranks {unreachable} by loads "
                "and stores (nvshmem_ptr gave 0): set EPCOMM_RANKS_PER_NODE / LOCAL_WORLD_SIZE to the ranks "
                "that share an NVLink domain"
            )
        # Host-mapped error word [flag, operation, peer, rank], read without synchronizing.
        self.error_word = torch.zeros(4, dtype=torch.int32, device="cpu", pin_memory=device.type == "cuda")
        self._error_flag = ctypes.c_int32.from_address(self.error_word.data_ptr())
        # Rounds run over both legs (the legs' own counters give their flags' values: the ranks of a
        # leg run the same rounds, the ranks of another leg maybe more).
        self.rounds = 0
        # No rank writes a peer's buffer before that peer has zeroed it.
        self._barrier(group)

    # ---- the group and the device: NVSHMEM and the leg kernel (a CPU check replaces these) -----
    def _group(self, group: Any) -> tuple[int, list[int]]:
        """This rank and every rank's NVSHMEM PE."""
        return dist.get_rank(group), group_pes(group)

    def _allocate(self, total_words: int, pes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's zeroed leg buffer (``[total_words]`` int32, NVSHMEM symmetric) and its peer
        table (``[num_ranks]`` int64, from ``nvshmem_ptr``)."""
        symm_mem = nvshmem_symmetric_memory(self.device)
        buffer = symm_mem.empty(total_words, dtype=torch.int32, device=self.device)
        retain(buffer)
        buffer.zero_()
        return buffer, build_peer_table(buffer, pes)

    def _barrier(self, group: Any) -> None:
        dist.barrier(group=group)

    def _launch(self, put: bool, **arguments: Any) -> None:
        """``launch_leg_exchange`` with the leg's kernel (put-with-signal or stores)."""
        launch_leg_exchange(**arguments, kernel=launchable(leg_put_kernel) if put else leg_store_kernel)

    def _synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    def _exchange(
        self, leg: _Leg, operation: str, sends: Sequence[torch.Tensor], recv_bytes: Sequence[int], put: bool
    ) -> list[torch.Tensor]:
        """Every block in rounds of one slot each (``_round``), as many as the leg's largest block
        needs: each round's block starts with a ``_PREFIX_BYTES`` prefix whose first int64 is the
        rounds its sender needs (for its own sends and receives), so after round 0 every rank of
        the leg (each sees every other) knows the same number of rounds, the largest. A call
        within one slot is one round whose blocks are returned as views of the receive area;
        longer ones are gathered into fresh tensors."""
        me = leg.me_index
        chunk = 4 * leg.slot_words - _PREFIX_BYTES
        sizes = [int(t.numel()) if i != me else 0 for i, t in enumerate(sends)]
        recv_sizes = [int(n) if i != me else 0 for i, n in enumerate(recv_bytes)]
        mine = max([1] + [-(-n // chunk) for n in sizes + recv_sizes])
        views = self._round(leg, operation, sends, sizes, recv_sizes, 0, chunk, mine, put)
        peers = [i for i in range(len(sends)) if i != me]
        theirs = torch.stack([views[i][:8] for i in peers]).view(torch.int64).tolist() if peers else []
        rounds = max([mine] + [int(row[0]) for row in theirs])
        if rounds == 1:
            return [send if i == me else views[i][_PREFIX_BYTES:] for i, send in enumerate(sends)]
        gathered = [
            torch.empty(recv_sizes[i], dtype=torch.uint8, device=self.device) if i != me else send
            for i, send in enumerate(sends)
        ]
        for k in range(rounds):
            if k:
                views = self._round(leg, operation, sends, sizes, recv_sizes, k, chunk, rounds, put)
            for i, view in enumerate(views):
                if i != me and view.numel() > _PREFIX_BYTES:
                    gathered[i][k * chunk : k * chunk + view.numel() - _PREFIX_BYTES].copy_(
                        view[_PREFIX_BYTES:]
                    )
        return gathered

    def _round(
        self,
        leg: _Leg,
        operation: str,
        sends: Sequence[torch.Tensor],
        sizes: Sequence[int],
        recv_sizes: Sequence[int],
        k: int,
        chunk: int,
        rounds: int,
        put: bool,
    ) -> list[torch.Tensor]:
        """Round ``k`` of an exchange: bytes ``[k * chunk, (k + 1) * chunk)`` of every block after
        the prefix (``rounds`` in its first int64), moved by the leg kernel, waited for on the host.
        Returns each peer's received prefix and bytes (views of the receive area; this rank's own
        entry empty)."""
        me = leg.me_index
        self.rounds += 1
        parity = leg.exchanges % 2
        leg.exchanges += 1
        data = self.buffer.view(torch.uint8)
        slot = 4 * leg.slot_words
        prefix = torch.tensor([rounds, 0], dtype=torch.int64, device="cpu").view(torch.uint8)
        prefix = prefix.to(self.device)
        send_bytes = []
        for i, send in enumerate(sends):
            num = max(0, min(chunk, sizes[i] - k * chunk))
            if i != me:
                start = 4 * leg.staging_word + i * slot
                data[start : start + _PREFIX_BYTES].copy_(prefix)
                if num:
                    piece = send.reshape(-1).view(torch.uint8)[k * chunk : k * chunk + num]
                    data[start + _PREFIX_BYTES : start + _PREFIX_BYTES + num].copy_(piece)
            send_bytes.append(align_up(_PREFIX_BYTES + num, 16) if i != me else 0)
        self._launch(
            put,
            peer_table=self.peer_table,
            leg_ranks=leg.device_ranks,
            leg_pes=leg.device_pes,
            send_bytes=torch.tensor(send_bytes, dtype=torch.int64, device="cpu").to(self.device),
            rank=self.rank,
            me_index=me,
            epoch=leg.exchanges,
            timeout_ns=int(self.timeout_s * 1e9),
            error_address=self.error_word.data_ptr(),
            operation_code=_LEG_CODE,
            flag_word=leg.flag_word + 2 * parity * len(leg.ranks),
            staging_word=leg.staging_word,
            recv_word=leg.recv_words[parity],
            slot_words=leg.slot_words,
        )
        self._synchronize()
        if self._error_flag.value != 0:
            peer, rank = (int(v) for v in self.error_word[2:4])
            self.error_word.zero_()
            raise PeerTimeoutError(operation, rank, [peer], self.timeout_s)
        base = 4 * leg.recv_words[parity]
        views = []
        for i in range(len(sends)):
            num = max(0, min(chunk, recv_sizes[i] - k * chunk)) if i != me else 0
            views.append(data[base + i * slot : base + i * slot + (_PREFIX_BYTES + num if i != me else 0)])
        return views

    def rdma(
        self, operation: str, sends: Sequence[torch.Tensor], recv_bytes: Sequence[int]
    ) -> list[torch.Tensor]:
        """See ``Legs.rdma``: put-with-signal to the rank of this local index on every node."""
        return self._exchange(self._rdma_leg, operation, sends, recv_bytes, put=True)

    def nvl(
        self, operation: str, sends: Sequence[torch.Tensor], recv_bytes: Sequence[int]
    ) -> list[torch.Tensor]:
        """See ``Legs.nvl``: stores through ``nvshmem_ptr`` to the ranks of this node."""
        return self._exchange(self._nvl_leg, operation, sends, recv_bytes, put=False)
