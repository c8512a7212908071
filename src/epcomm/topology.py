"""Nodes of a process group: how many ranks share a node, and when a ``Buffer`` runs in multi-node
mode.

Nodes are blocks of consecutive ranks of equal size (as in DeepEP V1, where rank ``r`` sits on node
``r // 8``): node ``n`` holds ranks ``n * num_ranks_per_node .. (n + 1) * num_ranks_per_node - 1``,
and a rank's index inside its node is its *local rank* (DeepEP's "NVL rank"; its node is its "RDMA
rank").

Ranks per node, first match wins:

1. ``Settings.ranks_per_node`` (``EPCOMM_RANKS_PER_NODE``): simulates nodes on one host; it must
   divide the group size.
2. ``Settings.local_world_size`` (``LOCAL_WORLD_SIZE``, set by torchrun) when it divides the group
   size.
3. The number of ranks on this rank's host, from the ranks' host names (a collective: launchers set
   the variables above on all ranks or on none). Hosts must hold equal blocks of consecutive ranks
   to count as nodes; otherwise the group is treated as one node (logged), and multi-node mode is
   refused.

A ``Buffer`` is in *multi-node mode* when its group spans more than one node and it has
``num_rdma_bytes > 0`` (DeepEP V1's ``internode_dispatch`` / ``internode_combine``). Low-latency
mode is independent of it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from epcomm._collectives import all_gather_ints, host_id
from epcomm._logging import log_once

__all__ = ["MAX_RANKS_PER_NODE_MULTI_NODE", "NodeTopology", "detect_topology", "is_multi_node"]

# recv_src_meta (DeepEP's SourceMeta) keeps the local ranks a token visits on its destination node
# as the bits of one int32.
MAX_RANKS_PER_NODE_MULTI_NODE = 32


@dataclass(frozen=True)
class NodeTopology:
    """Equal nodes of consecutive ranks.

    Attributes:
        num_ranks: ranks of the group.
        num_ranks_per_node: ranks per node; divides ``num_ranks``.
    """

    num_ranks: int
    num_ranks_per_node: int

    def __post_init__(self) -> None:
        if self.num_ranks_per_node <= 0 or self.num_ranks % self.num_ranks_per_node != 0:
            raise ValueError(
                f"ranks per node must divide the group size {self.num_ranks}; got {self.num_ranks_per_node}"
            )

    @property
    def num_nodes(self) -> int:
        """Nodes of the group."""
        return self.num_ranks // self.num_ranks_per_node

    def node_of(self, rank: int) -> int:
        """The node of ``rank`` (DeepEP's RDMA rank)."""
        return rank // self.num_ranks_per_node

    def local_rank_of(self, rank: int) -> int:
        """The index of ``rank`` inside its node (DeepEP's NVL rank)."""
        return rank % self.num_ranks_per_node


def is_multi_node(num_ranks: int, num_ranks_per_node: int, num_rdma_bytes: int) -> bool:
    """Whether a ``Buffer`` of these sizes runs normal mode with node semantics (see the module)."""
    return num_ranks_per_node < num_ranks and num_rdma_bytes > 0


def _ranks_per_host(group: Any) -> int | None:
    """Ranks per host from the ranks' host names, or ``None`` when hosts do not hold equal blocks
    of consecutive ranks."""
    hosts = [row[0] for row in all_gather_ints([host_id(socket.gethostname())], group)]
    num_ranks = len(hosts)
    size = hosts.count(hosts[0])
    blocks = [hosts[start : start + size] for start in range(0, num_ranks, size)]
    regular = num_ranks % size == 0 and all(len(set(block)) == 1 for block in blocks)
    regular = regular and len({block[0] for block in blocks}) == len(blocks)
    return size if regular else None


def detect_topology(
    group: Any, ranks_per_node: int | None, local_world_size: int | None, num_rdma_bytes: int = 0
) -> NodeTopology:
    """The nodes of ``group`` (see the module docstring for the order of the sources).

    Arguments:
        group: the process group.
        ranks_per_node: ``Settings.ranks_per_node`` (``EPCOMM_RANKS_PER_NODE``) or ``None``.
        local_world_size: ``Settings.local_world_size`` (``LOCAL_WORLD_SIZE``) or ``None``.
        num_rdma_bytes: the ``Buffer``'s RDMA bytes (``> 0`` asks for multi-node mode).

    Returns:
        The ``NodeTopology``.

    Raises:
        ValueError: ``ranks_per_node`` does not divide the group size; host names give unequal or
            interleaved hosts while ``num_rdma_bytes > 0``; or multi-node mode with more than
            ``MAX_RANKS_PER_NODE_MULTI_NODE`` ranks per node.
    """
    num_ranks = dist.get_world_size(group)
    if ranks_per_node is not None:
        if num_ranks % ranks_per_node != 0:
            raise ValueError(
                f"EPCOMM_RANKS_PER_NODE (Settings.ranks_per_node) must divide the group size "
                f"{num_ranks}; got {ranks_per_node}"
            )
        per_node = ranks_per_node
    elif local_world_size is not None and num_ranks % local_world_size == 0:
        per_node = min(local_world_size, num_ranks)
    else:
        per_host = _ranks_per_host(group)
        if per_host is None:
            if num_rdma_bytes > 0:
                raise ValueError(
                    "the group's hosts do not hold equal blocks of consecutive ranks, so they are no "
                    "nodes for multi-node mode; set EPCOMM_RANKS_PER_NODE or LOCAL_WORLD_SIZE"
                )
            log_once(
                "irregular-hosts",
                "epcomm: the group's hosts hold unequal or interleaved ranks; treating the group as one node",
                logging.WARNING,
            )
            per_host = num_ranks
        per_node = per_host
    topology = NodeTopology(num_ranks, per_node)
    if is_multi_node(num_ranks, per_node, num_rdma_bytes) and per_node > MAX_RANKS_PER_NODE_MULTI_NODE:
        raise ValueError(
            f"multi-node mode supports up to {MAX_RANKS_PER_NODE_MULTI_NODE} ranks per node (the "
            f"bits of recv_src_meta); got {per_node}"
        )
    return topology
