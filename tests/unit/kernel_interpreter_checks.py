"""Kernel logic checked on the CPU with Triton's interpreter (run by test_kernels_interpreter.py in a
subprocess with ``TRITON_INTERPRET=1``; needs numpy). Each check compares a kernel's output with the
torch definition it replaces; the GPU tier (tests/gpu) checks the same kernels on real hardware.

Usage: ``TRITON_INTERPRET=1 python tests/unit/kernel_interpreter_checks.py [name ...]``
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton_interpreter  # TRITON_INTERPRET check, numpy-2 fix, CPU primitives; before any kernel import

import epcomm.kernels.normal_push as push_kernels
import epcomm.kernels.normal_rows as rows_kernels
import epcomm.kernels.primitives as primitives
from epcomm.kernels.layout import launch_dispatch_layout
from epcomm.kernels.normal_combine import ReduceProgress, launch_combine_reduce
from epcomm.kernels.normal_copy_out import launch_copy_out_meta
from epcomm.kernels.normal_push import PushBarriers, PushRegions, launch_push_rows
from epcomm.kernels.normal_rows import (
    HOST_TABLE_WORD,
    counts_row_words,
    launch_combine_rows,
    launch_dispatch_counts,
)
from epcomm.layout import compute_dispatch_layout, rows_in_order

triton_interpreter.use_cpu_primitives(rows_kernels, push_kernels, primitives)


def check_push() -> None:
    """Every (token, destination) row lands at its row with top-k ids made local, weights and the
    source index; nothing else is written."""
    torch.manual_seed(0)
    num_ranks, num_tokens, words, topk, experts, capacity = 4, 37, 16, 3, 16, 64
    for rank in (0, 3):
        peers = [torch.zeros(4096, dtype=torch.int32) for _ in range(num_ranks)]
        x = torch.randint(-1000, 1000, (num_tokens, words), dtype=torch.int32)
        idx = torch.randint(-1, experts, (num_tokens, topk))
        weights = torch.rand(num_tokens, topk)
        layout = compute_dispatch_layout(idx, experts, num_ranks)
        dst = rows_in_order(layout.is_token_in_rank, torch.tensor([3, 0, 5, 2]))
        regions = PushRegions(x=0, topk_idx=1024, topk_weights=1536, src_idx=2560)
        launch_push_rows(
            peers, x, None, idx, weights, dst, regions, capacity, rank, experts // num_ranks, True, True, 3
        )
        written = [torch.zeros(4096, dtype=torch.bool) for _ in range(num_ranks)]
        local = experts // num_ranks
        for t in range(num_tokens):
            for j in range(num_ranks):
                r = int(dst[t, j])
                if r < 0:
                    continue
                assert torch.equal(peers[j][r * words : (r + 1) * words], x[t])
                shifted = idx[t] - j * local
                want = torch.where((idx[t] >= 0) & (shifted >= 0) & (shifted < local), shifted, -1)
                assert torch.equal(peers[j][1024:1536].view(torch.int64)[r * topk : (r + 1) * topk], want)
                got_w = peers[j][1536:2560].view(torch.float32)[r * topk : (r + 1) * topk]
                assert torch.equal(got_w, torch.where(want >= 0, weights[t], 0.0))
                assert int(peers[j][2560 + r]) == t
                written[j][r * words : (r + 1) * words] = True
                written[j][1024 + 2 * r * topk : 1024 + 2 * (r + 1) * topk] = True
                written[j][1536 + r * topk : 1536 + (r + 1) * topk] = True
                written[j][2560 + r] = True
        for j in range(num_ranks):
            assert not peers[j][~written[j]].any(), "push wrote outside its rows"


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
    rows land past the payload offset, this rank's exit flag is released at every peer and the done
    counter is back at 0; with one peer's exit flag missing, the error word names that peer and the
    exit operation (entry flags all there)."""
    num_ranks, rank, words, payload = 4, 2, 8, 64
    x = torch.arange(5 * words, dtype=torch.int32).view(5, words) + 1
    dst = torch.tensor([[0, 1, -1, 2], [1, -1, 0, 0], [-1, 0, 1, 1], [2, 2, 2, -1], [3, -1, 3, 3]])
    dst = dst.to(torch.int32)
    for missing in (None, 1):
        buffers = [torch.zeros(payload + 256, dtype=torch.int32) for _ in range(num_ranks)]
        buffers[rank][:num_ranks] = 6  # every peer's exit flag (>= the entry epoch 5 too)
        if missing is not None:
            buffers[rank][missing] = 5  # peer 1 entered but never finished
        error = torch.zeros(4, dtype=torch.int32)
        barriers = PushBarriers(5, 6, 2_000_000, error.data_ptr(), 4, 5, payload, 0, 32)
        launch_push_rows(
            buffers, x, None, None, None, dst, PushRegions(x=0), 16, rank, 1, False, False, 3, barriers
        )
        _assert_error(error, missing, rank)
        _assert_landed(buffers, x, dst, payload)
        for j in range(num_ranks):
            assert int(buffers[j][rank]) == 6, "exit flag not released at every peer"
        assert int(buffers[rank][32]) == 0, "done counter not reset"


