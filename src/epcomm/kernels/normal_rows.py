"""Normal mode: where every row goes, computed on the device in one launch per operation.

``dispatch_rows_kernel`` turns the exchanged count table into the rank prefix matrix, the receive
count and, for each (token, destination rank), the row it lands in at that rank (source ranks in
order, then tokens in order: DeepEP's receive order). ``combine_rows_kernel`` derives from a
dispatch handle where each received row goes back (expert side) and where each token finds the
rows sent back to it (token side). Both replace a dozen small torch ops on the host's critical
path; ``epcomm.layout.rows_in_order`` is the definition they are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm.kernels.launch import cdiv, launch, next_pow2

__all__ = ["launch_combine_rows", "launch_dispatch_rows"]

_T_BLOCK = 1024


@triton.jit(do_not_specialize=["num_tokens", "rank"])
def dispatch_rows_kernel(
    in_rank_ptr,
    table_ptr,
    recv_row_ptr,
    rank_prefix_ptr,
    num_recv_ptr,
    num_tokens,
    rank,
    NUM_RANKS: tl.constexpr,
    NUM_COUNTS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    T_BLOCK: tl.constexpr,
):
    # One program per destination rank j.
    j = tl.program_id(0)
    sources = tl.arange(0, R_BLOCK)
    # Column j of the table: rows each source rank sends to j (written by peers before the barrier
    # kernel that preceded this one; volatile loads never see a stale cached line).
    sent = tl.load(table_ptr + sources * NUM_COUNTS + j, mask=sources < NUM_RANKS, other=0, volatile=True)
    prefix = tl.cumsum(sent, 0)
    tl.store(rank_prefix_ptr + sources * NUM_RANKS + j, prefix, mask=sources < NUM_RANKS)
    if j == rank:
        tl.store(num_recv_ptr, tl.sum(sent, 0))
    carry = tl.sum(tl.where(sources < rank, sent, 0), 0)
    for start in range(0, num_tokens, T_BLOCK):
        tokens = tl.arange(0, T_BLOCK) + start
        inside = tokens < num_tokens
        hit = (tl.load(in_rank_ptr + tokens * NUM_RANKS + j, mask=inside, other=0) != 0).to(tl.int32)
        position = tl.cumsum(hit, 0) + carry - 1
        tl.store(recv_row_ptr + tokens * NUM_RANKS + j, tl.where(hit != 0, position, -1), mask=inside)
        carry += tl.sum(hit, 0)


def launch_dispatch_rows(
    is_token_in_rank: torch.Tensor,
    table: torch.Tensor,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a dispatch from the exchanged count table, on the current stream.

    Arguments:
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, contiguous.
        table: ``[num_ranks, num_counts]`` int32 (contiguous rows): row ``s`` starts with the
            number of tokens rank ``s`` sends to each rank.
        rank: this rank.

    Returns:
        ``recv_row_of_token [num_tokens, num_ranks]`` int32 (row at each destination, ``-1`` = not
        sent), ``rank_prefix_matrix [num_ranks, num_ranks]`` int32 (inclusive prefix over source
        ranks) and ``num_recv_tokens [1]`` int32 (rows this rank receives).
    """
    num_tokens, num_ranks = is_token_in_rank.shape
    device = is_token_in_rank.device
    recv_row = torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=device)
    rank_prefix = torch.empty(num_ranks, num_ranks, dtype=torch.int32, device=device)
    num_recv = torch.empty(1, dtype=torch.int32, device=device)
    launch(
        dispatch_rows_kernel,
        (num_ranks,),
        (
            is_token_in_rank.view(torch.int8),
            table,
            recv_row,
            rank_prefix,
            num_recv,
            num_tokens,
            rank,
        ),
        {
            "NUM_RANKS": num_ranks,
            "NUM_COUNTS": table.stride(0),
            "R_BLOCK": max(next_pow2(num_ranks), 2),
            "T_BLOCK": _T_BLOCK,
        },
        4,
    )
    return recv_row, rank_prefix, num_recv


