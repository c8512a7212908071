"""Side-by-side microbenchmark of the normal-mode dispatch push: which kernel shape moves rows fastest?

Standalone (its own Triton kernels; nothing from ``epcomm.kernels``), one process per visible GPU
(EP2 or EP4), NCCL group + ``torch.distributed._symmetric_memory`` as the NVLink backend's
transport does. Setting (DeepEP's "prefill"): 4096 tokens per rank, hidden 7168 bf16 (3584 int32
words per row), top-8 of 256 experts routed as ``benchmarks/common.py`` ``make_routing``. Each
token row is written once to every rank that holds one of its experts (its own rank included: a
local copy), at the row ``dst_row[token, rank]`` (int32, ``-1`` = not sent) of that rank's
symmetric buffer; rows land ordered by source rank, then token (as epcomm's dispatch).

Variants (every kernel takes the 8 peer pointers, selected by a ``tl.where`` chain so the 16-byte
alignment stays known; destinations visited in the order rotated by ``(step + pid + rank) % R``):

* ``block_r2_w16``: today's ``normal_push.py`` pattern: ``ROWS`` = 2 consecutive rows per step as
  one ``[2, 4096]`` block (512 of the 4096 lanes masked off: 12.5%), both rows loaded before any
  store, the destination row numbers loaded per destination between the stores, 16 warps;
* ``block_r4_w16``: the same with 4 rows per step; ``block_r2_w32``: 2 rows, 32 warps;
* ``chunk_w16``: rows cut into 512-word chunks (3584 = 7 x 512; no masked lane); a step moves 16
  consecutive chunks (``[16, 512]``, the same 32 KB of registers as ``[2, 4096]``); programs take
  steps round-robin; destination rows loaded per destination as in the baseline;
* ``chunk_hoist_w16``: the same, but the destination rows of every destination are loaded with the
  payload, before the first store (no load waits between the stores of one step);
* ``chunk_hoist_contig_w16``: each program owns one contiguous range of chunks (tokens) instead of
  every grid-th step;
* ``chunk_hoist_pipe_w16``: the next step's payload loads are issued before this step's stores
  (two steps' bytes in flight while the stores drain; this step's row numbers are loaded with them);
* ``chunk_hoist_contig_pipe_w16``: both.

Timing: per program count (default 8/16/24/32), 5 warm-up + 20 timed iterations; every iteration
NCCL barrier (all_reduce of one int32), L2 flush (256 MB zeroed), NCCL barrier, then CUDA events
around the one kernel. Reported: the median of the slowest rank (per-rank medians, max over ranks),
as total us and remote GB/s = (mean over ranks of the bytes of rows sent to other ranks) / that
time. NCCL ``all_to_all_single`` with the same per-rank row counts (send buffer pre-packed) is
timed the same way in the same run as the reference line. Correctness: before timing each variant
at each program count, fresh random rows are pushed into zeroed buffers and every received row's
checksum is compared with the sender's (checksums exchanged with ``all_to_all_single``).

    PYTHONPATH=src python3 scripts/sweep_push.py                  # all visible GPUs (2 or 4)
    python3 scripts/sweep_push.py --compile-only                  # no GPU: compile for sm_90, check PTX
    OUT=/tmp/o PYTHONPATH=src python3 scripts/sweep_push.py --programs 16,24 --variants block_r2_w16,chunk_hoist_pipe_w16

Writes JSON lines to ``$OUT/sweep_push.jsonl`` when ``OUT`` is set (or ``--out``).
"""

# mypy: allow-untyped-defs, allow-incomplete-defs
# ruff: noqa: E402  (imports follow the sys.path set-up below, so a checkout runs without installing)
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
try:
    import epcomm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_ROOT / "src"))

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from epcomm.kernels.exchange import MAX_PEERS, _peer
from epcomm.testing.launch import ProcessGroupInfo, parallel_launch

FLUSH_BYTES = 256 << 20
CHUNK_BYTES_PER_STEP = 32 << 10
"""Bytes a chunk-kernel step loads (16 chunks of 512 words: the registers of a [2, 4096] block)."""


