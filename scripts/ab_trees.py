"""A/B of two epcomm source trees on one GPU, interleaved: normal and low-latency device time at EP1
and with 2 / 4 ranks sharing the GPU.

Each (round, ranks, tree) runs in a fresh process tree with ``PYTHONPATH=<tree>`` (the trees are
``src`` folders, e.g. an older commit unpacked with ``git archive``), through the public API only,
so any two versions compare; odd rounds run the trees in the other order. Per op it reports rank
0's device time per call (``GPU us``: busy time of the call's GPU activity under ``torch.profiler``,
``benchmarks/device_time.py``) for dispatch BF16 / FP8, cached dispatch and combine (prefill
shape: 4096 tokens a rank, hidden 7168, top-8 of 256 experts, 24 SMs), and the CUDA-event time of
a replayed CUDA graph for low-latency dispatch (FP8) and combine (BF16) at 128 tokens a rank. With
ranks sharing the GPU their kernels time-slice: the numbers compare the two trees under the same
conditions, they are not NVLink speed.

Usage (repo root, GPU machine):
    mkdir -p /tmp/old && git archive OLD src | tar -x -C /tmp/old
    python3 scripts/ab_trees.py --trees /tmp/old/src src --ranks 1,2,4 --rounds 2 --out ab.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NORMAL_OPS = ("dispatch_bf16", "dispatch_fp8", "cached_dispatch_bf16", "combine_bf16")
LOW_LATENCY_OPS = ("ll_dispatch_fp8", "ll_combine_bf16")
NUM_TOKENS, HIDDEN, NUM_TOPK, NUM_EXPERTS, NUM_SMS, LL_TOKENS = 4096, 7168, 8, 256, 24, 128


def _measure(pgi: Any, iters: int) -> dict[str, float]:
    """One tree, one rank count: the median device time (us) per op on this rank."""
    import torch
    import torch.distributed as dist

    import epcomm
    from device_time import profile_op
    from epcomm import quant

    group, device = pgi.group, pgi.device
    # DeepEP's routing, written out here: older trees have no shared generator.
    generator = torch.Generator().manual_seed(pgi.rank)
    scores = torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=generator).abs() + 1
    topk_idx = torch.topk(scores, NUM_TOPK, dim=1).indices.to(device)
    topk_weights = (torch.rand(NUM_TOKENS, NUM_TOPK, generator=generator) + 0.5).to(device)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=generator).bfloat16().to(device)
    x_fp8 = quant.per_token_cast_to_fp8(x)
    buffer = epcomm.Buffer(group, num_nvl_bytes=3 << 30, backend="nvlink")
    config = epcomm.Config(NUM_SMS)
    layout = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)

    def dispatch(payload: Any) -> Any:
        return buffer.dispatch(
            payload,
            num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            config=config,
        )

    recv_x, _, recv_weights, _, handle, _ = dispatch(x)
    calls = {
        "dispatch_bf16": lambda _slot: dispatch(x),
        "dispatch_fp8": lambda _slot: dispatch(x_fp8),
        "cached_dispatch_bf16": lambda _slot: buffer.dispatch(x, handle=handle, config=config),
        "combine_bf16": lambda _slot: buffer.combine(
            recv_x, handle, topk_weights=recv_weights, config=config
        ),
    }

    def barrier() -> None:
        dist.barrier(group=group)

    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    results: dict[str, float] = {}
    for name, call in calls.items():
        for _ in range(3):  # compile, grow, warm
            call(0)
        torch.cuda.synchronize()
        barrier()
        samples, reason = profile_op(call, num_slots=1, iters=iters, barrier=barrier, flush=flush)
        if samples is None:
            raise RuntimeError(f"{name}: no device time ({reason})")
        results[name] = statistics.median(samples)
    buffer.destroy()

    ll_x = x[:LL_TOKENS].contiguous()
    ll_idx, ll_weights = topk_idx[:LL_TOKENS].contiguous(), topk_weights[:LL_TOKENS].contiguous()
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(LL_TOKENS, HIDDEN, pgi.world_size, NUM_EXPERTS)
    ll_buffer = epcomm.Buffer(group, num_rdma_bytes=size, low_latency_mode=True, backend="nvlink")
    (recv_fp8, _), _, ll_handle, _, _ = ll_buffer.low_latency_dispatch(
        ll_x, ll_idx, LL_TOKENS, NUM_EXPERTS, use_fp8=True
    )
    expert_out = torch.randn(recv_fp8.shape, device=device).bfloat16()

    def ll_dispatch() -> None:
        ll_buffer.low_latency_dispatch(ll_x, ll_idx, LL_TOKENS, NUM_EXPERTS, use_fp8=True)

    def ll_combine() -> None:
        ll_buffer.low_latency_combine(expert_out, ll_idx, ll_weights, ll_handle)

    for name, step in (("ll_dispatch_fp8", ll_dispatch), ("ll_combine_bf16", ll_combine)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
        barrier()
        graph.replay()  # first replay loads the graph
        torch.cuda.synchronize()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            barrier()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        results[name] = statistics.median(times)
        torch.cuda.synchronize()
        barrier()
    ll_buffer.destroy()
    return results


def _worker(args: argparse.Namespace) -> None:
    from epcomm.testing import SHARED_GPU, parallel_launch

    backend = "nccl" if args.num_ranks == 1 else SHARED_GPU
    results = parallel_launch(args.num_ranks, _measure, args.iters, backend=backend, timeout_s=540)
    print("RESULT " + json.dumps(results[0]), flush=True)


def _driver(args: argparse.Namespace) -> None:
    ranks = [int(value) for value in args.ranks.split(",")]
    rows: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        for num_ranks in ranks:
            # Odd rounds run the trees in the other order: neither always runs first.
            for tree in args.trees if round_index % 2 == 0 else args.trees[::-1]:
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, str(ROOT / "benchmarks")]))
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--num-ranks",
                    str(num_ranks),
                    "--iters",
                    str(args.iters),
                ]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"tree {tree} at {num_ranks} ranks failed")
                result = json.loads(lines[-1][len("RESULT ") :])
                row = {"round": round_index, "ranks": num_ranks, "tree": tree, **result}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as out:
                        out.write(json.dumps(row) + "\n")
    print(
        f"\nmedian device time per call (us) over {args.rounds} rounds; ratio = {args.trees[1]} / {args.trees[0]}"
    )
    print(
        f"{'op':22} {'ranks':>5} "
        + " ".join(f"{Path(t).parent.name or t:>24}" for t in args.trees)
        + "   ratio"
    )
    for num_ranks in ranks:
        for op in NORMAL_OPS + LOW_LATENCY_OPS:
            values = [
                [row[op] for row in rows if row["ranks"] == num_ranks and row["tree"] == tree]
                for tree in args.trees
            ]
            cells = [" / ".join(f"{v:.1f}" for v in per_tree) for per_tree in values]
            ratio = statistics.median(values[1]) / statistics.median(values[0])
            print(f"{op:22} {num_ranks:>5} " + " ".join(f"{cell:>24}" for cell in cells) + f"   {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs=2, default=None, help="two src folders: A (baseline) and B")
    parser.add_argument("--ranks", default="1,2,4", help="rank counts, comma separated (>1: sharing the GPU)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=20, help="measured calls per op")
    parser.add_argument("--out", default="", help="JSON-lines file the rows are appended to")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num-ranks", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
    elif args.trees is None:
        parser.error("--trees OLD_SRC NEW_SRC is required")
    else:
        _driver(args)


if __name__ == "__main__":
    main()
