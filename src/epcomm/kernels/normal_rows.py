"""Normal mode: where every row goes, computed on the device in one launch per operation.

``dispatch_counts_kernel`` exchanges the call fingerprints and the counts between ranks (through the
symmetric buffer) and turns the count table into the rank prefix matrix, the receive count and, for
each (token, destination rank), the row it lands in at that rank (source ranks in order, then tokens
in order: DeepEP's receive order); it also copies the table to host-mapped memory, so the host reads
the fingerprints and counts without a device-to-host copy or an event. When a peer's fingerprint
differs from this rank's, every row number is ``-1`` (the push that follows writes nothing) and the
receive count and prefix matrix are 0, so no payload moves before the host raises.
``combine_rows_kernel`` derives from a dispatch handle where each received row goes back (expert
side) and where each token finds the rows sent back to it (token side). Both replace a dozen small
torch ops on the host's critical path; ``epcomm.layout.rows_in_order`` is the definition they are
tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from epcomm._math import cdiv, next_pow2
from epcomm.fingerprint import FINGERPRINT_WORDS
from epcomm.kernels.launch import launch
from epcomm.kernels.primitives import peer_pointer, signal_release_sys, wait_all_epoch
from epcomm.kernels.symmetric_peers import SymmetricPeers

__all__ = [
    "FINGERPRINT_ARGS",
    "HOST_MISMATCH_WORD",
    "HOST_TABLE_WORD",
    "counts_row_words",
    "fingerprint_vector",
    "launch_combine_rows",
    "launch_dispatch_counts",
]

_T_BLOCK = 512


# The host-mapped count words: word 0 the epoch of the table copy (written after it), words 1-2 the
# receive count and its epoch (num_worst_tokens mode), word 3 the epoch of a call whose fingerprints
# differed (num_worst_tokens mode: written before word 2), the table from word HOST_TABLE_WORD on:
# ``num_ranks`` fingerprints of FINGERPRINT_WORDS words, then ``num_ranks`` count rows.
HOST_MISMATCH_WORD = 3
HOST_TABLE_WORD = 4
# The kernel takes the fingerprint as eight scalar arguments (no tensor to copy to the device).
if FINGERPRINT_WORDS != 8:
    raise ImportError(
        f"dispatch_counts_kernel takes 8 fingerprint words; FINGERPRINT_WORDS is {FINGERPRINT_WORDS}"
    )


def counts_row_words(num_ranks: int, num_experts: int) -> int:
    """Words of one rank's row of the count table: tokens per rank, then tokens per expert."""
    return num_ranks + num_experts


@triton.jit
def _store_counts_row(
    row, per_rank, counts_ptr, NUM_RANKS: tl.constexpr, NUM_EXPERTS: tl.constexpr, E_BLOCK: tl.constexpr,
    R_BLOCK: tl.constexpr,
):  # fmt: skip
    """Write this rank's counts row at ``row``: ``[per_rank (NUM_RANKS), counts_ptr[:NUM_EXPERTS]]``."""
    r_cols = tl.arange(0, R_BLOCK)
    tl.store(row + r_cols, per_rank, mask=r_cols < NUM_RANKS)
    for e_start in tl.static_range(0, NUM_EXPERTS, E_BLOCK):
        experts = tl.arange(0, E_BLOCK) + e_start
        e_mask = experts < NUM_EXPERTS
        tl.store(row + NUM_RANKS + experts, tl.load(counts_ptr + experts, mask=e_mask), mask=e_mask)


FINGERPRINT_ARGS = [f"fp{i}" for i in range(FINGERPRINT_WORDS)]
"""Names of the eight scalar fingerprint arguments a kernel takes (never specialized)."""


@triton.jit
def fingerprint_vector(w0, w1, w2, w3, w4, w5, w6, w7):
    """The eight fingerprint words as one ``[8]`` int32 vector."""
    cols = tl.arange(0, 8)
    words = tl.zeros([8], dtype=tl.int32)
    words = tl.where(cols == 0, w0, words)
    words = tl.where(cols == 1, w1, words)
    words = tl.where(cols == 2, w2, words)
    words = tl.where(cols == 3, w3, words)
    words = tl.where(cols == 4, w4, words)
    words = tl.where(cols == 5, w5, words)
    words = tl.where(cols == 6, w6, words)
    return tl.where(cols == 7, w7, words)


