"""Workers of ``test_scale``: 8 ranks, and 4 ranks laid out as several nodes (``LOCAL_WORLD_SIZE``).

The checks reuse ``naive`` and the normal / low-latency workers; only what those do not cover is
here: the low-latency FP8 round trip (dispatch in FP8, combine the cast-back rows) and the per-node
layout counts (``num_tokens_per_rdma_rank``) of a multi-node layout.
"""

from __future__ import annotations

import os

import torch

from epcomm import Buffer
from epcomm.quant import per_token_cast_back
from epcomm.testing import ProcessGroupInfo

from .naive import (
    Case,
    assert_rows_close,
    assert_rows_equal,
    make_all_inputs,
    naive_combine,
    naive_dispatch,
    naive_low_latency_combine,
    naive_low_latency_dispatch,
    power_of_two_scale,
)
from .workers_low_latency import (
    DISPATCH_MODES,
    _expert_outputs,
    _low_latency_buffer,
    check_low_latency_dispatch,
)
from .workers_normal import (
    BACKEND,
    FP8_ATOL_OF_GROUP_MAX,
    FP8_RTOL,
    _check_dispatch_metadata,
    _check_layout,
    assert_combined_close,
)


def low_latency_fp8_round_trip_worker(pgi: ProcessGroupInfo, case: Case, capacity: int, mode: str) -> None:
    """FP8 ``low_latency_dispatch``, experts return the cast-back rows scaled, ``low_latency_combine``.

    Every expert of a token gets the same row ``x`` and returns it times a positive power of two, and
    the weights are positive: the combined row is ``x * c`` with ``c > 0``, so the FP8 error stays
    relative to ``x`` (same tolerance as the cast back itself).
    """
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    use_fp8, round_scale, use_ue8m0 = DISPATCH_MODES[mode]
    assert use_fp8, mode
    with _low_latency_buffer(pgi, case, capacity) as buffer:
        result = buffer.low_latency_dispatch(
            mine.x,
            mine.topk_idx,
            capacity,
            case.num_experts,
            use_fp8=True,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
        )
        recv_x, recv_count, handle = result[0], result[1], result[2]
        assert isinstance(recv_x, tuple), type(recv_x)
        x_fp8, scales = recv_x
        cast_back = torch.zeros(x_fp8.shape, dtype=torch.bfloat16)
        for local_expert, count in enumerate(recv_count.tolist()):
            cast_back[local_expert, :count] = per_token_cast_back(
                x_fp8[local_expert, :count], scales[local_expert, :count]
            )
        combined, _, _ = buffer.low_latency_combine(
            _expert_outputs(case, me, cast_back, recv_count), mine.topk_idx, mine.topk_weights, handle
        )
    expected = naive_low_latency_dispatch(all_inputs, me, case.num_experts)
    check_low_latency_dispatch(result, expected, all_inputs, case, capacity, mode)
    expected_combined = naive_low_latency_combine(mine, num_ranks, case.num_experts)
    assert combined.dtype == torch.bfloat16, combined.dtype
    assert_rows_close(
        combined,
        expected_combined,
        [(me, token) for token in range(mine.x.size(0))],
        f"low_latency_combine after an FP8 dispatch ({mode})",
        FP8_RTOL,
        FP8_ATOL_OF_GROUP_MAX,
        group_size=128,
        rows_are_structured=False,
    )


# ---- multi-node layouts --------------------------------------------------------------------------


