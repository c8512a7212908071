"""Normal-mode workers: run on every rank of a gloo pool, compare with ``naive`` and raise on mismatch.

Each worker first does all of its communication and only then checks, so that a wrong result on
one rank cannot leave the other ranks waiting for a message that never comes.
"""

from __future__ import annotations

import torch

from epcomm import Buffer
from epcomm.quant import per_token_cast_back, per_token_cast_to_fp8
from epcomm.testing import ProcessGroupInfo

from .cases import caller_defaults
from .naive import (
    Case,
    ExpectedDispatch,
    RankInputs,
    RowKey,
    all_rows,
    assert_rows_close,
    assert_rows_equal,
    make_all_inputs,
    make_x,
    naive_combine,
    naive_dispatch,
    naive_layout,
    power_of_two_scale,
)

# This tier tests the pure-PyTorch reference backend on CPU tensors (asked for explicitly: on a
# machine with GPUs the automatic choice would be the NVLink backend, which needs CUDA tensors).
BACKEND = "reference"

# Combine sums bf16 rows in float32 and rounds once to bf16: one bf16 ulp (2**-8) of slack.
COMBINE_RTOL = 1e-2
COMBINE_ATOL_OF_MAX = 1e-5
# e4m3 keeps 3 mantissa bits (relative error <= 2**-4), plus the bf16 rounding of the cast-back.
FP8_RTOL = 0.07
FP8_ATOL_OF_GROUP_MAX = 1e-4


def assert_combined_close(
    got: torch.Tensor,
    expected: torch.Tensor,
    token_keys: list[RowKey],
    what: str,
    rtol: float = COMBINE_RTOL,
    atol_of_max: float = COMBINE_ATOL_OF_MAX,
) -> None:
    """Combined rows (sums, so their channels no longer encode an origin) within tolerance."""
    assert_rows_close(got, expected, token_keys, what, rtol, atol_of_max, rows_are_structured=False)


def _layout_kwargs(buffer: Buffer, inputs: RankInputs, num_experts: int) -> dict[str, torch.Tensor]:
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        inputs.topk_idx, num_experts
    )
    return {
        "num_tokens_per_rank": num_tokens_per_rank,
        "is_token_in_rank": is_token_in_rank,
        "num_tokens_per_expert": num_tokens_per_expert,
    }


def _check_dispatch_metadata(
    expected: ExpectedDispatch,
    recv_topk_idx: torch.Tensor | None,
    recv_topk_weights: torch.Tensor | None,
    handle: tuple[object, ...],
    num_rows: int,
) -> None:
    """``recv_topk_idx``/``recv_topk_weights`` (first ``len(keys)`` rows) and ``handle[0]``."""
    num_recv = len(expected.keys)
    assert recv_topk_idx is not None
    assert recv_topk_weights is not None
    assert recv_topk_idx.dtype == torch.int64, recv_topk_idx.dtype
    assert recv_topk_weights.dtype == torch.float32, recv_topk_weights.dtype
    assert recv_topk_idx.size(0) == num_rows, (recv_topk_idx.shape, num_rows)
    assert_rows_equal(recv_topk_idx[:num_recv], expected.topk_idx, expected.keys, "recv_topk_idx")
    assert_rows_equal(recv_topk_weights[:num_recv], expected.topk_weights, expected.keys, "recv_topk_weights")
    rank_prefix_matrix = handle[0]
    assert isinstance(rank_prefix_matrix, torch.Tensor)
    assert rank_prefix_matrix.dtype == torch.int32, rank_prefix_matrix.dtype
    assert rank_prefix_matrix.tolist() == expected.rank_prefix_matrix, (
        f"handle[0] (rank_prefix_matrix) {rank_prefix_matrix.tolist()}, "
        f"expected (cumulative over source ranks) {expected.rank_prefix_matrix}"
    )


