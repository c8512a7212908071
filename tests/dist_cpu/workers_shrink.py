"""Shrink-mode workers: ranks stop calling (they stay alive, then return), the others go on.

Each worker builds its ``Buffer`` on a fresh gloo group of all ranks: the messages a dropped
rank never answers stay posted on that group (gloo cannot cancel them), and the tier's process
pools run later tests on the default group.

A rank that stops waits (without calling anything) until every rank that goes on has written its
done file, then returns: exiting earlier would close its connections, which the others would see
as a lost peer rather than a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from epcomm import Buffer
from epcomm.env import Settings
from epcomm.errors import PeerMaskedWarning, PeerTimeoutError
from epcomm.testing import ProcessGroupInfo

from .naive import Case, make_all_inputs, naive_low_latency_dispatch
from .workers_low_latency import _check_combined, _expert_outputs, check_low_latency_dispatch
from .workers_normal import BACKEND

# The shrink timeout of these tests, and the general bound (EPCOMM_TIMEOUT_S), which must be longer.
SHRINK_TIMEOUT_S = 1.5
TIMEOUT_S = 30.0
# The bound of the test without shrink mode (its timeout is the error under test).
NO_SHRINK_TIMEOUT_S = 2.0
# A stopped rank waits at most this long for the others' done files.
LINGER_S = 90.0

# The calls of one round, by the name a PeerMaskedWarning / PeerTimeoutError gives them.
OPERATIONS = ("low_latency_dispatch", "low_latency_combine", "clean_low_latency_buffer")


@dataclasses.dataclass
class CallRecord:
    """What one call on a rank that goes on did: its round and operation, how long it took, the
    mask queried after it and the ``PeerMaskedWarning`` s it emitted."""

    round: int
    operation: str
    elapsed_s: float
    mask: list[int]
    warnings: list[tuple[str, int, int, str]]  # (operation, rank, peer, message)


def _fresh_group(pgi: ProcessGroupInfo) -> Any:
    return dist.new_group(list(range(pgi.world_size)), backend="gloo")


def _buffer(
    group: Any, case: Case, capacity: int, world_size: int, settings: Settings, shrink: bool
) -> Buffer:
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
        capacity, case.hidden, world_size, case.num_experts
    )
    return Buffer(
        group,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        enable_shrink=shrink,
        backend=BACKEND,
        settings=settings,
    )


def _linger(done_dir: str, others: Sequence[int]) -> None:
    """Wait until every rank in ``others`` wrote its done file (at most ``LINGER_S``)."""
    deadline = time.monotonic() + LINGER_S
    while time.monotonic() < deadline and not all((Path(done_dir) / f"rank{r}").exists() for r in others):
        time.sleep(0.05)


def _record(
    buffer: Buffer, num_ranks: int, round_index: int, operation: str, call: Callable[[], Any]
) -> tuple[Any, CallRecord]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        result = call()
        elapsed = time.monotonic() - start
    mask = torch.full((num_ranks,), 7, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(mask)
    masked = [
        (w.message.operation, w.message.rank, w.message.peer, str(w.message))
        for w in caught
        if isinstance(w.message, PeerMaskedWarning)
    ]
    return result, CallRecord(round_index, operation, elapsed, mask.tolist(), masked)


def shrink_drop_worker(
    pgi: ProcessGroupInfo,
    case: Case,
    capacity: int,
    stops: Mapping[int, str],
    num_rounds: int,
    done_dir: str,
) -> list[CallRecord]:
    """Rounds of (dispatch, combine, clean) in shrink mode; rank ``r`` in ``stops`` stops at its
    first call of ``stops[r]`` (an entry of ``OPERATIONS``). Every other rank checks each call: its
    results against the naive oracle with the ranks dropped so far masked, its mask, its warnings.
    Returns the records of the calls (empty on a rank that stopped)."""
    me, num_ranks = pgi.rank, pgi.world_size
    group = _fresh_group(pgi)
    settings = Settings(timeout_s=TIMEOUT_S, shrink_timeout_s=SHRINK_TIMEOUT_S)
    going_on = [r for r in range(num_ranks) if r not in stops]
    records: list[CallRecord] = []
    results: list[tuple[Case, Any, torch.Tensor]] = []
    buffer = _buffer(group, case, capacity, num_ranks, settings, shrink=True)
    try:
        for round_index in range(num_rounds):
            round_case = dataclasses.replace(case, seed=case.seed + round_index)
            mine = make_all_inputs(round_case, num_ranks)[me]
            for operation in OPERATIONS:
                if stops.get(me) == operation:
                    _linger(done_dir, going_on)
                    return []
                if operation == "low_latency_dispatch":
                    dispatched, record = _record(
                        buffer,
                        num_ranks,
                        round_index,
                        operation,
                        lambda m=mine: buffer.low_latency_dispatch(
                            m.x, m.topk_idx, capacity, case.num_experts, use_fp8=False
                        ),
                    )
                elif operation == "low_latency_combine":
                    recv_x, recv_count, handle = dispatched[0], dispatched[1], dispatched[2]
                    outputs = _expert_outputs(round_case, me, recv_x, recv_count)
                    combined, record = _record(
                        buffer,
                        num_ranks,
                        round_index,
                        operation,
                        lambda m=mine, o=outputs, h=handle: buffer.low_latency_combine(
                            o, m.topk_idx, m.topk_weights, h
                        ),
                    )
                    results.append((round_case, dispatched, combined[0]))
                else:
                    _, record = _record(
                        buffer,
                        num_ranks,
                        round_index,
                        operation,
                        lambda: buffer.clean_low_latency_buffer(capacity, case.hidden, case.num_experts),
                    )
                records.append(record)
    finally:
        buffer.destroy()
        if me in going_on:
            (Path(done_dir) / f"rank{me}").touch()
    _check_records(records, results, me, num_ranks, case, capacity, stops)
    return records


def _dropped_after(stops: Mapping[int, str], round_index: int, operation: str) -> list[int]:
    """The ranks that stopped at or before ``operation`` of round ``round_index``."""
    done = OPERATIONS.index(operation) if round_index == 0 else len(OPERATIONS)
    return sorted(r for r, op in stops.items() if OPERATIONS.index(op) <= done)


def _check_records(
    records: Sequence[CallRecord],
    results: Sequence[tuple[Case, Any, torch.Tensor]],
    me: int,
    num_ranks: int,
    case: Case,
    capacity: int,
    stops: Mapping[int, str],
) -> None:
    for record in records:
        where = f"rank {me}, round {record.round}, {record.operation}"
        dropped = _dropped_after(stops, record.round, record.operation)
        expected_mask = [int(r in dropped) for r in range(num_ranks)]
        assert record.mask == expected_mask, f"{where}: mask {record.mask}, expected {expected_mask}"
        newly = sorted(r for r, op in stops.items() if record.round == 0 and op == record.operation)
        got = sorted(peer for _, _, peer, _ in record.warnings)
        assert got == newly, (
            f"{where}: PeerMaskedWarning for peers {got}, expected {newly}: {record.warnings}"
        )
        for operation, rank, peer, message in record.warnings:
            assert (operation, rank) == (record.operation, me), f"{where}: warning {message!r}"
            expected = f"epcomm: {record.operation} on rank {me}: peer {peer} did not arrive within"
            assert message.startswith(expected), message
            assert message.endswith("masked (shrink mode)"), message
            assert "\n" not in message, message
        if newly:
            assert record.elapsed_s >= SHRINK_TIMEOUT_S - 0.05, (
                f"{where}: masked {newly} after {record.elapsed_s:.2f} s; the shrink timeout is {SHRINK_TIMEOUT_S} s"
            )
    # A round without new drops neither sends to nor waits for the masked ranks.
    last_round = [r for r in records if r.round == records[-1].round]
    if records[-1].round > 0:
        slowest = max(r.elapsed_s for r in last_round)
        assert slowest < SHRINK_TIMEOUT_S, f"rank {me}: a call of the last round took {slowest:.2f} s"
    for round_index, (round_case, dispatched, combined) in enumerate(results):
        all_inputs = make_all_inputs(round_case, num_ranks)
        at_dispatch = _dropped_after(stops, round_index, "low_latency_dispatch")
        expected = naive_low_latency_dispatch(all_inputs, me, case.num_experts, masked_ranks=at_dispatch)
        try:
            check_low_latency_dispatch(
                dispatched, expected, all_inputs, round_case, capacity, "bf16", masked_ranks=at_dispatch
            )
        except AssertionError as error:
            raise AssertionError(f"rank {me}, round {round_index}: {error}") from error
        at_combine = _dropped_after(stops, round_index, "low_latency_combine")
        _check_combined(
            combined,
            all_inputs[me],
            me,
            round_case,
            num_ranks,
            f"low_latency_combine of round {round_index} (masked {at_combine})",
            masked_ranks=at_combine,
        )


def no_shrink_timeout_worker(
    pgi: ProcessGroupInfo, case: Case, capacity: int, stop_at: str, done_dir: str
) -> dict[str, Any]:
    """Without shrink mode, rank 1 stops at its first ``stop_at``; rank 0's call must raise
    ``PeerTimeoutError`` naming the operation, rank 0 and peer 1. Returns rank 0's outcome."""
    me, num_ranks = pgi.rank, pgi.world_size
    group = _fresh_group(pgi)
    settings = Settings(timeout_s=NO_SHRINK_TIMEOUT_S, shrink_timeout_s=NO_SHRINK_TIMEOUT_S / 2)
    mine = make_all_inputs(case, num_ranks)[me]
    outcome: dict[str, Any] = {}
    with _buffer(group, case, capacity, num_ranks, settings, shrink=False) as buffer:
        try:
            for operation in OPERATIONS:
                if me == 1 and operation == stop_at:
                    _linger(done_dir, [0])
                    return outcome
                start = time.monotonic()
                try:
                    if operation == "low_latency_dispatch":
                        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
                            mine.x, mine.topk_idx, capacity, case.num_experts, use_fp8=False
                        )
                    elif operation == "low_latency_combine":
                        outputs = _expert_outputs(case, me, recv_x, recv_count)
                        buffer.low_latency_combine(outputs, mine.topk_idx, mine.topk_weights, handle)
                    else:
                        buffer.clean_low_latency_buffer(capacity, case.hidden, case.num_experts)
                except PeerTimeoutError as error:
                    outcome = {
                        "elapsed_s": time.monotonic() - start,
                        "operation": error.operation,
                        "rank": error.rank,
                        "missing_peers": error.missing_peers,
                        "message": str(error),
                    }
                    return outcome
        finally:
            if me == 0:
                (Path(done_dir) / "rank0").touch()
    raise AssertionError(f"rank {me}: every call returned although rank 1 stopped at {stop_at}")