def naive_tokens_per_node(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int
) -> list[int]:
    """Tokens per node: a token counts once for a node if any of its experts lives on that node's ranks."""
    num_local_experts = num_experts // num_ranks
    counts = [0] * (num_ranks // ranks_per_node)
    for experts in topk_idx.tolist():
        for node in {expert // num_local_experts // ranks_per_node for expert in experts if expert >= 0}:
            counts[node] += 1
    return counts


def multi_node_worker(pgi: ProcessGroupInfo, case: Case, local_world_size: int) -> None:
    """``LOCAL_WORLD_SIZE=local_world_size`` (node ``n`` = ranks ``[n * lws, (n + 1) * lws)``): layout
    with per-node counts (``None`` for one node), dispatch with them, combine with weights.

    The pool's processes are shared: the variable is restored before returning.
    """
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    saved = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    try:
        with Buffer(pgi.group, backend=BACKEND) as buffer:
            num_ranks_per_node = buffer.num_ranks_per_node
            layout = buffer.get_dispatch_layout(mine.topk_idx, case.num_experts)
            num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = layout
            recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, _ = buffer.dispatch(
                mine.x,
                num_tokens_per_rank=num_tokens_per_rank,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert,
                topk_idx=mine.topk_idx,
                topk_weights=mine.topk_weights,
            )
            assert isinstance(recv_x, torch.Tensor)
            combined, combined_weights, _ = buffer.combine(
                recv_x * power_of_two_scale(me), handle, topk_weights=recv_topk_weights
            )
    finally:
        if saved is None:
            del os.environ["LOCAL_WORLD_SIZE"]
        else:
            os.environ["LOCAL_WORLD_SIZE"] = saved

    assert num_ranks_per_node == local_world_size, (
        f"Buffer.num_ranks_per_node {num_ranks_per_node}, expected LOCAL_WORLD_SIZE={local_world_size}"
    )
    num_nodes = num_ranks // local_world_size
    if num_nodes == 1:
        assert num_tokens_per_rdma_rank is None, (
            f"one node: num_tokens_per_rdma_rank must be None; got {num_tokens_per_rdma_rank}"
        )
    else:
        assert isinstance(num_tokens_per_rdma_rank, torch.Tensor), type(num_tokens_per_rdma_rank)
        assert num_tokens_per_rdma_rank.dtype == torch.int32, num_tokens_per_rdma_rank.dtype
        assert tuple(num_tokens_per_rdma_rank.shape) == (num_nodes,), tuple(num_tokens_per_rdma_rank.shape)
        expected_per_node = naive_tokens_per_node(
            mine.topk_idx, case.num_experts, num_ranks, local_world_size
        )
        assert num_tokens_per_rdma_rank.tolist() == expected_per_node, (
            f"num_tokens_per_rdma_rank {num_tokens_per_rdma_rank.tolist()}, expected {expected_per_node} "
            f"({num_nodes} nodes x {local_world_size} ranks)"
        )
        if local_world_size == 1:
            assert num_tokens_per_rdma_rank.tolist() == num_tokens_per_rank.tolist(), (
                "one rank per node: num_tokens_per_rdma_rank must equal num_tokens_per_rank"
            )
    # The rest of the layout is as within one node (_check_layout expects None per-node counts).
    _check_layout((num_tokens_per_rank, None, *layout[2:]), mine, case, num_ranks)

    expected = naive_dispatch(all_inputs, me, case.num_experts)
    assert_rows_equal(recv_x, expected.x, expected.keys, "recv_x")
    _check_dispatch_metadata(expected, recv_topk_idx, recv_topk_weights, handle, len(expected.keys))
    assert per_expert_list == expected.num_tokens_per_expert, (
        f"num_recv_tokens_per_expert_list {per_expert_list}, expected {expected.num_tokens_per_expert}"
    )
    expected_combined, expected_weights = naive_combine(mine, num_ranks, case.num_experts)
    token_keys = [(me, token) for token in range(mine.x.size(0))]
    assert_combined_close(combined, expected_combined, token_keys, "combined_x")
    assert combined_weights is not None
    assert_combined_close(combined_weights, expected_weights, token_keys, "combined_topk_weights", 1e-6, 0.0)


def gather_bytes_worker(pgi: ProcessGroupInfo) -> list[bytes]:
    """``all_gather_bytes`` with a different length on every rank (rank 0 sends nothing)."""
    from epcomm._collectives import all_gather_bytes

    return all_gather_bytes(bytes(range(pgi.rank * 3)), pgi.group)
