"""Multi-node mode of the reference backend: DeepEP V1's internode handle and reduction order.

The reference still moves every row straight from its source to its destination rank (one message
per pair of ranks); what makes it multi-node is what it computes: DeepEP's internode handle (every
entry, from the routing; see ``epcomm.handles.InternodeHandle``) and DeepEP's two-level combine
(``combine_by_node``), whose bf16 rounding per node a hierarchical GPU kernel reproduces bit for bit.

What a rank needs from others travels with the dispatch payload: besides its rows, each message
from rank ``s`` to rank ``j`` carries ``s``'s source metadata of those rows and the
``gbl_channel_prefix_matrix[j]`` row, and to its RDMA peer on node ``n`` (same local rank) also
``rdma_channel_prefix_matrix[n]`` and the ``send_nvl_head`` rows of the tokens it sends to node
``n``. Their sizes follow from the call header (``InternodeCall.header_words``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from epcomm.errors import InconsistentCallError
from epcomm.fingerprint import CallFingerprint
from epcomm.handles import InternodeHandle
from epcomm.topology import NodeTopology

__all__ = [
    "InternodeCall",
    "InternodeMessage",
    "SenderLayout",
    "assemble_handle",
    "channel_of_tokens",
    "channel_prefix_matrix",
    "combine_by_node",
    "ordinal_in_channel",
    "zero_header_words",
]


def channel_of_tokens(num_tokens: int, num_channels: int, device: torch.device) -> torch.Tensor:
    """DeepEP's channel of each token: ``t // ceil(num_tokens / num_channels)``.

    Returns:
        ``[num_tokens]`` int64.

    Example:
        10 tokens in 4 channels of 3: ``[0, 0, 0, 1, 1, 1, 2, 2, 2, 3]``.
    """
    per_channel = max(1, -(-num_tokens // num_channels))
    return torch.arange(num_tokens, dtype=torch.int64, device=device) // per_channel


def channel_prefix_matrix(mask: torch.Tensor, channel: torch.Tensor, num_channels: int) -> torch.Tensor:
    """``[k][c]`` = tokens of channels ``0..c`` with ``mask[:, k]``.

    Arguments:
        mask: ``[num_tokens, K]`` bool.
        channel: ``[num_tokens]`` int64, from ``channel_of_tokens``.
        num_channels: channels.

    Returns:
        ``[K, num_channels]`` int32, inclusive prefix sums over channels.
    """
    counts = torch.zeros(mask.size(1), num_channels, dtype=torch.int64, device=mask.device)
    counts.index_add_(1, channel, mask.t().to(torch.int64))
    return counts.cumsum(dim=1).to(torch.int32)


def ordinal_in_channel(mask: torch.Tensor, channel: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """The index of each token among its channel's tokens with ``mask[:, k]``, or ``-1``.

    Arguments:
        mask: ``[num_tokens, K]`` bool.
        channel: ``[num_tokens]`` int64.
        prefix: ``[K, num_channels]`` int32, ``channel_prefix_matrix(mask, channel, ...)``.

    Returns:
        ``[num_tokens, K]`` int32.
    """
    running = mask.to(torch.int64).cumsum(dim=0) - 1
    exclusive = torch.cat([torch.zeros_like(prefix[:, :1]), prefix[:, :-1]], dim=1).to(torch.int64)
    ordinal = running - exclusive[:, channel].t()
    return torch.where(mask, ordinal, -1).to(torch.int32)


class SenderLayout(NamedTuple):
    """What this rank computes about its own tokens (see ``InternodeHandle`` for the meanings).

    Fields:
        is_in_node: ``[num_tokens, num_nodes]`` bool.
        rdma_channel_prefix_matrix: ``[num_nodes, num_channels]`` int32.
        gbl_channel_prefix_matrix: ``[num_ranks, num_channels]`` int32.
        send_rdma_head: ``[num_tokens, num_nodes]`` int32.
        rank_ordinal: ``[num_tokens, num_ranks]`` int32, the index of a token among its channel's
            tokens that go to each rank (``-1`` where it does not): the ``send_nvl_head`` entries.
        node_bits: ``[num_tokens, num_nodes]`` int32, bit ``l`` set where the token goes to local
            rank ``l`` of the node.
    """

    is_in_node: torch.Tensor
    rdma_channel_prefix_matrix: torch.Tensor
    gbl_channel_prefix_matrix: torch.Tensor
    send_rdma_head: torch.Tensor
    rank_ordinal: torch.Tensor
    node_bits: torch.Tensor

    @staticmethod
    def of(is_token_in_rank: torch.Tensor, topology: NodeTopology, num_channels: int) -> SenderLayout:
        """The layout of ``is_token_in_rank [num_tokens, num_ranks]`` bool."""
        num_tokens, device = is_token_in_rank.size(0), is_token_in_rank.device
        per_node = is_token_in_rank.view(num_tokens, topology.num_nodes, topology.num_ranks_per_node)
        is_in_node = per_node.any(dim=2)
        channel = channel_of_tokens(num_tokens, num_channels, device)
        rdma_prefix = channel_prefix_matrix(is_in_node, channel, num_channels)
        gbl_prefix = channel_prefix_matrix(is_token_in_rank, channel, num_channels)
        shifts = torch.arange(topology.num_ranks_per_node, dtype=torch.int64, device=device)
        # int64 sum, then int32 with wrap-around: bit 31 (local rank 31) becomes the sign bit.
        bits = (per_node.to(torch.int64) << shifts).sum(dim=2)
        node_bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
        return SenderLayout(
            is_in_node,
            rdma_prefix,
            gbl_prefix,
            ordinal_in_channel(is_in_node, channel, rdma_prefix),
            ordinal_in_channel(is_token_in_rank, channel, gbl_prefix),
            node_bits,
        )


def zero_header_words(topology: NodeTopology) -> list[int]:
    """The multi-node words of the header of a call other than a fresh dispatch: zeros, as many as
    ``InternodeCall.header_words`` (the header has one size in every call)."""
    return [0] * (1 + topology.num_nodes)


class InternodeMessage(NamedTuple):
    """The multi-node part of a dispatch message from one rank to another (int32 tensors).

    Fields:
        src_meta: ``[num_rows, 2]``: source node and node bits of each row sent.
        gbl_row: ``[num_channels]``: the sender's ``gbl_channel_prefix_matrix`` row of the receiver.
        rdma_row: ``[num_channels]``, only to the RDMA peer: the sender's
            ``rdma_channel_prefix_matrix`` row of the receiver's node; else empty.
        nvl_head: ``[tokens to the node, num_ranks_per_node]``, only to the RDMA peer: the
            ``send_nvl_head`` rows of the tokens the sender sends to the receiver's node; else empty.
    """

    src_meta: torch.Tensor
    gbl_row: torch.Tensor
    rdma_row: torch.Tensor
    nvl_head: torch.Tensor

    @staticmethod
    def build(
        layout: SenderLayout, is_token_in_rank: torch.Tensor, topology: NodeTopology, src: int, dst: int
    ) -> InternodeMessage:
        """What rank ``src`` with ``layout`` sends rank ``dst``."""
        node, per_node = topology.node_of(dst), topology.num_ranks_per_node
        to_dst = is_token_in_rank[:, dst]
        bits = layout.node_bits[to_dst, node]
        src_meta = torch.stack([torch.full_like(bits, topology.node_of(src)), bits], dim=1)
        empty = torch.empty(0, dtype=torch.int32, device=bits.device)
        rdma_row, nvl_head = empty, empty.view(0, per_node)
        if topology.local_rank_of(dst) == topology.local_rank_of(src):
            rdma_row = layout.rdma_channel_prefix_matrix[node]
            to_node = layout.is_in_node[:, node]
            nvl_head = layout.rank_ordinal[to_node][:, node * per_node : (node + 1) * per_node]
        return InternodeMessage(src_meta, layout.gbl_channel_prefix_matrix[dst], rdma_row, nvl_head)

    def to_bytes(self) -> torch.Tensor:
        """The four blocks as one 1-D uint8 tensor."""
        return torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in self])

    @staticmethod
    def num_bytes(num_rows: int, num_channels: int, num_node_tokens: int | None, per_node: int) -> int:
        """Bytes of a message of ``num_rows`` rows; ``num_node_tokens`` is ``None`` unless it comes
        from the RDMA peer (then: the tokens that peer sends to this node)."""
        words = num_rows * 2 + num_channels
        if num_node_tokens is not None:
            words += num_channels + num_node_tokens * per_node
        return words * 4

    @staticmethod
    def from_bytes(
        data: torch.Tensor, num_rows: int, num_channels: int, num_node_tokens: int | None, per_node: int
    ) -> InternodeMessage:
        """The blocks of ``data`` (1-D uint8 of ``num_bytes(...)`` bytes)."""
        words = data.clone().view(torch.int32)
        src_meta, rest = words[: num_rows * 2].view(num_rows, 2), words[num_rows * 2 :]
        gbl_row, rest = rest[:num_channels], rest[num_channels:]
        if num_node_tokens is None:
            return InternodeMessage(src_meta, gbl_row, rest[:0], rest[:0].view(0, per_node))
        return InternodeMessage(
            src_meta, gbl_row, rest[:num_channels], rest[num_channels:].view(-1, per_node)
        )


class InternodeCall:
    """The multi-node part of one fresh dispatch on rank ``rank``: its header words, the
    ``InternodeMessage`` it appends to each payload message, and the reading of those it receives.

    Arguments:
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
        topology: the nodes.
        rank: this rank.
        num_channels: ``config.num_sms // 2``.
    """

    def __init__(
        self, is_token_in_rank: torch.Tensor, topology: NodeTopology, rank: int, num_channels: int
    ) -> None:
        self.is_token_in_rank = is_token_in_rank
        self.topology = topology
        self.rank = rank
        self.num_channels = num_channels
        self.layout = SenderLayout.of(is_token_in_rank, topology, num_channels)
        self.peer_words: list[list[int]] = []

    def header_words(self) -> list[int]:
        """``[num_channels, tokens this rank sends to each node (num_nodes)]``."""
        return [self.num_channels, *self.layout.is_in_node.sum(dim=0).tolist()]

    def accept_header(self, fingerprint: CallFingerprint, words: Sequence[Sequence[int]]) -> None:
        """Keep every rank's header words (``words[s]``: what rank ``s`` sent after its fingerprint:
        rows per rank, then ``header_words``); raise ``InconsistentCallError`` if a peer splits its
        tokens into other channels (another ``config.num_sms``, which the fingerprint does not hold,
        would give the messages other sizes)."""
        num_ranks = self.topology.num_ranks
        self.peer_words = [list(row[num_ranks:]) for row in words]
        for peer, row in enumerate(self.peer_words):
            if row[0] != self.num_channels:
                call = fingerprint.describe()
                reason = (
                    f"config.num_sms differs: {2 * self.num_channels} on rank {self.rank}, "
                    f"{2 * row[0]} on rank {peer}"
                )
                raise InconsistentCallError(fingerprint.operation_name, self.rank, peer, call, call, reason)

    def message_to(self, dst: int) -> torch.Tensor:
        """The bytes this rank appends to its payload message to ``dst``."""
        return InternodeMessage.build(
            self.layout, self.is_token_in_rank, self.topology, self.rank, dst
        ).to_bytes()

    def _node_tokens_from(self, src: int) -> int | None:
        """Tokens ``src`` sends to this rank's node if ``src`` is this rank's RDMA peer there, else ``None``."""
        if self.topology.local_rank_of(src) != self.topology.local_rank_of(self.rank):
            return None
        return self.peer_words[src][1 + self.topology.node_of(self.rank)]

    def message_bytes(self, src: int, num_rows: int) -> int:
        """Bytes of the ``InternodeMessage`` from ``src``, which sends this rank ``num_rows`` rows."""
        return InternodeMessage.num_bytes(
            num_rows, self.num_channels, self._node_tokens_from(src), self.topology.num_ranks_per_node
        )

    def read(self, src: int, data: torch.Tensor, num_rows: int) -> InternodeMessage:
        """The ``InternodeMessage`` from ``src`` in ``data`` (``message_bytes(src, num_rows)`` bytes)."""
        return InternodeMessage.from_bytes(
            data, num_rows, self.num_channels, self._node_tokens_from(src), self.topology.num_ranks_per_node
        )

    def handle(
        self, recv_counts: Sequence[int], messages: Sequence[InternodeMessage], num_rows: int
    ) -> InternodeHandle:
        """This rank's ``InternodeHandle`` (``assemble_handle``)."""
        return assemble_handle(
            self.is_token_in_rank, self.layout, recv_counts, messages, self.topology, self.rank, num_rows
        )


