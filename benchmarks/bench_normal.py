"""Normal-mode (prefill / training) benchmark: dispatch BF16, dispatch FP8, combine BF16.

One process per GPU (NCCL, ``epcomm.testing.parallel_launch``). Every rank builds one epcomm
``Buffer`` per backend under test (default ``nvlink``) plus a ``reference`` Buffer on the same group,
and measures, for every setting and every ``num_sms`` of the sweep (``Config(num_sms, 6, 256, 6,
128)``): ``get_dispatch_layout`` (alone), ``dispatch`` of BF16 rows and of FP8 rows (layout
precomputed, ``topk_idx``/``topk_weights`` sent along), and ``combine`` of the BF16 dispatch's rows
(with its handle). The baselines run in the same process and run: the reference backend (NCCL
point-to-point) and the "user path" (``all_to_all_single`` + ``index_select`` / ``index_add_``,
see ``baseline.py``). Before timing, every backend is checked against the reference (dispatch bitwise,
combine allclose): PASS/FAIL per setting.

Timing: per iteration an L2 flush, a host barrier, then a
device barrier (an NCCL ``all_reduce`` of one int32 on the run's group, enqueued without the host
waiting, so the start event fires only once every rank's stream reached it: the ranks' skew in
leaving the host barrier is not timed), CUDA events around the one call (host work inside it, such
as dispatch's CPU read of the counts, is still timed), inputs rotated among ``--num-inputs``
preallocated sets that are refilled with fresh random data after use; the median per rank, then
the max over ranks. Every backend and baseline is timed this same way. On CPU (gloo) there is no
device barrier: wall clock after the host barrier.

Three times per measurement on GPUs. ``us`` (JSON ``time_us``) is end to end: CUDA events around one
cold call, so host launch work and the CPU sync inside it count and nothing is overlapped. ``b2b
us`` (``b2b_time_us``) is DeepEP's ``bench`` method, the one its published times come from: after
one host and one device barrier, ``--iters`` calls back to back with CUDA events around each (the
host enqueues ahead while the device works, except where the call itself synchronizes, as
dispatch's count read does), inputs rotated, first call dropped; median per rank, max over ranks.
``GPU
us`` (``gpu_time_us``) is device time, measured as DeepEP's tests do (``bench_kineto``): after the
timed loop, ``--gpu-iters`` more iterations of the same protocol run under ``torch.profiler`` (CPU +
CUDA activity) with a ``record_function`` range around the call, and each iteration's time is the
device's busy time for the GPU activities (kernels, memcpy, memset) launched inside that range: the
union of their intervals (the sum of their durations when they run one after another; a copy
engine working beside a kernel counts once), told apart from the L2 flush, the device barrier and
the input refresh by CUPTI correlation, not by kernel names (``device_time.gpu_activity_us``); host gaps
are not counted. Median per rank, max over
ranks. Compare with DeepEP's published kernel times using ``GPU us``. A profiler that fails
(CUPTI unavailable, ...) leaves ``GPU us`` empty with a warning; after 3 failed measurements in a
row the profiled loop is skipped for the rest of the run.

Without CUDA (or with ``--cpu``) it runs on gloo with 2 processes, a tiny shape and only the
reference and user-path backends: a smoke test of the harness itself.

    python benchmarks/bench_normal.py --help
    python benchmarks/bench_normal.py --quick                     # seconds; works on CPU too
    python benchmarks/bench_normal.py --plot results/normal.png   # all GPUs

Rows are appended to ``results/bench_normal.jsonl`` (``$OUT/bench_normal.jsonl`` when ``OUT`` is set;
``--out`` names another file).
"""

# ruff: noqa: E402  (imports follow the sys.path set-up below, so a checkout runs without installing)
from __future__ import annotations

import argparse
import math
import os
import sys
import time
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

from baseline import UserHandle, user_combine, user_dispatch, user_dispatch_cached
from device_time import profile_op
from epcomm import Buffer, Config
from epcomm.quant import per_token_cast_to_fp8
from epcomm.testing import ProcessGroupInfo, make_routing, parallel_launch
from report import (
    BASELINE_BACKENDS,
    Progress,
    ResultRow,
    append_jsonl,
    best_baseline_us,
    environment_info,
    format_table,
    make_progress,
    plot_rows,
    results_path,
)
from shapes import SETTINGS, Setting, payload_bytes
from timing import maybe_nvtx, median, time_back_to_back, time_op

OPS = (
    "layout",
    "dispatch_bf16",
    "dispatch_fp8",
    "combine_bf16",
    "dispatch_bf16_cached",
    "dispatch_fp8_cached",
)
DEFAULT_OPS = ("layout", "dispatch_bf16", "dispatch_fp8", "combine_bf16")
DEFAULT_SMS = (8, 16, 24, 32)
QUICK_SMS = (8, 24)
CPU_SMS = (24,)
MIN_INPUT_SETS = 3
GPU_FAILURES_BEFORE_GIVING_UP = 3
"""Consecutive measurements whose device time could not be measured before the profiled loop stops."""
COMBINE_RTOL = 1e-2
COMBINE_ATOL_OF_MAX = 1e-2
"""Combine check: |ours - reference| <= atol + rtol |reference| with atol = 1% of max |reference|
(the user path sums in bf16 with ``index_add_``, so it rounds once per added row)."""


