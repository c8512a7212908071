"""Kernel logic checked on the CPU with Triton's interpreter (run by test_kernels_interpreter.py in a
subprocess with ``TRITON_INTERPRET=1``; needs numpy). Each check compares a kernel's output with the
torch definition it replaces; the GPU tier (tests/gpu) checks the same kernels on real hardware.
Simulated ranks are plain CPU int32 tensors reached through a table of their addresses
(``triton_interpreter.symmetric_peers``), as the symmetric buffer's ``SymmetricPeers`` reaches real ones.

Usage: ``TRITON_INTERPRET=1 python tests/unit/kernel_interpreter_checks.py [name ...]``
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton_interpreter  # TRITON_INTERPRET check, numpy-2 fix, CPU primitives; before any kernel import
from triton_interpreter import symmetric_peers

import epcomm.kernels.leg_exchange as leg_module
from epcomm.backends.nvlink.normal import HostRecord
from epcomm.backends.nvlink.symmetric_buffer import HeaderLayout
from epcomm.errors import InconsistentCallError
from epcomm.fingerprint import CallFingerprint, NormalOperation
from epcomm.kernels.barrier import launch_barrier
from epcomm.kernels.layout import launch_dispatch_layout
from epcomm.kernels.normal_combine import launch_combine_reduce
from epcomm.kernels.normal_copy_out import launch_copy_out_meta
from epcomm.kernels.normal_push import PushBarriers, PushFingerprint, PushRegions, launch_push_rows
from epcomm.kernels.normal_rows import (
    HOST_MISMATCH_WORD,
    HOST_TABLE_WORD,
    counts_row_words,
    launch_combine_rows,
    launch_dispatch_counts,
)
from epcomm.layout import compute_dispatch_layout, rows_in_order

triton_interpreter.use_cpu_primitives()

FLAG_OFFSET, COUNTER_OFFSET = 0, 32  # the barrier flags (16 words readable up to 16 ranks), the done counter


def check_push() -> None:
    """Dispatch push: every (token, destination) row lands at its row with top-k ids made local,
    weights and the source index; rows at or past the capacity are skipped and nothing else is
    written (4 ranks, and 12 ranks through the peer table, where some destination overflows)."""
    torch.manual_seed(0)
    for num_ranks, num_tokens, words, topk, experts, capacity, ranks, offsets in (
        (4, 37, 16, 3, 16, 64, (0, 3), [3, 0, 5, 2]),
        (12, 9, 8, 3, 24, 12, (0, 10), [0, 3, 7, 1, 0, 9, 2, 0, 5, 11, 4, 6]),
    ):
        local = experts // num_ranks
        regions = PushRegions(
            x=0,
            topk_idx=capacity * words,
            topk_weights=capacity * (words + 2 * topk),
            src_idx=capacity * (words + 3 * topk),
        )
        total = capacity * (words + 3 * topk + 1)
        for rank in ranks:
            buffers = [torch.zeros(total, dtype=torch.int32) for _ in range(num_ranks)]
            error = torch.zeros(4, dtype=torch.int32)
            x = torch.randint(-1000, 1000, (num_tokens, words), dtype=torch.int32)
            idx = torch.randint(-1, experts, (num_tokens, topk))
            weights = torch.rand(num_tokens, topk)
            layout = compute_dispatch_layout(idx, experts, num_ranks)
            dst = rows_in_order(layout.is_token_in_rank, torch.tensor(offsets))
            launch_push_rows(
                peers=symmetric_peers(buffers, rank, error),
                x_words=x,
                dst_row=dst,
                regions=regions,
                capacity=capacity,
                num_sms=3,
                num_warps=4,
                topk_idx=idx,
                topk_weights=weights,
                num_local_experts=local,
                localize_topk=True,
                write_src_idx=True,
            )
            written = [torch.zeros(total, dtype=torch.bool) for _ in range(num_ranks)]
            skipped = 0
            for t in range(num_tokens):
                for j in range(num_ranks):
                    r = int(dst[t, j])
                    if r < 0:
                        continue
                    if r >= capacity:
                        skipped += 1
                        continue
                    assert torch.equal(buffers[j][r * words : (r + 1) * words], x[t]), (j, t)
                    shifted = idx[t] - j * local
                    want = torch.where((idx[t] >= 0) & (shifted >= 0) & (shifted < local), shifted, -1)
                    ids = buffers[j][regions.topk_idx : regions.topk_weights].view(torch.int64)
                    assert torch.equal(ids[r * topk : (r + 1) * topk], want), (j, t)
                    got_w = buffers[j][regions.topk_weights : regions.src_idx].view(torch.float32)
                    assert torch.equal(
                        got_w[r * topk : (r + 1) * topk], torch.where(want >= 0, weights[t], 0.0)
                    )
                    assert int(buffers[j][regions.src_idx + r]) == t
                    written[j][r * words : (r + 1) * words] = True
                    written[j][regions.topk_idx + 2 * r * topk : regions.topk_idx + 2 * (r + 1) * topk] = True
                    written[j][regions.topk_weights + r * topk : regions.topk_weights + (r + 1) * topk] = True
                    written[j][regions.src_idx + r] = True
            assert (skipped > 0) == (num_ranks > 8), skipped  # the 12-rank case overflows a destination
            for j in range(num_ranks):
                assert not buffers[j][~written[j]].any(), f"push wrote outside its rows at rank {j}"
            assert int(error[0]) == 0


def _assert_error(error: torch.Tensor, missing: int | None, rank: int, code: int = 5) -> None:
    """No wait expired (``missing`` None), or the error word names ``code``, ``missing`` and ``rank``."""
    if missing is None:
        assert int(error[0]) == 0, f"a wait timed out: {error.tolist()}"
    else:
        assert error.tolist() == [1, code, missing, rank], error.tolist()


def _assert_landed(
    buffers: list[torch.Tensor], x: torch.Tensor, dst: torch.Tensor, payload: int
) -> list[torch.Tensor]:
    """Row ``x[t]`` sits at row ``dst[t, j]`` of buffer ``j``'s area (from word ``payload``) for
    every ``dst[t, j] >= 0``; returns per buffer the ``[rows]`` mask of area rows written."""
    words = x.size(1)
    written = []
    for j, buffer in enumerate(buffers):
        area = buffer[payload:].view(-1, words)
        mask = torch.zeros(area.size(0), dtype=torch.bool)
        for t in range(x.size(0)):
            row = int(dst[t, j])
            if row >= 0:
                assert torch.equal(area[row], x[t]), (j, t)
                mask[row] = True
        written.append(mask)
    return written


def check_push_barriers() -> None:
    """The barriers folded into the push: with every peer's entry and exit flags already there, the
    rows land past the payload offset (nothing else of the area or the header written), this
    rank's exit flag is released at every peer and the done counter is back at 0; with one peer's
    exit flag missing, the error word names that peer and the exit operation (entry flags all
    there). 4 ranks, 12 ranks (a 16-lane wait, the missing peer past lane 8) and 72 ranks (an
    NVL72 domain: 128 lanes), the offsets from the symmetric buffer's header map."""
    torch.manual_seed(7)
    words, capacity = 8, 16
    dst4 = torch.tensor([[0, 1, -1, 2], [1, -1, 0, 0], [-1, 0, 1, 1], [2, 2, 2, -1], [3, -1, 3, 3]])
    dst12 = rows_in_order(torch.rand(7, 12) < 0.5, torch.randint(0, 8, (12,)))
    dst72 = rows_in_order(torch.rand(5, 72) < 0.5, torch.randint(0, 10, (72,)))
    for num_ranks, rank, dst, missings in (
        (4, 2, dst4.to(torch.int32), (None, 1)),
        (12, 9, dst12, (None, 10)),
        (72, 70, dst72, (None, 65)),
    ):
        header = HeaderLayout(num_ranks, count_table=False)
        payload = header.payload
        x = torch.arange(dst.size(0) * words, dtype=torch.int32).view(-1, words) + 1
        for missing in missings:
            buffers = [torch.zeros(payload + capacity * words, dtype=torch.int32) for _ in range(num_ranks)]
            buffers[rank][header.flags : header.flags + num_ranks] = 6  # every peer's exit flag (>= entry 5)
            if missing is not None:
                buffers[rank][header.flags + missing] = 5  # the peer entered but never finished
            before = buffers[rank][:payload].clone()
            error = torch.zeros(4, dtype=torch.int32)
            launch_push_rows(
                peers=symmetric_peers(buffers, rank, error, 2_000_000, header.flags, header.counter),
                x_words=x,
                dst_row=dst,
                regions=PushRegions(x=payload),
                capacity=capacity,
                num_sms=3,
                num_warps=4,
                barriers=PushBarriers(entry_epoch=5, exit_epoch=6, entry_code=4, exit_code=5),
            )
            _assert_error(error, missing, rank)
            written = _assert_landed(buffers, x, dst, payload)
            for j in range(num_ranks):
                area = buffers[j][payload:].view(capacity, words)
                assert not area[~written[j]].any(), f"push wrote outside its rows at rank {j}"
                want = before.clone() if j == rank else torch.zeros(payload, dtype=torch.int32)
                want[header.flags + rank] = 6  # the exit flag released at every peer
                assert torch.equal(buffers[j][:payload], want), (j, "header", buffers[j][:payload])
            assert int(buffers[rank][header.counter]) == 0, "done counter not reset"