@triton.jit
def _store_fingerprints(
    dst, theirs, fingerprint, rank, NUM_RANKS: tl.constexpr, R_BLOCK: tl.constexpr, FP_WORDS: tl.constexpr
):  # fmt: skip
    """Write every rank's fingerprint row at ``dst`` (``[NUM_RANKS, FP_WORDS]``): the peers' from
    ``theirs`` (``[R_BLOCK, FP_WORDS]``), this rank's from ``fingerprint``."""
    sources = tl.arange(0, R_BLOCK)[:, None]
    cols = tl.arange(0, FP_WORDS)[None, :]
    rows = tl.where(sources == rank, fingerprint[None, :], theirs)
    tl.store(dst + sources * FP_WORDS + cols, rows, mask=sources < NUM_RANKS)


@triton.jit(
    do_not_specialize=[
        "num_tokens",
        "rank",
        "epoch",
        "timeout_ns",
        "error_address",
        "operation_code",
        "host_address",
        "write_host",
        "flag_offset",
        "table_offset",
        *FINGERPRINT_ARGS,
    ]
)
def dispatch_counts_kernel(
    peer_table,
    counts_ptr,
    in_rank_ptr,
    recv_row_ptr,
    rank_prefix_ptr,
    num_recv_ptr,
    num_tokens,
    rank,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    host_address,
    write_host,
    flag_offset,
    table_offset,
    fp0,
    fp1,
    fp2,
    fp3,
    fp4,
    fp5,
    fp6,
    fp7,
    NUM_RANKS: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    E_BLOCK: tl.constexpr,
    R_BLOCK: tl.constexpr,
    T_BLOCK: tl.constexpr,
    HOST_TABLE: tl.constexpr,
    HOST_MISMATCH: tl.constexpr,
    FP_WORDS: tl.constexpr,
):
    # Program j publishes this rank's fingerprint and counts row to rank j, waits for every peer's,
    # then computes where this rank's tokens land at rank j. The table at table_offset: NUM_RANKS
    # fingerprints of FP_WORDS words (a fixed place, whatever num_experts a peer passed), then
    # NUM_RANKS count rows.
    j = tl.program_id(0)
    num_counts = NUM_RANKS + NUM_EXPERTS
    remote = peer_pointer(peer_table, j)
    local = peer_pointer(peer_table, rank)
    fp_cols = tl.arange(0, FP_WORDS)
    fingerprint = fingerprint_vector(fp0, fp1, fp2, fp3, fp4, fp5, fp6, fp7)
    tl.store(remote + table_offset + rank * FP_WORDS + fp_cols, fingerprint)
    counts_offset = table_offset + NUM_RANKS * FP_WORDS
    row = remote + counts_offset + rank * num_counts
    # Tokens per destination rank, from is_token_in_rank [num_tokens, NUM_RANKS] (int8 view).
    r_cols = tl.arange(0, R_BLOCK)
    r_mask = r_cols < NUM_RANKS
    per_rank = tl.zeros([R_BLOCK], dtype=tl.int32)
    for start in range(0, num_tokens, T_BLOCK):
        tokens = tl.arange(0, T_BLOCK) + start
        hits = (
            tl.load(
                in_rank_ptr + tokens[:, None] * NUM_RANKS + r_cols[None, :],
                mask=(tokens[:, None] < num_tokens) & r_mask[None, :],
                other=0,
            )
            != 0
        ).to(tl.int32)
        per_rank += tl.sum(hits, axis=0)
    _store_counts_row(row, per_rank, counts_ptr, NUM_RANKS, NUM_EXPERTS, E_BLOCK, R_BLOCK)
    signal_release_sys(remote + flag_offset + rank, epoch)
    error_pointer = error_address.to(tl.pointer_type(tl.int32))
    wait_all_epoch(
        local + flag_offset, epoch, timeout_ns, error_pointer, operation_code, rank, NUM_RANKS, R_BLOCK
    )

    # The peers' fingerprints (volatile: never a stale cached line of an earlier call's table);
    # every program compares them with this rank's, so all agree on `agree`.
    sources = tl.arange(0, R_BLOCK)
    peers = (sources < NUM_RANKS) & (sources != rank)
    theirs = tl.load(
        local + table_offset + sources[:, None] * FP_WORDS + fp_cols[None, :],
        mask=peers[:, None],
        other=0,
        volatile=True,
    )
    differing = ((theirs != fingerprint[None, :]) & peers[:, None]).to(tl.int32)
    agree = tl.sum(tl.sum(differing, axis=1), axis=0) == 0
    # Column j of the table: rows each source rank sends to j. This rank's own row comes from
    # registers: no program waits for another program of this grid. A peer whose fingerprint
    # differs may have written its counts row elsewhere (another num_experts): with `agree` false
    # nothing below uses them (no row is sent, nothing is received).
    table = local + counts_offset
    own = tl.sum(tl.where(r_cols == j, per_rank, 0), 0)
    sent = tl.load(table + sources * num_counts + j, mask=peers, other=0, volatile=True)
    sent = tl.where(sources == rank, own, sent)
    sent = tl.where(agree, sent, 0)
    prefix = tl.cumsum(sent, 0)
    tl.store(rank_prefix_ptr + sources * NUM_RANKS + j, prefix, mask=sources < NUM_RANKS)
    host = host_address.to(tl.pointer_type(tl.int32))
    if j == rank:
        tl.store(num_recv_ptr, tl.sum(sent, 0))
        if write_host == 0:
            # num_worst_tokens mode (no host read now): on a difference the fingerprints and their
            # epoch first, then the count for a later check and its epoch.
            if not agree:
                _store_fingerprints(
                    host + HOST_TABLE, theirs, fingerprint, rank, NUM_RANKS, R_BLOCK, FP_WORDS
                )
                signal_release_sys(host + HOST_MISMATCH, epoch)
            tl.store(host + 1, tl.sum(sent, 0))
            signal_release_sys(host + 2, epoch)
    carry = tl.sum(tl.where(sources < rank, sent, 0), 0)
    for start in range(0, num_tokens, T_BLOCK):
        tokens = tl.arange(0, T_BLOCK) + start
        inside = tokens < num_tokens
        hit = (tl.load(in_rank_ptr + tokens * NUM_RANKS + j, mask=inside, other=0) != 0) & agree
        position = tl.cumsum(hit.to(tl.int32), 0) + carry - 1
        tl.store(recv_row_ptr + tokens * NUM_RANKS + j, tl.where(hit, position, -1), mask=inside)
        carry += tl.sum(hit.to(tl.int32), 0)
    # The whole table to the host-mapped copy (this rank's fingerprint and counts row from
    # registers and counts_ptr), then its epoch (the host polls the epoch).
    if (j == 0) & (write_host != 0):
        _store_fingerprints(host + HOST_TABLE, theirs, fingerprint, rank, NUM_RANKS, R_BLOCK, FP_WORDS)
        host_counts = host + HOST_TABLE + NUM_RANKS * FP_WORDS
        total = NUM_RANKS * num_counts
        own_first = rank * num_counts
        for start in range(0, total, E_BLOCK):
            words = tl.arange(0, E_BLOCK) + start
            inside = (words < total) & ((words < own_first) | (words >= own_first + num_counts))
            values = tl.load(table + words, mask=inside, other=0, volatile=True)
            tl.store(host_counts + words, values, mask=inside)
        _store_counts_row(
            host_counts + own_first, per_rank, counts_ptr, NUM_RANKS, NUM_EXPERTS, E_BLOCK, R_BLOCK
        )
        signal_release_sys(host, epoch)