# ---- kernels -----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_rows", "rank", "capacity"])
def push_block_kernel(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    x_ptr,
    dst_row_ptr,
    num_rows,
    rank,
    capacity,
    NUM_RANKS: tl.constexpr,
    WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Today's normal_push.py payload path: ROWS consecutive rows per step as a [ROWS, BLOCK] block."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)[None, :]
    col_mask = cols < WORDS
    row_offsets = tl.arange(0, ROWS)
    for first in range(pid * ROWS, num_rows, grid * ROWS):
        rows = row_offsets.to(tl.int64) + first
        valid = rows < num_rows
        x = tl.load(x_ptr + rows[:, None] * WORDS + cols, mask=valid[:, None] & col_mask)
        for step in tl.static_range(NUM_RANKS):
            dst = (step + pid + rank) % NUM_RANKS
            dst_rows = tl.load(dst_row_ptr + rows * NUM_RANKS + dst, mask=valid, other=-1).to(tl.int64)
            send = (dst_rows >= 0) & (dst_rows < capacity)
            base = _peer(dst, p0, p1, p2, p3, p4, p5, p6, p7)
            tl.store(base + dst_rows[:, None] * WORDS + cols, x, mask=send[:, None] & col_mask)


@triton.jit
def _load_payload(x_ptr, items, valid, cols, CHUNK: tl.constexpr):
    # x is contiguous [rows, CHUNKS * CHUNK]: chunk item i is the words [i * CHUNK, (i + 1) * CHUNK).
    return tl.load(x_ptr + items.to(tl.int64)[:, None] * CHUNK + cols, mask=valid[:, None])


@triton.jit
def _load_dst_rows(
    dst_row_ptr, items, valid, r_cols, CHUNKS: tl.constexpr, NUM_RANKS: tl.constexpr, HOIST_DST: tl.constexpr
):
    # [ITEMS, R_BLOCK]: every destination's row of each item's token (HOIST_DST; else a dummy).
    dst_rows = r_cols
    if HOIST_DST:
        rows = items // CHUNKS
        dst_rows = tl.load(
            dst_row_ptr + rows[:, None] * NUM_RANKS + r_cols,
            mask=valid[:, None] & (r_cols < NUM_RANKS),
            other=-1,
        )
    return dst_rows


@triton.jit
def _store_step(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    x,
    all_dst_rows,
    dst_row_ptr,
    items,
    valid,
    cols,
    r_cols,
    pid,
    rank,
    capacity,
    NUM_RANKS: tl.constexpr,
    WORDS: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS: tl.constexpr,
    HOIST_DST: tl.constexpr,
):
    rows = items // CHUNKS
    chunk_start = ((items - rows * CHUNKS) * CHUNK).to(tl.int64)
    for step in tl.static_range(NUM_RANKS):
        dst = (step + pid + rank) % NUM_RANKS
        if HOIST_DST:
            # Column `dst` of the [ITEMS, R_BLOCK] block loaded with the payload (no load here).
            dst_rows = tl.sum(tl.where(r_cols == dst, all_dst_rows, 0), axis=1).to(tl.int64)
        else:
            dst_rows = tl.load(dst_row_ptr + rows * NUM_RANKS + dst, mask=valid, other=-1).to(tl.int64)
        send = valid & (dst_rows >= 0) & (dst_rows < capacity)
        base = _peer(dst, p0, p1, p2, p3, p4, p5, p6, p7)
        tl.store(base + (dst_rows * WORDS + chunk_start)[:, None] + cols, x, mask=send[:, None])


@triton.jit(do_not_specialize=["num_items", "rank", "capacity"])
def push_chunks_kernel(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    x_ptr,
    dst_row_ptr,
    num_items,
    rank,
    capacity,
    NUM_RANKS: tl.constexpr,
    WORDS: tl.constexpr,
    CHUNK: tl.constexpr,
    ITEMS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    HOIST_DST: tl.constexpr,
    CONTIG: tl.constexpr,
    PIPELINE: tl.constexpr,
):
    """Rows as CHUNK-word chunks (no padding lanes); a step moves ITEMS consecutive chunks.

    ``num_items`` = rows x (WORDS / CHUNK). CONTIG: program ``pid`` owns one contiguous range of
    chunks (else steps go round-robin over the programs). PIPELINE: the next step's payload loads are
    issued before this step's stores. HOIST_DST: every destination's row numbers loaded with the
    payload (else one destination's at a time, between the stores, as today's kernel).
    """
    CHUNKS: tl.constexpr = WORDS // CHUNK
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, CHUNK), CHUNK), CHUNK)[None, :]
    r_cols = tl.arange(0, R_BLOCK)[None, :]
    offsets = tl.arange(0, ITEMS)
    if CONTIG:
        per_program = tl.cdiv(tl.cdiv(num_items, grid), ITEMS) * ITEMS
        start = pid * per_program
        end = tl.minimum(start + per_program, num_items)
        stride = ITEMS
    else:
        start = pid * ITEMS
        end = num_items
        stride = grid * ITEMS
    if PIPELINE:
        first = offsets + start
        x = _load_payload(x_ptr, first, first < end, cols, CHUNK)
    for s in range(start, end, stride):
        items = offsets + s
        valid = items < end
        if PIPELINE:
            # The next step's payload is loaded before this step's stores (carried to the next step);
            # only the small row-number block of this step is loaded here.
            following = items + stride
            x_next = _load_payload(x_ptr, following, following < end, cols, CHUNK)
        else:
            x = _load_payload(x_ptr, items, valid, cols, CHUNK)
        all_dst_rows = _load_dst_rows(dst_row_ptr, items, valid, r_cols, CHUNKS, NUM_RANKS, HOIST_DST)
        _store_step(
            p0,
            p1,
            p2,
            p3,
            p4,
            p5,
            p6,
            p7,
            x,
            all_dst_rows,
            dst_row_ptr,
            items,
            valid,
            cols,
            r_cols,
            pid,
            rank,
            capacity,
            NUM_RANKS,
            WORDS,
            CHUNK,
            CHUNKS,
            HOIST_DST,
        )
        if PIPELINE:
            x = x_next


