"""Low-latency dispatch over NVLink: one message per (token, destination rank), expanded into the
expert-major layout on the receiver.

Send (``ll_dispatch_send_kernel``, ``min(num_tokens, SMs)`` programs, 1 for no token): per token
of this call, cast to FP8 with per-128-channel scales (fused), then write the payload into slot
``[source rank, token]`` of every destination rank holding one of its experts, and the token's
top-k row to every destination; slots past ``num_tokens`` are not touched. ``parity_offset`` is
specialized on purpose: both parities' offsets are multiples of 32 words (never 1), so they share
one compiled kernel, and Triton then knows the 16-byte alignment that vector stores need (a
``tl.multiple_of`` hint on a scalar did not give them). The send kernel also fills this rank's
``combine_gather_idx`` with -1 (the receive kernel, later on the same stream, writes the hits) and
signals: the last of its programs to finish writes ``num_tokens`` into this rank's count word at
every peer, then releases the sequence number at every peer (``ll_arrive_and_signal``), so there
is no separate signal launch. Receive (``ll_dispatch_recv_kernel``, the hook): one program per
local expert waits (bounded) for every unmasked source, reads each source's count, scans the
top-k rows of slots ``[source, 0 : count]`` only, ranks the hits in (source, token) order with a
prefix sum and copies them into ``recv_x``. Sending per rank instead of per expert moves ~2.2x
fewer bytes (``../shared/KERNELS.md``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from epcomm.kernels.exchange import _peer
from epcomm.kernels.primitives import global_timer_ns, wait_flags

__all__ = ["ll_arrive_and_signal", "ll_dispatch_recv_kernel", "ll_dispatch_send_kernel", "wait_sources"]


@triton.jit
def _fp8_scale(amax, ROUND_SCALE: tl.constexpr):
    """``amax / 448`` (IEEE division, as ``epcomm.quant``), rounded up to a power of two if asked."""
    scale = tl.math.div_rn(tl.maximum(amax, 1e-4), tl.full(amax.shape, 448.0, tl.float32))
    if ROUND_SCALE:
        bits = scale.to(tl.int32, bitcast=True)
        exponent_bits = bits & 0x7F800000
        bits = tl.where((bits & 0x007FFFFF) != 0, exponent_bits + 0x00800000, exponent_bits)
        scale = bits.to(tl.float32, bitcast=True)
    return scale


@triton.jit(do_not_specialize=["num_tokens", "rank", "flag_offset", "count_offset"])
def ll_dispatch_send_kernel(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    x_ptr,
    topk_idx_ptr,
    mask_ptr,
    combine_gather_idx_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    num_tokens,
    rank,
    flag_offset,
    count_offset,
    parity_offset,
    NUM_RANKS: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    CAPACITY: tl.constexpr,
    HIDDEN: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    MESSAGE_WORDS: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
    G_BLOCK: tl.constexpr,
    USE_FP8: tl.constexpr,
    ROUND_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    k_cols = tl.arange(0, K_BLOCK)
    k_mask = k_cols < NUM_TOPK
    NUM_GROUPS: tl.constexpr = HIDDEN // 128
    tl.static_assert(NUM_RANKS <= 8)
    # combine_gather_idx = -1 everywhere ([num_ranks, CAPACITY, num_topk], local memory, flat
    # vector stores): this kernel runs before this rank's receive kernel (same stream), which
    # writes the hits. First, so that the stores drain while the tokens are read.
    GATHER_ITEMS: tl.constexpr = NUM_RANKS * CAPACITY * NUM_TOPK
    FILL_BLOCK: tl.constexpr = 1024
    fill_cols = tl.arange(0, FILL_BLOCK)
    no_expert = tl.full([FILL_BLOCK], -1, tl.int64)
    for start in range(pid * FILL_BLOCK, GATHER_ITEMS, grid * FILL_BLOCK):
        tl.store(combine_gather_idx_ptr + start + fill_cols, no_expert, mask=start + fill_cols < GATHER_ITEMS)
    # This call's tokens only: the receiver scans slots [rank, 0 : num_tokens] (the count goes
    # with the signal), so slots past num_tokens are neither written nor read.
    for token in range(pid, num_tokens, grid):
        topk = tl.load(topk_idx_ptr + token * NUM_TOPK + k_cols, mask=k_mask, other=-1).to(tl.int32)
        if USE_FP8:
            columns = tl.arange(0, G_BLOCK * 128)
            groups = tl.load(x_ptr + token * HIDDEN + columns, mask=columns < HIDDEN, other=0.0)
            groups = tl.reshape(groups.to(tl.float32), (G_BLOCK, 128))
            scale = _fp8_scale(tl.max(tl.abs(groups), axis=1), ROUND_SCALE)
            quantized = tl.math.div_rn(groups, tl.broadcast_to(scale[:, None], (G_BLOCK, 128)))
            quantized = quantized.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
            shifts = tl.arange(0, 4) * 8
            words = tl.sum(tl.reshape(quantized, (G_BLOCK * 32, 4)) << shifts[None, :], axis=1)
            scale_words = scale.to(tl.int32, bitcast=True)
        else:
            x_words = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            word_cols = tl.arange(0, X_BLOCK)
            words = tl.load(x_words + token * X_WORDS + word_cols, mask=word_cols < X_WORDS)
        for step in tl.static_range(NUM_RANKS):
            dst = (step + rank + pid) % NUM_RANKS
            if tl.load(mask_ptr + dst) == 0:
                base = _peer(dst, p0, p1, p2, p3, p4, p5, p6, p7) + parity_offset
                slot = base + (rank * CAPACITY + token).to(tl.int64) * MESSAGE_WORDS
                tl.store(slot + X_WORDS + NUM_GROUPS * USE_FP8 + k_cols, topk, mask=k_mask)
                hits = tl.sum(((topk >= 0) & (topk // NUM_LOCAL_EXPERTS == dst)).to(tl.int32), axis=0)
                if hits > 0:
                    out_cols = tl.arange(0, X_BLOCK if not USE_FP8 else G_BLOCK * 32)
                    tl.store(slot + out_cols, words, mask=out_cols < X_WORDS)
                    if USE_FP8:
                        group_cols = tl.arange(0, G_BLOCK)
                        tl.store(slot + X_WORDS + group_cols, scale_words, mask=group_cols < NUM_GROUPS)
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
        count_offset,
        num_tokens,
        NUM_RANKS,
        True,
    )


@triton.jit
def ll_signal(
    p0, p1, p2, p3, p4, p5, p6, p7, mask_ptr, send_seq_ptr, recv_expected_ptr, rank, flag_offset, peer
):
    """Release the next sequence number at ``peer``'s flag for this rank and advance what this rank
    expects from ``peer`` (both device-resident, so graph replays work); nothing for a masked peer."""
    if tl.load(mask_ptr + peer) == 0:
        sequence = tl.load(send_seq_ptr + peer) + 1
        tl.store(send_seq_ptr + peer, sequence)
        tl.store(recv_expected_ptr + peer, tl.load(recv_expected_ptr + peer) + 1)
        flag = _peer(peer, p0, p1, p2, p3, p4, p5, p6, p7) + flag_offset + rank
        tl.atomic_xchg(flag, sequence, sem="release", scope="sys")


@triton.jit
def ll_arrive_and_signal(
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
    count_offset,
    count,
    NUM_RANKS: tl.constexpr,
    HAS_COUNT: tl.constexpr,
):
    """The end of a send kernel: every program arrives on ``arrival_ptr`` (an int32 counter in local
    memory, 0 between calls, one per phase and parity); the last one resets it, writes ``count``
    at ``count_offset + rank`` of every unmasked peer if ``HAS_COUNT`` (plain stores, then a block
    barrier), and signals every unmasked peer (``ll_signal``): the release orders the count (and
    every payload store) before the sequence number, so a receiver reads it after its acquire.

    Ordering: each program's stores (its threads', peers' memory over NVLink included) are ordered
    before its arrival by the block barrier, and the arrival is a release (acq_rel, system scope).
    The arrivals are read-modify-writes of one location, so the last program's arrival (acq_rel)
    acquires every earlier program's release: all programs' stores happen-before its following
    system-scope release at each peer's flag, which is cumulative, so a peer that acquires the flag
    sees them all. The reset is an ordinary store: the counter's next user is a later kernel.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(arrival_ptr, 1, sem="acq_rel", scope="sys")
    if arrived == tl.num_programs(0) - 1:
        tl.store(arrival_ptr, 0)
        if HAS_COUNT:
            for peer in tl.static_range(NUM_RANKS):
                if tl.load(mask_ptr + peer) == 0:
                    tl.store(_peer(peer, p0, p1, p2, p3, p4, p5, p6, p7) + count_offset + rank, count)
            tl.debug_barrier()
        for peer in tl.static_range(NUM_RANKS):
            ll_signal(
                p0,
                p1,
                p2,
                p3,
                p4,
                p5,
                p6,
                p7,
                mask_ptr,
                send_seq_ptr,
                recv_expected_ptr,
                rank,
                flag_offset,
                peer,
            )


