"""Low-latency workers: run on every rank of a gloo pool, compare with ``naive`` and raise on mismatch.

As in ``workers_normal``, each worker communicates first and checks afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from epcomm import Buffer, InconsistentCallError
from epcomm.env import Settings
from epcomm.quant import per_token_cast_back
from epcomm.testing import ProcessGroupInfo

from .cases import caller_defaults
from .naive import (
    Case,
    ExpectedLowLatency,
    RankInputs,
    all_rows,
    assert_rows_close,
    assert_rows_equal,
    make_all_inputs,
    naive_dispatch,
    naive_low_latency_combine,
    naive_low_latency_dispatch,
    power_of_two_scale,
)
from .naive_nodes import Topology, naive_combine_by_node
from .workers_normal import BACKEND, COMBINE_RTOL, FP8_ATOL_OF_GROUP_MAX, FP8_RTOL, assert_combined_close

# The combined output is a float32 weighted sum rounded to bf16 (tolerance relative to the max).
LOW_LATENCY_COMBINE_ATOL_OF_MAX = 1e-3

# name -> (use_fp8, round_scale, use_ue8m0)
DISPATCH_MODES: dict[str, tuple[bool, bool, bool]] = {
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_round_scale": (True, True, False),
    "fp8_ue8m0": (True, True, True),
}


def _low_latency_buffer(
    pgi: ProcessGroupInfo,
    case: Case,
    capacity: int,
    enable_shrink: bool = False,
    ranks_per_node: int | None = None,
) -> Buffer:
    """A low-latency ``Buffer`` sized for ``case``; with ``ranks_per_node`` the group is split into
    simulated nodes (``Settings(ranks_per_node=...)``), which with ``num_rdma_bytes > 0`` puts the
    buffer in multi-node mode (checked)."""
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
        capacity, case.hidden, pgi.world_size, case.num_experts
    )
    buffer = Buffer(
        pgi.group,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        enable_shrink=enable_shrink,
        backend=BACKEND,
        settings=None if ranks_per_node is None else Settings(ranks_per_node=ranks_per_node),
    )
    if ranks_per_node is not None:
        expected = ranks_per_node < pgi.world_size
        assert buffer.num_ranks_per_node == ranks_per_node, buffer.num_ranks_per_node
        assert buffer.is_multi_node == expected, f"is_multi_node {buffer.is_multi_node}, expected {expected}"
    return buffer


def _garbage(case: Case, rank: int, shape: Sequence[int], salt: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(case.seed * 37 + rank * 7 + salt)
    return (torch.randn(*shape, generator=generator, dtype=torch.float32, device="cpu") * 100).bfloat16()


def _expert_outputs(case: Case, me: int, recv_x: torch.Tensor, recv_count: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` returns its rows times ``power_of_two_scale(e)``; rows past the count are garbage."""
    num_local_experts = recv_x.size(0)
    outputs = _garbage(case, me, recv_x.shape, salt=1)
    for local_expert, count in enumerate(recv_count.tolist()):
        scale = power_of_two_scale(me * num_local_experts + local_expert)
        outputs[local_expert, :count] = recv_x[local_expert, :count] * scale
    return outputs