def killed_peer_worker(pgi: ProcessGroupInfo, case: Case, capacity: int, result_file: str) -> None:
    """Shrink mode, 2 fresh processes: rank 1 is killed (SIGKILL) after both built their buffers;
    rank 0's next dispatch and combine must finish with rank 1 masked (a warning naming it), match
    the naive results with rank 1 masked, and so must a second round. Rank 0 writes what it saw to
    ``result_file`` (the launch itself fails: a rank died)."""
    me, num_ranks = pgi.rank, pgi.world_size
    settings = Settings(timeout_s=TIMEOUT_S, shrink_timeout_s=SHRINK_TIMEOUT_S)
    buffer = _buffer(pgi.group, case, capacity, num_ranks, settings, shrink=True)
    dist.barrier(group=pgi.group)
    if me == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # the peer is gone
    outcome: dict[str, Any] = {"records": [], "error": None}
    try:
        for round_index in range(2):
            round_case = dataclasses.replace(case, seed=case.seed + round_index)
            all_inputs = make_all_inputs(round_case, num_ranks)
            mine = all_inputs[me]
            dispatched, record = _record(
                buffer,
                num_ranks,
                round_index,
                "low_latency_dispatch",
                lambda m=mine: buffer.low_latency_dispatch(
                    m.x, m.topk_idx, capacity, case.num_experts, use_fp8=False
                ),
            )
            outcome["records"].append(dataclasses.asdict(record))
            outputs = _expert_outputs(round_case, me, dispatched[0], dispatched[1])
            combined, record = _record(
                buffer,
                num_ranks,
                round_index,
                "low_latency_combine",
                lambda m=mine, o=outputs, h=dispatched[2]: buffer.low_latency_combine(
                    o, m.topk_idx, m.topk_weights, h
                ),
            )
            outcome["records"].append(dataclasses.asdict(record))
            expected = naive_low_latency_dispatch(all_inputs, me, case.num_experts, masked_ranks=[1])
            check_low_latency_dispatch(
                dispatched, expected, all_inputs, round_case, capacity, "bf16", masked_ranks=[1]
            )
            _check_combined(
                combined[0], mine, me, round_case, num_ranks, "low_latency_combine", masked_ranks=[1]
            )
    except Exception as error:  # reported through the file: the launch only says that rank 1 died
        outcome["error"] = f"{type(error).__name__}: {error}"
    buffer.destroy()
    Path(result_file).write_text(json.dumps(outcome))


