"""Normal mode: push rows into peers' symmetric buffers, each byte written once into its final row.

Used by dispatch (a token row goes to every rank in ``is_token_in_rank``, with its top-k ids made
local to that rank) and by combine (an expert-output row goes back to its token's rank). Each
program owns a contiguous range of rows (or, for a balanced combine push, one of every
destination's rows) and takes ``ROWS`` of them per step, loads all of them (every load in flight before the
first store: the compiler cannot hoist a load above a store that may alias it), then stores them to
every destination, visiting destinations in an order rotated by program and rank so that no peer
is written by everyone at once (EP4: 205 -> 261-287 GB/s, ``../shared/PERFORMANCE.md``).

The barriers around a push are folded into it (``PushBarriers``): with an entry barrier, program 0
releases this rank's entry flag at every peer and every program waits for all peers' flags before
its first store; with an exit barrier, every program fences its stores and counts itself done, and
the last one releases the exit flag at every peer and waits for theirs. One launch instead of three.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from epcomm.kernels.exchange import MAX_PEERS, PeerArgs, _peer, as_peer_args
from epcomm.kernels.launch import launch, next_pow2
from epcomm.kernels.primitives import fence_acq_rel_sys, signal_release_sys, wait_all_epoch

__all__ = [
    "MAX_CHECKPOINTS",
    "PUSH_ROWS",
    "PUSH_WARPS",
    "PushBarriers",
    "PushRegions",
    "balanced_combine_push",
    "launch_push_rows",
    "push_rows_per_step",
]

# Rows in flight per program and warps per program. Tuning knobs for side-by-side measurements
# (``EPCOMM_PUSH_ROWS`` / ``EPCOMM_PUSH_WARPS``); the defaults are the measured best (docs/performance.md).
# ROWS 0 (default): enough rows for ``PUSH_STEP_BYTES`` of loads per step, 2 to 8: the 2 rows
# measured best for BF16 hidden 7168 (EP4, scripts/sweep_push.py), as many bytes for smaller rows
# (FP8: 4 rows; EP1 dispatch FP8 GPU time 94.8 -> 75.7 us), twice as many when each row has one
# destination (combine: a step stores what it loads once, not once per destination; EP1 combine
# 130 -> 116.5 us at 4 rows, 116 at 8). docs/performance.md, session 5.
PUSH_ROWS = int(os.environ.get("EPCOMM_PUSH_ROWS", "0"))
PUSH_STEP_BYTES = 2 * 7168 * 2


def push_rows_per_step(row_words: int, one_destination: bool) -> int:
    """Rows per step of ``push_rows_kernel`` for rows of ``row_words`` int32 words (payload and
    scales): ``EPCOMM_PUSH_ROWS`` if set, else ``PUSH_STEP_BYTES`` (doubled for rows with one
    destination each) worth of rows, a power of two from 2 to 8."""
    if PUSH_ROWS:
        return PUSH_ROWS
    step_bytes = PUSH_STEP_BYTES * (2 if one_destination else 1)
    return min(8, max(2, next_pow2(-(-step_bytes // (4 * row_words)))))


PUSH_WARPS = int(os.environ.get("EPCOMM_PUSH_WARPS", "16"))


def balanced_combine_push() -> bool:
    """``EPCOMM_COMBINE_PUSH``: ``contiguous`` (default) gives each combine push program one
    contiguous part of all rows (rows are sorted by destination, so at EP4 a quarter of the
    programs get only local rows); ``balanced`` gives each program an equal part of every
    destination's rows (``launch_push_rows(segments=...)``). Off by default until measured on
    several GPUs: with one GPU (EP1) every row is local and both orders are the same."""
    value = os.environ.get("EPCOMM_COMBINE_PUSH", "contiguous").strip().lower()
    if value not in ("contiguous", "balanced"):
        raise ValueError(f"EPCOMM_COMBINE_PUSH must be contiguous or balanced; got {value!r}")
    return value == "balanced"


# Most progress ranges per push (PushBarriers.checkpoints): the progress flags are MAX_PEERS x this.
MAX_CHECKPOINTS = 8
# The same two numbers as constants inside kernels (Triton reads globals only when constexpr).
_MAX_CHECKPOINTS = tl.constexpr(MAX_CHECKPOINTS)
_MAX_PEERS = tl.constexpr(MAX_PEERS)


@triton.jit
def _release_at_peers(p0, p1, p2, p3, p4, p5, p6, p7, slot, epoch, NUM_RANKS: tl.constexpr):
    for peer in tl.static_range(NUM_RANKS):
        signal_release_sys(_peer(peer, p0, p1, p2, p3, p4, p5, p6, p7) + slot, epoch)


@triton.jit(
    do_not_specialize=[
        "num_rows",
        "rank",
        "num_local_experts",
        "capacity",
        "entry_epoch",
        "exit_epoch",
        "timeout_ns",
        "error_address",
        "entry_code",
        "exit_code",
    ]
)
def push_rows_kernel(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    x_ptr,
    scales_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    dst_row_ptr,
    segment_ptr,
    num_rows,
    rank,
    num_local_experts,
    capacity,
    x_offset,
    scales_offset,
    topk_idx_offset,
    topk_weights_offset,
    src_idx_offset,
    entry_epoch,
    exit_epoch,
    timeout_ns,
    error_address,
    entry_code,
    exit_code,
    NUM_RANKS: tl.constexpr,
    X_WORDS: tl.constexpr,
    X_BLOCK: tl.constexpr,
    S_WORDS: tl.constexpr,
    S_BLOCK: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HAS_TOPK_IDX: tl.constexpr,
    HAS_TOPK_WEIGHTS: tl.constexpr,
    LOCALIZE_TOPK: tl.constexpr,
    WRITE_SRC_IDX: tl.constexpr,
    PAYLOAD_OFFSET: tl.constexpr,
    FLAG_OFFSET: tl.constexpr,
    COUNTER_OFFSET: tl.constexpr,
    ENTRY: tl.constexpr,
    EXIT: tl.constexpr,
    CHECKPOINTS: tl.constexpr,
    PROGRESS: tl.constexpr,
    PROGRESS_OFFSET: tl.constexpr,
    CHECKPOINT_COUNTER_OFFSET: tl.constexpr,
    BALANCE: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    local = _peer(rank, p0, p1, p2, p3, p4, p5, p6, p7)
    if ENTRY:
        # Our previous readers of this area are done (stream order): tell every peer, then wait
        # until every peer says the same of its area before writing into it.
        if pid == 0:
            _release_at_peers(p0, p1, p2, p3, p4, p5, p6, p7, FLAG_OFFSET + rank, entry_epoch, NUM_RANKS)
        error_pointer = error_address.to(tl.pointer_type(tl.int32))
        wait_all_epoch(
            local + FLAG_OFFSET, entry_epoch, NUM_RANKS, timeout_ns, error_pointer, entry_code, rank
        )
    x_cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, X_BLOCK), X_BLOCK), X_BLOCK)[None, :]
    x_mask = x_cols < X_WORDS
    s_cols = tl.arange(0, S_BLOCK)[None, :]
    s_mask = s_cols < S_WORDS
    k_cols = tl.arange(0, K_BLOCK)[None, :]
    k_mask = k_cols < NUM_TOPK
    row_offsets = tl.arange(0, ROWS)
    # The rows are cut into CHECKPOINTS consecutive ranges, pushed one after the other by the whole
    # grid; with PROGRESS, once every program is done with range k, this rank's progress flag k is
    # released at every destination (a copy engine there copies those rows out while the rest are
    # pushed). Within a range each program owns one contiguous part. Combine rows are sorted by
    # destination, so strided parts had every program writing to the same peer at once (incast);
    # contiguous parts spread the programs over the destinations (EP4 combine push 640-710 -> see
    # docs/performance.md).
    #
    # BALANCE (combine, one destination per row, rows sorted by destination): the rows are pieces,
    # one per destination (``segment_ptr`` = the handle's rank prefix matrix: rows
    # [prefix[d - 1, rank], prefix[d, rank]) go back to rank d), and each program owns one
    # contiguous part of every piece, visited in an order rotated by program and rank. Every
    # program then gets the same mix of local and remote rows (contiguous parts of the whole give
    # a quarter of the programs only local rows at EP4, which finish early) and stores each step
    # to its one known destination only; range k is the k-th part of every piece.
    for k in range(CHECKPOINTS):
        for piece in range(NUM_RANKS if BALANCE else 1):
            if BALANCE:
                dest = (piece + pid + rank) % NUM_RANKS
                piece_begin = tl.load(segment_ptr + (dest - 1) * NUM_RANKS + rank, mask=dest > 0, other=0)
                piece_end = tl.minimum(tl.load(segment_ptr + dest * NUM_RANKS + rank), num_rows)
            else:
                piece_begin = 0
                piece_end = num_rows
            range_rows = tl.cdiv(tl.maximum(piece_end - piece_begin, 0), CHECKPOINTS)
            range_begin = piece_begin + k * range_rows
            range_end = tl.minimum(range_begin + range_rows, piece_end)
            chunk = tl.cdiv(tl.cdiv(tl.maximum(range_end - range_begin, 0), grid), ROWS) * ROWS
            begin = range_begin + pid * chunk
            end = tl.minimum(begin + chunk, range_end)
            for first in range(begin, end, ROWS):
                rows = row_offsets.to(tl.int64) + first
                valid = rows < end
                valid2 = valid[:, None]
                # Every load of the step is issued before the first store.
                x = tl.load(x_ptr + rows[:, None] * X_WORDS + x_cols, mask=valid2 & x_mask)
                if HAS_SCALES:
                    scales = tl.load(scales_ptr + rows[:, None] * S_WORDS + s_cols, mask=valid2 & s_mask)
                if HAS_TOPK_IDX:
                    topk_idx = tl.load(
                        topk_idx_ptr + rows[:, None] * NUM_TOPK + k_cols, mask=valid2 & k_mask, other=-1
                    )
                if HAS_TOPK_WEIGHTS:
                    topk_weights = tl.load(
                        topk_weights_ptr + rows[:, None] * NUM_TOPK + k_cols, mask=valid2 & k_mask, other=0.0
                    )
                for step in tl.static_range(1 if BALANCE else NUM_RANKS):
                    if BALANCE:
                        dst = dest
                    else:
                        dst = (step + pid + rank) % NUM_RANKS
                    dst_rows = tl.load(dst_row_ptr + rows * NUM_RANKS + dst, mask=valid, other=-1).to(
                        tl.int64
                    )
                    # Rows past the capacity are left for the host to see in the count table (then it grows
                    # the buffer and every rank pushes again): never write past the area.
                    send = (dst_rows >= 0) & (dst_rows < capacity)
                    send2 = send[:, None]
                    base = _peer(dst, p0, p1, p2, p3, p4, p5, p6, p7) + PAYLOAD_OFFSET
                    tl.store(base + x_offset + dst_rows[:, None] * X_WORDS + x_cols, x, mask=send2 & x_mask)
                    if HAS_SCALES:
                        tl.store(
                            base + scales_offset + dst_rows[:, None] * S_WORDS + s_cols,
                            scales,
                            mask=send2 & s_mask,
                        )
                    if LOCALIZE_TOPK:
                        local_idx = topk_idx - dst * num_local_experts
                        is_local = (topk_idx >= 0) & (local_idx >= 0) & (local_idx < num_local_experts)
                        if HAS_TOPK_IDX:
                            idx_base = (base + topk_idx_offset).to(tl.pointer_type(tl.int64), bitcast=True)
                            tl.store(
                                idx_base + dst_rows[:, None] * NUM_TOPK + k_cols,
                                tl.where(is_local, local_idx, -1),
                                mask=send2 & k_mask,
                            )
                        if HAS_TOPK_WEIGHTS:
                            w_base = (base + topk_weights_offset).to(
                                tl.pointer_type(tl.float32), bitcast=True
                            )
                            tl.store(
                                w_base + dst_rows[:, None] * NUM_TOPK + k_cols,
                                tl.where(is_local, topk_weights, 0.0),
                                mask=send2 & k_mask,
                            )
                    else:
                        if HAS_TOPK_WEIGHTS:
                            w_base = (base + topk_weights_offset).to(
                                tl.pointer_type(tl.float32), bitcast=True
                            )
                            tl.store(
                                w_base + dst_rows[:, None] * NUM_TOPK + k_cols,
                                topk_weights,
                                mask=send2 & k_mask,
                            )
                    if WRITE_SRC_IDX:
                        tl.store(base + src_idx_offset + dst_rows, rows.to(tl.int32), mask=send)
        if PROGRESS:
            # As the exit barrier below: every thread fences its stores, the last program of the
            # range releases the flag for all of them.
            fence_acq_rel_sys()
            tl.debug_barrier()
            done_k = tl.atomic_add(local + CHECKPOINT_COUNTER_OFFSET + k, 1, sem="acq_rel", scope="sys")
            if done_k == grid - 1:
                tl.store(local + CHECKPOINT_COUNTER_OFFSET + k, 0)
                flag = PROGRESS_OFFSET + rank * _MAX_CHECKPOINTS + k
                _release_at_peers(p0, p1, p2, p3, p4, p5, p6, p7, flag, exit_epoch, NUM_RANKS)
    if EXIT:
        # Every thread orders its stores before the count (system scope: the stores went to peers);
        # the last program to count releases the exit flag at every peer, so the release stands for
        # all programs' stores, then waits for every peer's.
        fence_acq_rel_sys()
        tl.debug_barrier()
        done = tl.atomic_add(local + COUNTER_OFFSET, 1, sem="acq_rel", scope="sys")
        if done == grid - 1:
            tl.store(local + COUNTER_OFFSET, 0)  # the next push (later in stream order) counts from 0
            _release_at_peers(p0, p1, p2, p3, p4, p5, p6, p7, FLAG_OFFSET + rank, exit_epoch, NUM_RANKS)
            wait_all_epoch(
                local + FLAG_OFFSET,
                exit_epoch,
                NUM_RANKS,
                timeout_ns,
                error_address.to(tl.pointer_type(tl.int32)),
                exit_code,
                rank,
            )
            if PROGRESS:
                # Every progress flag of this call is now set at every source's (the releases
                # came before the exit flags), unless a wait expired: then set them here, so a copy
                # engine waiting on one never hangs (the host raises the timeout).
                slots = tl.arange(0, _MAX_PEERS * _MAX_CHECKPOINTS)
                tl.store(
                    local + PROGRESS_OFFSET + slots,
                    exit_epoch,
                    mask=(slots // _MAX_CHECKPOINTS < NUM_RANKS) & (slots % _MAX_CHECKPOINTS < CHECKPOINTS),
                )


@dataclass(frozen=True)
class PushRegions:
    """int32-word offsets of the destination regions inside every rank's symmetric buffer."""

    x: int
    scales: int = 0
    topk_idx: int = 0
    topk_weights: int = 0
    src_idx: int = 0