def _check_layout(layout: tuple[object, ...], mine: RankInputs, case: Case, num_ranks: int) -> None:
    """``get_dispatch_layout``'s outputs against ``naive_layout``."""
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = layout
    assert isinstance(num_tokens_per_rank, torch.Tensor)
    assert isinstance(num_tokens_per_expert, torch.Tensor)
    assert isinstance(is_token_in_rank, torch.Tensor)
    expected_layout = naive_layout(mine.topk_idx, case.num_experts, num_ranks)
    assert num_tokens_per_rank.dtype == torch.int32
    assert num_tokens_per_expert.dtype == torch.int32
    assert is_token_in_rank.dtype == torch.bool
    assert num_tokens_per_rdma_rank is None, "one node: num_tokens_per_rdma_rank must be None"
    assert num_tokens_per_rank.tolist() == expected_layout.num_tokens_per_rank, (
        f"num_tokens_per_rank {num_tokens_per_rank.tolist()}, expected {expected_layout.num_tokens_per_rank}"
    )
    assert num_tokens_per_expert.tolist() == expected_layout.num_tokens_per_expert, (
        f"num_tokens_per_expert {num_tokens_per_expert.tolist()}, expected {expected_layout.num_tokens_per_expert}"
    )
    assert list(is_token_in_rank.shape) == [mine.x.size(0), num_ranks]
    assert is_token_in_rank.tolist() == expected_layout.is_token_in_rank, "is_token_in_rank differs"
    assert getattr(event, "event", "no EventOverlap") is None, (
        "async_finish=False: EventOverlap without event"
    )


def layout_worker(pgi: ProcessGroupInfo, case: Case) -> None:
    """``get_dispatch_layout`` alone (no communication), including the scenarios dispatch fails on."""
    mine = make_all_inputs(case, pgi.world_size)[pgi.rank]
    with Buffer(pgi.group, backend=BACKEND) as buffer:
        layout = buffer.get_dispatch_layout(mine.topk_idx, case.num_experts)
    _check_layout(layout, mine, case, pgi.world_size)


def layout_dispatch_combine_worker(
    pgi: ProcessGroupInfo, case: Case, default_dtype: str = "", default_device: str = ""
) -> None:
    """Layout, dispatch (with top-k), combine (with weights, twice), cached dispatch (same and new x);
    the buffer is made and called under the caller's ``default_dtype`` and ``default_device``
    (``""``: torch's)."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    second_xs = [make_x(case, rank, salt=1) for rank in range(num_ranks)]
    with caller_defaults(default_dtype, default_device), Buffer(pgi.group, backend=BACKEND) as buffer:
        layout = buffer.get_dispatch_layout(mine.topk_idx, case.num_experts)
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = layout
        recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event = buffer.dispatch(
            mine.x,
            num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=mine.topk_idx,
            topk_weights=mine.topk_weights,
        )
        assert isinstance(recv_x, torch.Tensor)
        expert_output = recv_x * power_of_two_scale(me)
        combined, combined_weights, _ = buffer.combine(expert_output, handle, topk_weights=recv_topk_weights)
        combined_again, combined_weights_again, _ = buffer.combine(
            expert_output, handle, topk_weights=recv_topk_weights
        )
        cached_same = buffer.dispatch(mine.x, handle=handle)
        cached_new = buffer.dispatch(second_xs[me], handle=handle)

    _check_layout(layout, mine, case, num_ranks)

    expected = naive_dispatch(all_inputs, me, case.num_experts)
    assert event.event is None, "async_finish=False must return an EventOverlap without event"
    assert_rows_equal(recv_x, expected.x, expected.keys, "recv_x")
    _check_dispatch_metadata(expected, recv_topk_idx, recv_topk_weights, handle, len(expected.keys))
    assert per_expert_list == expected.num_tokens_per_expert, (
        f"num_recv_tokens_per_expert_list {per_expert_list}, expected {expected.num_tokens_per_expert}"
    )

    expected_combined, expected_weights = naive_combine(mine, num_ranks, case.num_experts)
    token_keys = [(me, token) for token in range(mine.x.size(0))]
    assert combined.dtype == torch.bfloat16
    assert_combined_close(combined, expected_combined, token_keys, "combined_x")
    assert combined_weights is not None
    assert_combined_close(combined_weights, expected_weights, token_keys, "combined_topk_weights", 1e-6, 0.0)
    assert_rows_equal(combined_again, combined, token_keys, "combined_x of a second identical combine")
    assert combined_weights_again is not None
    assert_rows_equal(combined_weights_again, combined_weights, token_keys, "combined_topk_weights (again)")

    assert len(cached_same) == 6
    assert cached_same[1:5] == (None, None, None, None), (
        f"cached dispatch must return (recv_x, None, None, None, None, event); got {cached_same[1:5]}"
    )
    assert_rows_equal(cached_same[0], recv_x, expected.keys, "recv_x of cached dispatch (same x)")
    expected_new = naive_dispatch(all_inputs, me, case.num_experts, xs=second_xs)
    assert_rows_equal(cached_new[0], expected_new.x, expected_new.keys, "recv_x of cached dispatch (new x)")


def combine_bias_worker(pgi: ProcessGroupInfo, case: Case, num_biases: int) -> None:
    """Combine with one bias tensor or a tuple of two."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    biases = tuple(make_x(case, me, salt=10 + i) for i in range(num_biases))
    with Buffer(pgi.group, backend=BACKEND) as buffer:
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            mine.x,
            topk_idx=mine.topk_idx,
            topk_weights=mine.topk_weights,
            **_layout_kwargs(buffer, mine, case.num_experts),
        )
        assert isinstance(recv_x, torch.Tensor)
        bias = biases[0] if num_biases == 1 else biases
        combined, _, _ = buffer.combine(recv_x * power_of_two_scale(me), handle, bias=bias)
    expected_combined, _ = naive_combine(mine, num_ranks, case.num_experts, biases=biases)
    token_keys = [(me, token) for token in range(mine.x.size(0))]
    assert_combined_close(combined, expected_combined, token_keys, f"combined_x with {num_biases} bias")


