"""Single-GPU sweep of the normal-mode combine reduce (``combine_reduce_kernel``): tokens per step x
warps x programs, on the EP4 prefill shape (4096 tokens, hidden 7168, each token's rows from ~3.6 of
4 ranks, as DeepEP's routing gives). Prints us and effective HBM GB/s (rows read + result written).

    PYTHONPATH=src python3 scripts/sweep_reduce.py
"""

from __future__ import annotations

import json
import os

import torch
import triton

from epcomm.kernels.normal_combine import combine_reduce_kernel


def main() -> None:
    torch.manual_seed(0)
    tokens, hidden, ranks, topk = 4096, 7168, 4, 8
    present = torch.rand(tokens, ranks, device="cuda") < 0.9
    present[:, 0] |= ~present.any(dim=1)
    counts = present.sum(dim=0)
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.where(present, (present.int().cumsum(0) - 1) + offsets, -1).to(torch.int32).contiguous()
    capacity = int(counts.sum())
    area = torch.randn(capacity, hidden, device="cuda").bfloat16()
    weights = torch.rand(capacity, topk, device="cuda")
    out = torch.empty(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    out_w = torch.empty(tokens, topk, device="cuda")
    flush = torch.empty(256 << 18, dtype=torch.int32, device="cuda")
    moved = (capacity + tokens) * hidden * 2
    rows = []
    for programs in (8, 16, 24, 32):
        for tokens_per_step in (1, 2, 4):
            for warps in (8, 16, 32):
                if programs != 24 and warps != 16:
                    continue

                def run(
                    programs: int = programs,
                    tokens_per_step: int = tokens_per_step,
                    warps: int = warps,
                ) -> None:
                    combine_reduce_kernel[(programs,)](
                        area, weights, slot, out, out, out, out_w, tokens, slot, 0, 0, 0, 0, 0, 0,
                        NUM_RANKS=ranks, HIDDEN=hidden, H_BLOCK=triton.next_power_of_2(hidden),
                        NUM_TOPK=topk, K_BLOCK=topk, TOKENS=tokens_per_step, HAS_WEIGHTS=True,
                        NUM_BIAS=0, CHECKPOINTS=0, MAX_CHECKPOINTS=8, num_warps=warps,
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
                row = {
                    "programs": programs,
                    "tokens": tokens_per_step,
                    "warps": warps,
                    "us": us,
                    "GBps": moved / us / 1e3,
                }
                rows.append(row)
                print(
                    f"programs {programs:3d} tokens/step {tokens_per_step} warps {warps:2d}: {us:7.1f} us {moved / us / 1e3:7.1f} GB/s"
                )
    want = torch.zeros(tokens, hidden, device="cuda")
    for r in range(ranks):
        s = slot[:, r].long()
        want += torch.where((s >= 0)[:, None], area[s.clamp(min=0)].float(), 0.0)
    print("check:", torch.equal(out, want.bfloat16()))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sweep_reduce.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
