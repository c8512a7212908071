"""Normal mode: push rows into peers' symmetric buffers, each byte written once into its final row.

Used by dispatch (a token row goes to every rank in ``is_token_in_rank``, with its top-k ids made
local to that rank) and by combine (an expert-output row goes back to its token's rank). Each
program owns a contiguous range of rows and takes ``ROWS`` of them per step, loads all of them
(every load in flight before the first store: the compiler cannot hoist a load above a store that
may alias it), then stores them to every destination, visiting destinations in an order rotated by
program and rank so that no peer is written by everyone at once (EP4 push: 205 -> 261-287 GB/s,
docs/performance.md).

The barriers around a push are folded into it (``PushBarriers``): with an entry barrier, program 0
releases this rank's entry flag at every peer and every program waits for all peers' flags before
its first store; with an exit barrier, every program fences its stores and counts itself done, and
the last one releases the exit flag at every peer and waits for theirs. One launch instead of three.

The entry barrier also carries the call's fingerprint (``PushFingerprint``; cached dispatch and
combine): program 0 writes this rank's words into row ``rank`` of the fingerprint rows of every
peer's buffer (the place where dispatch's count exchange puts them, so a dispatch meeting a cached
dispatch or a combine sees the other's call) before it releases the entry flag there, so a peer
that sees the flag sees the words. After the wait every program compares every peer's words with
this rank's; on any difference no program writes a row (every rank sees a difference then: nothing
moves anywhere), the ``PushFingerprint.fills`` are filled (so what follows reads no stale row), and
program 0 records every rank's words in host-mapped memory with the entry epoch, unless a record is
there already (the host clears it once it has raised). The exit barrier runs as always.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from epcomm._math import next_pow2
from epcomm.fingerprint import FINGERPRINT_WORDS
from epcomm.kernels.launch import launch
from epcomm.kernels.normal_rows import FINGERPRINT_ARGS, fingerprint_vector
from epcomm.kernels.primitives import (
    HOISTED_PEERS,
    fence_acq_rel_sys,
    peer_pointer,
    release_at_peers,
    store_remote,
    wait_all_epoch,
)
from epcomm.kernels.symmetric_peers import SymmetricPeers

__all__ = [
    "PushBarriers",
    "PushFingerprint",
    "PushRegions",
    "launch_push_rows",
    "push_record_words",
    "push_rows_per_step",
]

# Words filled per program step on a fingerprint difference (the error path only).
_FILL_BLOCK = tl.constexpr(1024)


def push_record_words(num_ranks: int) -> int:
    """int32 words of the host-mapped record a push writes on a fingerprint difference: word 0 the
    entry epoch of that call (written last; 0: no record), then ``num_ranks`` rows of
    ``FINGERPRINT_WORDS`` words (row ``s``: rank ``s``'s words, this rank's own included)."""
    return 1 + num_ranks * FINGERPRINT_WORDS


# Bytes of row loads in flight per program step: 2 rows of BF16 hidden 7168 measured best at EP4
# (rows per step 1 / 2 / 4: push 2 rows fastest, docs/performance.md); as many bytes for smaller
# rows (FP8: 4 rows, EP1 dispatch FP8 GPU time 94.8 -> 75.7 us), twice as many when each row has
# one destination (combine: a step stores what it loads once; EP1 combine 130 -> 116.5 us).
PUSH_STEP_BYTES = 2 * 7168 * 2


def push_rows_per_step(row_words: int, one_destination: bool, forced: int = 0) -> int:
    """Rows per step of ``push_rows_kernel`` for rows of ``row_words`` int32 words (payload and
    scales): ``forced`` if non-zero (``Settings.push_rows``), else ``PUSH_STEP_BYTES`` (doubled for
    rows with one destination each) worth of rows, a power of two from 2 to 8."""
    if forced:
        return forced
    step_bytes = PUSH_STEP_BYTES * (2 if one_destination else 1)
    return min(8, max(2, next_pow2(-(-step_bytes // (4 * row_words)))))


@triton.jit
def _fill(pointer, num_words, value):
    """``value`` into ``pointer[0 : num_words]`` (int32), spread over the grid."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.arange(0, _FILL_BLOCK)
    for start in range(pid * _FILL_BLOCK, num_words, grid * _FILL_BLOCK):
        tl.store(
            pointer + start + cols, tl.zeros([_FILL_BLOCK], tl.int32) + value, mask=start + cols < num_words
        )


