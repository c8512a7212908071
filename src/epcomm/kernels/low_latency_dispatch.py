"""Low-latency dispatch over NVLink: one message per (token, destination rank), expanded into the
expert-major layout on the receiver. One kernel, ``ll_dispatch_kernel``, with a phase: ``SEND``,
``RECEIVE`` (the two halves of a call with a receive hook) or ``BOTH`` (a call without one), so a
profile shows exactly one kernel name containing ``dispatch``, as DeepEP's does.

Send phase (``min(num_tokens, SMs)`` programs, 1 for no token): per token of this call, cast to FP8
with per-128-channel scales (fused), then write the payload into slot ``[source rank, token]`` of
every destination rank holding one of its experts, and the token's top-k row to every destination;
slots past ``num_tokens`` are not touched. ``staging_offset`` is specialized on purpose: both
parities' offsets are multiples of 32 words (never 1), so they share one compiled kernel, and
Triton then knows the 16-byte alignment that vector stores need (a ``tl.multiple_of`` hint on a
scalar did not give them). The send phase also fills this rank's ``combine_gather_idx`` with -1
(the receive phase writes the hits) and signals: the last program to finish writes ``num_tokens``
into this rank's count word at every peer, then releases the sequence number at every peer
(``ll_arrive_and_signal``). Receive phase (one program per local expert; with ``BOTH`` each program
takes local experts ``pid, pid + grid, ...``): wait (bounded) for every unmasked source, read each
source's count, scan the top-k rows of slots ``[source, 0 : count]`` only, rank the hits in
(source, token) order with a prefix sum and copy them into ``recv_x``. Sending per rank instead of
per expert moves ~2.2x fewer bytes at top-8 of 256 experts on 4 ranks (a token's 8 experts sit on
~3.6 of the 4 ranks).

Call fingerprints: the last program of a send phase writes this call's fingerprint words into row
``rank`` of every unmasked peer's fingerprint rows (``LowLatencyWords.fingerprints``) with the
count, before it releases the sequence number (``ll_arrive_and_signal``). A receive phase, after
its wait, compares every unmasked source's row with its own words (``ll_compare_fingerprints``):
a source whose call differs counts as having sent nothing (dispatch: no row from it; combine: its
rows are not added), and program 0 records every rank's words in host-mapped memory for the host
to raise ``InconsistentCallError``. The payload was already sent: the receiver ignores it.

``BOTH`` waits inside the kernel that signals, so every program must be resident at once: its grid
is at most one program per SM (a program always fits on an SM), and its programs read the sequence
numbers they expect before they arrive (the last program advances them after every arrival).

Put path (``ll_dispatch_put_kernel``, multi-node: ``PutPath``): the ranks of other nodes
(``reach[r] == 0``) are reached by NVSHMEM puts (``kernels.puts``), the others by stores as above,
and every flag is a uint64 (the sequence number in its low word; ``PUT_FLAG_STRIDE`` words apart).
The top-k rows go to an area apart from the messages (``PutPath.topk``), for every peer. A send
program writes each token's message once into this rank's outbox and its top-k row into its
``mine`` words, then puts the message (payload and scales only) to each destination of another node
that holds one of the token's experts, and completes its puts (quiet) before it arrives. The last
program then puts, to each unmasked destination of another node, the call's top-k rows and the
count, completes them, and puts the fingerprint with the sequence number as the signal
(put-with-signal: the flag after the words). A receiver reads the top-k rows apart and finds the
same messages as on the store path. The put path's receive launch is ``ll_dispatch_kernel`` with
``PUT`` (it issues no put).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from epcomm._math import next_pow2
from epcomm.fingerprint import FINGERPRINT_WORDS
from epcomm.kernels import puts
from epcomm.kernels.launch import launch
from epcomm.kernels.normal_rows import FINGERPRINT_ARGS, fingerprint_vector
from epcomm.kernels.primitives import (
    HOISTED_PEERS,
    fence_acq_rel_sys,
    global_timer_ns,
    peer_pointer,
    store_remote,
    wait_flags,
)
from epcomm.kernels.symmetric_peers import SymmetricPeers

__all__ = [
    "CallCheck",
    "DispatchOutputs",
    "LowLatencyWords",
    "Phase",
    "PutPath",
    "SignalState",
    "check_words",
    "dispatch_grid",
    "expected_sequences",
    "launch_ll_dispatch",
    "ll_arrive_and_signal",
    "ll_compare_fingerprints",
    "ll_dispatch_kernel",
    "ll_dispatch_put_kernel",
    "ll_wait_and_compare",
    "wait_sources",
]


# Most rows a receive program scans at once: 4096 is 8 values a thread per row vector at 16
# warps; more sources' rows (EP256 at 128 tokens: 32768) are scanned in blocks of this many.
RECEIVE_ROWS_BLOCK = 4096

# The put path's ``mine`` words (per op, in this rank's buffer): the count at word 0, the
# fingerprint at word MINE_FINGERPRINT, the top-k rows from word MINE_HEAD (dispatch).
MINE_FINGERPRINT = tl.constexpr(8)
MINE_HEAD = tl.constexpr(16)
# int32 words per flag on the put path: NVSHMEM signals are uint64 (the sequence number in the low word).
PUT_FLAG_STRIDE = tl.constexpr(2)


class Phase(IntEnum):
    """Which half of a low-latency op a launch runs (bit flags: ``BOTH = SEND | RECEIVE``)."""

    SEND = 1
    RECEIVE = 2
    BOTH = 3


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


@triton.jit
def _ll_dispatch(
    peer_table,
    local_ptr,
    x_ptr,
    topk_idx_ptr,
    mask_ptr,
    combine_gather_idx_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    scratch_ptr,
    recv_x_ptr,
    recv_scales_ptr,
    recv_count_ptr,
    recv_src_info_ptr,
    recv_layout_range_ptr,
    cumulative_stats_ptr,
    wait_stats_ptr,
    differs_ptr,
    reach_ptr,
    pe_ptr,
    num_tokens,
    rank,
    timeout_ns,
    error_address,
    operation_code,
    flag_offset,
    count_offset,
    staging_offset,
    fp_offset,
    record_address,
    topk_offset,
    outbox_offset,
    mine_offset,
    fp0,
    fp1,
    fp2,
    fp3,
    fp4,
    fp5,
    fp6,
    fp7,
    PHASE: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
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
    ROUND_SCALE: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SCALE_COLUMNS: tl.constexpr,
    HAS_CUMULATIVE_STATS: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
    SHRINK: tl.constexpr,
    FP_WORDS: tl.constexpr,
    PUT: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    expected = expected_sequences(recv_expected_ptr, PHASE, NUM_RANKS, R_BLOCK)
    fingerprint = fingerprint_vector(fp0, fp1, fp2, fp3, fp4, fp5, fp6, fp7)
    if PHASE & 1:
        _send_tokens(
            peer_table,
            local_ptr,
            x_ptr,
            topk_idx_ptr,
            mask_ptr,
            combine_gather_idx_ptr,
            reach_ptr,
            pe_ptr,
            num_tokens,
            rank,
            staging_offset,
            topk_offset,
            outbox_offset,
            mine_offset,
            NUM_RANKS,
            NUM_LOCAL_EXPERTS,
            CAPACITY,
            HIDDEN,
            NUM_TOPK,
            K_BLOCK,
            MESSAGE_WORDS,
            X_WORDS,
            X_BLOCK,
            G_BLOCK,
            USE_FP8,
            ROUND_SCALE,
            PUT,
        )
        ll_arrive_and_signal(
            peer_table,
            mask_ptr,
            arrival_ptr,
            send_seq_ptr,
            recv_expected_ptr,
            rank,
            flag_offset,
            count_offset,
            num_tokens,
            fp_offset,
            fingerprint,
            NUM_RANKS,
            True,
            FP_WORDS,
            local_ptr,
            reach_ptr,
            pe_ptr,
            mine_offset,
            topk_offset,
            NUM_TOPK,
            PUT,
            PUT_FLAG_STRIDE if PUT else 1,
            CAPACITY,
        )
    if PHASE & 2:
        if pid < NUM_LOCAL_EXPERTS:
            ll_wait_and_compare(
                local_ptr,
                flag_offset,
                fp_offset,
                mask_ptr,
                expected,
                timeout_ns,
                error_address,
                operation_code,
                rank,
                wait_stats_ptr,
                pid == 0,
                fingerprint,
                differs_ptr,
                record_address,
                NUM_RANKS,
                R_BLOCK,
                HAS_WAIT_STATS,
                SHRINK,
                FP_WORDS,
                PUT_FLAG_STRIDE if PUT else 1,
            )
        for expert in range(pid, NUM_LOCAL_EXPERTS, grid):
            _expand_received(
                local_ptr,
                mask_ptr,
                differs_ptr,
                scratch_ptr,
                recv_x_ptr,
                recv_scales_ptr,
                recv_count_ptr,
                recv_src_info_ptr,
                recv_layout_range_ptr,
                combine_gather_idx_ptr,
                cumulative_stats_ptr,
                expert,
                rank,
                count_offset,
                staging_offset,
                topk_offset,
                NUM_RANKS,
                NUM_LOCAL_EXPERTS,
                CAPACITY,
                HIDDEN,
                NUM_TOPK,
                ROWS_BLOCK,
                MESSAGE_WORDS,
                X_WORDS,
                X_BLOCK,
                G_BLOCK,
                USE_FP8,
                USE_UE8M0,
                SCALE_COLUMNS,
                HAS_CUMULATIVE_STATS,
                PUT,
            )


# Two entry points over one body, not one kernel with a flag: requires_nvshmem registers a kernel by
# name for NVSHMEM's module initialisation after it compiles, which the store path must not get
# (it runs where NVSHMEM is absent). The put path's receive launch issues no NVSHMEM call, and
# NVSHMEM's module initialisation fails on a module without its device symbols ("named symbol not
# found"): that launch is the store entry point compiled with ``PUT`` (``launch_ll_dispatch``).
_DISPATCH_RUNTIME = [
    "num_tokens",
    "rank",
    "timeout_ns",
    "error_address",
    "operation_code",
    "flag_offset",
    "count_offset",
    "fp_offset",
    "record_address",
    "mine_offset",
    *FINGERPRINT_ARGS,
]


@triton.jit(do_not_specialize=_DISPATCH_RUNTIME)
def ll_dispatch_kernel(
    peer_table,
    local_ptr,
    x_ptr,
    topk_idx_ptr,
    mask_ptr,
    combine_gather_idx_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    scratch_ptr,
    recv_x_ptr,
    recv_scales_ptr,
    recv_count_ptr,
    recv_src_info_ptr,
    recv_layout_range_ptr,
    cumulative_stats_ptr,
    wait_stats_ptr,
    differs_ptr,
    reach_ptr,
    pe_ptr,
    num_tokens,
    rank,
    timeout_ns,
    error_address,
    operation_code,
    flag_offset,
    count_offset,
    staging_offset,
    fp_offset,
    record_address,
    topk_offset,
    outbox_offset,
    mine_offset,
    fp0,
    fp1,
    fp2,
    fp3,
    fp4,
    fp5,
    fp6,
    fp7,
    PHASE: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
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
    ROUND_SCALE: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SCALE_COLUMNS: tl.constexpr,
    HAS_CUMULATIVE_STATS: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
    SHRINK: tl.constexpr,
    FP_WORDS: tl.constexpr,
    PUT: tl.constexpr,
):
    """Every peer through stores (one NVLink domain): the module docstring; with ``PUT``, the put
    path's receive launch (flags ``PUT_FLAG_STRIDE`` words apart), which issues no put."""
    _ll_dispatch(
        peer_table, local_ptr, x_ptr, topk_idx_ptr, mask_ptr, combine_gather_idx_ptr, arrival_ptr, send_seq_ptr,
        recv_expected_ptr, scratch_ptr, recv_x_ptr, recv_scales_ptr, recv_count_ptr, recv_src_info_ptr,
        recv_layout_range_ptr, cumulative_stats_ptr, wait_stats_ptr, differs_ptr, reach_ptr, pe_ptr, num_tokens,
        rank, timeout_ns, error_address, operation_code, flag_offset, count_offset, staging_offset, fp_offset,
        record_address, topk_offset, outbox_offset, mine_offset, fp0, fp1, fp2, fp3, fp4, fp5, fp6, fp7,
        PHASE, NUM_RANKS, R_BLOCK, NUM_LOCAL_EXPERTS, CAPACITY, HIDDEN, NUM_TOPK, K_BLOCK, ROWS_BLOCK,
        MESSAGE_WORDS, X_WORDS, X_BLOCK, G_BLOCK, USE_FP8, ROUND_SCALE, USE_UE8M0, SCALE_COLUMNS,
        HAS_CUMULATIVE_STATS, HAS_WAIT_STATS, SHRINK, FP_WORDS, PUT,
    )  # fmt: skip


