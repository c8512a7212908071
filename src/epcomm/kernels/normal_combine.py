"""Normal-mode combine, receive side: sum the rows peers pushed back for each token.

For token ``t`` the row from rank ``j`` sits at ``slot[t, j]`` of this rank's symmetric combine
area. The sum runs in float32 in rank order 0..R-1 (the reference backend's order, so results are
bitwise equal to it and identical across runs), then the biases, then one bf16 write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm._math import next_pow2
from epcomm.kernels.launch import launch

__all__ = ["launch_combine_reduce", "reduce_tokens_per_step"]


def reduce_tokens_per_step(num_ranks: int, forced: int = 0) -> int:
    """Tokens reduced per program step: ``forced`` if non-zero (``Settings.reduce_tokens``), else
    enough that ~16 rows are in flight per program (EP4 prefill at 24 SMs: 1 / 2 / 4 tokens per
    step 306 / 300 / 153 us, docs/performance.md)."""
    return forced or max(1, min(8, 16 // next_pow2(num_ranks)))


@triton.jit
def _row(
    area_x_ptr, slot_ptr, tokens, valid, cols, mask, source, NUM_RANKS: tl.constexpr, HIDDEN: tl.constexpr
):
    """Rank ``source``'s rows for ``tokens`` ([TOKENS, H_BLOCK] bf16, 0.0 where absent)."""
    slot = tl.load(slot_ptr + tokens * NUM_RANKS + source, mask=valid, other=-1).to(tl.int64)
    # Written by a peer over NVLink: .cg bypasses the non-coherent L1.
    return tl.load(
        area_x_ptr + slot[:, None] * HIDDEN + cols,
        mask=mask & (slot >= 0)[:, None],
        other=0.0,
        cache_modifier=".cg",
    )


# num_tokens stays unspecialized for speed, not only for fewer compilations: specialized (a multiple
# of 16), ptxas schedules fewer row loads ahead of the adds (86 instead of 101 registers) and the
# EP4-shape reduce takes twice as long (24 programs: 302 vs 151 us; docs/performance.md).
@triton.jit(do_not_specialize=["num_tokens"])
def combine_reduce_kernel(
    area_x_ptr,
    area_weights_ptr,
    slot_ptr,
    bias0_ptr,
    bias1_ptr,
    out_x_ptr,
    out_weights_ptr,
    num_tokens,
    NUM_RANKS: tl.constexpr,
    HIDDEN: tl.constexpr,
    H_BLOCK: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    TOKENS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    NUM_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, H_BLOCK), H_BLOCK), H_BLOCK)[None, :]
    mask = cols < HIDDEN
    k_cols = tl.arange(0, K_BLOCK)[None, :]
    k_mask = k_cols < NUM_TOPK
    token_offsets = tl.arange(0, TOKENS)
    # TOKENS consecutive tokens per step, every rank's rows as masked loads with no branches (adding
    # the +0.0 of a missing row changes no bit of the sum, which starts at +0.0 like the
    # reference's). Loading all ranks' rows into separate variables before the first add measured
    # the same (152.8 vs 152.6 us), so the plain loop stays.
    for first in range(pid * TOKENS, num_tokens, grid * TOKENS):
        tokens = token_offsets.to(tl.int64) + first
        valid = tokens < num_tokens
        accumulator = tl.zeros([TOKENS, H_BLOCK], dtype=tl.float32)
        weights = tl.zeros([TOKENS, K_BLOCK], dtype=tl.float32)
        for source in tl.static_range(NUM_RANKS):
            accumulator += _row(
                area_x_ptr, slot_ptr, tokens, valid, cols, mask, source, NUM_RANKS, HIDDEN
            ).to(tl.float32)
        if HAS_WEIGHTS:
            for source in tl.static_range(NUM_RANKS):
                slot = tl.load(slot_ptr + tokens * NUM_RANKS + source, mask=valid, other=-1).to(tl.int64)
                weights += tl.load(
                    area_weights_ptr + slot[:, None] * NUM_TOPK + k_cols,
                    mask=k_mask & (slot >= 0)[:, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
        inside = valid[:, None]
        if NUM_BIAS >= 1:
            accumulator += tl.load(
                bias0_ptr + tokens[:, None] * HIDDEN + cols, mask=mask & inside, other=0.0
            ).to(tl.float32)
        if NUM_BIAS >= 2:
            accumulator += tl.load(
                bias1_ptr + tokens[:, None] * HIDDEN + cols, mask=mask & inside, other=0.0
            ).to(tl.float32)
        tl.store(out_x_ptr + tokens[:, None] * HIDDEN + cols, accumulator.to(tl.bfloat16), mask=mask & inside)
        if HAS_WEIGHTS:
            tl.store(out_weights_ptr + tokens[:, None] * NUM_TOPK + k_cols, weights, mask=k_mask & inside)


def launch_combine_reduce(
    *,
    area_x: torch.Tensor,
    area_weights: torch.Tensor | None,
    slot: torch.Tensor,
    bias: tuple[torch.Tensor, ...],
    out_x: torch.Tensor,
    out_weights: torch.Tensor | None,
    num_sms: int,
    num_warps: int,
    tokens_per_step: int = 0,
) -> None:
    """Reduce the pushed-back rows into ``out_x`` (and the weights into ``out_weights``).

    Arguments:
        area_x: ``[capacity, hidden]`` bf16 view of this rank's symmetric combine area.
        area_weights: ``[capacity, num_topk]`` float32 view, or ``None``.
        slot: ``[num_tokens, num_ranks]`` int32, row of the ``(token, rank)`` contribution, ``-1`` = none.
        bias: 0, 1 or 2 contiguous ``[num_tokens, hidden]`` bf16 tensors.
        out_x: ``[num_tokens, hidden]`` bf16 result.
        out_weights: ``[num_tokens, num_topk]`` float32 result, or ``None``.
        num_sms: programs to launch.
        num_warps: warps per program (``Settings.reduce_warps``).
        tokens_per_step: tokens per program step, ``0``: ``reduce_tokens_per_step``'s rule.
    """
    num_tokens, hidden = out_x.shape
    if num_tokens == 0:
        return
    num_topk = out_weights.size(1) if out_weights is not None else 1
    launch(
        combine_reduce_kernel,
        (max(1, min(num_sms, num_tokens)),),
        (
            area_x,
            area_weights if area_weights is not None else area_x,
            slot,
            bias[0] if len(bias) >= 1 else out_x,
            bias[1] if len(bias) >= 2 else out_x,
            out_x,
            out_weights if out_weights is not None else area_x,
            num_tokens,
        ),
        {
            "NUM_RANKS": slot.size(1),
            "HIDDEN": hidden,
            "H_BLOCK": next_pow2(hidden),
            "NUM_TOPK": num_topk,
            "K_BLOCK": next_pow2(num_topk),
            "TOKENS": reduce_tokens_per_step(slot.size(1), tokens_per_step),
            "HAS_WEIGHTS": out_weights is not None,
            "NUM_BIAS": len(bias),
        },
        num_warps,
    )
