"""Deterministic inputs and an independent, per-token oracle for the multi-process tests.

Every rank can rebuild every rank's inputs from ``(case.seed, rank)`` (``make_inputs``), so each
rank computes the results it should receive with plain Python loops over ranks, tokens and
experts, without any communication and without epcomm's backend code.

Rows are structured: channel ``RANK_CHANNEL`` of token ``t`` on rank ``r`` holds ``r`` and channel
``TOKEN_CHANNEL`` holds ``t`` (bf16 holds integers up to 256 exactly), the other channels are
random. A misrouted row therefore names itself in the assertion message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch

from epcomm.testing import make_routing

RANK_CHANNEL = 0
TOKEN_CHANNEL = 1
MAX_TOKENS = 256
"""Token indices must stay exact in bf16 (integers up to 256)."""

RowKey = tuple[int, int]
"""``(source rank, source token index)`` of a row."""


class Routing(str, Enum):
    """How tokens pick their experts."""

    BALANCED = "balanced"  # DeepEP style: topk of |randn| + 1 over all experts
    HOT_RANK_0 = "hot_rank_0"  # every token picks only experts of rank 0 (the rest of top-k is -1)


@dataclass(frozen=True)
class Case:
    """One scenario's sizes and routing; all ranks build identical inputs from it."""

    seed: int
    num_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    routing: Routing = Routing.BALANCED
    drop_prob: float = 0.0  # probability that a top-k slot becomes -1
    empty_ranks: tuple[int, ...] = ()  # ranks that have zero tokens

    def num_tokens_of(self, rank: int) -> int:
        """Tokens rank ``rank`` holds."""
        return 0 if rank in self.empty_ranks else self.num_tokens


