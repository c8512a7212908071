"""Transports behind ``Buffer``; ``create_backend`` picks one."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from epcomm._logging import log_once
from epcomm.backends.base import Backend
from epcomm.env import BackendChoice, Settings
from epcomm.topology import is_multi_node

__all__ = ["Backend", "create_backend"]


def create_backend(
    choice: BackendChoice,
    group: Any,
    settings: Settings,
    num_ranks_per_node: int,
    enable_shrink: bool,
    num_nvl_bytes: int = 0,
    low_latency_mode: bool = False,
    num_rdma_bytes: int = 0,
    allow_nvlink_for_low_latency_mode: bool = True,
) -> Backend:
    """Build the backend ``choice`` names (``AUTO`` picks from the devices, never from the group).

    Arguments:
        choice: the requested transport.
        group: the process group.
        settings: the ``Buffer``'s options (timeout of every wait for a peer, shrink-mode timeout,
            kernel knobs).
        num_ranks_per_node: ranks per node.
        enable_shrink: keep a rank mask (shrink mode).
        num_nvl_bytes: initial size of the NVLink symmetric buffer.
        low_latency_mode: whether the low-latency buffer is needed.
        num_rdma_bytes: size of the low-latency (and internode) buffer; with a group of several
            nodes, ``> 0`` selects multi-node mode (``epcomm.topology``).
        allow_nvlink_for_low_latency_mode: ``NVSHMEM`` in multi-node mode: stores to the ranks of
            this node in the low-latency calls (``False``: puts to every other rank).

    Returns:
        The backend.

    ``NVSHMEM`` within one node runs the NVLink-mode kernels over NVSHMEM symmetric memory (ranks
    sharing a GPU included); in multi-node mode it runs the hierarchical normal mode
    (``backends.hierarchical``) over NVSHMEM legs and the low-latency kernels' put path
    (``backends.nvshmem.backend``).
    ``AUTO`` picks the reference backend in multi-node mode (logged once); ``NVLINK`` raises there.
    """
    from epcomm.backends.nvlink.symmetric_buffer import Allocator
    from epcomm.backends.reference import ReferenceBackend

    multi_node = is_multi_node(dist.get_world_size(group), num_ranks_per_node, num_rdma_bytes)

    def nvlink_kernels(allocator: Allocator) -> Backend:
        from epcomm.backends.nvlink.backend import NvlinkBackend

        return NvlinkBackend(
            group,
            settings,
            num_ranks_per_node,
            enable_shrink,
            num_nvl_bytes,
            low_latency_mode,
            num_rdma_bytes,
            allocator=allocator,
        )

    if choice is BackendChoice.NVSHMEM:
        if not torch.cuda.is_available():
            raise ValueError("backend 'nvshmem' needs CUDA devices; none is available")
        if multi_node:
            from epcomm.backends.nvshmem.backend import NvshmemMultiNodeBackend

            device = torch.device("cuda", torch.cuda.current_device())
            log_once(
                "nvshmem-multi-node",
                "epcomm: NVSHMEM backend, multi-node mode: hierarchical normal mode and low-latency kernels "
                "(NVSHMEM puts across nodes, NVLink stores within)",
            )
            return NvshmemMultiNodeBackend(
                group,
                settings,
                num_ranks_per_node,
                enable_shrink,
                num_rdma_bytes,
                low_latency_mode,
                device,
                allow_nvlink_for_low_latency_mode,
            )
        from epcomm.backends.nvlink.backend import nvlink_placement

        placement = nvlink_placement(group)
        if placement is None:
            raise ValueError("backend 'nvshmem' within one node needs every rank on a GPU of this host")
        if placement == "shared":
            log_once(
                "nvshmem-shared",
                "epcomm: NVSHMEM backend with ranks sharing a GPU: NVSHMEM's multi-process-per-GPU mode, "
                "the processes' kernels time-slice (for testing only: not NVLink speed)",
                logging.WARNING,
            )
        else:
            log_once(
                "nvshmem", "epcomm: using the NVSHMEM backend (NVSHMEM symmetric memory, NVLink-mode kernels)"
            )
        return nvlink_kernels(Allocator.NVSHMEM)
    if multi_node and choice is BackendChoice.NVLINK:
        raise ValueError(
            "backend 'nvlink' serves one node; this group spans several nodes and num_rdma_bytes > 0 "
            "asks for multi-node mode (use backend='reference', or num_rdma_bytes=0)"
        )
    if multi_node and choice is BackendChoice.AUTO:
        log_once(
            "auto-reference-multi-node",
            "epcomm: multi-node mode; using the reference backend (backend='nvshmem' runs the "
            "hierarchical mode on NVSHMEM, not yet proven on a GPU)",
            logging.WARNING,
        )
        choice = BackendChoice.REFERENCE

    def reference() -> Backend:
        return ReferenceBackend(
            group,
            settings.timeout_s,
            num_ranks_per_node,
            enable_shrink,
            shrink_timeout_s=settings.shrink_timeout_s,
            multi_node=multi_node,
        )

    if choice is BackendChoice.REFERENCE:
        return reference()
    if torch.cuda.is_available():
        from epcomm.backends.nvlink.backend import nvlink_placement

        placement = nvlink_placement(group)
        if placement == "peers" or (placement == "shared" and choice is BackendChoice.NVLINK):
            if placement == "peers":
                log_once("auto-nvlink", "epcomm: using the NVLink backend (symmetric memory + Triton)")
            else:
                log_once(
                    "nvlink-shared",
                    "epcomm: NVLink backend with ranks sharing a GPU: peer buffers are mapped through "
                    "CUDA IPC and the processes' kernels time-slice (for testing only: not NVLink speed)",
                    logging.WARNING,
                )
            return nvlink_kernels(Allocator.CUDA_IPC if placement == "shared" else Allocator.SYMMETRIC_MEMORY)
        if choice is BackendChoice.NVLINK:
            raise ValueError(
                "backend 'nvlink' needs every rank on a CUDA device with peer access to the others "
                "(one host, GPUs with peer access to each other)"
            )
        if placement == "shared":
            log_once(
                "auto-reference-shared",
                "epcomm: ranks share a GPU; using the reference backend (backend='nvlink' runs the "
                "NVLink kernels there too, through CUDA IPC, for testing)",
                logging.WARNING,
            )
        else:
            log_once(
                "auto-reference-cuda",
                "epcomm: CUDA is present but the ranks do not share an NVLink domain; using the "
                "reference backend (torch.distributed point-to-point messages)",
                logging.WARNING,
            )
    elif choice is BackendChoice.NVLINK:
        raise ValueError("backend 'nvlink' needs CUDA devices; none is available")
    return reference()
