"""Low-latency combine over NVLink: expert outputs go back as one bf16 row per (token, top-k slot)
into slot ``[token, k]`` of the token's rank; the token's rank applies the weights.

Send (``ll_combine_send_kernel``): work item ``(source rank, token, slot)`` with a local expert
(``combine_gather_idx >= 0``) copies that expert output row to the source rank; consecutive items
go to different ranks; the last program to finish signals every peer (``ll_arrive_and_signal``).
Receive (``ll_combine_recv_kernel``, the hook): bounded wait for every unmasked expert rank, then
``sum_k w[t, k] * row[t, k]`` in float32 in slot order, one bf16 write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm._math import next_pow2
from epcomm.kernels.launch import launch
from epcomm.kernels.low_latency_dispatch import (
    LowLatencyWords,
    SignalState,
    ll_arrive_and_signal,
    wait_sources,
)
from epcomm.kernels.primitives import peer_pointer, store_remote
from epcomm.kernels.symmetric_peers import SymmetricPeers

__all__ = ["launch_ll_combine_recv", "launch_ll_combine_send"]


@triton.jit(do_not_specialize=["rank", "flag_offset"])
def ll_combine_send_kernel(
    peer_table,
    x_ptr,
    gather_idx_ptr,
    mask_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    rank,
    flag_offset,
    staging_offset,
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
                base = peer_pointer(peer_table, dst) + staging_offset
                store_remote(base + slot.to(tl.int64) * X_WORDS + words, data, word_mask)
    ll_arrive_and_signal(
        peer_table,
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


@triton.jit(
    do_not_specialize=["num_tokens", "rank", "timeout_ns", "error_address", "operation_code", "flag_offset"]
)
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
    operation_code,
    flag_offset,
    staging_offset,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
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
        operation_code,
        rank,
        wait_stats_ptr,
        pid == 0,
        NUM_RANKS,
        R_BLOCK,
        HAS_WAIT_STATS,
    )
    staging = (local_ptr + staging_offset).to(tl.pointer_type(tl.bfloat16), bitcast=True)
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


def launch_ll_combine_send(
    *,
    peers: SymmetricPeers,
    x_words: torch.Tensor,
    combine_gather_idx: torch.Tensor,
    rank_mask: torch.Tensor,
    signals: SignalState,
    words: LowLatencyWords,
    num_sms: int,
) -> None:
    """Send phase of a low-latency combine (one launch; the last program signals every peer).

    Arguments:
        peers: the peer table and rank.
        x_words: ``[num_local_experts, num_ranks * capacity, hidden / 2]`` int32 view of the bf16
            expert outputs, contiguous.
        combine_gather_idx: ``[num_ranks, capacity, num_topk]`` int64 from the dispatch handle: the
            flat row of ``x_words`` for slot ``(source, token, k)``, ``-1`` = none here.
        rank_mask: ``[num_ranks]`` int32 device mask, non-zero = skip that rank.
        signals: this (combine, parity)'s device signal state.
        words: this (combine, parity)'s flag and staging offsets.
        num_sms: SMs of the device (the grid is at most 4 programs per SM).
    """
    num_ranks, capacity, num_topk = combine_gather_idx.shape
    x_words_per_row = x_words.size(-1)
    launch(
        ll_combine_send_kernel,
        (max(1, min(num_ranks * capacity * num_topk, 4 * num_sms)),),
        (
            peers.peer_table,
            x_words,
            combine_gather_idx,
            rank_mask,
            signals.arrival,
            signals.send_seq,
            signals.recv_expected,
            peers.rank,
            words.flags,
            words.staging,
        ),
        {
            "NUM_RANKS": peers.num_ranks,
            "CAPACITY": capacity,
            "NUM_TOPK": num_topk,
            "X_WORDS": x_words_per_row,
            "X_BLOCK": next_pow2(x_words_per_row),
        },
        8,
    )


def launch_ll_combine_recv(
    *,
    peers: SymmetricPeers,
    local: torch.Tensor,
    rank_mask: torch.Tensor,
    recv_expected: torch.Tensor,
    words: LowLatencyWords,
    operation_code: int,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor,
    wait_stats: torch.Tensor | None,
    num_local_experts: int,
    num_sms: int,
) -> None:
    """Receive phase of a low-latency combine: bounded wait for every unmasked expert rank, then
    ``out[t] = sum_k topk_weights[t, k] * row[t, k]`` in float32 in slot order, one bf16 write.

    Arguments:
        peers: rank, timeout and error word.
        local: this rank's whole symmetric buffer, int32.
        rank_mask: ``[num_ranks]`` int32 device mask, non-zero = skip that rank's rows.
        recv_expected: ``[num_ranks]`` int32, the sequence expected from each rank.
        words: this (combine, parity)'s flag and staging offsets.
        operation_code: written into the error word on timeout.
        topk_idx: ``[num_tokens, num_topk]`` int64, contiguous.
        topk_weights: ``[num_tokens, num_topk]`` float32, contiguous.
        out: ``[num_tokens, hidden]`` bf16.
        wait_stats: ``[num_ranks]`` int64 to add the wait times (ns) to, or ``None``.
        num_local_experts: experts per rank.
        num_sms: programs at most.
    """
    num_tokens, hidden = out.shape
    launch(
        ll_combine_recv_kernel,
        (max(1, min(num_tokens, num_sms)),),
        (
            local,
            rank_mask,
            recv_expected,
            topk_idx,
            topk_weights,
            out,
            wait_stats if wait_stats is not None else topk_idx,
            num_tokens,
            peers.rank,
            peers.timeout_ns,
            peers.error_address,
            operation_code,
            words.flags,
            words.staging,
        ),
        {
            "NUM_RANKS": peers.num_ranks,
            "R_BLOCK": peers.flag_block,
            "NUM_LOCAL_EXPERTS": num_local_experts,
            "HIDDEN": hidden,
            "NUM_TOPK": topk_idx.size(1),
            "H_BLOCK": next_pow2(hidden),
            "HAS_WAIT_STATS": wait_stats is not None,
        },
        16,
    )
