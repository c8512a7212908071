"""Bytes one rank sends in a normal-mode call: DeepEP's hierarchical scheme against a flat all-to-all.

``Buffer.last_call_bytes()`` (reference backend) reports them for the last normal-mode call. They
are counted when asked, from the call's handle, so the calls themselves pay nothing for them.

The schemes, for one rank ``me`` on node ``m`` with local rank ``l`` (``epcomm.topology``):

* **Flat all-to-all**: every row goes straight from its source rank to its destination rank.
  Dispatch sends each token once per rank that needs it; combine returns each received row to its
  source rank.
* **Hierarchical** (DeepEP V1's internode mode): a token crosses to another node once, to the rank
  there with the same local rank (the "RDMA peer"), which forwards it within its node.

  - Dispatch, across nodes: each token once per *other node* it needs. Within the node: each token
    this rank receives over RDMA (from every node, its own tokens included: on its own node it is
    its own peer) once per *other* local rank of node ``m`` that needs it (the forwarding).
  - Combine, within the node: each row received in the dispatch goes to the rank of node ``m``
    with its source's local rank (which reduces the rows of the node), unless that is this rank.
    Across nodes: one partial sum per token this rank forwarded in the dispatch whose source node is
    not ``m``.

A row's bytes (``row_bytes``) are those of the call's row tensors as the caller passes them:
dispatch ``x`` (+ ``x_scales``, ``topk_idx``, ``topk_weights``), cached dispatch ``x`` (+ scales),
combine ``x`` (+ ``topk_weights``); no metadata, no alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epcomm.handles import DispatchHandle, InternodeHandle, NormalHandle
from epcomm.topology import NodeTopology

__all__ = [
    "CallBytes",
    "RankRoutes",
    "RowCounts",
    "count_call_bytes",
    "count_rows",
    "routes_from_handle",
    "routes_from_matrices",
    "row_bytes",
    "token_counts",
]


@dataclass(frozen=True)
class CallBytes:
    """Bytes one rank sends in one normal-mode call (see the module docstring for the schemes).

    Attributes:
        operation: ``"dispatch"``, ``"cached dispatch"`` or ``"combine"``.
        row_bytes: bytes of one row.
        inter_node: hierarchical scheme, to other nodes.
        intra_node: hierarchical scheme, to other ranks of this node.
        flat_inter_node: flat all-to-all, to other nodes.
        flat_intra_node: flat all-to-all, to other ranks of this node.
    """

    operation: str
    row_bytes: int
    inter_node: int
    intra_node: int
    flat_inter_node: int
    flat_intra_node: int

    @property
    def total(self) -> int:
        """``inter_node + intra_node``."""
        return self.inter_node + self.intra_node

    @property
    def flat_total(self) -> int:
        """``flat_inter_node + flat_intra_node``."""
        return self.flat_inter_node + self.flat_intra_node


def row_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of one row of the ``[num_rows, ...]`` tensors given (``None`` ones count 0)."""
    return sum(_row_numel(t) * t.element_size() for t in tensors if t is not None)


def _row_numel(tensor: torch.Tensor) -> int:
    numel = 1
    for dim in tensor.shape[1:]:
        numel *= dim
    return numel


@dataclass(frozen=True)
class RankRoutes:
    """The token counts one rank's byte counts depend on (rank ``me`` on node ``m``, local rank ``l``).

    All ``int64`` CPU tensors. Built from a call's handle (``routes_from_handle``, what
    ``Buffer.last_call_bytes()`` counts from) or from every rank's routing (``routes_from_matrices``,
    what a model without processes counts from); ``count_rows`` turns either into rows.

    Attributes:
        to_rank: ``[num_ranks]``: tokens of ``me`` that need each rank.
        to_node: ``[num_nodes]``: tokens of ``me`` that need each node (each token once per node).
        from_rank: ``[num_ranks]``: rows ``me`` receives from each rank in the dispatch.
        peer_to_local: ``[num_nodes, num_ranks_per_node]``: for each node ``n``, tokens of the rank
            ``(n, l)`` (``me``'s RDMA peer there; ``me`` itself on ``m``) that need each rank of node
            ``m``.
        peer_to_node: ``[num_nodes]``: for each node ``n``, tokens of the rank ``(n, l)`` that need
            node ``m`` (the tokens ``me`` receives over RDMA from node ``n`` and forwards).
    """

    to_rank: torch.Tensor
    to_node: torch.Tensor
    from_rank: torch.Tensor
    peer_to_local: torch.Tensor
    peer_to_node: torch.Tensor


@dataclass(frozen=True)
class RowCounts:
    """Rows one rank sends in one call under each scheme (bytes = rows x ``row_bytes``).

    Attributes:
        inter_node: hierarchical scheme, to other nodes.
        intra_node: hierarchical scheme, to other ranks of this node.
        flat_inter_node: flat all-to-all, to other nodes.
        flat_intra_node: flat all-to-all, to other ranks of this node.
    """

    inter_node: int
    intra_node: int
    flat_inter_node: int
    flat_intra_node: int


def token_counts(is_token_in_rank: torch.Tensor, topology: NodeTopology) -> tuple[torch.Tensor, torch.Tensor]:
    """One source rank's tokens per destination rank and per destination node.

    Arguments:
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool: which ranks need each token of the source.
        topology: the group's nodes.

    Returns:
        ``[num_ranks]`` and ``[num_nodes]`` int64 CPU tensors (a token counts once per node).
    """
    in_rank = is_token_in_rank.to("cpu", torch.bool)
    num_tokens = in_rank.size(0)
    in_node = in_rank.view(num_tokens, topology.num_nodes, topology.num_ranks_per_node).any(dim=2)
    return in_rank.sum(dim=0, dtype=torch.int64), in_node.sum(dim=0, dtype=torch.int64)


