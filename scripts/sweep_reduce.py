"""Single-GPU sweep of the normal-mode combine reduce (``combine_reduce_kernel``): tile (tokens x
columns) x warps at 24 programs, on the prefill shape (4096 tokens, hidden 7168, each token's rows
from ~90% of the ranks, as DeepEP's routing gives at EP4). Prints us and effective HBM GB/s (rows
read + result written), then the best tiles again at 2 and 8 ranks, and checks the result.

    PYTHONPATH=src python3 scripts/sweep_reduce.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
import triton

from epcomm.kernels.normal_combine import combine_reduce_kernel

TOKENS, HIDDEN, TOPK, PROGRAMS = 4096, 7168, 8, 24


def _inputs(ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(ranks)
    present = torch.rand(TOKENS, ranks, device="cuda") < 0.9
    present[:, 0] |= ~present.any(dim=1)
    counts = present.sum(dim=0)
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.where(present, (present.int().cumsum(0) - 1) + offsets, -1).to(torch.int32).contiguous()
    capacity = int(counts.sum())
    area = torch.randn(capacity, HIDDEN, device="cuda").bfloat16()
    weights = torch.rand(capacity, TOPK, device="cuda")
    return slot, area, weights, capacity


def _time(ranks: int, tokens: int, cols: int, warps: int, flush: torch.Tensor) -> dict[str, Any]:
    slot, area, weights, capacity = _inputs(ranks)
    out = torch.empty(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out_w = torch.empty(TOKENS, TOPK, device="cuda")

    def run() -> None:
        combine_reduce_kernel[(PROGRAMS,)](
            area, weights, slot, out, out, out, out_w, TOKENS,
            NUM_RANKS=ranks, HIDDEN=HIDDEN, COLS=cols, NUM_TOPK=TOPK, K_BLOCK=TOPK,
            TOKENS=tokens, HAS_WEIGHTS=True, NUM_BIAS=0, num_warps=warps,
        )  # fmt: skip

    run()
    times = []
    for _ in range(15):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    us = sorted(times)[len(times) // 2]
    want = torch.zeros(TOKENS, HIDDEN, device="cuda")
    want_w = torch.zeros(TOKENS, TOPK, device="cuda")
    for r in range(ranks):
        s = slot[:, r].long()
        want += torch.where((s >= 0)[:, None], area[s.clamp(min=0)].float(), 0.0)
        want_w += torch.where((s >= 0)[:, None], weights[s.clamp(min=0)], 0.0)
    ok = torch.equal(out, want.bfloat16()) and torch.equal(out_w, want_w)
    moved = (capacity + TOKENS) * HIDDEN * 2
    row = {"ranks": ranks, "tokens": tokens, "cols": cols, "warps": warps, "us": us, "GBps": moved / us / 1e3}
    print(
        f"ranks {ranks} tokens {tokens:2d} cols {cols:5d} warps {warps:2d}: {us:7.1f} us "
        f"{row['GBps']:7.1f} GB/s  check {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    row["check"] = ok
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer tiles")
    args = p.parse_args()
    flush = torch.empty(256 << 18, dtype=torch.int32, device="cuda")
    tiles = [(t, c) for t in (2, 4, 8, 16) for c in (1024, 2048, 4096, 8192) if 2048 <= t * c <= 32768]
    warps_list = (8, 16) if args.quick else (4, 8, 16)
    rows = [_time(4, t, c, w, flush) for t, c in tiles for w in warps_list]
    best = sorted(rows, key=lambda r: r["us"])[:3]
    for ranks in (2, 8):
        rows += [_time(ranks, r["tokens"], r["cols"], r["warps"], flush) for r in best]
    rows += [_time(r, 4, 8192, 16, flush) for r in (2, 8)]  # the old tile, for comparison
    if not all(r["check"] for r in rows):
        raise SystemExit("a result differed from the torch reduce")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sweep_reduce.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    _ = triton  # imported for its version in tracebacks


if __name__ == "__main__":
    main()