def check_push_fingerprint() -> None:
    """The fingerprint in the push's entry barrier (cached dispatch, combine): this rank's words
    reach row ``rank`` of every peer's fingerprint rows; with every peer's words equal the rows land
    and nothing is recorded or filled; with one peer's words different (another hidden, num_topk,
    operation or call number) no row is written anywhere, the fills are filled, the host record
    holds every rank's words and the entry epoch, and ``HostRecord.check`` raises naming both ranks
    and both calls (then the record is free again). A second difference while the record is still
    unread leaves the first record. 4 and 12 ranks (the odd peer past lane 8)."""
    torch.manual_seed(11)
    words, capacity, entry, exit_ = 8, 16, 5, 6
    mine = CallFingerprint(NormalOperation.COMBINE, 9, 4, 7168, 0, 0, 8, 1)
    others = {
        "hidden": mine._replace(hidden=4096),
        "num_topk": mine._replace(num_topk=4),
        "operation": CallFingerprint(NormalOperation.CACHED_DISPATCH, 9, 4, 7168, 0, 0, 0, 0),
        "call number": mine._replace(sequence=8),
    }
    for num_ranks, rank, odd_peer in ((4, 2, 0), (12, 3, 10)):
        header = HeaderLayout(num_ranks, count_table=True)
        payload, slots = header.payload, header.table
        dst = rows_in_order(torch.rand(9, num_ranks) < 0.5, torch.randint(0, 4, (num_ranks,)))
        x = torch.arange(dst.size(0) * words, dtype=torch.int32).view(-1, words) + 1
        for name, odd in [("equal", mine), *others.items()]:
            buffers = [torch.zeros(payload + capacity * words, dtype=torch.int32) for _ in range(num_ranks)]
            local = buffers[rank]
            local[header.flags : header.flags + num_ranks] = exit_  # every peer's flags (>= entry)
            for s in range(num_ranks):
                if s != rank:
                    theirs = odd if s == odd_peer else mine
                    local[slots + s * 8 : slots + (s + 1) * 8] = torch.tensor(theirs.words())
            before = [buffer.clone() for buffer in buffers]
            record = HostRecord(num_ranks, pin_memory=False)
            fill = torch.arange(40, dtype=torch.int32)
            error = torch.zeros(4, dtype=torch.int32)
            for attempt in range(2 if name == "hidden" else 1):
                launch_push_rows(
                    peers=symmetric_peers(buffers, rank, error, 2_000_000, header.flags, header.counter),
                    x_words=x,
                    dst_row=dst,
                    regions=PushRegions(x=payload),
                    capacity=capacity,
                    num_sms=3,
                    num_warps=4,
                    barriers=PushBarriers(entry + attempt, exit_, 6, 7),
                    fingerprint=PushFingerprint(mine.words(), slots, record.address, ((fill, -1),)),
                )
            _assert_error(error, None, rank)
            for j in range(num_ranks):  # this rank's words and both flags reached every buffer
                assert buffers[j][slots + rank * 8 : slots + (rank + 1) * 8].tolist() == mine.words(), j
                assert int(buffers[j][header.flags + rank]) == exit_, j
            if name == "equal":
                _assert_landed(buffers, x, dst, payload)
                assert int(record.words[0]) == 0, "a record without a difference"
                assert torch.equal(fill, torch.arange(40, dtype=torch.int32)), "filled without a difference"
                record.check(rank)
                continue
            for j in range(num_ranks):  # no row anywhere
                assert torch.equal(buffers[j][payload:], before[j][payload:]), (name, j, "rows written")
            assert bool((fill == -1).all()), (name, "fill")
            assert int(record.words[0]) == entry, (name, "record epoch (the first difference's)")
            rows = record.words[1:].view(num_ranks, 8)
            for s in range(num_ranks):
                want = odd if s == odd_peer else mine
                assert rows[s].tolist() == want.words(), (name, s)
            caught: InconsistentCallError | None = None
            try:
                record.check(rank)
            except InconsistentCallError as error:
                caught = error
            assert caught is not None, f"{name}: the host check raised nothing"
            message = str(caught)
            assert (caught.rank, caught.peer) == (rank, odd_peer), message
            assert f"rank {rank}: {mine.describe()};" in message, message
            assert message.endswith(f"rank {odd_peer}: {odd.describe()}"), message
            assert f"({name} differ" in message, message
            assert len(message) <= 300, message
            assert "\n" not in message, message
            assert int(record.words[0]) == 0, "the record was not freed"
            record.check(rank)  # nothing left


