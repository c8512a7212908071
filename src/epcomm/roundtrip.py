"""``python -m epcomm``: an end-to-end, self-checking MoE round trip.

The job starts N local processes with ``epcomm.testing.parallel_launch`` (``--dist-backend``: NCCL on
GPUs, gloo on CPU), builds a DeepSeek-V3-shaped batch on every rank (routing by
``epcomm.testing.make_routing``) and sends it through the library's two modes (``--mode``: both by
default) with one ``Buffer`` (``--transport``: epcomm's reference or NVLink backend):

* normal mode: ``get_dispatch_layout`` -> ``dispatch`` -> stand-in experts -> ``combine``;
* low-latency mode: ``low_latency_dispatch`` -> stand-in experts -> ``low_latency_combine``.

The stand-in expert ``e`` multiplies its rows by ``1 + e / num_experts``, so the whole MoE layer has a closed
form every rank computes for its own tokens without communication: ``y[t] = sum_k w[t, k] * (1 +
topk_idx[t, k] / num_experts) * x[t]`` over the entries with ``topk_idx != -1``. Every batch is a pure
function of ``(seed, rank)``, so each rank also rebuilds its peers' batches and checks what it received
row by row. Rank 0 prints progress as it goes (start-up, the ``Buffer``, each mode, its checked first
iteration, and any iteration ``--progress-interval`` seconds after the last line). Rank reports are
gathered by the launching process, which prints one table (the slowest rank's time per phase) and exits
with 0 only when every check passed on every rank. Before starting any process it refuses, in one
``argparse`` error line (exit code 2), every combination this machine or the selected modes cannot run:
the NVLink transport or NCCL without a GPU per process, a ``--hidden`` that a selected mode cannot move.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TypeVar

import torch
import torch.distributed as dist

from epcomm import _cli
from epcomm._cli import PROGRESS_INTERVAL_S, Progress, format_seconds
from epcomm._version import __version__
from epcomm.backends.nvlink.symmetric_buffer import MAX_EXPERTS, MAX_LOW_LATENCY_TOPK
from epcomm.buffer import Buffer
from epcomm.handles import LowLatencyHandle
from epcomm.quant import FP8_GROUP_SIZE, per_token_cast_back, per_token_cast_to_fp8
from epcomm.testing import ProcessGroupInfo, make_routing, parallel_launch

__all__ = ["CheckResult", "PhaseResult", "RankReport", "RoundtripConfig", "build_parser", "main", "run"]

FP8_TOLERANCE = 0.08
"""Per-token relative error allowed with FP8 dispatch: e4m3 keeps 3 mantissa bits, so rounding moves a value
by at most 16/448 (~0.036) of its 128-channel group's maximum; bf16 roundings add ~0.004 more."""

BF16_TOLERANCE = 0.02
"""Per-token relative error allowed with bf16 dispatch: two or three bf16 roundings (2**-9 each)."""

_ERROR_FLOOR = 0.01
"""A token's error is divided by its own max |expected|, floored at this fraction of the largest token's, so
tokens whose expectation is (near) zero are still checked on a meaningful scale."""

_MASKED_FRACTION = 0.05
"""Fraction of top-k entries set to -1 (no expert), so the ``-1`` paths are exercised too."""

# (hidden, num_experts, num_topk, num_tokens, num_decode_tokens, iters): DeepSeek-V3 on GPU; on CPU scaled
# down so the default 2-process gloo run takes ~10 s on 2 cores.
_GPU_DEFAULTS = (7168, 256, 8, 4096, 128, 20)
_CPU_DEFAULTS = (1024, 64, 8, 256, 32, 5)
_T = TypeVar("_T")


class Phase(str, Enum):
    """The timed steps of the round trip, in order."""

    LAYOUT = "get_dispatch_layout"
    DISPATCH = "dispatch"
    COMBINE = "combine"
    LL_DISPATCH = "low_latency_dispatch"
    LL_COMBINE = "low_latency_combine"


@dataclass(frozen=True)
class RoundtripConfig:
    """Shapes and options of one run (the same on every rank)."""

    hidden: int
    num_experts: int
    num_topk: int
    num_tokens: int
    num_decode_tokens: int
    iters: int
    warmup: int
    seed: int
    use_fp8: bool
    modes: tuple[str, ...]
    """``"normal"`` and/or ``"low-latency"``."""
    transport: str | None
    """epcomm's transport, ``Buffer(backend=...)`` (``--transport``); ``None``: ``EPCOMM_BACKEND``, else auto."""
    progress_interval_s: float = PROGRESS_INTERVAL_S
    """Least seconds between two of rank 0's per-iteration progress lines (0: every iteration)."""


@dataclass(frozen=True)
class CheckResult:
    """One rank's verdict on one phase: ``error`` (a relative error, or a mismatch count) vs ``tolerance``."""

    passed: bool
    error: float
    tolerance: float
    detail: str


@dataclass(frozen=True)
class PhaseResult:
    """One rank's numbers for one phase: median seconds, bytes received per call, the check."""

    phase: Phase
    median_s: float
    recv_bytes: int
    check: CheckResult


