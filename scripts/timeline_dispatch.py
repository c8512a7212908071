"""One rank's device timeline of normal-mode calls: each kernel and copy with its stream, start and duration.

The last two of ``--calls`` calls (each after a device sync) of each op, on rank 0: every device
activity with its stream, its start relative to the call's first activity and its duration. Shows
what overlaps what (the push kernel, the copy-out of the received rows, the metadata copy-out) and
where the device waits for the host.

    python3 scripts/timeline_dispatch.py [--num-ranks N] [--ops dispatch_bf16,...] [--calls 4]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

if "src" not in os.environ.get("PYTHONPATH", ""):  # else the caller chose the code (A/B runs)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_normal import normal_ops

from epcomm.testing import parallel_launch


def worker(pgi, ops_names: list[str], calls: int) -> str:
    ops = normal_ops(pgi, 4096, 7168, 256, 8)
    lines = []
    for name in ops_names:
        fn = ops[name]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                torch.cuda.synchronize()
                fn()
            torch.cuda.synchronize()
        events = [
            ev
            for ev in prof.profiler.kineto_results.events()
            if ev.device_type() == torch.profiler.DeviceType.CUDA and ev.duration_ns() > 0
        ]
        events.sort(key=lambda ev: ev.start_ns())
        # Calls are separated by a synchronize: split where the device was idle for > 200 us.
        groups: list[list] = []
        for ev in events:
            if (
                not groups
                or ev.start_ns() - max(e.start_ns() + e.duration_ns() for e in groups[-1]) > 200_000
            ):
                groups.append([])
            groups[-1].append(ev)
        if pgi.rank != 0:
            continue
        for i, group in enumerate(groups[-2:]):
            t0 = group[0].start_ns()
            end = max(e.start_ns() + e.duration_ns() for e in group)
            busy = sum(e.duration_ns() for e in group)
            lines.append(
                f"== {name}, call {i}: span {(end - t0) / 1e3:.1f} us, summed activities {busy / 1e3:.1f} us"
            )
            for ev in group:
                lines.append(
                    f"  stream {ev.device_resource_id():>3}  +{(ev.start_ns() - t0) / 1e3:7.1f} us  "
                    f"{ev.duration_ns() / 1e3:7.1f} us  {str(ev.name())[:70]}"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-ranks", type=int, default=1)
    parser.add_argument("--ops", default="dispatch_bf16,dispatch_fp8")
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    results = parallel_launch(
        args.num_ranks, worker, args.ops.split(","), args.calls, backend="nccl", timeout_s=600
    )
    print(results[0])