@triton.jit
def _compare_fingerprints(
    slots,
    fingerprint,
    record_address,
    epoch,
    fill0_ptr,
    fill0_words,
    fill0_value,
    fill1_ptr,
    fill1_words,
    fill1_value,
    rank,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    FP_WORDS: tl.constexpr,
):
    """After the entry wait: whether every peer's fingerprint row at ``slots`` (``[NUM_RANKS,
    FP_WORDS]`` in this rank's buffer) equals ``fingerprint``. On a difference, fill the two ranges
    and (program 0, if the record is free) write every rank's words into the host-mapped record
    (``push_record_words``), then ``epoch`` into its word 0."""
    sources = tl.arange(0, R_BLOCK)
    cols = tl.arange(0, FP_WORDS)
    peers = (sources < NUM_RANKS) & (sources != rank)
    # volatile: never a stale cached line of an earlier call's words.
    theirs = tl.load(
        slots + sources[:, None] * FP_WORDS + cols[None, :], mask=peers[:, None], other=0, volatile=True
    )
    differing = ((theirs != fingerprint[None, :]) & peers[:, None]).to(tl.int32)
    agree = tl.sum(tl.sum(differing, axis=1), axis=0) == 0
    if not agree:
        _fill(fill0_ptr, fill0_words, fill0_value)
        _fill(fill1_ptr, fill1_words, fill1_value)
        if tl.program_id(0) == 0:
            record = record_address.to(tl.pointer_type(tl.int32))
            # The host clears word 0 once it has raised: an earlier record it has not read yet
            # stays (masked stores, no branch: every thread passes the barrier below).
            free = tl.load(record, volatile=True) == 0
            rows = tl.where(sources[:, None] == rank, fingerprint[None, :], theirs)
            tl.store(
                record + 1 + sources[:, None] * FP_WORDS + cols[None, :],
                rows,
                mask=(sources < NUM_RANKS)[:, None] & free,
            )
            tl.debug_barrier()
            tl.atomic_xchg(record, epoch, sem="release", scope="sys", mask=free)
    return agree


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
        "flag_offset",
        "counter_offset",
        "fp_offset",
        "record_address",
        "fill0_words",
        "fill0_value",
        "fill1_words",
        "fill1_value",
        *FINGERPRINT_ARGS,
    ]
)
def push_rows_kernel(
    peer_table,
    x_ptr,
    scales_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    dst_row_ptr,
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
    flag_offset,
    counter_offset,
    fp_offset,
    record_address,
    fill0_ptr,
    fill0_words,
    fill0_value,
    fill1_ptr,
    fill1_words,
    fill1_value,
    fp0,
    fp1,
    fp2,
    fp3,
    fp4,
    fp5,
    fp6,
    fp7,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
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
    ENTRY: tl.constexpr,
    EXIT: tl.constexpr,
    FINGERPRINT: tl.constexpr,
    FP_WORDS: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    local = peer_pointer(peer_table, rank)
    error_pointer = error_address.to(tl.pointer_type(tl.int32))
    if ENTRY:
        # Our previous readers of this area are done (stream order): tell every peer, then wait
        # until every peer says the same of its area before writing into it. With FINGERPRINT the
        # call's words go to every peer first (the release below orders them before the flag).
        if FINGERPRINT:
            fp_cols = tl.arange(0, FP_WORDS)
            fingerprint = fingerprint_vector(fp0, fp1, fp2, fp3, fp4, fp5, fp6, fp7)
            if pid == 0:
                for peer in range(NUM_RANKS):
                    store_remote(
                        peer_pointer(peer_table, peer) + fp_offset + rank * FP_WORDS + fp_cols, fingerprint
                    )
        if pid == 0:
            release_at_peers(peer_table, flag_offset + rank, entry_epoch, NUM_RANKS)
        wait_all_epoch(
            local + flag_offset, entry_epoch, timeout_ns, error_pointer, entry_code, rank, NUM_RANKS, R_BLOCK
        )
        if FINGERPRINT:
            agree = _compare_fingerprints(
                local + fp_offset,
                fingerprint,
                record_address,
                entry_epoch,
                fill0_ptr,
                fill0_words,
                fill0_value,
                fill1_ptr,
                fill1_words,
                fill1_value,
                rank,
                NUM_RANKS,
                R_BLOCK,
                FP_WORDS,
            )
    x_cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, X_BLOCK), X_BLOCK), X_BLOCK)[None, :]
    x_mask = x_cols < X_WORDS
    s_cols = tl.arange(0, S_BLOCK)[None, :]
    s_mask = s_cols < S_WORDS
    k_cols = tl.arange(0, K_BLOCK)[None, :]
    k_mask = k_cols < NUM_TOPK
    row_offsets = tl.arange(0, ROWS)
    # The destinations' buffer addresses, loaded once per program (a table load inside the row loop
    # cannot be hoisted above the previous step's stores: EP1 cached-dispatch push 72 -> 104 us).
    # Past HOISTED_PEERS destinations they are loaded per step instead, to keep registers free.
    bases = ()
    if NUM_RANKS <= HOISTED_PEERS:
        for step in tl.static_range(NUM_RANKS):
            bases = bases + (peer_pointer(peer_table, (step + pid + rank) % NUM_RANKS),)
    # Each program owns one contiguous part of the rows. Combine rows are sorted by destination,
    # so strided parts had every program writing to the same peer at once (incast); contiguous
    # parts spread the programs over the destinations.
    chunk = tl.cdiv(tl.cdiv(num_rows, grid), ROWS) * ROWS
    begin = pid * chunk
    end = tl.minimum(begin + chunk, num_rows)
    if ENTRY:
        if FINGERPRINT:
            end = tl.where(agree, end, begin)  # a peer made another call: no row moves
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
        for step in tl.static_range(NUM_RANKS):
            dst = (step + pid + rank) % NUM_RANKS
            dst_rows = tl.load(dst_row_ptr + rows * NUM_RANKS + dst, mask=valid, other=-1).to(tl.int64)
            # Rows past the capacity are left for the host to see in the count table (then it grows
            # the buffer and every rank pushes again): never write past the area.
            send = (dst_rows >= 0) & (dst_rows < capacity)
            send2 = send[:, None]
            if NUM_RANKS <= HOISTED_PEERS:
                base = bases[step]
            else:
                base = peer_pointer(peer_table, dst)
            store_remote(base + x_offset + dst_rows[:, None] * X_WORDS + x_cols, x, send2 & x_mask)
            if HAS_SCALES:
                store_remote(
                    base + scales_offset + dst_rows[:, None] * S_WORDS + s_cols, scales, send2 & s_mask
                )
            if LOCALIZE_TOPK:
                local_idx = topk_idx - dst * num_local_experts
                is_local = (topk_idx >= 0) & (local_idx >= 0) & (local_idx < num_local_experts)
                if HAS_TOPK_IDX:
                    idx_base = (base + topk_idx_offset).to(tl.pointer_type(tl.int64), bitcast=True)
                    store_remote(
                        idx_base + dst_rows[:, None] * NUM_TOPK + k_cols,
                        tl.where(is_local, local_idx, -1),
                        send2 & k_mask,
                    )
                if HAS_TOPK_WEIGHTS:
                    w_base = (base + topk_weights_offset).to(tl.pointer_type(tl.float32), bitcast=True)
                    store_remote(
                        w_base + dst_rows[:, None] * NUM_TOPK + k_cols,
                        tl.where(is_local, topk_weights, 0.0),
                        send2 & k_mask,
                    )
            else:
                if HAS_TOPK_WEIGHTS:
                    w_base = (base + topk_weights_offset).to(tl.pointer_type(tl.float32), bitcast=True)
                    store_remote(w_base + dst_rows[:, None] * NUM_TOPK + k_cols, topk_weights, send2 & k_mask)
            if WRITE_SRC_IDX:
                store_remote(base + src_idx_offset + dst_rows, rows.to(tl.int32), send)
    if EXIT:
        # Every thread orders its stores before the count (system scope: the stores went to peers);
        # the last program to count releases the exit flag at every peer, so the release stands for
        # all programs' stores, then waits for every peer's.
        fence_acq_rel_sys()
        tl.debug_barrier()
        done = tl.atomic_add(local + counter_offset, 1, sem="acq_rel", scope="sys")
        if done == grid - 1:
            tl.store(local + counter_offset, 0)  # the next push (later in stream order) counts from 0
            release_at_peers(peer_table, flag_offset + rank, exit_epoch, NUM_RANKS)
            wait_all_epoch(
                local + flag_offset,
                exit_epoch,
                timeout_ns,
                error_pointer,
                exit_code,
                rank,
                NUM_RANKS,
                R_BLOCK,
            )