@triton.jit
def wait_sources(
    flag_ptr,
    mask_ptr,
    expected_ptr,
    timeout_ns,
    error_ptr,
    operation_code,
    rank,
    stats_ptr,
    record_stats,
    NUM_RANKS: tl.constexpr,
    HAS_STATS: tl.constexpr,
):
    """Bounded wait for every unmasked source's flag (``primitives.wait_flags``), then a block
    barrier; optional per-source wait time (ns) stats: per source, the time from the start of the
    wait until its flag was first seen (until the end for a missing one).
    """
    tl.static_assert(NUM_RANKS <= 8)
    sources = tl.arange(0, 8)  # MAX_PEERS: every phase and parity has 8 flag words
    in_group = sources < NUM_RANKS
    waited_on = in_group & (tl.load(mask_ptr + sources, mask=in_group, other=1) == 0)
    expected = tl.load(expected_ptr + sources, mask=waited_on, other=0)
    missing, start, seen_at = wait_flags(
        flag_ptr + sources, waited_on, expected, timeout_ns, error_ptr, operation_code, rank, HAS_STATS
    )
    if HAS_STATS:
        if record_stats:
            waited = tl.where(missing, global_timer_ns(), seen_at) - start
            tl.atomic_add(stats_ptr + sources, waited, mask=waited_on)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["rank", "timeout_ns", "error_address", "flag_offset", "count_offset"])
