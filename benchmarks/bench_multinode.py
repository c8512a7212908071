"""Multi-node normal mode benchmark: dispatch (FP8 or BF16) and combine (BF16) with node semantics,
timed, with the bytes each rank sends across nodes checked against the minimum.

One process per rank (``epcomm.testing.parallel_launch``): gloo on CPU, where nodes are simulated
with ``Settings(ranks_per_node=...)`` (``EPCOMM_RANKS_PER_NODE``) on the reference backend, or NCCL
with one GPU per rank. Every rank builds ``Buffer(group, num_rdma_bytes=..., backend=--backend)``
(multi-node mode), routes its tokens DeepSeek-V3 style (``model_multinode.group_limited_routing``:
experts grouped per node, each token limited to ``--max-nodes`` nodes, then top-k), and per layout
(``--layouts NODESxRANKS,...``):

* times ``dispatch`` (layout precomputed; ``topk_idx`` and ``topk_weights`` sent along) and
  ``combine`` of the dispatched rows on its handle: ``--warmup`` untimed calls, then ``--iters``
  timed ones after a host barrier each (``timing.time_op``: wall clock on CPU, CUDA events on
  GPUs); the median per rank;
* reads ``Buffer.last_call_bytes()`` after each (``epcomm.traffic``): bytes to other nodes and to
  the ranks of its node under the hierarchical scheme, and under a flat all-to-all;
* computes the minimum across nodes from every rank's ``topk_idx`` (all-gathered), independently of
  ``epcomm.traffic``: dispatch, one row per (own token, other node it needs); combine, one partial
  per token of the ranks with its local index on other nodes that needs its node.

**Dedup check**: a rank whose bytes across nodes exceed the minimum (a token crossing to a node
twice) is ``FAIL`` and the exit status is 1. A backend without counters (``last_call_bytes()`` is
``None``) is reported ``n/a``.

    python benchmarks/bench_multinode.py                        # 2 nodes x 2 ranks, CPU, seconds
    python benchmarks/bench_multinode.py --layouts 2x2,2x4,4x2
    python benchmarks/bench_multinode.py --tokens 4096 --hidden 7168 --experts 256   # DeepSeek-V3
    python benchmarks/bench_multinode.py --backend nvshmem --shared-gpu   # NVSHMEM legs, one GPU: counters only

``--mode low-latency`` runs the decode shape instead: ``low_latency_dispatch`` (FP8) and
``low_latency_combine`` (BF16) of ``--tokens`` tokens a rank (the capacity), each timed as a CUDA
graph replay on GPUs (eager on CPU), with the bytes each rank sends across nodes counted from the
all-gathered routing (no counters in that mode): epcomm's put path (one message per (token,
destination rank of another node), the top-k rows to each such rank, one BF16 row per (token,
top-k slot) back), per (token, expert) as DeepEP, and the minimum (each token once per other node
it needs; one partial per (token, node) back).

    python benchmarks/bench_multinode.py --mode low-latency --tokens 128 --hidden 7168   # decode

Rows are appended to ``results/bench_multinode.jsonl`` (``$OUT/bench_multinode.jsonl`` when ``OUT``
is set; ``--out`` names another file, ``--out ''`` none).
"""

# ruff: noqa: E402  (imports follow the sys.path set-up below, so a checkout runs without installing)
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the helper modules next to this file (also for the spawned ranks)
    sys.path.insert(0, str(_HERE))
try:
    import epcomm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_HERE.parent / "src"))

import torch
import torch.distributed as dist

from epcomm import Buffer
from epcomm.backends.hierarchical import hierarchical_buffer
from epcomm.env import Settings
from epcomm.quant import per_token_cast_back, per_token_cast_to_fp8
from epcomm.testing import SHARED_GPU, ProcessGroupInfo, parallel_launch
from epcomm.topology import NodeTopology
from epcomm.traffic import CallBytes
from model_multinode import (
    deepep_low_latency_message_bytes,
    group_limited_routing,
    low_latency_messages,
    minimum_inter_node_rows,
    text_table,
)
from report import append_jsonl, environment_info, results_path
from timing import capture_graph, median, time_op

