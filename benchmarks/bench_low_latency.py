"""Low-latency (decode) benchmark: NVLink kernels vs the reference backend over NCCL, same run.

Each op is captured in a CUDA graph; after a barrier ``--iters`` replays are issued back to back
and timed with CUDA events (time per call; the ranks pace each other as in a decode loop), so the
numbers are GPU time, not Python launch time; the slowest rank's median of 5 such runs is reported. With the
receive hook the send and receive phases are timed separately, and a bf16 matmul is timed alone
and between the two phases to show no SM is held in between.

The barrier before each timed run is a host barrier (gloo) followed by a device barrier: an NCCL
``all_reduce`` of one int32 on the run's group, enqueued before the start event without the host
waiting for it, so every rank's GPU starts together and the ranks' skew in leaving the host
barrier (up to ~100s of us) is not timed; the same for both backends (as ``bench_normal.py``).

    python benchmarks/bench_low_latency.py   # rows appended to results/bench_low_latency.jsonl

Rows go to ``results/bench_low_latency.jsonl`` at the repository root (``$OUT/bench_low_latency.jsonl``
when ``OUT`` is set; ``--out`` names another file).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import epcomm
from epcomm import quant
from epcomm.testing import ProcessGroupInfo, make_routing, parallel_launch
from report import append_jsonl, environment_info, results_path
from timing import capture_graph


def _inputs(rank: int, tokens: int, hidden: int, experts: int, topk: int, device: torch.device) -> Any:
    """``x [tokens, hidden]`` bf16, ``topk_idx [tokens, topk]`` int64 and ``topk_weights`` float32 of ``rank``."""
    generator = torch.Generator(device="cpu").manual_seed(1000 + rank)
    x = torch.randn(tokens, hidden, generator=generator).bfloat16()
    topk_idx, weights = make_routing(tokens, experts, topk, seed=1000, rank=rank, device=device)
    return x.to(device), topk_idx, weights


def _time(fn: Callable[[], Any], iters: int, barrier: Callable[[], None]) -> float:
    """Median microseconds of ``fn`` over ``iters`` runs, each after a barrier."""
    times = []
    for _ in range(iters):
        barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def _time_back_to_back(
    fn: Callable[[], Any], iters: int, barrier: Callable[[], None], repeats: int = 5
) -> float:
    """Microseconds per call of ``iters`` calls issued back to back (the ranks pace each other, as
    in a real decode loop, so host-side skew between ranks is amortized); median of ``repeats``."""
    times = []
    for _ in range(repeats):
        barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(times)


def _measure(
    pgi: ProcessGroupInfo, setting: dict[str, int], backend: str, iters: int, barrier: Callable[[], None]
) -> list[dict[str, Any]]:
    """Rows for one (setting, backend): dispatch and combine times, and the hook split for nvlink."""
    tokens, capacity, hidden, experts, topk = (
        setting["tokens"],
        setting["capacity"],
        setting["hidden"],
        setting["experts"],
        setting["topk"],
    )
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, pgi.world_size, experts)
    x, topk_idx, weights = _inputs(pgi.rank, tokens, hidden, experts, topk, pgi.device)
    name = f"{tokens} tok, h{hidden}, top{topk}/{experts}"
    buffer = epcomm.Buffer(pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend=backend)
    state: dict[str, Any] = {}

    def dispatch(hook: bool = False) -> Any:
        recv, count, handle, _, recv_hook = buffer.low_latency_dispatch(
            x, topk_idx, capacity, experts, use_fp8=True, return_recv_hook=hook
        )
        state.update(recv=recv, count=count, handle=handle, hook=recv_hook)
        return recv

    dispatch()
    expert_out = quant.per_token_cast_back(*state["recv"])
    handle = state["handle"]

    def combine() -> Any:
        return buffer.low_latency_combine(expert_out, topk_idx, weights, handle)[0]

    received = int(state["count"].sum())
    dispatch_bytes = received * (hidden + hidden // 128 * 4)
    combine_bytes = received * hidden * 2
    extra: dict[str, float] = {}
    if backend == "nvlink":
        dispatch_graph, _ = capture_graph(dispatch)
        combine_graph, _ = capture_graph(combine)
        dispatch_us = _time_back_to_back(dispatch_graph.replay, iters, barrier)
        combine_us = _time_back_to_back(combine_graph.replay, iters, barrier)
        pair_us = _time_back_to_back(
            lambda: (dispatch_graph.replay(), combine_graph.replay()), iters, barrier
        )
        send_graph, _ = capture_graph(lambda: dispatch(hook=True))
        recv_graph, _ = capture_graph(lambda: state["hook"]())
        send_us = _time_back_to_back(send_graph.replay, iters, barrier)
        both_us = _time_back_to_back(lambda: (send_graph.replay(), recv_graph.replay()), iters, barrier)
        a = torch.randn(4096, 4096, device=pgi.device, dtype=torch.bfloat16)
        matmul_alone = _time(lambda: a @ a, iters, barrier)
        between = []
        for _ in range(iters):
            barrier()
            send_graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ a
            end.record()
            recv_graph.replay()
            torch.cuda.synchronize()
            between.append(start.elapsed_time(end) * 1000)
        extra = {
            "dispatch_plus_combine_us": pair_us,
            "send_us": send_us,
            "recv_us": both_us - send_us,
            "matmul_alone_us": matmul_alone,
            "matmul_between_us": statistics.median(between),
        }
    else:
        dispatch_us = _time_back_to_back(dispatch, iters, barrier)
        combine_us = _time_back_to_back(combine, iters, barrier)
    torch.cuda.synchronize()
    buffer.destroy()
    return [
        {
            "setting": name,
            "backend": backend,
            "op": "low_latency_dispatch_fp8",
            "time_us": dispatch_us,
            "bytes": dispatch_bytes,
            **extra,
        },
        {
            "setting": name,
            "backend": backend,
            "op": "low_latency_combine_bf16",
            "time_us": combine_us,
            "bytes": combine_bytes,
        },
    ]


def worker(pgi: ProcessGroupInfo, settings: list[dict[str, int]], iters: int) -> list[dict[str, Any]]:
    """Time every setting on this rank; return rows of (setting, op, backend, microseconds, bytes)."""
    host_group = dist.new_group(backend="gloo")
    sync = torch.zeros(1, dtype=torch.int32, device=pgi.device)

    def barrier() -> None:
        torch.cuda.synchronize()
        dist.barrier(group=host_group)
        # Device barrier: enqueued, not waited for by the host; the start event recorded next fires
        # only once every rank's stream got here, so the host barrier's skew is not timed.
        dist.all_reduce(sync, group=pgi.group)

    rows: list[dict[str, Any]] = []
    for setting in settings:
        for backend in ("nvlink", "reference"):
            rows += _measure(pgi, setting, backend, iters, barrier)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table (slowest rank's median per op)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-ranks", type=int, default=torch.cuda.device_count())
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--tokens", default="1,128,256", help="tokens per rank, comma separated")
    parser.add_argument(
        "--out",
        default=results_path("bench_low_latency.jsonl"),
        help="JSON-lines file the rows are appended to (default: bench_low_latency.jsonl in $OUT when "
        "set, else in results/ at the repository root)",
    )
    args = parser.parse_args(argv)
    if args.num_ranks < 2:
        print("needs 2 or more CUDA GPUs", file=sys.stderr)
        return 2
    settings = [
        {
            "tokens": t,
            "capacity": max(t, 128),
            "hidden": args.hidden,
            "experts": args.experts,
            "topk": args.topk,
        }
        for t in (int(v) for v in args.tokens.split(","))
    ]
    results = parallel_launch(args.num_ranks, worker, settings, args.iters, backend="nccl", timeout_s=900)
    info = environment_info(args.num_ranks, "cuda")
    info["gpu"] = torch.cuda.get_device_name(0)
    merged = []
    for index, row in enumerate(results[0]):
        per_rank = [rank_rows[index] for rank_rows in results]
        record = {**info, **row}
        for key in (
            "time_us",
            "dispatch_plus_combine_us",
            "send_us",
            "recv_us",
            "matmul_alone_us",
            "matmul_between_us",
        ):
            if key in row:
                record[key] = max(r[key] for r in per_rank)
        record["gbps"] = record["bytes"] / record["time_us"] / 1e3
        merged.append(record)
    append_jsonl(args.out, merged)
    print(
        f"EP{args.num_ranks} on {info['gpu']}, commit {info['git_commit'][:12]}, slowest rank's median of {args.iters}"
    )
    header = f"{'setting':28} {'op':26} {'backend':10} {'us':>8} {'GB/s':>7} {'send us':>8} {'recv us':>8} {'mm alone':>9} {'mm between':>10}"
    print(header)
    for r in merged:
        print(
            f"{r['setting']:28} {r['op']:26} {r['backend']:10} {r['time_us']:8.1f} {r['gbps']:7.1f} "
            + (
                f"{r['send_us']:8.1f} {r['recv_us']:8.1f} {r['matmul_alone_us']:9.1f} {r['matmul_between_us']:10.1f}"
                if "send_us" in r
                else ""
            )
        )
    for setting in dict.fromkeys(r["setting"] for r in merged):
        for op in ("low_latency_dispatch_fp8", "low_latency_combine_bf16"):
            ours = next(
                r for r in merged if r["setting"] == setting and r["op"] == op and r["backend"] == "nvlink"
            )
            base = next(
                r for r in merged if r["setting"] == setting and r["op"] == op and r["backend"] == "reference"
            )
            print(f"speed-up {setting} {op}: {base['time_us'] / ours['time_us']:.1f}x vs reference over NCCL")
    print(f"{len(merged)} rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