def assemble_handle(
    is_token_in_rank: torch.Tensor,
    layout: SenderLayout,
    recv_counts: Sequence[int],
    messages: Sequence[InternodeMessage],
    topology: NodeTopology,
    rank: int,
    num_rows: int,
) -> InternodeHandle:
    """This rank's ``InternodeHandle`` from its own ``layout`` and the ``messages`` each rank sent it
    (rank order; ``recv_counts[s]`` rows from rank ``s``); ``num_rows`` rows of ``recv_x`` (more than
    the real count with ``num_worst_tokens``)."""
    device = is_token_in_rank.device
    counts = torch.tensor(list(recv_counts), dtype=torch.int64, device=device)
    recv_gbl_rank_prefix_sum = counts.cumsum(dim=0).to(torch.int32)
    first_row = (recv_gbl_rank_prefix_sum - counts.to(torch.int32)).view(-1, 1)
    gbl_rows = torch.stack([message.gbl_row.to(device) for message in messages])
    # Row of channel c of source s: the source's first row plus its tokens of channels 0..c-1.
    channel_start = torch.cat([torch.zeros_like(gbl_rows[:, :1]), gbl_rows[:, :-1]], dim=1)
    recv_gbl_channel_prefix_matrix = (first_row + channel_start).to(torch.int32)
    peers = [
        topology.num_ranks_per_node * node + topology.local_rank_of(rank)
        for node in range(topology.num_nodes)
    ]
    recv_rdma_channel_prefix_matrix = torch.stack([messages[peer].rdma_row.to(device) for peer in peers])
    send_nvl_head = torch.cat([messages[peer].nvl_head.to(device) for peer in peers])
    node_counts = torch.tensor(
        [messages[peer].nvl_head.size(0) for peer in peers], dtype=torch.int64, device="cpu"
    )
    recv_rdma_rank_prefix_sum = node_counts.cumsum(dim=0).to(torch.int32).to(device)
    num_recv = int(counts.sum())
    meta = torch.cat([message.src_meta.to(device) for message in messages]).view(num_recv, 2)
    if num_rows > num_recv:
        padding = torch.tensor([[-1, 0]], dtype=torch.int32, device=device).expand(num_rows - num_recv, 2)
        meta = torch.cat([meta, padding])
    recv_src_meta = meta.contiguous().view(torch.uint8).view(num_rows, 8)
    return InternodeHandle(
        is_token_in_rank=is_token_in_rank,
        rdma_channel_prefix_matrix=layout.rdma_channel_prefix_matrix,
        gbl_channel_prefix_matrix=layout.gbl_channel_prefix_matrix,
        recv_rdma_channel_prefix_matrix=recv_rdma_channel_prefix_matrix,
        recv_rdma_rank_prefix_sum=recv_rdma_rank_prefix_sum,
        recv_gbl_channel_prefix_matrix=recv_gbl_channel_prefix_matrix,
        recv_gbl_rank_prefix_sum=recv_gbl_rank_prefix_sum,
        recv_src_meta=recv_src_meta,
        send_rdma_head=layout.send_rdma_head,
        send_nvl_head=send_nvl_head,
    )