OPS = ("dispatch", "combine")


@dataclass(frozen=True)
class BenchSpec:
    """Everything a rank needs (the same on every rank).

    Attributes:
        backend: ``Buffer`` backend name.
        num_nodes, ranks_per_node: the layout (nodes of consecutive ranks).
        num_tokens, hidden, num_experts, num_topk: tokens per rank, hidden size, experts in total,
            experts per token.
        max_nodes: node groups per token (group limit).
        fp8: FP8 dispatch (``per_token_cast_to_fp8``), else BF16.
        warmup, iters: untimed and timed calls per op.
        seed: routing seed.
        num_rdma_bytes: the ``Buffer``'s RDMA bytes (``> 0``: multi-node mode).
        num_sms: ``Buffer.set_num_sms`` of the normal mode (its default ``Config``s): DeepEP's
            benchmarks and the prefill shape use 24.
    """

    backend: str
    num_nodes: int
    ranks_per_node: int
    num_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    max_nodes: int
    fp8: bool
    warmup: int
    iters: int
    seed: int
    num_rdma_bytes: int
    num_sms: int = 24

    @property
    def world_size(self) -> int:
        """Ranks of the group."""
        return self.num_nodes * self.ranks_per_node


@dataclass(frozen=True)
class RankResult:
    """What one rank measured: per op, median time (us), ``last_call_bytes()`` and the minimum
    bytes across nodes."""

    rank: int
    time_us: dict[str, float]
    calls: dict[str, CallBytes | None]
    minimum: dict[str, int]