@triton.jit(do_not_specialize=["num_rows", "num_tokens", "rank"])
def combine_rows_kernel(
    rank_prefix_ptr,
    recv_row_ptr,
    dst_row_ptr,
    token_slot_ptr,
    num_rows,
    num_tokens,
    rank,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    s = tl.arange(0, R_BLOCK)[:, None]  # source rank (rows of the matrices)
    j = tl.arange(0, R_BLOCK)[None, :]  # destination rank (columns)
    inside = (s < NUM_RANKS) & (j < NUM_RANKS)
    prefix = tl.load(rank_prefix_ptr + s * NUM_RANKS + j, mask=inside, other=0)
    before = tl.load(rank_prefix_ptr + (s - 1) * NUM_RANKS + j, mask=inside & (s > 0), other=0)
    matrix = prefix - before  # matrix[s, j]: rows rank s sent to rank j
    # Rank s's combine area holds the rows coming back from rank j at send_offset[s, j], in
    # (rank, token) order.
    send_offset = tl.cumsum(matrix, 1) - matrix
    # Expert side: received row r came from the source s whose prefix range holds it and goes to
    # row send_offset[s, me] + (r - before[s, me]) of rank s's area.
    column = tl.sum(tl.where(j == rank, prefix, 0), 1)  # [R_BLOCK] prefix[:, me]
    column = tl.where(tl.arange(0, R_BLOCK) < NUM_RANKS, column, 2147483647)
    delta = tl.sum(tl.where(j == rank, send_offset - before, 0), 1)  # [R_BLOCK] over s
    num_real = tl.max(tl.where(tl.arange(0, R_BLOCK) < NUM_RANKS, column, 0), 0)
    ranks = tl.arange(0, R_BLOCK)[None, :]
    for start in range(pid * BLOCK, num_rows, grid * BLOCK):
        rows = tl.arange(0, BLOCK) + start
        source = tl.sum((column[None, :] <= rows[:, None]).to(tl.int32), 1)  # [BLOCK]
        shift = tl.sum(tl.where(ranks == source[:, None], delta[None, :], 0), 1)
        slot = tl.where(rows < num_real, rows + shift, -1)
        out = tl.where(ranks == source[:, None], slot[:, None], -1)
        tl.store(
            dst_row_ptr + rows[:, None] * NUM_RANKS + ranks,
            out,
            mask=(rows[:, None] < num_rows) & (ranks < NUM_RANKS),
        )
    # Token side: the row sent back by rank j for token t is recv_row[t, j] shifted from rank j's
    # receive numbering into this rank's combine area.
    token_shift = tl.sum(tl.where(s == rank, send_offset - before, 0), 0)  # [R_BLOCK] over j
    for start in range(pid * BLOCK, num_tokens, grid * BLOCK):
        tokens = tl.arange(0, BLOCK) + start
        mask = (tokens[:, None] < num_tokens) & (ranks < NUM_RANKS)
        recv = tl.load(recv_row_ptr + tokens[:, None] * NUM_RANKS + ranks, mask=mask, other=-1)
        tl.store(
            token_slot_ptr + tokens[:, None] * NUM_RANKS + ranks,
            tl.where(recv >= 0, recv + token_shift[None, :], -1),
            mask=mask,
        )


def launch_combine_rows(
    rank_prefix_matrix: torch.Tensor, recv_row_of_token: torch.Tensor, num_rows: int, rank: int, num_sms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where combine rows go, from a dispatch handle, on the current stream.

    Arguments:
        rank_prefix_matrix: ``[num_ranks, num_ranks]`` int32, the handle's.
        recv_row_of_token: ``[num_tokens, num_ranks]`` int32, the handle's (``-1`` = not sent).
        num_rows: rows this rank received (the rows of combine's ``x``).
        rank: this rank.
        num_sms: programs to launch at most.

    Returns:
        ``dst_row [num_rows, num_ranks]`` int32: for received row ``r``, its row in the combine
        area of the source rank (``-1`` in the other columns and for padding rows past the real
        count) and ``token_slot [num_tokens, num_ranks]`` int32: for token ``t``, the row of this
        rank's combine area holding rank ``j``'s contribution, ``-1`` = none.
    """
    num_tokens, num_ranks = recv_row_of_token.shape
    device = recv_row_of_token.device
    dst_row = torch.empty(num_rows, num_ranks, dtype=torch.int32, device=device)
    token_slot = torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=device)
    block = 256
    work = cdiv(max(num_rows, num_tokens, 1), block)
    launch(
        combine_rows_kernel,
        (max(1, min(num_sms, work)),),
        (
            rank_prefix_matrix,
            recv_row_of_token,
            dst_row,
            token_slot,
            num_rows,
            num_tokens,
            rank,
        ),
        {
            "NUM_RANKS": num_ranks,
            "R_BLOCK": max(next_pow2(num_ranks), 2),
            "BLOCK": block,
        },
        4,
    )
    return dst_row, token_slot