def check_barrier() -> None:
    """``barrier_kernel``: this rank's epoch flag is released at every peer; with every peer's flag
    already here no error, with one peer's missing the error word names it (3 and 12 ranks)."""
    epoch, code = 4, 1
    for num_ranks, rank, missing_peer in ((3, 1, 0), (12, 5, 10)):
        for missing in (None, missing_peer):
            buffers = [torch.zeros(64, dtype=torch.int32) for _ in range(num_ranks)]
            buffers[rank][:num_ranks] = epoch
            if missing is not None:
                buffers[rank][missing] = epoch - 1
            error = torch.zeros(4, dtype=torch.int32)
            peers = symmetric_peers(buffers, rank, error, 2_000_000, FLAG_OFFSET, COUNTER_OFFSET)
            launch_barrier(peers=peers, epoch=epoch, operation_code=code)
            _assert_error(error, missing, rank, code)
            for j in range(num_ranks):
                assert int(buffers[j][FLAG_OFFSET + rank]) == epoch, j
            assert not any(b[num_ranks:].any() for b in buffers), "barrier wrote past the flags"


def check_rows() -> None:
    """``dispatch_counts_kernel`` (fingerprint and count exchange, rows, host copy) and
    ``combine_rows_kernel`` against the torch definitions, for 4 ranks (every rank) and 12 ranks
    (three of them). The other ranks' fingerprints, counts rows and flags are written into the
    simulated buffers beforehand, as if they had published already; the kernel publishes this
    rank's own (into every buffer) and must wait for, then read, all of them. With one peer's
    fingerprint different, no row is numbered, nothing is received and the host copy holds the
    fingerprints (with ``write_host``: the table; without: the fingerprints and the mismatch
    epoch). With one peer's flag missing, the error word names it."""
    torch.manual_seed(1)
    table_offset, epoch = 64, 7
    fingerprint = [1, 5, 0, 7168, 0, 256, 8, 1]
    fp_words = len(fingerprint)
    for num_ranks, num_tokens, experts, ranks in ((4, 1300, 16, range(4)), (12, 600, 24, (0, 7, 11))):
        num_counts = counts_row_words(num_ranks, experts)
        counts_offset = table_offset + num_ranks * fp_words
        host_counts = HOST_TABLE_WORD + num_ranks * fp_words
        for rank in ranks:
            in_rank = torch.rand(num_tokens, num_ranks) < 0.5
            counts = torch.randint(0, 2000, (num_ranks, num_ranks), dtype=torch.int32)
            counts[rank] = in_rank.sum(0).to(torch.int32)
            per_expert = torch.randint(0, 9, (num_ranks, experts), dtype=torch.int32)
            table = torch.cat([counts, per_expert], 1)
            for odd_peer in ((rank + 1) % num_ranks, None):  # the combine rows below use the last
                fingerprints = torch.tensor([fingerprint] * num_ranks, dtype=torch.int32)
                if odd_peer is not None:
                    fingerprints[odd_peer, 3] = 4096  # another hidden
                buffers = [
                    torch.zeros(counts_offset + num_ranks * num_counts, dtype=torch.int32)
                    for _ in range(num_ranks)
                ]
                local = buffers[rank]
                for s in range(num_ranks):
                    if s != rank:
                        local[table_offset + s * fp_words : table_offset + (s + 1) * fp_words] = fingerprints[
                            s
                        ]
                        local[counts_offset + s * num_counts : counts_offset + (s + 1) * num_counts] = table[
                            s
                        ]
                        local[FLAG_OFFSET + s] = epoch
                error = torch.zeros(4, dtype=torch.int32)
                peers = symmetric_peers(buffers, rank, error, 10**12, FLAG_OFFSET, COUNTER_OFFSET)
                for write_host in (True, False):
                    host = torch.zeros(host_counts + num_ranks * num_counts, dtype=torch.int32)
                    recv_row, prefix, num_recv = launch_dispatch_counts(
                        peers=peers,
                        num_tokens_per_expert=per_expert[rank].clone(),
                        is_token_in_rank=in_rank,
                        epoch=epoch,
                        operation_code=2,
                        table_offset=table_offset,
                        host_address=host.data_ptr(),
                        write_host=write_host,
                        fingerprint=fingerprint,
                    )
                    assert int(error[0]) == 0, "the wait timed out"
                    for j in range(num_ranks):  # this rank's fingerprint, row and flag reached every buffer
                        got_fp = buffers[j][
                            table_offset + rank * fp_words : table_offset + (rank + 1) * fp_words
                        ]
                        assert got_fp.tolist() == fingerprint
                        got = buffers[j][
                            counts_offset + rank * num_counts : counts_offset + (rank + 1) * num_counts
                        ]
                        assert torch.equal(got, table[rank])
                        assert int(buffers[j][FLAG_OFFSET + rank]) == epoch
                    host_fingerprints = host[HOST_TABLE_WORD:host_counts].view(num_ranks, fp_words)
                    if write_host:
                        assert int(host[0]) == epoch
                        assert torch.equal(host_fingerprints, fingerprints)
                        assert torch.equal(host[host_counts:].view(num_ranks, num_counts), table)
                    else:
                        assert int(host[0]) == 0, "no table copy without write_host"
                        want_recv = 0 if odd_peer is not None else int(counts[:, rank].sum())
                        assert int(host[1]) == want_recv
                        assert int(host[2]) == epoch
                        if odd_peer is None:
                            assert int(host[HOST_MISMATCH_WORD]) == 0
                            assert not host_fingerprints.any(), "fingerprints copied without a difference"
                        else:
                            assert int(host[HOST_MISMATCH_WORD]) == epoch
                            assert torch.equal(host_fingerprints, fingerprints)
                    if odd_peer is not None:  # nothing is sent, nothing received
                        assert bool((recv_row == -1).all()), "rows numbered despite a fingerprint difference"
                        assert not prefix.any()
                        assert int(num_recv) == 0
                        continue
                    want_prefix = counts.cumsum(0, dtype=torch.int32)
                    previous = (
                        want_prefix[rank - 1] if rank > 0 else torch.zeros(num_ranks, dtype=torch.int32)
                    )
                    assert torch.equal(prefix, want_prefix)
                    assert torch.equal(recv_row, rows_in_order(in_rank, previous))
                    assert int(num_recv) == int(counts[:, rank].sum())
            matrix = torch.diff(prefix, dim=0, prepend=torch.zeros_like(prefix[:1]))
            send_offset = matrix.cumsum(dim=1, dtype=torch.int32) - matrix
            real = int(prefix[-1, rank])
            for num_rows in (real, real + 37):  # num_worst_tokens adds padding rows
                dst_row, token_slot = launch_combine_rows(
                    rank_prefix_matrix=prefix,
                    recv_row_of_token=recv_row,
                    num_rows=num_rows,
                    rank=rank,
                    num_sms=5,
                )
                rows = torch.arange(num_rows, dtype=torch.int32)
                column = prefix[:, rank].contiguous()
                source = torch.searchsorted(column, rows, right=True).clamp(max=num_ranks - 1)
                slot = send_offset[source, rank] + rows - (column - matrix[:, rank])[source]
                want = torch.full((num_rows, num_ranks), -1, dtype=torch.int32)
                want.scatter_(
                    1,
                    source.view(-1, 1).long(),
                    torch.where(rows < real, slot, -1).view(-1, 1).to(torch.int32),
                )
                assert torch.equal(dst_row, want)
                assert torch.equal(token_slot, rows_in_order(in_rank, send_offset[rank]))
    # A peer that never published (its flag one epoch behind): the bounded wait names it (past lane 8).
    num_ranks, rank, missing = 12, 3, 10
    num_counts = counts_row_words(num_ranks, 24)
    size = table_offset + num_ranks * (fp_words + num_counts)
    buffers = [torch.zeros(size, dtype=torch.int32) for _ in range(num_ranks)]
    buffers[rank][FLAG_OFFSET : FLAG_OFFSET + num_ranks] = epoch
    buffers[rank][FLAG_OFFSET + missing] = epoch - 1
    error = torch.zeros(4, dtype=torch.int32)
    host = torch.zeros(HOST_TABLE_WORD + num_ranks * (fp_words + num_counts), dtype=torch.int32)
    launch_dispatch_counts(
        peers=symmetric_peers(buffers, rank, error, 2_000_000, FLAG_OFFSET, COUNTER_OFFSET),
        num_tokens_per_expert=torch.zeros(24, dtype=torch.int32),
        is_token_in_rank=torch.rand(50, num_ranks) < 0.5,
        epoch=epoch,
        operation_code=2,
        table_offset=table_offset,
        host_address=host.data_ptr(),
        write_host=True,
        fingerprint=fingerprint,
    )
    _assert_error(error, missing, rank, code=2)


