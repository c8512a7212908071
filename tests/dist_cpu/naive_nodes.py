"""Naive multi-node oracle: DeepEP V1's internode handle, its two-level combine and the byte counts
of both schemes, computed token by token from every rank's inputs with plain Python loops.

Nodes are blocks of ``ranks_per_node`` consecutive ranks; a sender splits its ``T`` tokens into
``num_channels`` channels of ``ceil(T / num_channels)`` consecutive tokens (DeepEP's
``get_channel_task_range``). The RDMA peer of rank ``me`` on node ``n`` is ``n * ranks_per_node +
me % ranks_per_node``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .naive import RankInputs, power_of_two_scale, ranks_of_token


@dataclass(frozen=True)
class Topology:
    """``num_ranks`` ranks in nodes of ``ranks_per_node``; ``num_channels`` channels per sender."""

    num_ranks: int
    ranks_per_node: int
    num_channels: int
    num_experts: int

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def peer(self, rank: int, node: int) -> int:
        """The rank of ``node`` with ``rank``'s local rank."""
        return node * self.ranks_per_node + rank % self.ranks_per_node


def _destinations(inputs: RankInputs, topology: Topology) -> list[list[int]]:
    local_experts = topology.num_experts // topology.num_ranks
    return [ranks_of_token(experts, local_experts) for experts in inputs.topk_idx.tolist()]