def _combine_minimum_rows(all_topk: Sequence[torch.Tensor], spec: BenchSpec, rank: int) -> int:
    """Partials ``rank`` must send across nodes: tokens of the ranks with its local index on other
    nodes that need its node (each such token's rows of the node reduce to one partial)."""
    topology = NodeTopology(spec.world_size, spec.ranks_per_node)
    node, local = topology.node_of(rank), topology.local_rank_of(rank)
    experts_per_node = spec.num_experts // spec.num_nodes
    total = 0
    for source_node in range(spec.num_nodes):
        if source_node == node:
            continue
        topk = all_topk[source_node * spec.ranks_per_node + local]
        total += int(((topk >= 0) & (topk // experts_per_node == node)).any(dim=1).sum())
    return total


@dataclass(frozen=True)
class _Rank:
    """One rank's set-up: its routing (on its device) and every rank's (all-gathered, on the CPU),
    BF16 ``x``, top-k weights, the generator that drew them, and ``time(op)``: the median of
    ``timing.time_op`` over ``--iters`` calls (host barrier, then a device barrier, each)."""

    topk_idx: torch.Tensor
    all_topk: list[torch.Tensor]
    x: torch.Tensor
    weights: torch.Tensor
    generator: torch.Generator
    time: Callable[[Callable[[int], object]], float]


def _set_up(pgi: ProcessGroupInfo, spec: BenchSpec) -> _Rank:
    """Route this rank's tokens (``group_limited_routing``), gather every rank's routing, draw the
    inputs and build the timer (``_Rank``)."""
    device = pgi.device
    topk_idx = group_limited_routing(
        spec.num_tokens,
        spec.num_experts,
        spec.num_topk,
        spec.num_nodes,
        spec.max_nodes,
        seed=spec.seed,
        rank=pgi.rank,
    )
    # gloo groups (CPU, or ranks sharing a GPU) move CPU tensors; NCCL moves the GPU's.
    group_device = device if pgi.backend == "nccl" else torch.device("cpu")
    gathered = [torch.empty_like(topk_idx, device=group_device) for _ in range(spec.world_size)]
    dist.all_gather(gathered, topk_idx.to(group_device), group=pgi.group)
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + pgi.rank)
    x = torch.randn(spec.num_tokens, spec.hidden, generator=generator).to(torch.bfloat16).to(device)
    weights = (torch.rand(spec.num_tokens, spec.num_topk, generator=generator) + 0.5).to(device)
    cuda = device.type == "cuda"
    one = torch.ones(1, dtype=torch.int32, device=group_device)

    def barrier() -> None:
        dist.barrier(group=pgi.group)

    def device_barrier() -> None:
        if cuda and pgi.backend != "nccl":
            torch.cuda.synchronize(device)  # a gloo all-reduce does not order the GPU's stream
        dist.all_reduce(one, group=pgi.group)

    def time(op: Callable[[int], object]) -> float:
        return median(
            time_op(
                op,
                num_slots=1,
                warmup=spec.warmup,
                iters=spec.iters,
                barrier=barrier,
                cuda=cuda,
                device_barrier=device_barrier,
            )
        )

    return _Rank(topk_idx.to(device), [t.cpu() for t in gathered], x, weights, generator, time)


def bench_worker(pgi: ProcessGroupInfo, spec: BenchSpec) -> RankResult:
    """One rank: route, dispatch and combine ``--iters`` times each, read the counters."""
    me, device = pgi.rank, pgi.device
    topology = NodeTopology(spec.world_size, spec.ranks_per_node)
    rank = _set_up(pgi, spec)
    topk_idx, all_topk = rank.topk_idx, rank.all_topk
    x: Any = per_token_cast_to_fp8(rank.x) if spec.fp8 else rank.x
    settings = Settings(ranks_per_node=spec.ranks_per_node)
    Buffer.set_num_sms(spec.num_sms)
    if spec.backend == "hierarchical":
        made = hierarchical_buffer(pgi.group, spec.num_rdma_bytes, settings)
    else:
        made = Buffer(pgi.group, num_rdma_bytes=spec.num_rdma_bytes, backend=spec.backend, settings=settings)
    with made as buffer:
        per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, spec.num_experts)
        state: dict[str, Any] = {}

        def dispatch(_: int) -> None:
            state["out"] = buffer.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=topk_idx,
                topk_weights=rank.weights,
            )

        times = {"dispatch": rank.time(dispatch)}
        calls: dict[str, CallBytes | None] = {"dispatch": buffer.last_call_bytes()}
        recv_x, _, _, _, handle, _ = state["out"]
        rows = recv_x[0] if isinstance(recv_x, tuple) else recv_x
        y = torch.randn(rows.size(0), spec.hidden, generator=rank.generator).to(torch.bfloat16).to(device)

        def combine(_: int) -> None:
            buffer.combine(y, handle)

        times["combine"] = rank.time(combine)
        calls["combine"] = buffer.last_call_bytes()
    minimum = {
        "dispatch": minimum_inter_node_rows(all_topk[me], spec.num_experts, topology, me),
        "combine": _combine_minimum_rows(all_topk, spec, me),
    }
    return RankResult(me, times, calls, minimum)