def check_copy_out() -> None:
    """Metadata copy-out, with and without a device count of real rows (``num_worst_tokens``)."""
    capacity, topk = 700, 5
    src = torch.randint(0, 100, (capacity,), dtype=torch.int32)
    idx = torch.randint(-1, 9, (capacity * topk,))
    weights = torch.rand(capacity * topk)
    for num_rows, real in ((650, None), (650, torch.tensor([600], dtype=torch.int32))):
        got_src, got_idx, got_w = launch_copy_out_meta(
            src_idx_area=src,
            topk_idx_area=idx,
            topk_weights_area=weights,
            num_rows=num_rows,
            num_topk=topk,
            num_real_rows=real,
            num_sms=3,
        )
        assert got_idx is not None
        assert got_w is not None
        n = num_rows if real is None else int(real)
        assert torch.equal(got_src[:n], src[:n])
        assert torch.equal(got_idx[:n], idx.view(capacity, topk)[:n])
        assert torch.equal(got_w[:n], weights.view(capacity, topk)[:n])
        assert bool((got_src[n:] == -1).all() and (got_idx[n:] == -1).all() and (got_w[n:] == 0).all())


def check_reduce() -> None:
    """fp32 sum in rank order plus the biases (4 ranks with one bias, 12 ranks with two); the
    interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even), so the expectation is
    truncated the same way."""
    torch.manual_seed(0)
    num_tokens, hidden, topk, capacity = 13, 64, 3, 60
    for num_ranks, num_bias in ((4, 1), (12, 2)):
        area = torch.randn(capacity, hidden).bfloat16()
        area_w = torch.rand(capacity, topk)
        slot = torch.randint(-1, capacity, (num_tokens, num_ranks), dtype=torch.int32)
        bias = tuple(torch.randn(num_tokens, hidden).bfloat16() for _ in range(num_bias))
        out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
        out_w = torch.empty(num_tokens, topk)
        launch_combine_reduce(
            area_x=area,
            area_weights=area_w,
            slot=slot,
            bias=bias,
            out_x=out,
            out_weights=out_w,
            num_sms=3,
            num_warps=4,
        )
        total = torch.zeros(num_tokens, hidden)
        total_w = torch.zeros(num_tokens, topk)
        for r in range(num_ranks):
            s = slot[:, r].long()
            present = (s >= 0)[:, None]
            total += torch.where(present, area[s.clamp(min=0)].float(), 0.0)
            total_w += torch.where(present, area_w[s.clamp(min=0)], 0.0)
        for b in bias:
            total += b.float()
        truncated = (total.view(torch.int32) & -65536).view(torch.float32)
        assert torch.equal(out.float(), truncated), num_ranks
        assert torch.equal(out_w, total_w), num_ranks


