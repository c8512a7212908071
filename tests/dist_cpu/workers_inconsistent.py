"""Workers of the inconsistent-call test: one rank calls normal mode differently from the others.

Every rank records what its differing call raised, then all ranks make one matching dispatch and
combine (checked against the naive oracle) to show the failed call left no message pending.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from epcomm import Buffer, InconsistentCallError
from epcomm.env import Settings
from epcomm.handles import DispatchHandle
from epcomm.quant import per_token_cast_to_fp8
from epcomm.testing import ProcessGroupInfo

from .naive import (
    Case,
    RankInputs,
    assert_rows_equal,
    make_all_inputs,
    naive_combine,
    naive_dispatch,
    naive_low_latency_dispatch,
    power_of_two_scale,
)
from .workers_normal import BACKEND, assert_combined_close

# A call that waited for its peer instead of raising at once would take this long (and fail the
# test's bound on the error's delay).
TIMEOUT_S = 10.0

# Row -> (what the odd rank does differently, the field the error must name).
ROWS: dict[str, str] = {
    "hidden": "hidden differs",
    "num_topk": "num_topk differs",
    "fp8_vs_bf16": "x format differs",
    "num_experts": "num_experts differs",
    "call_order": "operation differs",  # others: dispatch, dispatch; odd rank: dispatch, combine
    "cached_vs_fresh": "operation differs",  # others: fresh dispatch; odd rank: cached dispatch
    "other_handle": "handle differs",  # combine with the handle of another dispatch
}


def _dispatch(
    buffer: Buffer,
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    inputs: RankInputs,
    num_experts: int,
    num_topk: int | None = None,
) -> tuple[Any, ...]:
    topk_idx = inputs.topk_idx[:, :num_topk]
    topk_weights = inputs.topk_weights[:, :num_topk]
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, num_experts
    )
    return buffer.dispatch(
        x,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
    )


def _differing_call(buffer: Buffer, row: str, is_odd: bool, mine: RankInputs, case: Case) -> None:
    """The call of ``row`` (after the matching calls it needs first): the odd rank's differs."""
    x, num_experts = mine.x, case.num_experts
    if row in ("call_order", "cached_vs_fresh", "other_handle"):
        recv_x, _, recv_topk_weights, _, handle, _ = _dispatch(buffer, x, mine, num_experts)
        assert isinstance(handle, DispatchHandle)
        if row == "call_order":
            if is_odd:
                buffer.combine(recv_x, handle, topk_weights=recv_topk_weights)
            else:
                _dispatch(buffer, x, mine, num_experts)
        elif row == "cached_vs_fresh":
            if is_odd:
                buffer.dispatch(x, handle=handle)
            else:
                _dispatch(buffer, x, mine, num_experts)
        else:
            second_x, _, second_weights, _, second_handle, _ = _dispatch(buffer, x, mine, num_experts)
            if is_odd:
                buffer.combine(recv_x, handle, topk_weights=recv_topk_weights)
            else:
                buffer.combine(second_x, second_handle, topk_weights=second_weights)
        return
    if is_odd and row == "hidden":
        x = torch.cat([x, x], dim=1)
    if is_odd and row == "num_experts":
        num_experts *= 2
    num_topk = case.num_topk // 2 if is_odd and row == "num_topk" else None
    sent: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = x
    if is_odd and row == "fp8_vs_bf16":
        sent = per_token_cast_to_fp8(x)
    _dispatch(buffer, sent, mine, num_experts, num_topk)


def _raised(error: InconsistentCallError) -> dict[str, Any]:
    """What the test checks of the error a rank raised."""
    return {
        "kind": type(error).__name__,
        "message": str(error),
        "rank": error.rank,
        "peer": error.peer,
        "mine": error.mine,
        "theirs": error.theirs,
        "is_value_error": isinstance(error, ValueError),
    }