@triton.jit(do_not_specialize=_DISPATCH_RUNTIME)
def ll_dispatch_put_kernel(
    peer_table,
    local_ptr,
    x_ptr,
    topk_idx_ptr,
    mask_ptr,
    combine_gather_idx_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    scratch_ptr,
    recv_x_ptr,
    recv_scales_ptr,
    recv_count_ptr,
    recv_src_info_ptr,
    recv_layout_range_ptr,
    cumulative_stats_ptr,
    wait_stats_ptr,
    differs_ptr,
    reach_ptr,
    pe_ptr,
    num_tokens,
    rank,
    timeout_ns,
    error_address,
    operation_code,
    flag_offset,
    count_offset,
    staging_offset,
    fp_offset,
    record_address,
    topk_offset,
    outbox_offset,
    mine_offset,
    fp0,
    fp1,
    fp2,
    fp3,
    fp4,
    fp5,
    fp6,
    fp7,
    PHASE: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
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
    ROUND_SCALE: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SCALE_COLUMNS: tl.constexpr,
    HAS_CUMULATIVE_STATS: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
    SHRINK: tl.constexpr,
    FP_WORDS: tl.constexpr,
):
    """Peers of other nodes (``reach_ptr[r] == 0``) through NVSHMEM puts, the others through stores
    (the module docstring's "Put path"); launched through ``requires_nvshmem``."""
    _ll_dispatch(
        peer_table, local_ptr, x_ptr, topk_idx_ptr, mask_ptr, combine_gather_idx_ptr, arrival_ptr, send_seq_ptr,
        recv_expected_ptr, scratch_ptr, recv_x_ptr, recv_scales_ptr, recv_count_ptr, recv_src_info_ptr,
        recv_layout_range_ptr, cumulative_stats_ptr, wait_stats_ptr, differs_ptr, reach_ptr, pe_ptr, num_tokens,
        rank, timeout_ns, error_address, operation_code, flag_offset, count_offset, staging_offset, fp_offset,
        record_address, topk_offset, outbox_offset, mine_offset, fp0, fp1, fp2, fp3, fp4, fp5, fp6, fp7,
        PHASE, NUM_RANKS, R_BLOCK, NUM_LOCAL_EXPERTS, CAPACITY, HIDDEN, NUM_TOPK, K_BLOCK, ROWS_BLOCK,
        MESSAGE_WORDS, X_WORDS, X_BLOCK, G_BLOCK, USE_FP8, ROUND_SCALE, USE_UE8M0, SCALE_COLUMNS,
        HAS_CUMULATIVE_STATS, HAS_WAIT_STATS, SHRINK, FP_WORDS, True,
    )  # fmt: skip