@dataclass(frozen=True)
class BenchSpec:
    """Everything a rank needs (the same on every rank)."""

    settings: tuple[Setting, ...]
    backends: tuple[str, ...]
    """epcomm Buffer backends under test; each is measured at every ``sms`` value."""
    baselines: tuple[str, ...]
    """Backends measured once (no SM sweep): ``reference`` and/or ``user`` not already under test."""
    ops: tuple[str, ...]
    sms: tuple[int, ...]
    warmup: int
    iters: int
    gpu_iters: int
    """Profiled iterations per measurement for ``GPU us`` (0: not measured; CPU: always 0)."""
    num_inputs: int
    seed: int
    num_masked: int
    flush_l2_bytes: int
    nvl_bytes: int
    check: bool
    out: str | None
    env: dict[str, Any]
    use_tqdm: bool
    nvtx: bool

    def num_measurements(self) -> int:
        """Measurements per setting (for the progress bar)."""
        count = 0
        for op in self.ops:
            count += len(self.backends) * (1 if op == "layout" else len(self.sms))
            count += sum(1 for b in self.baselines if not (op == "layout" and b == "user"))
        return count


# ---- per-rank state of one setting ------------------------------------------------------------------


@dataclass
class _Layout:
    num_tokens_per_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor

    def kwargs(self) -> dict[str, Any]:
        return {
            "num_tokens_per_rank": self.num_tokens_per_rank,
            "is_token_in_rank": self.is_token_in_rank,
            "num_tokens_per_expert": self.num_tokens_per_expert,
        }


@dataclass
class _SettingState:
    setting: Setting
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    x_sets: list[torch.Tensor]
    fp8_sets: list[tuple[torch.Tensor, torch.Tensor]]
    y_sets: list[torch.Tensor]
    layouts: dict[str, _Layout]
    handles: dict[str, Any]
    num_recv: int
    num_local: int
    gen: torch.Generator

    def rand(self, rows: int) -> torch.Tensor:
        device = self.topk_idx.device
        return torch.randn(rows, self.setting.hidden, generator=self.gen, device=device).to(torch.bfloat16)