def check_push_progress() -> None:
    """Progress flags (``PushBarriers.checkpoints``): the rows land, this rank's flag of every
    range is released at every destination, the per-range counters are back at 0, and the last
    program sets every (source, range) flag of this rank, so a copy engine waiting on one never
    hangs; with one peer missing too (the error word names it)."""
    torch.manual_seed(3)
    num_ranks, rank, words, payload, epoch = 4, 1, 8, 128, 9
    num_tokens = 23
    x = torch.randint(1, 1000, (num_tokens, words), dtype=torch.int32)
    in_rank = torch.rand(num_tokens, num_ranks) < 0.6
    dst = rows_in_order(in_rank, torch.tensor([2, 0, 1, 4]))
    for checkpoints, missing in ((3, None), (4, None), (1, None), (3, 2)):
        buffers = [torch.zeros(payload + 64 * words, dtype=torch.int32) for _ in range(num_ranks)]
        buffers[rank][:num_ranks] = epoch  # every peer's exit flag
        if missing is not None:
            buffers[rank][missing] = epoch - 1
        error = torch.zeros(4, dtype=torch.int32)
        barriers = PushBarriers(
            0, epoch, 2_000_000, error.data_ptr(), 0, 5, payload, 0, 32, checkpoints, 64, 40
        )
        launch_push_rows(
            buffers, x, None, None, None, dst, PushRegions(x=0), 64, rank, 1, False, False, 3, barriers
        )
        _assert_error(error, missing, rank)
        _assert_landed(buffers, x, dst, payload)
        for j in range(num_ranks):
            flags = buffers[j][64:128].view(8, 8)
            want = torch.zeros(8, 8, dtype=torch.int32)
            if j == rank:
                want[:num_ranks, :checkpoints] = epoch  # set by the last program after its exit wait
            else:
                want[rank, :checkpoints] = epoch  # released by this rank's push
            assert torch.equal(flags, want), (checkpoints, j, flags)
        assert not buffers[rank][40:48].any(), "per-range counters not reset"
        assert int(buffers[rank][32]) == 0, "done counter not reset"