class PushBarriers(NamedTuple):
    """Barriers folded into one push (``SymmetricTransport.push_barriers`` makes them).

    Attributes:
        entry_epoch: epoch of the entry barrier, ``0`` for none (dispatch: the count exchange
            already was one).
        exit_epoch: epoch of the exit barrier (after it every peer's rows have landed here).
        timeout_ns: bound of each wait.
        error_address: address of the host-mapped ``[4]`` int32 error word.
        entry_code, exit_code: operation codes written into the error word on a timeout.
        payload_offset: int32-word offset of the payload in every buffer (regions count from it).
        flag_offset: int32-word offset of the ``MAX_PEERS`` epoch flags in every buffer.
        counter_offset: int32-word offset of this rank's done counter (zero between pushes).
        checkpoints: ``0``: no progress flags. ``1..MAX_CHECKPOINTS``: the rows are pushed in that
            many consecutive ranges; when every program is done with range ``k``, word
            ``progress_offset + rank * MAX_CHECKPOINTS + k`` of every destination gets
            ``exit_epoch`` (``SymmetricTransport.progress_address`` names it for a copy engine).
        progress_offset: int32-word offset of the ``MAX_PEERS x MAX_CHECKPOINTS`` progress flags.
        checkpoint_counter_offset: int32-word offset of this rank's ``MAX_CHECKPOINTS`` per-range
            done counters (zero between pushes).
    """

    entry_epoch: int
    exit_epoch: int
    timeout_ns: int
    error_address: int
    entry_code: int
    exit_code: int
    payload_offset: int
    flag_offset: int
    counter_offset: int
    checkpoints: int = 0
    progress_offset: int = 0
    checkpoint_counter_offset: int = 0


