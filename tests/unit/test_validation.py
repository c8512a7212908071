"""Bad arguments to ``epcomm.Buffer`` raise a clear ``TypeError``/``ValueError`` before any communication.

API.md "Errors": every argument problem names the argument, the expected and the received value,
and is raised before any message leaves the rank. Each case below is one distinct bad input. The
cases run twice:

* in this process, on a single-rank gloo group (``pytest.raises`` on the exact exception type);
* on a 2-rank gloo group (``parallel_launch``), where only rank 0 gets the bad input while rank 1
  sits idle: an argument check that came after a message (or a collective) would make rank 0 wait
  for rank 1 until ``EPCOMM_TIMEOUT_S`` (set to a few seconds), so each error must come back in
  under ``_FAST_ERROR_S``. Cases marked ``multi_rank_only`` need ``num_ranks > 1`` (e.g.
  ``num_experts % num_ranks != 0``). After the bad calls both ranks run a real dispatch/combine
  round trip, which would go wrong if a bad call had left a message in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from epcomm import Buffer, topk_idx_t
from epcomm.env import Settings
from epcomm.testing import ProcessGroupInfo, find_free_port, parallel_launch

NUM_TOKENS = 4
HIDDEN = 128
NUM_EXPERTS = 4
NUM_TOPK = 2
# num_max_dispatch_tokens_per_rank of the low-latency calls.
LL_CAPACITY = 8
# A bad argument must fail at once; a check placed after communication would wait for the idle
# peer for _PEER_TIMEOUT_S (> _FAST_ERROR_S) and then fail with the wrong exception.
_FAST_ERROR_S = 2.0
_PEER_TIMEOUT_S = 4.0
# An error message is one line a person reads: longer ones dump tensors or tracebacks.
_MAX_MESSAGE_CHARS = 300
_LAUNCH_TIMEOUT_S = 120.0


# ---- the state every case starts from ----------------------------------------------------------


@dataclass
class Ctx:
    """Valid arguments and buffers; each case breaks exactly one thing."""

    num_ranks: int
    buffer: Buffer  # normal mode
    ll_buffer: Buffer  # low-latency mode, num_rdma_bytes = the size hint
    small_ll_buffer: Buffer  # low-latency mode, num_rdma_bytes = the size hint - 128
    shrink_buffer: Buffer  # low-latency mode with enable_shrink=True
    destroyed: Buffer  # destroy() already called
    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens_per_rank: torch.Tensor
    is_token_in_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    handle: Any
    recv_x: torch.Tensor
    recv_topk_weights: torch.Tensor
    ll_handle: Any

    @property
    def num_local_experts(self) -> int:
        return NUM_EXPERTS // self.num_ranks

    @property
    def ll_rdma_bytes(self) -> int:
        return Buffer.get_low_latency_rdma_size_hint(LL_CAPACITY, HIDDEN, self.num_ranks, NUM_EXPERTS)

    def fmt(self) -> dict[str, int]:
        """Values the expected-message templates of ``CASES`` refer to."""
        return {
            "R": self.num_ranks,
            "R1": self.num_ranks + 1,
            "L": self.num_local_experts,
            "L1": self.num_local_experts + 1,
            "rows": self.handle.num_recv_rows,
            "rows1": self.handle.num_recv_rows + 1,
            "ll_rows": self.num_ranks * LL_CAPACITY,
            "need": self.ll_rdma_bytes,
            "have": self.ll_rdma_bytes - 128,
        }


def _routing(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234 + rank)
    scores = torch.rand(NUM_TOKENS, NUM_EXPERTS, generator=generator)
    topk_idx = scores.topk(NUM_TOPK, dim=1).indices.to(topk_idx_t)
    topk_idx[0, 1] = -1  # one empty slot
    topk_idx[1, 0] = 0  # rank 0 always receives something from every rank
    topk_idx[1, 1] = NUM_EXPERTS - 1
    topk_weights = torch.rand(NUM_TOKENS, NUM_TOPK, generator=generator)
    return topk_idx, topk_weights


def make_ctx(group: Any, settings: Settings | None = None) -> Ctx:
    """Collective: build the buffers (with ``settings``) and run one real dispatch and low-latency
    dispatch."""
    num_ranks = dist.get_world_size(group)
    rank = dist.get_rank(group)
    ll_bytes = Buffer.get_low_latency_rdma_size_hint(LL_CAPACITY, HIDDEN, num_ranks, NUM_EXPERTS)
    buffer = Buffer(group, settings=settings)
    ll_buffer = Buffer(group, num_rdma_bytes=ll_bytes, low_latency_mode=True, settings=settings)
    small_ll_buffer = Buffer(group, num_rdma_bytes=ll_bytes - 128, low_latency_mode=True, settings=settings)
    shrink_buffer = Buffer(
        group, num_rdma_bytes=ll_bytes, low_latency_mode=True, enable_shrink=True, settings=settings
    )
    destroyed = Buffer(group, settings=settings)
    destroyed.destroy()

    x = (torch.arange(NUM_TOKENS * HIDDEN, dtype=torch.float32).view(NUM_TOKENS, HIDDEN) + rank).bfloat16()
    topk_idx, topk_weights = _routing(rank)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, NUM_EXPERTS
    )
    recv_x, _, recv_topk_weights, _, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
    )
    _, _, ll_handle, _, _ = ll_buffer.low_latency_dispatch(
        x, topk_idx, LL_CAPACITY, NUM_EXPERTS, use_fp8=False
    )
    return Ctx(
        num_ranks=num_ranks,
        buffer=buffer,
        ll_buffer=ll_buffer,
        small_ll_buffer=small_ll_buffer,
        shrink_buffer=shrink_buffer,
        destroyed=destroyed,
        x=x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        handle=handle,
        recv_x=recv_x,
        recv_topk_weights=recv_topk_weights,
        ll_handle=ll_handle,
    )


# ---- call helpers: a valid call with one argument replaced ------------------------------------


def _dispatch(c: Ctx, buffer: Buffer | None = None, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "num_tokens_per_rank": c.num_tokens_per_rank,
        "is_token_in_rank": c.is_token_in_rank,
        "num_tokens_per_expert": c.num_tokens_per_expert,
        "topk_idx": c.topk_idx,
        "topk_weights": c.topk_weights,
    }
    kwargs.update(overrides)
    x = kwargs.pop("x", c.x)
    return (buffer or c.buffer).dispatch(x, **kwargs)


def _combine(c: Ctx, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {"x": c.recv_x, "handle": c.handle}
    kwargs.update(overrides)
    return c.buffer.combine(**kwargs)


def _ll_dispatch(c: Ctx, buffer: Buffer | None = None, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "x": c.x,
        "topk_idx": c.topk_idx,
        "num_max_dispatch_tokens_per_rank": LL_CAPACITY,
        "num_experts": NUM_EXPERTS,
        "use_fp8": False,
    }
    kwargs.update(overrides)
    return (buffer or c.ll_buffer).low_latency_dispatch(**kwargs)


def _ll_combine(c: Ctx, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "x": torch.zeros(c.num_local_experts, c.num_ranks * LL_CAPACITY, HIDDEN, dtype=torch.bfloat16),
        "topk_idx": c.topk_idx,
        "topk_weights": c.topk_weights,
        "handle": c.ll_handle,
    }
    kwargs.update(overrides)
    return c.ll_buffer.low_latency_combine(**kwargs)


def _bf16(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.bfloat16)


def _fp8_x(c: Ctx, scale_rows: int = NUM_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        c.x.float().to(torch.float8_e4m3fn),
        torch.ones(scale_rows, HIDDEN // 128, dtype=torch.float32),
    )


def _with(tensor: torch.Tensor, index: tuple[int, int], value: int) -> torch.Tensor:
    changed = tensor.clone()
    changed[index] = value
    return changed


# ---- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: the call, the exception type and substrings its message must contain.

    ``needles`` are ``str.format`` templates over ``Ctx.fmt()``: the argument's name, the expected
    value and the received value.
    """

    name: str
    call: Callable[[Ctx], Any]
    error: type[Exception]
    needles: tuple[str, ...]
    multi_rank_only: bool = False
    xfail: str | None = None  # a known src bug: the reason


