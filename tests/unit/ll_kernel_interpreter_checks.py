"""Low-latency kernel logic checked on the CPU with Triton's interpreter (run by
test_kernels_interpreter.py in a subprocess with ``TRITON_INTERPRET=1``; needs numpy).

Simulated ranks share plain CPU tensors as their symmetric buffers, reached through a table of
their addresses (``SymmetricPeers.peer_table``) with the symmetric buffer's map (header, then the
low-latency payload); every kernel of low-latency mode runs on them through its launcher (dispatch
send with its fused signal, dispatch receive, combine send, combine receive; the bounded wait) and
each output is compared with an independent torch computation of what the API promises
(``epcomm.quant`` for the FP8 scales). The inline-assembly primitives (the global timer, acquire /
relaxed system-scope loads) have no interpreter version: ``triton_interpreter.use_cpu_primitives``
replaces them with CPU stand-ins (a monotonic clock, a plain load) in the kernel modules; nothing
in ``src`` changes. The GPU tier (tests/gpu) checks the same kernels on real hardware.

Usage: ``TRITON_INTERPRET=1 python tests/unit/ll_kernel_interpreter_checks.py [name ...]``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
import triton_interpreter  # TRITON_INTERPRET check, numpy-2 fix, CPU primitives; before any kernel import
from triton_interpreter import symmetric_peers

import epcomm.kernels.barrier as barrier_kernels
import epcomm.kernels.low_latency_combine as combine_kernels
import epcomm.kernels.low_latency_dispatch as dispatch_kernels
from epcomm import quant
from epcomm.backends.nvlink.normal import HostRecord
from epcomm.backends.nvlink.symmetric_buffer import HeaderLayout, LowLatencyLayout
from epcomm.errors import InconsistentCallError
from epcomm.fingerprint import CallFingerprint, XFormat
from epcomm.kernels.barrier import BarrierPut, launch_masked_barrier
from epcomm.kernels.low_latency_combine import launch_ll_combine
from epcomm.kernels.low_latency_dispatch import (
    CallCheck,
    DispatchOutputs,
    LowLatencyWords,
    Phase,
    PutPath,
    SignalState,
    launch_ll_dispatch,
)
from epcomm.kernels.symmetric_peers import SymmetricPeers

triton_interpreter.use_cpu_primitives()
triton_interpreter.use_cpu_puts()


def _scalar_range(*bounds: object) -> object:
    """The kernels' ``range`` loops with runtime bounds: compiled, the loop variable is an int32
    scalar (``token.to(tl.int64)`` is valid); the interpreter gives Python ints. Yield int32 scalars."""
    for value in range(*(int(bound) for bound in bounds)):  # type: ignore[call-overload]
        yield tl.full([], value, tl.int32)


combine_kernels.range = _scalar_range  # type: ignore[attr-defined]
barrier_kernels.range = _scalar_range  # type: ignore[attr-defined]
dispatch_kernels.range = _scalar_range  # type: ignore[attr-defined]

DISPATCH_OP, COMBINE_OP = 8, 9  # Operation.LOW_LATENCY_DISPATCH / LOW_LATENCY_COMBINE
DISPATCH, COMBINE = 0, 1  # phases
NO_TIMEOUT = 10**12


def _random_topk(num_tokens: int, num_experts: int, num_topk: int, g: torch.Generator) -> torch.Tensor:
    """Distinct experts per token (as a router's top-k), one -1 slot in token 0, and with 2+ tokens
    the last token lists one expert twice (both slots must get its row, as in the reference)."""
    if num_tokens == 0:
        return torch.zeros(0, num_topk, dtype=torch.int64)
    topk = torch.stack([torch.randperm(num_experts, generator=g)[:num_topk] for _ in range(num_tokens)])
    topk[0, 0] = -1
    if num_tokens >= 2 and num_topk >= 2:
        topk[-1, 1] = topk[-1, 0]
    return topk


@dataclass
class RankState:
    """One simulated rank's device-resident state (as ``NvlinkLowLatency`` keeps it: sequence rows
    padded to a multiple of 4 words) and its peer group over every rank's buffer."""

    peers: SymmetricPeers
    error: torch.Tensor
    stride: int
    arrivals: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 2, 4, dtype=torch.int32))
    send_seq: torch.Tensor = field(init=False)
    expected: torch.Tensor = field(init=False)
    wait_stats: torch.Tensor = field(init=False)
    cumulative: torch.Tensor | None = None
    differs: torch.Tensor = field(init=False)
    record: HostRecord = field(init=False)

    def __post_init__(self) -> None:
        self.send_seq = torch.zeros(2, 2, self.stride, dtype=torch.int32)
        self.expected = torch.zeros(2, 2, self.stride, dtype=torch.int32)
        self.wait_stats = torch.zeros(self.peers.num_ranks, dtype=torch.int64)
        self.differs = torch.zeros(2, 2, self.stride, dtype=torch.int32)
        self.record = HostRecord(self.peers.num_ranks, pin_memory=False)

    def signals(self, phase: int, parity: int) -> SignalState:
        return SignalState(
            self.arrivals[phase, parity], self.send_seq[phase, parity], self.expected[phase, parity]
        )


