"""``NvshmemLegs``' host side on simulated ranks: one thread per rank, CPU buffers in place of the
NVSHMEM allocation and a Python model of ``kernels.leg_exchange`` in place of the kernel (whose own
logic the interpreter check covers). Consecutive exchanges of both legs, of random sizes, must
each deliver exactly what every peer sent (slot offsets, the alternating receive areas, staging),
blocks larger than a slot move in as many rounds as the leg's largest needs, and a peer that never
comes is a ``PeerTimeoutError`` naming it."""

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


@pytest.mark.parametrize(("num_nodes", "per_node"), [(2, 2), (3, 1), (1, 3)])
def test_blocks_larger_than_a_slot_move_in_rounds(num_nodes: int, per_node: int) -> None:
    """A slot of 1,328 bytes (``num_bytes`` 16 KiB) and blocks of up to 9 KiB: each exchange runs
    as many rounds as the leg's largest block needs (one rank's only, sometimes), and every block
    arrives whole; the exchanges after it (one round) still line up."""

    def block(exchange: int, src: int, dst: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * exchange + 10 * src + dst)
        big = (exchange + src) % 3 == 0 and src != dst
        size = (
            int(torch.randint(3000, 9000, (1,), generator=g))
            if big
            else int(torch.randint(0, 600, (1,), generator=g))
        )
        return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)

    def body(world: _World, rank: int, topology: NodeTopology) -> tuple[list[str], list[int]]:
        legs = _SimulatedLegs(world, rank, topology, 1 << 14, 10.0)
        node, local = topology.node_of(rank), topology.local_rank_of(rank)
        failures, rounds = [], []
        for exchange in range(6):
            leg = "rdma" if exchange % 2 == 0 else "nvl"
            peers = (
                [m * per_node + local for m in range(num_nodes)]
                if leg == "rdma"
                else [node * per_node + j for j in range(per_node)]
            )
            before = legs.rounds
            got = getattr(legs, leg)(
                f"exchange {exchange}",
                [block(exchange, rank, peer) for peer in peers],
                [block(exchange, peer, rank).numel() for peer in peers],
            )
            rounds.append(legs.rounds - before)
            for peer, data in zip(peers, got):
                if not torch.equal(data, block(exchange, peer, rank)):
                    failures.append(f"rank {rank} exchange {exchange} ({leg}): block from {peer} differs")
        return failures, rounds

    results = _run(num_nodes, per_node, body)
    for result in results:
        assert not isinstance(result, Exception), repr(result)
    assert [line for lines, _ in results for line in lines] == []
    all_rounds = [rounds for _, rounds in results]
    assert max(max(rounds) for rounds in all_rounds) >= 5  # 9 KiB blocks in 1,312-byte pieces
    assert min(min(rounds) for rounds in all_rounds) == 1


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


class _CopyLegs:
    """Legs that hand each peer a fresh copy (what torch.distributed's messages give): the
    baseline the simulated NVSHMEM legs, which return views of their receive areas, must match."""

    def __init__(
        self,
        world: dict[tuple[str, int, int, int], torch.Tensor],
        barrier: threading.Barrier,
        rank: int,
        topology: NodeTopology,
    ) -> None:
        self.world, self.barrier, self.rank, self.count = world, barrier, rank, 0
        per_node, node, local = (
            topology.num_ranks_per_node,
            topology.node_of(rank),
            topology.local_rank_of(rank),
        )
        self.ranks = {
            "rdma": [m * per_node + local for m in range(topology.num_nodes)],
            "nvl": [node * per_node + j for j in range(per_node)],
        }

    def _exchange(self, leg: str, sends: Any, recv_bytes: Any) -> list[torch.Tensor]:
        self.count += 1
        for peer, send in zip(self.ranks[leg], sends):
            self.world[(leg, self.count, self.rank, peer)] = send.clone()
        self.barrier.wait()
        got = [self.world[(leg, self.count, peer, self.rank)] for peer in self.ranks[leg]]
        self.barrier.wait()
        return got

    def rdma(self, operation: str, sends: Any, recv_bytes: Any) -> list[torch.Tensor]:
        return self._exchange("rdma", sends, recv_bytes)

    def nvl(self, operation: str, sends: Any, recv_bytes: Any) -> list[torch.Tensor]:
        return self._exchange("nvl", sends, recv_bytes)


