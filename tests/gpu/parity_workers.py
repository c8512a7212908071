"""Workers for the DeepEP drop-in checks: the caller's default device and dtype, and the kernel
names a profiler shows for the low-latency ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ll_workers import compare_low_latency
from nvlink_workers import compare_normal_mode

import epcomm
from epcomm.testing import ProcessGroupInfo, make_routing


def under_caller_defaults(pgi: ProcessGroupInfo) -> list[str]:
    """``torch.set_default_device`` to this rank's GPU and ``torch.set_default_dtype(bfloat16)``
    before any ``Buffer`` exists (as DeepEP's test scripts do); then both modes on the NVLink
    backend against the reference, created and run under those defaults."""
    torch.set_default_device(pgi.device)
    torch.set_default_dtype(torch.bfloat16)
    try:
        failures = compare_normal_mode(
            pgi,
            [
                {"seed": 3, "num_tokens": 256, "hidden": 2048, "num_experts": 32, "num_topk": 4},
                {"seed": 4, "num_tokens": 128, "hidden": 1024, "num_experts": 16, "num_topk": 4, "fp8": True},
            ],
        )
        failures += compare_low_latency(
            pgi,
            [
                {"seed": 5, "capacity": 64, "hidden": 1024, "num_experts": 16, "num_topk": 4},
                {"seed": 6, "capacity": 64, "hidden": 1024, "num_experts": 16, "num_topk": 4, "fp8": True},
                {"seed": 7, "capacity": 32, "hidden": 512, "num_experts": 16, "num_topk": 4, "hook": True},
            ],
        )
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_default_device("cpu")
    return failures


def _kernel_names(profile: Any) -> list[str]:
    return [
        event.name
        for event in profile.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith("Memcpy")
    ]


def profiled_kernel_names(pgi: ProcessGroupInfo, calls: int) -> list[str]:
    """Profile ``calls`` x (``low_latency_dispatch`` + ``low_latency_combine``) as DeepEP users time
    them, for each of: no hook / hook, eager / one CUDA graph replayed per call. In the profiler's
    table (``key_averages().table()``, as DeepEP's ``bench_kineto`` parses it) exactly one row's name
    contains ``dispatch`` and one ``combine``; that kernel ran once per call without the hook and
    twice (send, then the hook's receive) with it."""
    capacity, hidden, num_experts, num_topk = 64, 1024, 8 * pgi.world_size, 4
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, pgi.world_size, num_experts)
    buffer = epcomm.Buffer(pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend="nvlink")
    routing = make_routing(capacity, num_experts, num_topk, seed=11, rank=pgi.rank, device=pgi.device)
    x = torch.randn(capacity, hidden, dtype=torch.float32, device=pgi.device).bfloat16()
    failures: list[str] = []

    def step(hook: bool) -> None:
        recv_x, _, handle, _, receive = buffer.low_latency_dispatch(
            x, routing.topk_idx, capacity, num_experts, use_fp8=False, return_recv_hook=hook
        )
        if hook:
            receive()
        _, _, receive = buffer.low_latency_combine(
            recv_x, routing.topk_idx, routing.topk_weights, handle, return_recv_hook=hook
        )
        if hook:
            receive()

    for hook in (False, True):
        for graphed in (False, True):
            run: Callable[[], None] = lambda hook=hook: step(hook)
            for _ in range(2):  # compile every kernel outside the profile
                run()
            torch.cuda.synchronize()
            if graphed:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step(hook)
                run = graph.replay
            torch.cuda.synchronize()
            torch.distributed.barrier(group=pgi.group)
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as profile:
                for _ in range(calls):
                    run()
                torch.cuda.synchronize()
            case = f"rank {pgi.rank} hook={hook} graph={graphed}"
            lines = (
                profile.key_averages().table(sort_by="cuda_time_total", max_name_column_width=100).split("\n")
            )
            names = _kernel_names(profile)
            for word in ("dispatch", "combine"):
                rows = [line for line in lines if word in line]
                if len(rows) != 1:
                    failures.append(f"{case}: {len(rows)} profiler rows name {word!r}: {rows}")
                launched = [name for name in names if word in name]
                want = calls * (2 if hook else 1)
                if len(launched) != want or len(set(launched)) != 1:
                    failures.append(
                        f"{case}: {len(launched)} {word} kernels ({sorted(set(launched))}), want {want}"
                    )
            torch.cuda.synchronize()
    buffer.destroy()
    return failures
