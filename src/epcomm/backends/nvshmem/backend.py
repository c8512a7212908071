"""``backend="nvshmem"`` in multi-node mode: the hierarchical normal mode over NVSHMEM legs
(``backends.hierarchical``, ``backends.nvshmem.legs``) and the low-latency kernels with their put
path (``backends.nvlink.low_latency``): peers of this node through stores, peers of other nodes
through NVSHMEM puts, one NVSHMEM symmetric buffer of ``num_rdma_bytes`` over the whole job.

The low-latency buffer's barriers (its init, growth and ``clean_low_latency_buffer``) run on the
device too, with NVSHMEM signals to the ranks of other nodes, bounded; in shrink mode a rank that
misses one is masked, as in one NVLink domain.
"""

from __future__ import annotations

from typing import Any

import torch

from epcomm.backends.base import LowLatencyEngine
from epcomm.backends.hierarchical import HierarchicalBackend
from epcomm.backends.nvlink.low_latency import NvlinkLowLatency
from epcomm.backends.nvlink.symmetric_buffer import Allocator, SymmetricBuffer
from epcomm.backends.nvshmem.legs import NvshmemLegs
from epcomm.env import Settings

__all__ = ["NvshmemMultiNodeBackend"]


class NvshmemMultiNodeBackend(HierarchicalBackend):
    """Multi-node mode on NVSHMEM (the module docstring).

    Arguments:
        group: the process group (every process of the job, spanning several nodes).
        settings: the ``Buffer``'s options.
        num_ranks_per_node: ranks per node.
        enable_shrink: shrink mode (the low-latency waits mask a rank that misses them).
        num_rdma_bytes: size of the leg buffer and of the low-latency buffer (grown when a call
            needs more).
        low_latency_mode: whether the low-latency buffer is needed.
        device: this rank's GPU.
        allow_nvlink: the low-latency calls store to the ranks of this node (``False``: puts to
            every other rank, DeepEP's ``allow_nvlink_for_low_latency_mode=False``).
    """

    def __init__(
        self,
        group: Any,
        settings: Settings,
        num_ranks_per_node: int,
        enable_shrink: bool,
        num_rdma_bytes: int,
        low_latency_mode: bool,
        device: torch.device,
        allow_nvlink: bool = True,
    ) -> None:
        super().__init__(
            group,
            settings.timeout_s,
            num_ranks_per_node,
            enable_shrink,
            shrink_timeout_s=settings.shrink_timeout_s,
            legs=lambda peers, topology: NvshmemLegs(
                group, topology, device, num_rdma_bytes, settings.timeout_s
            ),
            name="nvshmem",
        )
        self.put_low_latency: NvlinkLowLatency | None = None
        if low_latency_mode:
            topology, rank = self.topology, self.rank
            node = topology.node_of(rank)
            buffer = SymmetricBuffer(
                group,
                device,
                settings.timeout_s,
                num_rdma_bytes,
                count_table=False,
                allocator=Allocator.NVSHMEM,
                store_ranks=(
                    [r for r in range(topology.num_ranks) if topology.node_of(r) == node]
                    if allow_nvlink
                    else [rank]
                ),
            )
            self.put_low_latency = NvlinkLowLatency(buffer, enable_shrink, settings.shrink_timeout_s)

    def _low_latency_engine(self) -> LowLatencyEngine:
        if self.put_low_latency is not None:
            return self.put_low_latency
        return super()._low_latency_engine()

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Drop the result buffers, then a barrier over the unmasked ranks (``NvlinkLowLatency.clean``)."""
        if self.put_low_latency is None:
            super().clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)
            return
        self.put_low_latency.clean()

    def destroy(self) -> None:
        """Release the result buffers (NVSHMEM allocations stay until the process ends)."""
        super().destroy()
        if self.put_low_latency is not None:
            self.put_low_latency.destroy()