def check_push_balanced() -> None:
    """Balanced combine push (``segments``): every row lands at its one destination row and
    nothing else is written, with padding rows past the real count left alone and an empty
    destination; with progress flags in 3 ranges too (released at every destination, counters
    reset). Only column ``rank`` of the prefix matrix is read."""
    torch.manual_seed(5)
    num_ranks, words, payload, epoch, capacity = 4, 8, 128, 7, 40
    counts = torch.tensor([5, 0, 9, 4])
    num_real = int(counts.sum())
    num_rows = num_real + 2  # padding rows (num_worst_tokens): no destination
    for rank in (0, 2):
        for checkpoints in (0, 1, 3):
            prefix = torch.full((num_ranks, num_ranks), 10_000, dtype=torch.int32)
            prefix[:, rank] = torch.cumsum(counts, 0).to(torch.int32)
            dst = torch.full((num_rows, num_ranks), -1, dtype=torch.int32)
            begin = 0
            for d in range(num_ranks):
                n = int(counts[d])
                dst[begin : begin + n, d] = torch.randperm(capacity)[:n].to(torch.int32)
                begin += n
            x = torch.randint(1, 1000, (num_rows, words), dtype=torch.int32)
            buffers = [torch.zeros(payload + capacity * words, dtype=torch.int32) for _ in range(num_ranks)]
            buffers[rank][:num_ranks] = epoch  # every peer's exit flag
            error = torch.zeros(4, dtype=torch.int32)
            barriers = PushBarriers(
                0, epoch, 2_000_000, error.data_ptr(), 0, 5, payload, 0, 32, checkpoints, 64, 40
            )
            launch_push_rows(
                buffers, x, None, None, None, dst, PushRegions(x=0), capacity, rank, 1, False, False, 3,
                barriers, one_destination=True, segments=prefix,
            )  # fmt: skip
            _assert_error(error, None, rank)
            written = _assert_landed(buffers, x, dst, payload)
            for j in range(num_ranks):
                area = buffers[j][payload:].view(capacity, words)
                assert not area[~written[j]].any(), f"push wrote outside its rows at rank {j}"
                if checkpoints:
                    flags = buffers[j][64:128].view(8, 8)
                    released = flags[:num_ranks, :checkpoints] if j == rank else flags[rank, :checkpoints]
                    assert bool((released == epoch).all()), (checkpoints, j, flags)
            assert not buffers[rank][40:48].any(), "per-range counters not reset"
            assert int(buffers[rank][32]) == 0, "done counter not reset"