def _bitwise_equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (
            isinstance(a, tuple)
            and isinstance(b, tuple)
            and len(a) == len(b)
            and all(_bitwise_equal(x, y) for x, y in zip(a, b))
        )
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same dtype, shape and values (``-0.0 == 0.0``)."""
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def _combine_close(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    if got.shape != want.shape or got.dtype != want.dtype:
        return False, math.inf
    g, w = got.float(), want.float()
    diff = float((g - w).abs().max()) if g.numel() else 0.0
    atol = COMBINE_ATOL_OF_MAX * (float(w.abs().max()) if w.numel() else 0.0)
    return bool(torch.allclose(g, w, rtol=COMBINE_RTOL, atol=atol)), diff


class _Rank:
    """One rank's benchmark: buffers, the host group, gathers, and (on rank 0) the reports."""

    def __init__(self, pgi: ProcessGroupInfo, spec: BenchSpec) -> None:
        self.pgi = pgi
        self.spec = spec
        self.rank = pgi.rank
        self.world = pgi.world_size
        self.device = pgi.device
        self.cuda = pgi.device.type == "cuda"
        if self.cuda:  # the GPU model, for the tables and the JSON rows (this rank's copy of the spec)
            spec.env["gpu"] = torch.cuda.get_device_name(pgi.device)
        # Barriers and result gathers on a gloo group: pure host synchronization, no GPU work.
        self.host_group = dist.new_group(backend="gloo") if pgi.backend != "gloo" else pgi.group
        # The device barrier before each timed call: one int32 all-reduced on the run's NCCL group.
        self._sync_tensor: torch.Tensor | None = None
        if self.cuda:
            self._sync_tensor = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.buffers: dict[str, Buffer] = {}
        for name in dict.fromkeys(("reference", *spec.backends)):
            nvl = spec.nvl_bytes if name != "reference" else 0
            self.buffers[name] = Buffer(pgi.group, num_nvl_bytes=nvl, backend=name)
        self.flush: torch.Tensor | None = None
        if self.cuda and spec.flush_l2_bytes > 0:
            self.flush = torch.empty(spec.flush_l2_bytes // 4, dtype=torch.int32, device=self.device)
        total = spec.num_measurements() * len(spec.settings)
        self.progress: Progress = make_progress(total, enabled=self.rank == 0, use_tqdm=spec.use_tqdm)
        self.failed = False
        # Device time (GPU us): on while the profiler works; the same decision on every rank (it is
        # taken from gathered results), so the profiled loop's barriers always match.
        self.gpu_enabled = self.cuda and spec.gpu_iters > 0
        self._gpu_failures = 0
        self._gpu_notes: set[str] = set()

    # ---- collectives on the host group ----
    def barrier(self) -> None:
        dist.barrier(group=self.host_group)

    def device_barrier(self) -> None:
        """All ranks' streams meet here (the host does not wait): an NCCL all-reduce of one int32."""
        assert self._sync_tensor is not None
        dist.all_reduce(self._sync_tensor, group=self.pgi.group)

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def say(self, text: str) -> None:
        if self.rank == 0:
            self.progress.write(text)

    # ---- setup + correctness guard ----
    def prepare(self, setting: Setting) -> _SettingState:
        spec = self.spec
        topk_idx, topk_weights = make_routing(
            setting.num_tokens,
            setting.num_experts,
            setting.num_topk,
            seed=spec.seed,
            rank=self.rank,
            num_masked=spec.num_masked,
            device=self.device,
        )
        gen = torch.Generator(device=self.device).manual_seed(spec.seed * 7919 + 1000 + self.rank)
        state = _SettingState(setting, topk_idx, topk_weights, [], [], [], {}, {}, 0, 0, gen)
        state.x_sets = [state.rand(setting.num_tokens) for _ in range(spec.num_inputs)]
        state.fp8_sets = [
            per_token_cast_to_fp8(state.rand(setting.num_tokens)) for _ in range(spec.num_inputs)
        ]
        for name, buf in self.buffers.items():
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, setting.num_experts)
            state.layouts[name] = _Layout(per_rank, per_expert, in_rank)
        ref_layout = state.layouts["reference"]
        state.num_local = int(ref_layout.num_tokens_per_rank[self.rank])
        recv: Any = self.buffers["reference"].dispatch(
            state.x_sets[0], **ref_layout.kwargs(), topk_idx=topk_idx, topk_weights=topk_weights
        )
        state.num_recv = recv[0].size(0)
        state.handles["reference"] = recv[4]
        state.y_sets = [state.rand(state.num_recv) for _ in range(spec.num_inputs)]
        if self.cuda:
            torch.cuda.synchronize()
        return state

    def check(self, state: _SettingState) -> dict[str, str]:
        """Compare every backend with the reference; return ``backend -> 'PASS' | 'FAIL'`` (all ranks)."""
        spec, s = self.spec, state
        ref = self.buffers["reference"]
        ref_kwargs = s.layouts["reference"].kwargs()
        problems: dict[str, list[str]] = {}
        want: Any = ref.dispatch(s.x_sets[0], **ref_kwargs, topk_idx=s.topk_idx, topk_weights=s.topk_weights)
        want_fp8: Any = ref.dispatch(
            s.fp8_sets[0], **ref_kwargs, topk_idx=s.topk_idx, topk_weights=s.topk_weights
        )
        want_combined = ref.combine(want[0], want[4])[0]
        for name in spec.backends:
            if name == "reference":
                continue
            found: list[str] = []
            problems[name] = found
            buf, layout = self.buffers[name], s.layouts[name]
            try:
                for got_t, want_t, what in (
                    (
                        layout.num_tokens_per_rank,
                        s.layouts["reference"].num_tokens_per_rank,
                        "num_tokens_per_rank",
                    ),
                    (
                        layout.num_tokens_per_expert,
                        s.layouts["reference"].num_tokens_per_expert,
                        "num_tokens_per_expert",
                    ),
                    (layout.is_token_in_rank, s.layouts["reference"].is_token_in_rank, "is_token_in_rank"),
                ):
                    if not _equal(got_t, want_t):
                        found.append(f"layout {what} differs")
                for sms in spec.sms:
                    config = Config(sms, 6, 256, 6, 128)
                    got: Any = buf.dispatch(
                        s.x_sets[0],
                        **layout.kwargs(),
                        topk_idx=s.topk_idx,
                        topk_weights=s.topk_weights,
                        config=config,
                    )
                    if not _bitwise_equal(got[0], want[0]):
                        found.append(f"sms={sms}: dispatch bf16 recv_x differs")
                    for got_t, want_t, what in (
                        (got[1], want[1], "recv_topk_idx"),
                        (got[2], want[2], "recv_topk_weights"),
                        (got[4][0], want[4][0], "handle[0] (rank_prefix_matrix)"),
                    ):
                        if not _equal(got_t, want_t):
                            found.append(f"sms={sms}: dispatch bf16 {what} differs")
                    if list(got[3]) != list(want[3]):
                        found.append(f"sms={sms}: num_recv_tokens_per_expert_list {got[3]} != {want[3]}")
                    got_fp8: Any = buf.dispatch(
                        s.fp8_sets[0],
                        **layout.kwargs(),
                        topk_idx=s.topk_idx,
                        topk_weights=s.topk_weights,
                        config=config,
                    )
                    if not _bitwise_equal(got_fp8[0], want_fp8[0]):
                        found.append(f"sms={sms}: dispatch fp8 recv_x differs")
                    combined = buf.combine(got[0], got[4], config=config)[0]
                    ok, diff = _combine_close(combined, want_combined)
                    if not ok:
                        found.append(f"sms={sms}: combine differs (max abs diff {diff:.4g})")
                    if name not in s.handles:
                        s.handles[name] = got[4]
            except Exception as exc:
                found.append(f"raised {type(exc).__name__}: {exc}")
        if "user" in spec.baselines or "user" in spec.backends:
            found = []
            problems["user"] = found
            layout = s.layouts["reference"]
            try:
                recv, uh = user_dispatch(
                    s.x_sets[0], layout.num_tokens_per_rank, layout.is_token_in_rank, self.pgi.group
                )
                if not _bitwise_equal(recv, want[0]):
                    found.append("dispatch bf16 rows differ")
                recv_fp8, _ = user_dispatch(
                    s.fp8_sets[0], layout.num_tokens_per_rank, layout.is_token_in_rank, self.pgi.group
                )
                if not _bitwise_equal(recv_fp8, want_fp8[0]):
                    found.append("dispatch fp8 rows differ")
                assert isinstance(recv, torch.Tensor)
                ok, diff = _combine_close(user_combine(recv, uh, self.pgi.group), want_combined)
                if not ok:
                    found.append(f"combine differs (max abs diff {diff:.4g})")
                s.handles["user"] = uh
            except Exception as exc:
                found.append(f"raised {type(exc).__name__}: {exc}")
        if self.cuda:
            torch.cuda.synchronize()
        everyone = self.gather(problems)
        status: dict[str, str] = {"reference": "ref"}
        for name in problems:
            messages = [f"rank {r}: {m}" for r, p in enumerate(everyone) for m in p.get(name, [])]
            status[name] = "FAIL" if messages else "PASS"
            if messages:
                self.failed = True
                shown = "; ".join(messages[:6]) + (
                    f"; ... ({len(messages)} problems)" if len(messages) > 6 else ""
                )
                self.say(f"check {s.setting.name} / {name}: FAIL ({shown})")
            else:
                self.say(
                    f"check {s.setting.name} / {name}: PASS (dispatch bitwise = reference, combine allclose)"
                )
        return status

    # ---- measurements ----
    def _op_fn(
        self, state: _SettingState, op: str, backend: str, sms: int | None
    ) -> tuple[Callable[[int], object], Callable[[int], None] | None]:
        s = state
        group = self.pgi.group
        table: dict[str, Callable[[int], object]]
        if backend == "user":
            uh: UserHandle = s.handles["user"]
            layout = s.layouts["reference"]
            ntpr, itir = layout.num_tokens_per_rank, layout.is_token_in_rank
            table = {
                "dispatch_bf16": lambda i: user_dispatch(s.x_sets[i], ntpr, itir, group),
                "dispatch_fp8": lambda i: user_dispatch(s.fp8_sets[i], ntpr, itir, group),
                "dispatch_bf16_cached": lambda i: user_dispatch_cached(s.x_sets[i], uh, group),
                "dispatch_fp8_cached": lambda i: user_dispatch_cached(s.fp8_sets[i], uh, group),
                "combine_bf16": lambda i: user_combine(s.y_sets[i], uh, group),
            }
            fn = table[op]
        else:
            buf = self.buffers[backend]
            config = Config(sms, 6, 256, 6, 128) if sms is not None else None
            kwargs = s.layouts[backend].kwargs()
            handle: Any = s.handles.get(backend)
            topk: dict[str, Any] = {"topk_idx": s.topk_idx, "topk_weights": s.topk_weights}
            num_experts = s.setting.num_experts
            table = {
                "layout": lambda i: buf.get_dispatch_layout(s.topk_idx, num_experts),
                "dispatch_bf16": lambda i: buf.dispatch(s.x_sets[i], **kwargs, **topk, config=config),
                "dispatch_fp8": lambda i: buf.dispatch(s.fp8_sets[i], **kwargs, **topk, config=config),
                "dispatch_bf16_cached": lambda i: buf.dispatch(s.x_sets[i], handle=handle, config=config),
                "dispatch_fp8_cached": lambda i: buf.dispatch(s.fp8_sets[i], handle=handle, config=config),
                "combine_bf16": lambda i: buf.combine(s.y_sets[i], handle, config=config),
            }
            fn = table[op]

        def refresh_x(i: int) -> None:
            s.x_sets[i].normal_(generator=s.gen)

        def refresh_fp8(i: int) -> None:
            s.fp8_sets[i] = per_token_cast_to_fp8(s.rand(s.setting.num_tokens))

        def refresh_y(i: int) -> None:
            s.y_sets[i].normal_(generator=s.gen)

        refresh: Callable[[int], None] | None = None
        if op.startswith("dispatch_bf16"):
            refresh = refresh_x
        elif op.startswith("dispatch_fp8"):
            refresh = refresh_fp8
        elif op.startswith("combine"):
            refresh = refresh_y
        return fn, refresh

    def _bytes(self, state: _SettingState, op: str) -> tuple[int, int]:
        hidden = state.setting.hidden
        if op == "layout":
            return 0, 0
        fp8 = op.startswith("dispatch_fp8")
        logical = payload_bytes(state.num_recv, hidden, fp8)
        remote = payload_bytes(state.num_recv - state.num_local, hidden, fp8)
        return logical, remote

    def measure(self, state: _SettingState, op: str, backend: str, sms: int | None, check: str) -> ResultRow:
        spec = self.spec
        label = f"{state.setting.name} {op} {backend}" + (f" sms={sms}" if sms is not None else "")
        self.progress.set_description(label)
        logical, remote = self._bytes(state, op)
        error: str | None = None
        samples: list[float] = []
        b2b_samples: list[float] = []
        gpu_samples: list[float] | None = None
        gpu_note: str | None = None
        profiled = self.gpu_enabled
        try:
            fn, refresh = self._op_fn(state, op, backend, sms)
            with maybe_nvtx(label, spec.nvtx):
                samples = time_op(
                    fn,
                    num_slots=spec.num_inputs,
                    warmup=spec.warmup,
                    iters=spec.iters,
                    barrier=self.barrier,
                    cuda=self.cuda,
                    refresh=refresh,
                    flush=self.flush,
                    device_barrier=self.device_barrier if self.cuda else None,
                )
                b2b_samples = time_back_to_back(
                    fn,
                    num_slots=spec.num_inputs,
                    iters=spec.iters,
                    barrier=self.barrier,
                    cuda=self.cuda,
                    device_barrier=self.device_barrier if self.cuda else None,
                )
                if profiled:
                    gpu_samples, gpu_note = profile_op(
                        fn,
                        num_slots=spec.num_inputs,
                        iters=spec.gpu_iters,
                        barrier=self.barrier,
                        refresh=refresh,
                        flush=self.flush,
                        device_barrier=self.device_barrier,
                    )
        except Exception as exc:
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        gpu_mine = median(gpu_samples) if gpu_samples else None
        b2b_mine = median(b2b_samples) if b2b_samples else None
        mine = (median(samples) if samples else None, logical, remote, error, gpu_mine, gpu_note, b2b_mine)
        everyone = self.gather(mine)
        self.progress.update(1)
        errors = [x[3] for x in everyone if x[3]]
        medians = [x[0] for x in everyone if x[0] is not None]
        mean_logical = sum(x[1] for x in everyone) / self.world
        mean_remote = sum(x[2] for x in everyone) / self.world
        time_us = max(medians) if medians and not errors else None
        gpu_medians = [x[4] for x in everyone if x[4] is not None]
        b2b_medians = [x[6] for x in everyone if x[6] is not None]
        gpu_time_us = max(gpu_medians) if len(gpu_medians) == self.world and not errors else None
        if profiled and not errors:
            self._gpu_outcome(label, gpu_time_us is not None, [x[5] for x in everyone])
        row = ResultRow(
            setting=state.setting.name,
            shape=state.setting.shape(),
            op=op,
            backend=backend,
            num_sms=sms,
            time_us=time_us,
            time_us_median=median(medians) if medians and not errors else None,
            time_us_ranks=[round(m, 3) for m in medians],
            logical_gbps=mean_logical / (time_us * 1e3) if time_us and mean_logical else None,
            nvlink_gbps=mean_remote / (time_us * 1e3) if time_us and mean_logical else None,
            logical_bytes_per_rank=mean_logical,
            nvlink_bytes_per_rank=mean_remote,
            gpu_time_us=gpu_time_us,
            gpu_time_us_ranks=[round(m, 3) for m in gpu_medians],
            b2b_time_us=max(b2b_medians) if len(b2b_medians) == self.world and not errors else None,
            b2b_time_us_ranks=[round(m, 3) for m in b2b_medians],
            check=check,
            error="; ".join(errors) if errors else None,
            extra={
                "iters": spec.iters,
                "warmup": spec.warmup,
                "gpu_iters": spec.gpu_iters if profiled else 0,
                "num_input_sets": spec.num_inputs,
            },
        )
        if errors:
            self.failed = True
        return row

    def _gpu_outcome(self, label: str, ok: bool, notes: Sequence[str | None]) -> None:
        """Warn (rank 0, once per distinct reason) when GPU us is missing; give up after repeats.

        Runs on every rank with the same gathered ``notes``, so all ranks stop profiling together.
        """
        if ok:
            self._gpu_failures = 0
            return
        self._gpu_failures += 1
        reasons = [f"rank {r}: {n}" for r, n in enumerate(notes) if n]
        reason = "; ".join(reasons[:2]) if reasons else "no device time from some rank"
        key = reasons[0].split(": ", 1)[1] if reasons else reason
        if key not in self._gpu_notes:
            self._gpu_notes.add(key)
            self.say(f"warning: GPU us not measured for {label} ({reason})")
        if self._gpu_failures >= GPU_FAILURES_BEFORE_GIVING_UP:
            self.gpu_enabled = False
            self.say(
                f"warning: GPU us failed {self._gpu_failures} measurements in a row; "
                "not profiling the rest of the run (GPU us stays empty)"
            )

    def run_setting(self, setting: Setting) -> list[ResultRow]:
        spec = self.spec
        self.say(f"\n=== setting {setting.name}: {setting.describe()}, EP{self.world} ===")
        state = self.prepare(setting)
        status = self.check(state) if spec.check else {}
        rows: list[ResultRow] = []
        for op in spec.ops:
            for backend in spec.backends:
                check = status.get(backend, "n/a")
                if not spec.check and backend not in state.handles and op != "layout":
                    # No check ran, so no handle exists yet: build one now. (After a check that
                    # raised there is none either: the measurements then fail and say why.)
                    state.handles[backend] = self._first_handle(state, backend)
                for sms in (None,) if op == "layout" else spec.sms:
                    rows.append(self.measure(state, op, backend, sms, check))
            for backend in spec.baselines:
                if op == "layout" and backend == "user":
                    continue
                if backend == "user" and "user" not in state.handles and not spec.check:
                    layout = state.layouts["reference"]
                    _, state.handles["user"] = user_dispatch(
                        state.x_sets[0], layout.num_tokens_per_rank, layout.is_token_in_rank, self.pgi.group
                    )
                rows.append(self.measure(state, op, backend, None, status.get(backend, "n/a")))
        for row in rows:
            best = best_baseline_us(rows, row.op)
            if best is not None and row.time_us:
                row.speedup_vs_best_baseline = best[0] / row.time_us
                row.best_baseline = best[1]
        if self.rank == 0:
            gpu = f", GPU us of {spec.gpu_iters} profiled iters" if self.cuda and spec.gpu_iters else ""
            title = (
                f"--- {setting.name}: {setting.describe()}; EP{self.world}, {spec.env['gpu']}; "
                f"median of {spec.iters} iters per rank{gpu}, max over ranks ---"
            )
            self.progress.write(format_table(rows, title))
            summary = _summary(rows, spec.backends)
            if summary:
                self.progress.write(summary)
            if spec.out:
                append_jsonl(spec.out, [row.to_json(spec.env) for row in rows])
        del state
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return rows

    def _first_handle(self, state: _SettingState, backend: str) -> Any:
        layout = state.layouts[backend]
        out = self.buffers[backend].dispatch(
            state.x_sets[0],
            **layout.kwargs(),
            topk_idx=state.topk_idx,
            topk_weights=state.topk_weights,
            config=Config(self.spec.sms[0], 6, 256, 6, 128),
        )
        return out[4]

    def close(self) -> None:
        self.progress.close()
        for buf in self.buffers.values():
            buf.destroy()