def check_layout() -> None:
    """``dispatch_layout_kernel`` against ``compute_dispatch_layout``: -1 entries, a token listing one
    expert twice, a token with no expert, node counts for 2 nodes, token counts not a multiple of
    the block."""
    torch.manual_seed(2)
    for num_tokens, num_topk, num_experts, num_ranks, per_node in (
        (300, 8, 64, 4, None),
        (130, 4, 32, 8, 4),
        (5, 3, 8, 2, 1),
        (0, 8, 16, 4, None),
    ):
        idx = torch.randint(-1, num_experts, (num_tokens, num_topk))
        if num_tokens > 2:
            idx[0] = -1
            idx[1, :2] = idx[1, 0].clamp(min=0)
        got = launch_dispatch_layout(idx, num_experts, num_ranks, per_node)
        want = compute_dispatch_layout(idx, num_experts, num_ranks, per_node)
        assert torch.equal(got.num_tokens_per_rank, want.num_tokens_per_rank)
        assert torch.equal(got.num_tokens_per_expert, want.num_tokens_per_expert)
        assert torch.equal(got.is_token_in_rank, want.is_token_in_rank)
        if want.num_tokens_per_rdma_rank is None:
            assert got.num_tokens_per_rdma_rank is None
        else:
            assert got.num_tokens_per_rdma_rank is not None
            assert torch.equal(got.num_tokens_per_rdma_rank, want.num_tokens_per_rdma_rank)


