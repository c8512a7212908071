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

__all__ = ["CallBytes", "count_call_bytes", "row_bytes"]


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


def _recv_counts(handle: NormalHandle, rank: int) -> torch.Tensor:
    """``[num_ranks]`` int64: rows this rank received from each rank in the handle's dispatch."""
    if isinstance(handle, InternodeHandle):
        prefix = handle.recv_gbl_rank_prefix_sum.to("cpu", torch.int64)
    else:
        prefix = handle.rank_prefix_matrix[:, rank].to("cpu", torch.int64)
    return torch.diff(prefix, prepend=prefix.new_zeros(1))


def _forwarded_rows(
    handle: NormalHandle, topology: NodeTopology, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens this rank receives over RDMA in the hierarchical scheme: ``[num, num_ranks_per_node]``
    bool, which local ranks of its node need each, and ``[num]`` int64, each token's source node."""
    per_node = topology.num_ranks_per_node
    if isinstance(handle, InternodeHandle):
        needs = (handle.send_nvl_head >= 0).cpu()
        counts = torch.diff(
            handle.recv_rdma_rank_prefix_sum.to("cpu", torch.int64),
            prepend=torch.zeros(1, dtype=torch.int64, device="cpu"),
        )
        return needs, torch.repeat_interleave(torch.arange(topology.num_nodes, device="cpu"), counts)
    # One node: this rank forwards its own tokens.
    in_rank = handle.is_token_in_rank.cpu()
    node = topology.node_of(rank)
    block = in_rank[:, node * per_node : (node + 1) * per_node]
    needs = block[block.any(dim=1)]
    return needs, torch.full((needs.size(0),), node, dtype=torch.int64, device="cpu")


def count_call_bytes(
    operation: str, row_bytes: int, handle: NormalHandle, topology: NodeTopology, rank: int
) -> CallBytes:
    """The ``CallBytes`` of a call on ``handle`` (the dispatch's, or the one a call used).

    ``handle`` is an ``InternodeHandle``, or a ``DispatchHandle`` of a group of one node (its nodes
    need the peers' routing, which only the internode handle carries).
    """
    if isinstance(handle, DispatchHandle) and topology.num_nodes > 1:
        raise ValueError("hierarchical byte counts need the multi-node handle (num_rdma_bytes > 0)")
    node, local = topology.node_of(rank), topology.local_rank_of(rank)
    ranks = torch.arange(topology.num_ranks, device="cpu")
    same_node = (ranks // topology.num_ranks_per_node) == node
    needs, source_node = _forwarded_rows(handle, topology, rank)
    others_needing = needs.sum(dim=1) - needs[:, local].to(torch.int64)
    if operation == "combine":
        recv = _recv_counts(handle, rank)
        flat_inter = int(recv[~same_node].sum())
        flat_intra = int(recv[same_node].sum()) - int(recv[rank])
        intra = int(recv[(ranks % topology.num_ranks_per_node) != local].sum())
        inter = int((source_node != node).sum())
    else:
        in_rank = handle.is_token_in_rank.cpu()
        num_tokens = in_rank.size(0)
        in_node = in_rank.view(num_tokens, topology.num_nodes, topology.num_ranks_per_node).any(dim=2)
        flat_inter = int(in_rank[:, ~same_node].sum())
        flat_intra = int(in_rank[:, same_node].sum()) - int(in_rank[:, rank].sum())
        inter = int(in_node.sum()) - int(in_node[:, node].sum())
        intra = int(others_needing.sum())
    return CallBytes(
        operation,
        row_bytes,
        inter * row_bytes,
        intra * row_bytes,
        flat_inter * row_bytes,
        flat_intra * row_bytes,
    )