def _summary(rows: Sequence[ResultRow], backends: Sequence[str]) -> str:
    """One line per op: the best SM count of each backend under test vs the best baseline.

    End to end first (``time_us``), then device time (``gpu_time_us``, each side's best row by that
    time) when measured.
    """
    lines = []
    for op in dict.fromkeys(r.op for r in rows):
        best_base = best_baseline_us(rows, op)
        best_base_gpu = best_baseline_us(rows, op, gpu=True)
        for backend in backends:
            if backend in BASELINE_BACKENDS:
                continue
            mine = [r for r in rows if r.op == op and r.backend == backend and r.time_us]
            if not mine:
                continue
            top = min(mine, key=lambda r: r.time_us or math.inf)
            assert top.time_us is not None
            where = f" @ {top.num_sms} SMs" if top.num_sms is not None else ""
            text = f"  {op}: {backend} best {top.time_us:.1f} us{where}"
            if top.logical_gbps:
                gbps = top.logical_gbps
                text += f" ({gbps:.0f} GB/s)" if gbps >= 10 else f" ({gbps:.3g} GB/s)"
            if best_base is not None:
                text += f" vs {best_base[1]} {best_base[0]:.1f} us -> {best_base[0] / top.time_us:.2f}x"
            mine_gpu = [r for r in mine if r.gpu_time_us]
            if mine_gpu:
                top_gpu = min(mine_gpu, key=lambda r: r.gpu_time_us or math.inf)
                assert top_gpu.gpu_time_us is not None
                where = f" @ {top_gpu.num_sms} SMs" if top_gpu.num_sms is not None else ""
                text += f" | GPU us: {top_gpu.gpu_time_us:.1f}{where}"
                if best_base_gpu is not None:
                    ratio = best_base_gpu[0] / top_gpu.gpu_time_us
                    text += f" vs {best_base_gpu[1]} {best_base_gpu[0]:.1f} -> {ratio:.2f}x"
            lines.append(text)
    return "\n".join(lines)


