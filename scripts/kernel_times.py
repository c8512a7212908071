"""Per-kernel device time of every op at EP1 (one GPU, one rank): which kernel a change made slower.

Runs dispatch, cached dispatch and combine (4096 tokens, hidden 7168, top-8 of 256 experts, 24 SMs;
eager, each call followed by a sync) and low-latency dispatch (FP8) and combine at 128 tokens
(CUDA-graph replays) under ``torch.profiler``, and prints each kernel's mean device time and each
graph's replay time (CUDA events). Uses the public API only, so ``PYTHONPATH=<other tree>/src``
runs another version of the code (e.g. one unpacked with ``git archive``).

Usage (repo root, GPU machine): ``python3 scripts/kernel_times.py [--port 29601]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not any(Path(entry).name == "src" for entry in sys.path if entry):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import epcomm

NUM_TOKENS, HIDDEN, NUM_TOPK, NUM_EXPERTS, NUM_SMS, LL_TOKENS = 4096, 7168, 8, 256, 24, 128


def _kernel_table(fn: Callable[[], Any], iters: int) -> None:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
            torch.cuda.synchronize()
    for event in prof.key_averages():
        if event.device_time_total > 0:
            print(
                f"   {event.key[:60]:60} n={event.count:3} avg={event.device_time_total / event.count:8.1f} us"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", default="29601", help="rendezvous port of the one-rank group")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", args.port)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=generator).abs() + 1
    topk_idx = torch.topk(scores, NUM_TOPK, dim=1).indices.cuda()
    topk_weights = (torch.rand(NUM_TOKENS, NUM_TOPK, generator=generator) + 0.5).cuda()
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=generator).bfloat16().cuda()

    buffer = epcomm.Buffer(dist.group.WORLD, num_nvl_bytes=3 << 30, backend="nvlink")
    config = epcomm.Config(NUM_SMS)
    layout = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)

    def dispatch() -> Any:
        return buffer.dispatch(
            x,
            num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            config=config,
        )

    recv_x, _, recv_weights, _, handle, _ = dispatch()
    ops: dict[str, Callable[[], Any]] = {
        "dispatch": dispatch,
        "cached dispatch": lambda: buffer.dispatch(x, handle=handle, config=config),
        "combine": lambda: buffer.combine(recv_x, handle, topk_weights=recv_weights, config=config),
    }
    for name, op in ops.items():
        for _ in range(5):
            op()
        torch.cuda.synchronize()
        print("==", name)
        _kernel_table(op, args.iters)
    buffer.destroy()

    size = epcomm.Buffer.get_low_latency_rdma_size_hint(LL_TOKENS, HIDDEN, 1, NUM_EXPERTS)
    ll_buffer = epcomm.Buffer(dist.group.WORLD, num_rdma_bytes=size, low_latency_mode=True, backend="nvlink")
    ll_x, ll_idx = x[:LL_TOKENS].contiguous(), topk_idx[:LL_TOKENS].contiguous()
    ll_weights = topk_weights[:LL_TOKENS].contiguous()
    (recv_fp8, _), _, ll_handle, _, _ = ll_buffer.low_latency_dispatch(
        ll_x, ll_idx, LL_TOKENS, NUM_EXPERTS, use_fp8=True
    )
    expert_out = torch.randn(recv_fp8.shape, device="cuda").bfloat16()
    steps: dict[str, Callable[[], Any]] = {
        "low_latency_dispatch": lambda: ll_buffer.low_latency_dispatch(
            ll_x, ll_idx, LL_TOKENS, NUM_EXPERTS, use_fp8=True
        ),
        "low_latency_combine": lambda: ll_buffer.low_latency_combine(
            expert_out, ll_idx, ll_weights, ll_handle
        ),
    }
    for name, step in steps.items():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        print("==", name, "(graph)")
        _kernel_table(graph.replay, 2 * args.iters)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(30):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        print(f"   replay event us: median {statistics.median(times):.1f} min {min(times):.1f}")
    ll_buffer.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