@dataclass(frozen=True)
class RankReport:
    """Everything one rank sends back to the launching process."""

    rank: int
    device: str
    transport: str
    phases: tuple[PhaseResult, ...]


@dataclass(frozen=True)
class _Batch:
    x: torch.Tensor  # [num_tokens, hidden] bf16
    topk_idx: torch.Tensor  # [num_tokens, num_topk] int64, -1 = no expert
    topk_weights: torch.Tensor  # [num_tokens, num_topk] float32


def _make_batch(
    cfg: RoundtripConfig, rank: int, num_tokens: int, stream_id: int, device: torch.device
) -> _Batch:
    """The batch of ``rank`` (a pure function of the seed, so peers can rebuild it): random bf16 rows,
    distinct random experts per token with ~5% of entries masked to -1 (``make_routing``), positive
    weights summing to 1 per token. ``stream_id`` tells the normal-mode batch (0) from the decode one (1).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 1_000_003 + rank * 2 + stream_id)
    x = torch.randn(num_tokens, cfg.hidden, generator=gen, device=device).to(torch.bfloat16)
    topk_idx, weights = make_routing(
        num_tokens,
        cfg.num_experts,
        cfg.num_topk,
        seed=cfg.seed * 2 + stream_id,
        rank=rank,
        masked_prob=_MASKED_FRACTION,
        device=device,
    )
    return _Batch(x, topk_idx, weights / weights.sum(dim=1, keepdim=True))


def _expert_scale(global_expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The stand-in expert's factor ``1 + e / num_experts`` (float32)."""
    return 1.0 + global_expert_idx.float() / num_experts


def _token_factor(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, offset: int, num_experts: int
) -> torch.Tensor:
    """``sum_k w[t, k] * scale(topk_idx[t, k] + offset)`` over the entries ``>= 0``: ``[num_tokens]`` float32."""
    terms = topk_weights.float() * _expert_scale(topk_idx + offset, num_experts)
    return torch.where(topk_idx >= 0, terms, torch.zeros_like(terms)).sum(dim=1)


def _expected_output(batch: _Batch, num_experts: int) -> torch.Tensor:
    """The MoE output of a rank's own tokens, computed without communication: ``[num_tokens, hidden]`` float32."""
    return batch.x.float() * _token_factor(batch.topk_idx, batch.topk_weights, 0, num_experts)[:, None]