def rank_worker(pgi: ProcessGroupInfo, spec: BenchSpec) -> dict[str, Any] | None:
    """Run every setting on this rank; rank 0 returns the JSON records and whether all passed."""
    bench = _Rank(pgi, spec)
    records: list[dict[str, Any]] = []
    try:
        for setting in spec.settings:
            rows = bench.run_setting(setting)
            records.extend(row.to_json(spec.env) for row in rows)
    finally:
        bench.close()
    if pgi.rank != 0:
        return None
    return {"records": records, "ok": not bench.failed}


# ---- command line -------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="bench_normal.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--num-ranks", type=int, default=None, help="processes (default: all visible GPUs; 2 on CPU)"
    )
    p.add_argument(
        "--settings",
        default=None,
        help=f"comma list of {', '.join(SETTINGS)} or 'custom' (with --shape); "
        "default prefill,small (quick: quick; CPU: tiny)",
    )
    p.add_argument("--shape", default=None, help="custom setting TOKENS,HIDDEN,TOPK,EXPERTS (adds 'custom')")
    p.add_argument(
        "--backends",
        default=None,
        help="epcomm backends under test, swept over --sms (nvlink, reference, auto); default nvlink (CPU: reference)",
    )
    p.add_argument(
        "--baselines",
        default="reference,user",
        help="baselines measured once each: reference (epcomm's NCCL/gloo p2p backend), user "
        "(all_to_all_single path); one also under test is not repeated",
    )
    p.add_argument("--ops", default=",".join(DEFAULT_OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--sms", default=None, help="num_sms sweep (default 8,16,24,32; quick: 8,24; CPU: 24)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations per measurement (default 5; quick 2)"
    )
    p.add_argument(
        "--iters", type=int, default=None, help="timed iterations per measurement (default 20; quick 5)"
    )
    p.add_argument(
        "--gpu-iters",
        type=int,
        default=None,
        help="profiled iterations per measurement for the GPU us column (torch.profiler, DeepEP's "
        "bench_kineto method), after the timed ones (default max(3, iters // 4); 0: off; CPU: off)",
    )
    p.add_argument(
        "--num-inputs", type=int, default=4, help=f"input sets rotated per iteration (>= {MIN_INPUT_SETS})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--masked", type=int, default=0, help="random top-k entries set to -1 per rank (DeepEP's tests: 10)"
    )
    p.add_argument(
        "--flush-l2-mb", type=int, default=256, help="MB overwritten before every iteration on GPUs (0: off)"
    )
    p.add_argument(
        "--nvl-bytes",
        type=int,
        default=0,
        help="num_nvl_bytes of the Buffers under test (0: enough for the largest setting, so it never grows)",
    )
    p.add_argument(
        "--out",
        default=results_path("bench_normal.jsonl"),
        help="JSON-lines file the rows are appended to ('' = none; default: bench_normal.jsonl in $OUT "
        "when set, else in results/ at the repository root)",
    )
    p.add_argument("--overwrite", action="store_true", help="truncate --out first instead of appending")
    p.add_argument("--plot", default=None, help="PNG of logical GB/s vs SMs per op (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="small shapes, few iterations, 2 SM values")
    p.add_argument("--cpu", action="store_true", help="force the CPU fallback (gloo, reference + user path)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness guard")
    p.add_argument("--no-tqdm", action="store_true", help="plain progress lines instead of a tqdm bar")
    p.add_argument("--nvtx", action="store_true", help="NVTX range per measurement (for nsys)")
    p.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds for the whole run before ranks are killed"
    )
    return p


def _settings(args: argparse.Namespace, cpu: bool) -> tuple[Setting, ...]:
    custom: Setting | None = None
    if args.shape:
        parts = [int(v) for v in _csv(args.shape)]
        if len(parts) != 4:
            raise SystemExit(f"--shape must be TOKENS,HIDDEN,TOPK,EXPERTS; got {args.shape!r}")
        custom = Setting("custom", *parts)
    if args.settings:
        names = _csv(args.settings)
    elif custom is not None:
        names = ["custom"]
    else:
        names = ["tiny"] if cpu else (["quick"] if args.quick else ["prefill", "small"])
    out: list[Setting] = []
    for name in names:
        if name == "custom":
            if custom is None:
                raise SystemExit("--settings custom needs --shape TOKENS,HIDDEN,TOPK,EXPERTS")
            out.append(custom)
        elif name in SETTINGS:
            out.append(SETTINGS[name])
        else:
            raise SystemExit(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}, custom")
    if custom is not None and "custom" not in names:
        out.append(custom)
    for s in out:
        if s.hidden % 128 != 0:
            raise SystemExit(
                f"setting {s.name}: hidden must be a multiple of 128 (FP8 scales); got {s.hidden}"
            )
        if s.num_topk > s.num_experts:
            raise SystemExit(f"setting {s.name}: num_topk {s.num_topk} > num_experts {s.num_experts}")
    return tuple(out)


def _auto_nvl_bytes(settings: Sequence[Setting], num_ranks: int) -> int:
    """A symmetric buffer large enough for every setting's worst case (all tokens to one rank)."""
    need = 0
    for s in settings:
        row = s.hidden * 2 + s.hidden // 128 * 4 + s.num_topk * 12 + 64
        need = max(need, s.num_tokens * num_ranks * row)
    return (need + (1 << 20) - 1) // (1 << 20) * (1 << 20)


def make_spec(args: argparse.Namespace) -> tuple[BenchSpec, int, str, list[str]]:
    """Resolve defaults: returns the spec, the number of ranks, the torch.distributed backend, notes."""
    notes: list[str] = []
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # One GPU runs on the GPU only when asked (--num-ranks 1); by default a benchmark needs peers.
    cpu = (
        args.cpu
        or num_gpus < 1
        or (num_gpus < 2 and args.num_ranks is None)
        or (args.num_ranks is not None and args.num_ranks > num_gpus)
    )
    if cpu and not args.cpu:
        notes.append(
            f"CPU fallback: {num_gpus} CUDA device(s) visible"
            + (f", {args.num_ranks} ranks asked" if args.num_ranks else "")
            + "; gloo, reference + user path only"
        )
    num_ranks = args.num_ranks if args.num_ranks is not None else (2 if cpu else num_gpus)
    if num_ranks < 1:  # 1: every row stays local (a one-GPU machine: host path and local copies)
        raise SystemExit(f"--num-ranks must be >= 1; got {num_ranks}")
    backends = _csv(args.backends) if args.backends else (["reference"] if cpu else ["nvlink"])
    if cpu:
        dropped = [b for b in backends if b not in ("reference", "auto")]
        if dropped:
            notes.append(f"CPU fallback: dropped backends {', '.join(dropped)} (they need GPUs)")
        backends = [b for b in backends if b not in dropped] or ["reference"]
    backends = list(dict.fromkeys(backends))
    for b in backends:
        if b not in ("nvlink", "reference", "auto", "nvshmem"):
            raise SystemExit(f"unknown backend {b!r} in --backends (nvlink, reference, auto, nvshmem)")
    baselines = [b for b in dict.fromkeys(_csv(args.baselines)) if b not in backends]
    for b in baselines:
        if b not in BASELINE_BACKENDS:
            raise SystemExit(f"unknown baseline {b!r}; choose from {', '.join(BASELINE_BACKENDS)}")
    ops = _csv(args.ops)
    for op in ops:
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    if args.sms:
        sms = tuple(int(v) for v in _csv(args.sms))
    else:
        sms = CPU_SMS if cpu else (QUICK_SMS if args.quick else DEFAULT_SMS)
    for v in sms:
        if v <= 0 or v % 2:
            raise SystemExit(f"--sms values must be positive and even (Config requires it); got {v}")
    settings = _settings(args, cpu)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick or cpu else 5)
    iters = args.iters if args.iters is not None else (5 if args.quick or cpu else 20)
    if iters < 1 or warmup < 0:
        raise SystemExit("--iters must be >= 1 and --warmup >= 0")
    gpu_iters = args.gpu_iters if args.gpu_iters is not None else max(3, iters // 4)
    if gpu_iters < 0:
        raise SystemExit("--gpu-iters must be >= 0")
    if cpu:
        gpu_iters = 0
    if args.num_inputs < MIN_INPUT_SETS:
        raise SystemExit(
            f"--num-inputs must be >= {MIN_INPUT_SETS} (inputs are rotated so L2 cannot serve them)"
        )
    env = environment_info(num_ranks, "cpu" if cpu else "cuda")
    spec = BenchSpec(
        settings=settings,
        backends=tuple(backends),
        baselines=tuple(baselines),
        ops=tuple(ops),
        sms=sms,
        warmup=warmup,
        iters=iters,
        gpu_iters=gpu_iters,
        num_inputs=args.num_inputs,
        seed=args.seed,
        num_masked=args.masked,
        flush_l2_bytes=0 if cpu else args.flush_l2_mb << 20,
        nvl_bytes=args.nvl_bytes or _auto_nvl_bytes(settings, num_ranks),
        check=not args.no_check,
        out=args.out or None,
        env=env,
        use_tqdm=not args.no_tqdm,
        nvtx=args.nvtx,
    )
    return spec, num_ranks, "gloo" if cpu else "nccl", notes


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run all ranks, write the plot; exit status 1 on a failed check or error."""
    args = build_parser().parse_args(argv)
    spec, num_ranks, dist_backend, notes = make_spec(args)
    for note in notes:
        print(f"note: {note}")
    env = spec.env
    print(
        f"epcomm normal-mode benchmark: {env['gpu']} x{num_ranks} ({dist_backend}), commit "
        f"{env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, "
        f"triton {env['triton']}"
    )
    print(
        f"  settings {', '.join(s.name for s in spec.settings)}; backends {', '.join(spec.backends)}; "
        f"baselines {', '.join(spec.baselines) or '-'}; ops {', '.join(spec.ops)}; sms {list(spec.sms)}; "
        f"warmup {spec.warmup}, iters {spec.iters}, gpu iters {spec.gpu_iters}, {spec.num_inputs} input sets"
    )
    if spec.out and args.overwrite and os.path.exists(spec.out):
        os.remove(spec.out)
    started = time.monotonic()
    results = parallel_launch(num_ranks, rank_worker, spec, backend=dist_backend, timeout_s=args.timeout)
    report = results[0]
    assert report is not None
    records: list[dict[str, Any]] = report["records"]
    print(f"\n{len(records)} rows in {time.monotonic() - started:.1f} s", end="")
    print(f"; appended to {spec.out}" if spec.out else "")
    if args.plot:
        print(plot_rows(records, args.plot))
    if not report["ok"]:
        print("FAILED: a correctness check failed or a measurement raised (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
