"""Where does normal-mode time go? Back-to-back timing and a torch.profiler breakdown on rank 0.

One rank per GPU (two ranks sharing the GPU on a one-GPU machine), prefill shape (4096 tokens,
hidden 7168, top-8 of 256 experts, 24 SMs): back-to-back time per call of each op, cProfile of the
host path, and rank 0's kernel table. With ``OUT`` set, rank 0's chrome trace goes there.

    python3 scripts/profile_normal.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

if "src" not in os.environ.get("PYTHONPATH", ""):  # else the caller chose the code (A/B runs)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
import epcomm
from epcomm import quant
from epcomm.testing import parallel_launch


def normal_ops(
    pgi, tokens: int, hidden: int, experts: int, topk: int, sms: int = 24
) -> dict[str, Callable[[], object]]:
    """The prefill-style normal-mode calls of one rank, by name (``layout``, ``dispatch_bf16``,
    ``dispatch_fp8``, ``cached_bf16``, ``combine``), on an NVLink Buffer with DeepEP's routing."""
    torch.manual_seed(pgi.rank)
    x = torch.randn(tokens, hidden, device=pgi.device).bfloat16()
    scores = torch.randn(tokens, experts, device=pgi.device).abs() + 1
    topk_idx = torch.topk(scores, topk, dim=-1).indices
    weights = torch.rand(tokens, topk, device=pgi.device)
    buffer = epcomm.Buffer(pgi.group, num_nvl_bytes=1 << 30, backend="nvlink")
    config = epcomm.Config(sms, 6, 256, 6, 128)
    layout = buffer.get_dispatch_layout(topk_idx, experts)
    xq = quant.per_token_cast_to_fp8(x)

    def dispatch(payload):
        return buffer.dispatch(
            payload,
            num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=topk_idx,
            topk_weights=weights,
            config=config,
        )

    out = dispatch(x)
    handle = out[4]
    return {
        "layout": lambda: buffer.get_dispatch_layout(topk_idx, experts),
        "dispatch_bf16": lambda: dispatch(x),
        "dispatch_fp8": lambda: dispatch(xq),
        "cached_bf16": lambda: buffer.dispatch(x, handle=handle, config=config),
        "combine": lambda: buffer.combine(out[0], handle, config=config),
    }


def cprofile_calls(pgi, fn: Callable[[], object], sort: str, limit: int, calls: int = 10) -> str | None:
    """cProfile over ``calls`` calls of ``fn`` on every rank (all ranks must call, devices idle
    before and after); rank 0 gets the ``pstats`` text sorted by ``sort`` (``limit`` lines), the
    others ``None``."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    dist.barrier()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    if pgi.rank != 0:
        return None
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(limit)
    return text.getvalue()


def worker(pgi, tokens: int, hidden: int, experts: int, topk: int) -> str:
    ops = normal_ops(pgi, tokens, hidden, experts, topk)
    lines = []
    for name, fn in ops.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        begin = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        lines.append(
            f"rank {pgi.rank} {name}: {(time.perf_counter() - begin) / 10 * 1e6:.0f} us/call back-to-back"
        )
    # Host (Python) cost per call, steady state: cProfile over 10 calls of each op, rank 0's.
    for name in ("dispatch_bf16", "combine"):
        text = cprofile_calls(pgi, ops[name], "tottime", 22)
        if text is not None:
            lines.append(f"== cProfile {name} (10 calls)\n" + text)
    if pgi.rank == 0:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(3):
                ops["dispatch_bf16"]()
                ops["combine"]()
            torch.cuda.synchronize()
        out_dir = os.environ.get("OUT")
        if out_dir:
            prof.export_chrome_trace(os.path.join(out_dir, "trace_normal_rank0.json"))
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
        lines.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18))
    else:
        for _ in range(3):
            ops["dispatch_bf16"]()
            ops["combine"]()
        torch.cuda.synchronize()
    return "\n".join(lines)


if __name__ == "__main__":
    results = parallel_launch(
        max(2, torch.cuda.device_count()), worker, 4096, 7168, 256, 8, backend="nccl", timeout_s=600
    )
    for r in results:
        print(r)
