"""The NVLink backend: one NVLink domain (any number of GPUs with peer access on one host).

It owns the symmetric buffers (one per mode) and hands each call to its mode: ``NvlinkNormal``
(``normal.py``) and ``NvlinkLowLatency`` (``low_latency.py``).
"""

from __future__ import annotations

import socket
from typing import Any

import torch

from epcomm._collectives import all_gather_ints, host_id
from epcomm.backends.base import (
    CombineRequest,
    CombineResult,
    DispatchRequest,
    DispatchResult,
    LowLatencyDelegation,
)
from epcomm.backends.nvlink.low_latency import NvlinkLowLatency
from epcomm.backends.nvlink.normal import NvlinkNormal
from epcomm.backends.nvlink.symmetric_buffer import Allocator, SymmetricBuffer
from epcomm.env import Settings
from epcomm.layout import DispatchLayout

__all__ = ["NvlinkBackend", "nvlink_placement"]


def nvlink_placement(group: Any) -> str | None:
    """How the ranks of ``group`` can reach each other's GPU memory (collective).

    Returns:
        ``"peers"``: one host, every rank on its own GPU with peer access to all others (the
        NVLink node). ``"shared"``: one host, but some ranks share a GPU; the backend then maps
        peer buffers through CUDA IPC and the kernels of different processes time-slice, which is
        for testing only and used only when asked for by name. ``None``: no NVLink path.
    """
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    local_ok = all(
        torch.cuda.can_device_access_peer(device, other)
        for other in range(torch.cuda.device_count())
        if other != device
    )
    rows = all_gather_ints([host_id(socket.gethostname()), device, int(local_ok)], group)
    if len({host for host, _, _ in rows}) != 1 or not all(ok for _, _, ok in rows):
        return None
    return "peers" if len({gpu for _, gpu, _ in rows}) == len(rows) else "shared"


class NvlinkBackend(LowLatencyDelegation):
    """Normal and low-latency modes over NVLink symmetric memory.

    Arguments:
        group: the process group.
        settings: the ``Buffer``'s options (timeout, kernel knobs).
        num_ranks_per_node: ranks per node.
        enable_shrink: keep a rank mask (shrink mode).
        num_nvl_bytes: initial size of the normal-mode symmetric buffer (grown when a call needs more).
        low_latency_mode: allocate the low-latency buffer (``num_rdma_bytes`` bytes).
        num_rdma_bytes: size of the low-latency symmetric buffer.
        allocator: how the symmetric buffers are allocated and mapped: symmetric memory (one GPU per
            rank), CUDA IPC (``nvlink_placement`` said ``"shared"``) or NVSHMEM (backend ``nvshmem``).
    """

    name = "nvlink"

    def __init__(
        self,
        group: Any,
        settings: Settings,
        num_ranks_per_node: int,
        enable_shrink: bool,
        num_nvl_bytes: int,
        low_latency_mode: bool = False,
        num_rdma_bytes: int = 0,
        allocator: Allocator = Allocator.SYMMETRIC_MEMORY,
    ) -> None:
        self.name = "nvshmem" if allocator is Allocator.NVSHMEM else "nvlink"
        self.device = torch.device("cuda", torch.cuda.current_device())
        buffer = SymmetricBuffer(
            group,
            self.device,
            settings.timeout_s,
            num_nvl_bytes,
            count_table=True,
            allocator=allocator,
        )
        self.normal = NvlinkNormal(buffer, settings, num_ranks_per_node)
        self.rank = buffer.rank
        self.num_ranks = buffer.num_ranks
        self.num_ranks_per_node = num_ranks_per_node
        # Low-latency mode gets its own symmetric buffer (``num_rdma_bytes``), as DeepEP's.
        self.low_latency: NvlinkLowLatency | None = None
        if low_latency_mode:
            low_latency_buffer = SymmetricBuffer(
                group,
                self.device,
                settings.timeout_s,
                num_rdma_bytes,
                count_table=False,
                allocator=allocator,
            )
            self.low_latency = NvlinkLowLatency(low_latency_buffer, enable_shrink, settings.shrink_timeout_s)

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """See ``Buffer.get_dispatch_layout`` (``NvlinkNormal.get_dispatch_layout``)."""
        return self.normal.get_dispatch_layout(topk_idx, num_experts)

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Normal-mode dispatch (``NvlinkNormal.dispatch``), after any error an earlier call left."""
        self.normal.buffer.check_error()
        self.normal.check_worst()
        return self.normal.dispatch(request)

    def combine(self, request: CombineRequest) -> CombineResult:
        """Normal-mode combine (``NvlinkNormal.combine``), after any error an earlier call left."""
        self.normal.buffer.check_error()
        self.normal.check_worst()
        return self.normal.combine(request)

    # ---- low-latency mode: LowLatencyDelegation forwards to NvlinkLowLatency -------------------
    def _low_latency_engine(self) -> NvlinkLowLatency | None:
        return self.low_latency

    def destroy(self) -> None:
        """Release the symmetric buffers."""
        self.normal.buffer.destroy()
        if self.low_latency is not None:
            self.low_latency.destroy()