def inconsistent_call_worker(pgi: ProcessGroupInfo, case: Case, row: str, odd_rank: int) -> dict[str, Any]:
    """Rank ``odd_rank`` makes the differing call of ``row``; every rank returns what it raised
    (``kind``, ``message``, ``peer``, ``elapsed_s``) and whether the matching dispatch and combine
    that follow were right (``recovered``)."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    outcome: dict[str, Any] = {"kind": None, "message": None}
    with Buffer(pgi.group, backend=BACKEND, settings=Settings(timeout_s=TIMEOUT_S)) as buffer:
        start = time.monotonic()
        try:
            _differing_call(buffer, row, me == odd_rank, mine, case)
        except InconsistentCallError as error:
            outcome = _raised(error)
        outcome["elapsed_s"] = time.monotonic() - start
        recv_x, _, recv_topk_weights, _, handle, _ = _dispatch(buffer, mine.x, mine, case.num_experts)
        assert isinstance(recv_x, torch.Tensor)
        combined, _, _ = buffer.combine(
            recv_x * power_of_two_scale(me), handle, topk_weights=recv_topk_weights
        )
    expected = naive_dispatch(all_inputs, me, case.num_experts)
    assert_rows_equal(recv_x, expected.x, expected.keys, "recv_x of the dispatch after the error")
    expected_combined, _ = naive_combine(mine, num_ranks, case.num_experts)
    token_keys = [(me, token) for token in range(mine.x.size(0))]
    assert_combined_close(combined, expected_combined, token_keys, "combined_x after the error")
    outcome["recovered"] = True
    return outcome


# Low-latency rows -> the field the error must name.
LOW_LATENCY_ROWS: dict[str, str] = {
    "ll_capacity": "capacity differs",
    "ll_hidden": "hidden differs",
    "ll_num_experts": "num_experts differs",
    "ll_fp8_vs_bf16": "x format differs",
    "ll_call_order": "operation differs",  # others: dispatch, dispatch; odd rank: dispatch, combine
    "ll_other_handle": "handle differs",  # combine with the handle of the earlier dispatch
    "ll_clean_vs_dispatch": "operation differs",  # odd rank: clean_low_latency_buffer
}
LL_CAPACITY = 32


def _differing_low_latency_call(buffer: Buffer, row: str, is_odd: bool, mine: RankInputs, case: Case) -> None:
    x, topk_idx, num_experts, capacity = mine.x, mine.topk_idx, case.num_experts, LL_CAPACITY
    if row in ("ll_call_order", "ll_other_handle"):
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, capacity, num_experts, use_fp8=False
        )
        if row == "ll_call_order":
            if is_odd:
                buffer.low_latency_combine(recv_x, topk_idx, mine.topk_weights, handle)
            else:
                buffer.low_latency_dispatch(x, topk_idx, capacity, num_experts, use_fp8=False)
            return
        second_x, _, second_handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, capacity, num_experts, use_fp8=False
        )
        if is_odd:
            buffer.low_latency_combine(recv_x, topk_idx, mine.topk_weights, handle)
        else:
            buffer.low_latency_combine(second_x, topk_idx, mine.topk_weights, second_handle)
        return
    if row == "ll_clean_vs_dispatch" and is_odd:
        buffer.clean_low_latency_buffer(capacity, x.size(1), num_experts)
        return
    use_fp8 = False
    if is_odd and row == "ll_capacity":
        capacity *= 2
    if is_odd and row == "ll_hidden":
        x = torch.cat([x, x], dim=1)
    if is_odd and row == "ll_num_experts":
        num_experts *= 2
    if is_odd and row == "ll_fp8_vs_bf16":
        use_fp8 = True
    buffer.low_latency_dispatch(x, topk_idx, capacity, num_experts, use_fp8=use_fp8)


def inconsistent_low_latency_worker(
    pgi: ProcessGroupInfo, case: Case, row: str, odd_rank: int
) -> dict[str, Any]:
    """As ``inconsistent_call_worker`` for a low-latency call; then a matching low-latency dispatch
    whose counts must be the naive oracle's (``recovered``)."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    outcome: dict[str, Any] = {"kind": None, "message": None}
    # Room for the largest call of any row (twice the capacity, hidden and experts).
    size = Buffer.get_low_latency_rdma_size_hint(
        2 * LL_CAPACITY, 2 * case.hidden, num_ranks, 2 * case.num_experts
    )
    with Buffer(
        pgi.group,
        num_rdma_bytes=size,
        low_latency_mode=True,
        backend=BACKEND,
        settings=Settings(timeout_s=TIMEOUT_S),
    ) as buffer:
        start = time.monotonic()
        try:
            _differing_low_latency_call(buffer, row, me == odd_rank, mine, case)
        except InconsistentCallError as error:
            outcome = _raised(error)
        outcome["elapsed_s"] = time.monotonic() - start
        _, recv_count, _, _, _ = buffer.low_latency_dispatch(
            mine.x, mine.topk_idx, LL_CAPACITY, case.num_experts, use_fp8=False
        )
    expected = naive_low_latency_dispatch(all_inputs, me, case.num_experts)
    assert recv_count.tolist() == [len(keys) for keys in expected.keys], "dispatch after the error"
    outcome["recovered"] = True
    return outcome