def _fp8_inputs(x: torch.Tensor, scale_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    use_ue8m0 = scale_kind.startswith("ue8m0")
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)
    if scale_kind.endswith("column_major"):
        scales = scales.t().contiguous().t()
        assert scales.size(0) <= 1 or scales.stride(0) == 1
    return x_fp8, scales


def fp8_dispatch_worker(pgi: ProcessGroupInfo, case: Case, scale_kind: str) -> None:
    """Dispatch ``(x_fp8, scales)``: the bytes arrive unchanged; cast back is close to the bf16 rows."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    sent = [_fp8_inputs(inputs.x, scale_kind) for inputs in all_inputs]
    with Buffer(pgi.group, backend=BACKEND) as buffer:
        recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, _ = buffer.dispatch(
            sent[me],
            topk_idx=mine.topk_idx,
            topk_weights=mine.topk_weights,
            **_layout_kwargs(buffer, mine, case.num_experts),
        )
        cached = buffer.dispatch(sent[me], handle=handle)

    expected = naive_dispatch(all_inputs, me, case.num_experts)
    expected_fp8 = naive_dispatch(all_inputs, me, case.num_experts, xs=[s[0] for s in sent])
    expected_scales = naive_dispatch(all_inputs, me, case.num_experts, xs=[s[1] for s in sent])
    for what, result in (("dispatch", recv_x), ("cached dispatch", cached[0])):
        assert isinstance(result, tuple), f"{what}: FP8 input must give a (x_fp8, scales) tuple"
        recv_fp8, recv_scales = result
        assert_rows_equal(
            recv_fp8,
            expected_fp8.x,
            expected.keys,
            f"{what}: recv_x[0] (fp8 bytes)",
            candidates=all_rows([s[0] for s in sent]),
        )
        assert recv_scales.is_contiguous(), (
            f"{what}: recv scales must be contiguous; strides {recv_scales.stride()}"
        )
        assert_rows_equal(
            recv_scales, expected_scales.x.contiguous(), expected.keys, f"{what}: recv_x[1] (scales)"
        )
        assert_rows_close(
            per_token_cast_back(recv_fp8, recv_scales),
            expected.x,
            expected.keys,
            f"{what}: cast back of recv_x",
            FP8_RTOL,
            FP8_ATOL_OF_GROUP_MAX,
            group_size=128,
            candidates=all_rows([inputs.x for inputs in all_inputs]),
        )
    _check_dispatch_metadata(expected, recv_topk_idx, recv_topk_weights, handle, len(expected.keys))
    assert per_expert_list == expected.num_tokens_per_expert


def worst_tokens_worker(pgi: ProcessGroupInfo, case: Case, num_worst_tokens: int) -> None:
    """``num_worst_tokens``: exact row count, padding rows have ``recv_topk_idx == -1``, combine works."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    garbage_generator = torch.Generator().manual_seed(case.seed * 31 + me)
    padding_garbage = torch.randn(num_worst_tokens, case.hidden, generator=garbage_generator).bfloat16()
    with Buffer(pgi.group, backend=BACKEND) as buffer:
        layout = _layout_kwargs(buffer, mine, case.num_experts)
        args = {"topk_idx": mine.topk_idx, "topk_weights": mine.topk_weights, **layout}
        plain = buffer.dispatch(mine.x, **args)
        worst = buffer.dispatch(mine.x, num_worst_tokens=num_worst_tokens, **args)
        recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, _ = worst
        assert isinstance(recv_x, torch.Tensor)
        num_real = plain[0].size(0)
        expert_output = recv_x * power_of_two_scale(me)
        expert_output[num_real:] = padding_garbage[num_real:]  # rows past the real count are ignored
        combined, combined_weights, _ = buffer.combine(expert_output, handle, topk_weights=recv_topk_weights)

    expected = naive_dispatch(all_inputs, me, case.num_experts)
    num_recv = len(expected.keys)
    assert recv_x.size(0) == num_worst_tokens, (
        f"recv_x has {recv_x.size(0)} rows, expected {num_worst_tokens}"
    )
    assert_rows_equal(recv_x[:num_recv], plain[0], expected.keys, "recv_x (real rows) with num_worst_tokens")
    assert_rows_equal(recv_x[:num_recv], expected.x, expected.keys, "recv_x with num_worst_tokens")
    _check_dispatch_metadata(expected, recv_topk_idx, recv_topk_weights, handle, num_worst_tokens)
    assert recv_topk_idx is not None
    assert bool((recv_topk_idx[num_recv:] == -1).all()), "rows past the real count need recv_topk_idx == -1"
    assert per_expert_list == [], (
        f"num_worst_tokens: the per-expert list must be empty; got {per_expert_list}"
    )
    expected_combined, expected_weights = naive_combine(mine, num_ranks, case.num_experts)
    token_keys = [(me, token) for token in range(mine.x.size(0))]
    assert_combined_close(combined, expected_combined, token_keys, "combined_x (worst)")
    assert combined_weights is not None
    assert_combined_close(
        combined_weights, expected_weights, token_keys, "combined_topk_weights (worst)", 1e-6, 0.0
    )


