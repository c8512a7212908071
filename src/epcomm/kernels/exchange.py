"""Barrier with an optional count payload over NVLink: each rank writes its counts row into every
peer's table, then releases an epoch flag there, then waits (bounded) for every peer's flag.

One program per peer. The same kernel is the entry/exit barrier of every normal-mode operation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm.config import NUM_MAX_NVL_PEERS
from epcomm.kernels.launch import launch, next_pow2
from epcomm.kernels.primitives import signal_release_sys, wait_epoch

__all__ = ["MAX_PEERS", "launch_exchange"]

MAX_PEERS = NUM_MAX_NVL_PEERS


@triton.jit
def _peer(peer, p0, p1, p2, p3, p4, p5, p6, p7):
    # Pointer select: keeps the 16-byte alignment Triton knows of each tensor argument.
    base = tl.where(peer == 0, p0, p1)
    base = tl.where(peer == 2, p2, base)
    base = tl.where(peer == 3, p3, base)
    base = tl.where(peer == 4, p4, base)
    base = tl.where(peer == 5, p5, base)
    base = tl.where(peer == 6, p6, base)
    base = tl.where(peer == 7, p7, base)
    return base


@triton.jit(
    do_not_specialize=["num_tokens", "rank", "epoch", "timeout_ns", "error_address", "operation_code"]
)
def exchange_counts_barrier_kernel(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    counts_ptr,
    in_rank_ptr,
    num_tokens,
    rank,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    FLAG_OFFSET: tl.constexpr,
    TABLE_OFFSET: tl.constexpr,
    NUM_COUNTS: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_RANK_COUNTS: tl.constexpr,
    T_BLOCK: tl.constexpr,
    R_BLOCK: tl.constexpr,
):
    peer = tl.program_id(0)
    remote = _peer(peer, p0, p1, p2, p3, p4, p5, p6, p7)
    local = _peer(rank, p0, p1, p2, p3, p4, p5, p6, p7)
    row = remote + TABLE_OFFSET + rank * NUM_COUNTS
    if NUM_RANK_COUNTS > 0:
        # Tokens per destination rank, counted from is_token_in_rank [num_tokens, NUM_RANK_COUNTS].
        r_cols = tl.arange(0, R_BLOCK)
        r_mask = r_cols < NUM_RANK_COUNTS
        per_rank = tl.zeros([R_BLOCK], dtype=tl.int32)
        for start in range(0, num_tokens, T_BLOCK):
            tokens = tl.arange(0, T_BLOCK) + start
            hits = tl.load(
                in_rank_ptr + tokens[:, None] * NUM_RANK_COUNTS + r_cols[None, :],
                mask=(tokens[:, None] < num_tokens) & r_mask[None, :],
                other=0,
            )
            per_rank += tl.sum((hits != 0).to(tl.int32), axis=0)
        tl.store(row + r_cols, per_rank, mask=r_mask)
    if NUM_COUNTS > NUM_RANK_COUNTS:
        offsets = tl.arange(0, BLOCK)
        mask = offsets < NUM_COUNTS - NUM_RANK_COUNTS
        counts = tl.load(counts_ptr + offsets, mask=mask)
        tl.store(row + NUM_RANK_COUNTS + offsets, counts, mask=mask)
    signal_release_sys(remote + FLAG_OFFSET + rank, epoch)
    error_pointer = error_address.to(tl.pointer_type(tl.int32))
    wait_epoch(local + FLAG_OFFSET + peer, epoch, timeout_ns, error_pointer, operation_code, peer, rank)


def launch_exchange(
    peer_buffers: list[torch.Tensor],
    counts: torch.Tensor | None,
    rank: int,
    epoch: int,
    timeout_ns: int,
    error_address: int,
    operation_code: int,
    flag_offset: int,
    table_offset: int,
    is_token_in_rank: torch.Tensor | None = None,
) -> None:
    """Run the barrier (and count exchange) on the current stream.

    Arguments:
        peer_buffers: per rank, an int32 view of that rank's symmetric buffer (``MAX_PEERS`` max).
        counts: ``[num_counts]`` int32 this rank publishes into row ``rank`` of every peer's table
            at ``table_offset`` (int32 elements), or ``None`` for a pure barrier.
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, contiguous, or ``None``: when given, the
            row starts with the ``num_ranks`` per-rank token counts computed from it, then ``counts``.
        rank: this rank.
        epoch: a value larger than any earlier epoch of this buffer.
        timeout_ns: bound of the wait.
        error_address: address of the host-mapped ``[4]`` int32 error word.
        operation_code: written into the error word on timeout, names the operation.
        flag_offset, table_offset: int32-element offsets of the flags and the count table.
    """
    num_ranks = len(peer_buffers)
    if not 1 <= num_ranks <= MAX_PEERS:
        raise ValueError(f"the NVLink backend supports 1..{MAX_PEERS} ranks; got {num_ranks}")
    padded = peer_buffers + [peer_buffers[0]] * (MAX_PEERS - num_ranks)
    num_rank_counts = 0 if is_token_in_rank is None else num_ranks
    num_extra = 0 if counts is None else counts.numel()
    num_counts = num_rank_counts + num_extra
    launch(
        exchange_counts_barrier_kernel,
        (num_ranks,),
        (
            *padded,
            counts if counts is not None else peer_buffers[rank],
            is_token_in_rank.view(torch.int8) if is_token_in_rank is not None else peer_buffers[rank],
            is_token_in_rank.size(0) if is_token_in_rank is not None else 0,
            rank,
            epoch,
            timeout_ns,
            error_address,
            operation_code,
        ),
        {
            "FLAG_OFFSET": flag_offset,
            "TABLE_OFFSET": table_offset,
            "NUM_COUNTS": num_counts,
            "BLOCK": max(next_pow2(max(num_extra, 1)), 32),
            "NUM_RANK_COUNTS": num_rank_counts,
            "T_BLOCK": 512,
            "R_BLOCK": max(next_pow2(num_ranks), 2),
        },
        4,
    )
