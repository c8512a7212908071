"""Low-latency combine over NVLink: expert outputs go back as one bf16 row per (token, top-k slot)
into slot ``[token, k]`` of the token's rank; the token's rank applies the weights. One kernel,
``ll_combine_kernel``, with a phase (``low_latency_dispatch.Phase``), so a profile shows exactly one
kernel name containing ``combine``.

Send phase: work item ``(source rank, token, slot)`` with a local expert (``combine_gather_idx >=
0``) copies that expert output row to the source rank; consecutive items go to different ranks;
``ITEMS`` items per step, all loads in flight before the stores; the last program to finish signals
every peer (``ll_arrive_and_signal``, which also sends the call's fingerprint). Receive phase:
bounded wait for every unmasked expert rank, a comparison of their fingerprints
(``ll_compare_fingerprints``: the rows of a rank whose call differs are not added), then ``sum_k
w[t, k] * row[t, k]`` in float32 in slot order, one bf16 write. ``SEND`` alone runs up to 4 programs
per SM of 8 warps, one item per step; ``BOTH`` waits inside the signalling kernel, so its grid is at
most one program per SM (every program resident) and each program moves 4 items per step instead.

Put path (``ll_combine_put_kernel``, multi-node: ``low_latency_dispatch.PutPath``): an item for a
rank of another node copies its row into this rank's outbox (at the row's place in ``x``) and puts
it to the token's slot there; one item per step; each program completes its puts (quiet) before it
arrives, and the last program puts the fingerprint to each such rank with the sequence number as
the signal in its uint64 flag (``ll_arrive_and_signal``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm._math import next_pow2
from epcomm.fingerprint import FINGERPRINT_WORDS
from epcomm.kernels import puts
from epcomm.kernels.launch import launch
from epcomm.kernels.low_latency_dispatch import (
    PUT_FLAG_STRIDE,
    CallCheck,
    LowLatencyWords,
    Phase,
    PutPath,
    SignalState,
    check_words,
    expected_sequences,
    ll_arrive_and_signal,
    ll_wait_and_compare,
)
from epcomm.kernels.normal_rows import FINGERPRINT_ARGS, fingerprint_vector
from epcomm.kernels.primitives import fence_acq_rel_sys, peer_pointer, peer_pointers, store_remote
from epcomm.kernels.symmetric_peers import SymmetricPeers

__all__ = ["combine_grid", "launch_ll_combine", "ll_combine_kernel", "ll_combine_put_kernel"]


@triton.jit
def _ll_combine(
    peer_table,
    local_ptr,
    x_ptr,
    gather_idx_ptr,
    mask_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    out_ptr,
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
    staging_offset,
    fp_offset,
    record_address,
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
    ITEMS: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    CAPACITY: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
    HIDDEN: tl.constexpr,
    H_BLOCK: tl.constexpr,
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
        _send_rows(
            peer_table,
            local_ptr,
            x_ptr,
            gather_idx_ptr,
            mask_ptr,
            reach_ptr,
            pe_ptr,
            rank,
            staging_offset,
            outbox_offset,
            ITEMS,
            NUM_RANKS,
            CAPACITY,
            NUM_TOPK,
            X_WORDS,
            X_BLOCK,
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
            0,  # no count: the combine receiver reads its own tokens' slots
            0,
            fp_offset,
            fingerprint,
            NUM_RANKS,
            False,
            FP_WORDS,
            local_ptr,
            reach_ptr,
            pe_ptr,
            mine_offset,
            0,
            NUM_TOPK,
            PUT,
            PUT_FLAG_STRIDE if PUT else 1,
            CAPACITY,
        )
    if PHASE & 2:
        if pid < tl.maximum(tl.minimum(num_tokens, grid), 1):
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
        _reduce_rows(
            local_ptr,
            mask_ptr,
            differs_ptr,
            topk_idx_ptr,
            topk_weights_ptr,
            out_ptr,
            num_tokens,
            staging_offset,
            NUM_LOCAL_EXPERTS,
            HIDDEN,
            NUM_TOPK,
            H_BLOCK,
        )


# Two entry points over one body, not one kernel with a flag: requires_nvshmem registers a kernel by
# name for NVSHMEM's module initialisation after it compiles, which the store path must not get
# (it runs where NVSHMEM is absent). The put path's receive launch is the store entry point
# compiled with ``PUT`` (it issues no NVSHMEM call: low_latency_dispatch's note at its kernels).
_COMBINE_RUNTIME = [
    "num_tokens",
    "rank",
    "timeout_ns",
    "error_address",
    "operation_code",
    "flag_offset",
    "fp_offset",
    "record_address",
    "mine_offset",
    *FINGERPRINT_ARGS,
]


@triton.jit(do_not_specialize=_COMBINE_RUNTIME)
def ll_combine_kernel(
    peer_table,
    local_ptr,
    x_ptr,
    gather_idx_ptr,
    mask_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    out_ptr,
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
    staging_offset,
    fp_offset,
    record_address,
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
    ITEMS: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    CAPACITY: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
    HIDDEN: tl.constexpr,
    H_BLOCK: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
    SHRINK: tl.constexpr,
    FP_WORDS: tl.constexpr,
    PUT: tl.constexpr,
):
    """Every peer through stores (one NVLink domain): the module docstring; with ``PUT``, the put
    path's receive launch (flags ``PUT_FLAG_STRIDE`` words apart), which issues no put."""
    _ll_combine(
        peer_table, local_ptr, x_ptr, gather_idx_ptr, mask_ptr, arrival_ptr, send_seq_ptr, recv_expected_ptr,
        topk_idx_ptr, topk_weights_ptr, out_ptr, wait_stats_ptr, differs_ptr, reach_ptr, pe_ptr, num_tokens, rank,
        timeout_ns, error_address, operation_code, flag_offset, staging_offset, fp_offset, record_address,
        outbox_offset, mine_offset, fp0, fp1, fp2, fp3, fp4, fp5, fp6, fp7, PHASE, ITEMS, NUM_RANKS, R_BLOCK,
        NUM_LOCAL_EXPERTS, CAPACITY, NUM_TOPK, X_WORDS, X_BLOCK, HIDDEN, H_BLOCK, HAS_WAIT_STATS, SHRINK, FP_WORDS,
        PUT,
    )  # fmt: skip