def check_rows_checkpoints() -> None:
    """``dispatch_counts_kernel`` with checkpoints: this rank's published row (at every peer and
    in the host copy) ends with, for each inner checkpoint k, the tokens below
    ``k * cdiv(num_tokens, checkpoints)`` sent to each rank."""
    torch.manual_seed(4)
    num_ranks, experts, rank, epoch = 3, 6, 1, 5
    for num_tokens, checkpoints in ((1100, 4), (7, 3), (2, 4), (0, 2)):
        in_rank = torch.rand(num_tokens, num_ranks) < 0.5
        num_counts = counts_row_words(num_ranks, experts, checkpoints)
        per_expert = torch.randint(0, 9, (experts,), dtype=torch.int32)
        buffers = [torch.zeros(64 + num_ranks * num_counts, dtype=torch.int32) for _ in range(num_ranks)]
        for s in range(num_ranks):
            if s != rank:
                buffers[rank][s] = epoch
        host = torch.zeros(HOST_TABLE_WORD + num_ranks * num_counts, dtype=torch.int32)
        error = torch.zeros(4, dtype=torch.int32)
        launch_dispatch_counts(
            buffers, per_expert, in_rank, rank, epoch, 10**12, error.data_ptr(), 2, 0, 64,
            host.data_ptr(), True, checkpoints,
        )  # fmt: skip
        assert int(error[0]) == 0
        size = -(-num_tokens // checkpoints)
        below = [in_rank[: k * size].sum(0).to(torch.int32) for k in range(1, checkpoints)]
        want = torch.cat([in_rank.sum(0).to(torch.int32), per_expert, *below])
        for j in range(num_ranks):
            assert torch.equal(buffers[j][64 + rank * num_counts : 64 + (rank + 1) * num_counts], want)
        got_host = host[HOST_TABLE_WORD:].view(num_ranks, num_counts)[rank]
        assert torch.equal(got_host, want), (got_host, want)


def check_rows() -> None:
    """``dispatch_counts_kernel`` (count exchange, rows, host copy) and ``combine_rows_kernel``
    against the torch definitions. The other ranks' counts rows and flags are written into the
    simulated buffers beforehand, as if they had published already; the kernel publishes this rank's
    own row (into every buffer) and must wait for, then read, all of them."""
    torch.manual_seed(1)
    num_ranks, num_tokens, experts = 4, 1300, 16
    flag_offset, table_offset, epoch = 0, 64, 7
    num_counts = num_ranks + experts
    for rank in range(num_ranks):
        in_rank = torch.rand(num_tokens, num_ranks) < 0.5
        counts = torch.randint(0, 2000, (num_ranks, num_ranks), dtype=torch.int32)
        counts[rank] = in_rank.sum(0).to(torch.int32)
        per_expert = torch.randint(0, 9, (num_ranks, experts), dtype=torch.int32)
        table = torch.cat([counts, per_expert], 1)
        buffers = [torch.zeros(64 + 8 * num_counts, dtype=torch.int32) for _ in range(num_ranks)]
        local = buffers[rank]
        for s in range(num_ranks):
            if s != rank:
                local[table_offset + s * num_counts : table_offset + (s + 1) * num_counts] = table[s]
                local[flag_offset + s] = epoch
        error = torch.zeros(4, dtype=torch.int32)
        for write_host in (True, False):
            host = torch.zeros(HOST_TABLE_WORD + num_ranks * num_counts, dtype=torch.int32)
            recv_row, prefix, num_recv = launch_dispatch_counts(
                buffers,
                per_expert[rank].clone(),
                in_rank,
                rank,
                epoch,
                10**12,
                error.data_ptr(),
                2,
                flag_offset,
                table_offset,
                host.data_ptr(),
                write_host,
            )
            assert int(error[0]) == 0, "the wait timed out"
            for j in range(num_ranks):  # this rank's row and flag reached every buffer
                got = buffers[j][table_offset + rank * num_counts : table_offset + (rank + 1) * num_counts]
                assert torch.equal(got, table[rank])
                assert int(buffers[j][flag_offset + rank]) == epoch
            if write_host:
                assert int(host[0]) == epoch
                assert torch.equal(host[HOST_TABLE_WORD:].view(num_ranks, num_counts), table)
            else:
                assert int(host[0]) == 0, "no table copy without write_host"
                assert int(host[1]) == int(counts[:, rank].sum())
                assert int(host[2]) == epoch
            want_prefix = counts.cumsum(0, dtype=torch.int32)
            previous = want_prefix[rank - 1] if rank > 0 else torch.zeros(num_ranks, dtype=torch.int32)
            assert torch.equal(prefix, want_prefix)
            assert torch.equal(recv_row, rows_in_order(in_rank, previous))
            assert int(num_recv) == int(counts[:, rank].sum())
        matrix = torch.diff(prefix, dim=0, prepend=torch.zeros_like(prefix[:1]))
        send_offset = matrix.cumsum(dim=1, dtype=torch.int32) - matrix
        real = int(prefix[-1, rank])
        for num_rows in (real, real + 37):  # num_worst_tokens adds padding rows
            dst_row, token_slot = launch_combine_rows(prefix, recv_row, num_rows, rank, 5)
            rows = torch.arange(num_rows, dtype=torch.int32)
            column = prefix[:, rank].contiguous()
            source = torch.searchsorted(column, rows, right=True).clamp(max=num_ranks - 1)
            slot = send_offset[source, rank] + rows - (column - matrix[:, rank])[source]
            want = torch.full((num_rows, num_ranks), -1, dtype=torch.int32)
            want.scatter_(
                1, source.view(-1, 1).long(), torch.where(rows < real, slot, -1).view(-1, 1).to(torch.int32)
            )
            assert torch.equal(dst_row, want)
            assert torch.equal(token_slot, rows_in_order(in_rank, send_offset[rank]))


def check_copy_out() -> None:
    """Metadata copy-out, with and without a device count of real rows (``num_worst_tokens``)."""
    capacity, topk = 700, 5
    src = torch.randint(0, 100, (capacity,), dtype=torch.int32)
    idx = torch.randint(-1, 9, (capacity * topk,))
    weights = torch.rand(capacity * topk)
    for num_rows, real in ((650, None), (650, torch.tensor([600], dtype=torch.int32))):
        got_src, got_idx, got_w = launch_copy_out_meta(src, idx, weights, num_rows, topk, real, 3)
        assert got_idx is not None
        assert got_w is not None
        n = num_rows if real is None else int(real)
        assert torch.equal(got_src[:n], src[:n])
        assert torch.equal(got_idx[:n], idx.view(capacity, topk)[:n])
        assert torch.equal(got_w[:n], weights.view(capacity, topk)[:n])
        assert bool((got_src[n:] == -1).all() and (got_idx[n:] == -1).all() and (got_w[n:] == 0).all())


def check_reduce() -> None:
    """fp32 sum in rank order plus bias; the interpreter truncates fp32 -> bf16 (the GPU rounds to
    nearest even), so the expectation is truncated the same way."""
    torch.manual_seed(0)
    num_ranks, num_tokens, hidden, topk, capacity = 4, 13, 64, 3, 60
    area = torch.randn(capacity, hidden).bfloat16()
    area_w = torch.rand(capacity, topk)
    slot = torch.randint(-1, capacity, (num_tokens, num_ranks), dtype=torch.int32)
    bias = torch.randn(num_tokens, hidden).bfloat16()
    out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
    out_w = torch.empty(num_tokens, topk)
    launch_combine_reduce(area, area_w, slot, (bias,), out, out_w, 3)
    total = torch.zeros(num_tokens, hidden)
    total_w = torch.zeros(num_tokens, topk)
    for r in range(num_ranks):
        s = slot[:, r].long()
        present = (s >= 0)[:, None]
        total += torch.where(present, area[s.clamp(min=0)].float(), 0.0)
        total_w += torch.where(present, area_w[s.clamp(min=0)], 0.0)
    total += bias.float()
    truncated = (total.view(torch.int32) & -65536).view(torch.float32)
    assert torch.equal(out.float(), truncated)
    assert torch.equal(out_w, total_w)


def check_reduce_progress() -> None:
    """The reduce beside the push (``ReduceProgress``): with every range's flag there, the same
    sums as the plain reduce and no error; with one source's range 1 missing, the error word
    names that source and the kernel returns (one bounded wait per program, no hang)."""
    torch.manual_seed(4)
    num_ranks, rank, num_tokens, hidden, checkpoints, epoch = 4, 1, 13, 32, 3, 11
    in_rank = torch.rand(num_tokens, num_ranks) < 0.6
    counts = in_rank.sum(0).to(torch.int32)  # rows this rank sent to each source (= gets back)
    prefix = torch.randint(0, 5, (num_ranks, num_ranks), dtype=torch.int32).cumsum(0).to(torch.int32)
    prefix[rank:] += counts - (prefix[rank] - (prefix[rank - 1] if rank else 0))
    offset = torch.cumsum(counts, 0) - counts
    slot = torch.where(in_rank, in_rank.int().cumsum(0) - 1 + offset, -1).to(torch.int32)
    capacity = int(counts.sum())
    area = torch.randn(capacity, hidden).bfloat16()
    want = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
    launch_combine_reduce(area, None, slot, (), want, None, 3)
    for missing in (None, 2):
        flags = torch.zeros(num_ranks, 8, dtype=torch.int32)
        flags[:, :checkpoints] = epoch
        if missing is not None:
            flags[missing, 1] = epoch - 1
        error = torch.zeros(4, dtype=torch.int32)
        progress = ReduceProgress(
            checkpoints, 8, prefix, flags.data_ptr(), rank, epoch, 2_000_000, error.data_ptr(), 6
        )
        out = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16)
        launch_combine_reduce(area, None, slot, (), out, None, 3, progress)
        if missing is None:
            assert int(error[0]) == 0, error.tolist()
            assert torch.equal(out, want)
        else:
            assert error.tolist() == [1, 6, missing, rank], error.tolist()