def ll_dispatch_recv_kernel(
    local_ptr,
    mask_ptr,
    expected_ptr,
    scratch_ptr,
    recv_x_ptr,
    recv_scales_ptr,
    recv_count_ptr,
    recv_src_info_ptr,
    recv_layout_range_ptr,
    combine_gather_idx_ptr,
    cumulative_stats_ptr,
    wait_stats_ptr,
    rank,
    timeout_ns,
    error_address,
    flag_offset,
    count_offset,
    parity_offset,
    NUM_RANKS: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    CAPACITY: tl.constexpr,
    HIDDEN: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    ROWS_BLOCK: tl.constexpr,
    MESSAGE_WORDS: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
    G_BLOCK: tl.constexpr,
    USE_FP8: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SCALE_COLUMNS: tl.constexpr,
    HAS_CUMULATIVE_STATS: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
):
    expert = tl.program_id(0)
    error_ptr = error_address.to(tl.pointer_type(tl.int32))
    wait_sources(
        local_ptr + flag_offset,
        mask_ptr,
        expected_ptr,
        timeout_ns,
        error_ptr,
        8,  # Operation.LOW_LATENCY_DISPATCH
        rank,
        wait_stats_ptr,
        expert == 0,
        NUM_RANKS,
        HAS_WAIT_STATS,
    )
    NUM_ROWS: tl.constexpr = NUM_RANKS * CAPACITY
    NUM_GROUPS: tl.constexpr = HIDDEN // 128
    rows = tl.arange(0, ROWS_BLOCK)
    row_mask = rows < NUM_ROWS
    src_of_row = rows // CAPACITY
    token_of_row = rows % CAPACITY
    source_unmasked = tl.load(mask_ptr + src_of_row, mask=row_mask, other=1) == 0
    # Each unmasked source wrote its count before releasing its flag (acquired above): only its
    # slots [src, 0 : count] are this call's; later slots are stale and not read.
    source_count = tl.load(
        local_ptr + count_offset + src_of_row,
        mask=row_mask & source_unmasked,
        other=0,
        cache_modifier=".cg",
    )
    real = row_mask & source_unmasked & (token_of_row < source_count)
    staging = local_ptr + parity_offset
    global_expert = rank * NUM_LOCAL_EXPERTS + expert
    hit = tl.zeros([ROWS_BLOCK], dtype=tl.int32)
    # Bit k: top-k slot k names this expert (a token listing it twice gets one row, and both slots
    # point at it in combine_gather_idx, as in the reference backend).
    hit_slots = tl.zeros([ROWS_BLOCK], dtype=tl.int64)
    for k in tl.static_range(NUM_TOPK):
        topk = tl.load(
            staging + rows.to(tl.int64) * MESSAGE_WORDS + X_WORDS + NUM_GROUPS * USE_FP8 + k,
            mask=real,
            other=-1,
            cache_modifier=".cg",
        )
        is_hit = topk == global_expert
        hit_slots = hit_slots | (is_hit.to(tl.int64) << k)
        hit = hit | is_hit.to(tl.int32)
    position = tl.cumsum(hit, axis=0) - 1
    count = tl.sum(hit, axis=0)
    tl.store(scratch_ptr + expert * NUM_ROWS + position, rows, mask=hit > 0)
    gather_row = (expert * NUM_ROWS + position).to(tl.int64)
    gather_base = combine_gather_idx_ptr + (src_of_row * CAPACITY + token_of_row).to(tl.int64) * NUM_TOPK
    for k in tl.static_range(NUM_TOPK):
        tl.store(gather_base + k, gather_row, mask=((hit_slots >> k) & 1) != 0)
    tl.store(recv_count_ptr + expert, count)
    if HAS_CUMULATIVE_STATS:
        tl.store(cumulative_stats_ptr + expert, tl.load(cumulative_stats_ptr + expert) + count)
    begin = 0
    for src in tl.static_range(NUM_RANKS):
        per_source = tl.sum(tl.where(src_of_row == src, hit, 0), axis=0)
        tl.store(
            recv_layout_range_ptr + expert * NUM_RANKS + src,
            (begin.to(tl.int64) << 32) | per_source.to(tl.int64),
        )
        begin += per_source
    tl.debug_barrier()
    words = tl.arange(0, X_BLOCK)
    word_mask = words < X_WORDS
    groups = tl.arange(0, G_BLOCK)
    group_mask = groups < NUM_GROUPS
    # Rows past the count: -1, one vector store.
    tl.store(recv_src_info_ptr + expert * NUM_ROWS + rows, -1, mask=row_mask & (rows >= count))
    # Copy 4 messages per step, all loads in flight before the stores.
    steps = tl.arange(0, 4)
    for first in range(0, count, 4):
        index = first + steps
        valid = index < count
        source_row = tl.load(scratch_ptr + expert * NUM_ROWS + index, mask=valid, other=0)
        message = staging + source_row.to(tl.int64)[:, None] * MESSAGE_WORDS
        out_row = (expert * NUM_ROWS + index).to(tl.int64)
        data = tl.load(
            message + words[None, :], mask=valid[:, None] & word_mask[None, :], cache_modifier=".cg"
        )
        if USE_FP8:
            scales = tl.load(
                message + X_WORDS + groups[None, :],
                mask=valid[:, None] & group_mask[None, :],
                other=0,
                cache_modifier=".cg",
            )
        tl.store(
            recv_x_ptr + out_row[:, None] * X_WORDS + words[None, :],
            data,
            mask=valid[:, None] & word_mask[None, :],
        )
        tl.store(recv_src_info_ptr + out_row, source_row % CAPACITY, mask=valid)
        if USE_FP8:
            column_base = recv_scales_ptr + expert.to(tl.int64) * SCALE_COLUMNS * NUM_ROWS + index
            if USE_UE8M0:
                exponent = (scales >> 23) & 0xFF
                shifted = tl.reshape(exponent, (4, G_BLOCK // 4, 4)) << (tl.arange(0, 4) * 8)[None, None, :]
                packed = tl.sum(shifted, axis=2)
                packed_cols = tl.arange(0, G_BLOCK // 4)
                tl.store(
                    column_base[:, None] + packed_cols[None, :] * NUM_ROWS,
                    packed,
                    mask=valid[:, None] & (packed_cols < SCALE_COLUMNS)[None, :],
                )
            else:
                tl.store(
                    column_base[:, None] + groups[None, :] * NUM_ROWS,
                    scales,
                    mask=valid[:, None] & group_mask[None, :],
                )