@triton.jit
def _send_tokens(
    peer_table,
    local_ptr,
    x_ptr,
    topk_idx_ptr,
    mask_ptr,
    combine_gather_idx_ptr,
    reach_ptr,
    pe_ptr,
    num_tokens,
    rank,
    staging_offset,
    topk_offset,
    outbox_offset,
    mine_offset,
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
    PUT: tl.constexpr,
):
    """The send phase's data movement (the module docstring); the caller arrives and signals."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    k_cols = tl.arange(0, K_BLOCK)
    k_mask = k_cols < NUM_TOPK
    NUM_GROUPS: tl.constexpr = HIDDEN // 128
    # combine_gather_idx = -1 everywhere ([num_ranks, CAPACITY, num_topk], local memory, flat
    # vector stores): the receive phase (a later launch, or this one after its wait) writes the
    # hits. First, so that the stores drain while the tokens are read.
    GATHER_ITEMS: tl.constexpr = NUM_RANKS * CAPACITY * NUM_TOPK
    FILL_BLOCK: tl.constexpr = 1024
    fill_cols = tl.arange(0, FILL_BLOCK)
    no_expert = tl.full([FILL_BLOCK], -1, tl.int64)
    for start in range(pid * FILL_BLOCK, GATHER_ITEMS, grid * FILL_BLOCK):
        tl.store(combine_gather_idx_ptr + start + fill_cols, no_expert, mask=start + fill_cols < GATHER_ITEMS)
    # This call's tokens only: the receiver scans slots [rank, 0 : num_tokens] (the count goes
    # with the signal), so slots past num_tokens are neither written nor read.
    # The destinations' buffer addresses, loaded once per program (not per token, behind the
    # previous token's stores), up to HOISTED_PEERS destinations (registers).
    bases = ()
    if NUM_RANKS <= HOISTED_PEERS:
        for step in tl.static_range(NUM_RANKS):
            bases = bases + (peer_pointer(peer_table, (step + rank + pid) % NUM_RANKS),)
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
            scale_words = tl.zeros([G_BLOCK], tl.int32)  # no scales (never stored)
        out_cols = tl.arange(0, X_BLOCK if not USE_FP8 else G_BLOCK * 32)
        group_cols = tl.arange(0, G_BLOCK)
        message = (rank * CAPACITY + token).to(tl.int64) * MESSAGE_WORDS
        if PUT:
            # The put sources, in this rank's symmetric memory: the message (payload and scales)
            # once for every destination of another node, and the top-k row (put as one block per
            # destination by the last program, ll_arrive_and_signal).
            outbox = local_ptr + outbox_offset + token.to(tl.int64) * MESSAGE_WORDS
            tl.store(outbox + out_cols, words, mask=out_cols < X_WORDS)
            if USE_FP8:
                tl.store(outbox + X_WORDS + group_cols, scale_words, mask=group_cols < NUM_GROUPS)
            tl.store(local_ptr + mine_offset + MINE_HEAD + token * NUM_TOPK + k_cols, topk, mask=k_mask)
            fence_acq_rel_sys()  # each thread's copy visible to the NIC, then all of them
            tl.debug_barrier()
        else:
            outbox = local_ptr  # unused without the put path
        # Destinations rotated by program and rank. Up to HOISTED_PEERS: unrolled, the addresses
        # from registers; more: a loop (unrolled, 256 destinations took 3 minutes to compile).
        if NUM_RANKS <= HOISTED_PEERS:
            for step in tl.static_range(NUM_RANKS):
                _send_one(
                    bases[step], local_ptr, mask_ptr, reach_ptr, pe_ptr, (step + rank + pid) % NUM_RANKS, rank,
                    token, topk, k_cols, k_mask, words, out_cols, scale_words, group_cols, message, outbox,
                    staging_offset, topk_offset, NUM_LOCAL_EXPERTS, CAPACITY, NUM_TOPK, X_WORDS, NUM_GROUPS,
                    USE_FP8, PUT,
                )  # fmt: skip
        else:
            for step in range(NUM_RANKS):
                dst = (step + rank + pid) % NUM_RANKS
                _send_one(
                    peer_pointer(peer_table, dst), local_ptr, mask_ptr, reach_ptr, pe_ptr, dst, rank, token,
                    topk, k_cols, k_mask, words, out_cols, scale_words, group_cols, message, outbox,
                    staging_offset, topk_offset, NUM_LOCAL_EXPERTS, CAPACITY, NUM_TOPK, X_WORDS, NUM_GROUPS,
                    USE_FP8, PUT,
                )  # fmt: skip
    if PUT:
        puts.put_quiet()  # this program's puts are complete before it arrives


@triton.jit
def _send_one(
    peer,
    local_ptr,
    mask_ptr,
    reach_ptr,
    pe_ptr,
    dst,
    rank,
    token,
    topk,
    k_cols,
    k_mask,
    words,
    out_cols,
    scale_words,
    group_cols,
    message,
    outbox,
    staging_offset,
    topk_offset,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    CAPACITY: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    X_WORDS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    USE_FP8: tl.constexpr,
    PUT: tl.constexpr,
):
    """One token's message to destination ``dst`` (``peer``: word 0 of its buffer in this process),
    unless it is masked: stores, or on the put path for a rank of another node one put of the
    message where the token has one of its experts there."""
    if tl.load(mask_ptr + dst) == 0:
        hits = tl.sum(((topk >= 0) & (topk // NUM_LOCAL_EXPERTS == dst)).to(tl.int32), axis=0)
        if PUT:
            if tl.load(reach_ptr + dst) != 0:
                _store_message(
                    peer, staging_offset + message, topk_offset + (rank * CAPACITY + token) * NUM_TOPK, topk,
                    k_cols, k_mask, words, out_cols, scale_words, group_cols, hits, X_WORDS, NUM_GROUPS,
                    USE_FP8, True,
                )  # fmt: skip
            elif hits > 0:
                puts.put_bytes(
                    local_ptr,
                    peer,
                    staging_offset + message,
                    outbox,
                    (X_WORDS + NUM_GROUPS * USE_FP8) * 4,
                    tl.load(pe_ptr + dst),
                )
        else:
            _store_message(
                peer, staging_offset + message, 0, topk, k_cols, k_mask, words, out_cols, scale_words,
                group_cols, hits, X_WORDS, NUM_GROUPS, USE_FP8, False,
            )  # fmt: skip


@triton.jit
def _store_message(
    peer,
    slot_word,
    topk_word,
    topk,
    k_cols,
    k_mask,
    words,
    out_cols,
    scale_words,
    group_cols,
    hits,
    X_WORDS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    USE_FP8: tl.constexpr,
    TOPK_APART: tl.constexpr,
):
    """One token's message to a peer reached by stores (``peer``: word 0 of its buffer): the top-k
    row always (after the payload and scales in the message, or at ``topk_word`` with
    ``TOPK_APART``), the payload and the scales where the token has one of its experts."""
    slot = peer + slot_word
    if TOPK_APART:
        store_remote(peer + topk_word + k_cols, topk, k_mask)
    else:
        store_remote(slot + X_WORDS + NUM_GROUPS * USE_FP8 + k_cols, topk, k_mask)
    if hits > 0:
        store_remote(slot + out_cols, words, out_cols < X_WORDS)
        if USE_FP8:
            store_remote(slot + X_WORDS + group_cols, scale_words, group_cols < NUM_GROUPS)


@triton.jit
def _expand_received(
    local_ptr,
    mask_ptr,
    differs_ptr,
    scratch_ptr,
    recv_x_ptr,
    recv_scales_ptr,
    recv_count_ptr,
    recv_src_info_ptr,
    recv_layout_range_ptr,
    combine_gather_idx_ptr,
    cumulative_stats_ptr,
    expert,
    rank,
    count_offset,
    staging_offset,
    topk_offset,
    NUM_RANKS: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    CAPACITY: tl.constexpr,
    HIDDEN: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    ROWS_BLOCK: tl.constexpr,
    MESSAGE_WORDS: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
    G_BLOCK: tl.constexpr,
    USE_FP8: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SCALE_COLUMNS: tl.constexpr,
    HAS_CUMULATIVE_STATS: tl.constexpr,
    PUT: tl.constexpr,
):
    """The receive phase for local expert ``expert``, after the wait (the module docstring); with
    ``PUT`` the top-k rows are read from the area apart (``topk_offset``)."""
    NUM_ROWS: tl.constexpr = NUM_RANKS * CAPACITY
    NUM_GROUPS: tl.constexpr = HIDDEN // 128
    staging = local_ptr + staging_offset
    layout_range = recv_layout_range_ptr + expert * NUM_RANKS
    # The rows in blocks of ROWS_BLOCK (one block up to RECEIVE_ROWS_BLOCK rows), hits numbered
    # across blocks.
    if NUM_ROWS <= ROWS_BLOCK:
        count = _scan_rows(
            0, 0, local_ptr, mask_ptr, differs_ptr, scratch_ptr, combine_gather_idx_ptr, layout_range, expert,
            rank, count_offset, staging_offset, topk_offset, NUM_RANKS, NUM_LOCAL_EXPERTS, CAPACITY, HIDDEN,
            NUM_TOPK, ROWS_BLOCK, MESSAGE_WORDS, X_WORDS, USE_FP8, PUT, NUM_RANKS <= HOISTED_PEERS,
        )  # fmt: skip
    else:
        count = tl.zeros([], tl.int32)
        for start in range(0, NUM_ROWS, ROWS_BLOCK):
            count = _scan_rows(
                start, count, local_ptr, mask_ptr, differs_ptr, scratch_ptr, combine_gather_idx_ptr, layout_range,
                expert, rank, count_offset, staging_offset, topk_offset, NUM_RANKS, NUM_LOCAL_EXPERTS, CAPACITY,
                HIDDEN, NUM_TOPK, ROWS_BLOCK, MESSAGE_WORDS, X_WORDS, USE_FP8, PUT, False,
            )  # fmt: skip
    tl.store(recv_count_ptr + expert, count)
    if HAS_CUMULATIVE_STATS:
        tl.store(cumulative_stats_ptr + expert, tl.load(cumulative_stats_ptr + expert) + count)
    tl.debug_barrier()
    words = tl.arange(0, X_BLOCK)
    word_mask = words < X_WORDS
    groups = tl.arange(0, G_BLOCK)
    group_mask = groups < NUM_GROUPS
    # Rows past the count: -1, one vector store per block.
    for start in tl.static_range(0, NUM_ROWS, ROWS_BLOCK):
        rows = start + tl.arange(0, ROWS_BLOCK)
        tl.store(recv_src_info_ptr + expert * NUM_ROWS + rows, -1, mask=(rows < NUM_ROWS) & (rows >= count))
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


@triton.jit
def _scan_rows(
    start,
    base,
    local_ptr,
    mask_ptr,
    differs_ptr,
    scratch_ptr,
    combine_gather_idx_ptr,
    layout_range,
    expert,
    rank,
    count_offset,
    staging_offset,
    topk_offset,
    NUM_RANKS: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    CAPACITY: tl.constexpr,
    HIDDEN: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    ROWS_BLOCK: tl.constexpr,
    MESSAGE_WORDS: tl.constexpr,
    X_WORDS: tl.constexpr,
    USE_FP8: tl.constexpr,
    PUT: tl.constexpr,
    PER_SOURCE_SUMS: tl.constexpr,
):
    """Rows ``[start, start + ROWS_BLOCK)`` of the receive phase for local expert ``expert``: find
    the rows naming it, number them from ``base`` (the hits of the earlier rows) in (source,
    token) order into ``scratch``, point their top-k slots at them in ``combine_gather_idx``, and
    write each source's ``(begin << 32) | count`` into ``layout_range``; returns ``base`` plus this
    block's hits. ``PER_SOURCE_SUMS`` (one block, few sources): a sum per source; else each
    source's first row stores its begin, then its last row adds its count."""
    NUM_ROWS: tl.constexpr = NUM_RANKS * CAPACITY
    NUM_GROUPS: tl.constexpr = HIDDEN // 128
    rows = start + tl.arange(0, ROWS_BLOCK)
    row_mask = rows < NUM_ROWS
    src_of_row = rows // CAPACITY
    token_of_row = rows % CAPACITY
    source_unmasked = tl.load(mask_ptr + src_of_row, mask=row_mask, other=1) == 0
    # A source whose call differs (ll_compare_fingerprints) sent nothing this call can use.
    source_unmasked &= tl.load(differs_ptr + src_of_row, mask=row_mask, other=1) == 0
    # Each unmasked source wrote its count before releasing its flag (acquired above): only its
    # slots [src, 0 : count] are this call's; later slots are stale and not read.
    source_count = tl.load(
        local_ptr + count_offset + src_of_row,
        mask=row_mask & source_unmasked,
        other=0,
        cache_modifier=".cg",
    )
    real = row_mask & source_unmasked & (token_of_row < source_count)
    staging = local_ptr + staging_offset
    global_expert = rank * NUM_LOCAL_EXPERTS + expert
    hit = tl.zeros([ROWS_BLOCK], dtype=tl.int32)
    # Bit k: top-k slot k names this expert (a token listing it twice gets one row, and both slots
    # point at it in combine_gather_idx, as in the reference backend).
    hit_slots = tl.zeros([ROWS_BLOCK], dtype=tl.int64)
    for k in tl.static_range(NUM_TOPK):
        if PUT:
            topk_word = local_ptr + topk_offset + rows.to(tl.int64) * NUM_TOPK + k
        else:
            topk_word = staging + rows.to(tl.int64) * MESSAGE_WORDS + X_WORDS + NUM_GROUPS * USE_FP8 + k
        topk = tl.load(topk_word, mask=real, other=-1, cache_modifier=".cg")
        is_hit = topk == global_expert
        hit_slots = hit_slots | (is_hit.to(tl.int64) << k)
        hit = hit | is_hit.to(tl.int32)
    position = base + tl.cumsum(hit, axis=0) - 1
    tl.store(scratch_ptr + expert * NUM_ROWS + position, rows, mask=hit > 0)
    gather_row = (expert * NUM_ROWS + position).to(tl.int64)
    gather_base = combine_gather_idx_ptr + (src_of_row * CAPACITY + token_of_row).to(tl.int64) * NUM_TOPK
    for k in tl.static_range(NUM_TOPK):
        tl.store(gather_base + k, gather_row, mask=((hit_slots >> k) & 1) != 0)
    if PER_SOURCE_SUMS:
        begin = 0
        for src in tl.static_range(NUM_RANKS):
            per_source = tl.sum(tl.where(src_of_row == src, hit, 0), axis=0)
            tl.store(layout_range + src, (begin.to(tl.int64) << 32) | per_source.to(tl.int64))
            begin += per_source
    else:
        # One pass over the rows instead of one reduction per source (256 sources: 256 block
        # reductions); a source's first row is in this block or an earlier one.
        before = position + 1 - hit  # hits in the rows before each row
        tl.store(layout_range + src_of_row, before.to(tl.int64) << 32, mask=row_mask & (token_of_row == 0))
        tl.debug_barrier()
        last = row_mask & (token_of_row == CAPACITY - 1)
        begins = tl.load(layout_range + src_of_row, mask=last, other=0)
        tl.store(
            layout_range + src_of_row, begins | ((position + 1).to(tl.int64) - (begins >> 32)), mask=last
        )
    tl.debug_barrier()
    return base + tl.sum(hit, axis=0)