_NO_BARRIERS = PushBarriers(0, 0, 0, 0, 0, 0, 0, 0, 0)


def launch_push_rows(
    peers: list[torch.Tensor] | PeerArgs,
    x_words: torch.Tensor,
    scales_words: torch.Tensor | None,
    topk_idx: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    dst_row: torch.Tensor,
    regions: PushRegions,
    capacity: int,
    rank: int,
    num_local_experts: int,
    localize_topk: bool,
    write_src_idx: bool,
    num_sms: int,
    barriers: PushBarriers | None = None,
    one_destination: bool = False,
    segments: torch.Tensor | None = None,
) -> None:
    """Push each row of ``x_words`` (and its metadata) to ``dst_row[row, dst]`` of every ``dst``.

    Arguments:
        peers: per rank an int32 view of its symmetric buffer (from its start when ``barriers``
            are given, else from wherever the regions count).
        x_words: ``[num_rows, x_words]`` int32, the payload rows as 32-bit words, contiguous.
        scales_words: ``[num_rows, s_words]`` int32 contiguous, or ``None``.
        topk_idx: ``[num_rows, num_topk]`` int64 or ``None``.
        topk_weights: ``[num_rows, num_topk]`` float32 or ``None``.
        dst_row: ``[num_rows, num_ranks]`` int32, destination row at each rank, ``-1`` = none.
        regions: destination region offsets (int32 words, each a multiple of 4).
        capacity: rows each destination area holds; rows at or past it are skipped.
        rank: this rank.
        num_local_experts: experts per rank (for ``localize_topk``).
        localize_topk: rewrite top-k ids relative to the destination, ``-1``/``0.0`` elsewhere.
        write_src_idx: store the source row index (int32) at the destination.
        num_sms: programs to launch (one per SM).
        barriers: entry / exit barriers to fold in (collective then: launched with 0 rows too).
        one_destination: every row has exactly one destination (combine): more rows per step.
        segments: with ``one_destination`` and rows sorted by destination, the ``[num_ranks,
            num_ranks]`` int32 rank prefix matrix of the dispatch handle (rows
            ``[segments[d - 1, rank], segments[d, rank])`` go to rank ``d``): every program then
            pushes an equal part of each destination's rows ("balanced"); ``None``: each program
            pushes one contiguous part of all rows.

    Example:
        Dispatch of 2 tokens to 2 ranks, token 0 to both, token 1 to rank 1 (rank 0 sent 3 rows
        to rank 1 before us): ``dst_row = [[0, 3], [-1, 4]]``.
    """
    num_rows, num_words = x_words.shape
    peer_args = as_peer_args(peers)
    if barriers is None:
        if num_rows == 0:
            return
        barriers = _NO_BARRIERS
    if barriers.checkpoints and (barriers.exit_epoch == 0 or barriers.checkpoints > MAX_CHECKPOINTS):
        raise ValueError(
            f"progress flags need an exit barrier and 1..{MAX_CHECKPOINTS} checkpoints; "
            f"got {barriers.checkpoints} checkpoints, exit epoch {barriers.exit_epoch}"
        )
    if segments is not None and not one_destination:
        raise ValueError("a balanced push (segments) needs rows with one destination each")
    for name, offset in vars(regions).items():
        if offset % 4 != 0:
            raise ValueError(f"region {name} offset {offset} must be a multiple of 4 words (16 bytes)")
    num_topk = (
        topk_idx.size(1)
        if topk_idx is not None
        else (topk_weights.size(1) if topk_weights is not None else 1)
    )
    s_words = scales_words.size(1) if scales_words is not None else 1
    launch(
        push_rows_kernel,
        (max(1, min(num_sms, num_rows)),),
        (
            x_words,
            scales_words if scales_words is not None else x_words,
            topk_idx if topk_idx is not None else dst_row,
            topk_weights if topk_weights is not None else x_words,
            dst_row,
            segments if segments is not None else dst_row,
            num_rows,
            rank,
            num_local_experts,
            capacity,
            regions.x,
            regions.scales,
            regions.topk_idx,
            regions.topk_weights,
            regions.src_idx,
            barriers.entry_epoch,
            barriers.exit_epoch,
            barriers.timeout_ns,
            barriers.error_address,
            barriers.entry_code,
            barriers.exit_code,
        ),
        {
            "NUM_RANKS": peer_args.num_ranks,
            "X_WORDS": num_words,
            "X_BLOCK": next_pow2(num_words),
            "S_WORDS": s_words,
            "S_BLOCK": next_pow2(s_words),
            "NUM_TOPK": num_topk,
            "K_BLOCK": next_pow2(num_topk),
            "HAS_SCALES": scales_words is not None,
            "HAS_TOPK_IDX": topk_idx is not None,
            "HAS_TOPK_WEIGHTS": topk_weights is not None,
            "LOCALIZE_TOPK": localize_topk,
            "ROWS": push_rows_per_step(num_words + s_words, one_destination),
            "WRITE_SRC_IDX": write_src_idx,
            "PAYLOAD_OFFSET": barriers.payload_offset,
            "FLAG_OFFSET": barriers.flag_offset,
            "COUNTER_OFFSET": barriers.counter_offset,
            "ENTRY": barriers.entry_epoch != 0,
            "EXIT": barriers.exit_epoch != 0,
            "CHECKPOINTS": max(1, barriers.checkpoints),
            "PROGRESS": barriers.checkpoints > 0,
            "PROGRESS_OFFSET": barriers.progress_offset,
            "CHECKPOINT_COUNTER_OFFSET": barriers.checkpoint_counter_offset,
            "BALANCE": segments is not None,
        },
        PUSH_WARPS,
        peer_args,
    )