@dataclass(frozen=True)
class PushRegions:
    """int32-word offsets, from word 0 of every rank's symmetric buffer, of the destination regions
    (each a multiple of 4: 16-byte aligned)."""

    x: int
    scales: int = 0
    topk_idx: int = 0
    topk_weights: int = 0
    src_idx: int = 0


class PushBarriers(NamedTuple):
    """Barriers folded into one push.

    Attributes:
        entry_epoch: epoch of the entry barrier, ``0`` for none (dispatch: the count exchange
            already was one).
        exit_epoch: epoch of the exit barrier (after it every peer's rows have landed here).
        entry_code, exit_code: operation codes written into the error word on a timeout.
    """

    entry_epoch: int
    exit_epoch: int
    entry_code: int
    exit_code: int


_NO_BARRIERS = PushBarriers(0, 0, 0, 0)


class PushFingerprint(NamedTuple):
    """The call fingerprint a push with an entry barrier exchanges (the module docstring).

    Attributes:
        words: this call's ``FINGERPRINT_WORDS`` words, each in ``[0, 2**31)``.
        slots: int32-word offset, in every rank's buffer, of the ``[num_ranks, FINGERPRINT_WORDS]``
            fingerprint rows (row ``s``: rank ``s``'s words).
        record_address: address of a host-mapped int32 buffer of ``push_record_words(num_ranks)``
            words, word 0 zero while free (the host clears it after reading a record).
        fills: up to two ``(tensor, value)``: on a difference each contiguous int32 tensor is
            filled with ``value`` (its whole ``numel``) before the kernel ends, so the kernels that
            follow read no stale row (combine: the token slots with ``-1``; cached dispatch: the
            received rows with 0).
    """

    words: Sequence[int]
    slots: int
    record_address: int
    fills: tuple[tuple[torch.Tensor, int], ...] = ()


