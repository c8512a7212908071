"""Low-latency combine over NVLink: expert outputs go back as one bf16 row per (token, top-k slot)
into slot ``[token, k]`` of the token's rank; the token's rank applies the weights.

Send (``ll_combine_send_kernel``): work item ``(source rank, token, slot)`` with a local expert
(``combine_gather_idx >= 0``) copies that expert output row to the source rank; consecutive items
go to different ranks; the last program to finish signals every peer (``ll_arrive_and_signal``).
Receive (``ll_combine_recv_kernel``, the hook): bounded wait for every unmasked expert rank, then
``sum_k w[t, k] * row[t, k]`` in float32 in slot order, one bf16 write.
"""

from __future__ import annotations

import triton
import triton.language as tl

from epcomm.kernels.exchange import _peer
from epcomm.kernels.low_latency_dispatch import ll_arrive_and_signal, wait_sources

__all__ = ["ll_combine_recv_kernel", "ll_combine_send_kernel"]


@triton.jit(do_not_specialize=["rank", "flag_offset"])
def ll_combine_send_kernel(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    x_ptr,
    gather_idx_ptr,
    mask_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    rank,
    flag_offset,
    parity_offset,
    NUM_RANKS: tl.constexpr,
    CAPACITY: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    words = tl.arange(0, X_BLOCK)
    word_mask = words < X_WORDS
    ITEMS_PER_RANK: tl.constexpr = CAPACITY * NUM_TOPK
    for item in range(pid, NUM_RANKS * ITEMS_PER_RANK, grid):
        dst = (item + rank) % NUM_RANKS  # spread: consecutive items go to different ranks
        slot = item // NUM_RANKS  # token * NUM_TOPK + k on the destination
        row = tl.load(gather_idx_ptr + dst * ITEMS_PER_RANK + slot)
        if row >= 0:
            if tl.load(mask_ptr + dst) == 0:
                data = tl.load(x_ptr + row * X_WORDS + words, mask=word_mask)
                base = _peer(dst, p0, p1, p2, p3, p4, p5, p6, p7) + parity_offset
                tl.store(base + slot.to(tl.int64) * X_WORDS + words, data, mask=word_mask)
    ll_arrive_and_signal(
        p0,
        p1,
        p2,
        p3,
        p4,
        p5,
        p6,
        p7,
        mask_ptr,
        arrival_ptr,
        send_seq_ptr,
        recv_expected_ptr,
        rank,
        flag_offset,
        0,  # no count: the combine receiver reads its own tokens' slots
        0,
        NUM_RANKS,
        False,
    )


@triton.jit(do_not_specialize=["num_tokens", "rank", "timeout_ns", "error_address", "flag_offset"])
def ll_combine_recv_kernel(
    local_ptr,
    mask_ptr,
    expected_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    out_ptr,
    wait_stats_ptr,
    num_tokens,
    rank,
    timeout_ns,
    error_address,
    flag_offset,
    parity_offset,
    NUM_RANKS: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    HIDDEN: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    H_BLOCK: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    error_ptr = error_address.to(tl.pointer_type(tl.int32))
    wait_sources(
        local_ptr + flag_offset,
        mask_ptr,
        expected_ptr,
        timeout_ns,
        error_ptr,
        9,  # Operation.LOW_LATENCY_COMBINE
        rank,
        wait_stats_ptr,
        pid == 0,
        NUM_RANKS,
        HAS_WAIT_STATS,
    )
    staging = (local_ptr + parity_offset).to(tl.pointer_type(tl.bfloat16), bitcast=True)
    cols = tl.arange(0, H_BLOCK)
    col_mask = cols < HIDDEN
    for token in range(pid, num_tokens, grid):
        accumulator = tl.zeros([H_BLOCK], dtype=tl.float32)
        # Masked loads, no branches: all top-k rows are in flight before the first multiply-add.
        for k in tl.static_range(NUM_TOPK):
            expert = tl.load(topk_idx_ptr + token * NUM_TOPK + k)
            present = expert >= 0
            unmasked = tl.load(mask_ptr + tl.where(present, expert // NUM_LOCAL_EXPERTS, 0)) == 0
            use = present & unmasked
            weight = tl.load(topk_weights_ptr + token * NUM_TOPK + k)
            row = tl.load(
                staging + (token * NUM_TOPK + k).to(tl.int64) * HIDDEN + cols,
                mask=col_mask & use,
                other=0.0,
                cache_modifier=".cg",
            )
            accumulator += tl.where(use, weight, 0.0) * row.to(tl.float32)
        tl.store(out_ptr + token.to(tl.int64) * HIDDEN + cols, accumulator.to(tl.bfloat16), mask=col_mask)