@triton.jit(do_not_specialize=_COMBINE_RUNTIME)
def ll_combine_put_kernel(
    peer_table,
    local_ptr,
    x_ptr,
    gather_idx_ptr,
    mask_ptr,
    arrival_ptr,
    send_seq_ptr,
    recv_expected_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    out_ptr,
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
    staging_offset,
    fp_offset,
    record_address,
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
    ITEMS: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    CAPACITY: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
    HIDDEN: tl.constexpr,
    H_BLOCK: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
    SHRINK: tl.constexpr,
    FP_WORDS: tl.constexpr,
):
    """Expert ranks of other nodes (``reach_ptr[r] == 0``) get their rows by NVSHMEM puts from a
    copy in this rank's buffer, the others by stores (the module docstring's "Put path"); launched
    through ``requires_nvshmem``."""
    _ll_combine(
        peer_table, local_ptr, x_ptr, gather_idx_ptr, mask_ptr, arrival_ptr, send_seq_ptr, recv_expected_ptr,
        topk_idx_ptr, topk_weights_ptr, out_ptr, wait_stats_ptr, differs_ptr, reach_ptr, pe_ptr, num_tokens, rank,
        timeout_ns, error_address, operation_code, flag_offset, staging_offset, fp_offset, record_address,
        outbox_offset, mine_offset, fp0, fp1, fp2, fp3, fp4, fp5, fp6, fp7, PHASE, ITEMS, NUM_RANKS, R_BLOCK,
        NUM_LOCAL_EXPERTS, CAPACITY, NUM_TOPK, X_WORDS, X_BLOCK, HIDDEN, H_BLOCK, HAS_WAIT_STATS, SHRINK, FP_WORDS,
        True,
    )  # fmt: skip