def unmask_after_timeout_worker(
    pgi: ProcessGroupInfo, case: Case, capacity: int, done_dir: str
) -> list[CallRecord]:
    """2 ranks, shrink mode: rank 1 skips the first dispatch and comes back one call behind (it
    makes its second and third dispatches once rank 0 has given up on the first). Rank 0 masks it,
    unmasks it and dispatches again: rank 1's messages must not be taken for that call (the first
    would go to the receive abandoned in the first call, the next one to the second call: data of
    another step). Rank 1 is masked again, with a warning, and rank 0's results are those with
    rank 1 masked. Returns rank 0's two records (rank 1's results are not checked)."""
    me, num_ranks = pgi.rank, pgi.world_size
    group = _fresh_group(pgi)
    settings = Settings(timeout_s=TIMEOUT_S, shrink_timeout_s=SHRINK_TIMEOUT_S)
    buffer = _buffer(group, case, capacity, num_ranks, settings, shrink=True)
    cases = [dataclasses.replace(case, seed=case.seed + i) for i in range(3)]
    records: list[CallRecord] = []
    results = []
    try:
        if me == 1:
            time.sleep(SHRINK_TIMEOUT_S + 0.5)  # rank 0 gave up on the first dispatch, is in the second
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PeerMaskedWarning)
                for round_case in cases[1:]:
                    mine = make_all_inputs(round_case, num_ranks)[me]
                    buffer.low_latency_dispatch(
                        mine.x, mine.topk_idx, capacity, case.num_experts, use_fp8=False
                    )
            _linger(done_dir, [0])
            return []
        for index, round_case in enumerate(cases[:2]):
            if index == 1:
                buffer.low_latency_clean_mask_buffer()
            mine = make_all_inputs(round_case, num_ranks)[me]
            result, record = _record(
                buffer,
                num_ranks,
                index,
                "low_latency_dispatch",
                lambda m=mine: buffer.low_latency_dispatch(
                    m.x, m.topk_idx, capacity, case.num_experts, use_fp8=False
                ),
            )
            records.append(record)
            results.append(result)
    finally:
        buffer.destroy()
        if me == 0:
            (Path(done_dir) / "rank0").touch()
    for record, result, round_case in zip(records, results, cases, strict=False):
        assert record.mask == [0, 1], f"call {record.round}: mask {record.mask}"
        assert [w[:3] for w in record.warnings] == [("low_latency_dispatch", 0, 1)], record.warnings
        all_inputs = make_all_inputs(round_case, num_ranks)
        expected = naive_low_latency_dispatch(all_inputs, me, case.num_experts, masked_ranks=[1])
        try:
            check_low_latency_dispatch(
                result, expected, all_inputs, round_case, capacity, "bf16", masked_ranks=[1]
            )
        except AssertionError as error:
            raise AssertionError(f"call {record.round}: {error}") from error
    return records