# ---- variants ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One kernel shape: which kernel, its constexprs (besides the shape's) and warps."""

    name: str
    kernel: str  # "block" or "chunks"
    params: dict[str, Any]
    num_warps: int
    about: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("block_r2_w16", "block", {"ROWS": 2}, 16, "today's normal_push: [2, 4096] masked block"),
        Variant("block_r4_w16", "block", {"ROWS": 4}, 16, "4 rows per step"),
        Variant("block_r2_w32", "block", {"ROWS": 2}, 32, "2 rows, 32 warps"),
        Variant(
            "chunk_w16",
            "chunks",
            {"HOIST_DST": False, "CONTIG": False, "PIPELINE": False},
            16,
            "512-word chunks, no masked lanes",
        ),
        Variant(
            "chunk_hoist_w16",
            "chunks",
            {"HOIST_DST": True, "CONTIG": False, "PIPELINE": False},
            16,
            "+ dst rows loaded with the payload",
        ),
        Variant(
            "chunk_hoist_contig_w16",
            "chunks",
            {"HOIST_DST": True, "CONTIG": True, "PIPELINE": False},
            16,
            "+ contiguous token range per program",
        ),
        Variant(
            "chunk_hoist_pipe_w16",
            "chunks",
            {"HOIST_DST": True, "CONTIG": False, "PIPELINE": True},
            16,
            "+ next step's loads before the stores",
        ),
        Variant(
            "chunk_hoist_contig_pipe_w16",
            "chunks",
            {"HOIST_DST": True, "CONTIG": True, "PIPELINE": True},
            16,
            "contiguous range + next loads first",
        ),
    )
}
NCCL_NAME = "nccl_all_to_all"


def chunk_words(words: int) -> int:
    """The largest power-of-two divisor of ``words``, at most 512 (3584 -> 512, 1792 -> 256)."""
    return math.gcd(words, 512)