def routes_from_matrices(
    tokens_to_rank: torch.Tensor, tokens_to_node: torch.Tensor, topology: NodeTopology, rank: int
) -> RankRoutes:
    """``rank``'s ``RankRoutes`` from every rank's routing.

    Arguments:
        tokens_to_rank: ``[num_ranks, num_ranks]`` int64: entry ``[s, d]`` = tokens of rank ``s``
            that need rank ``d`` (row ``s`` is ``token_counts(...)[0]`` of rank ``s``).
        tokens_to_node: ``[num_ranks, num_nodes]`` int64: entry ``[s, n]`` = tokens of rank ``s``
            that need node ``n``.
        topology: the group's nodes.
        rank: the rank counted.
    """
    per_node = topology.num_ranks_per_node
    node, local = topology.node_of(rank), topology.local_rank_of(rank)
    peers = torch.arange(topology.num_nodes, device="cpu") * per_node + local
    return RankRoutes(
        to_rank=tokens_to_rank[rank].to(torch.int64),
        to_node=tokens_to_node[rank].to(torch.int64),
        from_rank=tokens_to_rank[:, rank].to(torch.int64),
        peer_to_local=tokens_to_rank[peers, node * per_node : (node + 1) * per_node].to(torch.int64),
        peer_to_node=tokens_to_node[peers, node].to(torch.int64),
    )


def routes_from_handle(handle: NormalHandle, topology: NodeTopology, rank: int) -> RankRoutes:
    """``rank``'s ``RankRoutes`` from its own dispatch handle (no other rank's routing needed).

    ``handle`` is an ``InternodeHandle`` (its ``send_nvl_head`` and ``recv_rdma_rank_prefix_sum``
    describe the tokens received over RDMA), or a ``DispatchHandle`` of a group of one node.
    """
    to_rank, to_node = token_counts(handle.is_token_in_rank, topology)
    per_node = topology.num_ranks_per_node
    if isinstance(handle, InternodeHandle):
        prefix = handle.recv_gbl_rank_prefix_sum.to("cpu", torch.int64)
        needs = (handle.send_nvl_head >= 0).to("cpu", torch.int64)
        peer_to_node = torch.diff(
            handle.recv_rdma_rank_prefix_sum.to("cpu", torch.int64),
            prepend=torch.zeros(1, dtype=torch.int64, device="cpu"),
        )
        source_node = torch.repeat_interleave(torch.arange(topology.num_nodes, device="cpu"), peer_to_node)
        peer_to_local = torch.zeros(topology.num_nodes, per_node, dtype=torch.int64, device="cpu")
        peer_to_local.index_add_(0, source_node, needs)
    else:
        # One node: this rank is its own (only) peer.
        prefix = handle.rank_prefix_matrix[:, rank].to("cpu", torch.int64)
        peer_to_local = to_rank.view(topology.num_nodes, per_node)[[topology.node_of(rank)]].clone()
        peer_to_node = to_node.clone()
    from_rank = torch.diff(prefix, prepend=prefix.new_zeros(1))
    return RankRoutes(to_rank, to_node, from_rank, peer_to_local, peer_to_node)


def count_rows(operation: str, routes: RankRoutes, topology: NodeTopology, rank: int) -> RowCounts:
    """Rows ``rank`` sends in a dispatch (``"dispatch"`` or ``"cached dispatch"``) or a
    ``"combine"`` under each scheme (the module docstring); the one formula behind
    ``count_call_bytes`` and any model.
    """
    node, local, per_node = topology.node_of(rank), topology.local_rank_of(rank), topology.num_ranks_per_node
    ranks = torch.arange(topology.num_ranks, device="cpu")
    same_node = (ranks // per_node) == node
    if operation == "combine":
        recv = routes.from_rank
        return RowCounts(
            inter_node=int(routes.peer_to_node.sum()) - int(routes.peer_to_node[node]),
            intra_node=int(recv[(ranks % per_node) != local].sum()),
            flat_inter_node=int(recv[~same_node].sum()),
            flat_intra_node=int(recv[same_node].sum()) - int(recv[rank]),
        )
    sent = routes.to_rank
    return RowCounts(
        inter_node=int(routes.to_node.sum()) - int(routes.to_node[node]),
        intra_node=int(routes.peer_to_local.sum()) - int(routes.peer_to_local[:, local].sum()),
        flat_inter_node=int(sent[~same_node].sum()),
        flat_intra_node=int(sent[same_node].sum()) - int(sent[rank]),
    )


def count_call_bytes(
    operation: str, row_bytes: int, handle: NormalHandle, topology: NodeTopology, rank: int
) -> CallBytes:
    """The ``CallBytes`` of a call on ``handle`` (the dispatch's, or the one a call used).

    ``handle`` is an ``InternodeHandle``, or a ``DispatchHandle`` of a group of one node (its nodes
    need the peers' routing, which only the internode handle carries).
    """
    if isinstance(handle, DispatchHandle) and topology.num_nodes > 1:
        raise ValueError("hierarchical byte counts need the multi-node handle (num_rdma_bytes > 0)")
    rows = count_rows(operation, routes_from_handle(handle, topology, rank), topology, rank)
    return CallBytes(
        operation,
        row_bytes,
        rows.inter_node * row_bytes,
        rows.intra_node * row_bytes,
        rows.flat_inter_node * row_bytes,
        rows.flat_intra_node * row_bytes,
    )