@triton.jit
def expected_sequences(
    recv_expected_ptr, PHASE: tl.constexpr, NUM_RANKS: tl.constexpr, R_BLOCK: tl.constexpr
):
    """``[R_BLOCK]`` int32: the sequence number a receive phase waits for from each source. A
    receive-only launch runs after its send launch advanced ``recv_expected``; a ``BOTH`` launch
    calls this first, before its program arrives (the last program advances it after every
    arrival), and adds the one this call's send releases."""
    sources = tl.arange(0, R_BLOCK)
    return tl.load(recv_expected_ptr + sources, mask=sources < NUM_RANKS, other=0) + PHASE // 3


@triton.jit
def ll_signal(
    peer_table,
    mask_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    rank,
    flag_offset,
    peer,
    FLAG_STRIDE: tl.constexpr = 1,
):
    """Release the next sequence number at ``peer``'s flag for this rank and advance what this rank
    expects from ``peer`` (both device-resident, so graph replays work); nothing for a masked peer.
    ``FLAG_STRIDE``: words per flag (2 on the put path: uint64 NVSHMEM signals, the low word here)."""
    if tl.load(mask_ptr + peer) == 0:
        sequence = tl.load(send_seq_ptr + peer) + 1
        tl.store(send_seq_ptr + peer, sequence)
        tl.store(recv_expected_ptr + peer, tl.load(recv_expected_ptr + peer) + 1)
        flag = peer_pointer(peer_table, peer) + flag_offset + FLAG_STRIDE * rank
        tl.atomic_xchg(flag, sequence, sem="release", scope="sys")


