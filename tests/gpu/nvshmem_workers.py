"""Workers for the NVSHMEM tier: the backend under test is ``nvshmem`` (NVSHMEM symmetric memory,
peers from ``nvshmem_ptr``, the NVLink-mode kernels), checked against the reference backend."""

from __future__ import annotations

from typing import Any

import torch
from ll_workers import compare_low_latency, graph_replay, shrink_masked_rank, two_outstanding
from nvlink_workers import compare_normal_mode

import epcomm
from dist_cpu.workers_hierarchical import SETTINGS as MULTI_NODE_SETTINGS
from dist_cpu.workers_hierarchical import (
    hierarchical_against_reference,
    hierarchical_async_calls,
    hierarchical_inconsistent_call,
)
from epcomm.env import Settings
from epcomm.testing import ProcessGroupInfo, make_routing

# Small shapes: NVSHMEM allocations are never freed in the multi-process-per-GPU mode (a free is a
# collective barrier there), so every Buffer of a test stays in each PE's symmetric heap.
NORMAL_SETTINGS = [
    {"seed": 1, "num_tokens": 256, "hidden": 2048, "num_experts": 32, "num_topk": 4},
    {"seed": 2, "num_tokens": 128, "hidden": 1024, "num_experts": 16, "num_topk": 4, "fp8": True},
    {"seed": 3, "num_tokens": 96, "hidden": 1024, "num_experts": 16, "num_topk": 6, "num_worst_tokens": 512},
]
LOW_LATENCY_SETTINGS = [
    {"seed": 5, "capacity": 64, "hidden": 1024, "num_experts": 16, "num_topk": 4},
    {"seed": 6, "capacity": 64, "hidden": 1024, "num_experts": 16, "num_topk": 4, "fp8": True},
    {"seed": 7, "capacity": 32, "hidden": 512, "num_experts": 16, "num_topk": 4, "hook": True},
]


def nvshmem_against_reference(pgi: ProcessGroupInfo) -> list[str]:
    """Both modes on the ``nvshmem`` backend against the reference; the failed checks."""
    failures = compare_normal_mode(pgi, NORMAL_SETTINGS, transport="nvshmem")
    failures += compare_low_latency(pgi, LOW_LATENCY_SETTINGS, transport="nvshmem")
    return failures


def nvshmem_then_nvlink(pgi: ProcessGroupInfo) -> str:
    """An NVLink ``Buffer`` in a process that already allocates through NVSHMEM: the message of the
    error (PyTorch fixes one symmetric-memory backend per process)."""
    routing = make_routing(8, 4 * pgi.world_size, 2, seed=1, rank=pgi.rank, device=pgi.device)
    with epcomm.Buffer(pgi.group, num_nvl_bytes=1 << 20, backend="nvshmem") as buffer:
        buffer.get_dispatch_layout(routing.topk_idx, 4 * pgi.world_size)
        torch.cuda.synchronize()
    try:
        epcomm.Buffer(pgi.group, num_nvl_bytes=1 << 20, backend="nvlink")
    except Exception as error:  # the message is the result
        return f"{type(error).__name__}: {error}"
    return "no error"


def nvshmem_multi_node_against_reference(pgi: ProcessGroupInfo, ranks_per_node: int) -> list[str]:
    """The multi-node normal mode on NVSHMEM (nodes of ``ranks_per_node`` consecutive ranks) against
    the reference backend, over every setting of the CPU tier in one launch, with 1 MiB of
    ``num_rdma_bytes`` (one round per exchange) and with 16 KiB (slots of about 1 KiB: most blocks
    move in rounds); the failed checks."""
    failures: list[str] = []
    for num_rdma_bytes in (1 << 20, 1 << 14):
        for setting in MULTI_NODE_SETTINGS:
            failures += [
                f"num_rdma_bytes={num_rdma_bytes}: {line}"
                for line in hierarchical_against_reference(
                    pgi, ranks_per_node, setting, "nvshmem", num_rdma_bytes
                )
            ]
    return failures


def nvshmem_multi_node_events_and_mismatch(pgi: ProcessGroupInfo, ranks_per_node: int) -> dict[str, Any]:
    """On NVSHMEM legs: the async calls against the plain ones (differences), then rank 1 passing a
    wider ``x`` than the others (what each rank raised, and whether a consistent call then works)."""
    return {
        "async": hierarchical_async_calls(pgi, ranks_per_node, "nvshmem"),
        "mismatch": hierarchical_inconsistent_call(pgi, ranks_per_node, 1, "nvshmem"),
    }


# Every option of the low-latency GPU tier, small shapes (NVSHMEM allocations are never freed).
MULTI_NODE_LOW_LATENCY_SETTINGS = [
    {"seed": 11, "capacity": 32, "hidden": 1024, "num_experts": 16, "num_topk": 4},
    {"seed": 12, "capacity": 32, "hidden": 1024, "num_experts": 16, "num_topk": 4, "fp8": True},
    {"seed": 13, "capacity": 32, "hidden": 1024, "num_experts": 16, "num_topk": 4, "fp8": True,
     "round": True, "ue8m0": True},
    {"seed": 14, "capacity": 32, "hidden": 512, "num_experts": 16, "num_topk": 4, "hook": True},
    {"seed": 15, "capacity": 32, "num_tokens": 9, "hidden": 512, "num_experts": 16, "num_topk": 4,
     "duplicate": True},
]  # fmt: skip


def nvshmem_multi_node_low_latency(pgi: ProcessGroupInfo, ranks_per_node: int) -> list[str]:
    """Low-latency mode of a multi-node NVSHMEM Buffer (nodes of ``ranks_per_node`` ranks: peers of
    other nodes through the put path) against the reference backend: every option, then BF16 and
    FP8 with ``allow_nvlink_for_low_latency_mode=False`` (every peer through puts), a CUDA graph
    replayed with new data, two outstanding dispatches with the wait statistics, and shrink mode
    with the last rank masked; the failed checks."""
    kwargs: dict[str, Any] = {"settings": Settings(ranks_per_node=ranks_per_node)}
    settings = [
        dict(s, num_experts=s["num_experts"] * pgi.world_size // 4) for s in MULTI_NODE_LOW_LATENCY_SETTINGS
    ]
    failures = compare_low_latency(pgi, settings, transport="nvshmem", buffer_kwargs=kwargs)
    no_nvlink = dict(kwargs, allow_nvlink_for_low_latency_mode=False)
    failures += [
        f"allow_nvlink_for_low_latency_mode=False: {line}"
        for line in compare_low_latency(pgi, settings[:2], transport="nvshmem", buffer_kwargs=no_nvlink)
    ]
    failures += graph_replay(pgi, 32, 1024, 4 * pgi.world_size, 4, "nvshmem", kwargs)
    failures += [f"two outstanding: {line}" for line in two_outstanding(pgi, "nvshmem", kwargs)]
    failures += [f"shrink: {line}" for line in shrink_masked_rank(pgi, "nvshmem", kwargs)]
    return failures