def combine_by_node(
    is_token_in_rank: torch.Tensor,
    parts: Sequence[Sequence[torch.Tensor]],
    topology: NodeTopology,
    biases: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeepEP's internode combine, bit for bit: one bf16 partial sum per (token, node), then the
    partials summed onto the token.

    Arguments:
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, the dispatch's routing.
        parts: per rank ``dst`` (rank order), ``[x_rows]`` or ``[x_rows, weight_rows]``: the rows
            ``dst`` returns, one per token that went there, in token order (bf16 ``[n, hidden]``,
            float32 ``[n, num_topk]``).
        topology: the nodes.
        biases: 0, 1 or 2 tensors ``[num_tokens, hidden]`` bf16.

    Returns:
        ``combined_x [num_tokens, hidden]`` bf16 and the summed weights ``[num_tokens, num_topk]``
        float32 (or ``None`` without weights).

    The order (float32 arithmetic; each ``+`` rounds once):

    1. Per node ``n`` and token: ``partial = 0.0``, then ``partial += float(row)`` for each rank of
       ``n`` the token went to, local rank ascending; ``partial_x = bf16(partial)`` (round to
       nearest even). Weights: the same sum in float32, not rounded.
    2. Per token: ``value = float(bias_0 or 0) + float(bias_1 or 0)``, then
       ``value += float(partial_x[n])`` for each node ``n`` the token went to, ascending;
       ``combined_x = bf16(value)``. Weights: ``0.0``, then ``+= partial`` per node, ascending.
    """
    num_tokens, device = is_token_in_rank.size(0), is_token_in_rank.device
    hidden = parts[0][0].size(1)
    with_weights = len(parts[0]) > 1
    num_topk = parts[0][1].size(1) if with_weights else 0
    per_node = topology.num_ranks_per_node
    is_in_node = is_token_in_rank.view(num_tokens, topology.num_nodes, per_node).any(dim=2)
    value = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    second = torch.zeros_like(value)
    if biases:
        value = biases[0].float()
        if len(biases) > 1:
            second = biases[1].float()
    value = value + second
    weights = torch.zeros(num_tokens, num_topk, dtype=torch.float32, device=device) if with_weights else None
    for node in range(topology.num_nodes):
        partial = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
        partial_weights = torch.zeros(num_tokens, num_topk, dtype=torch.float32, device=device)
        for dst in range(node * per_node, (node + 1) * per_node):
            token_idx = is_token_in_rank[:, dst].nonzero().view(-1)
            partial.index_add_(0, token_idx, parts[dst][0].to(device).float())
            if with_weights:
                partial_weights.index_add_(0, token_idx, parts[dst][1].to(device))
        token_idx = is_in_node[:, node].nonzero().view(-1)
        value.index_add_(0, token_idx, partial.to(torch.bfloat16)[token_idx].float())
        if weights is not None:
            weights.index_add_(0, token_idx, partial_weights[token_idx])
    return value.to(torch.bfloat16), weights