class RankInputs(NamedTuple):
    """One rank's inputs: ``x [T, hidden]`` bf16, ``topk_idx [T, K]`` int64, ``topk_weights`` float32."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def _generator(seed: int, rank: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + salt * 1009 + rank)


def make_x(case: Case, rank: int, salt: int = 0) -> torch.Tensor:
    """``[T, hidden]`` bf16 random rows of ``rank`` with ``(rank, token)`` in the first two channels."""
    num_tokens = case.num_tokens_of(rank)
    assert num_tokens <= MAX_TOKENS, f"at most {MAX_TOKENS} tokens keep the token channel exact"
    gen = _generator(case.seed, rank, 100 + salt)
    x = torch.randn(num_tokens, case.hidden, generator=gen).to(torch.bfloat16)
    x[:, RANK_CHANNEL] = rank
    x[:, TOKEN_CHANNEL] = torch.arange(num_tokens, dtype=torch.float32).to(torch.bfloat16)
    return x


def make_inputs(case: Case, rank: int, num_ranks: int) -> RankInputs:
    """Rank ``rank``'s inputs (identical on every process that asks); routing by ``make_routing``."""
    hot_rank_0 = case.routing is Routing.HOT_RANK_0
    topk_idx, topk_weights = make_routing(
        case.num_tokens_of(rank),
        case.num_experts,
        case.num_topk,
        seed=case.seed,
        rank=rank,
        masked_prob=case.drop_prob,
        allowed_experts=range(case.num_experts // num_ranks) if hot_rank_0 else None,
    )
    return RankInputs(make_x(case, rank), topk_idx, topk_weights)


def make_all_inputs(case: Case, num_ranks: int) -> list[RankInputs]:
    """Every rank's inputs, rank order."""
    return [make_inputs(case, rank, num_ranks) for rank in range(num_ranks)]


def power_of_two_scale(index: int) -> float:
    """A multiplier in {0.5, 1, 2}: bf16 rows scaled by it stay exact."""
    return 2.0 ** (index % 3 - 1)


def _stack(rows: Sequence[torch.Tensor], width: int, dtype: torch.dtype) -> torch.Tensor:
    if not rows:
        return torch.empty(0, width, dtype=dtype)
    return torch.stack(list(rows))


# ---- layout ------------------------------------------------------------------------------------


class ExpectedLayout(NamedTuple):
    """What ``get_dispatch_layout`` should return for one rank's ``topk_idx``."""

    num_tokens_per_rank: list[int]
    num_tokens_per_expert: list[int]
    is_token_in_rank: list[list[bool]]


def naive_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> ExpectedLayout:
    """Count, token by token, the ranks (once each) and the experts each token selects."""
    num_local_experts = num_experts // num_ranks
    per_rank = [0] * num_ranks
    per_expert = [0] * num_experts
    in_rank = []
    for experts in topk_idx.tolist():
        row = [False] * num_ranks
        for expert in experts:
            if expert >= 0:
                per_expert[expert] += 1
                row[expert // num_local_experts] = True
        for rank in range(num_ranks):
            per_rank[rank] += int(row[rank])
        in_rank.append(row)
    return ExpectedLayout(per_rank, per_expert, in_rank)


# ---- normal mode ---------------------------------------------------------------------------------


class ExpectedDispatch(NamedTuple):
    """What rank ``me`` should receive from a normal-mode dispatch (real rows only)."""

    keys: list[RowKey]  # (source rank, source token) of every received row, in order
    x: torch.Tensor  # [num_recv, hidden] bf16
    topk_idx: torch.Tensor  # [num_recv, K] int64, local expert ids or -1
    topk_weights: torch.Tensor  # [num_recv, K] float32, 0.0 where not local
    num_tokens_per_expert: list[int]  # [num_local_experts], not aligned
    rank_prefix_matrix: list[list[int]]  # [num_ranks][num_ranks], cumulative over the source


def ranks_of_token(experts: Sequence[int], num_local_experts: int) -> list[int]:
    """The ranks a token with top-k ``experts`` goes to, each once, ascending."""
    return sorted({expert // num_local_experts for expert in experts if expert >= 0})


def naive_dispatch(
    all_inputs: Sequence[RankInputs],
    me: int,
    num_experts: int,
    xs: Sequence[torch.Tensor] | None = None,
) -> ExpectedDispatch:
    """Walk every source rank's tokens in order and keep those that have an expert on ``me``.

    ``xs`` overrides the rows sent (e.g. FP8 data or a second input with the same routing).
    """
    num_ranks = len(all_inputs)
    num_local_experts = num_experts // num_ranks
    sent = [[0] * num_ranks for _ in range(num_ranks)]
    keys: list[RowKey] = []
    rows: list[torch.Tensor] = []
    local_idx_rows: list[list[int]] = []
    local_weight_rows: list[list[float]] = []
    per_expert = [0] * num_local_experts
    for src, inputs in enumerate(all_inputs):
        x = inputs.x if xs is None else xs[src]
        weights = inputs.topk_weights.tolist()
        for token, experts in enumerate(inputs.topk_idx.tolist()):
            ranks = ranks_of_token(experts, num_local_experts)
            for dst in ranks:
                sent[src][dst] += 1
            if me not in ranks:
                continue
            keys.append((src, token))
            rows.append(x[token])
            local = [
                expert - me * num_local_experts if expert >= 0 and expert // num_local_experts == me else -1
                for expert in experts
            ]
            local_idx_rows.append(local)
            local_weight_rows.append(
                [w if idx >= 0 else 0.0 for w, idx in zip(weights[token], local, strict=True)]
            )
            for idx in local:
                if idx >= 0:
                    per_expert[idx] += 1
    prefix = []
    running = [0] * num_ranks
    for src in range(num_ranks):
        running = [running[dst] + sent[src][dst] for dst in range(num_ranks)]
        prefix.append(running)
    num_topk = all_inputs[0].topk_idx.size(1)
    x_any = all_inputs[0].x if xs is None else xs[0]
    return ExpectedDispatch(
        keys,
        _stack(rows, x_any.size(1), x_any.dtype),
        torch.tensor(local_idx_rows, dtype=torch.int64).view(-1, num_topk),
        torch.tensor(local_weight_rows, dtype=torch.float32).view(-1, num_topk),
        per_expert,
        prefix,
    )


def naive_combine(
    inputs: RankInputs,
    num_ranks: int,
    num_experts: int,
    biases: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``combine`` gives the rank holding ``inputs`` when every rank ``dst`` returns
    ``recv_x * power_of_two_scale(dst)`` and the received top-k weights.

    Returns ``combined_x [T, hidden]`` bf16 and ``combined_topk_weights [T, K]`` float32.
    """
    num_local_experts = num_experts // num_ranks
    num_tokens, hidden = inputs.x.shape
    weights = inputs.topk_weights.tolist()
    combined = []
    combined_weights = []
    for token, experts in enumerate(inputs.topk_idx.tolist()):
        accumulator = torch.zeros(hidden, dtype=torch.float32)
        weight_sum = [0.0] * len(experts)
        for dst in ranks_of_token(experts, num_local_experts):
            accumulator += (inputs.x[token] * power_of_two_scale(dst)).float()
            for slot, expert in enumerate(experts):
                if expert >= 0 and expert // num_local_experts == dst:
                    weight_sum[slot] += weights[token][slot]
        for bias in biases:
            accumulator += bias[token].float()
        combined.append(accumulator.to(torch.bfloat16))
        combined_weights.append(weight_sum)
    return (
        _stack(combined, hidden, torch.bfloat16),
        torch.tensor(combined_weights, dtype=torch.float32).view(num_tokens, inputs.topk_idx.size(1)),
    )


# ---- low-latency mode ---------------------------------------------------------------------------


class ExpectedLowLatency(NamedTuple):
    """What rank ``me`` should receive from ``low_latency_dispatch``, per local expert."""

    keys: list[list[RowKey]]  # per local expert: (source rank, token), ordered by rank then token
    x: list[torch.Tensor]  # per local expert: [count, hidden] bf16
    layout_range: list[list[tuple[int, int]]]  # per local expert, per source: (begin, count)


def naive_low_latency_dispatch(
    all_inputs: Sequence[RankInputs],
    me: int,
    num_experts: int,
    masked_ranks: Sequence[int] = (),
) -> ExpectedLowLatency:
    """For each local expert, the tokens that selected it, source by source (masked sources send nothing)."""
    num_ranks = len(all_inputs)
    num_local_experts = num_experts // num_ranks
    hidden = all_inputs[0].x.size(1)
    keys: list[list[RowKey]] = []
    xs: list[torch.Tensor] = []
    ranges: list[list[tuple[int, int]]] = []
    for local_expert in range(num_local_experts):
        expert = me * num_local_experts + local_expert
        expert_keys: list[RowKey] = []
        rows: list[torch.Tensor] = []
        expert_ranges: list[tuple[int, int]] = []
        for src, inputs in enumerate(all_inputs):
            begin = len(expert_keys)
            if src not in masked_ranks:
                for token, experts in enumerate(inputs.topk_idx.tolist()):
                    if expert in experts:
                        expert_keys.append((src, token))
                        rows.append(inputs.x[token])
            expert_ranges.append((begin, len(expert_keys) - begin))
        keys.append(expert_keys)
        xs.append(_stack(rows, hidden, torch.bfloat16))
        ranges.append(expert_ranges)
    return ExpectedLowLatency(keys, xs, ranges)


def naive_low_latency_combine(
    inputs: RankInputs, num_ranks: int, num_experts: int, masked_ranks: Sequence[int] = ()
) -> torch.Tensor:
    """``sum_k w[t, k] * x[t] * power_of_two_scale(expert_k)`` per token in float32, then bf16.

    That is what combine gives when every expert ``e`` returns its rows times
    ``power_of_two_scale(e)``; experts on masked ranks contribute nothing.
    """
    num_local_experts = num_experts // num_ranks
    hidden = inputs.x.size(1)
    weights = inputs.topk_weights.tolist()
    out = []
    for token, experts in enumerate(inputs.topk_idx.tolist()):
        accumulator = torch.zeros(hidden, dtype=torch.float32)
        for slot, expert in enumerate(experts):
            if expert < 0 or expert // num_local_experts in masked_ranks:
                continue
            expert_output = (inputs.x[token] * power_of_two_scale(expert)).float()
            accumulator += torch.tensor(weights[token][slot], dtype=torch.float32) * expert_output
        out.append(accumulator.to(torch.bfloat16))
    return _stack(out, hidden, torch.bfloat16)


# ---- comparisons ---------------------------------------------------------------------------------


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """An integer view with the same bits, so equality is bitwise (NaN-safe, -0.0 != 0.0)."""
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.dtype.itemsize]
    return tensor.contiguous().view(integer)


def describe_row(row: torch.Tensor) -> str:
    """``(src rank a, token b)`` decoded from a bf16 row's structured channels."""
    if row.dtype != torch.bfloat16 or row.numel() <= TOKEN_CHANNEL:
        return "a row of unknown origin"
    return f"(src rank {row[RANK_CHANNEL].item():g}, token {row[TOKEN_CHANNEL].item():g})"


def _key_text(key: RowKey) -> str:
    return f"(src rank {key[0]}, token {key[1]})"


def assert_rows_equal(
    got: torch.Tensor,
    expected: torch.Tensor,
    keys: Sequence[RowKey],
    what: str,
    candidates: dict[RowKey, torch.Tensor] | None = None,
) -> None:
    """``got`` must be bitwise ``expected`` (same shape, same dtype); names the first wrong row.

    The wrong row's origin is decoded from its structured channels (bf16), or looked up among
    ``candidates`` (every row any rank sent, e.g. FP8 bytes) when given.
    """
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    assert tuple(got.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    )
    if got.numel() == 0:
        return
    wrong = (_bits(got) != _bits(expected)).reshape(got.size(0), -1).any(dim=1)
    if bool(wrong.any()):
        row = int(wrong.nonzero()[0])
        origin = describe_row(got[row])
        if candidates is not None:
            match = next(
                (key for key, c in candidates.items() if torch.equal(_bits(c), _bits(got[row]))), None
            )
            origin = "a row no rank sent" if match is None else _key_text(match)
        column = int((_bits(got[row]) != _bits(expected[row])).reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(wrong.sum())} of {got.size(0)} rows differ; first wrong row {row}: "
            f"expected {_key_text(keys[row])}, got {origin}; first wrong column {column}: "
            f"expected {expected[row].reshape(-1)[column].item()!r}, got {got[row].reshape(-1)[column].item()!r}"
        )


def assert_rows_close(
    got: torch.Tensor,
    expected: torch.Tensor,
    keys: Sequence[RowKey],
    what: str,
    rtol: float,
    atol_of_max: float,
    group_size: int | None = None,
    candidates: dict[RowKey, torch.Tensor] | None = None,
    rows_are_structured: bool = True,
) -> None:
    """``|got - expected| <= rtol * |expected| + atol_of_max * amax`` element-wise.

    ``amax`` is the absolute maximum of ``expected`` over the whole tensor, or over each group of
    ``group_size`` channels of a row (FP8 scales are per 128 channels). Names the first wrong row;
    with ``candidates`` (every row any rank sent) also the sent row nearest to what arrived, else
    the origin decoded from the structured channels (unless ``rows_are_structured`` is false, as
    for combined sums).
    """
    assert tuple(got.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    )
    if got.numel() == 0:
        return
    got32, expected32 = got.float(), expected.float()
    if group_size is None:
        amax = expected32.abs().max()
    else:
        grouped = expected32.abs().reshape(*expected32.shape[:-1], -1, group_size)
        amax = grouped.amax(dim=-1, keepdim=True).expand_as(grouped).reshape(expected32.shape)
    tolerance = rtol * expected32.abs() + atol_of_max * amax
    bad = (got32 - expected32).abs() > tolerance
    bad |= got32.isnan() != expected32.isnan()
    wrong = bad.reshape(got.size(0), -1).any(dim=1)
    if bool(wrong.any()):
        row = int(wrong.nonzero()[0])
        column = int(bad[row].reshape(-1).nonzero()[0])
        origin = ""
        if candidates:
            origin = f", got a row nearest to {_key_text(closest_key(got[row], candidates))}"
        elif rows_are_structured:
            origin = f", got {describe_row(got[row])}"
        raise AssertionError(
            f"{what}: {int(wrong.sum())} of {got.size(0)} rows out of tolerance (rtol={rtol}, "
            f"atol={atol_of_max} x amax); first wrong row {row}: expected {_key_text(keys[row])}"
            f"{origin}; column {column}: expected "
            f"{expected32[row].reshape(-1)[column].item():.6g}, got {got32[row].reshape(-1)[column].item():.6g}"
        )


def closest_key(row: torch.Tensor, candidates: dict[RowKey, torch.Tensor]) -> RowKey:
    """The candidate row nearest to ``row`` (max abs difference), to name a misrouted lossy row."""
    best, best_error = next(iter(candidates)), math.inf
    for key, candidate in candidates.items():
        error = float((candidate.float() - row.float()).abs().max())
        if error < best_error:
            best, best_error = key, error
    return best


def all_rows(xs: Sequence[torch.Tensor]) -> dict[RowKey, torch.Tensor]:
    """``{(rank, token): row}`` of every rank's rows, to name a misrouted row."""
    return {(rank, token): x[token] for rank, x in enumerate(xs) for token in range(x.size(0))}