def _relative_check(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> CheckResult:
    """Per-token max |actual - expected| over that token's max |expected| (floored), max over tokens."""
    if actual.shape != expected.shape:
        return CheckResult(
            False, float("inf"), tolerance, f"shape {list(actual.shape)} != {list(expected.shape)}"
        )
    diff = (actual.float() - expected.float()).abs().amax(dim=1)
    scale = expected.float().abs().amax(dim=1)
    floor = max(scale.max().item() * _ERROR_FLOOR, 1e-30) if scale.numel() else 1.0
    error = (diff / scale.clamp(min=floor)).max().item() if diff.numel() else 0.0
    passed = error <= tolerance  # False for NaN
    return CheckResult(
        passed, error, tolerance, f"rel. err {error:.4f} {'<=' if passed else '>'} {tolerance}"
    )


def _exact_check(
    pairs: Sequence[tuple[str, torch.Tensor | list[int], torch.Tensor | list[int]]],
) -> CheckResult:
    """Bitwise comparison of ``(name, actual, expected)`` pairs; names the first mismatch."""
    for name, actual, expected in pairs:
        a = torch.tensor(actual) if isinstance(actual, list) else actual
        e = torch.tensor(expected) if isinstance(expected, list) else expected
        if a.shape != e.shape:
            return CheckResult(False, float("inf"), 0.0, f"{name}: shape {list(a.shape)} != {list(e.shape)}")
        if a.dtype != e.dtype:
            return CheckResult(False, float("inf"), 0.0, f"{name}: dtype {a.dtype} != {e.dtype}")
        if a.dtype.itemsize == 1 and a.is_floating_point():  # fp8: compare the bytes
            a, e = a.view(torch.uint8), e.view(torch.uint8)
        wrong = (a.cpu() != e.cpu()).nonzero()
        if wrong.numel():
            first = wrong[0].tolist()
            return CheckResult(
                False, float(wrong.size(0)), 0.0, f"{name}: {wrong.size(0)} mismatches, first at {first}"
            )
    return CheckResult(True, 0.0, 0.0, "exact")


def _combine_checks(*checks: CheckResult) -> CheckResult:
    """The first failing check, else the first one."""
    return next((c for c in checks if not c.passed), checks[0])


class _Timer:
    """Times one phase per call: barrier, device sync, ``perf_counter`` around the call, device sync."""

    def __init__(self, pgi: ProcessGroupInfo) -> None:
        self.pgi = pgi
        self.samples: dict[Phase, list[float]] = {}

    def _sync(self) -> None:
        if self.pgi.device.type == "cuda":
            torch.cuda.synchronize(self.pgi.device)

    def __call__(self, phase: Phase, record: bool, fn: Callable[[], _T]) -> _T:
        dist.barrier(group=self.pgi.group)
        self._sync()
        start = time.perf_counter()
        out = fn()
        self._sync()
        if record:
            self.samples.setdefault(phase, []).append(time.perf_counter() - start)
        return out

    def median(self, phase: Phase) -> float:
        return statistics.median(self.samples[phase])


def _first_iteration_verdict(checks: dict[Phase, CheckResult]) -> str:
    """What rank 0's progress line says about the checked first iteration."""
    failed = [(phase, check) for phase, check in checks.items() if not check.passed]
    if not failed:
        return "ok, checked on rank 0"
    phase, check = failed[0]
    return f"FAIL on rank 0: {phase.value}: {check.detail}"


def _normal_round_trip(
    cfg: RoundtripConfig, pgi: ProcessGroupInfo, buffer: Buffer, timer: _Timer, progress: Progress
) -> list[PhaseResult]:
    """Normal mode: layout -> dispatch -> stand-in experts -> combine, checked on the warm-up iteration."""
    rank, num_ranks, device = pgi.rank, pgi.world_size, pgi.device
    num_local_experts = cfg.num_experts // num_ranks
    batches = [_make_batch(cfg, src, cfg.num_tokens, 0, device) for src in range(num_ranks)]
    mine = batches[rank]
    x_in: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = (
        per_token_cast_to_fp8(mine.x) if cfg.use_fp8 else mine.x
    )
    checks: dict[Phase, CheckResult] = {}
    first_output: torch.Tensor | None = None
    recv_rows = 0
    num_iterations = cfg.warmup + cfg.iters
    progress.stage(
        "normal",
        f"{cfg.warmup} warm-up + {cfg.iters} timed iteration(s) of get_dispatch_layout -> dispatch -> "
        f"combine, {cfg.num_tokens} tokens/rank, {'FP8' if cfg.use_fp8 else 'BF16'}; the first is checked",
    )
    started = time.perf_counter()
    for i in range(num_iterations):
        begin = time.perf_counter()
        record = i >= cfg.warmup
        num_per_rank, _, num_per_expert, in_rank, _ = timer(
            Phase.LAYOUT, record, partial(buffer.get_dispatch_layout, mine.topk_idx, cfg.num_experts)
        )
        recv_x, recv_idx, recv_weights, recv_counts, handle, _ = timer(
            Phase.DISPATCH,
            record,
            partial(
                buffer.dispatch,
                x_in,
                num_tokens_per_rank=num_per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=num_per_expert,
                topk_idx=mine.topk_idx,
                topk_weights=mine.topk_weights,
            ),
        )
        assert recv_idx is not None
        assert recv_weights is not None
        assert handle is not None
        rows = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
        factor = _token_factor(recv_idx, recv_weights, rank * num_local_experts, cfg.num_experts)
        expert_out = (rows.float() * factor[:, None]).to(torch.bfloat16)
        combined, _, _ = timer(Phase.COMBINE, record, partial(buffer.combine, expert_out, handle))
        recv_rows = rows.size(0)
        if i == 0:
            first_output = combined.clone()
            checks = _check_normal(
                cfg, rank, num_ranks, batches, x_in, recv_x, recv_idx, recv_weights, recv_counts
            )
            checks[Phase.LAYOUT] = _check_layout(cfg, num_ranks, mine, num_per_rank, num_per_expert, in_rank)
            tolerance = FP8_TOLERANCE if cfg.use_fp8 else BF16_TOLERANCE
            checks[Phase.COMBINE] = _relative_check(
                combined, _expected_output(mine, cfg.num_experts), tolerance
            )
        verdict = _first_iteration_verdict(checks) if i == 0 else "ok"
        progress.iteration("normal", i + 1, num_iterations, time.perf_counter() - begin, verdict, i == 0)
    progress.stage(
        "normal", f"{num_iterations} iterations in {format_seconds(time.perf_counter() - started)}"
    )
    assert first_output is not None
    checks[Phase.COMBINE] = _combine_checks(checks[Phase.COMBINE], _repeat_check(first_output, combined))
    row_bytes = cfg.hidden + cfg.hidden // FP8_GROUP_SIZE * 4 if cfg.use_fp8 else cfg.hidden * 2
    sizes = {
        Phase.LAYOUT: 0,
        Phase.DISPATCH: recv_rows * row_bytes,
        Phase.COMBINE: recv_rows * cfg.hidden * 2,
    }
    return [PhaseResult(p, timer.median(p), sizes[p], checks[p]) for p in sizes]


def _repeat_check(first: torch.Tensor, last: torch.Tensor) -> CheckResult:
    """The last iteration's output must equal the first bitwise (the library is deterministic)."""
    result = _exact_check([("output of the last iteration vs the first", last, first)])
    return result if not result.passed else CheckResult(True, 0.0, 0.0, "")


def _check_layout(
    cfg: RoundtripConfig,
    num_ranks: int,
    mine: _Batch,
    num_per_rank: torch.Tensor,
    num_per_expert: torch.Tensor,
    in_rank: torch.Tensor,
) -> CheckResult:
    """Counts and ``is_token_in_rank`` against a local recount of ``topk_idx``."""
    valid = mine.topk_idx >= 0
    expert_rank = torch.where(valid, mine.topk_idx // (cfg.num_experts // num_ranks), -1)
    expected_in_rank = (expert_rank[:, :, None] == torch.arange(num_ranks, device=in_rank.device)).any(dim=1)
    expected_per_expert = torch.bincount(mine.topk_idx[valid], minlength=cfg.num_experts).to(torch.int32)
    return _exact_check(
        [
            ("is_token_in_rank", in_rank, expected_in_rank),
            ("num_tokens_per_rank", num_per_rank, expected_in_rank.sum(dim=0).to(torch.int32)),
            ("num_tokens_per_expert", num_per_expert, expected_per_expert),
        ]
    )


def _check_normal(
    cfg: RoundtripConfig,
    rank: int,
    num_ranks: int,
    batches: list[_Batch],
    x_in: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    recv_idx: torch.Tensor,
    recv_weights: torch.Tensor,
    recv_counts: list[int] | None,
) -> dict[Phase, CheckResult]:
    """Dispatch only moves data: the received rows (ordered by source rank, then token) must be exact."""
    num_local_experts = cfg.num_experts // num_ranks
    rows, scales, idx, weights = [], [], [], []
    for batch in batches:
        local = (batch.topk_idx >= 0) & (batch.topk_idx // num_local_experts == rank)
        sent = local.any(dim=1)
        src_x = per_token_cast_to_fp8(batch.x) if isinstance(x_in, tuple) else (batch.x, batch.x)
        rows.append(src_x[0][sent])
        scales.append(src_x[1][sent])
        idx.append(torch.where(local, batch.topk_idx - rank * num_local_experts, -1)[sent])
        weights.append(torch.where(local, batch.topk_weights, 0.0)[sent])
    expected_idx = torch.cat(idx)
    expected_counts = [int((expected_idx == e).sum().item()) for e in range(num_local_experts)]
    pairs: list[tuple[str, torch.Tensor | list[int], torch.Tensor | list[int]]] = []
    if isinstance(recv_x, tuple):
        pairs += [
            ("recv_x[0] (fp8)", recv_x[0], torch.cat(rows)),
            ("recv_x[1] (scales)", recv_x[1], torch.cat(scales)),
        ]
    else:
        pairs.append(("recv_x", recv_x, torch.cat(rows)))
    pairs += [
        ("recv_topk_idx", recv_idx, expected_idx),
        ("recv_topk_weights", recv_weights, torch.cat(weights)),
        ("num_recv_tokens_per_expert_list", list(recv_counts or []), expected_counts),
    ]
    return {Phase.DISPATCH: _exact_check(pairs)}


def _low_latency_round_trip(
    cfg: RoundtripConfig, pgi: ProcessGroupInfo, buffer: Buffer, timer: _Timer, progress: Progress
) -> list[PhaseResult]:
    """Low-latency mode: dispatch (FP8 by default) -> per-expert stand-in -> weighted combine."""
    rank, num_ranks, device = pgi.rank, pgi.world_size, pgi.device
    num_local_experts = cfg.num_experts // num_ranks
    capacity = cfg.num_decode_tokens
    batches = [_make_batch(cfg, src, capacity, 1, device) for src in range(num_ranks)]
    mine = batches[rank]
    local_ids = torch.arange(num_local_experts, device=device) + rank * num_local_experts
    local_scale = _expert_scale(local_ids, cfg.num_experts)[:, None, None]
    buffer.clean_low_latency_buffer(capacity, cfg.hidden, cfg.num_experts)
    checks: dict[Phase, CheckResult] = {}
    first_output: torch.Tensor | None = None
    num_received = 0
    num_iterations = cfg.warmup + cfg.iters
    progress.stage(
        "low-latency",
        f"{cfg.warmup} warm-up + {cfg.iters} timed iteration(s) of low_latency_dispatch -> "
        f"low_latency_combine, {capacity} tokens/rank, {'FP8' if cfg.use_fp8 else 'BF16'}; the first is checked",
    )
    started = time.perf_counter()
    for i in range(num_iterations):
        begin = time.perf_counter()
        record = i >= cfg.warmup
        recv_x, recv_count, handle, _, _ = timer(
            Phase.LL_DISPATCH,
            record,
            partial(
                buffer.low_latency_dispatch,
                mine.x,
                mine.topk_idx,
                capacity,
                cfg.num_experts,
                use_fp8=cfg.use_fp8,
            ),
        )
        rows = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
        expert_out = (rows.float() * local_scale).to(torch.bfloat16)
        combined, _, _ = timer(
            Phase.LL_COMBINE,
            record,
            partial(buffer.low_latency_combine, expert_out, mine.topk_idx, mine.topk_weights, handle),
        )
        num_received = int(recv_count.sum().item())
        if i == 0:
            first_output = combined.clone()
            checks[Phase.LL_DISPATCH] = _check_low_latency_dispatch(
                cfg, rank, batches, rows, recv_count, handle
            )
            tolerance = FP8_TOLERANCE if cfg.use_fp8 else BF16_TOLERANCE
            expected = _expected_output(mine, cfg.num_experts)
            checks[Phase.LL_COMBINE] = _relative_check(combined, expected, tolerance)
        verdict = _first_iteration_verdict(checks) if i == 0 else "ok"
        progress.iteration("low-latency", i + 1, num_iterations, time.perf_counter() - begin, verdict, i == 0)
    progress.stage(
        "low-latency", f"{num_iterations} iterations in {format_seconds(time.perf_counter() - started)}"
    )
    assert first_output is not None
    checks[Phase.LL_COMBINE] = _combine_checks(
        checks[Phase.LL_COMBINE], _repeat_check(first_output, combined)
    )
    row_bytes = cfg.hidden + cfg.hidden // FP8_GROUP_SIZE * 4 if cfg.use_fp8 else cfg.hidden * 2
    sizes = {Phase.LL_DISPATCH: num_received * row_bytes, Phase.LL_COMBINE: num_received * cfg.hidden * 2}
    return [PhaseResult(p, timer.median(p), sizes[p], checks[p]) for p in sizes]


def _check_low_latency_dispatch(
    cfg: RoundtripConfig,
    rank: int,
    batches: list[_Batch],
    rows: torch.Tensor,
    recv_count: torch.Tensor,
    handle: LowLatencyHandle,
) -> CheckResult:
    """Every (source rank, token) routed to a local expert arrives exactly once, where the handle says
    (``recv_layout_range`` / ``recv_src_info``), and its row matches the source's (FP8: within tolerance)."""
    num_ranks, capacity = len(batches), cfg.num_decode_tokens
    num_local_experts = cfg.num_experts // num_ranks
    all_idx = torch.stack([b.topk_idx for b in batches])  # [num_ranks, capacity, num_topk]
    local_ids = torch.arange(num_local_experts, device=rows.device) + rank * num_local_experts
    routed = (all_idx[:, :, :, None] == local_ids).any(dim=2)  # [num_ranks, capacity, num_local_experts]
    count_check = _exact_check([("recv_count", recv_count, routed.sum(dim=(0, 1)).to(torch.int32))])
    if not count_check.passed:
        return count_check
    row_idx = torch.arange(num_ranks * capacity, device=rows.device)
    src_rank = torch.full((num_local_experts, num_ranks * capacity), -1, device=rows.device)
    for source in range(num_ranks):
        begin = (handle.recv_layout_range[:, source] >> 32)[:, None]
        count = (handle.recv_layout_range[:, source] & 0xFFFFFFFF)[:, None]
        src_rank = torch.where((row_idx >= begin) & (row_idx < begin + count), source, src_rank)
    valid = row_idx[None, :] < recv_count[:, None].long()
    expert, slot = valid.nonzero(as_tuple=True)
    src, token = src_rank[expert, slot], handle.recv_src_info[expert, slot].long()
    if bool((src < 0).any()) or bool((token < 0).any()) or bool((token >= capacity).any()):
        return CheckResult(False, float("inf"), 0.0, "a received row has no valid source in the handle")
    keys = (expert * num_ranks + src) * capacity + token
    if keys.unique().numel() != keys.numel() or not bool(routed[src, token, expert].all()):
        return CheckResult(False, float("inf"), 0.0, "received (source, token) pairs differ from the routing")
    expected = torch.stack([b.x for b in batches])[src, token]
    if cfg.use_fp8:
        return _relative_check(rows[expert, slot], expected.float(), FP8_TOLERANCE)
    return _exact_check([("recv_x rows", rows[expert, slot], expected)])


def _worker(pgi: ProcessGroupInfo, cfg: RoundtripConfig, launched_at: float) -> RankReport:
    """One rank's job: build the buffer, run the selected modes, return the per-phase results.

    ``launched_at`` is the launching process's ``time.time()`` when it started the ranks; rank 0
    prints progress lines from there on (``Progress``).
    """
    progress = Progress(pgi.rank == 0, cfg.progress_interval_s)
    dist.barrier(group=pgi.group)
    progress.stage(
        "setup",
        f"{pgi.world_size} processes up in {format_seconds(time.time() - launched_at)} "
        f"(torch.distributed {pgi.backend}, rank 0 on {pgi.device})",
    )
    hidden_bytes = cfg.hidden * 2
    num_nvl_bytes = max(
        config.get_nvl_buffer_size_hint(hidden_bytes, pgi.world_size)
        for config in (Buffer.get_dispatch_config(pgi.world_size), Buffer.get_combine_config(pgi.world_size))
    )
    low_latency_mode = "low-latency" in cfg.modes
    num_rdma_bytes = (
        Buffer.get_low_latency_rdma_size_hint(
            cfg.num_decode_tokens, cfg.hidden, pgi.world_size, cfg.num_experts
        )
        if low_latency_mode
        else 0
    )
    timer = _Timer(pgi)
    phases: list[PhaseResult] = []
    begin = time.perf_counter()
    with Buffer(
        pgi.group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=low_latency_mode, backend=cfg.transport
    ) as buffer:
        progress.stage(
            "setup",
            f"Buffer ready in {format_seconds(time.perf_counter() - begin)}: transport {buffer.backend_name}",
        )
        if "normal" in cfg.modes:
            phases += _normal_round_trip(cfg, pgi, buffer, timer, progress)
        if low_latency_mode:
            phases += _low_latency_round_trip(cfg, pgi, buffer, timer, progress)
        transport = buffer.backend_name
        dist.barrier(group=pgi.group)
    name = torch.cuda.get_device_name(pgi.device) if pgi.device.type == "cuda" else "cpu"
    return RankReport(
        pgi.rank, f"{pgi.device} ({name})" if name != "cpu" else "cpu", transport, tuple(phases)
    )


# ---- command line ------------------------------------------------------------------------------------------

_DIST_BACKEND_HELP = (
    "torch.distributed backend of the spawned processes (how they rendezvous and what the reference "
    "transport sends over; not epcomm's transport: see --transport); auto: nccl with one GPU per "
    "process, else gloo on CPU (default: auto)"
)
_TRANSPORT_HELP = (
    "epcomm's transport, Buffer(backend=...): reference (torch.distributed point-to-point over "
    "--dist-backend, any device), nvlink (Triton kernels over NVLink symmetric memory, GPUs of one "
    "node), auto (picked from the devices) (default: EPCOMM_BACKEND, else auto)"
)
_DIST_BACKENDS = ("auto", "gloo", "nccl")
_TRANSPORTS = ("auto", "reference", "nvlink")


class _DeprecatedDistBackend(argparse.Action):
    """``--backend``, the old name of ``--dist-backend``: still accepted, with a note on stderr."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: --backend is deprecated: it sets the torch.distributed backend, now "
            "--dist-backend (epcomm's transport is --transport)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


_FP8_HELP = "dispatch FP8 e4m3 with per-token x 128-channel scales in both modes, else bf16 (default: --fp8)"
_INT_KNOBS: tuple[tuple[str, int | None, str], ...] = (
    ("--num-processes", None, "ranks to spawn (default: the CUDA device count if >= 2, else 2)"),
    (
        "--hidden",
        None,
        "hidden size (default: 7168 on GPU / 1024 on CPU); low-latency mode and FP8 need a multiple of 128, "
        "the nvlink transport's normal mode a multiple of 8 (BF16) or 512 (FP8); normal mode in BF16 on "
        "the reference transport takes any size",
    ),
    ("--num-experts", None, "total experts, a multiple of --num-processes (default: 256 GPU / 64 CPU)"),
    ("--num-topk", None, "experts per token (default: 8)"),
    ("--num-tokens", None, "normal-mode (prefill) tokens per rank (default: 4096 GPU / 256 CPU)"),
    (
        "--num-decode-tokens",
        None,
        "low-latency (decode) tokens per rank = capacity (default: 128 GPU / 32 CPU)",
    ),
    ("--iters", None, "timed iterations, the median is reported (default: 20 GPU / 5 CPU)"),
    ("--warmup", 1, "untimed iterations first; the first iteration is always checked (default: 1)"),
    ("--seed", 0, "seed of the per-rank batches (default: 0)"),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``python -m epcomm`` (every knob documented in ``--help``).

    Two backends, two flags: ``--dist-backend`` (gloo / nccl) is the ``torch.distributed`` backend of
    the spawned processes; ``--transport`` (reference / nvlink) is epcomm's, ``Buffer(backend=...)``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="python -m epcomm",
        description=(
            "Self-checking MoE round trip through epcomm. Spawns N local processes, builds a "
            "DeepSeek-V3-shaped batch on each rank and runs it through normal mode (get_dispatch_layout -> "
            "dispatch -> stand-in experts -> combine) and low-latency mode (low_latency_dispatch -> stand-in "
            "experts -> low_latency_combine) on one Buffer. Stand-in expert e scales its rows by "
            "1 + e/num_experts, so each rank checks its MoE output against sum_k w[t,k] * (1 + "
            "topk_idx[t,k]/num_experts) * x[t], computed locally; layout and dispatch results are checked "
            "exactly against batches rebuilt from the seed. Rank 0 prints progress as it goes (start-up, "
            "Buffer, each mode and its checked first iteration); at the end a table gives per phase the "
            "slowest rank's median time, the bytes each rank receives and the check. Exit code 0: every "
            "check passed on every rank; 1: a check failed; 2: bad arguments, or a combination this machine "
            "cannot run (refused before any process starts); 3: a rank raised or timed out."
        ),
        epilog=(
            "Defaults: on >= 2 CUDA GPUs, one NCCL process per GPU and DeepSeek-V3 shapes (hidden 7168, 256 "
            "experts, top-8, 4096 prefill / 128 decode tokens per rank, 20 iterations); otherwise 2 gloo "
            "processes on CPU with scaled-down shapes (hidden 1024, 64 experts, top-8, 256 / 32 tokens, "
            "5 iterations). Environment: EPCOMM_BACKEND (transport, when --transport is not given), "
            "EPCOMM_TIMEOUT_S (peer-wait timeout)."
        ),
    )
    add = parser.add_argument
    add("--dist-backend", choices=_DIST_BACKENDS, default="auto", help=_DIST_BACKEND_HELP)
    add(
        "--backend",
        dest="dist_backend",
        choices=_DIST_BACKENDS,
        default=argparse.SUPPRESS,
        action=_DeprecatedDistBackend,
        help=argparse.SUPPRESS,
    )
    add("--transport", choices=_TRANSPORTS, default=None, help=_TRANSPORT_HELP)
    add(
        "--mode",
        choices=["all", "normal", "low-latency"],
        default="all",
        help="mode(s) to run: all (normal, then low-latency), normal or low-latency (default: all)",
    )
    for flag, default, text in _INT_KNOBS:
        add(flag, type=int, default=default, help=text)
    add("--fp8", action=argparse.BooleanOptionalAction, default=True, help=_FP8_HELP)
    add("--timeout", type=float, default=300.0, help="seconds the whole job may take (default: 300)")
    add(
        "--progress-interval",
        type=float,
        default=PROGRESS_INTERVAL_S,
        metavar="SECONDS",
        help="rank 0 prints every stage as it starts and an iteration when SECONDS have passed since "
        "its last line, so short runs print only their stages (0: every iteration; default: "
        f"{PROGRESS_INTERVAL_S:g})",
    )
    return parser


def _hidden_error(hidden: int, modes: Sequence[str], use_fp8: bool, nvlink: str | None) -> str | None:
    """Why the selected modes cannot run ``hidden`` channels, or ``None`` when they can.

    Low-latency mode needs a multiple of 128 (BF16 or FP8); normal mode's FP8 dispatch too (one
    scale per 128 channels); its BF16 dispatch takes any size on the reference transport. The NVLink
    transport moves normal-mode rows as whole 16-byte words: BF16 a multiple of 8, FP8 of 512
    (``hidden / 128`` float32 scales). ``nvlink``: how to name the NVLink transport when it runs.
    """
    if hidden <= 0:
        return f"--hidden must be positive; got {hidden}"
    needs: list[str] = []
    if "low-latency" in modes and hidden % FP8_GROUP_SIZE:
        needs.append(f"low-latency mode needs a multiple of {FP8_GROUP_SIZE}")
    if "normal" in modes and use_fp8:
        if hidden % FP8_GROUP_SIZE:
            needs.append(
                f"normal mode with FP8 (--fp8, the default) needs a multiple of {FP8_GROUP_SIZE}, one scale "
                f"per {FP8_GROUP_SIZE} channels"
            )
        elif nvlink is not None and hidden % (4 * FP8_GROUP_SIZE):
            needs.append(
                f"normal mode with FP8 on {nvlink} needs a multiple of {4 * FP8_GROUP_SIZE}: it moves "
                "rows of whole 16-byte words, scales too"
            )
    if "normal" in modes and not use_fp8 and nvlink is not None and hidden % 8:
        needs.append(
            f"normal mode with BF16 on {nvlink} needs a multiple of 8: it moves rows of whole 16-byte words"
        )
    if not needs:
        return None
    return (
        f"--hidden {hidden}: "
        + "; ".join(needs)
        + " (--mode normal --no-fp8 takes any size on --transport reference)"
    )


def _resolve(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[int, _cli.Placement, RoundtripConfig]:
    """Fill the device-dependent defaults and refuse every combination that cannot run, before any
    process starts: ``parser.error`` (one line, exit code 2)."""
    num_gpus = _cli.cuda_device_count()
    num_processes = (
        args.num_processes if args.num_processes is not None else (num_gpus if num_gpus >= 2 else 2)
    )
    placement = _cli.resolve_placement(
        parser,
        num_processes=num_processes,
        dist_backend=args.dist_backend,
        transport=args.transport,
        num_gpus=num_gpus,
    )
    dist_backend = placement.dist_backend
    nvlink: str | None = None
    if placement.uses_nvlink:
        nvlink = (
            "the nvlink transport (--transport auto picks it with one GPU per process)"
            if placement.transport == "auto"
            else f"the nvlink transport ({placement.transport_source})"
        )
    defaults = _GPU_DEFAULTS if dist_backend == "nccl" else _CPU_DEFAULTS
    given = (
        args.hidden,
        args.num_experts,
        args.num_topk,
        args.num_tokens,
        args.num_decode_tokens,
        args.iters,
    )
    hidden, num_experts, num_topk, num_tokens, num_decode_tokens, iters = (
        d if v is None else v for v, d in zip(given, defaults)
    )
    modes = ("normal", "low-latency") if args.mode == "all" else (args.mode,)
    hidden_error = _hidden_error(hidden, modes, args.fp8, nvlink)
    if hidden_error is not None:
        parser.error(hidden_error)
    if num_experts <= 0 or num_experts % num_processes != 0:
        parser.error(
            f"--num-experts must be a positive multiple of --num-processes={num_processes}; got {num_experts}"
        )
    if "normal" in modes and nvlink is not None and num_experts > MAX_EXPERTS:
        parser.error(f"--num-experts {num_experts}: normal mode on {nvlink} takes at most {MAX_EXPERTS}")
    if not 1 <= num_topk <= num_experts:
        parser.error(f"--num-topk must be in [1, num_experts={num_experts}]; got {num_topk}")
    if "low-latency" in modes and num_topk > MAX_LOW_LATENCY_TOPK:
        parser.error(
            f"--num-topk {num_topk}: low-latency mode takes at most {MAX_LOW_LATENCY_TOPK} (--mode normal "
            "takes more)"
        )
    for flag, value, minimum in (
        ("--num-tokens", num_tokens, 1),
        ("--num-decode-tokens", num_decode_tokens, 1),
        ("--iters", iters, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}; got {value}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0; got {args.timeout}")
    if not args.progress_interval >= 0:
        parser.error(f"--progress-interval must be >= 0; got {args.progress_interval}")
    cfg = RoundtripConfig(
        hidden,
        num_experts,
        num_topk,
        num_tokens,
        num_decode_tokens,
        iters,
        args.warmup,
        args.seed,
        args.fp8,
        modes,
        args.transport,
        args.progress_interval,
    )
    return num_processes, placement, cfg


def _format_bytes(num_bytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B" if num_bytes else "-"


def format_report(reports: Sequence[RankReport], dist_backend: str, cfg: RoundtripConfig) -> tuple[str, bool]:
    """The printed table: per phase, the slowest rank's median time, the largest per-rank received bytes,
    the slowest rank's bandwidth and the check (PASS only if it passed on every rank; worst error shown).

    Arguments:
        reports: one report per rank, rank order (each with the same phases, in the same order).
        dist_backend: the ``torch.distributed`` backend the ranks ran on (``"gloo"`` or ``"nccl"``).
        cfg: the run's shapes and options.

    Returns:
        The text and whether every check passed on every rank.
    """
    num_ranks = len(reports)
    dtype = "FP8 e4m3 + scales" if cfg.use_fp8 else "bf16"
    lines = [
        f"epcomm {__version__} round trip | transport: {reports[0].transport} | torch.distributed: {dist_backend} | "
        f"world size: {num_ranks} | device: {reports[0].device}",
        f"  normal mode : {cfg.num_tokens} tokens/rank x hidden {cfg.hidden}, {cfg.num_experts} experts "
        f"({cfg.num_experts // num_ranks}/rank), top-{cfg.num_topk}, dispatch in {dtype}",
        f"  low-latency : {cfg.num_decode_tokens} tokens/rank (= capacity) x hidden {cfg.hidden}, same experts, "
        f"dispatch in {dtype}",
        f"  timing      : median of {cfg.iters} iteration(s) after {cfg.warmup} warm-up; time: slowest rank, "
        "recv bytes: largest rank, GB/s: slowest rank's recv bytes / time",
        f"  checks      : layout and dispatch exact (FP8 low-latency rows: rel. err <= {FP8_TOLERANCE}); "
        f"combine vs local MoE, per-token rel. err <= {FP8_TOLERANCE if cfg.use_fp8 else BF16_TOLERANCE}",
        "",
    ]
    header = f"{'phase':<22} {'time (ms)':>10} {'recv bytes/rank':>16} {'GB/s':>8}  check"
    lines += [header, "-" * (len(header) + 40)]
    all_passed = True
    for i, first in enumerate(reports[0].phases):
        per_rank = [r.phases[i] for r in reports]
        time_s = max(p.median_s for p in per_rank)
        num_bytes = max(p.recv_bytes for p in per_rank)
        bandwidth = min(p.recv_bytes / p.median_s / 1e9 if p.median_s > 0 else 0.0 for p in per_rank)
        failed = [(r.rank, p.check) for r, p in zip(reports, per_rank) if not p.check.passed]
        all_passed &= not failed
        if failed:
            rank, check = failed[0]
            verdict = f"FAIL on ranks {[rank for rank, _ in failed]} (rank {rank}: {check.detail})"
        else:
            worst = max((p.check for p in per_rank), key=lambda c: c.error)
            verdict = f"PASS ({worst.detail}{', repeatable' if first.phase in (Phase.COMBINE, Phase.LL_COMBINE) else ''})"
        gbps = f"{bandwidth:.2f}" if num_bytes else "-"
        lines.append(
            f"{first.phase.value:<22} {time_s * 1e3:>10.3f} {_format_bytes(num_bytes):>16} {gbps:>8}  {verdict}"
        )
    num_checks = len(reports[0].phases)
    lines += ["", f"RESULT: {'PASS' if all_passed else 'FAIL'} ({num_checks} checks on {num_ranks} ranks)"]
    return "\n".join(lines), all_passed


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, launch the ranks, print the table.

    Arguments:
        argv: the command-line arguments (``build_parser``'s); ``None``: ``sys.argv[1:]``.

    Returns:
        The exit code: 0 every check passed on every rank, 1 a check failed, 3 a rank raised or timed
        out (bad arguments exit with 2 from ``argparse``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    num_processes, placement, cfg = _resolve(args, parser)
    dist_backend = placement.dist_backend
    print(
        f"epcomm round trip: starting {num_processes} processes (torch.distributed {dist_backend}, "
        f"{'one GPU each' if dist_backend == 'nccl' else 'CPU'}; transport {placement.transport})",
        flush=True,
    )
    try:
        reports: list[RankReport] = parallel_launch(
            num_processes, _worker, cfg, time.time(), backend=dist_backend, timeout_s=float(args.timeout)
        )
    except (RuntimeError, TimeoutError) as exc:
        print(f"epcomm round trip: FAIL: the job did not complete\n{exc}", file=sys.stderr)
        return 3
    text, passed = format_report(reports, dist_backend, cfg)
    print(f"\n{text}", flush=True)
    return 0 if passed else 1


def main() -> None:
    """``python -m epcomm``: exits with ``run()``'s code."""
    sys.exit(run())