def launch_dispatch_counts(
    *,
    peers: SymmetricPeers,
    num_tokens_per_expert: torch.Tensor,
    is_token_in_rank: torch.Tensor,
    epoch: int,
    operation_code: int,
    table_offset: int,
    host_address: int,
    write_host: bool,
    fingerprint: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exchange the call fingerprints and the dispatch counts and compute every row number, in one
    launch on the current stream.

    Each rank publishes its ``fingerprint`` into fingerprint row ``rank`` and ``[tokens per rank
    (from is_token_in_rank), num_tokens_per_expert]`` (``counts_row_words`` words) into count row
    ``rank`` of every peer's table, releases flag ``rank`` there at ``epoch``, waits (bounded) for
    every peer's flag, then derives the rows from the table. If any peer's fingerprint differs from
    ``fingerprint``, no token is sent anywhere (every row number ``-1``), nothing is received (the
    receive count and the prefix matrix are 0) and the host raises when it reads the table (with
    ``write_host``) or, without, finds the fingerprints and the call's epoch at word
    ``HOST_MISMATCH_WORD``.

    Arguments:
        peers: the peer table, rank, timeout, error word and flag offset.
        num_tokens_per_expert: ``[num_experts]`` int32, contiguous.
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, contiguous.
        epoch: a value larger than any earlier epoch of this buffer.
        operation_code: written into the error word on timeout, names the operation.
        table_offset: int32-word offset of the table: ``[num_ranks, FINGERPRINT_WORDS]``
            fingerprints, then the ``[num_ranks, counts_row_words]`` count rows.
        host_address: address of a host-mapped int32 buffer of ``HOST_TABLE_WORD + num_ranks *
            (FINGERPRINT_WORDS + counts_row_words(...))`` words. With ``write_host`` the table
            goes to word ``HOST_TABLE_WORD`` on, then ``epoch`` to word 0; without, on a
            fingerprint difference the fingerprints go to word ``HOST_TABLE_WORD`` on and
            ``epoch`` to word ``HOST_MISMATCH_WORD``, then (always) this rank's receive count goes
            to word 1 and ``epoch`` to word 2.
        write_host: copy the table to the host buffer (the host waits for it).
        fingerprint: this call's ``FINGERPRINT_WORDS`` words, each in ``[0, 2**31)``.

    Returns:
        ``recv_row_of_token [num_tokens, num_ranks]`` int32 (row at each destination, ``-1`` = not
        sent), ``rank_prefix_matrix [num_ranks, num_ranks]`` int32 (inclusive prefix over source
        ranks) and ``num_recv_tokens [1]`` int32 (rows this rank receives).
    """
    num_tokens, num_ranks = is_token_in_rank.shape
    if peers.num_ranks != num_ranks:
        raise ValueError(f"{peers.num_ranks} peers for is_token_in_rank of {num_ranks} ranks")
    words = [int(word) for word in fingerprint]
    if len(words) != FINGERPRINT_WORDS or not all(0 <= word < 2**31 for word in words):
        raise ValueError(f"fingerprint must be {FINGERPRINT_WORDS} words in [0, 2**31); got {words}")
    device = is_token_in_rank.device
    recv_row = torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=device)
    rank_prefix = torch.empty(num_ranks, num_ranks, dtype=torch.int32, device=device)
    num_recv = torch.empty(1, dtype=torch.int32, device=device)
    num_experts = num_tokens_per_expert.numel()
    launch(
        dispatch_counts_kernel,
        (num_ranks,),
        (
            peers.peer_table,
            num_tokens_per_expert,
            is_token_in_rank.view(torch.int8),
            recv_row,
            rank_prefix,
            num_recv,
            num_tokens,
            peers.rank,
            epoch,
            peers.timeout_ns,
            peers.error_address,
            operation_code,
            host_address,
            int(write_host),
            peers.flag_offset,
            table_offset,
            *words,
        ),
        {
            "NUM_RANKS": num_ranks,
            "NUM_EXPERTS": num_experts,
            "E_BLOCK": min(max(next_pow2(max(num_experts, 1)), 32), 1024),
            "R_BLOCK": peers.flag_block,
            "T_BLOCK": _T_BLOCK,
            "HOST_TABLE": HOST_TABLE_WORD,
            "HOST_MISMATCH": HOST_MISMATCH_WORD,
            "FP_WORDS": FINGERPRINT_WORDS,
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
    *,
    rank_prefix_matrix: torch.Tensor,
    recv_row_of_token: torch.Tensor,
    num_rows: int,
    rank: int,
    num_sms: int,
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
