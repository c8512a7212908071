"""``NvshmemLegs``' host side on simulated ranks: one thread per rank, CPU buffers in place of the
NVSHMEM allocation and a Python model of ``kernels.leg_exchange`` in place of the kernel (whose own
logic the interpreter check covers). Consecutive exchanges of both legs, of random sizes, must
each deliver exactly what every peer sent (slot offsets, the alternating receive areas, staging),
a block too large for a slot is refused before anything moves, and a peer that never comes is a
``PeerTimeoutError`` naming it."""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import pytest
import torch

from epcomm.backends.nvshmem.legs import NvshmemLegs
from epcomm.errors import PeerTimeoutError
from epcomm.topology import NodeTopology


class _World:
    def __init__(self, num_ranks: int) -> None:
        self.buffers: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int32)] * num_ranks
        self.barrier = threading.Barrier(num_ranks)


class _SimulatedLegs(NvshmemLegs):
    def __init__(
        self, world: _World, rank: int, topology: NodeTopology, num_bytes: int, timeout_s: float
    ) -> None:
        self.world, self.sim_rank = world, rank
        super().__init__(None, topology, torch.device("cpu"), num_bytes, timeout_s)

    def _group(self, group: Any) -> tuple[int, list[int]]:
        return self.sim_rank, list(range(len(self.world.buffers)))

    def _allocate(self, total_words: int, pes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.zeros(total_words, dtype=torch.int32)
        self.world.buffers[self.sim_rank] = buffer
        self.world.barrier.wait()
        return buffer, torch.tensor([b.data_ptr() for b in self.world.buffers], dtype=torch.int64)

    def _barrier(self, group: Any) -> None:
        self.world.barrier.wait()

    def _launch(self, put: bool, **a: Any) -> None:
        # What each program of leg_exchange does: block to peer i's slot for this rank, then the
        # epoch in peer i's flag for this rank; then wait for every peer's flag here.
        me, ranks, sizes = a["me_index"], a["leg_ranks"].tolist(), a["send_bytes"].tolist()
        slot, local = a["slot_words"], self.world.buffers[a["rank"]]
        for i, peer in enumerate(ranks):
            if i != me:
                words = sizes[i] // 4
                start = a["staging_word"] + i * slot
                dst = self.world.buffers[peer]
                dst[a["recv_word"] + me * slot : a["recv_word"] + me * slot + words] = local[
                    start : start + words
                ]
                dst[a["flag_word"] + 2 * me] = a["epoch"]
        for i, peer in enumerate(ranks):
            if i == me:
                continue
            deadline = time.monotonic() + a["timeout_ns"] / 1e9
            while int(local[a["flag_word"] + 2 * i]) < a["epoch"]:
                if time.monotonic() > deadline:
                    error = (ctypes.c_int32 * 4).from_address(a["error_address"])
                    error[1], error[2], error[3], error[0] = a["operation_code"], peer, a["rank"], 1
                    return
                time.sleep(0.0002)

    def _synchronize(self) -> None:
        pass


def _block(exchange: int, src: int, dst: int, leg: str) -> torch.Tensor:
    """The bytes rank ``src`` sends rank ``dst`` in ``exchange`` (any length, some empty)."""
    g = torch.Generator().manual_seed(hash((exchange, src, dst, leg)) % (2**31))
    size = int(torch.randint(0, 700, (1,), generator=g)) if (exchange + src + dst) % 5 else 0
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)


def _run(num_nodes: int, per_node: int, body: Any) -> list[Any]:
    world = _World(num_nodes * per_node)
    topology = NodeTopology(num_nodes * per_node, per_node)
    results: list[Any] = [None] * (num_nodes * per_node)

    def rank_main(rank: int) -> None:
        try:
            results[rank] = body(world, rank, topology)
        except Exception as error:  # the test reads it
            results[rank] = error

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize(("num_nodes", "per_node"), [(2, 2), (3, 1), (1, 3), (2, 3)])
def test_consecutive_exchanges_deliver_every_block(num_nodes: int, per_node: int) -> None:
    def body(world: _World, rank: int, topology: NodeTopology) -> list[str]:
        legs = _SimulatedLegs(world, rank, topology, 1 << 18, 10.0)
        node, local = topology.node_of(rank), topology.local_rank_of(rank)
        failures = []
        for exchange in range(6):
            leg = "rdma" if exchange % 3 != 2 else "nvl"
            peers = (
                [m * per_node + local for m in range(num_nodes)]
                if leg == "rdma"
                else [node * per_node + j for j in range(per_node)]
            )
            sends = [_block(exchange, rank, peer, leg) for peer in peers]
            sizes = [_block(exchange, peer, rank, leg).numel() for peer in peers]
            got = getattr(legs, leg)(f"exchange {exchange}", sends, sizes)
            for peer, block in zip(peers, got):
                if not torch.equal(block, _block(exchange, peer, rank, leg)):
                    failures.append(f"rank {rank} exchange {exchange} ({leg}): block from {peer} differs")
        return failures

    results = _run(num_nodes, per_node, body)
    for result in results:
        assert not isinstance(result, Exception), repr(result)
    assert [line for lines in results for line in lines] == []


def test_a_block_larger_than_a_slot_is_refused_before_sending() -> None:
    def body(world: _World, rank: int, topology: NodeTopology) -> str:
        legs = _SimulatedLegs(world, rank, topology, 1 << 14, 2.0)
        big = torch.zeros(1 << 13, dtype=torch.uint8)
        try:
            legs.rdma("dispatch (RDMA leg)", [big, big], [0, 0])
        except ValueError as error:
            return str(error)
        return "no error"

    for message in _run(2, 1, body):
        assert "does not fit" in message, message
        assert "raise num_rdma_bytes" in message, message


def test_a_missing_peer_is_named() -> None:
    def body(world: _World, rank: int, topology: NodeTopology) -> str:
        legs = _SimulatedLegs(world, rank, topology, 1 << 16, 0.3)
        if rank == 1:
            return "skipped"
        try:
            legs.nvl("combine (NVLink leg)", [torch.ones(16, dtype=torch.uint8)] * 2, [16, 16])
        except PeerTimeoutError as error:
            return str(error)
        return "no error"

    message = _run(1, 2, body)[0]
    assert message.startswith("combine (NVLink leg): rank 0 waited"), message
    assert "[1]" in message, message
