"""Normal-mode combine, receive side: sum the rows peers pushed back for each token.

For token ``t`` the row from rank ``j`` sits at ``slot[t, j]`` of this rank's symmetric combine
area. The sum runs in float32 in rank order 0..R-1 (the reference backend's order, so results are
bitwise equal to it and identical across runs), then the biases, then one bf16 write.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from epcomm.kernels.launch import launch, next_pow2
from epcomm.kernels.primitives import wait_flags

__all__ = [
    "REDUCE_TOKENS",
    "REDUCE_WARPS",
    "ReduceProgress",
    "combine_overlap",
    "launch_combine_reduce",
    "overlap_reduce_sms",
]

# Tokens reduced per program step: enough that ~16 rows are in flight per program (EP4 prefill at
# 24 SMs, scripts/sweep_reduce.py: 1 / 2 / 4 tokens per step 306 / 300 / 153 us); 0 = that rule,
# any other value forces it (``EPCOMM_REDUCE_TOKENS``, for side-by-side runs).
REDUCE_TOKENS = int(os.environ.get("EPCOMM_REDUCE_TOKENS", "0"))
REDUCE_WARPS = int(os.environ.get("EPCOMM_REDUCE_WARPS", "16"))


def combine_overlap() -> int:
    """``EPCOMM_COMBINE_OVERLAP``: ``0`` (default) reduces after the combine push; ``1..8`` runs
    the reduce beside the push on its own stream and part of the SMs (``overlap_reduce_sms``),
    reducing tokens as the push's progress flags say their rows have landed, the push being
    balanced over destinations in that many ranges. Off by default until measured on several
    GPUs: at EP1 the push is local and short, so splitting the SMs cannot win there."""
    text = os.environ.get("EPCOMM_COMBINE_OVERLAP", "0").strip()
    if not text.isdigit() or not 0 <= int(text) <= 8:
        raise ValueError(f"EPCOMM_COMBINE_OVERLAP must be 0..8 progress ranges; got {text!r}")
    return int(text)


def overlap_reduce_sms(num_sms: int) -> int:
    """Programs of a reduce beside the push out of ``num_sms`` (the push gets the rest):
    ``EPCOMM_COMBINE_REDUCE_SMS`` if set, else a third (at least 1, leaving the push 1)."""
    text = os.environ.get("EPCOMM_COMBINE_REDUCE_SMS", "0").strip()
    if not text.isdigit():
        raise ValueError(f"EPCOMM_COMBINE_REDUCE_SMS must be a number of SMs (0: a third); got {text!r}")
    wanted = int(text) or num_sms // 3
    return max(1, min(wanted, num_sms - 1))


class ReduceProgress(NamedTuple):
    """How a reduce that runs beside the combine push knows which rows have landed.

    The push was balanced (``launch_push_rows(segments=...)``) with ``checkpoints`` progress ranges:
    when source ``s`` is done with its range ``k`` of every destination's rows, word
    ``progress_address + 4 * (s * max_checkpoints + k)`` of this rank's buffer holds ``epoch``.

    Attributes:
        checkpoints: progress ranges of the push (1..``max_checkpoints``).
        max_checkpoints: flags per source in the flag table.
        rank_prefix: ``[num_ranks, num_ranks]`` int32, the dispatch handle's rank prefix matrix.
        progress_address: byte address of this rank's ``[num_ranks, max_checkpoints]`` int32 flags.
        rank: this rank.
        epoch: the push's exit epoch (the value its progress flags get).
        timeout_ns: bound of each wait.
        error_address: address of the host-mapped ``[4]`` int32 error word.
        error_code: operation code written into it on a timeout.
    """

    checkpoints: int
    max_checkpoints: int
    rank_prefix: torch.Tensor
    progress_address: int
    rank: int
    epoch: int
    timeout_ns: int
    error_address: int
    error_code: int


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


@triton.jit
def _source_ranges(prefix_ptr, rank, NUM_RANKS: tl.constexpr, CHECKPOINTS: tl.constexpr):
    """``(offset [8], range_rows [8])``: source ``s`` pushed this rank's rows in CHECKPOINTS equal
    ranges of ``range_rows[s]`` rows of its piece for us (a balanced push), landing at rows
    ``[offset[s], offset[s] + n[s])`` of our area in token order (``n``: rows we sent it)."""
    sources = tl.arange(0, 8)
    in_ranks = sources < NUM_RANKS
    cur = tl.load(prefix_ptr + rank * NUM_RANKS + sources, mask=in_ranks, other=0)
    prev = tl.load(prefix_ptr + (rank - 1) * NUM_RANKS + sources, mask=in_ranks & (rank > 0), other=0)
    n = cur - prev
    return tl.cumsum(n, 0) - n, tl.maximum(tl.cdiv(n, CHECKPOINTS), 1)


@triton.jit
def _wait_block(
    slot_ptr,
    tokens,
    valid,
    offset,
    range_rows,
    progress_address,
    rank,
    epoch,
    timeout_ns,
    error_address,
    error_code,
    known,
    NUM_RANKS: tl.constexpr,
    CHECKPOINTS: tl.constexpr,
    MAX_CHECKPOINTS: tl.constexpr,
):
    """Wait until every row of ``tokens`` has landed: for each source, the progress flag of the
    push range holding the block's last row from it (``_source_ranges``). ``known[s]`` is the
    highest range of source ``s`` already seen complete (ranges complete in order); returns it
    updated (past every range after an expired wait, so one missing peer costs one timeout, not
    one per block)."""
    sources = tl.arange(0, 8)
    in_ranks = sources < NUM_RANKS
    slots = tl.load(
        slot_ptr + tokens[:, None] * NUM_RANKS + sources[None, :],
        mask=valid[:, None] & in_ranks[None, :],
        other=-1,
    )
    needed = tl.max(tl.where(slots >= 0, (slots - offset[None, :]) // range_rows[None, :], -1), 0)
    waited_on = needed > known
    if tl.max(waited_on.to(tl.int32), 0) > 0:
        flags = progress_address.to(tl.pointer_type(tl.int32)) + sources * MAX_CHECKPOINTS
        missing, _, _ = wait_flags(
            flags + tl.maximum(needed, 0),
            waited_on,
            epoch,
            timeout_ns,
            error_address.to(tl.pointer_type(tl.int32)),
            error_code,
            rank,
            False,
        )
        known = tl.where(waited_on, needed, known)
        if tl.max(missing.to(tl.int32), 0) > 0:
            known = known + CHECKPOINTS
    # Every thread reads rows after the polling threads' acquire.
    tl.debug_barrier()
    return known


# num_tokens stays unspecialized for speed, not only for fewer compilations: specialized (a multiple
# of 16), ptxas schedules fewer row loads ahead of the adds (86 instead of 101 registers) and the
# EP4-shape reduce takes twice as long (24 programs: 302 vs 151 us; docs/performance.md, session 7).
@triton.jit(
    do_not_specialize=[
        "num_tokens",
        "progress_address",
        "rank",
        "epoch",
        "timeout_ns",
        "error_address",
        "error_code",
    ]
)
def combine_reduce_kernel(
    area_x_ptr,
    area_weights_ptr,
    slot_ptr,
    bias0_ptr,
    bias1_ptr,
    out_x_ptr,
    out_weights_ptr,
    num_tokens,
    prefix_ptr,
    progress_address,
    rank,
    epoch,
    timeout_ns,
    error_address,
    error_code,
    NUM_RANKS: tl.constexpr,
    HIDDEN: tl.constexpr,
    H_BLOCK: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    TOKENS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    NUM_BIAS: tl.constexpr,
    CHECKPOINTS: tl.constexpr,
    MAX_CHECKPOINTS: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, H_BLOCK), H_BLOCK), H_BLOCK)[None, :]
    mask = cols < HIDDEN
    k_cols = tl.arange(0, K_BLOCK)[None, :]
    k_mask = k_cols < NUM_TOPK
    token_offsets = tl.arange(0, TOKENS)
    known = tl.full([8], -1, dtype=tl.int32)
    offset = known  # of each source's rows in our area, and its range size: beside the push only
    range_rows = known
    if CHECKPOINTS > 0:
        offset, range_rows = _source_ranges(prefix_ptr, rank, NUM_RANKS, CHECKPOINTS)
    # TOKENS consecutive tokens per step, every rank's rows as masked loads with no branches (adding
    # the +0.0 of a missing row changes no bit of the sum, which starts at +0.0 like the
    # reference's). Loading all ranks' rows into separate variables before the first add measured
    # the same (scripts/sweep_reduce.py: 152.8 vs 152.6 us), so the plain loop stays.
    for first in range(pid * TOKENS, num_tokens, grid * TOKENS):
        tokens = token_offsets.to(tl.int64) + first
        valid = tokens < num_tokens
        if CHECKPOINTS > 0:
            # Running beside the push (ReduceProgress): reduce these tokens once their rows are in.
            known = _wait_block(
                slot_ptr, tokens, valid, offset, range_rows, progress_address, rank, epoch, timeout_ns,
                error_address, error_code, known, NUM_RANKS, CHECKPOINTS, MAX_CHECKPOINTS,
            )  # fmt: skip
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
    area_x: torch.Tensor,
    area_weights: torch.Tensor | None,
    slot: torch.Tensor,
    bias: tuple[torch.Tensor, ...],
    out_x: torch.Tensor,
    out_weights: torch.Tensor | None,
    num_sms: int,
    progress: ReduceProgress | None = None,
) -> None:
    """Reduce the pushed-back rows into ``out_x`` (and the weights into ``out_weights``).

    With ``progress`` the reduce may start before the push has finished (on another stream): it
    reduces each block of tokens once the progress flags say their rows have landed, in token
    order, with the same sums (bitwise) as after the push.

    Arguments:
        area_x: ``[capacity, hidden]`` bf16 view of this rank's symmetric combine area.
        area_weights: ``[capacity, num_topk]`` float32 view, or ``None``.
        slot: ``[num_tokens, num_ranks]`` int32, row of the ``(token, rank)`` contribution, ``-1`` = none.
        bias: 0, 1 or 2 contiguous ``[num_tokens, hidden]`` bf16 tensors.
        out_x: ``[num_tokens, hidden]`` bf16 result.
        out_weights: ``[num_tokens, num_topk]`` float32 result, or ``None``.
        num_sms: programs to launch.
        progress: progress flags to wait on (a reduce beside the push), or ``None`` (after it).
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
            progress.rank_prefix if progress is not None else slot,
            progress.progress_address if progress is not None else 0,
            progress.rank if progress is not None else 0,
            progress.epoch if progress is not None else 0,
            progress.timeout_ns if progress is not None else 0,
            progress.error_address if progress is not None else 0,
            progress.error_code if progress is not None else 0,
        ),
        {
            "NUM_RANKS": slot.size(1),
            "HIDDEN": hidden,
            "H_BLOCK": next_pow2(hidden),
            "NUM_TOPK": num_topk,
            "K_BLOCK": next_pow2(num_topk),
            "TOKENS": REDUCE_TOKENS or max(1, min(8, 16 // next_pow2(slot.size(1)))),
            "HAS_WEIGHTS": out_weights is not None,
            "NUM_BIAS": len(bias),
            "CHECKPOINTS": progress.checkpoints if progress is not None else 0,
            "MAX_CHECKPOINTS": progress.max_checkpoints if progress is not None else 8,
        },
        REDUCE_WARPS,
    )
