"""Multi-node normal mode as a cluster moves it: every token crosses to another node at most once.

DeepEP V1's internode scheme, over two legs a transport provides (``Legs``): the **RDMA leg**
between the ranks with this rank's local index on every node (its "RDMA peers"; on a cluster
NVSHMEM's put-with-signal over the NIC) and the **NVLink leg** between the ranks of this node. Each
leg exchanges one byte block with each of its peers (an empty block where there is nothing to
send); a rank's block to itself never leaves it. This module holds the whole algorithm (what goes
in each block, in which order, and how the receiver assembles DeepEP's results and handle); a
transport supplies only the two exchanges. ``TorchLegs`` runs them over ``torch.distributed`` so
the algorithm runs, and is tested against the reference backend, on CPU processes.

For rank ``me`` on node ``n`` with local index ``l`` (``N`` nodes of ``P`` ranks):

Every call starts with a **header** of fixed size: RDMA leg, to node ``m``'s peer: the call's
fingerprint, ``num_channels``, the tokens ``me`` sends to node ``m`` and the rows it sends to each
rank of node ``m``; NVLink leg: each rank relays the ``N`` headers it received to every rank of its
node. After it every rank holds every rank's fingerprint (``InconsistentCallError`` before any
payload moves) and the rows each source sends to each rank of its node.

**Dispatch**: RDMA leg, to node ``m``'s peer: the tokens that need node ``m`` (token order), each
once, as packed rows (``x``, scales, top-k ids and weights, source index, the bits of the ranks of
node ``m`` that need it), then the per-expert counts of node ``m``'s experts and the handle's
channel rows. The peer (the forwarder) then sends each rank ``j`` of its node, on the NVLink leg,
the received rows whose bit ``j`` is set (source node ascending, token order), with each source's
per-expert counts and channel row for ``j``. A rank receives from its node's forwarder ``l'`` the
rows of the sources ``(n', l')`` for every node ``n'``, and orders all of them by global source
rank, as DeepEP returns them.

**Combine** goes back the same way: each rank returns, on the NVLink leg, the rows of the sources
with local index ``l'`` to forwarder ``l'``; the forwarder sums the rows of each token it forwarded
(local rank ascending, float32) and rounds once to bf16 (one partial per token and node), and
sends the partials to the source on the RDMA leg; the source adds its biases and then the
partials, node ascending, in float32, and rounds once: DeepEP's order, bit for bit the reference
backend's ``combine_by_node``.

**Cached dispatch** repeats the dispatch's paths with ``x`` (and scales) only; the forwarder
knows which ranks need each row from its handle's ``send_nvl_head``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from epcomm.backends.base import CombineRequest, CombineResult, DispatchRequest, DispatchResult
from epcomm.backends.p2p import PeerGroup
from epcomm.backends.reference import ReferenceBackend
from epcomm.backends.reference_internode import InternodeMessage, SenderLayout, assemble_handle
from epcomm.backends.rows import RowLayout, expert_counts_list, pad_rows, received_rows
from epcomm.env import Settings
from epcomm.errors import InconsistentCallError
from epcomm.fingerprint import (
    FINGERPRINT_WORDS,
    CallFingerprint,
    CallNumbers,
    check_fingerprints,
    check_row_counts,
)
from epcomm.handles import InternodeHandle
from epcomm.topology import NodeTopology
from epcomm.traffic import CallBytes, count_call_bytes, row_bytes

if TYPE_CHECKING:
    from epcomm.buffer import Buffer

__all__ = [
    "HierarchicalBackend",
    "HierarchicalNormal",
    "LegBytes",
    "Legs",
    "LegsFactory",
    "TorchLegs",
    "hierarchical_buffer",
]


class Legs(Protocol):
    """The two exchanges of the hierarchical scheme. Each sends ``sends[i]`` (1-D uint8) to peer
    ``i`` of the leg and returns what each peer sent here (``recv_bytes[i]`` bytes each; entry
    ``i`` of this rank itself is its own ``sends[i]``, unmoved)."""

    def rdma(
        self, operation: str, sends: Sequence[torch.Tensor], recv_bytes: Sequence[int]
    ) -> list[torch.Tensor]:
        """With the rank of this local index on each node (index = node)."""
        ...

    def nvl(
        self, operation: str, sends: Sequence[torch.Tensor], recv_bytes: Sequence[int]
    ) -> list[torch.Tensor]:
        """With each rank of this node (index = local rank)."""
        ...


class TorchLegs:
    """``Legs`` over ``torch.distributed`` point-to-point messages (bounded waits; any group).

    Arguments:
        peers: the group's ``PeerGroup``.
        topology: its nodes.
    """

    def __init__(self, peers: PeerGroup, topology: NodeTopology) -> None:
        self.peers = peers
        rank = peers.rank
        node, local = topology.node_of(rank), topology.local_rank_of(rank)
        per_node = topology.num_ranks_per_node
        self._rdma_ranks = [m * per_node + local for m in range(topology.num_nodes)]
        self._nvl_ranks = [node * per_node + j for j in range(per_node)]

    def _exchange(
        self, ranks: list[int], operation: str, sends: Sequence[torch.Tensor], recv_bytes: Sequence[int]
    ) -> list[torch.Tensor]:
        me = self.peers.rank
        device = sends[ranks.index(me)].device
        recvs = {
            rank: torch.empty(size, dtype=torch.uint8, device=device)
            for rank, size in zip(ranks, recv_bytes)
            if rank != me
        }
        others = {rank: send for rank, send in zip(ranks, sends) if rank != me}
        self.peers.post(operation, others, recvs).wait()
        return [send if rank == me else recvs[rank] for rank, send in zip(ranks, sends)]

    def rdma(
        self, operation: str, sends: Sequence[torch.Tensor], recv_bytes: Sequence[int]
    ) -> list[torch.Tensor]:
        """See ``Legs.rdma``."""
        return self._exchange(self._rdma_ranks, operation, sends, recv_bytes)

    def nvl(
        self, operation: str, sends: Sequence[torch.Tensor], recv_bytes: Sequence[int]
    ) -> list[torch.Tensor]:
        """See ``Legs.nvl``."""
        return self._exchange(self._nvl_ranks, operation, sends, recv_bytes)


class LegBytes(NamedTuple):
    """Payload bytes one rank sent in a call on each leg, counted from the rows it sent (the
    caller's row tensors only, as ``epcomm.traffic`` counts them; headers and metadata apart)."""

    rdma: int
    nvl: int


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` as a 1-D uint8 tensor."""
    return tensor.contiguous().view(torch.uint8).reshape(-1)


def _words(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return _bytes(torch.tensor(list(values), dtype=torch.int64, device=device))


def _rows_per_rank(bits: Sequence[torch.Tensor], per_node: int) -> list[list[int]]:
    """``[node][j]``: how many of the rows forwarded from each source node (``bits[node]``: each
    row's bits of this node's ranks) local rank ``j`` needs; one host read for all."""
    if not bits:
        return []
    shifts = torch.arange(per_node, dtype=torch.int64, device=bits[0].device)
    counts = [((b.to(torch.int64)[:, None] >> shifts) & 1).sum(dim=0) for b in bits]
    return torch.stack(counts).tolist()


class _Header(NamedTuple):
    """What the header of a call told this rank: ``rows[s][j]`` = rows rank ``s`` sends rank ``j``
    of this node; ``tokens[s]`` = tokens rank ``s`` sends this node (its RDMA rows)."""

    rows: list[list[int]]
    tokens: list[int]


class HierarchicalNormal:
    """Normal-mode dispatch, cached dispatch and combine in DeepEP's hierarchical scheme.

    Arguments:
        legs: the transport's two exchanges.
        topology: the nodes of the group.
        rank: this rank.
        calls: the call counter (shared with the low-latency mode of the same ``Buffer``).
    """

    def __init__(
        self, legs: Legs, topology: NodeTopology, rank: int, calls: CallNumbers | None = None
    ) -> None:
        self.legs = legs
        self.topology = topology
        self.rank = rank
        self.num_nodes = topology.num_nodes
        self.per_node = topology.num_ranks_per_node
        self.num_ranks = topology.num_ranks
        self.node = topology.node_of(rank)
        self.local = topology.local_rank_of(rank)
        self.calls = CallNumbers() if calls is None else calls
        self.last_leg_bytes: LegBytes | None = None
        self._last_call: tuple[str, int, InternodeHandle, LegBytes] | None = None

    # ---- header -------------------------------------------------------------------------------
    def _header(
        self,
        operation: str,
        fingerprint: CallFingerprint,
        num_channels: int,
        tokens_to_node: Sequence[int],
        rows_to_rank: Sequence[int],
        device: torch.device,
    ) -> _Header:
        """Exchange the call's header (fixed size) and check every rank's fingerprint and channels."""
        n, p = self.num_nodes, self.per_node
        words = FINGERPRINT_WORDS + 2 + p
        sends = [
            _words(
                [*fingerprint.words(), num_channels, tokens_to_node[m], *rows_to_rank[m * p : (m + 1) * p]],
                device,
            )
            for m in range(n)
        ]
        from_nodes = self.legs.rdma(f"{operation} (header)", sends, [words * 8] * n)
        relay = torch.cat(from_nodes)
        from_forwarders = self.legs.nvl(f"{operation} (header relay)", [relay] * p, [n * words * 8] * p)
        table: dict[int, list[int]] = {}
        for forwarder, block in enumerate(from_forwarders):
            rows = block.view(torch.int64).view(n, words).cpu().tolist()
            for source_node, row in enumerate(rows):
                table[source_node * p + forwarder] = row
        check_fingerprints(
            self.rank,
            fingerprint,
            {
                s: CallFingerprint.from_words(row[:FINGERPRINT_WORDS])
                for s, row in table.items()
                if s != self.rank
            },
        )
        for s in sorted(table):
            theirs = table[s][FINGERPRINT_WORDS]
            if theirs != num_channels:
                call = fingerprint.describe()
                reason = f"config.num_sms differs: {2 * num_channels} on rank {self.rank}, {2 * theirs} on rank {s}"
                raise InconsistentCallError(fingerprint.operation_name, self.rank, s, call, call, reason)
        ordered = [table[s] for s in range(self.num_ranks)]
        return _Header(
            rows=[row[FINGERPRINT_WORDS + 2 :] for row in ordered],
            tokens=[row[FINGERPRINT_WORDS + 1] for row in ordered],
        )

    def _rdma_sources(self) -> list[int]:
        """The ranks whose RDMA rows this rank forwards: local index ``l`` on every node."""
        return [m * self.per_node + self.local for m in range(self.num_nodes)]

    # ---- dispatch -----------------------------------------------------------------------------
    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Normal-mode dispatch (fresh or cached); see ``Buffer.dispatch``."""
        if request.handle is not None:
            assert isinstance(request.handle, InternodeHandle)
            return self._cached_dispatch(request, request.handle)
        assert request.num_tokens_per_expert is not None
        x, in_rank = request.x, request.is_token_in_rank
        device, num_tokens = x.device, x.size(0)
        n_nodes, p, me = self.num_nodes, self.per_node, self.rank
        num_experts = request.num_tokens_per_expert.numel()
        local_experts = num_experts // self.num_ranks
        num_channels = request.config.num_channels
        fingerprint = self.calls.stamp(request.fingerprint)
        layout = SenderLayout.of(in_rank, self.topology, num_channels)
        tokens_to_node = layout.is_in_node.sum(dim=0).tolist()
        header = self._header(
            "dispatch", fingerprint, num_channels, tokens_to_node, in_rank.sum(dim=0).tolist(), device
        )

        # RDMA leg: each token once per node it needs, with what the forwarder and the receivers need.
        token_idx = torch.arange(num_tokens, dtype=torch.int32, device=device).view(-1, 1)
        # Then the source index and the bits of the destination node's ranks (per node, below).
        rows, tensors = RowLayout.of(
            [x, request.x_scales, request.topk_idx, request.topk_weights, token_idx, layout.node_bits[:, :1]]
        )
        tensors = tensors[:-1]
        expert_block = local_experts * p
        per_expert = request.num_tokens_per_expert.to(torch.int64)
        sends = []
        for m in range(n_nodes):
            to_node = layout.is_in_node[:, m]
            packed = rows.pack([*tensors, layout.node_bits[:, m : m + 1]])[to_node]
            sends.append(
                torch.cat(
                    [
                        _bytes(packed),
                        _bytes(per_expert[m * expert_block : (m + 1) * expert_block]),
                        _bytes(layout.gbl_channel_prefix_matrix[m * p : (m + 1) * p]),
                        _bytes(layout.rdma_channel_prefix_matrix[m]),
                        _bytes(layout.rank_ordinal[to_node][:, m * p : (m + 1) * p]),
                    ]
                )
            )
        sources = self._rdma_sources()
        extras = expert_block * 8 + p * num_channels * 4 + num_channels * 4
        sizes = [header.tokens[s] * (rows.row_bytes + p * 4) + extras for s in sources]
        received = self.legs.rdma("dispatch (RDMA leg)", sends, sizes)
        rdma_rows, rdma_bits, messages_from_peers, forwarded = [], [], {}, []
        for s, block in zip(sources, received):
            count = header.tokens[s]
            data = block[: count * rows.row_bytes].view(count, rows.row_bytes)
            rest = block[count * rows.row_bytes :]
            experts = rest[: expert_block * 8].clone().view(torch.int64).view(p, local_experts)
            rest = rest[expert_block * 8 :]
            gbl = rest[: p * num_channels * 4].clone().view(torch.int32).view(p, num_channels)
            rest = rest[p * num_channels * 4 :]
            rdma_row = rest[: num_channels * 4].clone().view(torch.int32)
            nvl_head = rest[num_channels * 4 :].clone().view(torch.int32).view(count, p)
            bits = data[:, -4:].contiguous().view(torch.int32).view(-1)  # the last field: the node bits
            rdma_rows.append(data)
            rdma_bits.append(bits)
            messages_from_peers[s] = (rdma_row, nvl_head)
            forwarded.append((experts, gbl))

        # NVLink leg: the forwarder sends local rank j the rows that need it, with each source's
        # per-expert counts of j's experts and the channel row of j.
        sends = []
        for j in range(p):
            needs = [((bits >> j) & 1).bool() for bits in rdma_bits]
            blocks = [data[need].reshape(-1) for data, need in zip(rdma_rows, needs)]
            blocks += [_bytes(experts[j]) for experts, _ in forwarded]
            blocks += [_bytes(gbl[j]) for _, gbl in forwarded]
            sends.append(torch.cat(blocks))
        recv_rows = [
            [header.rows[m * p + forwarder][self.local] for m in range(n_nodes)] for forwarder in range(p)
        ]
        extras = n_nodes * (local_experts * 8 + num_channels * 4)
        received = self.legs.nvl(
            "dispatch (NVLink leg)", sends, [sum(counts) * rows.row_bytes + extras for counts in recv_rows]
        )
        by_source: dict[int, torch.Tensor] = {}
        experts_of: dict[int, torch.Tensor] = {}
        gbl_of: dict[int, torch.Tensor] = {}
        for forwarder, (block, counts) in enumerate(zip(received, recv_rows)):
            offset = 0
            for m, count in enumerate(counts):
                s = m * p + forwarder
                by_source[s] = block[offset : offset + count * rows.row_bytes].view(count, rows.row_bytes)
                offset += count * rows.row_bytes
            for m in range(n_nodes):
                experts_of[m * p + forwarder] = (
                    block[offset : offset + local_experts * 8].cpu().clone().view(torch.int64)
                )
                offset += local_experts * 8
            for m in range(n_nodes):
                gbl_of[m * p + forwarder] = (
                    block[offset : offset + num_channels * 4].clone().view(torch.int32)
                )
                offset += num_channels * 4
        recv_counts = [by_source[s].size(0) for s in range(self.num_ranks)]
        all_rows = torch.cat([by_source[s] for s in range(self.num_ranks)])
        unpacked = rows.unpack(all_rows)
        recv_bits = unpacked[-1].view(-1)
        per_expert_sum = sum(
            (experts_of[s] for s in range(self.num_ranks)), torch.zeros(local_experts, dtype=torch.int64)
        )
        per_expert_list = expert_counts_list(
            per_expert_sum, request.expert_alignment, request.num_worst_tokens
        )
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights, num_rows = received_rows(
            unpacked[:-2],
            request.x_scales is not None,
            request.topk_idx is not None,
            request.topk_weights is not None,
            me,
            local_experts,
            request.num_worst_tokens,
        )

        messages = []
        empty = torch.empty(0, dtype=torch.int32, device=device)
        for s in range(self.num_ranks):
            bits = recv_bits[sum(recv_counts[:s]) : sum(recv_counts[: s + 1])]
            src_meta = torch.stack([torch.full_like(bits, self.topology.node_of(s)), bits], dim=1)
            rdma_row, nvl_head = messages_from_peers.get(s, (empty, empty.view(0, p)))
            messages.append(
                InternodeMessage(src_meta, gbl_of[s].to(device), rdma_row.to(device), nvl_head.to(device))
            )
        handle = assemble_handle(in_rank, layout, recv_counts, messages, self.topology, me, num_rows)
        handle = handle.with_sequence(fingerprint.sequence)
        self._record(
            "dispatch",
            handle,
            row_bytes(x, request.x_scales, request.topk_idx, request.topk_weights),
            rdma_rows=[tokens_to_node[m] for m in range(n_nodes)],
            nvl_rows=[sum(column) for column in zip(*_rows_per_rank(rdma_bits, p))],
        )
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle)

    def _forwarded_bits(self, handle: InternodeHandle) -> list[torch.Tensor]:
        """Per source node: the bits of this node's ranks that need each row this rank forwards
        (from the handle's ``send_nvl_head``: ``>= 0`` where local rank ``j`` got the token)."""
        ends = handle.recv_rdma_rank_prefix_sum.tolist()
        starts = [0, *ends[:-1]]
        shifts = torch.arange(self.per_node, dtype=torch.int64, device=handle.send_nvl_head.device)
        bits = ((handle.send_nvl_head >= 0).to(torch.int64) << shifts).sum(dim=1)
        return [bits[a:b] for a, b in zip(starts, ends)]

    def _source_counts(self, handle: InternodeHandle) -> list[int]:
        """Rows this rank received from each rank in the handle's dispatch."""
        ends = handle.recv_gbl_rank_prefix_sum.tolist()
        return [b - a for a, b in zip([0, *ends[:-1]], ends)]

    def _cached_dispatch(self, request: DispatchRequest, handle: InternodeHandle) -> DispatchResult:
        x, device = request.x, request.x.device
        n_nodes, p = self.num_nodes, self.per_node
        in_rank = handle.is_token_in_rank
        is_in_node = in_rank.view(in_rank.size(0), n_nodes, p).any(dim=2)
        fingerprint = self.calls.stamp(request.fingerprint)
        tokens_to_node = is_in_node.sum(dim=0).tolist()
        num_channels = handle.rdma_channel_prefix_matrix.size(1)
        header = self._header(
            "cached dispatch", fingerprint, num_channels, tokens_to_node, in_rank.sum(dim=0).tolist(), device
        )
        expected = self._source_counts(handle)
        check_row_counts(
            self.rank,
            fingerprint,
            expected,
            {s: header.rows[s][self.local] for s in range(self.num_ranks) if s != self.rank},
        )
        rows, tensors = RowLayout.of([x, request.x_scales])
        packed = rows.pack(tensors)
        sends = [_bytes(packed[is_in_node[:, m]]) for m in range(n_nodes)]
        sources = self._rdma_sources()
        received = self.legs.rdma(
            "cached dispatch (RDMA leg)", sends, [header.tokens[s] * rows.row_bytes for s in sources]
        )
        rdma_rows = [block.view(-1, rows.row_bytes) for block in received]
        rdma_bits = self._forwarded_bits(handle)
        sends = []
        for j in range(p):
            sends.append(
                torch.cat(
                    [data[((bits >> j) & 1).bool()].reshape(-1) for data, bits in zip(rdma_rows, rdma_bits)]
                )
            )
        recv_rows = [
            [header.rows[m * p + forwarder][self.local] for m in range(n_nodes)] for forwarder in range(p)
        ]
        received = self.legs.nvl(
            "cached dispatch (NVLink leg)", sends, [sum(counts) * rows.row_bytes for counts in recv_rows]
        )
        by_source: dict[int, torch.Tensor] = {}
        for forwarder, (block, counts) in enumerate(zip(received, recv_rows)):
            offset = 0
            for m, count in enumerate(counts):
                by_source[m * p + forwarder] = block[offset : offset + count * rows.row_bytes].view(
                    count, rows.row_bytes
                )
                offset += count * rows.row_bytes
        unpacked = rows.unpack(torch.cat([by_source[s] for s in range(self.num_ranks)]))
        unpacked = [pad_rows(t, handle.num_recv_rows, 0) for t in unpacked]
        recv_scales = unpacked[1] if request.x_scales is not None else None
        self._record(
            "cached dispatch",
            handle,
            row_bytes(x, request.x_scales),
            rdma_rows=tokens_to_node,
            nvl_rows=[sum(column) for column in zip(*_rows_per_rank(rdma_bits, p))],
        )
        return DispatchResult(unpacked[0], recv_scales, None, None, [], handle)

    # ---- combine ------------------------------------------------------------------------------
    def combine(self, request: CombineRequest) -> CombineResult:
        """Normal-mode combine; see ``Buffer.combine``."""
        handle = request.handle
        assert isinstance(handle, InternodeHandle)
        x, device = request.x, request.x.device
        n_nodes, p = self.num_nodes, self.per_node
        in_rank = handle.is_token_in_rank
        num_tokens = in_rank.size(0)
        is_in_node = in_rank.view(num_tokens, n_nodes, p).any(dim=2)
        fingerprint = self.calls.stamp(request.fingerprint)
        counts = self._source_counts(handle)
        rdma_bits = self._forwarded_bits(handle)
        num_channels = handle.rdma_channel_prefix_matrix.size(1)
        # Header: rows this rank returns to each rank; tokens it sends back to each node's peer.
        back_to_node = [int(bits.numel()) for bits in rdma_bits]
        header = self._header("combine", fingerprint, num_channels, back_to_node, counts, device)
        check_row_counts(
            self.rank,
            fingerprint,
            in_rank.sum(dim=0).tolist(),
            {s: header.rows[s][self.local] for s in range(self.num_ranks) if s != self.rank},
        )
        rows, tensors = RowLayout.of([x, request.topk_weights])
        packed = rows.pack(tensors)
        starts = [sum(counts[:s]) for s in range(self.num_ranks)]
        # NVLink leg: the rows of the sources with local index l' go to forwarder l' (node order).
        sends = [
            torch.cat(
                [
                    _bytes(packed[starts[m * p + f] : starts[m * p + f] + counts[m * p + f]])
                    for m in range(n_nodes)
                ]
            )
            for f in range(p)
        ]
        by_node = _rows_per_rank(rdma_bits, p)
        from_ranks = [[by_node[m][j] for m in range(n_nodes)] for j in range(p)]  # rank j returns, per node
        received = self.legs.nvl(
            "combine (NVLink leg)", sends, [sum(per_node) * rows.row_bytes for per_node in from_ranks]
        )
        # Partials: one per token forwarded and node, local ranks ascending, rounded once to bf16.
        returned = []
        offsets = [0] * p
        for m, bits in enumerate(rdma_bits):
            partial = torch.zeros(bits.numel(), x.size(1), dtype=torch.float32, device=device)
            partial_weights = (
                torch.zeros(bits.numel(), request.topk_weights.size(1), dtype=torch.float32, device=device)
                if request.topk_weights is not None
                else None
            )
            for j in range(p):
                count = from_ranks[j][m]
                block = received[j][offsets[j] : offsets[j] + count * rows.row_bytes].view(
                    count, rows.row_bytes
                )
                offsets[j] += count * rows.row_bytes
                token_idx = ((bits >> j) & 1).nonzero().view(-1)
                parts = rows.unpack(block)
                partial.index_add_(0, token_idx, parts[0].float())
                if partial_weights is not None:
                    partial_weights.index_add_(0, token_idx, parts[1])
            out = [partial.to(torch.bfloat16)] + ([partial_weights] if partial_weights is not None else [])
            returned.append(out)
        partial_rows, _ = RowLayout.of(returned[0])
        sends = [_bytes(partial_rows.pack(out)) for out in returned]
        tokens_back = [header.tokens[m * p + self.local] for m in range(n_nodes)]
        received = self.legs.rdma(
            "combine (RDMA leg)", sends, [count * partial_rows.row_bytes for count in tokens_back]
        )
        # The source: biases, then each node's partial, node ascending, float32; one rounding.
        value = torch.zeros(num_tokens, x.size(1), dtype=torch.float32, device=device)
        second = torch.zeros_like(value)
        if request.bias:
            value = request.bias[0].float()
            if len(request.bias) > 1:
                second = request.bias[1].float()
        value = value + second
        weights = (
            torch.zeros(num_tokens, request.topk_weights.size(1), dtype=torch.float32, device=device)
            if request.topk_weights is not None
            else None
        )
        for m, block in enumerate(received):
            token_idx = is_in_node[:, m].nonzero().view(-1)
            parts = partial_rows.unpack(block.view(-1, partial_rows.row_bytes))
            value.index_add_(0, token_idx, parts[0].float())
            if weights is not None:
                weights.index_add_(0, token_idx, parts[1])
        self._record(
            "combine",
            handle,
            row_bytes(x, request.topk_weights),
            rdma_rows=back_to_node,
            nvl_rows=[sum(counts[m * p + f] for m in range(n_nodes)) for f in range(p)],
        )
        return CombineResult(value.to(torch.bfloat16), weights)

    # ---- byte counts --------------------------------------------------------------------------
    def _record(
        self,
        operation: str,
        handle: InternodeHandle,
        num_row_bytes: int,
        rdma_rows: Sequence[int],
        nvl_rows: Sequence[int],
    ) -> None:
        """Keep the bytes this call sent on each leg (rows to other nodes' peers; to this node's
        other ranks)."""
        sent = LegBytes(
            rdma=sum(int(r) for m, r in enumerate(rdma_rows) if m != self.node) * num_row_bytes,
            nvl=sum(int(r) for j, r in enumerate(nvl_rows) if j != self.local) * num_row_bytes,
        )
        self.last_leg_bytes = sent
        self._last_call = (operation, num_row_bytes, handle, sent)

    def last_call_bytes(self) -> CallBytes | None:
        """The bytes this rank sent in its last call: across nodes and within the node as the legs
        sent them, beside what a flat all-to-all would send (``epcomm.traffic``)."""
        if self._last_call is None:
            return None
        operation, num_row_bytes, handle, sent = self._last_call
        flat = count_call_bytes(operation, num_row_bytes, handle, self.topology, self.rank)
        return dataclasses.replace(flat, inter_node=sent.rdma, intra_node=sent.nvl)


LegsFactory = Callable[[PeerGroup, NodeTopology], Legs]
"""Builds a rank's ``Legs`` from its ``PeerGroup`` and topology."""


class HierarchicalBackend(ReferenceBackend):
    """The reference backend with its multi-node normal mode run by ``HierarchicalNormal`` over the
    legs ``legs`` builds (``TorchLegs`` by default: the algorithm on any ``torch.distributed``
    group, CPU included). Low-latency mode is the reference backend's.

    Arguments:
        group: the process group (spanning several nodes).
        timeout_s: bound of every wait for a peer.
        num_ranks_per_node: ranks per node.
        enable_shrink: shrink mode of the low-latency calls (``ReferenceBackend``).
        shrink_timeout_s: that mode's bound.
        legs: builds the two exchanges (``None``: ``TorchLegs``).
        name: the backend's name (``Buffer.backend_name``).
    """

    def __init__(
        self,
        group: Any,
        timeout_s: float,
        num_ranks_per_node: int,
        enable_shrink: bool = False,
        shrink_timeout_s: float = 3.0,
        legs: LegsFactory | None = None,
        name: str = "hierarchical",
    ) -> None:
        super().__init__(
            group,
            timeout_s,
            num_ranks_per_node,
            enable_shrink,
            shrink_timeout_s=shrink_timeout_s,
            multi_node=True,
        )
        self.name = name
        made = (legs or TorchLegs)(self.peers, self.topology)
        self.hierarchical = HierarchicalNormal(made, self.topology, self.rank, self.calls)

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """See ``HierarchicalNormal.dispatch``."""
        return self.hierarchical.dispatch(request)

    def combine(self, request: CombineRequest) -> CombineResult:
        """See ``HierarchicalNormal.combine``."""
        return self.hierarchical.combine(request)

    def last_call_bytes(self) -> CallBytes | None:
        """See ``HierarchicalNormal.last_call_bytes``: the bytes the legs sent."""
        return self.hierarchical.last_call_bytes()


def hierarchical_buffer(group: Any, num_rdma_bytes: int, settings: Settings) -> Buffer:
    """A multi-node ``Buffer`` whose normal mode runs ``HierarchicalNormal`` over ``TorchLegs``
    (``HierarchicalBackend``; ``backend_name`` ``"hierarchical"``): the algorithm on CPU
    processes, for its tests and ``benchmarks/bench_multinode.py --backend hierarchical``.

    Arguments:
        group: the process group (every rank calls this, as ``Buffer()``).
        num_rdma_bytes: ``> 0`` (multi-node mode).
        settings: the options; ``ranks_per_node`` sets the simulated nodes.

    Raises:
        ValueError: the group does not span several nodes with ``num_rdma_bytes > 0``.
    """
    from epcomm.buffer import Buffer

    buffer = Buffer(group, num_rdma_bytes=num_rdma_bytes, backend="reference", settings=settings)
    if not buffer.is_multi_node:
        buffer.destroy()
        raise ValueError("hierarchical_buffer: the group must span several nodes, with num_rdma_bytes > 0")
    buffer._backend = HierarchicalBackend(
        group, settings.timeout_s, buffer.num_ranks_per_node, shrink_timeout_s=settings.shrink_timeout_s
    )
    buffer.backend_name = buffer._backend.name
    return buffer