def expert_alignment_worker(pgi: ProcessGroupInfo, case: Case, expert_alignment: int) -> None:
    """The per-expert receive counts are rounded up to ``expert_alignment``; the rows are not."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    with Buffer(pgi.group, backend=BACKEND) as buffer:
        recv_x, _, _, per_expert_list, _, _ = buffer.dispatch(
            mine.x,
            topk_idx=mine.topk_idx,
            topk_weights=mine.topk_weights,
            expert_alignment=expert_alignment,
            **_layout_kwargs(buffer, mine, case.num_experts),
        )
    expected = naive_dispatch(all_inputs, me, case.num_experts)
    aligned = [-(-count // expert_alignment) * expert_alignment for count in expected.num_tokens_per_expert]
    assert per_expert_list == aligned, (
        f"num_recv_tokens_per_expert_list {per_expert_list}, expected {aligned} "
        f"(counts {expected.num_tokens_per_expert} rounded up to {expert_alignment})"
    )
    assert isinstance(recv_x, torch.Tensor)
    assert_rows_equal(recv_x, expected.x, expected.keys, "recv_x with expert_alignment")


def no_topk_worker(pgi: ProcessGroupInfo, case: Case) -> None:
    """Dispatch without ``topk_idx``: rows still follow ``is_token_in_rank``; top-k outputs are ``None``."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    with Buffer(pgi.group, backend=BACKEND) as buffer:
        recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, _ = buffer.dispatch(
            mine.x, **_layout_kwargs(buffer, mine, case.num_experts)
        )
        assert isinstance(recv_x, torch.Tensor)
        combined, combined_weights, _ = buffer.combine(recv_x * power_of_two_scale(me), handle)
    expected = naive_dispatch(all_inputs, me, case.num_experts)
    assert recv_topk_idx is None, "dispatch without topk_idx must return recv_topk_idx None"
    assert recv_topk_weights is None, "dispatch without topk_idx must return recv_topk_weights None"
    assert_rows_equal(recv_x, expected.x, expected.keys, "recv_x without topk_idx")
    assert per_expert_list == expected.num_tokens_per_expert
    assert combined_weights is None
    expected_combined, _ = naive_combine(mine, num_ranks, case.num_experts)
    token_keys = [(me, token) for token in range(mine.x.size(0))]
    assert_combined_close(combined, expected_combined, token_keys, "combined_x (no topk)")
