"""Low-latency mode of the reference backend: fixed-capacity messages, no host synchronization.

Every rank sends its whole (padded) batch ``[M, hidden]`` plus ``topk_idx`` to every unmasked
peer; each receiver packs the tokens of its local experts into the expert-major layout with
shape-static tensor ops (so the path never reads a count on the host). Combine sends, for each
(token, top-k slot) of a source rank, the expert output that lives here (zeros elsewhere); the
token's rank applies the weights in top-k order in float32.

Shrink mode (on gloo groups): every wait gives each peer ``shrink_timeout_s`` to arrive; a peer
that does not (or whose connection fails) is masked at that moment with a ``PeerMaskedWarning``,
and the call finishes without it: a dispatch treats it as a source that sent nothing, a combine
treats the top-k slots whose expert lives on it as ``-1``. ``epcomm.backends.p2p`` explains how a
wait on gloo can give up on a peer and what that leaves behind.

Every call first exchanges its fingerprint (``epcomm.fingerprint``: operation, call number, sizes,
the dispatch a combine undoes) and raises ``InconsistentCallError`` on every rank that sees a
difference, before its payload is posted.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from epcomm import quant
from epcomm.backends.base import (
    LowLatencyCombineRequest,
    LowLatencyCombineResult,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
    ResultBuffers,
    finish_receive,
)
from epcomm.backends.p2p import PeerGroup, PendingExchange, TolerantExchange
from epcomm.backends.rows import RowLayout
from epcomm.errors import PeerMaskedWarning
from epcomm.fingerprint import FINGERPRINT_WORDS, CallFingerprint, CallNumbers, XFormat, check_fingerprints
from epcomm.handles import LowLatencyHandle

__all__ = ["ReferenceLowLatency"]


class ReferenceLowLatency:
    """Low-latency dispatch/combine for ``ReferenceBackend``, with two alternating result buffers.

    Arguments:
        peers: the group.
        shrink_timeout_s: shrink mode's bound on each peer's arrival, after which the peer is
            masked; ``None`` (shrink mode off) or an NCCL group: a missing peer raises
            ``PeerTimeoutError`` after ``peers.timeout_s``.
        extra_header_words: words the normal-mode calls of the same ``Buffer`` add to their first
            message after ``FINGERPRINT_WORDS + num_ranks`` (multi-node mode: ``num_nodes + 1``,
            ``reference_internode.zero_header_words``); the first message of a low-latency call
            carries as many zeros, so both modes' first messages have one size.
        calls: the call counter, shared with the normal mode of the same ``Buffer`` so that a call
            in which ranks chose different modes advances every rank's count alike; default: a
            counter of its own.
    """

    def __init__(
        self,
        peers: PeerGroup,
        shrink_timeout_s: float | None = None,
        extra_header_words: int = 0,
        calls: CallNumbers | None = None,
    ) -> None:
        self.peers = peers
        self.extra_header_words = extra_header_words
        self.calls = CallNumbers() if calls is None else calls
        self.mask = torch.zeros(peers.num_ranks, dtype=torch.int32, device="cpu")
        self.shrink_timeout_s = shrink_timeout_s if peers.supports_tolerant_waits else None
        self._parity = 0
        self._buffers = ResultBuffers()

    def clean(self) -> None:
        """Forget the result buffers."""
        self._buffers.clear()

    def set_mask(self, rank: int, masked: bool) -> None:
        """Shrink mode: skip ``rank`` (no send, no wait) while masked."""
        self.mask[rank] = int(masked)

    def _active_peers(self) -> list[int]:
        return [r for r in range(self.peers.num_ranks) if r != self.peers.rank and int(self.mask[r]) == 0]

    def _post(
        self, operation: str, sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor]
    ) -> PendingExchange | TolerantExchange:
        if self.shrink_timeout_s is None:
            return self.peers.post(operation, sends, recvs)
        return self.peers.post_tolerant(operation, sends, recvs)

    def _finish(self, operation: str, pending: PendingExchange | TolerantExchange) -> set[int]:
        """Complete ``pending``. In shrink mode, mask each peer the wait gave up on (warning once
        per newly masked peer, now) and return them: their receives were not filled."""
        if isinstance(pending, PendingExchange):
            pending.wait()
            return set()
        assert self.shrink_timeout_s is not None
        masked = [r for r in range(self.peers.num_ranks) if int(self.mask[r]) != 0]
        dropped = pending.wait(self.shrink_timeout_s, give_up=masked)
        for peer, waited_s, cause in dropped:
            if int(self.mask[peer]) == 0:
                self.mask[peer] = 1
                waited_s = self.shrink_timeout_s if cause is None else waited_s
                warnings.warn(
                    PeerMaskedWarning(operation, self.peers.rank, peer, waited_s, cause), stacklevel=2
                )
        return {d.peer for d in dropped}

    def _agree(self, operation: str, fingerprint: CallFingerprint, device: torch.device) -> None:
        """The call's first message: its fingerprint to and from every unmasked peer, compared
        before the payload is posted (the payload's size follows from it, so ranks that disagree
        never post messages of different sizes). The message has the size of a normal-mode call's
        first message (``FINGERPRINT_WORDS + num_ranks + extra_header_words`` int64, the counts
        zero), so a rank in a normal-mode call and one in a low-latency call also meet on equal
        sizes (in multi-node mode too) and are told apart by the operation word. The call waits
        here for its peers to enter the same call.

        Raises:
            InconsistentCallError: a peer's fingerprint differs from this rank's.
            PeerTimeoutError: without shrink mode, a peer did not arrive.
        """
        words = fingerprint.words() + [0] * (self.peers.num_ranks + self.extra_header_words)
        header = torch.tensor(words, dtype=torch.int64, device=device)
        active = self._active_peers()
        recvs = {peer: torch.empty_like(header) for peer in active}
        dropped = self._finish(operation, self._post(operation, dict.fromkeys(active, header), recvs))
        theirs = {
            peer: CallFingerprint.from_words(recvs[peer][:FINGERPRINT_WORDS].tolist())
            for peer in active
            if peer not in dropped
        }
        check_fingerprints(self.peers.rank, fingerprint, theirs)

    def barrier(self, capacity: int, hidden: int, num_experts: int) -> None:
        """``clean_low_latency_buffer``'s barrier: the call's fingerprint to and from every unmasked
        peer (``_agree``), so a peer in another call raises ``InconsistentCallError`` here.

        Raises:
            InconsistentCallError: a peer is in another call, or cleans for other sizes.
            PeerTimeoutError: without shrink mode, naming the peers that did not arrive.
        """
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        cuda = self.peers.supports_cuda
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        fingerprint = self.calls.stamp(
            CallFingerprint.for_clean_low_latency_buffer(hidden, num_experts, capacity)
        )
        self._agree("clean_low_latency_buffer", fingerprint, device)

    def combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The zero-copy combine buffer of ``handle``'s parity, ``[L, R * M, hidden]`` bf16."""
        num_ranks = self.peers.num_ranks
        shape = (
            handle.num_experts // num_ranks,
            num_ranks * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        return self._buffers.get(
            handle.buffer_parity, "combine", shape, torch.bfloat16, handle.recv_src_info.device
        )

    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """See ``Buffer.low_latency_dispatch``."""
        x, topk_idx = request.x, request.topk_idx
        rank, num_ranks = self.peers.rank, self.peers.num_ranks
        capacity = request.num_max_dispatch_tokens_per_rank
        num_tokens, hidden = x.shape
        num_topk = topk_idx.size(1)
        num_local_experts = request.num_experts // num_ranks
        num_rows = num_ranks * capacity
        device = x.device
        x_format = XFormat.for_low_latency(request.use_fp8, request.use_ue8m0)
        fingerprint = self.calls.stamp(
            CallFingerprint.for_low_latency_dispatch(
                hidden, x_format, request.num_experts, num_topk, capacity
            )
        )
        self._agree("low_latency_dispatch", fingerprint, device)
        parity, self._parity = self._parity, self._parity ^ 1

        padded_x = torch.zeros(capacity, hidden, dtype=torch.bfloat16, device=device)
        padded_x[:num_tokens] = x
        padded_topk = torch.full((capacity, num_topk), -1, dtype=torch.int64, device=device)
        padded_topk[:num_tokens] = topk_idx
        layout = RowLayout([(hidden, torch.bfloat16), (num_topk, torch.int64)])
        packed = layout.pack([padded_x, padded_topk])
        active = self._active_peers()
        recvs = {src: torch.empty_like(packed) for src in active}
        pending = self._post("low_latency_dispatch", dict.fromkeys(active, packed), recvs)

        shape = (num_local_experts, num_rows, hidden)
        if request.use_fp8:
            recv_x_fp8 = self._buffers.get(parity, "x_fp8", shape, torch.float8_e4m3fn, device)
            num_scale_cols = quant.num_packed_ue8m0(hidden) if request.use_ue8m0 else quant.num_scales(hidden)
            scale_dtype = torch.int32 if request.use_ue8m0 else torch.float32
            # Column-major in the last two dims, as DeepEP: stored [L, num_scales, rows].
            scale_storage = self._buffers.get(
                parity, "scales", (num_local_experts, num_scale_cols, num_rows), scale_dtype, device
            )
            recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = (
                recv_x_fp8,
                scale_storage.transpose(1, 2),
            )
        else:
            recv_x_bf16 = self._buffers.get(parity, "x_bf16", shape, torch.bfloat16, device)
            recv_x = recv_x_bf16
        recv_count = self._buffers.get(parity, "count", (num_local_experts,), torch.int32, device)
        recv_src_info = torch.empty(num_local_experts, num_rows, dtype=torch.int32, device=device)
        recv_layout_range = torch.empty(num_local_experts, num_ranks, dtype=torch.int64, device=device)
        combine_gather_idx = torch.empty(num_ranks, capacity, num_topk, dtype=torch.int64, device=device)
        handle = LowLatencyHandle(
            recv_src_info,
            recv_layout_range,
            capacity,
            hidden,
            request.num_experts,
            combine_gather_idx,
            parity,
            fingerprint.sequence,
        )

        def complete() -> None:
            dropped = self._finish("low_latency_dispatch", pending)
            blocks = []
            for src in range(num_ranks):
                if src == rank:
                    blocks.append(packed)
                elif src in recvs and src not in dropped:
                    blocks.append(recvs[src])
                else:  # masked source (before or during this call): nothing arrives from it
                    blocks.append(layout.pack([torch.zeros_like(padded_x), torch.full_like(padded_topk, -1)]))
            all_x, all_topk = layout.unpack(torch.cat(blocks))
            all_topk = all_topk.view(num_ranks, capacity, num_topk)
            local_experts = rank * num_local_experts + torch.arange(num_local_experts, device=device)
            hit = (all_topk.unsqueeze(0) == local_experts.view(-1, 1, 1, 1)).any(dim=-1)  # [L, R, M]
            cumulative = hit.view(num_local_experts, num_rows).long().cumsum(dim=-1)
            count = cumulative[:, -1]
            slots = torch.arange(1, num_rows + 1, device=device).expand(num_local_experts, -1).contiguous()
            source_row = torch.searchsorted(cumulative, slots).clamp(max=num_rows - 1)
            is_valid = slots <= count.view(-1, 1)

            if request.use_fp8:
                x_fp8, scales = quant.per_token_cast_to_fp8(all_x, request.round_scale, request.use_ue8m0)
                gathered = x_fp8.view(torch.uint8)[source_row.view(-1)].view(
                    num_local_experts, num_rows, hidden
                )
                gathered = torch.where(is_valid.unsqueeze(-1), gathered, torch.zeros_like(gathered))
                recv_x_fp8.view(torch.uint8).copy_(gathered)
                gathered_scales = scales[source_row.view(-1)].view(num_local_experts, num_rows, -1)
                gathered_scales = torch.where(
                    is_valid.unsqueeze(-1), gathered_scales, torch.zeros_like(gathered_scales)
                )
                scale_storage.copy_(gathered_scales.transpose(1, 2))
            else:
                rows = all_x[source_row.view(-1)].view(num_local_experts, num_rows, hidden)
                recv_x_bf16.copy_(torch.where(is_valid.unsqueeze(-1), rows, torch.zeros_like(rows)))
            recv_count.copy_(count.to(torch.int32))
            recv_src_info.copy_(torch.where(is_valid, source_row % capacity, torch.full_like(source_row, -1)))
            per_source = hit.sum(dim=-1)  # [L, R]
            begin = per_source.cumsum(dim=-1) - per_source
            recv_layout_range.copy_((begin << 32) | per_source)

            local_idx = all_topk - rank * num_local_experts
            is_local = (all_topk >= 0) & (local_idx >= 0) & (local_idx < num_local_experts)
            local_idx = local_idx.clamp(0, num_local_experts - 1)
            position = (cumulative - 1).view(num_local_experts, num_ranks, capacity)
            source_idx = torch.arange(num_ranks, device=device).view(-1, 1, 1)
            token_idx = torch.arange(capacity, device=device).view(1, -1, 1)
            flat_row = local_idx * num_rows + position[local_idx, source_idx, token_idx]
            combine_gather_idx.copy_(torch.where(is_local, flat_row, torch.full_like(flat_row, -1)))

            if request.cumulative_local_expert_recv_stats is not None:
                request.cumulative_local_expert_recv_stats.add_(recv_count)
            _add_wait_stats(request.dispatch_wait_recv_cost_stats, pending.wait_ns)

        return finish_receive(
            LowLatencyDispatchResult(recv_x, recv_count, handle, None), complete, request.return_recv_hook
        )

    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """See ``Buffer.low_latency_combine``."""
        handle = request.handle
        rank, num_ranks = self.peers.rank, self.peers.num_ranks
        num_tokens, num_topk = request.topk_idx.shape
        capacity, hidden = handle.num_max_dispatch_tokens_per_rank, handle.hidden
        fingerprint = self.calls.stamp(
            CallFingerprint.for_low_latency_combine(
                hidden, handle.num_experts, num_topk, capacity, handle.sequence
            )
        )
        self._agree("low_latency_combine", fingerprint, request.topk_idx.device)
        x = self.combine_buffer(handle) if request.zero_copy else request.x
        flat_x = x.reshape(-1, hidden)
        gather_idx = handle.combine_gather_idx
        expert_rows = flat_x[gather_idx.clamp(min=0).view(-1)].view(num_ranks, capacity, num_topk, hidden)
        expert_rows = torch.where((gather_idx >= 0).unsqueeze(-1), expert_rows, torch.zeros_like(expert_rows))
        byte_rows = expert_rows.view(torch.uint8).view(num_ranks, capacity, -1)
        active = self._active_peers()
        recvs = {src: torch.empty_like(byte_rows[rank]) for src in active}
        pending = self._post("low_latency_combine", {dst: byte_rows[dst] for dst in active}, recvs)
        out = request.out
        if out is None:
            out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=x.device)

        def complete() -> None:
            dropped = self._finish("low_latency_combine", pending)
            arrived = [src for src in active if src not in dropped]
            # Exactly one rank sends a non-zero row for each (token, slot); adding the zeros of the
            # others is exact, so the sum below equals that row.
            values = expert_rows[rank].clone()
            for src in arrived:
                values += recvs[src].view(torch.bfloat16).view(capacity, num_topk, hidden)
            # A slot whose expert lives on a rank that sent nothing (masked) counts as -1.
            is_slot = request.topk_idx >= 0
            silent = [r for r in range(num_ranks) if r != rank and r not in arrived]
            if silent:
                expert_rank = request.topk_idx.div(handle.num_experts // num_ranks, rounding_mode="floor")
                is_slot &= ~torch.isin(expert_rank, torch.tensor(silent, dtype=torch.int64, device=x.device))
            weights = torch.where(is_slot, request.topk_weights, torch.zeros_like(request.topk_weights))
            accumulator = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
            for slot in range(num_topk):
                accumulator += weights[:, slot : slot + 1] * values[:num_tokens, slot].float()
            out.copy_(accumulator)
            _add_wait_stats(request.combine_wait_recv_cost_stats, pending.wait_ns)

        return finish_receive(LowLatencyCombineResult(out, None), complete, request.return_recv_hook)


def _add_wait_stats(stats: torch.Tensor | None, wait_ns: dict[int, int]) -> None:
    """As DeepEP: add the time waited for each source rank at flat index ``src``."""
    if stats is None:
        return
    for src, nanoseconds in wait_ns.items():
        stats.view(-1)[src] += nanoseconds
