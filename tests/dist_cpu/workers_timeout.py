"""Workers of the timeout test: rank 1 skips the calls, rank 0 must fail naming it within the bound."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from epcomm import Buffer
from epcomm.env import Settings
from epcomm.errors import PeerLostError, PeerTimeoutError
from epcomm.testing import ProcessGroupInfo

from .naive import Case, make_inputs
from .workers_normal import BACKEND

TIMEOUT_S = 3
# Rank 1 stays alive (without calling anything) at most this long, waiting for rank 0 to finish:
# exiting earlier would close the connections and fail rank 0 for another reason than the timeout.
PEER_LINGER_S = 60.0


def _timed(call: Any) -> dict[str, Any]:
    start = time.monotonic()
    try:
        call()
    except (PeerTimeoutError, PeerLostError) as error:
        return {
            "elapsed_s": time.monotonic() - start,
            "kind": type(error).__name__,
            "message": str(error),
            "operation": error.operation,
            "rank": error.rank,
            "missing_peers": error.missing_peers if isinstance(error, PeerTimeoutError) else error.lost_peers,
        }
    return {"elapsed_s": time.monotonic() - start, "message": None}


def _timed_call(buffer: Buffer, operation: str, mine: Any, case: Case, capacity: int) -> dict[str, Any]:
    """``_timed`` of one ``dispatch`` (after its layout) or ``low_latency_dispatch`` of ``mine``."""
    if operation == "dispatch":
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
            mine.topk_idx, case.num_experts
        )
        return _timed(
            lambda: buffer.dispatch(
                mine.x,
                num_tokens_per_rank=num_tokens_per_rank,
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert,
                topk_idx=mine.topk_idx,
                topk_weights=mine.topk_weights,
            )
        )
    return _timed(lambda: buffer.low_latency_dispatch(mine.x, mine.topk_idx, capacity, case.num_experts))


def skipped_peer_worker(pgi: ProcessGroupInfo, case: Case, operation: str, done_file: str) -> dict[str, Any]:
    """Rank 0 calls ``operation`` (``dispatch`` or ``low_latency_dispatch``); rank 1 does not.

    One operation per launch: after a timeout gloo closes the connection to the peer, so the group
    cannot be used for a second one.
    """
    capacity = max(case.num_tokens, 1)
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
        capacity, case.hidden, pgi.world_size, case.num_experts
    )
    outcome: dict[str, Any] = {}
    with Buffer(
        pgi.group,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        backend=BACKEND,
        settings=Settings(timeout_s=TIMEOUT_S),
    ) as buffer:
        if pgi.rank == 1:
            deadline = time.monotonic() + PEER_LINGER_S
            while not Path(done_file).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return outcome
        mine = make_inputs(case, pgi.rank, pgi.world_size)
        outcome = _timed_call(buffer, operation, mine, case, capacity)
    Path(done_file).touch()
    return outcome


def absent_peer_worker(pgi: ProcessGroupInfo, local_world_size: int | None, done_file: str) -> dict[str, Any]:
    """Rank 1 never builds its ``Buffer``; rank 0's ``Buffer()`` must fail naming it within the bound
    (``local_world_size``: given, so no host-name exchange follows, or ``None``)."""
    if pgi.rank == 1:
        deadline = time.monotonic() + PEER_LINGER_S
        while not Path(done_file).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {}
    settings = Settings(timeout_s=TIMEOUT_S, local_world_size=local_world_size)
    outcome = _timed(lambda: Buffer(pgi.group, backend=BACKEND, settings=settings))
    Path(done_file).write_text("done")
    return outcome


def dead_peer_worker(pgi: ProcessGroupInfo, case: Case, operation: str, result_file: str) -> dict[str, Any]:
    """Rank 1 is killed (SIGKILL) after both ranks built their buffers; rank 0 then calls
    ``operation`` and writes what it raised to ``result_file`` (the launch itself fails: a rank died),
    then builds a new group and ``Buffer`` over itself alone to show the process can go on."""
    capacity = max(case.num_tokens, 1)
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
        capacity, case.hidden, pgi.world_size, case.num_experts
    )
    settings = Settings(timeout_s=TIMEOUT_S)
    buffer = Buffer(
        pgi.group, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True, backend=BACKEND, settings=settings
    )
    mine = make_inputs(case, pgi.rank, pgi.world_size)
    dist.barrier(group=pgi.group)
    if pgi.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # the peer is gone
    outcome = _timed_call(buffer, operation, mine, case, capacity)
    buffer.destroy()
    alone = dist.new_group([0], backend="gloo")
    with Buffer(alone, backend=BACKEND, settings=settings) as fresh:
        outcome["fresh_buffer_ranks"] = fresh.group_size
    Path(result_file).write_text(json.dumps(outcome))
    return outcome