def _calls(normal: Any, rank: int, num_ranks: int, per_node: int) -> list[torch.Tensor]:
    """Two dispatch / combine / cached dispatch rounds through ``normal`` (a HierarchicalNormal);
    every tensor they return, in order."""
    from epcomm.backends.base import CombineRequest, DispatchRequest
    from epcomm.config import Config
    from epcomm.fingerprint import CallFingerprint
    from epcomm.layout import compute_dispatch_layout
    from epcomm.testing import make_routing

    outputs: list[torch.Tensor] = []
    num_experts, hidden = 4 * num_ranks, 48
    for round_ in range(2):
        routing = make_routing(20 + round_, num_experts, 3, seed=round_, rank=rank, masked_prob=0.1)
        layout = compute_dispatch_layout(routing.topk_idx, num_experts, num_ranks, per_node)
        x = torch.randn(20 + round_, hidden, generator=torch.Generator().manual_seed(rank + 10 * round_))
        x = x.to(torch.bfloat16)
        result = normal.dispatch(
            DispatchRequest(
                x,
                None,
                routing.topk_idx,
                routing.topk_weights,
                layout.is_token_in_rank,
                layout.num_tokens_per_expert,
                None,
                1,
                0,
                Config(20, 6, 256, 6, 128),
                CallFingerprint.for_dispatch(x, None, num_experts, routing.topk_idx, routing.topk_weights),
                layout.num_tokens_per_rdma_rank,
            )
        )
        outputs += [result.recv_x, result.recv_topk_idx, result.recv_topk_weights]
        outputs += [t for t in result.handle if isinstance(t, torch.Tensor)]
        combined = normal.combine(
            CombineRequest(
                result.recv_x,
                result.handle,
                result.recv_topk_weights,
                (),
                Config(20, 6, 256, 6, 128),
                CallFingerprint.for_combine(result.recv_x, result.recv_topk_weights, result.handle.sequence),
            )
        )
        outputs += [combined.combined_x, combined.combined_topk_weights]
        cached = normal.dispatch(
            DispatchRequest(
                x,
                None,
                None,
                None,
                result.handle.is_token_in_rank,
                None,
                result.handle,
                1,
                0,
                Config(20, 6, 256, 6, 128),
                CallFingerprint.for_cached_dispatch(x, None, result.handle.sequence),
            )
        )
        outputs.append(cached.recv_x)
    return [t.clone() for t in outputs if t is not None]


@pytest.mark.parametrize("num_bytes", [1 << 20, 1 << 13])
@pytest.mark.parametrize(("num_nodes", "per_node"), [(2, 2), (3, 1), (2, 3)])
def test_hierarchical_over_simulated_nvshmem_legs_equals_copying_legs(
    num_nodes: int, per_node: int, num_bytes: int
) -> None:
    # HierarchicalNormal keeps no received view past the exchange that recycles its area: over the
    # NVSHMEM legs (views of alternating receive areas) it returns what it returns over legs that
    # copy every block. With 8 KiB (slots of a few hundred bytes) every call's blocks move in rounds.
    from epcomm.backends.hierarchical import HierarchicalNormal

    num_ranks = num_nodes * per_node
    copies: dict[tuple[str, int, int, int], torch.Tensor] = {}
    barrier = threading.Barrier(num_ranks)

    def over_copies(world: _World, rank: int, topology: NodeTopology) -> list[torch.Tensor]:
        return _calls(
            HierarchicalNormal(_CopyLegs(copies, barrier, rank, topology), topology, rank),
            rank,
            num_ranks,
            per_node,
        )

    def over_nvshmem(world: _World, rank: int, topology: NodeTopology) -> list[torch.Tensor]:
        legs = _SimulatedLegs(world, rank, topology, num_bytes, 10.0)
        return _calls(HierarchicalNormal(legs, topology, rank), rank, num_ranks, per_node)

    want = _run(num_nodes, per_node, over_copies)
    got = _run(num_nodes, per_node, over_nvshmem)
    for rank, (g, w) in enumerate(zip(got, want)):
        assert not isinstance(w, Exception), repr(w)
        assert not isinstance(g, Exception), repr(g)
        assert len(g) == len(w)
        for i, (a, b) in enumerate(zip(g, w)):
            assert a.dtype == b.dtype, (rank, i)
            assert torch.equal(
                a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                b.view(torch.uint8) if b.dtype == torch.bfloat16 else b,
            ), (rank, i)
