"""Workers for the GPU reliability checks: a peer that dies between calls."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import epcomm
from epcomm.env import Settings
from epcomm.testing import ProcessGroupInfo, make_routing


def dead_peer(pgi: ProcessGroupInfo, operation: str, timeout_s: float, result_file: str) -> None:
    """Rank 1 is killed (SIGKILL) after both ranks built their NVLink buffers; rank 0 then calls
    ``operation`` (``dispatch`` or ``low_latency_dispatch``) and, after a device synchronization,
    once more: it writes to ``result_file`` what it raised, how long that took, and whether it could
    destroy its ``Buffer`` and build a new group and ``Buffer`` over itself alone."""
    hidden, num_experts, num_topk, capacity = 256, 8 * pgi.world_size, 4, 32
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, pgi.world_size, num_experts)
    settings = Settings(timeout_s=timeout_s)
    buffer = epcomm.Buffer(
        pgi.group,
        num_nvl_bytes=1 << 22,
        num_rdma_bytes=size,
        low_latency_mode=operation.startswith("low_latency"),
        backend="nvlink",
        settings=settings,
    )
    routing = make_routing(capacity, num_experts, num_topk, seed=3, rank=pgi.rank, device=pgi.device)
    x = torch.randn(capacity, hidden, dtype=torch.float32, device=pgi.device).bfloat16()
    torch.cuda.synchronize()
    dist.barrier(group=pgi.group)
    if pgi.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # the peer is gone
    outcome: dict[str, Any] = {"kind": None, "message": None}
    begin = time.monotonic()
    try:
        for _ in range(2):  # the device reports a timed-out wait at the next call
            if operation == "dispatch":
                layout = buffer.get_dispatch_layout(routing.topk_idx, num_experts)
                buffer.dispatch(
                    x,
                    num_tokens_per_rank=layout[0],
                    is_token_in_rank=layout[3],
                    num_tokens_per_expert=layout[2],
                    topk_idx=routing.topk_idx,
                )
            else:
                buffer.low_latency_dispatch(x, routing.topk_idx, capacity, num_experts, use_fp8=False)
            torch.cuda.synchronize()
    except (epcomm.errors.PeerTimeoutError, epcomm.errors.PeerLostError) as error:
        outcome = {"kind": type(error).__name__, "message": str(error)}
    except Exception as error:  # recorded: the test names what went wrong
        outcome = {"kind": f"other: {type(error).__name__}", "message": str(error)[:300]}
    outcome["elapsed_s"] = time.monotonic() - begin
    try:
        buffer.destroy()
        alone = dist.new_group([0], backend="gloo", use_local_synchronization=True)
        with epcomm.Buffer(alone, num_nvl_bytes=1 << 20, backend="nvlink", settings=settings) as fresh:
            outcome["fresh_buffer_ranks"] = fresh.group_size
    except Exception as error:
        outcome["fresh_buffer_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    Path(result_file).write_text(json.dumps(outcome))
