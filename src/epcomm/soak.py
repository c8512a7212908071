"""``python -m epcomm soak``: many random calls through a transport against the reference backend.

Every iteration draws one scenario from ``(seed, iteration)``, the same on every rank: normal or
low-latency mode, hidden size, experts, top-k, BF16 or FP8, cached dispatch or not, tokens per rank
(empty ranks included), uniform or skewed routing (every token to rank 0's experts), ``-1`` slots
and, in low-latency mode, tokens listing one expert twice. Each rank runs it on the transport under
test and on the reference backend in the same processes and compares: dispatch and cached dispatch
bit for bit (rows, scales, top-k ids and weights, per-expert counts), normal-mode combine bit for
bit, low-latency combine within 1% of the largest value (the low-latency reduction order is the
kernel's). It prints the mismatches (there must be none), iterations per second and the slowest
iteration. ``--max-seconds`` ends a long run cleanly when its time is up (every rank stops after the
same iteration) and ``--first-iteration`` continues a sequence where an earlier run stopped, so a
run longer than one sitting can be split without repeating or skipping a scenario. On CPU the
transport is the reference backend itself: the run then checks that random shapes never fail, not
two implementations against each other. Combinations that cannot run on this machine (``--transport
nvlink`` on CPU ranks, ``--dist-backend nccl`` without a GPU per process) are refused before any
process starts.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from epcomm import _cli, quant
from epcomm._cli import Progress, format_seconds
from epcomm.buffer import Buffer
from epcomm.testing import SHARED_GPU, ProcessGroupInfo, make_routing, parallel_launch

__all__ = ["SoakConfig", "SoakReport", "build_parser", "main", "run"]

# Multiples of 512: the NVLink backend moves rows of whole 16-byte words, so FP8 scale rows (one
# float32 per 128 channels) need hidden / 128 to be a multiple of 4.
_HIDDEN_CHOICES = (512, 1024, 2560)
_TOPK_CHOICES = (1, 2, 4, 8)
_EXPERTS_PER_RANK = (1, 2, 4, 8)
_MASKED_CHOICES = (0.0, 0.1, 0.5)
# Mismatch lines kept per rank (the count is always complete).
_KEPT_MISMATCHES = 20
# Least seconds between two progress lines: a CPU soak runs ~50 iterations/s on 2 ranks, so a
# 1000-iteration run prints one or two.
_PROGRESS_INTERVAL_S = 10.0


@dataclass(frozen=True)
class SoakConfig:
    """What one soak runs.

    Attributes:
        iterations: scenarios to run.
        max_tokens: most tokens a rank sends in one call.
        transport: epcomm backend under test (``Buffer(backend=...)``).
        seed: seed of the scenarios.
        first_iteration: number of the first scenario (scenario ``i`` depends on ``seed`` and ``i`` only).
        max_seconds: stop after the iteration during which this many seconds have passed (``None``: run all).
    """

    iterations: int
    max_tokens: int
    transport: str
    seed: int
    first_iteration: int = 0
    max_seconds: float | None = None


class SoakReport(NamedTuple):
    """One rank's result: iterations run, mismatch count and lines (the first ``_KEPT_MISMATCHES``),
    timing, and the seconds spent in each phase (transport under test, reference, comparing,
    buffer clean)."""

    iterations: int
    num_mismatches: int
    mismatches: list[str]
    seconds: float
    slowest_s: float
    slowest_iteration: int
    phase_seconds: dict[str, float]


def _scenario(cfg: SoakConfig, iteration: int, num_ranks: int) -> dict[str, Any]:
    """The scenario of ``iteration``: drawn from ``(seed, iteration)`` alone, so every rank agrees."""
    rng = random.Random(cfg.seed * 1_000_003 + iteration)
    num_experts = num_ranks * rng.choice(_EXPERTS_PER_RANK)
    mode = rng.choice(("normal", "low_latency"))
    tokens = [rng.randint(0, cfg.max_tokens) for _ in range(num_ranks)]
    if rng.random() < 0.2:
        tokens[rng.randrange(num_ranks)] = 0
    return {
        "mode": mode,
        "hidden": rng.choice(_HIDDEN_CHOICES),
        "num_experts": num_experts,
        "num_topk": min(rng.choice(_TOPK_CHOICES), num_experts),
        "fp8": rng.random() < 0.5,
        "cached": rng.random() < 0.5,
        "skewed": rng.random() < 0.25,
        "masked_prob": rng.choice(_MASKED_CHOICES),
        "duplicate": mode == "low_latency" and rng.random() < 0.3,
        "tokens": tokens,
        # One capacity per run, as a serving engine keeps one num_max_dispatch_tokens_per_rank: the
        # low-latency kernels are compiled for their capacity, so a capacity drawn per iteration
        # (up to 64 values) would make most low-latency iterations compile kernels, not move rows.
        "capacity": max(1, cfg.max_tokens),
    }


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` in row-major order (a fresh dense copy: any strides, one element too)."""
    dense = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device).copy_(tensor)
    return dense.reshape(-1).view(torch.uint8)