@triton.jit
def _put_rows_and_count(
    peer_table,
    local_ptr,
    pe_ptr,
    rank,
    count_offset,
    topk_offset,
    mine_offset,
    count,
    peer,
    NUM_TOPK: tl.constexpr,
    CAPACITY: tl.constexpr,
):
    """The put path's end of a dispatch send phase for one peer of another node: this rank's
    ``count`` top-k rows and its count, from its ``mine`` words (non-blocking: the caller completes
    them with one quiet for all peers)."""
    pe = tl.load(pe_ptr + peer)
    remote = peer_pointer(peer_table, peer)
    mine = local_ptr + mine_offset
    if count > 0:
        puts.put_bytes(
            local_ptr,
            remote,
            topk_offset + rank * CAPACITY * NUM_TOPK,
            mine + MINE_HEAD,
            count * NUM_TOPK * 4,
            pe,
        )
    puts.put_bytes(local_ptr, remote, count_offset + rank, mine, 4, pe)


@triton.jit
def _put_signal(
    peer_table,
    local_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    pe_ptr,
    rank,
    flag_offset,
    fp_offset,
    mine_offset,
    peer,
    FP_WORDS: tl.constexpr,
):
    """The put path's signal to one unmasked peer of another node: this rank's fingerprint (from
    its ``mine`` words) with the next sequence number in the peer's uint64 flag for this rank
    (put-with-signal: the flag after the words); advances the sequence state as ``ll_signal``."""
    sequence = tl.load(send_seq_ptr + peer) + 1
    tl.store(send_seq_ptr + peer, sequence)
    tl.store(recv_expected_ptr + peer, tl.load(recv_expected_ptr + peer) + 1)
    puts.put_block(
        local_ptr,
        peer_pointer(peer_table, peer),
        fp_offset + rank * FP_WORDS,
        local_ptr + mine_offset + MINE_FINGERPRINT,
        FP_WORDS * 4,
        flag_offset + 2 * rank,
        sequence,
        tl.load(pe_ptr + peer),
    )