class World:
    """``num_ranks`` simulated ranks: symmetric buffers (header, then the low-latency payload at
    ``HeaderLayout.payload``, as the symmetric buffer maps it) reached through a peer table; stale
    garbage with top-k rows naming real experts, as an earlier larger call leaves behind; stale
    token counts too; the header and the sequence flags zero) and per-rank state."""

    def __init__(
        self,
        num_ranks: int,
        capacity: int,
        hidden: int,
        num_topk: int,
        num_experts: int,
        seed: int,
        ranks_per_node: int | None = None,
    ) -> None:
        self.num_ranks, self.capacity, self.hidden = num_ranks, capacity, hidden
        self.num_topk, self.num_experts = num_topk, num_experts
        self.local_experts = num_experts // num_ranks
        # With ranks_per_node: nodes of consecutive ranks, peers of other nodes through the put path.
        self.ranks_per_node = ranks_per_node
        self.layout = LowLatencyLayout(
            num_ranks, capacity, hidden, num_topk, ranks_per_node is not None, self.local_experts
        )
        self.payload = HeaderLayout(num_ranks, count_table=False).payload
        g = torch.Generator().manual_seed(seed)
        words = self.payload + self.layout.total_words
        self.buffers = [
            torch.randint(0, 2**20, (words,), generator=g, dtype=torch.int32) for _ in range(num_ranks)
        ]
        for buffer in self.buffers:
            buffer[: self.payload + self.layout.counts(0)] = 0  # the header and the sequence flags
            for parity in range(2):
                for fp8 in (False, True):
                    start = self.words(DISPATCH, parity).staging
                    messages = buffer[start : start + num_ranks * capacity * self.layout.message_words]
                    column = self._topk_column(fp8)
                    messages.view(-1, self.layout.message_words)[:, column : column + num_topk] = (
                        torch.randint(
                            0, num_experts, (num_ranks * capacity, num_topk), generator=g, dtype=torch.int32
                        )
                    )
                if ranks_per_node is not None:  # stale top-k rows apart too
                    start = self.payload + self.layout.topk(parity)
                    buffer[start : start + num_ranks * capacity * num_topk] = torch.randint(
                        0, num_experts, (num_ranks * capacity * num_topk,), generator=g, dtype=torch.int32
                    )
        stride = -(-num_ranks // 4) * 4
        self.states = []
        for rank in range(num_ranks):
            error = torch.zeros(4, dtype=torch.int32)
            peers = symmetric_peers(self.buffers, rank, error, NO_TIMEOUT)
            self.states.append(RankState(peers, error, stride))
        # signals each rank sent to (and expects from) each peer, per phase and parity
        self.signals = torch.zeros(num_ranks, 2, 2, stride, dtype=torch.int32)
        # rank -> how its calls' fingerprints differ from everyone else's (none: all equal)
        self.odd: dict[int, Callable[[CallFingerprint], CallFingerprint]] = {}

    def fingerprint(self, rank: int, phase: int) -> CallFingerprint:
        """The fingerprint of ``rank``'s calls of ``phase`` (dispatch #1, or combine #2 of it)."""
        hidden, experts, topk, capacity = self.hidden, self.num_experts, self.num_topk, self.capacity
        if phase == DISPATCH:
            call = CallFingerprint.for_low_latency_dispatch(hidden, XFormat.BF16, experts, topk, capacity)
            call = call._replace(sequence=1)
        else:
            call = CallFingerprint.for_low_latency_combine(hidden, experts, topk, capacity, 1)
            call = call._replace(sequence=2)
        change = self.odd.get(rank)
        return change(call) if change is not None else call

    def check(self, rank: int, phase: int, parity: int) -> CallCheck:
        state = self.states[rank]
        words = self.fingerprint(rank, phase).words()
        return CallCheck(words, state.differs[phase, parity], state.record.address)

    def differ(self, rank: int, source: int, phase: int) -> bool:
        """Whether ``source``'s call of ``phase`` differs from ``rank``'s."""
        return self.fingerprint(rank, phase) != self.fingerprint(source, phase)

    def words(self, phase: int, parity: int) -> LowLatencyWords:
        """``(phase, parity)``'s flags, counts and staging from word 0 (``NvlinkLowLatency._words``)."""
        layout = self.layout
        staging = layout.dispatch_staging(parity) if phase == DISPATCH else layout.combine_staging(parity)
        return LowLatencyWords(
            self.payload + layout.flags(phase, parity),
            self.payload + layout.counts(parity),
            self.payload + staging,
            self.payload + layout.fingerprints(phase, parity),
        )

    def put(self, rank: int, phase: int, parity: int) -> PutPath | None:
        """``rank``'s put path for ``(phase, parity)`` (as the multi-node backend builds it), or
        ``None`` in one NVLink domain."""
        if self.ranks_per_node is None:
            return None
        node = rank // self.ranks_per_node
        reach = [int(peer // self.ranks_per_node == node) for peer in range(self.num_ranks)]
        layout, payload = self.layout, self.payload
        return PutPath(
            torch.tensor(reach, dtype=torch.int32),
            torch.arange(self.num_ranks, dtype=torch.int32),
            payload + layout.topk(parity),
            payload + (layout.dispatch_outbox if phase == DISPATCH else layout.combine_outbox),
            payload + layout.mine(phase),
            dispatch_kernels.ll_dispatch_put_kernel
            if phase == DISPATCH
            else combine_kernels.ll_combine_put_kernel,
        )

    def x_words(self, fp8: bool) -> int:
        return self.hidden // 4 if fp8 else self.hidden // 2

    def _topk_column(self, fp8: bool) -> int:
        return self.x_words(fp8) + (self.hidden // 128 if fp8 else 0)

    def dispatch_send(
        self,
        rank: int,
        x: torch.Tensor,
        topk: torch.Tensor,
        mask: torch.Tensor,
        gather: torch.Tensor,
        parity: int,
        num_sms: int,
        fp8: bool = False,
        round_scale: bool = False,
    ) -> None:
        self._dispatch(Phase.SEND, rank, x, topk, mask, gather, parity, num_sms, fp8, round_scale)

    def dispatch_recv(
        self,
        rank: int,
        mask: torch.Tensor,
        gather: torch.Tensor,
        parity: int,
        fp8: bool = False,
        ue8m0: bool = False,
        timeout_ns: int = NO_TIMEOUT,
    ) -> dict[str, torch.Tensor]:
        x = torch.empty(0, self.hidden, dtype=torch.bfloat16)
        topk = torch.empty(0, self.num_topk, dtype=torch.int64)
        return self._dispatch(
            Phase.RECEIVE, rank, x, topk, mask, gather, parity, 1, fp8, ue8m0, ue8m0, timeout_ns
        )

    def dispatch_both(
        self,
        rank: int,
        x: torch.Tensor,
        topk: torch.Tensor,
        mask: torch.Tensor,
        gather: torch.Tensor,
        parity: int,
        fp8: bool = False,
        ue8m0: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Both phases in one launch of one program (the interpreter runs programs one after
        another: a second program would wait for the first's signal forever)."""
        return self._dispatch(Phase.BOTH, rank, x, topk, mask, gather, parity, 1, fp8, ue8m0, ue8m0)

    def _dispatch(
        self,
        phase: Phase,
        rank: int,
        x: torch.Tensor,
        topk: torch.Tensor,
        mask: torch.Tensor,
        gather: torch.Tensor,
        parity: int,
        num_sms: int,
        fp8: bool,
        round_scale: bool,
        ue8m0: bool = False,
        timeout_ns: int = NO_TIMEOUT,
    ) -> dict[str, torch.Tensor]:
        state, x_words = self.states[rank], self.x_words(fp8)
        num_local, num_rows = self.local_experts, self.num_ranks * self.capacity
        scale_columns = quant.num_packed_ue8m0(self.hidden) if ue8m0 else self.hidden // 128
        out = {
            "x": torch.full((num_local, num_rows, x_words), 99, dtype=torch.int32),
            "scales": torch.full((num_local, scale_columns, num_rows), 99, dtype=torch.int32),
            "count": torch.full((num_local,), 99, dtype=torch.int32),
            "src_info": torch.full((num_local, num_rows), 99, dtype=torch.int32),
            "layout_range": torch.full((num_local, self.num_ranks), 99, dtype=torch.int64),
        }
        if state.cumulative is None:
            state.cumulative = torch.zeros(num_local, dtype=torch.int32)
        outputs = DispatchOutputs(
            torch.zeros(num_local, num_rows, dtype=torch.int32),
            out["x"],
            out["scales"],
            out["count"],
            out["src_info"],
            out["layout_range"],
            state.cumulative,
            state.wait_stats,
        )
        launch_ll_dispatch(
            phase=phase,
            peers=state.peers._replace(timeout_ns=timeout_ns),
            local=self.buffers[rank],
            x=x,
            topk_idx=topk,
            rank_mask=mask,
            combine_gather_idx=gather,
            signals=state.signals(DISPATCH, parity),
            words=self.words(DISPATCH, parity),
            outputs=None if phase == Phase.SEND else outputs,
            operation_code=DISPATCH_OP,
            num_local_experts=num_local,
            message_words=self.layout.message_words,
            use_fp8=fp8,
            round_scale=round_scale,
            use_ue8m0=ue8m0,
            num_sms=num_sms,
            check=self.check(rank, DISPATCH, parity),
            put=self.put(rank, DISPATCH, parity),
        )
        return out

    def combine_send(
        self,
        rank: int,
        expert_out: torch.Tensor,
        gather: torch.Tensor,
        mask: torch.Tensor,
        parity: int,
        num_sms: int,
    ) -> None:
        topk = torch.empty(0, self.num_topk, dtype=torch.int64)
        out = torch.empty(0, self.hidden, dtype=torch.bfloat16)
        self._combine(Phase.SEND, rank, expert_out, gather, topk, topk.float(), out, mask, parity, num_sms)

    def combine_recv(
        self,
        rank: int,
        topk: torch.Tensor,
        weights: torch.Tensor,
        mask: torch.Tensor,
        parity: int,
        num_sms: int,
        timeout_ns: int = NO_TIMEOUT,
    ) -> torch.Tensor:
        out = torch.full((topk.shape[0], self.hidden), 7.0, dtype=torch.bfloat16)
        num_rows = self.num_ranks * self.capacity
        expert_out = torch.zeros(self.local_experts, num_rows, self.hidden, dtype=torch.bfloat16)
        gather = torch.full((self.num_ranks, self.capacity, self.num_topk), -1, dtype=torch.int64)
        self._combine(
            Phase.RECEIVE, rank, expert_out, gather, topk, weights, out, mask, parity, num_sms, timeout_ns
        )
        return out

    def combine_both(
        self,
        rank: int,
        expert_out: torch.Tensor,
        gather: torch.Tensor,
        topk: torch.Tensor,
        weights: torch.Tensor,
        mask: torch.Tensor,
        parity: int,
    ) -> torch.Tensor:
        """Both phases in one launch of one program (see ``dispatch_both``)."""
        out = torch.full((topk.shape[0], self.hidden), 7.0, dtype=torch.bfloat16)
        self._combine(Phase.BOTH, rank, expert_out, gather, topk, weights, out, mask, parity, 1)
        return out

    def _combine(
        self,
        phase: Phase,
        rank: int,
        expert_out: torch.Tensor,
        gather: torch.Tensor,
        topk: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor,
        mask: torch.Tensor,
        parity: int,
        num_sms: int,
        timeout_ns: int = NO_TIMEOUT,
    ) -> None:
        state = self.states[rank]
        launch_ll_combine(
            phase=phase,
            peers=state.peers._replace(timeout_ns=timeout_ns),
            local=self.buffers[rank],
            x_words=expert_out.view(torch.int32),
            combine_gather_idx=gather,
            rank_mask=mask,
            signals=state.signals(COMBINE, parity),
            words=self.words(COMBINE, parity),
            operation_code=COMBINE_OP,
            topk_idx=topk,
            topk_weights=weights,
            out=out,
            wait_stats=state.wait_stats,
            num_local_experts=self.local_experts,
            num_sms=num_sms,
            check=self.check(rank, COMBINE, parity),
            put=self.put(rank, COMBINE, parity),
        )


def _expected_dispatch(
    world: World, rank: int, topks: list[torch.Tensor], masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``rank`` receives: ``hit[e, s * M + t]`` (token t of source s goes to local expert e;
    sources either side masks give nothing) and the expected ``combine_gather_idx``."""
    num_ranks, capacity, num_local = world.num_ranks, world.capacity, world.local_experts
    all_topk = torch.full((num_ranks, capacity, world.num_topk), -1, dtype=torch.int64)
    for source in range(num_ranks):
        differs = world.differ(rank, source, DISPATCH)
        if not (masks[rank][source] or masks[source][rank] or differs):
            all_topk[source, : topks[source].shape[0]] = topks[source]
    experts = rank * num_local + torch.arange(num_local)
    hit = (all_topk.unsqueeze(0) == experts.view(-1, 1, 1, 1)).any(-1).view(num_local, -1)
    position = hit.long().cumsum(-1) - 1
    gather = torch.full((num_ranks, capacity, world.num_topk), -1, dtype=torch.int64)
    for source in range(num_ranks):
        for token in range(capacity):
            for k in range(world.num_topk):
                local = int(all_topk[source, token, k]) - rank * num_local
                if 0 <= local < num_local:
                    gather[source, token, k] = (
                        local * num_ranks * capacity + position[local, source * capacity + token]
                    )
    return hit, gather


def _check_dispatch_outputs(
    world: World, got: dict[str, torch.Tensor], hit: torch.Tensor, rows_words: torch.Tensor
) -> None:
    """``rows_words[s * M + t]``: the words expected in ``recv_x`` for token t of source s."""
    num_ranks, capacity = world.num_ranks, world.capacity
    count = hit.sum(-1).to(torch.int32)
    assert torch.equal(got["count"], count), (got["count"], count)
    for e in range(world.local_experts):
        rows = hit[e].nonzero().view(-1)
        c = len(rows)
        assert torch.equal(got["x"][e, :c], rows_words[rows]), e
        assert torch.equal(got["src_info"][e, :c], (rows % capacity).to(torch.int32)), e
        assert bool((got["src_info"][e, c:] == -1).all()), e
        per_source = hit[e].view(num_ranks, capacity).sum(-1)
        begin = per_source.cumsum(0) - per_source
        assert torch.equal(got["layout_range"][e], (begin << 32) | per_source), (
            got["layout_range"][e],
            per_source,
        )


def check_dispatch_send() -> None:
    """Send alone: top-k rows to every unmasked destination, the payload only where the destination
    holds one of the token's experts, slots past ``num_tokens`` and masked peers untouched,
    ``combine_gather_idx`` all -1 (also past 1024 entries), the count then the sequence number at
    every unmasked peer (with this call's fingerprint in row ``rank`` of its fingerprint rows), local
    sequence state advanced, the arrival counter back at 0."""
    hidden, num_topk, parity = 256, 4, 1
    for num_ranks, capacity, cases in (
        (2, 8, [(n, fp8, grid, 0, (0, 0)) for n in (0, 3, 8) for fp8 in (False, True) for grid in (1, 3)]),
        (2, 8, [(5, False, 4, 1, (1, 0)), (8, True, 2, 1, (0, 1))]),
        (3, 120, [(3, False, 2, 2, (0, 1, 0)), (0, False, 1, 0, (0, 0, 0))]),  # gather > 1024 entries
        (12, 4, [(4, False, 3, 10, tuple(int(p in (3, 9)) for p in range(12)))]),  # peers 3, 9 masked
    ):
        layout = LowLatencyLayout(num_ranks, capacity, hidden, num_topk)
        num_experts = 4 * num_ranks
        local_experts = 4
        for num_tokens, fp8, num_sms, rank, mask in cases:
            g = torch.Generator().manual_seed(num_tokens * 10 + num_sms)
            world = World(num_ranks, capacity, hidden, num_topk, num_experts, seed=1)
            for buffer in world.buffers:
                buffer.fill_(7)
            x = torch.randn(num_tokens, hidden, generator=g).bfloat16()
            topk = _random_topk(num_tokens, num_experts, num_topk, g)
            gather = torch.full((num_ranks, capacity, num_topk), 123, dtype=torch.int64)
            state = world.states[rank]
            state.send_seq[0, parity].fill_(5)
            state.expected[0, parity].fill_(3)
            mask_tensor = torch.tensor(mask, dtype=torch.int32)
            world.dispatch_send(rank, x, topk, mask_tensor, gather, parity, num_sms, fp8)
            assert bool((gather == -1).all()), "combine_gather_idx not filled with -1"
            assert bool((state.arrivals == 0).all()), state.arrivals
            x_words, topk_column = world.x_words(fp8), world._topk_column(fp8)
            if fp8:
                _, scales = quant.per_token_cast_to_fp8(x)
                expected_fp8 = _expected_fp8(x, round_scale=False)
            words = world.words(DISPATCH, parity)
            for peer in range(num_ranks):
                buffer = world.buffers[peer]
                touched = torch.zeros(buffer.numel(), dtype=torch.bool)
                seq, expected = state.send_seq[0, parity, peer], state.expected[0, parity, peer]
                if mask[peer]:
                    assert (seq, expected) == (5, 3), (seq, expected)
                    assert bool((buffer == 7).all()), f"masked peer {peer} written"
                    continue
                assert (seq, expected) == (6, 4), (seq, expected)
                assert buffer[words.flags + rank] == 6
                assert buffer[words.counts + rank] == num_tokens
                touched[words.flags + rank] = True
                touched[words.counts + rank] = True
                row = words.fingerprints + rank * 8
                assert buffer[row : row + 8].tolist() == world.fingerprint(rank, DISPATCH).words()
                touched[row : row + 8] = True
                base = words.staging
                for t in range(num_tokens):
                    start = base + (rank * capacity + t) * layout.message_words
                    slot = buffer[start : start + layout.message_words]
                    assert torch.equal(slot[topk_column : topk_column + num_topk].long(), topk[t]), t
                    touched[start + topk_column : start + topk_column + num_topk] = True
                    if not bool(((topk[t] >= 0) & (topk[t] // local_experts == peer)).any()):
                        continue
                    if fp8:
                        assert torch.equal(slot[x_words:topk_column].view(torch.float32), scales[t]), t
                        assert torch.equal(slot[:x_words].view(torch.uint8), expected_fp8[t]), t
                    else:
                        assert torch.equal(slot[:x_words], x[t].view(torch.int32)), t
                    touched[start : start + topk_column] = True
                assert bool((buffer[~touched] == 7).all()), (
                    f"peer {peer}: words written outside this call's slots"
                )


@triton.jit
def _cast_fp8_kernel(src_ptr, dst_ptr, N: tl.constexpr):
    columns = tl.arange(0, N)
    values = tl.load(src_ptr + columns)
    tl.store(dst_ptr + columns, values.to(tl.float8e4nv).to(tl.uint8, bitcast=True))


def _expected_fp8(x: torch.Tensor, round_scale: bool) -> torch.Tensor:
    """``x / scale`` per 128 channels with ``epcomm.quant``'s scales (float32 IEEE division), cast to
    e4m3 by the interpreter's converter: it drops the carry of some roundings into the exponent
    (124.3 becomes 64, not 128), which the GPU's conversion does not; the kernel uses the same
    converter, so everything else must match exactly. ``[rows, hidden]`` uint8."""
    scales = quant.compute_scales(x, round_scale=round_scale)
    divided = (x.float() / scales.repeat_interleave(128, dim=-1)).contiguous()
    out = torch.empty(divided.shape, dtype=torch.uint8)
    for row in range(x.shape[0]):
        _cast_fp8_kernel[(1,)](divided[row], out[row], N=x.shape[1])
    return out


def _run_round(
    world: World,
    num_tokens: tuple[int, ...],
    masks: list[tuple[int, ...]],
    parity: int,
    seed: int,
    fp8: bool = False,
    ue8m0: bool = False,
    both_rank: int | None = None,
) -> None:
    """One dispatch (+ combine for bf16) over every rank, checked against torch. ``both_rank`` runs
    each op as one launch of both phases, after the other ranks' send phases and before their
    receive phases."""
    g = torch.Generator().manual_seed(seed)
    num_ranks, hidden, num_local = world.num_ranks, world.hidden, world.local_experts
    mask_tensors = [torch.tensor(m, dtype=torch.int32) for m in masks]
    xs, topks, gathers = [], [], []
    for rank in range(num_ranks):
        n = num_tokens[rank]
        x = torch.randn(n, hidden, generator=g).bfloat16() * (1 + torch.arange(hidden) / 100).bfloat16()
        xs.append(x)
        topks.append(_random_topk(n, world.num_experts, world.num_topk, g))
        gathers.append(torch.full((num_ranks, world.capacity, world.num_topk), 77, dtype=torch.int64))
        if rank != both_rank:
            world.dispatch_send(
                rank, x, topks[rank], mask_tensors[rank], gathers[rank], parity, 3, fp8, ue8m0
            )
    for rank in range(num_ranks):
        world.signals[rank, 0, parity, :num_ranks] += 1 - mask_tensors[rank]
    befores = []
    for rank in range(num_ranks):
        before = world.states[rank].cumulative
        befores.append(before.clone() if before is not None else torch.zeros(num_local, dtype=torch.int32))
    if both_rank is not None:
        got_both = world.dispatch_both(
            both_rank,
            xs[both_rank],
            topks[both_rank],
            mask_tensors[both_rank],
            gathers[both_rank],
            parity,
            fp8,
            ue8m0,
        )
    received = []
    for rank in range(num_ranks):
        before = befores[rank]
        if rank == both_rank:
            got = got_both
        else:
            got = world.dispatch_recv(rank, mask_tensors[rank], gathers[rank], parity, fp8, ue8m0)
        hit, want_gather = _expected_dispatch(world, rank, topks, masks)
        assert torch.equal(gathers[rank], want_gather), (rank, gathers[rank], want_gather)
        assert world.states[rank].cumulative is not None
        assert torch.equal(world.states[rank].cumulative - before, hit.sum(-1).to(torch.int32))
        assert int(world.states[rank].error[0]) == 0, world.states[rank].error
        if fp8:
            # the payload as staged at this receiver is epcomm.quant's cast; the scales are
            # epcomm.quant's
            start = world.words(DISPATCH, parity).staging
            staged = world.buffers[rank][
                start : start + num_ranks * world.capacity * world.layout.message_words
            ]
            words = staged.view(num_ranks * world.capacity, -1)[:, : world.x_words(True)].clone()
            want_q = torch.zeros(num_ranks, world.capacity, hidden, dtype=torch.uint8)
            want_scales = torch.zeros(num_ranks, world.capacity, got["scales"].shape[1], dtype=torch.int32)
            for source in range(num_ranks):
                n = num_tokens[source]
                if n:
                    _, s = quant.per_token_cast_to_fp8(xs[source], round_scale=ue8m0, use_ue8m0=ue8m0)
                    want_q[source, :n] = _expected_fp8(xs[source], round_scale=ue8m0)
                    want_scales[source, :n] = s.view(torch.int32)
            want_q = want_q.view(num_ranks * world.capacity, hidden)
            want_scales = want_scales.view(num_ranks * world.capacity, -1)
            sent = hit.any(0)
            assert torch.equal(words[sent].view(torch.uint8), want_q[sent]), rank
            for e in range(num_local):
                rows = hit[e].nonzero().view(-1)
                assert torch.equal(got["scales"][e, :, : len(rows)].T, want_scales[rows]), (rank, e)
            _check_dispatch_outputs(world, got, hit, words)
        else:
            all_x = torch.zeros(num_ranks, world.capacity, hidden, dtype=torch.bfloat16)
            for source in range(num_ranks):
                all_x[source, : num_tokens[source]] = xs[source]
            _check_dispatch_outputs(
                world, got, hit, all_x.view(num_ranks * world.capacity, hidden).view(torch.int32)
            )
        received.append(got)
    _check_records(world, DISPATCH, masks)
    if fp8:
        return
    # combine: expert e's output is its input times (1 + e / 8)
    factor = 1 + torch.arange(num_local).view(-1, 1, 1) / 8
    expert_outs = [(got["x"].view(torch.bfloat16).float() * factor).bfloat16() for got in received]
    all_weights = [torch.rand(num_tokens[rank], world.num_topk, generator=g) for rank in range(num_ranks)]
    for rank in range(num_ranks):
        if rank != both_rank:
            world.combine_send(rank, expert_outs[rank], gathers[rank], mask_tensors[rank], parity, num_sms=2)
    for rank in range(num_ranks):
        world.signals[rank, 1, parity, :num_ranks] += 1 - mask_tensors[rank]
    if both_rank is not None:
        out_both = world.combine_both(
            both_rank,
            expert_outs[both_rank],
            gathers[both_rank],
            topks[both_rank],
            all_weights[both_rank],
            mask_tensors[both_rank],
            parity,
        )
    for rank in range(num_ranks):
        n = num_tokens[rank]
        weights = all_weights[rank]
        if rank == both_rank:
            out = out_both
        else:
            out = world.combine_recv(rank, topks[rank], weights, mask_tensors[rank], parity, num_sms=2)
        assert int(world.states[rank].error[0]) == 0, world.states[rank].error
        want = torch.zeros(n, hidden)
        for k in range(world.num_topk):
            expert = topks[rank][:, k]
            expert_rank = expert.clamp(min=0) // num_local
            use = (expert >= 0) & (mask_tensors[rank][expert_rank] == 0)
            # the rows of a rank whose combine differs are not added
            agrees = torch.tensor([not world.differ(rank, r, COMBINE) for r in range(num_ranks)])
            use &= agrees[expert_rank]
            row = (xs[rank].float() * (1 + (expert.clamp(min=0) % num_local) / 8).view(-1, 1)).bfloat16()
            want = want + torch.where(use, weights[:, k], 0.0).view(-1, 1) * row.float()
        _assert_bf16_of(out, want)
    _check_records(world, COMBINE, masks)
    for rank in range(num_ranks):
        state = world.states[rank]
        assert bool((state.arrivals == 0).all())
        assert torch.equal(state.send_seq, world.signals[rank]), (state.send_seq, world.signals[rank])
        assert torch.equal(state.expected, world.signals[rank]), (state.expected, world.signals[rank])


def _check_records(world: World, phase: int, masks: list[tuple[int, ...]]) -> None:
    """Each rank whose receive saw an unmasked source's call differ recorded it, and
    ``HostRecord.check`` raises naming this rank, the lowest such source and both calls (then the
    record is free); a rank that saw none has no record."""
    operation = "low_latency_dispatch" if phase == DISPATCH else "low_latency_combine"
    for rank in range(world.num_ranks):
        record = world.states[rank].record
        differing = [
            source
            for source in range(world.num_ranks)
            if source != rank and not masks[rank][source] and world.differ(rank, source, phase)
        ]
        if not differing:
            assert int(record.words[0]) == 0, (rank, "a record without a difference")
            continue
        caught: InconsistentCallError | None = None
        try:
            record.check(rank)
        except InconsistentCallError as error:
            caught = error
        assert caught is not None, (rank, operation, "the host check raised nothing")
        message, peer = str(caught), differing[0]
        assert (caught.rank, caught.peer) == (rank, peer), message
        assert message.startswith(f"{operation}: rank {rank} and rank {peer}"), message
        assert f"rank {rank}: {world.fingerprint(rank, phase).describe()};" in message, message
        assert message.endswith(f"rank {peer}: {world.fingerprint(peer, phase).describe()}"), message
        if len(differing) > 1:
            assert f"{len(differing) - 1} more rank(s) differ" in message, message
        assert len(message) <= 300, message
        assert int(record.words[0]) == 0, "the record was not freed"


def _assert_bf16_of(out: torch.Tensor, want: torch.Tensor) -> None:
    """``out`` is ``want`` (float32) cast to bf16: rounded to nearest even (GPU) or truncated (the
    interpreter), element by element."""
    truncated = (want.view(torch.int32) & -65536).view(torch.float32)
    rounded = want.bfloat16().float()
    ok = (out.float() == truncated) | (out.float() == rounded)
    assert bool(ok.all()), (out[~ok][:8], want[~ok][:8])


def check_dispatch_combine() -> None:
    """bf16 dispatch then combine on 3 simulated ranks, several calls on both parities on the same
    stale buffers (token counts going down and up, zero tokens, a rank masked by all): received
    rows, counts, source info, layout ranges, gather indices, cumulative stats, then the weighted
    top-k sums, against torch; sequence numbers and arrival counters in step. Then the same on 12
    simulated ranks (16-lane waits, sources past 8), with a rank masked by all."""
    world = World(num_ranks=3, capacity=5, hidden=256, num_topk=3, num_experts=6, seed=3)
    open_mask = [(0, 0, 0)] * 3
    shrunk = [(0, 0, 1), (0, 0, 1), (1, 1, 0)]  # rank 2 out: it and the others skip each other
    rounds = [
        ((5, 5, 4), open_mask, 0),
        ((5, 3, 5), open_mask, 1),
        ((2, 5, 0), open_mask, 0),
        ((1, 0, 3), shrunk, 1),
        ((0, 4, 1), open_mask, 0),
        ((0, 0, 0), open_mask, 1),
        ((4, 1, 5), shrunk, 0),
    ]
    for i, (num_tokens, masks, parity) in enumerate(rounds):
        _run_round(world, num_tokens, masks, parity, seed=10 + i)

    num_ranks, out = 12, 9
    world = World(num_ranks=num_ranks, capacity=3, hidden=128, num_topk=3, num_experts=24, seed=4)
    open_mask = [(0,) * num_ranks] * num_ranks
    shrunk = [tuple(int((r == out) != (p == out)) for p in range(num_ranks)) for r in range(num_ranks)]
    rounds = [
        ((3, 2, 3, 1, 0, 3, 2, 3, 3, 1, 2, 3), open_mask, 0),
        ((1, 3, 0, 2, 3, 1, 3, 0, 2, 3, 3, 1), shrunk, 1),
        ((2, 0, 1, 3, 2, 2, 1, 3, 0, 2, 1, 3), open_mask, 1),
    ]
    for i, (num_tokens, masks, parity) in enumerate(rounds):
        _run_round(world, num_tokens, masks, parity, seed=30 + i)


def check_put_path() -> None:
    """The put path (multi-node: peers of other nodes through NVSHMEM puts, here copies through the
    peer's address; peers of this node through stores): the rounds of ``check_dispatch_combine``
    over 2 nodes of 2 ranks (bf16, then FP8 with float and UE8M0 scales, a rank masked by all, one
    rank in one launch), then 3 nodes of 1; received rows, counts, gather indices and the weighted
    sums against torch, sequence numbers in step, as in one NVLink domain."""
    world = World(num_ranks=4, capacity=5, hidden=256, num_topk=3, num_experts=8, seed=13, ranks_per_node=2)
    open_mask = [(0, 0, 0, 0)] * 4
    shrunk = [(0, 0, 0, 1), (0, 0, 0, 1), (0, 0, 0, 1), (1, 1, 1, 0)]  # rank 3 out
    rounds = [
        ((5, 5, 4, 3), open_mask, 0, None),
        ((5, 3, 5, 0), open_mask, 1, 2),
        ((2, 5, 0, 1), shrunk, 0, None),
        ((0, 0, 0, 0), open_mask, 1, None),
        ((4, 1, 5, 5), open_mask, 0, 1),
    ]
    for i, (num_tokens, masks, parity, both_rank) in enumerate(rounds):
        _run_round(world, num_tokens, masks, parity, seed=90 + i, both_rank=both_rank)
    world = World(num_ranks=2, capacity=4, hidden=512, num_topk=3, num_experts=8, seed=14, ranks_per_node=1)
    for i, (num_tokens, parity, ue8m0) in enumerate([((4, 3), 0, False), ((2, 4), 1, True)]):
        _run_round(world, num_tokens, [(0, 0)] * 2, parity, seed=95 + i, fp8=True, ue8m0=ue8m0)
    world = World(num_ranks=3, capacity=3, hidden=128, num_topk=2, num_experts=6, seed=15, ranks_per_node=1)
    _run_round(world, (3, 1, 2), [(0, 0, 0)] * 3, 1, seed=97)


def check_row_blocks() -> None:
    """The receive phase scans the rows in blocks when there are more than ``RECEIVE_ROWS_BLOCK``
    (here lowered to 8): 3 ranks of capacity 5 (15 rows, 2 blocks) and 12 ranks of capacity 3
    (36 rows, 5 blocks, the layout ranges of sources split across blocks), on the store path and
    the put path: outputs as in one block."""
    saved = dispatch_kernels.RECEIVE_ROWS_BLOCK
    dispatch_kernels.RECEIVE_ROWS_BLOCK = 8
    try:
        for ranks_per_node in (None, 1):
            world = World(3, 5, 256, 3, 6, seed=21, ranks_per_node=ranks_per_node)
            _run_round(world, (5, 3, 4), [(0, 0, 0)] * 3, 0, seed=22)
            _run_round(world, (2, 5, 0), [(0, 0, 1), (0, 0, 1), (1, 1, 0)], 1, seed=23, both_rank=0)
        world = World(12, 3, 128, 3, 24, seed=24, ranks_per_node=4)
        _run_round(world, (3, 2, 3, 1, 0, 3, 2, 3, 3, 1, 2, 3), [(0,) * 12] * 12, 0, seed=25)
    finally:
        dispatch_kernels.RECEIVE_ROWS_BLOCK = saved


def check_fingerprints() -> None:
    """One rank's calls differ (another hidden, num_topk or capacity in both operations; another
    call number or handle in combine only): every receiver treats each source whose call differs
    as one that sent nothing (dispatch: no row from it, combine: its rows not added), the rest is
    as without the difference, and each rank that saw a difference has it recorded for the host,
    which raises naming both ranks and both calls. 3 ranks (the odd one in the middle, one round
    with a rank masked), then 12 ranks (the odd one past lane 8); both parities, one-launch ranks."""
    changes: dict[str, Callable[[CallFingerprint], CallFingerprint]] = {
        "hidden": lambda call: call._replace(hidden=call.hidden * 2),
        "num_topk": lambda call: call._replace(num_topk=call.num_topk + 1),
        "capacity": lambda call: call._replace(with_weights=call.with_weights + 1),
        "call number": lambda call: (
            call._replace(sequence=call.sequence + 2) if call.operation == 5 else call
        ),
        "handle": lambda call: call._replace(handle_sequence=3) if call.operation == 5 else call,
    }
    world = World(num_ranks=3, capacity=5, hidden=256, num_topk=3, num_experts=6, seed=8)
    open_mask = [(0, 0, 0)] * 3
    shrunk = [(0, 1, 1), (1, 0, 0), (1, 0, 0)]  # rank 0 out: it and the others skip each other
    for i, (name, change) in enumerate(changes.items()):
        world.odd = {1: change}
        masks = shrunk if name == "num_topk" else open_mask
        _run_round(world, (5, 4, 3), masks, i % 2, seed=70 + i, both_rank=2 if name == "hidden" else None)
    world.odd = {}
    _run_round(world, (3, 5, 2), open_mask, 1, seed=79)  # all equal again: nothing dropped
    world = World(num_ranks=12, capacity=3, hidden=128, num_topk=3, num_experts=24, seed=9)
    world.odd = {10: changes["hidden"]}
    _run_round(world, (3, 2, 3, 1, 0, 3, 2, 3, 3, 1, 2, 3), [(0,) * 12] * 12, 0, seed=80)


def check_dispatch_fp8() -> None:
    """FP8 dispatch (fused per-128-channel cast) on 2 simulated ranks, repeated calls on both
    parities on stale buffers: payload vs ``epcomm.quant``'s cast, float32 scales and packed UE8M0
    scales exactly as ``epcomm.quant``, counts, source info, layout ranges, gather indices."""
    world = World(num_ranks=2, capacity=6, hidden=1024, num_topk=3, num_experts=8, seed=5)
    open_mask = [(0, 0)] * 2
    for i, (num_tokens, parity, ue8m0) in enumerate(
        [((6, 6), 0, False), ((6, 6), 1, True), ((3, 0), 0, True), ((1, 5), 1, False), ((0, 2), 0, False)]
    ):
        _run_round(world, num_tokens, open_mask, parity, seed=50 + i, fp8=True, ue8m0=ue8m0)
        for rank in range(2):
            assert torch.equal(world.states[rank].send_seq, world.signals[rank]), world.states[rank].send_seq


@triton.jit
def _wait_kernel(
    flag_ptr,
    mask_ptr,
    expected_ptr,
    timeout_ns,
    error_ptr,
    stats_ptr,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    SHRINK: tl.constexpr = False,
):
    sources = tl.arange(0, R_BLOCK)
    dispatch_kernels.wait_sources(
        flag_ptr,
        mask_ptr,
        tl.load(expected_ptr + sources),
        timeout_ns,
        error_ptr,
        9,
        2,
        stats_ptr,
        tl.program_id(0) == 0,
        NUM_RANKS,
        R_BLOCK,
        True,
        SHRINK,
    )


def check_wait() -> None:
    """``wait_sources``: returns once every unmasked source reached its expected sequence number;
    on expiry names the first missing source in the error word (``[1, op, source, rank]``) and
    returns; per-source wait stats (0 for a masked source, >= the bound for a missing one); for 4
    ranks and for 12 ranks (16 lanes, the missing source past lane 8). Then both receive phases
    give up on a source that never signals, with their operation codes."""
    # Well above the interpreter's time for one pass over the lanes on a loaded 2-core machine
    # (4.4 ms was seen), so an arrived source never reads as timed out.
    timeout = 200_000_000
    flags = torch.tensor([5, 3, 0, 1, 9, 9, 9, 9], dtype=torch.int32)
    mask = torch.tensor([0, 0, 1, 0], dtype=torch.int32)
    expected = torch.tensor([5, 4, 7, 2, 0, 0, 0, 0], dtype=torch.int32)
    error = torch.zeros(4, dtype=torch.int32)
    stats = torch.zeros(8, dtype=torch.int64)
    _wait_kernel[(2,)](flags, mask, expected, timeout, error, stats, NUM_RANKS=4, R_BLOCK=4)
    assert error.tolist() == [1, 9, 1, 2], error
    assert stats[2] == 0, stats
    assert 0 <= stats[0] < timeout, stats
    assert stats[1] >= timeout, stats
    assert stats[3] >= timeout, stats
    assert bool((stats[4:] == 0).all()), stats
    flags[1], flags[3] = 4, 2
    error.zero_()
    stats.zero_()
    _wait_kernel[(2,)](flags, mask, expected, timeout, error, stats, NUM_RANKS=4, R_BLOCK=4)
    assert error.tolist() == [0, 0, 0, 0], error
    assert stats[2] == 0, stats
    assert bool(((stats[:4] >= 0) & (stats[:4] < timeout)).all()), stats

    # 12 ranks: source 3 masked (its flag never comes), source 10 one behind, lanes 12-15 past the group.
    expected = torch.arange(16, dtype=torch.int32) + 1
    flags = expected.clone()
    flags[3], flags[10], flags[12:] = 0, 10, 0
    mask = torch.zeros(12, dtype=torch.int32)
    mask[3] = 1
    for missing in (10, None):
        error.zero_()
        stats = torch.zeros(16, dtype=torch.int64)
        _wait_kernel[(1,)](flags, mask, expected, timeout, error, stats, NUM_RANKS=12, R_BLOCK=16)
        waited = torch.ones(16, dtype=torch.bool)
        waited[3], waited[12:] = False, False
        if missing is None:
            assert error.tolist() == [0, 0, 0, 0], error
        else:
            assert error.tolist() == [1, 9, missing, 2], error
            assert stats[missing] >= timeout, stats
            waited[missing] = False
        assert bool(((stats[waited] >= 0) & (stats[waited] < timeout)).all()), stats
        assert stats[3] == 0, stats
        assert bool((stats[12:] == 0).all()), stats
        flags[10] = 11

    # Rank 1 masks rank 0 (sends nothing to it) while rank 0 still waits on rank 1: rank 0's
    # receive phases time out naming source 1, and still finish (own tokens only).
    world = World(num_ranks=2, capacity=4, hidden=256, num_topk=2, num_experts=4, seed=7)
    masks = [torch.tensor([0, 0], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)]
    world.buffers[0][: world.words(DISPATCH, 0).staging] = 0  # fresh header: no count from rank 1
    g = torch.Generator().manual_seed(0)
    gathers = [torch.zeros(2, 4, 2, dtype=torch.int64) for _ in range(2)]
    topks = [_random_topk(3, 4, 2, g) for _ in range(2)]
    for rank in range(2):
        world.dispatch_send(
            rank, torch.randn(3, 256, generator=g).bfloat16(), topks[rank], masks[rank], gathers[rank], 0, 2
        )
    got = world.dispatch_recv(0, masks[0], gathers[0], 0, timeout_ns=timeout)
    assert world.states[0].error.tolist() == [1, DISPATCH_OP, 1, 0], world.states[0].error
    assert world.states[0].wait_stats[1] >= timeout, world.states[0].wait_stats
    assert torch.equal(
        got["count"], (topks[0].unsqueeze(0) == torch.arange(2).view(-1, 1, 1)).any(-1).sum(-1).int()
    )
    world.states[0].error.zero_()
    expert_out = torch.randn(2, 8, 256, generator=g).bfloat16()
    world.combine_send(0, expert_out, gathers[0], masks[0], 0, num_sms=1)  # rank 0 hears itself only
    world.combine_recv(0, topks[0], torch.rand(3, 2, generator=g), masks[0], 0, num_sms=1, timeout_ns=timeout)
    assert world.states[0].error.tolist() == [1, COMBINE_OP, 1, 0], world.states[0].error


def check_one_launch() -> None:
    """Each op as one launch of both phases (``Phase.BOTH``: send, signal, wait and receive in one
    kernel, several local experts per program): on 1 simulated rank, and on 3 ranks where one rank
    runs both phases at once and the others run them as two launches, bf16 and FP8, with a masked
    rank, repeated on both parities so the sequence numbers it expects stay in step."""
    solo = World(num_ranks=1, capacity=4, hidden=256, num_topk=3, num_experts=4, seed=11)
    for i, (n, parity) in enumerate([(4, 0), (2, 1), (0, 0), (3, 1)]):
        _run_round(solo, (n,), [(0,)], parity, seed=70 + i, both_rank=0)
    _run_round(solo, (3,), [(0,)], 0, seed=75, fp8=True, ue8m0=True, both_rank=0)
    world = World(num_ranks=3, capacity=5, hidden=256, num_topk=3, num_experts=6, seed=12)
    open_mask = [(0, 0, 0)] * 3
    shrunk = [(0, 1, 0), (1, 0, 1), (0, 1, 0)]  # rank 1 out
    rounds = [((5, 3, 4), open_mask, 0, 2), ((1, 5, 0), open_mask, 1, 0), ((4, 0, 5), shrunk, 0, 2)]
    for i, (num_tokens, masks, parity, both_rank) in enumerate(rounds):
        _run_round(world, num_tokens, masks, parity, seed=80 + i, both_rank=both_rank)
    _run_round(world, (2, 5, 3), open_mask, 1, seed=90, fp8=True, both_rank=1)


def check_shrink_waits() -> None:
    """Shrink mode: an expired wait masks every missing source and logs the operation in word
    ``4 + s`` of the error word, reporting no error; the masked barrier (the low-latency buffer
    clean) releases only unmasked ranks, waits for them, and with shrink masks a rank that never
    arrives."""
    # Well above the interpreter's time for one pass over the lanes on a loaded 2-core machine
    # (4.4 ms was seen), so an arrived source never reads as timed out.
    timeout = 200_000_000
    flags = torch.tensor([5, 3, 0, 1], dtype=torch.int32)
    mask = torch.tensor([0, 0, 1, 0], dtype=torch.int32)
    expected = torch.tensor([5, 4, 7, 2], dtype=torch.int32)
    error = torch.zeros(4 + 4, dtype=torch.int32)
    stats = torch.zeros(4, dtype=torch.int64)
    _wait_kernel[(1,)](flags, mask, expected, timeout, error, stats, NUM_RANKS=4, R_BLOCK=4, SHRINK=True)
    assert error.tolist() == [0, 0, 0, 0, 0, 9, 0, 9], error  # sources 1 and 3 missed: masked
    assert mask.tolist() == [0, 1, 1, 1], mask

    # 3 ranks, rank 2 masked by rank 0 beforehand; rank 1 already released epoch 4 at rank 0.
    buffers = [torch.zeros(64, dtype=torch.int32) for _ in range(3)]
    buffers[0][1] = 4
    errors = [torch.zeros(4 + 3, dtype=torch.int32) for _ in range(3)]
    masks = [torch.tensor([0, 0, 1], dtype=torch.int32), torch.zeros(3, dtype=torch.int32)]
    peers = [symmetric_peers(buffers, rank, errors[rank], timeout) for rank in range(2)]
    launch_masked_barrier(peers=peers[0], rank_mask=masks[0], epoch=4, operation_code=10, shrink=False)
    assert [int(buffer[0]) for buffer in buffers] == [4, 4, 0], buffers  # released at ranks 0, 1 only
    assert errors[0].tolist() == [0] * 7, errors[0]
    # Rank 1 does not mask rank 2, which never arrives: an error without shrink, a mask with it.
    launch_masked_barrier(peers=peers[1], rank_mask=masks[1], epoch=4, operation_code=10, shrink=False)
    assert errors[1].tolist() == [1, 10, 2, 1, 0, 0, 0], errors[1]
    errors[1].zero_()
    buffers[1][0] = 5  # rank 0 arrived at the next barrier
    launch_masked_barrier(peers=peers[1], rank_mask=masks[1], epoch=5, operation_code=10, shrink=True)
    assert errors[1].tolist() == [0, 0, 0, 0, 0, 0, 10], errors[1]
    assert masks[1].tolist() == [0, 0, 1], masks[1]
    assert buffers[2][1] == 5, "released at rank 2 before it was masked"


def check_put_barrier() -> None:
    """The masked barrier's put path (the multi-node low-latency buffer): uint64 flags (the epoch in
    the low word), a store to the rank of this node and an NVSHMEM signal (here a CPU stand-in) to
    the ranks of other nodes; a rank of another node that never arrives is named, or masked in
    shrink mode."""
    timeout = 200_000_000
    # 4 ranks, nodes {0, 1} and {2, 3}; rank 1 runs the barrier, ranks 0 and 2 already arrived.
    buffers = [torch.zeros(64, dtype=torch.int32) for _ in range(4)]
    buffers[1][0], buffers[1][4] = 6, 6  # ranks 0 and 2 released epoch 6 at rank 1 (words 2 * s)
    error = torch.zeros(4 + 4, dtype=torch.int32)
    peers = symmetric_peers(buffers, 1, error, timeout)
    put = BarrierPut(
        torch.tensor([1, 1, 0, 0], dtype=torch.int32),
        torch.arange(4, dtype=torch.int32),
        barrier_kernels.masked_barrier_put_kernel,
    )
    mask = torch.zeros(4, dtype=torch.int32)
    launch_masked_barrier(peers=peers, rank_mask=mask, epoch=6, operation_code=10, shrink=False, put=put)
    assert [buffer[2:4].tolist() for buffer in buffers] == [[6, 0]] * 4, buffers  # rank 1's flag everywhere
    assert error.tolist() == [1, 10, 3, 1, 0, 0, 0, 0], error  # rank 3 (another node) never came
    error.zero_()
    launch_masked_barrier(peers=peers, rank_mask=mask, epoch=6, operation_code=10, shrink=True, put=put)
    assert error.tolist() == [0, 0, 0, 0, 0, 0, 0, 10], error
    assert mask.tolist() == [0, 0, 0, 1], mask


CHECKS: dict[str, Callable[[], None]] = {
    "dispatch_send": check_dispatch_send,
    "dispatch_combine": check_dispatch_combine,
    "dispatch_fp8": check_dispatch_fp8,
    "fingerprints": check_fingerprints,
    "put_path": check_put_path,
    "row_blocks": check_row_blocks,
    "wait": check_wait,
    "one_launch": check_one_launch,
    "shrink_waits": check_shrink_waits,
    "put_barrier": check_put_barrier,
}

if __name__ == "__main__":
    triton_interpreter.run_checks(CHECKS)