def _differs(name: str, got: Any, want: Any) -> list[str]:
    """``[]`` when ``got`` equals ``want`` bit for bit (tensors, tuples of tensors, lists), else one line."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return [
                f"{name}: {getattr(got, 'shape', got)} / {getattr(got, 'dtype', '')} != {list(want.shape)} / {want.dtype}"
            ]
        if got.numel() and not torch.equal(_bytes(got), _bytes(want)):
            return [f"{name}: values differ"]
        return []
    if isinstance(want, tuple):
        return [
            line for g, w, i in zip(got, want, range(len(want))) for line in _differs(f"{name}[{i}]", g, w)
        ]
    return [] if got == want else [f"{name}: {got} != {want}"]


class _Phases:
    """Seconds an iteration spends in each phase (the device synchronized at each boundary)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = {"transport": 0.0, "reference": 0.0, "compare": 0.0, "clean": 0.0}
        self._phase = ""
        self._start = 0.0

    def enter(self, phase: str) -> None:
        """Close the current phase and open ``phase`` (``""``: none)."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.monotonic()
        if self._phase:
            self.seconds[self._phase] += now - self._start
        self._phase, self._start = phase, now


def _normal(
    buffers: Sequence[Buffer],
    x: Any,
    idx: torch.Tensor,
    weights: torch.Tensor,
    s: dict[str, Any],
    phases: _Phases,
) -> list[str]:
    results = []
    for buffer, phase in zip(buffers, ("transport", "reference")):
        phases.enter(phase)
        layout = buffer.get_dispatch_layout(idx, s["num_experts"])
        recv_x, recv_idx, recv_weights, counts, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=idx,
            topk_weights=weights,
        )
        assert handle is not None
        cached = buffer.dispatch(x, handle=handle)[0] if s["cached"] else None
        expert_x = quant.per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
        combined, combined_weights, _ = buffer.combine(
            expert_x.contiguous(), handle, topk_weights=recv_weights
        )
        results.append((recv_x, recv_idx, recv_weights, counts, cached, combined, combined_weights))
    phases.enter("compare")
    names = (
        "recv_x",
        "recv_topk_idx",
        "recv_topk_weights",
        "num_recv_tokens_per_expert_list",
        "cached recv_x",
        "combined_x",
        "combined_topk_weights",
    )
    return [line for name, g, w in zip(names, *results) for line in _differs(name, g, w)]


def _low_latency(
    buffers: Sequence[Buffer],
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    s: dict[str, Any],
    phases: _Phases,
) -> list[str]:
    lines: list[str] = []
    outputs = []
    for buffer, phase in zip(buffers, ("transport", "reference")):
        phases.enter(phase)
        recv_x, counts, handle, _, hook = buffer.low_latency_dispatch(
            x, idx, s["capacity"], s["num_experts"], use_fp8=s["fp8"]
        )
        hook()
        outputs.append((recv_x, counts, handle))
    phases.enter("compare")
    (got_x, got_counts, _), (want_x, want_counts, _) = outputs
    got_parts = got_x if isinstance(got_x, tuple) else (got_x,)
    want_parts = want_x if isinstance(want_x, tuple) else (want_x,)
    lines += _differs("recv_count", got_counts, want_counts)
    if not lines:
        for expert, count in enumerate(want_counts.tolist()):
            for part, (got, want) in enumerate(zip(got_parts, want_parts)):
                lines += _differs(
                    f"expert {expert} recv_x[{part}]", got[expert, :count], want[expert, :count]
                )
    expert_x = quant.per_token_cast_back(*want_x) if isinstance(want_x, tuple) else want_x
    combined = []
    for buffer, (_, _, handle), phase in zip(buffers, outputs, ("transport", "reference")):
        phases.enter(phase)
        out, _, hook = buffer.low_latency_combine(expert_x.contiguous(), idx, weights, handle)
        hook()
        combined.append(out.float())
    phases.enter("compare")
    bound = 1e-2 * max(combined[1].abs().max().item() if combined[1].numel() else 0.0, 1e-6)
    if combined[0].numel() and (combined[0] - combined[1]).abs().max().item() > bound:
        lines.append("low_latency_combine: differs from the reference by more than 1%")
    return lines


def _worker(pgi: ProcessGroupInfo, cfg: SoakConfig, launched_at: float) -> SoakReport:
    """Run every scenario on this rank; return its mismatches and timing. Rank 0 prints progress
    (``launched_at``: the launching process's ``time.time()`` when it started the ranks)."""
    num_ranks = pgi.world_size
    progress = Progress(pgi.rank == 0, _PROGRESS_INTERVAL_S)
    progress.stage(
        "setup",
        f"{num_ranks} processes up in {format_seconds(time.time() - launched_at)} "
        f"(torch.distributed {pgi.backend}, rank 0 on {pgi.device})",
    )
    ll_bytes = Buffer.get_low_latency_rdma_size_hint(
        max(1, cfg.max_tokens), max(_HIDDEN_CHOICES), num_ranks, num_ranks * max(_EXPERTS_PER_RANK)
    )
    buffers = [
        Buffer(pgi.group, num_nvl_bytes=1 << 22, num_rdma_bytes=ll_bytes, low_latency_mode=True, backend=name)
        for name in (cfg.transport, "reference")
    ]
    progress.stage(
        "soak",
        f"{cfg.iterations} iterations: transport {buffers[0].backend_name} against the reference backend",
    )
    mismatches: list[str] = []
    num_mismatches = 0
    slowest_s, slowest_iteration = 0.0, -1
    start = time.monotonic()
    done = 0
    phases = _Phases(pgi.device)
    for iteration in range(cfg.first_iteration, cfg.first_iteration + cfg.iterations):
        if cfg.max_seconds is not None and _time_is_up(pgi, time.monotonic() - start > cfg.max_seconds):
            break
        begin = time.monotonic()
        s = _scenario(cfg, iteration, num_ranks)
        num_tokens = s["tokens"][pgi.rank]
        allowed = range(s["num_experts"] // num_ranks) if s["skewed"] else None
        idx, weights = make_routing(
            num_tokens,
            s["num_experts"],
            s["num_topk"],
            seed=cfg.seed + iteration,
            rank=pgi.rank,
            masked_prob=s["masked_prob"],
            allowed_experts=allowed,
            device=pgi.device,
        )
        if s["duplicate"] and s["num_topk"] > 1:
            idx[::3, 1] = idx[::3, 0]
        x = (
            torch.randn(num_tokens, s["hidden"], generator=torch.Generator().manual_seed(iteration))
            + pgi.rank
        )
        x = x.bfloat16().to(pgi.device)
        if s["mode"] == "normal":
            payload: Any = quant.per_token_cast_to_fp8(x) if s["fp8"] else x
            lines = _normal(buffers, payload, idx, weights, s, phases)
        else:
            lines = _low_latency(buffers, x, idx, weights, s, phases)
        phases.enter("clean")
        for buffer in buffers:
            buffer.clean_low_latency_buffer(s["capacity"], s["hidden"], s["num_experts"])
        phases.enter("")
        num_mismatches += len(lines)
        room = max(0, _KEPT_MISMATCHES - len(mismatches))
        mismatches += [f"iteration {iteration} {s}: {line}" for line in lines][:room]
        elapsed = time.monotonic() - begin
        if elapsed > slowest_s:
            slowest_s, slowest_iteration = elapsed, iteration
        done += 1
        verdict = f"{num_mismatches} mismatches so far on rank 0" if num_mismatches else "ok"
        progress.iteration("soak", done, cfg.iterations, elapsed, verdict)
    seconds = time.monotonic() - start
    for buffer in buffers:
        buffer.destroy()
    return SoakReport(
        done, num_mismatches, mismatches, seconds, slowest_s, slowest_iteration, dict(phases.seconds)
    )


def _time_is_up(pgi: ProcessGroupInfo, mine: bool) -> bool:
    """Whether any rank's time is up (every rank gets the same answer, so all stop together)."""
    flag = torch.tensor([int(mine)], dtype=torch.int32, device=pgi.device if pgi.backend == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pgi.group)
    return bool(flag.item())


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m epcomm soak``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(prog="python -m epcomm soak", description=__doc__.split("\n\n")[1])
    parser.add_argument("--iterations", type=int, default=100, help="scenarios to run (default: 100)")
    parser.add_argument("--num-processes", type=int, default=2, help="ranks (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens a rank sends (default: 64)")
    parser.add_argument(
        "--transport",
        default="auto",
        choices=["auto", "reference", "nvlink"],
        help=f"backend under test (nvlink: the ranks on GPUs, --dist-backend nccl or {SHARED_GPU}; "
        "default: auto)",
    )
    parser.add_argument(
        "--dist-backend",
        default="auto",
        choices=["auto", "gloo", "nccl", SHARED_GPU],
        help="torch.distributed backend of the ranks: gloo on CPU, nccl with one GPU per rank, "
        f"{SHARED_GPU} with every rank on GPU 0; auto: nccl with a GPU per rank, else gloo (default: auto)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--first-iteration",
        type=int,
        default=0,
        help="number of the first scenario: continues an earlier run's sequence (default: 0)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop cleanly, and report, after the iteration during which this many seconds passed",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the whole soak may take")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Run the soak and print its report.

    Arguments:
        argv: ``build_parser``'s arguments; ``None``: ``sys.argv[2:]``.

    Returns:
        0: no mismatch on any rank; 1: mismatches; 3: a rank raised or timed out (bad arguments, and
        combinations this machine cannot run, exit with 2 from ``argparse`` before any process starts).
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    placement = _cli.resolve_placement(
        parser,
        num_processes=args.num_processes,
        dist_backend=args.dist_backend,
        transport=args.transport,
        num_gpus=_cli.cuda_device_count(),
    )
    for flag, value, minimum in (("--iterations", args.iterations, 1), ("--max-tokens", args.max_tokens, 0)):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}; got {value}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0; got {args.timeout}")
    if args.first_iteration < 0:
        parser.error(f"--first-iteration must be >= 0; got {args.first_iteration}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        parser.error(f"--max-seconds must be > 0; got {args.max_seconds}")
    cfg = SoakConfig(
        args.iterations, args.max_tokens, args.transport, args.seed, args.first_iteration, args.max_seconds
    )
    print(
        f"epcomm soak: starting {args.num_processes} processes (torch.distributed {placement.dist_backend}; "
        f"transport {args.transport})",
        flush=True,
    )
    try:
        reports: list[SoakReport] = parallel_launch(
            args.num_processes,
            _worker,
            cfg,
            time.time(),
            backend=placement.dist_backend,
            timeout_s=args.timeout,
        )
    except (RuntimeError, TimeoutError) as error:
        print(f"epcomm soak: FAIL: the run did not complete\n{error}", file=sys.stderr)
        return 3
    total = sum(report.num_mismatches for report in reports)
    seconds = max(report.seconds for report in reports)
    slowest = max(reports, key=lambda report: report.slowest_s)
    for rank, report in enumerate(reports):
        for line in report.mismatches:
            print(f"rank {rank}: {line}")
    done = reports[0].iterations
    cut = f" (stopped at --max-seconds {cfg.max_seconds:g})" if done < cfg.iterations else ""
    first, last = cfg.first_iteration, cfg.first_iteration + done - 1
    print(
        f"epcomm soak: {done} iterations ({first}-{last}){cut} on {args.num_processes} ranks, transport "
        f"{cfg.transport}: {total} mismatches, {done / max(seconds, 1e-9):.1f} iterations/s, slowest "
        f"iteration {slowest.slowest_iteration} ({slowest.slowest_s * 1e3:.1f} ms)"
    )
    phases = reports[0].phase_seconds
    print(
        "epcomm soak: rank 0's time by phase: "
        + ", ".join(f"{name} {value:.1f} s" for name, value in phases.items())
    )
    return 0 if total == 0 else 1


def main() -> None:
    """``python -m epcomm soak``: exits with ``run()``'s code."""
    sys.exit(run())