def check_combine_progress() -> None:
    """The balanced combine push and the reduce beside it agree on the progress ranges, end to
    end over 4 simulated ranks. Each source pushes (one program, 3 ranges) into buffers whose
    areas start as NaN, and the buffers are snapshotted at each progress-flag release. Then, for
    every destination, range k and block of tokens, the reduce runs on that state with the flags
    of ranges <= k set. It must succeed, with the exact sums, exactly when every row of the block
    has landed, and report the timeout otherwise: a reduce that read a row before its flag would
    return NaN with no error, and one that waited for a later range would time out with every row
    there."""
    torch.manual_seed(6)
    num_ranks, words, payload, epoch, capacity, ranges = 4, 8, 128, 9, 64, 3
    num_tokens = [11, 0, 14, 9]
    in_rank = [torch.rand(n, num_ranks) < 0.55 for n in num_tokens]
    sent = torch.stack([m.sum(0) for m in in_rank]).to(torch.int32)  # [source i, destination j]
    prefix = torch.cumsum(sent, 0).to(torch.int32)
    nan_words = torch.full((capacity * words,), 0x7FC07FC0, dtype=torch.int32)  # bf16 NaN pairs
    buffers = [torch.cat([torch.zeros(payload, dtype=torch.int32), nan_words]) for _ in range(num_ranks)]
    for buffer in buffers:
        buffer[:num_ranks] = epoch  # every peer's exit flag
    slots = []
    snapshots: dict[tuple[int, int], list[torch.Tensor]] = {}
    original = push_kernels._release_at_peers

    def recording(p0, p1, p2, p3, p4, p5, p6, p7, slot, value, NUM_RANKS):
        original(p0, p1, p2, p3, p4, p5, p6, p7, slot, value, NUM_RANKS)
        word = int(slot.handle.data.reshape(-1)[0]) if hasattr(slot, "handle") else int(slot)
        if word >= 64:  # a progress flag: (source, range)
            snapshots[divmod(word - 64, 8)] = [b.clone() for b in buffers]

    push_kernels._release_at_peers = recording
    try:
        for rank in range(num_ranks):
            before = prefix[rank - 1] if rank else torch.zeros(num_ranks, dtype=torch.int32)
            recv_row = rows_in_order(in_rank[rank], before)
            num_recv = int(prefix[-1, rank])
            dst_row, token_slot = launch_combine_rows(prefix, recv_row, num_recv, rank, 2)
            slots.append(token_slot)
            x = (torch.randn(num_recv, 2 * words).bfloat16().view(torch.int32)).contiguous()
            error = torch.zeros(4, dtype=torch.int32)
            barriers = PushBarriers(
                0, epoch, 2_000_000, error.data_ptr(), 0, 5, payload, 0, 32, ranges, 64, 40
            )
            launch_push_rows(
                buffers, x, None, None, None, dst_row, PushRegions(x=0), capacity, rank, 1, False, False, 1,
                barriers, one_destination=True, segments=prefix,
            )  # fmt: skip
            assert int(error[0]) == 0, error.tolist()
    finally:
        push_kernels._release_at_peers = original
    blocks_waiting = 0
    for dest in range(num_ranks):

        def area(state: list[torch.Tensor], dest: int = dest) -> torch.Tensor:
            return state[dest][payload:].view(torch.bfloat16).view(capacity, 2 * words)

        token_slot = slots[dest]
        want = torch.empty(num_tokens[dest], 2 * words, dtype=torch.bfloat16)
        launch_combine_reduce(area(buffers), None, token_slot, (), want, None, 1)
        assert not want.isnan().any()
        offset = torch.cumsum(sent[dest], 0) - sent[dest]
        for k in range(ranges):
            state = area(buffers).clone()
            for source in range(num_ranks):  # each source's part of this area as its range k left it
                rows = slice(int(offset[source]), int(offset[source] + sent[dest, source]))
                state[rows] = area(snapshots[(source, k)])[rows]
            flags = torch.full((num_ranks, 8), epoch - 1, dtype=torch.int32)
            flags[:, : k + 1] = epoch
            for first in range(0, num_tokens[dest], 4):
                block = token_slot[first : first + 4]
                rows_in = block[block >= 0].long()
                landed = not state[rows_in].isnan().any()
                blocks_waiting += not landed
                out = torch.zeros(block.size(0), 2 * words, dtype=torch.bfloat16)
                error = torch.zeros(4, dtype=torch.int32)
                progress = ReduceProgress(
                    ranges, 8, prefix, flags.data_ptr(), dest, epoch, 1_000_000, error.data_ptr(), 6
                )
                launch_combine_reduce(state, None, block, (), out, None, 1, progress)
                reduced = int(error[0]) == 0
                assert reduced == landed, (dest, k, first, error.tolist(), landed)
                if reduced:
                    assert torch.equal(out, want[first : first + 4]), (dest, k, first)
    assert blocks_waiting > 0, "no block had to wait: the check would not see a wrong range"


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


CHECKS: dict[str, Callable[[], None]] = {
    "layout": check_layout,
    "push": check_push,
    "push_barriers": check_push_barriers,
    "push_progress": check_push_progress,
    "push_balanced": check_push_balanced,
    "rows_checkpoints": check_rows_checkpoints,
    "rows": check_rows,
    "copy_out": check_copy_out,
    "reduce": check_reduce,
    "reduce_progress": check_reduce_progress,
    "combine_progress": check_combine_progress,
}

if __name__ == "__main__":
    triton_interpreter.run_checks(CHECKS)