def check_low_latency_dispatch(
    result: tuple[Any, ...],
    expected: ExpectedLowLatency,
    all_inputs: Sequence[RankInputs],
    case: Case,
    capacity: int,
    mode: str,
    masked_ranks: Sequence[int] = (),
) -> None:
    """recv_x layout and rows, recv_count and the handle's DeepEP fields, against the naive dispatch."""
    recv_x, recv_count, handle = result[0], result[1], result[2]
    num_ranks = len(all_inputs)
    num_local_experts = case.num_experts // num_ranks
    num_rows = num_ranks * capacity
    counts = [len(keys) for keys in expected.keys]
    assert isinstance(recv_count, torch.Tensor)
    assert recv_count.dtype == torch.int32, recv_count.dtype
    assert recv_count.tolist() == counts, f"recv_count {recv_count.tolist()}, expected {counts}"
    use_fp8, round_scale, use_ue8m0 = DISPATCH_MODES[mode]
    shape = (num_local_experts, num_rows, case.hidden)
    if not use_fp8:
        assert isinstance(recv_x, torch.Tensor), type(recv_x)
        assert recv_x.dtype == torch.bfloat16, recv_x.dtype
        assert tuple(recv_x.shape) == shape, f"recv_x shape {tuple(recv_x.shape)}, expected {shape}"
        for local_expert, count in enumerate(counts):
            assert_rows_equal(
                recv_x[local_expert, :count],
                expected.x[local_expert],
                expected.keys[local_expert],
                f"recv_x of local expert {local_expert}",
            )
    else:
        assert isinstance(recv_x, tuple), f"use_fp8=True must give (x_fp8, scales); got {type(recv_x)}"
        x_fp8, scales = recv_x
        assert x_fp8.dtype == torch.float8_e4m3fn, x_fp8.dtype
        assert tuple(x_fp8.shape) == shape, f"recv_x[0] shape {tuple(x_fp8.shape)}, expected {shape}"
        num_scales = case.hidden // 128
        scale_shape = (num_local_experts, num_rows, -(-num_scales // 4) if use_ue8m0 else num_scales)
        assert scales.dtype == (torch.int32 if use_ue8m0 else torch.float32), scales.dtype
        assert tuple(scales.shape) == scale_shape, (
            f"scales shape {tuple(scales.shape)}, expected {scale_shape}"
        )
        assert scales.stride(-2) == 1, (
            f"scales must be column-major in the last two dims; strides {scales.stride()}"
        )
        candidates = all_rows([inputs.x for inputs in all_inputs])
        for local_expert, count in enumerate(counts):
            assert_rows_close(
                per_token_cast_back(x_fp8[local_expert, :count], scales[local_expert, :count]),
                expected.x[local_expert],
                expected.keys[local_expert],
                f"cast back of recv_x of local expert {local_expert} ({mode})",
                FP8_RTOL,
                FP8_ATOL_OF_GROUP_MAX,
                group_size=128,
                candidates=candidates,
            )
            if round_scale and not use_ue8m0:
                valid = scales[local_expert, :count]
                assert bool((torch.frexp(valid).mantissa == 0.5).all()), (
                    "round_scale: scales must be powers of 2"
                )

    assert isinstance(handle, tuple), f"the handle must be a tuple; got {type(handle).__name__}"
    recv_src_info, recv_layout_range = handle[0], handle[1]
    assert tuple(handle[2:5]) == (capacity, case.hidden, case.num_experts), handle[2:5]
    assert recv_src_info.dtype == torch.int32, recv_src_info.dtype
    assert tuple(recv_src_info.shape) == (num_local_experts, num_rows), tuple(recv_src_info.shape)
    assert recv_layout_range.dtype == torch.int64, recv_layout_range.dtype
    assert tuple(recv_layout_range.shape) == (num_local_experts, num_ranks), tuple(recv_layout_range.shape)
    for local_expert, count in enumerate(counts):
        tokens = [token for _, token in expected.keys[local_expert]]
        got = recv_src_info[local_expert, :count].tolist()
        assert got == tokens, f"recv_src_info of local expert {local_expert}: {got}, expected {tokens}"
        for src, (begin, num) in enumerate(expected.layout_range[local_expert]):
            if src in masked_ranks:
                continue
            value = int(recv_layout_range[local_expert, src])
            assert value == (begin << 32) | num, (
                f"recv_layout_range[{local_expert}][{src}] = (begin {value >> 32}, count {value & 0xFFFFFFFF}), "
                f"expected (begin {begin}, count {num})"
            )


def _check_combined(
    combined: torch.Tensor,
    mine: RankInputs,
    me: int,
    case: Case,
    num_ranks: int,
    what: str,
    masked_ranks: Sequence[int] = (),
) -> None:
    expected = naive_low_latency_combine(mine, num_ranks, case.num_experts, masked_ranks)
    assert combined.dtype == torch.bfloat16, combined.dtype
    token_keys = [(me, token) for token in range(mine.x.size(0))]
    assert_combined_close(combined, expected, token_keys, what, COMBINE_RTOL, LOW_LATENCY_COMBINE_ATOL_OF_MAX)


def dispatch_combine_worker(
    pgi: ProcessGroupInfo,
    case: Case,
    capacity: int,
    mode: str,
    default_dtype: str = "",
    default_device: str = "",
    ranks_per_node: int | None = None,
) -> None:
    """One dispatch (bf16 or FP8) with receive stats; for bf16 also the weighted combine; the
    buffer is made and called under the caller's ``default_dtype`` and ``default_device`` (``""``:
    torch's), on simulated nodes of ``ranks_per_node`` ranks when given (multi-node mode)."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    num_local_experts = case.num_experts // num_ranks
    stats = torch.randint(0, 1000, (num_local_experts,), dtype=torch.int32)
    stats_before = stats.clone()
    wait_stats = torch.zeros(num_ranks, num_ranks, dtype=torch.int64)
    use_fp8, round_scale, use_ue8m0 = DISPATCH_MODES[mode]
    combined = None
    with (
        caller_defaults(default_dtype, default_device),
        _low_latency_buffer(pgi, case, capacity, ranks_per_node=ranks_per_node) as buffer,
    ):
        result = buffer.low_latency_dispatch(
            mine.x,
            mine.topk_idx,
            capacity,
            case.num_experts,
            cumulative_local_expert_recv_stats=stats,
            dispatch_wait_recv_cost_stats=wait_stats,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
        )
        recv_x, recv_count, handle, event, hook = result
        if hook is not None:
            hook()  # harmless without return_recv_hook
        if not use_fp8:
            assert isinstance(recv_x, torch.Tensor)
            combined, _, _ = buffer.low_latency_combine(
                _expert_outputs(case, me, recv_x, recv_count), mine.topk_idx, mine.topk_weights, handle
            )
    expected = naive_low_latency_dispatch(all_inputs, me, case.num_experts)
    assert event.event is None
    check_low_latency_dispatch(result, expected, all_inputs, case, capacity, mode)
    counts = [len(keys) for keys in expected.keys]
    expected_stats = [before + count for before, count in zip(stats_before.tolist(), counts, strict=True)]
    assert stats.tolist() == expected_stats, (
        f"cumulative_local_expert_recv_stats {stats.tolist()}, expected {stats_before.tolist()} + {counts}"
    )
    assert bool((wait_stats >= 0).all()), "dispatch_wait_recv_cost_stats must only grow"
    if combined is not None:
        _check_combined(combined, mine, me, case, num_ranks, "low_latency_combine")


def combine_variant_worker(
    pgi: ProcessGroupInfo, case: Case, capacity: int, variant: str, ranks_per_node: int | None = None
) -> None:
    """``variant``: ``zero_copy`` (outputs written into the combine buffer), ``out`` (preallocated
    result) or ``recv_hook`` (both calls with ``return_recv_hook=True``, completed by ``hook()``);
    on simulated nodes of ``ranks_per_node`` ranks when given."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    use_hook = variant == "recv_hook"
    out = _garbage(case, me, mine.x.shape, salt=2) if variant == "out" else None
    with _low_latency_buffer(pgi, case, capacity, ranks_per_node=ranks_per_node) as buffer:
        result = buffer.low_latency_dispatch(
            mine.x, mine.topk_idx, capacity, case.num_experts, use_fp8=False, return_recv_hook=use_hook
        )
        recv_x, recv_count, handle, _, hook = result
        if use_hook:
            hook()
        assert isinstance(recv_x, torch.Tensor)
        expert_outputs = _expert_outputs(case, me, recv_x, recv_count)
        if variant == "zero_copy":
            buffer.get_next_low_latency_combine_buffer(handle).copy_(expert_outputs)
            # The data come from the combine buffer: what is passed as x must not matter.
            expert_outputs = _garbage(case, me, expert_outputs.shape, salt=3)
        combined, _, combine_hook = buffer.low_latency_combine(
            expert_outputs,
            mine.topk_idx,
            mine.topk_weights,
            handle,
            zero_copy=variant == "zero_copy",
            return_recv_hook=use_hook,
            out=out,
        )
        if use_hook:
            combine_hook()
    expected = naive_low_latency_dispatch(all_inputs, me, case.num_experts)
    check_low_latency_dispatch(result, expected, all_inputs, case, capacity, "bf16")
    _check_combined(combined, mine, me, case, num_ranks, f"low_latency_combine ({variant})")
    if out is not None:
        assert out.data_ptr() == combined.data_ptr() or out.numel() == 0, "combine must write into out="
        _check_combined(out, mine, me, case, num_ranks, "low_latency_combine out=")


def two_outstanding_worker(
    pgi: ProcessGroupInfo, case: Case, capacity: int, ranks_per_node: int | None = None, clean: bool = False
) -> None:
    """Dispatch A, dispatch B, then combine A and B: A's results survive B (two alternating buffers);
    on simulated nodes of ``ranks_per_node`` ranks when given. With ``clean``,
    ``clean_low_latency_buffer`` follows and then dispatch and combine A once more."""
    me, num_ranks = pgi.rank, pgi.world_size
    cases = [case, dataclasses.replace(case, seed=case.seed + 1)]
    inputs = [make_all_inputs(c, num_ranks) for c in cases]
    with _low_latency_buffer(pgi, case, capacity, ranks_per_node=ranks_per_node) as buffer:
        results = [
            buffer.low_latency_dispatch(
                all_inputs[me].x, all_inputs[me].topk_idx, capacity, case.num_experts, use_fp8=False
            )
            for all_inputs in inputs
        ]
        # Both results are read only now, after the second dispatch.
        expected = [naive_low_latency_dispatch(all_inputs, me, case.num_experts) for all_inputs in inputs]
        for name, result, exp, all_inputs in zip("AB", results, expected, inputs, strict=True):
            try:
                check_low_latency_dispatch(result, exp, all_inputs, case, capacity, "bf16")
            except AssertionError as error:
                raise AssertionError(f"dispatch {name} (of two outstanding): {error}") from error
        combined = []
        for c, all_inputs, result in zip(cases, inputs, results, strict=True):
            recv_x, recv_count, handle = result[0], result[1], result[2]
            assert isinstance(recv_x, torch.Tensor)
            outputs = _expert_outputs(c, me, recv_x, recv_count)
            mine = all_inputs[me]
            combined.append(buffer.low_latency_combine(outputs, mine.topk_idx, mine.topk_weights, handle)[0])
        if clean:
            buffer.clean_low_latency_buffer(capacity, case.hidden, case.num_experts)
            mine = inputs[0][me]
            again = buffer.low_latency_dispatch(
                mine.x, mine.topk_idx, capacity, case.num_experts, use_fp8=False
            )
            recv_x, recv_count, handle = again[0], again[1], again[2]
            assert isinstance(recv_x, torch.Tensor)
            outputs = _expert_outputs(case, me, recv_x, recv_count)
            combined.append(buffer.low_latency_combine(outputs, mine.topk_idx, mine.topk_weights, handle)[0])
            check_low_latency_dispatch(again, expected[0], inputs[0], case, capacity, "bf16")
            cases, inputs = [*cases, case], [*inputs, inputs[0]]
    for name, c, all_inputs, combined_x in zip("ABC"[: len(cases)], cases, inputs, combined, strict=True):
        _check_combined(combined_x, all_inputs[me], me, c, num_ranks, f"low_latency_combine {name}")


def shrink_worker(pgi: ProcessGroupInfo, case: Case, capacity: int, masked_rank: int) -> None:
    """Every rank masks ``masked_rank``, which then stops calling; the others still get the right results."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    mask_status = torch.full((num_ranks,), 7, dtype=torch.int32)
    with _low_latency_buffer(pgi, case, capacity, enable_shrink=True) as buffer:
        buffer.low_latency_update_mask_buffer(masked_rank, True)
        buffer.low_latency_query_mask_buffer(mask_status)
        if me == masked_rank:
            return
        result = buffer.low_latency_dispatch(mine.x, mine.topk_idx, capacity, case.num_experts, use_fp8=False)
        recv_x, recv_count, handle = result[0], result[1], result[2]
        assert isinstance(recv_x, torch.Tensor)
        combined, _, _ = buffer.low_latency_combine(
            _expert_outputs(case, me, recv_x, recv_count), mine.topk_idx, mine.topk_weights, handle
        )
        buffer.low_latency_clean_mask_buffer()
        mask_after_clean = torch.full((num_ranks,), 7, dtype=torch.int32)
        buffer.low_latency_query_mask_buffer(mask_after_clean)
    expected_mask = [int(rank == masked_rank) for rank in range(num_ranks)]
    assert mask_status.tolist() == expected_mask, f"mask {mask_status.tolist()}, expected {expected_mask}"
    assert mask_after_clean.tolist() == [0] * num_ranks, f"mask after clean {mask_after_clean.tolist()}"
    masked = (masked_rank,)
    expected = naive_low_latency_dispatch(all_inputs, me, case.num_experts, masked_ranks=masked)
    check_low_latency_dispatch(result, expected, all_inputs, case, capacity, "bf16", masked_ranks=masked)
    _check_combined(combined, mine, me, case, num_ranks, "low_latency_combine (shrink)", masked_ranks=masked)


def normal_and_low_latency_worker(
    pgi: ProcessGroupInfo, case: Case, capacity: int, ranks_per_node: int, odd_rank: int
) -> dict[str, Any]:
    """One multi-node ``Buffer`` in both modes: a normal-mode (internode) dispatch and combine, a
    low-latency dispatch and combine, then a call in which rank ``odd_rank`` makes a normal-mode
    dispatch while the others make a low-latency dispatch (every rank must raise
    ``InconsistentCallError``, not a transport error), then a matching low-latency dispatch.
    Every result is checked against the naive oracle; returns what the mixed call raised
    (``kind``, ``message``, ``elapsed_s``)."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    topology = Topology(num_ranks, ranks_per_node, Buffer.num_sms // 2, case.num_experts)
    outcome: dict[str, Any] = {"kind": None, "message": None}
    with _low_latency_buffer(pgi, case, capacity, ranks_per_node=ranks_per_node) as buffer:

        def normal_dispatch() -> tuple[Any, ...]:
            per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(
                mine.topk_idx, case.num_experts
            )
            return buffer.dispatch(
                mine.x,
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=mine.topk_idx,
                topk_weights=mine.topk_weights,
            )

        recv_x, _, recv_weights, _, handle, _ = normal_dispatch()
        assert isinstance(recv_x, torch.Tensor)
        combined, _, _ = buffer.combine(recv_x * power_of_two_scale(me), handle, topk_weights=recv_weights)
        low_latency = buffer.low_latency_dispatch(
            mine.x, mine.topk_idx, capacity, case.num_experts, use_fp8=False
        )
        ll_x, ll_count, ll_handle = low_latency[0], low_latency[1], low_latency[2]
        assert isinstance(ll_x, torch.Tensor)
        ll_combined, _, _ = buffer.low_latency_combine(
            _expert_outputs(case, me, ll_x, ll_count), mine.topk_idx, mine.topk_weights, ll_handle
        )
        start = time.monotonic()
        try:
            if me == odd_rank:
                normal_dispatch()
            else:
                buffer.low_latency_dispatch(mine.x, mine.topk_idx, capacity, case.num_experts, use_fp8=False)
        except InconsistentCallError as error:
            outcome = {"kind": type(error).__name__, "message": str(error)}
        outcome["elapsed_s"] = time.monotonic() - start
        after = buffer.low_latency_dispatch(mine.x, mine.topk_idx, capacity, case.num_experts, use_fp8=False)

    expected = naive_dispatch(all_inputs, me, case.num_experts)
    assert_rows_equal(recv_x, expected.x, expected.keys, "recv_x of the normal-mode dispatch")
    token_keys = [(me, token) for token in range(mine.x.size(0))]
    want_x, _ = naive_combine_by_node(mine, topology)
    assert_rows_equal(combined, want_x, token_keys, "combined_x of the normal-mode combine (per node)")
    expected_ll = naive_low_latency_dispatch(all_inputs, me, case.num_experts)
    check_low_latency_dispatch(low_latency, expected_ll, all_inputs, case, capacity, "bf16")
    _check_combined(ll_combined, mine, me, case, num_ranks, "low_latency_combine after normal mode")
    check_low_latency_dispatch(after, expected_ll, all_inputs, case, capacity, "bf16")
    return outcome