def _check(call: CallBytes | None, minimum_bytes: int) -> str:
    if call is None:
        return "n/a"
    return "PASS" if call.inter_node <= minimum_bytes else "FAIL"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def summarize(spec: BenchSpec, results: Sequence[RankResult]) -> tuple[str, list[dict[str, Any]]]:
    """The table (one line per rank and op, then one per op over ranks) and the JSON rows (one per
    op; per-rank lists in ``*_ranks``)."""
    header = [
        "rank",
        "node",
        "op",
        "us",
        "inter MB",
        "min MB",
        "flat inter MB",
        "intra MB",
        "flat intra MB",
        "dedup",
    ]
    lines: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for op in OPS:
        checks = []
        for result in results:
            call = result.calls[op]
            row = call.row_bytes if call is not None else None
            minimum = result.minimum[op] * row if row is not None else None
            check = _check(call, minimum or 0)
            checks.append(check)
            lines.append(
                [
                    str(result.rank),
                    str(result.rank // spec.ranks_per_node),
                    op,
                    f"{result.time_us[op]:.0f}",
                    _mb(call.inter_node if call else None),
                    _mb(minimum),
                    _mb(call.flat_inter_node if call else None),
                    _mb(call.intra_node if call else None),
                    _mb(call.flat_intra_node if call else None),
                    check,
                ]
            )
        times = [r.time_us[op] for r in results]
        calls = [r.calls[op] for r in results]
        overall = "FAIL" if "FAIL" in checks else ("n/a" if "n/a" in checks else "PASS")
        inter = [c.inter_node if c else None for c in calls]
        lines.append(
            [
                "all",
                "-",
                op,
                f"{max(times):.0f}",
                _mb(sum(v or 0 for v in inter) / len(inter) if None not in inter else None),
                "",
                "",
                "",
                "",
                overall,
            ]
        )
        records.append(
            {
                "layout": f"{spec.num_nodes}x{spec.ranks_per_node}",
                "backend": spec.backend,
                "op": op,
                "dispatch_dtype": "fp8" if spec.fp8 else "bf16",
                "num_sms": spec.num_sms,
                "shape": {
                    "tokens": spec.num_tokens,
                    "hidden": spec.hidden,
                    "experts": spec.num_experts,
                    "topk": spec.num_topk,
                    "max_nodes": spec.max_nodes,
                },
                "time_us": max(times),
                "time_us_median": median(times),
                "time_us_ranks": times,
                "row_bytes": calls[0].row_bytes if calls[0] else None,
                "inter_node_bytes_ranks": inter,
                "min_inter_node_bytes_ranks": [
                    r.minimum[op] * c.row_bytes if c else None for r, c in zip(results, calls, strict=True)
                ],
                "flat_inter_node_bytes_ranks": [c.flat_inter_node if c else None for c in calls],
                "intra_node_bytes_ranks": [c.intra_node if c else None for c in calls],
                "flat_intra_node_bytes_ranks": [c.flat_intra_node if c else None for c in calls],
                "dedup_check": overall,
                "iters": spec.iters,
                "warmup": spec.warmup,
            }
        )
    return text_table(header, lines), records


def low_latency_bytes(
    all_topk: Sequence[torch.Tensor], spec: BenchSpec, rank: int
) -> dict[str, dict[str, int]]:
    """Bytes ``rank`` sends across nodes in one low-latency dispatch (FP8) and combine (BF16), by
    scheme, counted from every rank's routing: ``epcomm`` (the put path: a message of ``hidden``
    FP8 bytes and ``hidden / 128`` float32 scales per (token, destination rank of another node)
    holding one of its experts, then the call's top-k rows, count and fingerprint to every rank of
    another node; combine: one BF16 row per (token, top-k slot) of another node's token),
    ``deepep`` (one message per (token, expert), ``model_multinode.deepep_low_latency_message_bytes``),
    ``minimum`` (each token once per other node it needs, and one BF16 partial per (token, node)
    back, from the rank with the token's local index, as in normal mode)."""
    topology = NodeTopology(spec.world_size, spec.ranks_per_node)
    per_expert, per_rank = low_latency_messages(all_topk, spec.num_experts, spec.world_size)
    node = torch.arange(spec.world_size) // spec.ranks_per_node
    other = node != node[rank]
    message = spec.hidden + spec.hidden // 128 * 4
    row = spec.hidden * 2
    deepep_dispatch, deepep_combine = deepep_low_latency_message_bytes(spec.hidden)
    remote_ranks = int(other.sum())
    topk = all_topk[rank]
    return {
        "dispatch": {
            "epcomm": int(per_rank[rank][other].sum()) * message
            + remote_ranks * (topk.size(0) * topk.size(1) * 4 + 4 + 32),
            "deepep": int(per_expert[rank][other].sum()) * deepep_dispatch,
            "minimum": minimum_inter_node_rows(topk, spec.num_experts, topology, rank) * message,
        },
        "combine": {
            "epcomm": int(per_expert[:, rank][other].sum()) * row,
            "deepep": int(per_expert[:, rank][other].sum()) * deepep_combine,
            "minimum": _combine_minimum_rows(all_topk, spec, rank) * row,
        },
    }


def low_latency_worker(pgi: ProcessGroupInfo, spec: BenchSpec) -> dict[str, Any]:
    """One rank of ``--mode low-latency``: FP8 dispatch and BF16 combine of ``num_tokens`` tokens (the
    capacity), each timed as a replayed CUDA graph on GPUs (eager on CPU); the bytes by routing."""
    rank = _set_up(pgi, spec)
    size = Buffer.get_low_latency_rdma_size_hint(
        spec.num_tokens, spec.hidden, spec.world_size, spec.num_experts, across_nodes=True
    )
    settings = Settings(ranks_per_node=spec.ranks_per_node)
    cuda = pgi.device.type == "cuda"
    with Buffer(
        pgi.group, num_rdma_bytes=max(size, spec.num_rdma_bytes), low_latency_mode=True, backend=spec.backend,
        settings=settings,
    ) as buffer:  # fmt: skip

        def dispatch() -> Any:
            return buffer.low_latency_dispatch(rank.x, rank.topk_idx, spec.num_tokens, spec.num_experts)

        (x_fp8, scales), _, handle, _, _ = dispatch()
        expert_out = per_token_cast_back(x_fp8, scales)

        def combine() -> Any:
            return buffer.low_latency_combine(expert_out, rank.topk_idx, rank.weights, handle)

        combine()
        if cuda:
            dispatch_graph, _ = capture_graph(dispatch)
            combine_graph, _ = capture_graph(combine)
            ops = {"dispatch": lambda _: dispatch_graph.replay(), "combine": lambda _: combine_graph.replay()}
        else:
            ops = {"dispatch": lambda _: dispatch(), "combine": lambda _: combine()}
        times = {name: rank.time(op) for name, op in ops.items()}
    return {"rank": pgi.rank, "time_us": times, "bytes": low_latency_bytes(rank.all_topk, spec, pgi.rank)}


def summarize_low_latency(
    spec: BenchSpec, results: Sequence[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    """The decode table (one line per rank and op, then one per op over ranks) and JSON rows."""
    header = ["rank", "node", "op", "us", "epcomm MB", "(t,e) MB", "min MB"]
    lines: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for op in OPS:
        for result in results:
            counted = result["bytes"][op]
            lines.append(
                [str(result["rank"]), str(result["rank"] // spec.ranks_per_node), op,
                 f"{result['time_us'][op]:.1f}", _mb(counted["epcomm"]), _mb(counted["deepep"]),
                 _mb(counted["minimum"])]
            )  # fmt: skip
        times = [r["time_us"][op] for r in results]
        lines.append(["all", "-", op, f"{max(times):.1f}", "", "", ""])
        records.append(
            {
                "mode": "low-latency",
                "layout": f"{spec.num_nodes}x{spec.ranks_per_node}",
                "backend": spec.backend,
                "op": op,
                "shape": {
                    "tokens": spec.num_tokens,
                    "hidden": spec.hidden,
                    "experts": spec.num_experts,
                    "topk": spec.num_topk,
                    "max_nodes": spec.max_nodes,
                },
                "time_us": max(times),
                "time_us_ranks": times,
                "inter_node_bytes_ranks": [r["bytes"][op]["epcomm"] for r in results],
                "per_token_expert_bytes_ranks": [r["bytes"][op]["deepep"] for r in results],
                "min_inter_node_bytes_ranks": [r["bytes"][op]["minimum"] for r in results],
                "iters": spec.iters,
                "warmup": spec.warmup,
            }
        )
    return text_table(header, lines), records


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit status 1 when a dedup check fails or a run raised."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--backend",
        default="reference",
        help="Buffer backend, or hierarchical: the hierarchical algorithm over torch.distributed, whose "
        "counters are the bytes it sent (default %(default)s)",
    )
    parser.add_argument(
        "--mode",
        choices=("normal", "low-latency"),
        default="normal",
        help="normal: dispatch and combine (prefill); low-latency: the decode ops (default %(default)s)",
    )
    parser.add_argument("--layouts", default="2x2", help="NODESxRANKS_PER_NODE,... (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank (DeepSeek-V3: 4096)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size, a multiple of 128 (7168)")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=4, help="node groups per token (group limit)")
    parser.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8", help="dispatch rows")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rdma-bytes", type=int, default=1 << 30, help="num_rdma_bytes of the Buffers")
    parser.add_argument(
        "--num-sms", type=int, default=24, help="Buffer.set_num_sms of the normal mode (default %(default)s)"
    )
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even with GPUs")
    parser.add_argument(
        "--shared-gpu",
        action="store_true",
        help="every rank on GPU 0 (gloo group; the counters and the dedup check hold, the times do not)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="limit per layout (s)")
    parser.add_argument("--out", default=None, help="JSON lines file ('' writes none)")
    args = parser.parse_args(argv)

    status = 0
    out = results_path("bench_multinode.jsonl") if args.out is None else args.out
    for layout in args.layouts.split(","):
        num_nodes, ranks_per_node = (int(v) for v in layout.lower().split("x"))
        spec = BenchSpec(
            args.backend,
            num_nodes,
            ranks_per_node,
            args.tokens,
            args.hidden,
            args.experts,
            args.topk,
            args.max_nodes,
            args.dtype == "fp8",
            args.warmup,
            args.iters,
            args.seed,
            args.rdma_bytes,
            args.num_sms,
        )
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        shared = args.shared_gpu and gpus >= 1 and not args.cpu
        on_gpu = not args.cpu and (gpus >= spec.world_size or shared)
        placement = SHARED_GPU if shared else (None if on_gpu else "gloo")
        where = "every rank on GPU 0" if shared else ("nccl" if on_gpu else "gloo, CPU")
        print(
            f"\n== {layout}: {spec.world_size} ranks ({where}), backend {spec.backend}, "
            f"{spec.num_tokens} tokens/rank, hidden {spec.hidden}, top-{spec.num_topk} of {spec.num_experts} "
            f"experts, <= {spec.max_nodes} nodes/token, {args.dtype} dispatch, bf16 combine; "
            f"median of {spec.iters} (after {spec.warmup})",
            flush=True,
        )
        low_latency = args.mode == "low-latency"
        try:
            results = parallel_launch(
                spec.world_size,
                low_latency_worker if low_latency else bench_worker,
                spec,
                backend=placement,
                timeout_s=args.timeout,
            )
        except (RuntimeError, TimeoutError) as error:
            print(f"FAILED: {error}", flush=True)
            status = 1
            continue
        if low_latency:
            table, records = summarize_low_latency(spec, results)
            print(
                "MB = 1e6 bytes the rank sends across nodes, counted from the routing: epcomm's put path, "
                "(t,e) = per (token, expert) as DeepEP, min = each token once per node; us = median per "
                "rank (graph replay on GPUs; all: max over ranks)"
            )
            print(table, flush=True)
            if out:
                env = environment_info(spec.world_size, "cuda" if on_gpu else "cpu")
                append_jsonl(out, [{**env, **record} for record in records])
            continue
        table, records = summarize(spec, results)
        print(
            "MB = 1e6 bytes sent by the rank (Buffer.last_call_bytes()); min = the minimum across nodes; "
            "us = median per rank (all: max over ranks)"
        )
        print(table, flush=True)
        if any(r["dedup_check"] == "FAIL" for r in records):
            print("FAIL: bytes across nodes exceed the minimum (a token crossed to a node more than once)")
            status = 1
        if out:
            env = environment_info(spec.world_size, "cuda" if on_gpu else "cpu")
            append_jsonl(out, [{**env, **record} for record in records])
    if out:
        print(f"\nrows appended to {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