@triton.jit
def ll_arrive_and_signal(
    peer_table,
    mask_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    rank,
    flag_offset,
    count_offset,
    count,
    fp_offset,
    fingerprint,
    NUM_RANKS: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    FP_WORDS: tl.constexpr,
    local_ptr=None,
    reach_ptr=None,
    pe_ptr=None,
    mine_offset=0,
    topk_offset=0,
    NUM_TOPK: tl.constexpr = 1,
    PUT: tl.constexpr = False,
    FLAG_STRIDE: tl.constexpr = 1,
    CAPACITY: tl.constexpr = 1,
):
    """The end of a send phase: every program arrives on ``arrival_ptr`` (an int32 counter in local
    memory, 0 between calls, one per phase and parity); the last one resets it, writes ``count``
    at ``count_offset + rank`` of every unmasked peer if ``HAS_COUNT`` and the call's
    ``fingerprint`` (``[FP_WORDS]`` int32) into row ``rank`` at ``fp_offset`` there (plain stores,
    then a block barrier), and signals every unmasked peer (``ll_signal``): the release orders the
    count and the fingerprint (and every payload store) before the sequence number, so a receiver
    reads them after its acquire.

    With ``PUT``, a peer with ``reach_ptr[peer] == 0`` (another node) gets those words by NVSHMEM
    puts instead, from this rank's ``mine`` words, which the last program fills first: the top-k
    rows and the count to every such peer (``_put_rows_and_count``), one quiet, then the
    fingerprint with the signal to each (``_put_signal``); every program completed its own puts
    (quiet) before it arrived.

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
        fp_cols = tl.arange(0, FP_WORDS)
        if PUT:
            mine = local_ptr + mine_offset
            tl.store(mine, count)
            tl.store(mine + MINE_FINGERPRINT + fp_cols, fingerprint)
            fence_acq_rel_sys()  # each thread's copy visible to the NIC, then all of them
            tl.debug_barrier()
        for peer in range(NUM_RANKS):
            if tl.load(mask_ptr + peer) == 0:
                if PUT:
                    if tl.load(reach_ptr + peer) != 0:
                        _store_words(peer_table, peer, rank, count_offset, count, fp_offset, fingerprint,
                                     fp_cols, HAS_COUNT, FP_WORDS)  # fmt: skip
                    elif HAS_COUNT:
                        _put_rows_and_count(peer_table, local_ptr, pe_ptr, rank, count_offset, topk_offset,
                                            mine_offset, count, peer, NUM_TOPK, CAPACITY)  # fmt: skip
                else:
                    _store_words(peer_table, peer, rank, count_offset, count, fp_offset, fingerprint, fp_cols,
                                 HAS_COUNT, FP_WORDS)  # fmt: skip
        if PUT:
            # Every top-k row and count complete (one quiet for all peers), then each peer's
            # fingerprint with the sequence number as the signal.
            if HAS_COUNT:
                puts.put_quiet()
            for peer in range(NUM_RANKS):
                if tl.load(mask_ptr + peer) == 0:
                    if tl.load(reach_ptr + peer) == 0:
                        _put_signal(peer_table, local_ptr, send_seq_ptr, recv_expected_ptr, pe_ptr, rank,
                                    flag_offset, fp_offset, mine_offset, peer, FP_WORDS)  # fmt: skip
        tl.debug_barrier()
        for peer in range(NUM_RANKS):
            if PUT:
                if tl.load(reach_ptr + peer) != 0:
                    ll_signal(
                        peer_table,
                        mask_ptr,
                        send_seq_ptr,
                        recv_expected_ptr,
                        rank,
                        flag_offset,
                        peer,
                        FLAG_STRIDE,
                    )
            else:
                ll_signal(peer_table, mask_ptr, send_seq_ptr, recv_expected_ptr, rank, flag_offset, peer)


@triton.jit
def _store_words(
    peer_table,
    peer,
    rank,
    count_offset,
    count,
    fp_offset,
    fingerprint,
    fp_cols,
    HAS_COUNT: tl.constexpr,
    FP_WORDS: tl.constexpr,
):
    """The count (``HAS_COUNT``) and fingerprint of this rank's send phase, stored into ``peer``'s
    words for this rank (a peer of this node)."""
    base = peer_pointer(peer_table, peer)
    if HAS_COUNT:
        store_remote(base + count_offset + rank, count)
    store_remote(base + fp_offset + rank * FP_WORDS + fp_cols, fingerprint)


@triton.jit
def ll_compare_fingerprints(
    slots,
    fingerprint,
    mask_ptr,
    differs_ptr,
    record_address,
    rank,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    FP_WORDS: tl.constexpr,
):
    """After a receive phase's wait: compare every unmasked peer's row at ``slots``
    (``[NUM_RANKS, FP_WORDS]``, this rank's buffer) with ``fingerprint``; ``differs_ptr[s]`` = 1
    where it differs, else 0 (every waiting program stores the same values), then a block
    barrier. On a difference program 0 writes every rank's words (a differing peer's as sent, the
    others' as this rank's) into the host-mapped record at ``record_address`` (``1 + NUM_RANKS *
    FP_WORDS`` int32), then this call's number (word 1 of ``fingerprint``; at least 1) into its word 0,
    unless a record is there already (the host clears word 0 once it has raised)."""
    sources = tl.arange(0, R_BLOCK)
    cols = tl.arange(0, FP_WORDS)
    in_group = sources < NUM_RANKS
    peers = in_group & (sources != rank) & (tl.load(mask_ptr + sources, mask=in_group, other=1) == 0)
    # .cg: written by peers over NVLink (never a stale L1 line of an earlier call's words).
    theirs = tl.load(
        slots + sources[:, None] * FP_WORDS + cols[None, :],
        mask=peers[:, None],
        other=0,
        cache_modifier=".cg",
    )
    differing = tl.sum(((theirs != fingerprint[None, :]) & peers[:, None]).to(tl.int32), axis=1) > 0
    tl.store(differs_ptr + sources, differing.to(tl.int32), mask=in_group)
    if tl.sum(differing.to(tl.int32), axis=0) > 0:
        if tl.program_id(0) == 0:
            record = record_address.to(tl.pointer_type(tl.int32))
            # Masked stores, no branch on the record word: every thread passes the barrier below.
            free = tl.load(record, volatile=True) == 0
            rows = tl.where(differing[:, None], theirs, fingerprint[None, :])
            tl.store(
                record + 1 + sources[:, None] * FP_WORDS + cols[None, :], rows, mask=in_group[:, None] & free
            )
            tl.debug_barrier()
            sequence = tl.maximum(tl.sum(tl.where(cols == 1, fingerprint, 0), axis=0), 1)
            tl.atomic_xchg(record, sequence, sem="release", scope="sys", mask=free)
    tl.debug_barrier()


@triton.jit
def wait_sources(
    flag_ptr,
    mask_ptr,
    expected,
    timeout_ns,
    error_ptr,
    operation_code,
    rank,
    stats_ptr,
    record_stats,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    HAS_STATS: tl.constexpr,
    SHRINK: tl.constexpr,
    FLAG_STRIDE: tl.constexpr = 1,
):
    """Bounded wait for every unmasked source's flag to reach ``expected`` (``[R_BLOCK]`` int32)
    (``primitives.wait_flags``), then a block barrier; optional per-source wait time (ns) stats:
    per source, the time from the start of the wait until its flag was first seen (until the end
    for a missing one). ``R_BLOCK``: a power of two >= ``NUM_RANKS``; the ``R_BLOCK`` words at
    ``flag_ptr`` must be readable.

    On expiry, without ``SHRINK`` the first missing source is reported in the error word; with
    ``SHRINK`` (shrink mode) every missing source ``s`` is masked instead: ``mask[s] = 1`` (the
    caller's later reads of the mask, and every later call, skip it) and word ``4 + s`` of the
    host-mapped error word gets ``operation_code`` (the host warns, naming the op and the peer).
    """
    sources = tl.arange(0, R_BLOCK)
    in_group = sources < NUM_RANKS
    waited_on = in_group & (tl.load(mask_ptr + sources, mask=in_group, other=1) == 0)
    missing, start, seen_at = wait_flags(
        flag_ptr + FLAG_STRIDE * sources,
        waited_on,
        expected,
        timeout_ns,
        error_ptr,
        operation_code,
        rank,
        HAS_STATS,
        R_BLOCK,
        1 - SHRINK,
    )
    if SHRINK:
        tl.store(mask_ptr + sources, 1, mask=missing)
        tl.store(error_ptr + 4 + sources, operation_code, mask=missing)
    if HAS_STATS:
        if record_stats:
            waited = tl.where(missing, global_timer_ns(), seen_at) - start
            tl.atomic_add(stats_ptr + sources, waited, mask=waited_on)
    tl.debug_barrier()


@triton.jit
def ll_wait_and_compare(
    local_ptr,
    flag_offset,
    fp_offset,
    mask_ptr,
    expected,
    timeout_ns,
    error_address,
    operation_code,
    rank,
    stats_ptr,
    record_stats,
    fingerprint,
    differs_ptr,
    record_address,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    HAS_STATS: tl.constexpr,
    SHRINK: tl.constexpr,
    FP_WORDS: tl.constexpr,
    FLAG_STRIDE: tl.constexpr = 1,
):
    """A receive phase's wait: ``wait_sources`` on the flags at ``local_ptr + flag_offset``
    (``FLAG_STRIDE`` words apart), then ``ll_compare_fingerprints`` of the rows at ``local_ptr +
    fp_offset`` (both phases' kernels)."""
    wait_sources(
        local_ptr + flag_offset,
        mask_ptr,
        expected,
        timeout_ns,
        error_address.to(tl.pointer_type(tl.int32)),
        operation_code,
        rank,
        stats_ptr,
        record_stats,
        NUM_RANKS,
        R_BLOCK,
        HAS_STATS,
        SHRINK,
        FLAG_STRIDE,
    )
    ll_compare_fingerprints(
        local_ptr + fp_offset,
        fingerprint,
        mask_ptr,
        differs_ptr,
        record_address,
        rank,
        NUM_RANKS,
        R_BLOCK,
        FP_WORDS,
    )


class LowLatencyWords(NamedTuple):
    """int32-word offsets, from word 0 of every rank's buffer, of one (phase, parity)'s state.

    Attributes:
        flags: ``num_ranks`` sequence flags (word ``s``: the latest sequence rank ``s`` released
            here), readable for ``SymmetricPeers.flag_block`` words.
        counts: ``num_ranks`` dispatch token counts (word ``s``: tokens rank ``s`` sent in its last
            dispatch of this parity); unused by combine.
        staging: the staging area (dispatch: ``[num_ranks, M, message_words]``; combine:
            ``[M, num_topk, hidden / 2]``); a multiple of 32.
        fingerprints: ``[num_ranks, FINGERPRINT_WORDS]`` call fingerprints (row ``s``: rank
            ``s``'s last call of this phase and parity).
    """

    flags: int
    counts: int
    staging: int
    fingerprints: int


class CallCheck(NamedTuple):
    """What a low-latency launch sends and compares (the module docstring).

    Attributes:
        words: this call's ``FINGERPRINT_WORDS`` words, each in ``[0, 2**31)``.
        differs: ``[num_ranks]`` int32 device work space of this (phase, parity): 1 for each
            source whose call differs (written by the receive phase).
        record_address: address of a host-mapped int32 record of ``1 + num_ranks *
            FINGERPRINT_WORDS`` words, word 0 zero while free.
    """

    words: Sequence[int]
    differs: torch.Tensor
    record_address: int


def check_words(check: CallCheck) -> list[int]:
    """``check.words`` as ints, validated (``FINGERPRINT_WORDS`` words in ``[0, 2**31)``)."""
    words = [int(word) for word in check.words]
    if len(words) != FINGERPRINT_WORDS or not all(0 <= word < 2**31 for word in words):
        raise ValueError(f"fingerprint must be {FINGERPRINT_WORDS} words in [0, 2**31); got {words}")
    return words


class SignalState(NamedTuple):
    """Device-resident signal state of one (phase, parity), so graph replays stay in step.

    Attributes:
        arrival: ``[1]`` int32 counter of the send phase's programs (0 between calls).
        send_seq: ``[num_ranks]`` int32, the last sequence number released at each peer.
        recv_expected: ``[num_ranks]`` int32, the sequence number expected from each peer.
    """

    arrival: torch.Tensor
    send_seq: torch.Tensor
    recv_expected: torch.Tensor


class DispatchOutputs(NamedTuple):
    """The receive phase's outputs and work space (``L`` local experts, ``N = num_ranks * capacity``).

    Attributes:
        scratch: ``[L, N]`` int32 work space.
        recv_x_words: ``[L, N, x_words]`` int32 view of ``recv_x`` (bf16 or FP8 payload).
        recv_scales_words: ``[L, scale_columns, N]`` int32 view of the scales (column-major; float
            or packed UE8M0); any int32 tensor without FP8.
        recv_count: ``[L]`` int32.
        recv_src_info: ``[L, N]`` int32.
        recv_layout_range: ``[L, num_ranks]`` int64.
        cumulative_stats: ``[L]`` int32 to add the counts to, or ``None``.
        wait_stats: ``[num_ranks]`` int64 to add the wait times (ns) to, or ``None``.
    """

    scratch: torch.Tensor
    recv_x_words: torch.Tensor
    recv_scales_words: torch.Tensor
    recv_count: torch.Tensor
    recv_src_info: torch.Tensor
    recv_layout_range: torch.Tensor
    cumulative_stats: torch.Tensor | None
    wait_stats: torch.Tensor | None


class PutPath(NamedTuple):
    """The put path of a multi-node low-latency launch: which peers are reached by NVSHMEM puts,
    and this op's areas that only the put path uses (int32-word offsets from word 0 of every
    rank's buffer).

    Attributes:
        reach: ``[num_ranks]`` int32 device tensor: 1 for a rank of this node (stores through the
            peer table), 0 for one of another node (puts).
        pes: ``[num_ranks]`` int32 device tensor: each rank's NVSHMEM PE.
        topk: dispatch: this parity's top-k rows ``[num_ranks, capacity, num_topk]`` (row ``(s,
            t)``: rank ``s``'s token ``t``), written apart from the messages; unused by combine.
        outbox: the send copy the puts read: dispatch ``[capacity, message_words]`` (one message
            per token), combine ``[L, num_ranks * capacity, hidden / 2]`` (as ``x``).
        mine: this op's put sources of the last program: ``MINE_HEAD`` words (count, fingerprint)
            then, for dispatch, the ``[capacity, num_topk]`` top-k rows.
        kernel: the launchable put kernel (``requires_nvshmem`` of ``ll_dispatch_put_kernel`` /
            ``ll_combine_put_kernel``; the jit function itself in the interpreter checks).
    """

    reach: torch.Tensor
    pes: torch.Tensor
    topk: int
    outbox: int
    mine: int
    kernel: Any


def _fp8_blocks(hidden: int, use_fp8: bool) -> tuple[int, int]:
    """``(x_words, g_block)``: int32 words of one payload row, scale groups rounded up (>= 4)."""
    return (hidden // 4 if use_fp8 else hidden // 2), max(4, next_pow2(hidden // 128))


def dispatch_grid(phase: Phase, num_tokens: int, num_local_experts: int, num_sms: int) -> tuple[int, int]:
    """``(programs, warps)`` of a dispatch launch: send, one program per token up to the SMs (one
    with no token), 8 warps; receive, one program per local expert, 16 warps; both, the larger of
    the two up to one program per SM (every program resident: it waits inside the signalling
    kernel), 16 warps."""
    send = max(1, min(num_tokens, num_sms))
    if phase == Phase.SEND:
        return send, 8
    if phase == Phase.RECEIVE:
        return num_local_experts, 16
    return min(max(send, num_local_experts), num_sms), 16


def launch_ll_dispatch(
    *,
    phase: Phase,
    peers: SymmetricPeers,
    local: torch.Tensor,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    rank_mask: torch.Tensor,
    combine_gather_idx: torch.Tensor,
    signals: SignalState,
    words: LowLatencyWords,
    outputs: DispatchOutputs | None,
    operation_code: int,
    num_local_experts: int,
    message_words: int,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
    num_sms: int,
    check: CallCheck,
    shrink: bool = False,
    put: PutPath | None = None,
) -> None:
    """One phase of a low-latency dispatch (``ll_dispatch_kernel``, or ``put.kernel`` on the put
    path; the module docstring).

    Arguments:
        phase: ``SEND`` / ``RECEIVE`` (the two launches of a call with a receive hook, in that
            order on one stream) or ``BOTH`` (one launch).
        peers: the peer table, rank, timeout and error word.
        local: this rank's whole symmetric buffer, int32.
        x: ``[num_tokens, hidden]`` bf16, contiguous (``hidden`` a multiple of 128).
        topk_idx: ``[num_tokens, num_topk]`` int64, contiguous (``-1`` = no expert).
        rank_mask: ``[num_ranks]`` int32 device mask, non-zero = neither send to nor wait for that
            rank (shrink mode).
        combine_gather_idx: ``[num_ranks, capacity, num_topk]`` int64: the send phase fills it with
            ``-1``, the receive phase writes the hits.
        signals: this (dispatch, parity)'s device signal state.
        words: this (dispatch, parity)'s flag, count and staging offsets.
        outputs: the receive phase's outputs (``None`` for ``SEND``).
        operation_code: written into the error word on timeout.
        num_local_experts: experts per rank.
        message_words: int32 words of one staging slot.
        use_fp8: cast to FP8 with per-128-channel float scales on the way.
        round_scale: round the scales up to powers of two.
        use_ue8m0: pack the received scales as UE8M0 exponents (4 per int32).
        num_sms: SMs of the device.
        check: the call's fingerprint, sent by the send phase and compared by the receive phase
            (a source whose words differ sends no row here), with its work space and host record.
        shrink: shrink mode: a source that misses the bound (``peers.timeout_ns``) is masked and
            logged in the error word's words ``4 + s`` instead of reported as an error.
        put: the put path (multi-node: peers of other nodes through NVSHMEM puts), or ``None``.
    """
    fingerprint = check_words(check)
    num_tokens, hidden = x.shape
    num_ranks, capacity, num_topk = combine_gather_idx.shape
    if outputs is None:
        if phase != Phase.SEND:
            raise ValueError(f"a {phase.name} dispatch launch needs its outputs")
        unused = combine_gather_idx  # never dereferenced by the send phase
        outputs = DispatchOutputs(unused, unused, unused, unused, unused, unused, None, None)
    x_words, g_block = _fp8_blocks(hidden, use_fp8)
    programs, warps = dispatch_grid(phase, num_tokens, num_local_experts, num_sms)
    reach = put.reach if put is not None else rank_mask
    # The put path's receive issues no put: the store entry point with PUT.
    kernel = ll_dispatch_kernel if put is None or phase == Phase.RECEIVE else put.kernel
    launch(
        kernel,
        (programs,),
        (
            peers.peer_table,
            local,
            x,
            topk_idx,
            rank_mask,
            combine_gather_idx,
            signals.arrival,
            signals.send_seq,
            signals.recv_expected,
            outputs.scratch,
            outputs.recv_x_words,
            outputs.recv_scales_words,
            outputs.recv_count,
            outputs.recv_src_info,
            outputs.recv_layout_range,
            outputs.cumulative_stats if outputs.cumulative_stats is not None else outputs.recv_count,
            outputs.wait_stats if outputs.wait_stats is not None else outputs.recv_layout_range,
            check.differs,
            reach,
            put.pes if put is not None else rank_mask,
            num_tokens,
            peers.rank,
            peers.timeout_ns,
            peers.error_address,
            operation_code,
            words.flags,
            words.counts,
            words.staging,
            words.fingerprints,
            check.record_address,
            put.topk if put is not None else 0,
            put.outbox if put is not None else 0,
            put.mine if put is not None else 0,
            *fingerprint,
        ),
        {
            "PHASE": int(phase),
            "NUM_RANKS": num_ranks,
            "R_BLOCK": peers.flag_block,
            "NUM_LOCAL_EXPERTS": num_local_experts,
            "CAPACITY": capacity,
            "HIDDEN": hidden,
            "NUM_TOPK": num_topk,
            "K_BLOCK": next_pow2(num_topk),
            "ROWS_BLOCK": min(next_pow2(num_ranks * capacity), RECEIVE_ROWS_BLOCK),
            "MESSAGE_WORDS": message_words,
            "X_WORDS": x_words,
            "X_BLOCK": next_pow2(x_words),
            "G_BLOCK": g_block,
            "USE_FP8": use_fp8,
            "ROUND_SCALE": round_scale,
            "USE_UE8M0": use_ue8m0,
            "SCALE_COLUMNS": outputs.recv_scales_words.size(1) if use_fp8 and phase != Phase.SEND else 1,
            "HAS_CUMULATIVE_STATS": outputs.cumulative_stats is not None,
            "HAS_WAIT_STATS": outputs.wait_stats is not None,
            "SHRINK": shrink,
            "FP_WORDS": FINGERPRINT_WORDS,
            **({"PUT": put is not None} if kernel is ll_dispatch_kernel else {}),
        },
        warps,
    )