def kernel_constexprs(variant: Variant, num_ranks: int, words: int) -> dict[str, Any]:
    """The constexpr arguments of ``variant`` for ``num_ranks`` ranks and ``words`` int32 words per row."""
    if variant.kernel == "block":
        return {
            "NUM_RANKS": num_ranks,
            "WORDS": words,
            "BLOCK": triton.next_power_of_2(words),
            **variant.params,
        }
    chunk = chunk_words(words)
    return {
        "NUM_RANKS": num_ranks,
        "WORDS": words,
        "CHUNK": chunk,
        "ITEMS": max(1, CHUNK_BYTES_PER_STEP // (4 * chunk)),
        "R_BLOCK": triton.next_power_of_2(num_ranks),
        **variant.params,
    }


def launch_variant(
    variant: Variant,
    peers: Sequence[torch.Tensor],
    x: torch.Tensor,
    dst_row: torch.Tensor,
    rank: int,
    capacity: int,
    num_programs: int,
) -> None:
    """Push every row of ``x`` (``[rows, words]`` int32) to ``dst_row`` of each rank's buffer."""
    num_rows, words = x.shape
    padded = list(peers) + [peers[0]] * (MAX_PEERS - len(peers))
    constexprs = kernel_constexprs(variant, len(peers), words)
    if variant.kernel == "block":
        kernel: Any = push_block_kernel
        count = num_rows
    else:
        kernel = push_chunks_kernel
        count = num_rows * (words // constexprs["CHUNK"])
    kernel[(num_programs,)](
        *padded, x, dst_row, count, rank, capacity, num_warps=variant.num_warps, **constexprs
    )


# ---- compile check (no GPU needed) -------------------------------------------------------------------


def compile_sm90(variant: Variant, num_ranks: int, words: int) -> Any:
    """Compile ``variant`` for sm_90 as the launcher specializes it (16-byte-aligned pointers)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel: Any = push_block_kernel if variant.kernel == "block" else push_chunks_kernel
    count = "num_rows" if variant.kernel == "block" else "num_items"
    signature: dict[str, str] = {f"p{i}": "*i32" for i in range(MAX_PEERS)}
    signature.update({"x_ptr": "*i32", "dst_row_ptr": "*i32", count: "i32", "rank": "i32", "capacity": "i32"})
    names = list(signature)
    aligned = [f"p{i}" for i in range(MAX_PEERS)] + ["x_ptr", "dst_row_ptr"]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    constexprs = kernel_constexprs(variant, num_ranks, words)
    full = dict(signature)
    for name in constexprs:
        full[name] = "constexpr"
    source = ASTSource(kernel, full, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": variant.num_warps})


def compile_only(names: Sequence[str], num_ranks_list: Sequence[int], words: int) -> int:
    """Compile every variant for sm_90; fail unless loads and stores are 16-byte vectors."""
    import re

    failed = 0
    for name in names:
        for num_ranks in num_ranks_list:
            started = time.monotonic()
            compiled = compile_sm90(VARIANTS[name], num_ranks, words)
            ptx = compiled.asm["ptx"]
            accesses = sorted(set(re.findall(r"(?:ld|st)\.global[a-z0-9.]*", ptx)))
            vector = "ld.global.v4.b32" in accesses and "st.global.v4.b32" in accesses
            cp_async = "cp.async" in ptx
            barriers = ptx.count("bar.sync")
            ok = vector and not cp_async
            failed += not ok
            print(
                f"{name:30} EP{num_ranks}: {'ok' if ok else 'FAIL'} ({time.monotonic() - started:.1f} s; "
                f"shared {compiled.metadata.shared} B, {barriers} bar.sync; {'cp.async! ' if cp_async else ''}"
                f"{' '.join(accesses)})"
            )
    return 1 if failed else 0


# ---- the run -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What every rank needs."""

    tokens: int
    hidden: int
    topk: int
    experts: int
    variants: tuple[str, ...]
    programs: tuple[int, ...]
    warmup: int
    iters: int
    seed: int
    flush_bytes: int
    nccl: bool
    env: dict[str, Any] = field(default_factory=dict)


def plan_rows(
    spec: Spec, rank: int, world: int, gen: torch.Generator, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing as ``benchmarks/common.py`` ``make_routing`` (DeepEP's tests) and where the rows go.

    Returns:
        ``dst_row [tokens, world]`` int32 (row at each destination rank, ``-1`` = not sent; rows land
        ordered by source rank, then token), ``send_idx`` (tokens grouped by destination rank, each
        group in token order: the ``all_to_all_single`` send order) and the row-count matrix
        ``[source rank, destination rank]`` (int64, CPU), gathered from every rank.
    """
    device = gen.device
    scores = torch.randn(spec.tokens, spec.experts, generator=gen, device=device).abs() + 1
    topk_idx = torch.topk(scores, spec.topk, dim=1).indices
    in_rank = torch.zeros(spec.tokens, world, dtype=torch.bool, device=device)
    in_rank.scatter_(1, topk_idx // (spec.experts // world), True)
    counts = in_rank.sum(0).to(torch.int64)
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts, group=group)
    matrix = torch.stack(gathered)
    before = matrix.cumsum(0) - matrix  # rows of lower source ranks at each destination
    prefix = in_rank.to(torch.int64).cumsum(0) - 1
    dst_row = torch.where(in_rank, prefix + before[rank][None, :], -1).to(torch.int32).contiguous()
    send_idx = in_rank.t().nonzero()[:, 1]
    return dst_row, send_idx, matrix.cpu()


class _Rank:
    """One rank's state: routing, row numbers, the symmetric buffer and its peers' views."""

    def __init__(self, pgi: ProcessGroupInfo, spec: Spec) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.pgi, self.spec = pgi, spec
        self.rank, self.world, self.device, self.group = pgi.rank, pgi.world_size, pgi.device, pgi.group
        if spec.hidden % 2 or spec.experts % self.world:
            raise ValueError("hidden must be even and experts a multiple of the world size")
        self.words = spec.hidden // 2  # bf16 pairs as int32 words
        device, world = self.device, self.world
        self.gen = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + self.rank)
        routing = plan_rows(spec, self.rank, world, self.gen, self.group)
        self.dst_row, self.send_idx, self.matrix = routing
        self.send_splits: list[int] = self.matrix[self.rank].tolist()
        self.recv_splits: list[int] = self.matrix[:, self.rank].tolist()
        self.num_recv = sum(self.recv_splits)
        self.capacity = int(self.matrix.sum(0).max())
        self.x = torch.empty(spec.tokens, self.words, dtype=torch.int32, device=device)
        self.fresh_rows()
        total = self.capacity * self.words
        buffer = symm_mem.empty(total, dtype=torch.int32, device=device)
        buffer.zero_()
        torch.cuda.synchronize()
        handle = symm_mem.rendezvous(buffer, self.group)
        self.peers = [handle.get_buffer(r, (total,), torch.int32) for r in range(world)]
        self.buffer, self.handle = buffer, handle
        self.sync = torch.zeros(1, dtype=torch.int32, device=device)
        self.flush = torch.empty(max(spec.flush_bytes // 4, 1), dtype=torch.int32, device=device)
        self.a2a_send = self.x.index_select(0, self.send_idx)
        self.a2a_recv = torch.empty(self.num_recv, self.words, dtype=torch.int32, device=device)
        self.weights = torch.arange(1, self.words + 1, dtype=torch.int64, device=device)

    def remote_bytes(self) -> int:
        """Bytes of the rows this rank sends to other ranks."""
        return int(sum(self.send_splits) - self.send_splits[self.rank]) * self.words * 4

    def fresh_rows(self) -> None:
        self.x.copy_(
            torch.randint(
                -(2**31), 2**31 - 1, self.x.shape, generator=self.gen, device=self.device, dtype=torch.int32
            )
        )

    def device_barrier(self) -> None:
        dist.all_reduce(self.sync, group=self.group)

    def hard_barrier(self) -> None:
        torch.cuda.synchronize()
        self.device_barrier()
        torch.cuda.synchronize()

    def checksums(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.size(0), dtype=torch.int64, device=self.device)
        for start in range(0, rows.size(0), 2048):
            part = rows[start : start + 2048].to(torch.int64)
            out[start : start + 2048] = (part * self.weights).sum(1)
        return out

    def expected_checksums(self) -> torch.Tensor:
        """Checksums of the rows this rank should hold, in row order (source rank, then token)."""
        send = self.checksums(self.x).index_select(0, self.send_idx)
        recv = torch.empty(self.num_recv, dtype=torch.int64, device=self.device)
        dist.all_to_all_single(recv, send, self.recv_splits, self.send_splits, group=self.group)
        return recv

    def launch(self, variant: Variant, num_programs: int) -> None:
        launch_variant(variant, self.peers, self.x, self.dst_row, self.rank, self.capacity, num_programs)

    def nccl(self) -> None:
        dist.all_to_all_single(
            self.a2a_recv, self.a2a_send, self.recv_splits, self.send_splits, group=self.group
        )

    def check(self, fn: Callable[[], None], received: Callable[[], torch.Tensor]) -> bool:
        """Fresh rows, zeroed destinations, one call; every received row's checksum as sent."""
        self.fresh_rows()
        self.a2a_send = self.x.index_select(0, self.send_idx)
        self.buffer.zero_()
        self.a2a_recv.zero_()
        want = self.expected_checksums()
        self.hard_barrier()
        fn()
        self.hard_barrier()
        return bool(torch.equal(self.checksums(received()), want))

    def received_nccl(self) -> torch.Tensor:
        return self.a2a_recv

    def received_push(self) -> torch.Tensor:
        return self.buffer[: self.num_recv * self.words].view(self.num_recv, self.words)

    def time(self, fn: Callable[[], None]) -> float:
        """This rank's median microseconds of ``fn`` (NCCL barrier, flush, NCCL barrier, events)."""
        spec = self.spec
        events = []
        for it in range(spec.warmup + spec.iters):
            self.device_barrier()  # nobody still writes into this GPU while it flushes
            self.flush.zero_()
            self.device_barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            if it >= spec.warmup:
                events.append((start, end))
        torch.cuda.synchronize()
        return float(statistics.median(s.elapsed_time(e) * 1e3 for s, e in events))


def worker(pgi: ProcessGroupInfo, spec: Spec) -> list[dict[str, Any]] | None:
    """Measure every (variant, program count) and NCCL on this rank; rank 0 returns the rows."""
    me = _Rank(pgi, spec)
    variants = [VARIANTS[name] for name in spec.variants]
    measured: list[tuple[str, int | None, float, bool]] = []
    if spec.nccl:
        ok = me.check(me.nccl, me.received_nccl)
        measured.append((NCCL_NAME, None, me.time(me.nccl), ok))
    for variant in variants:
        for programs in spec.programs:
            push = functools.partial(me.launch, variant, programs)
            ok = me.check(push, me.received_push)
            measured.append((variant.name, programs, me.time(push), ok))
    mine = torch.tensor([[t, float(ok)] for _, _, t, ok in measured], dtype=torch.float64, device=me.device)
    everyone = [torch.empty_like(mine) for _ in range(me.world)]
    dist.all_gather(everyone, mine, group=me.group)
    remote = torch.tensor([float(me.remote_bytes())], dtype=torch.float64, device=me.device)
    remotes = [torch.empty_like(remote) for _ in range(me.world)]
    dist.all_gather(remotes, remote, group=me.group)
    torch.cuda.synchronize()
    if me.rank != 0:
        return None
    per_rank = torch.stack(everyone).cpu()  # [rank, measurement, (us, ok)]
    mean_remote = float(torch.cat(remotes).mean())
    gpu = torch.cuda.get_device_name(me.device)
    rows: list[dict[str, Any]] = []
    for index, (name, num_programs, _, _) in enumerate(measured):
        times = per_rank[:, index, 0].tolist()
        all_ok = bool((per_rank[:, index, 1] == 1).all())
        slowest = max(times)
        shape = VARIANTS.get(name)
        rows.append(
            {
                **spec.env,
                "gpu": gpu,
                "world_size": me.world,
                "shape": {
                    "tokens": spec.tokens,
                    "hidden": spec.hidden,
                    "topk": spec.topk,
                    "experts": spec.experts,
                },
                "variant": name,
                "about": shape.about if shape else "NCCL all_to_all_single, same per-rank row counts",
                "num_programs": num_programs,
                "num_warps": shape.num_warps if shape else None,
                "constexprs": kernel_constexprs(shape, me.world, me.words) if shape else None,
                "time_us": slowest,
                "time_us_ranks": [round(t, 2) for t in times],
                "remote_bytes_per_rank": mean_remote,
                "remote_gbps": mean_remote / (slowest * 1e3),
                "check": "PASS" if all_ok else "FAIL",
                "iters": spec.iters,
                "warmup": spec.warmup,
            }
        )
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The table: variant x programs, slowest rank's median us, remote GB/s, ratio to NCCL, check."""
    nccl = next((r for r in rows if r["variant"] == NCCL_NAME), None)
    lines = [
        f"{'variant':30} {'progs':>5} {'warps':>5} {'us (max rk)':>11} {'remote GB/s':>11} "
        f"{'vs NCCL':>7} {'check':>5}  about"
    ]
    lines.append("-" * len(lines[0]) + "-" * 20)
    previous = None
    for r in rows:
        if previous is not None and r["variant"] != previous:
            lines.append("")
        previous = r["variant"]
        ratio = f"{nccl['time_us'] / r['time_us']:.2f}x" if nccl and r is not nccl else "-"
        lines.append(
            f"{r['variant']:30} {r['num_programs'] or '-':>5} {r['num_warps'] or '-':>5} "
            f"{r['time_us']:11.1f} {r['remote_gbps']:11.1f} {ratio:>7} {r['check']:>5}  {r['about']}"
        )
    lines.append("")
    for programs in sorted({r["num_programs"] for r in rows if r["num_programs"]}):
        best = min((r for r in rows if r["num_programs"] == programs), key=lambda r: r["time_us"])
        lines.append(
            f"best at {programs:2} programs: {best['variant']} {best['time_us']:.1f} us "
            f"({best['remote_gbps']:.1f} GB/s)"
        )
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--num-ranks", type=int, default=None, help="default: every visible GPU")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list")
    parser.add_argument("--programs", default="8,16,24,32", help="programs (SMs) per kernel, comma list")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flush-mb", type=int, default=FLUSH_BYTES >> 20, help="MB zeroed before each iteration"
    )
    parser.add_argument("--no-nccl", action="store_true", help="skip the all_to_all_single reference")
    parser.add_argument(
        "--out", default=None, help="JSON lines file (default $OUT/sweep_push.jsonl if OUT is set)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are killed")
    parser.add_argument(
        "--compile-only", action="store_true", help="compile every variant for sm_90 (EP2, EP4, EP8) and exit"
    )
    args = parser.parse_args(argv)
    names = _csv(args.variants)
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if args.hidden % 8:
        raise SystemExit("--hidden must be a multiple of 8 (16-byte rows)")
    if args.compile_only:
        return compile_only(names, (2, 4, 8), args.hidden // 2)
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.num_ranks or num_gpus
    if world < 2 or world > min(num_gpus, MAX_PEERS):
        raise SystemExit(f"needs 2..{MAX_PEERS} CUDA GPUs ({num_gpus} visible, {world} asked)")
    # NVLink multicast stays off on these machines (PERFORMANCE.md); default it off here too.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env = {
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    spec = Spec(
        tokens=args.tokens,
        hidden=args.hidden,
        topk=args.topk,
        experts=args.experts,
        variants=tuple(names),
        programs=tuple(int(v) for v in _csv(args.programs)),
        warmup=args.warmup,
        iters=args.iters,
        seed=args.seed,
        flush_bytes=args.flush_mb << 20,
        nccl=not args.no_nccl,
        env=env,
    )
    started = time.monotonic()
    results = parallel_launch(world, worker, spec, backend="nccl", timeout_s=args.timeout)
    rows = results[0]
    assert rows is not None
    print(
        f"normal-mode push sweep: EP{world} on {rows[0]['gpu']}, {args.tokens} tokens/rank x hidden "
        f"{args.hidden} bf16, top-{args.topk} of {args.experts}; commit {env['git_commit'][:12]}; "
        f"median of {args.iters} iters per rank, slowest rank; remote GB/s = mean remote bytes per rank "
        f"({rows[0]['remote_bytes_per_rank'] / 1e6:.1f} MB) / time"
    )
    print(format_rows(rows))
    out = args.out or (os.path.join(os.environ["OUT"], "sweep_push.jsonl") if os.environ.get("OUT") else None)
    if out:
        with open(out, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"{len(rows)} rows appended to {out}")
    print(f"{time.monotonic() - started:.1f} s")
    return 0 if all(r["check"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