def launch_push_rows(
    *,
    peers: SymmetricPeers,
    x_words: torch.Tensor,
    dst_row: torch.Tensor,
    regions: PushRegions,
    capacity: int,
    num_sms: int,
    num_warps: int,
    rows_per_step: int = 0,
    scales_words: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    num_local_experts: int = 1,
    localize_topk: bool = False,
    write_src_idx: bool = False,
    barriers: PushBarriers | None = None,
    one_destination: bool = False,
    fingerprint: PushFingerprint | None = None,
) -> None:
    """Push each row of ``x_words`` (and its metadata) to ``dst_row[row, dst]`` of every ``dst``.

    Arguments:
        peers: the peer table, rank, timeout, error word, flag and counter offsets.
        x_words: ``[num_rows, x_words]`` int32, the payload rows as 32-bit words, contiguous.
        dst_row: ``[num_rows, num_ranks]`` int32, destination row at each rank, ``-1`` = none.
        regions: destination region offsets (int32 words from every buffer's start).
        capacity: rows each destination area holds; rows at or past it are skipped.
        num_sms: programs to launch (one per SM).
        num_warps: warps per program (``Settings.push_warps``).
        rows_per_step: rows in flight per program step, ``0``: ``push_rows_per_step``'s rule.
        scales_words: ``[num_rows, s_words]`` int32 contiguous, or ``None``.
        topk_idx: ``[num_rows, num_topk]`` int64 or ``None``.
        topk_weights: ``[num_rows, num_topk]`` float32 or ``None``.
        num_local_experts: experts per rank (for ``localize_topk``).
        localize_topk: rewrite top-k ids relative to the destination, ``-1``/``0.0`` elsewhere.
        write_src_idx: store the source row index (int32) at the destination.
        barriers: entry / exit barriers to fold in (collective then: launched with 0 rows too).
        one_destination: every row has exactly one destination (combine): more rows per step.
        fingerprint: the call's fingerprint, exchanged in the entry barrier (which ``barriers``
            must then have) and compared before any row moves (``PushFingerprint``).

    Example:
        Dispatch of 2 tokens to 2 ranks, token 0 to both, token 1 to rank 1 (rank 0 sent 3 rows
        to rank 1 before us): ``dst_row = [[0, 3], [-1, 4]]``.
    """
    num_rows, num_words = x_words.shape
    if barriers is None:
        if num_rows == 0:
            return
        barriers = _NO_BARRIERS
    if dst_row.shape != (num_rows, peers.num_ranks):
        raise ValueError(f"dst_row must be [{num_rows}, {peers.num_ranks}]; got {list(dst_row.shape)}")
    for name, offset in vars(regions).items():
        if offset % 4 != 0:
            raise ValueError(f"region {name} offset {offset} must be a multiple of 4 words (16 bytes)")
    num_topk = (
        topk_idx.size(1)
        if topk_idx is not None
        else (topk_weights.size(1) if topk_weights is not None else 1)
    )
    s_words = scales_words.size(1) if scales_words is not None else 1
    words = [0] * FINGERPRINT_WORDS
    # (tensor, words to fill, value): unused slots point at dst_row and fill nothing.
    fills: list[tuple[torch.Tensor, int, int]] = []
    slots = record_address = 0
    if fingerprint is not None:
        if barriers.entry_epoch == 0:
            raise ValueError("a push exchanges a fingerprint only in its entry barrier")
        words = [int(word) for word in fingerprint.words]
        if len(words) != FINGERPRINT_WORDS or not all(0 <= word < 2**31 for word in words):
            raise ValueError(f"fingerprint must be {FINGERPRINT_WORDS} words in [0, 2**31); got {words}")
        if len(fingerprint.fills) > 2:
            raise ValueError(f"at most 2 fills; got {len(fingerprint.fills)}")
        for tensor, value in fingerprint.fills:
            if tensor.dtype != torch.int32 or not tensor.is_contiguous():
                raise ValueError("fills must be contiguous int32 tensors")
            fills.append((tensor, tensor.numel(), value))
        slots, record_address = fingerprint.slots, fingerprint.record_address
    fills += [(dst_row, 0, 0)] * (2 - len(fills))
    launch(
        push_rows_kernel,
        (max(1, min(num_sms, num_rows)),),
        (
            peers.peer_table,
            x_words,
            scales_words if scales_words is not None else x_words,
            topk_idx if topk_idx is not None else dst_row,
            topk_weights if topk_weights is not None else x_words,
            dst_row,
            num_rows,
            peers.rank,
            num_local_experts,
            capacity,
            regions.x,
            regions.scales,
            regions.topk_idx,
            regions.topk_weights,
            regions.src_idx,
            barriers.entry_epoch,
            barriers.exit_epoch,
            peers.timeout_ns,
            peers.error_address,
            barriers.entry_code,
            barriers.exit_code,
            peers.flag_offset,
            peers.counter_offset,
            slots,
            record_address,
            *fills[0],
            *fills[1],
            *words,
        ),
        {
            "NUM_RANKS": peers.num_ranks,
            "R_BLOCK": peers.flag_block,
            "X_WORDS": num_words,
            "X_BLOCK": next_pow2(num_words),
            "S_WORDS": s_words,
            "S_BLOCK": next_pow2(s_words),
            "NUM_TOPK": num_topk,
            "K_BLOCK": next_pow2(num_topk),
            "ROWS": push_rows_per_step(num_words + s_words, one_destination, rows_per_step),
            "HAS_SCALES": scales_words is not None,
            "HAS_TOPK_IDX": topk_idx is not None,
            "HAS_TOPK_WEIGHTS": topk_weights is not None,
            "LOCALIZE_TOPK": localize_topk,
            "WRITE_SRC_IDX": write_src_idx,
            "ENTRY": barriers.entry_epoch != 0,
            "EXIT": barriers.exit_epoch != 0,
            "FINGERPRINT": fingerprint is not None,
            "FP_WORDS": FINGERPRINT_WORDS,
        },
        num_warps,
    )