CASES: list[Case] = [
    # -- get_dispatch_layout
    Case(
        "layout_topk_idx_int32",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx.int(), NUM_EXPERTS),
        TypeError,
        ("topk_idx", "torch.int64", "torch.int32"),
    ),
    Case(
        "layout_topk_idx_1d",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx[:, 0], NUM_EXPERTS),
        ValueError,
        ("topk_idx", "[*, *]", "[4]"),
    ),
    Case(
        "layout_topk_idx_not_tensor",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx.tolist(), NUM_EXPERTS),
        TypeError,
        ("topk_idx", "Tensor", "list"),
    ),
    Case(
        "layout_expert_id_too_large",
        lambda c: c.buffer.get_dispatch_layout(_with(c.topk_idx, (2, 0), NUM_EXPERTS), NUM_EXPERTS),
        ValueError,
        ("topk_idx", "expert id 4", "0..3"),
    ),
    Case(
        "layout_expert_id_below_minus_one",
        lambda c: c.buffer.get_dispatch_layout(_with(c.topk_idx, (2, 1), -2), NUM_EXPERTS),
        ValueError,
        ("topk_idx", "expert id -2", "-1"),
    ),
    Case(
        "layout_num_experts_zero",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx, 0),
        ValueError,
        ("num_experts", ">= 1", "got 0"),
    ),
    Case(
        "layout_num_experts_not_multiple_of_num_ranks",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx.clamp(max=2), 3),
        ValueError,
        ("num_experts", "multiple of num_ranks={R}", "got 3"),
        multi_rank_only=True,
    ),
    Case(
        "layout_allocate_on_comm_stream_without_previous_event",
        lambda c: c.buffer.get_dispatch_layout(
            c.topk_idx, NUM_EXPERTS, async_finish=True, allocate_on_comm_stream=True
        ),
        ValueError,
        ("allocate_on_comm_stream", "previous_event", "previous_event=None"),
    ),
    # -- dispatch: x
    Case(
        "dispatch_x_float32",
        lambda c: _dispatch(c, x=c.x.float()),
        TypeError,
        ("x", "torch.bfloat16", "torch.float32"),
    ),
    Case(
        "dispatch_x_3d",
        lambda c: _dispatch(c, x=c.x.view(NUM_TOKENS, 1, HIDDEN)),
        ValueError,
        ("x", "[*, *]", "[4, 1, 128]"),
    ),
    Case(
        "dispatch_fp8_scales_wrong_rows",
        lambda c: _dispatch(c, x=_fp8_x(c, scale_rows=NUM_TOKENS - 1)),
        ValueError,
        ("x_scales", "[4, *]", "[3, 1]"),
    ),
    Case(
        "dispatch_fp8_scales_wrong_columns",
        lambda c: _dispatch(c, x=(_fp8_x(c)[0], torch.ones(NUM_TOKENS, HIDDEN // 128 + 1))),
        ValueError,
        ("x_scales", "hidden=128 has 1 float32 scales", "got 2 columns"),
    ),
    Case(
        "dispatch_fp8_ue8m0_scales_wrong_columns",
        lambda c: _dispatch(c, x=(_fp8_x(c)[0], torch.ones(NUM_TOKENS, 2, dtype=torch.int32))),
        ValueError,
        ("x_scales", "packed UE8M0 int32 scales", "got 2 columns"),
    ),
    Case(
        "dispatch_fp8_hidden_not_multiple_of_128",
        lambda c: _dispatch(c, x=(c.x[:, :100].float().to(torch.float8_e4m3fn), torch.ones(NUM_TOKENS, 1))),
        ValueError,
        ("x_fp8", "multiple of 128", "hidden=100"),
    ),
    Case(
        "dispatch_cached_low_latency_handle",
        lambda c: c.buffer.dispatch(c.x, handle=c.ll_handle),
        TypeError,
        ("handle", "a dispatch", "LowLatencyHandle"),
    ),
    Case(
        "dispatch_fp8_data_wrong_dtype",
        lambda c: _dispatch(c, x=(c.x, _fp8_x(c)[1])),
        TypeError,
        ("x_fp8", "torch.float8_e4m3fn", "torch.bfloat16"),
    ),
    Case(
        "dispatch_fp8_scales_wrong_dtype",
        lambda c: _dispatch(c, x=(_fp8_x(c)[0], _fp8_x(c)[1].half())),
        TypeError,
        ("x_scales", "torch.float32", "torch.float16"),
    ),
    Case(
        "dispatch_x_tuple_of_3",
        lambda c: _dispatch(c, x=(*_fp8_x(c), _fp8_x(c)[1])),
        ValueError,
        ("x", "(x_fp8, x_scales)", "3"),
    ),
    # -- dispatch: layout and top-k
    Case(
        "dispatch_topk_idx_rows_differ_from_x",
        lambda c: _dispatch(c, topk_idx=c.topk_idx[:3], topk_weights=c.topk_weights[:3]),
        ValueError,
        ("topk_idx", "[4, *]", "[3, 2]"),
    ),
    Case(
        "dispatch_topk_idx_int32",
        lambda c: _dispatch(c, topk_idx=c.topk_idx.int()),
        TypeError,
        ("topk_idx", "torch.int64", "torch.int32"),
    ),
    Case(
        "dispatch_topk_idx_on_other_device",
        lambda c: _dispatch(c, topk_idx=c.topk_idx.to("meta"), topk_weights=None),
        ValueError,
        ("topk_idx", "cpu", "meta"),
    ),
    Case(
        "dispatch_expert_id_too_large",
        lambda c: _dispatch(c, topk_idx=_with(c.topk_idx, (3, 0), NUM_EXPERTS + 3)),
        ValueError,
        ("topk_idx", "expert id 7", "0..3"),
    ),
    Case(
        "dispatch_topk_weights_wrong_shape",
        lambda c: _dispatch(c, topk_weights=torch.ones(NUM_TOKENS, NUM_TOPK + 1)),
        ValueError,
        ("topk_weights", "[4, 2]", "[4, 3]"),
    ),
    Case(
        "dispatch_topk_weights_float16",
        lambda c: _dispatch(c, topk_weights=c.topk_weights.half()),
        TypeError,
        ("topk_weights", "torch.float32", "torch.float16"),
    ),
    Case(
        "dispatch_topk_weights_without_topk_idx",
        lambda c: _dispatch(c, topk_idx=None),
        ValueError,
        ("topk_weights", "topk_idx"),
    ),
    Case(
        "dispatch_is_token_in_rank_int32",
        lambda c: _dispatch(c, is_token_in_rank=c.is_token_in_rank.int()),
        TypeError,
        ("is_token_in_rank", "torch.bool", "torch.int32"),
    ),
    Case(
        "dispatch_is_token_in_rank_wrong_shape",
        lambda c: _dispatch(c, is_token_in_rank=torch.ones(NUM_TOKENS, c.num_ranks + 1, dtype=torch.bool)),
        ValueError,
        ("is_token_in_rank", "[4, {R}]", "[4, {R1}]"),
    ),
    Case(
        "dispatch_is_token_in_rank_on_other_device",
        lambda c: _dispatch(c, is_token_in_rank=c.is_token_in_rank.to("meta")),
        ValueError,
        ("is_token_in_rank", "cpu", "meta"),
    ),
    Case(
        "dispatch_num_tokens_per_rank_wrong_shape",
        lambda c: _dispatch(c, num_tokens_per_rank=torch.zeros(c.num_ranks + 1, dtype=torch.int32)),
        ValueError,
        ("num_tokens_per_rank", "[{R}]", "[{R1}]"),
    ),
    Case(
        "dispatch_num_tokens_per_rank_int64",
        lambda c: _dispatch(c, num_tokens_per_rank=c.num_tokens_per_rank.long()),
        TypeError,
        ("num_tokens_per_rank", "torch.int32", "torch.int64"),
    ),
    Case(
        "dispatch_missing_num_tokens_per_expert_without_handle",
        lambda c: _dispatch(c, num_tokens_per_expert=None),
        ValueError,
        ("num_tokens_per_expert", "required", "handle"),
    ),
    Case(
        "dispatch_num_experts_not_multiple_of_num_ranks",
        lambda c: _dispatch(
            c,
            num_tokens_per_expert=torch.zeros(3, dtype=torch.int32),
            topk_idx=c.topk_idx.clamp(max=2),
        ),
        ValueError,
        ("num_experts", "multiple of num_ranks={R}", "got 3"),
        multi_rank_only=True,
    ),
    # -- dispatch: scalars, config, events
    Case(
        "dispatch_expert_alignment_zero",
        lambda c: _dispatch(c, expert_alignment=0),
        ValueError,
        ("expert_alignment", ">= 1", "got 0"),
    ),
    Case(
        "dispatch_expert_alignment_float",
        lambda c: _dispatch(c, expert_alignment=1.0),
        TypeError,
        ("expert_alignment", "int", "1.0"),
    ),
    Case(
        "dispatch_num_worst_tokens_negative",
        lambda c: _dispatch(c, num_worst_tokens=-1),
        ValueError,
        ("num_worst_tokens", ">= 0", "got -1"),
    ),
    Case(
        "dispatch_config_not_a_config",
        lambda c: _dispatch(c, config={"num_sms": 20}),
        TypeError,
        ("config", "Config", "dict"),
    ),
    Case(
        "dispatch_allocate_on_comm_stream_without_async_finish",
        lambda c: _dispatch(c, previous_event=Buffer.capture(), allocate_on_comm_stream=True),
        ValueError,
        ("allocate_on_comm_stream", "async_finish=True", "async_finish=False"),
    ),
    # -- cached dispatch
    Case(
        "cached_dispatch_with_topk_idx",
        lambda c: c.buffer.dispatch(c.x, handle=c.handle, topk_idx=c.topk_idx),
        ValueError,
        ("topk_idx", "handle"),
    ),
    Case(
        "cached_dispatch_x_wrong_rows",
        lambda c: c.buffer.dispatch(c.x[:3], handle=c.handle),
        ValueError,
        ("x", "[4, *]", "[3, 128]"),
    ),
    Case(
        "cached_dispatch_handle_not_a_handle",
        lambda c: c.buffer.dispatch(c.x, handle=[c.handle[0]]),
        TypeError,
        ("handle", "list"),
    ),
    # -- combine
    Case(
        "combine_x_rows_differ_from_handle",
        lambda c: _combine(c, x=_bf16(c.handle.num_recv_rows + 1, HIDDEN)),
        ValueError,
        ("x", "[{rows}, *]", "[{rows1}, 128]"),
    ),
    Case(
        "combine_x_float32",
        lambda c: _combine(c, x=c.recv_x.float()),
        TypeError,
        ("x", "torch.bfloat16", "torch.float32"),
    ),
    Case(
        "combine_topk_weights_float64",
        lambda c: _combine(c, topk_weights=c.recv_topk_weights.double()),
        TypeError,
        ("topk_weights", "torch.float32", "torch.float64"),
    ),
    Case(
        "combine_topk_weights_wrong_rows",
        lambda c: _combine(c, topk_weights=torch.ones(c.handle.num_recv_rows + 1, NUM_TOPK)),
        ValueError,
        ("topk_weights", "[{rows}, *]", "[{rows1}, 2]"),
    ),
    Case(
        "combine_bias_wrong_shape",
        lambda c: _combine(c, bias=_bf16(NUM_TOKENS, HIDDEN // 2)),
        ValueError,
        ("bias[0]", "[4, 128]", "[4, 64]"),
    ),
    Case(
        "combine_bias_wrong_dtype",
        lambda c: _combine(c, bias=(_bf16(NUM_TOKENS, HIDDEN), torch.zeros(NUM_TOKENS, HIDDEN))),
        TypeError,
        ("bias[1]", "torch.bfloat16", "torch.float32"),
    ),
    Case(
        "combine_three_biases",
        lambda c: _combine(c, bias=tuple(_bf16(NUM_TOKENS, HIDDEN) for _ in range(3))),
        ValueError,
        ("bias", "2", "3"),
    ),
    Case(
        "combine_config_not_a_config",
        lambda c: _combine(c, config=(20, 6, 256, 6, 128)),
        TypeError,
        ("config", "Config", "tuple"),
    ),
    # -- low_latency_dispatch
    Case(
        "ll_dispatch_too_many_tokens",
        lambda c: _ll_dispatch(
            c,
            x=_bf16(LL_CAPACITY + 1, HIDDEN),
            topk_idx=torch.zeros(LL_CAPACITY + 1, NUM_TOPK, dtype=topk_idx_t),
        ),
        ValueError,
        ("num_max_dispatch_tokens_per_rank=8", "9 tokens"),
    ),
    Case(
        "ll_dispatch_num_topk_above_limit",
        lambda c: _ll_dispatch(c, topk_idx=torch.zeros(NUM_TOKENS, 33, dtype=topk_idx_t)),
        ValueError,
        ("topk_idx", "33 columns", "num_topk <= 32"),
    ),
    Case(
        "ll_dispatch_hidden_not_multiple_of_128",
        lambda c: _ll_dispatch(c, x=_bf16(NUM_TOKENS, 192)),
        ValueError,
        ("hidden", "multiple of 128", "192"),
    ),
    Case(
        "ll_dispatch_topk_idx_rows_differ_from_x",
        lambda c: _ll_dispatch(c, topk_idx=c.topk_idx[:3]),
        ValueError,
        ("topk_idx", "[4, *]", "[3, 2]"),
    ),
    Case(
        "ll_dispatch_x_float32",
        lambda c: _ll_dispatch(c, x=c.x.float()),
        TypeError,
        ("x", "torch.bfloat16", "torch.float32"),
    ),
    Case(
        "ll_dispatch_topk_idx_int32",
        lambda c: _ll_dispatch(c, topk_idx=c.topk_idx.int()),
        TypeError,
        ("topk_idx", "torch.int64", "torch.int32"),
    ),
    Case(
        "ll_dispatch_expert_id_too_large",
        lambda c: _ll_dispatch(c, topk_idx=_with(c.topk_idx, (0, 0), NUM_EXPERTS)),
        ValueError,
        ("topk_idx", "expert id 4", "0..3"),
    ),
    Case(
        "ll_dispatch_num_experts_not_multiple_of_num_ranks",
        lambda c: _ll_dispatch(c, topk_idx=c.topk_idx.clamp(max=2), num_experts=3),
        ValueError,
        ("num_experts", "multiple of num_ranks={R}", "got 3"),
        multi_rank_only=True,
    ),
    Case(
        "ll_dispatch_on_normal_buffer",
        lambda c: _ll_dispatch(c, buffer=c.buffer),
        ValueError,
        ("low_latency_mode=True", "low_latency_mode=False"),
    ),
    Case(
        "ll_dispatch_rdma_buffer_too_small",
        lambda c: _ll_dispatch(c, buffer=c.small_ll_buffer),
        ValueError,
        ("num_rdma_bytes={have}", "needs {need}"),
    ),
    Case(
        "ll_dispatch_ue8m0_without_round_scale",
        lambda c: _ll_dispatch(c, use_fp8=True, use_ue8m0=True, round_scale=False),
        ValueError,
        ("use_ue8m0", "round_scale=True", "round_scale=False"),
    ),
    Case(
        "ll_dispatch_recv_stats_int64",
        lambda c: _ll_dispatch(
            c, cumulative_local_expert_recv_stats=torch.zeros(c.num_local_experts, dtype=torch.int64)
        ),
        TypeError,
        ("cumulative_local_expert_recv_stats", "torch.int32", "torch.int64"),
    ),
    Case(
        "ll_dispatch_recv_stats_wrong_shape",
        lambda c: _ll_dispatch(
            c, cumulative_local_expert_recv_stats=torch.zeros(c.num_local_experts + 1, dtype=torch.int32)
        ),
        ValueError,
        ("cumulative_local_expert_recv_stats", "[{L}]", "got [{L1}]"),
    ),
    Case(
        "ll_dispatch_wait_stats_int32",
        lambda c: _ll_dispatch(
            c, dispatch_wait_recv_cost_stats=torch.zeros(c.num_ranks, c.num_ranks, dtype=torch.int32)
        ),
        TypeError,
        ("dispatch_wait_recv_cost_stats", "torch.int64", "torch.int32"),
    ),
    Case(
        "ll_dispatch_async_finish_and_return_recv_hook",
        lambda c: _ll_dispatch(c, async_finish=True, return_recv_hook=True),
        ValueError,
        ("async_finish", "return_recv_hook"),
    ),
    # -- low_latency_combine
    Case(
        "ll_combine_normal_mode_handle",
        lambda c: _ll_combine(c, handle=c.handle),
        TypeError,
        ("handle", "low_latency_dispatch", "DispatchHandle"),
    ),
    Case(
        "ll_combine_x_wrong_shape",
        lambda c: _ll_combine(c, x=_bf16(c.num_local_experts, c.num_ranks * LL_CAPACITY - 1, HIDDEN)),
        ValueError,
        ("x", "[{L}, {ll_rows}, 128]", "got [{L}, "),
    ),
    Case(
        "ll_combine_x_float32",
        lambda c: _ll_combine(c, x=torch.zeros(c.num_local_experts, c.num_ranks * LL_CAPACITY, HIDDEN)),
        TypeError,
        ("x", "torch.bfloat16", "torch.float32"),
    ),
    Case(
        "ll_combine_out_wrong_shape",
        lambda c: _ll_combine(c, out=_bf16(NUM_TOKENS + 1, HIDDEN)),
        ValueError,
        ("out", "[4, 128]", "[5, 128]"),
    ),
    Case(
        "ll_combine_topk_weights_float16",
        lambda c: _ll_combine(c, topk_weights=c.topk_weights.half()),
        TypeError,
        ("topk_weights", "torch.float32", "torch.float16"),
    ),
    Case(
        "ll_combine_topk_idx_more_tokens_than_capacity",
        lambda c: _ll_combine(
            c,
            topk_idx=torch.zeros(LL_CAPACITY + 1, NUM_TOPK, dtype=topk_idx_t),
            topk_weights=torch.ones(LL_CAPACITY + 1, NUM_TOPK),
        ),
        ValueError,
        ("topk_idx", "9 tokens", "capacity is 8"),
    ),
    Case(
        "ll_combine_topk_idx_wrong_num_topk",
        lambda c: _ll_combine(
            c,
            topk_idx=torch.zeros(NUM_TOKENS, NUM_TOPK + 1, dtype=topk_idx_t),
            topk_weights=torch.ones(NUM_TOKENS, NUM_TOPK + 1),
        ),
        ValueError,
        ("topk_idx", "num_topk=2", "got 3"),
    ),
    Case(
        "ll_combine_async_finish_and_return_recv_hook",
        lambda c: _ll_combine(c, async_finish=True, return_recv_hook=True),
        ValueError,
        ("async_finish", "return_recv_hook"),
    ),
    Case(
        "ll_combine_handle_not_a_handle",
        lambda c: _ll_combine(c, handle="handle"),
        TypeError,
        ("handle", "str"),
    ),
    # -- static helpers, shrink mode, lifetime
    Case(
        "set_num_sms_odd",
        lambda c: Buffer.set_num_sms(3),
        ValueError,
        ("new_num_sms", "even", "got 3"),
    ),
    Case(
        "set_num_sms_not_int",
        lambda c: Buffer.set_num_sms("24"),
        TypeError,
        ("new_num_sms", "int", "'24'"),
    ),
    Case(
        "clean_low_latency_buffer_num_experts_not_multiple_of_num_ranks",
        lambda c: c.ll_buffer.clean_low_latency_buffer(LL_CAPACITY, HIDDEN, 3),
        ValueError,
        ("num_experts", "multiple of num_ranks={R}", "got 3"),
        multi_rank_only=True,
    ),
    Case(
        "update_mask_buffer_without_enable_shrink",
        lambda c: c.ll_buffer.low_latency_update_mask_buffer(0, True),
        ValueError,
        ("enable_shrink=True",),
    ),
    Case(
        "query_mask_buffer_without_enable_shrink",
        lambda c: c.ll_buffer.low_latency_query_mask_buffer(torch.zeros(c.num_ranks, dtype=torch.int32)),
        ValueError,
        ("enable_shrink=True",),
    ),
    Case(
        "clean_mask_buffer_without_enable_shrink",
        lambda c: c.ll_buffer.low_latency_clean_mask_buffer(),
        ValueError,
        ("enable_shrink=True",),
    ),
    Case(
        "rank_to_mask_out_of_range",
        lambda c: c.shrink_buffer.low_latency_update_mask_buffer(c.num_ranks, True),
        ValueError,
        ("rank_to_mask", "< {R}", "got {R}"),
    ),
    Case(
        "rank_to_mask_negative",
        lambda c: c.shrink_buffer.low_latency_update_mask_buffer(-1, True),
        ValueError,
        ("rank_to_mask", ">= 0", "got -1"),
    ),
    Case(
        "query_mask_status_wrong_dtype",
        lambda c: c.shrink_buffer.low_latency_query_mask_buffer(torch.zeros(c.num_ranks, dtype=torch.int64)),
        TypeError,
        ("mask_status", "torch.int32", "torch.int64"),
    ),
    Case(
        "update_mask_buffer_without_enable_shrink_states_received_value",
        lambda c: c.ll_buffer.low_latency_update_mask_buffer(0, True),
        ValueError,
        ("enable_shrink=True", "enable_shrink=False"),
    ),
    Case(
        "buffer_num_nvl_bytes_negative",
        lambda c: Buffer(c.buffer.group, num_nvl_bytes=-1),
        ValueError,
        ("num_nvl_bytes", ">= 0", "got -1"),
    ),
    Case(
        "buffer_num_rdma_bytes_float",
        lambda c: Buffer(c.buffer.group, num_rdma_bytes=1.5),
        TypeError,
        ("num_rdma_bytes", "int", "1.5"),
    ),
    Case(
        "buffer_backend_unknown",
        lambda c: Buffer(c.buffer.group, backend="bogus"),
        ValueError,
        ("backend", "reference", "bogus"),
    ),
    Case(
        "buffer_backend_not_a_str",
        lambda c: Buffer(c.buffer.group, backend=5),
        TypeError,
        ("backend", "str", "5"),
    ),
    Case(
        "get_local_buffer_tensor_size_too_large",
        lambda c: c.buffer.get_local_buffer_tensor(torch.int32, torch.Size([3])),
        ValueError,
        ("size [3]", "needs 12 bytes", "has 0"),
    ),
    Case(
        "get_local_buffer_tensor_negative_offset",
        lambda c: c.buffer.get_local_buffer_tensor(torch.int32, offset=-8),
        ValueError,
        ("offset", ">= 0", "-8"),
    ),
    Case(
        "layout_after_destroy",
        lambda c: c.destroyed.get_dispatch_layout(c.topk_idx, NUM_EXPERTS),
        RuntimeError,
        ("destroy",),
    ),
    Case(
        "dispatch_after_destroy",
        lambda c: _dispatch(c, buffer=c.destroyed),
        RuntimeError,
        ("destroy",),
    ),
]

CASES_BY_NAME = {case.name: case for case in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"


def _expected_needles(case: Case, fmt: dict[str, int]) -> list[str]:
    return [needle.format(**fmt) for needle in case.needles]


# ---- single process --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_rank_group() -> Iterator[Any]:
    """A one-rank gloo group in this process (reused if some group is already initialized)."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1
        )
    yield dist.group.WORLD
    if owned:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ctx1(single_rank_group: Any) -> Ctx:
    if dist.get_world_size(single_rank_group) != 1:
        pytest.skip("an already-initialized process group has more than one rank")
    return make_ctx(single_rank_group)


@pytest.fixture(autouse=True)
def _restore_num_sms() -> Iterator[None]:
    saved = Buffer.num_sms
    yield
    Buffer.num_sms = saved


def _params(cases: list[Case]) -> list[Any]:
    return [
        pytest.param(
            case,
            id=case.name,
            marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [],
        )
        for case in cases
    ]


@pytest.mark.parametrize("case", _params([c for c in CASES if not c.multi_rank_only]))
def test_bad_input_single_rank(case: Case, ctx1: Ctx) -> None:
    num_sms = Buffer.num_sms
    with pytest.raises(case.error) as info:
        case.call(ctx1)
    assert type(info.value) is case.error
    message = str(info.value)
    for needle in _expected_needles(case, ctx1.fmt()):
        assert needle in message, f"{needle!r} not in {message!r}"
    assert len(message) <= _MAX_MESSAGE_CHARS, f"not a one-line message: {message!r}"
    assert "\n" not in message, f"not a one-line message: {message!r}"
    assert Buffer.num_sms == num_sms, "a rejected call changed Buffer.num_sms"


def test_single_rank_buffer_still_works_after_bad_input(ctx1: Ctx) -> None:
    for case in CASES:
        if not case.multi_rank_only and not case.xfail:
            with pytest.raises(case.error):
                case.call(ctx1)
    recv_x, *_ = _dispatch(ctx1)
    combined_x, _, _ = _combine(ctx1, x=recv_x)
    num_hits = ctx1.is_token_in_rank.sum(dim=1, dtype=torch.float32)
    torch.testing.assert_close(combined_x.float(), ctx1.x.float() * num_hits[:, None])


# ---- two ranks: only rank 0 gets the bad input ------------------------------------------------------


def _run_cases_on_rank0(ctx: Ctx) -> dict[str, tuple[str, str, float]]:
    outcomes: dict[str, tuple[str, str, float]] = {}
    for case in CASES:
        start = time.monotonic()
        try:
            case.call(ctx)
            kind, message = "no error", ""
        except Exception as error:
            kind, message = type(error).__name__, str(error)
        outcomes[case.name] = (kind, message, time.monotonic() - start)
    return outcomes


def bad_input_worker(pgi: ProcessGroupInfo, sync_dir: str) -> dict[str, Any]:
    """Rank 0 runs every case while rank 1 is idle; then both run a real round trip.

    Rank 1 waits for rank 0 through a file, not a collective: a bad call that did communicate
    times out against the idle rank and may break the gloo pair, and the per-case results must
    still come back.
    """
    ctx = make_ctx(pgi.group, Settings(timeout_s=_PEER_TIMEOUT_S))
    dist.barrier(group=pgi.group)
    verdict_file = Path(sync_dir) / "rank0_verdict"
    outcomes: dict[str, tuple[str, str, float]] = {}
    if pgi.rank == 0:
        outcomes = _run_cases_on_rank0(ctx)
        # Every bad call returned at once: nothing can have waited on (or sent to) rank 1.
        clean = all(elapsed_s < _FAST_ERROR_S for _, _, elapsed_s in outcomes.values())
        verdict_file.write_text("clean" if clean else "communicated")
    else:
        deadline = time.monotonic() + _LAUNCH_TIMEOUT_S / 2
        while not verdict_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        clean = verdict_file.exists() and verdict_file.read_text() == "clean"
    round_trip_ok = None
    if clean:
        # Both ranks: a real dispatch + combine after the rejected calls.
        recv_x, *_ = _dispatch(ctx)
        combined_x, _, _ = _combine(ctx, x=recv_x)
        num_hits = ctx.is_token_in_rank.sum(dim=1, dtype=torch.float32)
        round_trip_ok = bool(torch.equal(combined_x.float(), ctx.x.float() * num_hits[:, None]))
    return {"outcomes": outcomes, "fmt": ctx.fmt(), "round_trip_ok": round_trip_ok}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    sync_dir = str(tmp_path_factory.mktemp("bad_input_sync"))
    return parallel_launch(2, bad_input_worker, sync_dir, backend="gloo", timeout_s=_LAUNCH_TIMEOUT_S)


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_two_ranks_fails_before_communication(
    case: Case, two_rank_results: list[dict[str, Any]]
) -> None:
    rank0 = two_rank_results[0]
    kind, message, elapsed_s = rank0["outcomes"][case.name]
    assert kind == case.error.__name__, f"expected {case.error.__name__}, got {kind}: {message}"
    for needle in _expected_needles(case, rank0["fmt"]):
        assert needle in message, f"{needle!r} not in {message!r}"
    assert elapsed_s < _FAST_ERROR_S, f"took {elapsed_s:.2f} s: waited for the idle peer?"


def test_two_ranks_round_trip_after_bad_input(two_rank_results: list[dict[str, Any]]) -> None:
    assert two_rank_results[1]["outcomes"] == {}
    # None: skipped because some bad call on rank 0 took long enough to have communicated.
    assert [r["round_trip_ok"] for r in two_rank_results] == [True, True]