def check_leg_exchange() -> None:
    """One leg exchange of the multi-node scheme, both paths (NVLink stores; NVSHMEM put-with-signal,
    here a CPU stand-in): rank 2 of 5 exchanges with ranks 0 and 4 (a leg of 3 peers); each block
    lands whole in its peer's receive slot for rank 2 and nothing past it, each peer's flag for
    rank 2 gets the epoch; a peer whose flag never comes is named in the error word."""
    triton_interpreter.use_cpu_puts()
    torch.manual_seed(3)
    num_ranks, rank, legs = 5, 2, [0, 2, 4]
    me_index, slot_words, flag_word, staging_word, recv_word, epoch = 1, 64, 0, 32, 32 + 3 * 64, 9
    total = recv_word + 3 * slot_words
    for kernel in (leg_module.leg_store_kernel, leg_module.leg_put_kernel):
        for late in (None, 2):
            buffers = [torch.zeros(total, dtype=torch.int32) for _ in range(num_ranks)]
            error = torch.zeros(4, dtype=torch.int32)
            peers = symmetric_peers(buffers, rank, error)
            sizes = [64, 0, 176]  # bytes to each peer of the leg (none to itself)
            for i, size in enumerate(sizes):
                start = staging_word + i * slot_words
                buffers[rank][start : start + size // 4] = torch.randint(
                    -1000, 1000, (size // 4,), dtype=torch.int32
                )
            for i in (0, 2):
                if i != late:
                    buffers[rank][flag_word + 2 * i] = epoch  # the peer's block has come
            leg_module.launch_leg_exchange(
                peer_table=peers.peer_table,
                leg_ranks=torch.tensor(legs, dtype=torch.int32),
                leg_pes=torch.tensor(legs, dtype=torch.int32),
                send_bytes=torch.tensor(sizes, dtype=torch.int64),
                rank=rank,
                me_index=me_index,
                epoch=epoch,
                timeout_ns=10**12 if late is None else 5 * 10**6,
                error_address=error.data_ptr(),
                operation_code=7,
                flag_word=flag_word,
                staging_word=staging_word,
                recv_word=recv_word,
                slot_words=slot_words,
                kernel=kernel,
            )
            for i in (0, 2):
                peer, words = legs[i], sizes[i] // 4
                slot = buffers[peer][
                    recv_word + me_index * slot_words : recv_word + (me_index + 1) * slot_words
                ]
                sent = buffers[rank][staging_word + i * slot_words : staging_word + i * slot_words + words]
                assert torch.equal(slot[:words], sent), (kernel, i)
                assert not slot[words:].any(), (kernel, i, "wrote past the block")
                flag = buffers[peer][flag_word + 2 * me_index : flag_word + 2 * me_index + 2].tolist()
                assert flag == [epoch, 0], (kernel, i, flag)
            assert not buffers[1].any(), "a rank outside the leg was written"
            assert not buffers[3].any(), "a rank outside the leg was written"
            expected_error = [0, 0, 0, 0] if late is None else [1, 7, legs[late], rank]
            assert error.tolist() == expected_error, (kernel, late, error.tolist())


CHECKS: dict[str, Callable[[], None]] = {
    "leg_exchange": check_leg_exchange,
    "layout": check_layout,
    "push": check_push,
    "push_barriers": check_push_barriers,
    "push_fingerprint": check_push_fingerprint,
    "barrier": check_barrier,
    "rows": check_rows,
    "copy_out": check_copy_out,
    "reduce": check_reduce,
}

if __name__ == "__main__":
    triton_interpreter.run_checks(CHECKS)