def _channel(token: int, num_tokens: int, num_channels: int) -> int:
    per_channel = max(1, -(-num_tokens // num_channels))
    return token // per_channel


def naive_tokens_per_node(inputs: RankInputs, topology: Topology) -> list[int]:
    """``num_tokens_per_rdma_rank``: a token counts once for each node one of its experts lives on."""
    counts = [0] * topology.num_nodes
    for ranks in _destinations(inputs, topology):
        for node in {topology.node(rank) for rank in ranks}:
            counts[node] += 1
    return counts


@dataclass(frozen=True)
class ExpectedInternode:
    """The ten handle entries (as nested lists) rank ``me`` should get, DeepEP's order."""

    rdma_channel_prefix_matrix: list[list[int]]
    gbl_channel_prefix_matrix: list[list[int]]
    recv_rdma_channel_prefix_matrix: list[list[int]]
    recv_rdma_rank_prefix_sum: list[int]
    recv_gbl_channel_prefix_matrix: list[list[int]]
    recv_gbl_rank_prefix_sum: list[int]
    recv_src_meta: list[tuple[int, int]]  # (source node, local-rank bits) per received row
    send_rdma_head: list[list[int]]
    send_nvl_head: list[list[int]]


def _ordinals(destinations: list[list[int]], targets: Sequence[int], num_channels: int) -> list[list[int]]:
    """``[t][i]``: the index of token ``t`` among its channel's tokens that reach ``targets[i]``
    (a node or rank, as tested by ``target in destinations[t]``), or ``-1``."""
    seen: dict[tuple[int, int], int] = {}
    rows = []
    for token, reached in enumerate(destinations):
        channel = _channel(token, len(destinations), num_channels)
        row = []
        for target in targets:
            if target in reached:
                row.append(seen.get((channel, target), 0))
                seen[(channel, target)] = row[-1] + 1
            else:
                row.append(-1)
        rows.append(row)
    return rows


def _channel_prefix(reached: list[list[int]], targets: Sequence[int], num_channels: int) -> list[list[int]]:
    """``[i][c]``: tokens of channels ``0..c`` that reach ``targets[i]``."""
    matrix = []
    for target in targets:
        row = [0] * num_channels
        for token, destinations in enumerate(reached):
            if target in destinations:
                row[_channel(token, len(reached), num_channels)] += 1
        for channel in range(1, num_channels):
            row[channel] += row[channel - 1]
        matrix.append(row)
    return matrix


def naive_internode_handle(
    all_inputs: Sequence[RankInputs], me: int, topology: Topology
) -> ExpectedInternode:
    """Every entry of rank ``me``'s internode handle, from DeepEP's definitions."""
    num_ranks, per_node, num_channels = topology.num_ranks, topology.ranks_per_node, topology.num_channels
    ranks_of = [_destinations(inputs, topology) for inputs in all_inputs]
    nodes_of = [[sorted({topology.node(r) for r in ranks}) for ranks in per_rank] for per_rank in ranks_of]
    my_node = topology.node(me)
    local_ranks = [my_node * per_node + local for local in range(per_node)]
    all_nodes = list(range(topology.num_nodes))

    recv_counts = [sum(me in ranks for ranks in ranks_of[src]) for src in range(num_ranks)]
    prefix, running = [], 0
    for count in recv_counts:
        running += count
        prefix.append(running)
    recv_gbl_channel = []
    for src in range(num_ranks):
        first = prefix[src] - recv_counts[src]
        own = _channel_prefix(ranks_of[src], [me], num_channels)[0]
        recv_gbl_channel.append([first + (own[c - 1] if c else 0) for c in range(num_channels)])
    meta = [
        (topology.node(src), sum(1 << local for local, rank in enumerate(local_ranks) if rank in ranks))
        for src in range(num_ranks)
        for ranks in ranks_of[src]
        if me in ranks
    ]
    peers = [topology.peer(me, node) for node in all_nodes]
    rdma_prefix, running = [], 0
    recv_rdma_channel, nvl_head = [], []
    for peer in peers:
        running += sum(my_node in nodes for nodes in nodes_of[peer])
        rdma_prefix.append(running)
        recv_rdma_channel.append(_channel_prefix(nodes_of[peer], [my_node], num_channels)[0])
        ordinals = _ordinals(ranks_of[peer], local_ranks, num_channels)
        nvl_head += [ordinals[t] for t, nodes in enumerate(nodes_of[peer]) if my_node in nodes]
    return ExpectedInternode(
        rdma_channel_prefix_matrix=_channel_prefix(nodes_of[me], all_nodes, num_channels),
        gbl_channel_prefix_matrix=_channel_prefix(ranks_of[me], range(num_ranks), num_channels),
        recv_rdma_channel_prefix_matrix=recv_rdma_channel,
        recv_rdma_rank_prefix_sum=rdma_prefix,
        recv_gbl_channel_prefix_matrix=recv_gbl_channel,
        recv_gbl_rank_prefix_sum=prefix,
        recv_src_meta=meta,
        send_rdma_head=_ordinals(nodes_of[me], all_nodes, num_channels),
        send_nvl_head=nvl_head,
    )


def naive_combine_by_node(
    inputs: RankInputs, topology: Topology, biases: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's internode combine of ``inputs``' tokens when each rank ``dst`` returns
    ``x * power_of_two_scale(dst)`` and the received weights: per node (ascending) a float32 sum over
    its ranks (ascending) rounded to bf16, then ``bias_0 + bias_1`` plus those partials in float32,
    rounded to bf16. Weights: the same sums in float32.

    Returns ``combined_x [T, hidden]`` bf16 and ``combined_topk_weights [T, K]`` float32.
    """
    local_experts = topology.num_experts // topology.num_ranks
    num_tokens, hidden = inputs.x.shape
    num_topk = inputs.topk_idx.size(1)
    zero = torch.zeros(hidden, dtype=torch.float32)
    combined, combined_weights = [], []
    for token, experts in enumerate(inputs.topk_idx.tolist()):
        ranks = ranks_of_token(experts, local_experts)
        first = biases[0][token].float() if biases else zero
        second = biases[1][token].float() if len(biases) > 1 else zero
        value = first + second
        weights = torch.zeros(num_topk, dtype=torch.float32)
        for node in sorted({topology.node(rank) for rank in ranks}):
            partial = torch.zeros(hidden, dtype=torch.float32)
            partial_weights = torch.zeros(num_topk, dtype=torch.float32)
            for rank in (r for r in ranks if topology.node(r) == node):
                partial = partial + (inputs.x[token] * power_of_two_scale(rank)).float()
                local = torch.tensor(
                    [e >= 0 and e // local_experts == rank for e in experts], dtype=torch.bool
                )
                partial_weights = partial_weights + torch.where(local, inputs.topk_weights[token], 0.0)
            value = value + partial.to(torch.bfloat16).float()
            weights = weights + partial_weights
        combined.append(value.to(torch.bfloat16))
        combined_weights.append(weights)
    if not combined:
        return torch.empty(0, hidden, dtype=torch.bfloat16), torch.empty(0, num_topk)
    return torch.stack(combined), torch.stack(combined_weights).view(num_tokens, num_topk)


@dataclass(frozen=True)
class ExpectedRows:
    """Rows rank ``me`` sends in a call: ``(inter, intra)`` hierarchical and flat."""

    inter: int
    intra: int
    flat_inter: int
    flat_intra: int


def naive_call_rows(
    all_inputs: Sequence[RankInputs], me: int, topology: Topology, operation: str
) -> ExpectedRows:
    """Rows rank ``me`` sends under DeepEP's hierarchical scheme and a flat all-to-all.

    Dispatch: across nodes each token once per other node it needs; within the node each token the
    rank receives from its RDMA peers (itself on its own node) once per other local rank needing it.
    Combine: each received row to the rank of this node with its source's local rank (unless this
    one); across nodes one partial per forwarded token whose source is on another node.
    """
    ranks_of = [_destinations(inputs, topology) for inputs in all_inputs]
    my_node, per_node = topology.node(me), topology.ranks_per_node
    local_ranks = range(my_node * per_node, (my_node + 1) * per_node)
    forwarded = [
        (node, ranks)
        for node in range(topology.num_nodes)
        for ranks in ranks_of[topology.peer(me, node)]
        if any(topology.node(r) == my_node for r in ranks)
    ]
    if operation == "combine":
        received = [
            (src, ranks) for src in range(topology.num_ranks) for ranks in ranks_of[src] if me in ranks
        ]
        return ExpectedRows(
            inter=sum(node != my_node for node, _ in forwarded),
            intra=sum(src % per_node != me % per_node for src, _ in received),
            flat_inter=sum(topology.node(src) != my_node for src, _ in received),
            flat_intra=sum(topology.node(src) == my_node and src != me for src, _ in received),
        )
    mine = ranks_of[me]
    return ExpectedRows(
        inter=sum(len({topology.node(r) for r in ranks} - {my_node}) for ranks in mine),
        intra=sum(sum(r in ranks and r != me for r in local_ranks) for _, ranks in forwarded),
        flat_inter=sum(sum(topology.node(r) != my_node for r in ranks) for ranks in mine),
        flat_intra=sum(sum(r in local_ranks and r != me for r in ranks) for ranks in mine),
    )
