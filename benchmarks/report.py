"""Results of the benchmarks: rows, tables, JSON lines, the run's environment, progress and plots."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = [
    "BASELINE_BACKENDS",
    "Progress",
    "ResultRow",
    "append_jsonl",
    "best_baseline_us",
    "environment_info",
    "format_table",
    "make_progress",
    "plot_rows",
    "results_path",
]

BASELINE_BACKENDS = ("reference", "user")
"""Rows of these backends are the baselines: a speed-up is ``best baseline time / time``."""


# ---- results ---------------------------------------------------------------------------------------


def results_path(name: str) -> str:
    """Where a benchmark writes ``name`` unless told otherwise: the folder ``$OUT`` when it is set
    (``scripts/gpu_all.sh`` collects a run's files there), else ``results/`` at the repository root
    (git-ignored). The folder is created when the file is written."""
    folder = os.environ.get("OUT") or Path(__file__).resolve().parent.parent / "results"
    return str(Path(folder) / name)


@dataclass
class ResultRow:
    """One measurement (one op, backend, SM count and setting), as written to the JSONL file.

    Times: each rank takes the median of its ``iters`` samples; ``time_us`` is the max of those
    medians over ranks (the slowest rank is the real time), ``time_us_median`` their median. These
    are end to end: CUDA events around one call, host work inside it included.
    ``gpu_time_us``: device time (``profile_op``: busy time of the GPU activities the call
    launched, DeepEP's ``bench_kineto`` method), the median per rank, then the max over ranks
    (``gpu_time_us_ranks`` per rank); ``None`` on CPU, when not measured or when the profiler failed.
    ``b2b_time_us``: calls back to back (``time_back_to_back``, DeepEP's ``bench`` method: the host
    runs ahead except where the call synchronizes), median per rank, max over ranks.
    Bandwidths: mean bytes per rank / ``time_us``. ``logical``: all received rows (local ones
    included); ``nvlink``: rows that crossed to another rank. Combine counts the rows it sends
    back (the same rows as the dispatch received), as DeepEP does.
    """

    setting: str
    shape: dict[str, int]
    op: str
    backend: str
    num_sms: int | None
    time_us: float | None
    time_us_median: float | None
    time_us_ranks: list[float]
    logical_gbps: float | None
    nvlink_gbps: float | None
    logical_bytes_per_rank: float
    nvlink_bytes_per_rank: float
    gpu_time_us: float | None = None
    gpu_time_us_ranks: list[float] = field(default_factory=list)
    b2b_time_us: float | None = None
    b2b_time_us_ranks: list[float] = field(default_factory=list)
    speedup_vs_best_baseline: float | None = None
    best_baseline: str | None = None
    check: str = "n/a"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, env: dict[str, Any]) -> dict[str, Any]:
        """The row with the environment fields in front."""
        row = dict(env)
        row.update(asdict(self))
        extra = row.pop("extra")
        row.update(extra)
        return row


def best_baseline_us(rows: Sequence[ResultRow], op: str, gpu: bool = False) -> tuple[float, str] | None:
    """The fastest baseline (``BASELINE_BACKENDS``) time of ``op`` and its label, or ``None``.

    ``gpu``: compare ``gpu_time_us`` (device time) instead of ``time_us`` (end to end).
    """
    best: tuple[float, str] | None = None
    for row in rows:
        value = row.gpu_time_us if gpu else row.time_us
        if row.op != op or row.backend not in BASELINE_BACKENDS or value is None:
            continue
        label = row.backend if row.num_sms is None else f"{row.backend}@{row.num_sms}"
        if best is None or value < best[0]:
            best = (value, label)
    return best


def _fmt(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if spec == "gbps":  # 3 significant digits below 10 GB/s (CPU runs), one decimal above
        return format(value, ".1f") if value >= 10 else format(value, ".3g")
    return format(value, spec)


def format_table(rows: Sequence[ResultRow], title: str) -> str:
    """A fixed-width table: op x backend x SMs, times, bandwidths and speed-up vs the best baseline.

    ``us (max rk)`` / ``us (med rk)``: end to end; ``GPU us``: device time (``gpu_time_us``);
    ``b2b us``: back to back (``b2b_time_us``).
    Bandwidths and the speed-up are end to end.
    """
    headers = [
        "op",
        "backend",
        "SMs",
        "us (max rk)",
        "us (med rk)",
        "GPU us",
        "b2b us",
        "logical GB/s",
        "NVLink GB/s",
        "vs best base",
        "check",
    ]
    body: list[list[str]] = []
    for row in rows:
        speedup = "-"
        if row.speedup_vs_best_baseline is not None:
            speedup = f"{row.speedup_vs_best_baseline:.2f}x"
        body.append(
            [
                row.op,
                row.backend,
                "-" if row.num_sms is None else str(row.num_sms),
                "ERROR" if row.error else _fmt(row.time_us, ".1f"),
                _fmt(row.time_us_median, ".1f"),
                _fmt(row.gpu_time_us, ".1f"),
                _fmt(row.b2b_time_us, ".1f"),
                _fmt(row.logical_gbps, "gbps"),
                _fmt(row.nvlink_gbps, "gbps"),
                speedup,
                row.check,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    left = {0, 1, len(headers) - 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [title, line(headers), "  ".join("-" * w for w in widths)]
    previous_op: str | None = None
    for cells in body:
        if previous_op is not None and cells[0] != previous_op:
            out.append("")
        previous_op = cells[0]
        out.append(line(cells))
    errors = [row for row in rows if row.error]
    for row in errors:
        out.append(f"  ERROR {row.op}/{row.backend}/{row.num_sms}: {row.error}")
    return "\n".join(out)


def append_jsonl(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """Append ``records`` to a JSON-lines file (one object per line), creating parent folders."""
    target = Path(path)
    if target.parent != Path():
        target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=False) + "\n")


# ---- environment -----------------------------------------------------------------------------------


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment_info(world_size: int, device_kind: str) -> dict[str, Any]:
    """GPU model, world size, git commit (``'unknown'`` outside a checkout), versions, host, time,
    and the ``EPCOMM_*`` options set (side-by-side runs differ only there)."""
    repo = Path(__file__).resolve().parent.parent
    # EPCOMM_GIT_COMMIT first: the GPU machines get a copy of the working tree whose .git may lag.
    pinned = os.environ.get("EPCOMM_GIT_COMMIT")
    commit = pinned or _git(["rev-parse", "HEAD"], repo) or "unknown"
    dirty: bool | None = None
    if commit != "unknown" and not pinned:
        status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
        dirty = bool(status) if status is not None else None
    try:
        import triton

        triton_version: str | None = str(triton.__version__)
    except ImportError:
        triton_version = None
    # The GPU model is filled in by rank 0 (asking here would create a CUDA context in the parent).
    gpu = "cuda" if device_kind == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    now = datetime.datetime.now(datetime.timezone.utc)
    host = socket.gethostname()
    return {
        "run_id": f"{now:%Y%m%dT%H%M%S}-{host}-{os.getpid()}",
        "gpu": gpu,
        "world_size": world_size,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": host,
        "timestamp": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "options": {
            name: value
            for name, value in sorted(os.environ.items())
            if name.startswith("EPCOMM_") and name != "EPCOMM_GIT_COMMIT"
        },
    }


# ---- progress ----------------------------------------------------------------------------------------


class Progress(Protocol):
    """What the benchmark needs of a progress bar (tqdm's subset)."""

    def update(self, n: int = 1) -> object: ...

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None: ...

    def write(self, text: str) -> None: ...

    def close(self) -> None: ...


class _PlainProgress:
    """Fallback without tqdm: one line per finished measurement."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.desc = ""

    def update(self, n: int = 1) -> object:
        self.done += n
        if self.enabled:
            print(f"[{self.done}/{self.total}] {self.desc}", flush=True)
        return None

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def write(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        pass


class _TqdmProgress:
    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        # Not a terminal (a log file, a captured pipe): refresh rarely so the log stays short.
        interactive = sys.stderr.isatty()
        self._bar = tqdm(
            total=total,
            dynamic_ncols=True,
            file=sys.stderr,
            leave=False,
            mininterval=0.1 if interactive else 15.0,
            maxinterval=10.0 if interactive else 60.0,
        )

    def update(self, n: int = 1) -> object:
        return self._bar.update(n)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self._bar.set_description(desc, refresh=refresh)

    def write(self, text: str) -> None:
        self._tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()


def make_progress(total: int, enabled: bool, use_tqdm: bool = True) -> Progress:
    """A tqdm bar when enabled and tqdm is importable, else plain prints (silent when disabled)."""
    if enabled and use_tqdm:
        try:
            return _TqdmProgress(total)
        except ImportError:
            pass
    return _PlainProgress(total, enabled)


# ---- plot ----------------------------------------------------------------------------------------------


def plot_rows(records: Sequence[dict[str, Any]], path: str) -> str:
    """Plot logical GB/s vs SMs, one panel per (setting, op); baselines measured once are dashed lines.

    Returns:
        A one-line note of what happened (matplotlib missing, nothing to plot, or the file written).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib), {path} not written"
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        if rec.get("op") == "layout" or rec.get("logical_gbps") is None:
            continue
        panels.setdefault((rec["setting"], rec["op"]), []).append(rec)
    if not panels:
        return "plot skipped: no bandwidth rows"
    settings = list(dict.fromkeys(key[0] for key in panels))
    ops = list(dict.fromkeys(key[1] for key in panels))
    fig, axes = plt.subplots(
        len(settings), len(ops), figsize=(4.6 * len(ops), 3.6 * len(settings)), squeeze=False
    )
    for i, setting_name in enumerate(settings):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            recs = panels.get((setting_name, op), [])
            backends = list(dict.fromkeys(r["backend"] for r in recs))
            for k, backend in enumerate(backends):
                color = f"C{k % 10}"
                mine = [r for r in recs if r["backend"] == backend]
                swept = sorted((r for r in mine if r["num_sms"] is not None), key=lambda r: r["num_sms"])
                if swept:
                    ax.plot(
                        [r["num_sms"] for r in swept],
                        [r["logical_gbps"] for r in swept],
                        marker="o",
                        color=color,
                        label=backend,
                    )
                for r in mine:
                    if r["num_sms"] is None:
                        ax.axhline(
                            r["logical_gbps"],
                            linestyle="--",
                            linewidth=1.2,
                            color=color,
                            label=f"{backend} (baseline)",
                        )
            ax.set_title(f"{setting_name}: {op}", fontsize=10)
            ax.set_xlabel("num_sms")
            ax.set_ylabel("logical GB/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    first = records[0]
    fig.suptitle(
        f"epcomm normal mode, {first.get('gpu')} x{first.get('world_size')}, "
        f"commit {str(first.get('git_commit'))[:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    target = Path(path)
    if target.parent != Path():
        target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"