@triton.jit
def _send_rows(
    peer_table,
    local_ptr,
    x_ptr,
    gather_idx_ptr,
    mask_ptr,
    reach_ptr,
    pe_ptr,
    rank,
    staging_offset,
    outbox_offset,
    ITEMS: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    CAPACITY: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
    PUT: tl.constexpr,
):
    """The send phase's data movement (the module docstring); the caller arrives and signals. The
    put path moves one item per step (``ITEMS == 1``)."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    words = tl.arange(0, X_BLOCK)
    word_mask = words < X_WORDS
    ITEMS_PER_RANK: tl.constexpr = CAPACITY * NUM_TOPK
    TOTAL: tl.constexpr = NUM_RANKS * ITEMS_PER_RANK
    if ITEMS == 1:
        for item in range(pid, TOTAL, grid):
            dst = (item + rank) % NUM_RANKS  # spread: consecutive items go to different ranks
            slot = item // NUM_RANKS  # token * NUM_TOPK + k on the destination
            row = tl.load(gather_idx_ptr + dst * ITEMS_PER_RANK + slot)
            if row >= 0:
                if tl.load(mask_ptr + dst) == 0:
                    data = tl.load(x_ptr + row * X_WORDS + words, mask=word_mask)
                    peer = peer_pointer(peer_table, dst)
                    if PUT:
                        if tl.load(reach_ptr + dst) != 0:
                            store_remote(
                                peer + staging_offset + slot.to(tl.int64) * X_WORDS + words, data, word_mask
                            )
                        else:
                            # Another node: a copy of the row in this rank's buffer, then one put.
                            outbox = local_ptr + outbox_offset + row * X_WORDS
                            tl.store(outbox + words, data, mask=word_mask)
                            fence_acq_rel_sys()  # each thread's copy visible to the NIC, then all of them
                            tl.debug_barrier()
                            puts.put_bytes(
                                local_ptr,
                                peer,
                                staging_offset + slot.to(tl.int64) * X_WORDS,
                                outbox,
                                X_WORDS * 4,
                                tl.load(pe_ptr + dst),
                            )
                    else:
                        store_remote(
                            peer + staging_offset + slot.to(tl.int64) * X_WORDS + words, data, word_mask
                        )
    else:
        steps = tl.arange(0, ITEMS)
        for first in range(pid * ITEMS, TOTAL, grid * ITEMS):
            item = first + steps
            valid = item < TOTAL
            dst = (item + rank) % NUM_RANKS
            slot = item // NUM_RANKS
            row = tl.load(gather_idx_ptr + dst * ITEMS_PER_RANK + slot, mask=valid, other=-1)
            use = (row >= 0) & (tl.load(mask_ptr + dst, mask=valid, other=1) == 0)
            both = use[:, None] & word_mask[None, :]
            data = tl.load(x_ptr + row[:, None] * X_WORDS + words[None, :], mask=both)
            base = peer_pointers(peer_table, dst, use) + staging_offset
            store_remote(base[:, None] + (slot.to(tl.int64) * X_WORDS)[:, None] + words[None, :], data, both)
    if PUT:
        puts.put_quiet()  # this program's puts are complete before it arrives


@triton.jit
def _reduce_rows(
    local_ptr,
    mask_ptr,
    differs_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    out_ptr,
    num_tokens,
    staging_offset,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    HIDDEN: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    H_BLOCK: tl.constexpr,
):
    """The receive phase after the wait: this program's tokens, weighted sums in slot order."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    staging = (local_ptr + staging_offset).to(tl.pointer_type(tl.bfloat16), bitcast=True)
    cols = tl.arange(0, H_BLOCK)
    col_mask = cols < HIDDEN
    for token in range(pid, num_tokens, grid):
        accumulator = tl.zeros([H_BLOCK], dtype=tl.float32)
        # Masked loads, no branches: all top-k rows are in flight before the first multiply-add.
        for k in tl.static_range(NUM_TOPK):
            expert = tl.load(topk_idx_ptr + token * NUM_TOPK + k)
            present = expert >= 0
            expert_rank = tl.where(present, expert // NUM_LOCAL_EXPERTS, 0)
            unmasked = tl.load(mask_ptr + expert_rank) == 0
            # A rank whose call differs (ll_compare_fingerprints): its rows are not this call's.
            agrees = tl.load(differs_ptr + expert_rank) == 0
            use = present & unmasked & agrees
            weight = tl.load(topk_weights_ptr + token * NUM_TOPK + k)
            row = tl.load(
                staging + (token * NUM_TOPK + k).to(tl.int64) * HIDDEN + cols,
                mask=col_mask & use,
                other=0.0,
                cache_modifier=".cg",
            )
            accumulator += tl.where(use, weight, 0.0) * row.to(tl.float32)
        tl.store(out_ptr + token.to(tl.int64) * HIDDEN + cols, accumulator.to(tl.bfloat16), mask=col_mask)


def combine_grid(phase: Phase, num_items: int, num_tokens: int, num_sms: int) -> tuple[int, int, int]:
    """``(programs, warps, items per step)`` of a combine launch for ``num_items = num_ranks *
    capacity * num_topk`` send items: send, up to 4 programs per SM of 8 warps; receive, one program
    per token up to the SMs, 16 warps; both, at most one program per SM (every program resident:
    it waits inside the signalling kernel), 16 warps, 4 items per step."""
    receive = max(1, min(num_tokens, num_sms))
    if phase == Phase.SEND:
        return max(1, min(num_items, 4 * num_sms)), 8, 1
    if phase == Phase.RECEIVE:
        return receive, 16, 1
    return min(max(num_items, receive, 1), num_sms), 16, 4


def launch_ll_combine(
    *,
    phase: Phase,
    peers: SymmetricPeers,
    local: torch.Tensor,
    x_words: torch.Tensor,
    combine_gather_idx: torch.Tensor,
    rank_mask: torch.Tensor,
    signals: SignalState,
    words: LowLatencyWords,
    operation_code: int,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor,
    wait_stats: torch.Tensor | None,
    num_local_experts: int,
    num_sms: int,
    check: CallCheck,
    shrink: bool = False,
    put: PutPath | None = None,
) -> None:
    """One phase of a low-latency combine (``ll_combine_kernel``, or ``put.kernel`` on the put
    path; the module docstring).

    Arguments:
        phase: ``SEND`` / ``RECEIVE`` (the two launches of a call with a receive hook, in that
            order on one stream) or ``BOTH`` (one launch).
        peers: the peer table, rank, timeout and error word.
        local: this rank's whole symmetric buffer, int32.
        x_words: ``[num_local_experts, num_ranks * capacity, hidden / 2]`` int32 view of the bf16
            expert outputs, contiguous.
        combine_gather_idx: ``[num_ranks, capacity, num_topk]`` int64 from the dispatch handle: the
            flat row of ``x_words`` for slot ``(source, token, k)``, ``-1`` = none here.
        rank_mask: ``[num_ranks]`` int32 device mask, non-zero = neither send to that rank nor use
            its rows.
        signals: this (combine, parity)'s device signal state.
        words: this (combine, parity)'s flag and staging offsets.
        operation_code: written into the error word on timeout.
        topk_idx: ``[num_tokens, num_topk]`` int64, contiguous.
        topk_weights: ``[num_tokens, num_topk]`` float32, contiguous.
        out: ``[num_tokens, hidden]`` bf16.
        wait_stats: ``[num_ranks]`` int64 to add the wait times (ns) to, or ``None``.
        num_local_experts: experts per rank.
        num_sms: SMs of the device.
        check: the call's fingerprint, sent by the send phase and compared by the receive phase
            (the rows of an expert rank whose words differ are not added), with its work space
            and host record.
        shrink: shrink mode: an expert rank that misses the bound is masked (its rows count as
            ``-1`` slots) and logged instead of reported as an error (``wait_sources``).
        put: the put path (multi-node: expert ranks of other nodes through NVSHMEM puts; its
            ``outbox`` has the shape of ``x_words``), or ``None``.
    """
    fingerprint = check_words(check)
    num_ranks, capacity, num_topk = combine_gather_idx.shape
    num_tokens, hidden = out.shape
    x_words_per_row = x_words.size(-1)
    programs, warps, items = combine_grid(phase, num_ranks * capacity * num_topk, num_tokens, num_sms)
    if put is not None:
        items = 1  # one put per item
    # The put path's receive issues no put: the store entry point with PUT.
    kernel = ll_combine_kernel if put is None or phase == Phase.RECEIVE else put.kernel
    launch(
        kernel,
        (programs,),
        (
            peers.peer_table,
            local,
            x_words,
            combine_gather_idx,
            rank_mask,
            signals.arrival,
            signals.send_seq,
            signals.recv_expected,
            topk_idx,
            topk_weights,
            out,
            wait_stats if wait_stats is not None else topk_idx,
            check.differs,
            put.reach if put is not None else rank_mask,
            put.pes if put is not None else rank_mask,
            num_tokens,
            peers.rank,
            peers.timeout_ns,
            peers.error_address,
            operation_code,
            words.flags,
            words.staging,
            words.fingerprints,
            check.record_address,
            put.outbox if put is not None else 0,
            put.mine if put is not None else 0,
            *fingerprint,
        ),
        {
            "PHASE": int(phase),
            "ITEMS": items,
            "NUM_RANKS": num_ranks,
            "R_BLOCK": peers.flag_block,
            "NUM_LOCAL_EXPERTS": num_local_experts,
            "CAPACITY": capacity,
            "NUM_TOPK": num_topk,
            "X_WORDS": x_words_per_row,
            "X_BLOCK": next_pow2(x_words_per_row),
            "HIDDEN": hidden,
            "H_BLOCK": next_pow2(hidden),
            "HAS_WAIT_STATS": wait_stats is not None,
            "SHRINK": shrink,
            "FP_WORDS": FINGERPRINT_WORDS,
            **({"PUT": put is not None} if kernel is ll_combine_kernel else {}),
        },
        warps,
    )
