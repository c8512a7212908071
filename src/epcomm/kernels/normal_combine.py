"""Normal-mode combine, receive side: sum the rows peers pushed back for each token.

For token ``t`` the row from rank ``j`` sits at ``slot[t, j]`` of this rank's symmetric combine
area. The sum runs in float32 in rank order 0..R-1 (the reference backend's order, so results are
bitwise equal to it and identical across runs), then the biases, then one bf16 write.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from epcomm.kernels.launch import launch

__all__ = ["REDUCE_TOKENS", "launch_combine_reduce"]

# Tokens reduced per program step (a tuning knob for side-by-side runs: ``EPCOMM_REDUCE_TOKENS``).
REDUCE_TOKENS = int(os.environ.get("EPCOMM_REDUCE_TOKENS", "2"))


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
    # TOKENS consecutive tokens per step: every rank's row of every token is in flight before the
    # first add (masked loads, no branches; adding the +0.0 of a missing row changes no bit of the
    # sum, which starts at +0.0 like the reference's).
    for first in range(pid * TOKENS, num_tokens, grid * TOKENS):
        tokens = token_offsets.to(tl.int64) + first
        valid = tokens < num_tokens
        accumulator = tl.zeros([TOKENS, H_BLOCK], dtype=tl.float32)
        weights = tl.zeros([TOKENS, K_BLOCK], dtype=tl.float32)
        for rank in tl.static_range(NUM_RANKS):
            slot = tl.load(slot_ptr + tokens * NUM_RANKS + rank, mask=valid, other=-1).to(tl.int64)
            present = (slot >= 0)[:, None]
            # Written by a peer over NVLink: .cg bypasses the non-coherent L1.
            row = tl.load(
                area_x_ptr + slot[:, None] * HIDDEN + cols,
                mask=mask & present,
                other=0.0,
                cache_modifier=".cg",
            )
            accumulator += row.to(tl.float32)
            if HAS_WEIGHTS:
                w = tl.load(
                    area_weights_ptr + slot[:, None] * NUM_TOPK + k_cols,
                    mask=k_mask & present,
                    other=0.0,
                    cache_modifier=".cg",
                )
                weights += w
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
    area_x: torch.Tensor,
    area_weights: torch.Tensor | None,
    slot: torch.Tensor,
    bias: tuple[torch.Tensor, ...],
    out_x: torch.Tensor,
    out_weights: torch.Tensor | None,
    num_sms: int,
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
            "H_BLOCK": triton.next_power_of_2(hidden),
            "NUM_TOPK": num_topk,
            "K_BLOCK": triton.next_power_of_2(num_topk),
            "TOKENS": REDUCE_TOKENS,
            "HAS_WEIGHTS": out_weights is not None,
            "NUM_BIAS": len(bias),
        },
        16,
    )
