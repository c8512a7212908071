"""The pure-PyTorch reference backend: every mode on ``torch.distributed`` point-to-point messages.

Runs wherever ``torch.distributed`` does (gloo on CPU, NCCL on GPUs) and is the oracle the GPU
backends are tested against. It is written for clarity, not speed: it synchronizes with the host
to size its normal-mode messages (the low-latency path does not: it sends fixed-capacity blocks).

In multi-node mode (``epcomm.topology``) it returns DeepEP's internode handle and reduces combine
by node as DeepEP does (``reference_internode``); its messages still go straight from rank to rank.
"""

from __future__ import annotations

from typing import Any

import torch

from epcomm.backends.base import (
    CombineRequest,
    CombineResult,
    DispatchRequest,
    DispatchResult,
    LowLatencyDelegation,
    LowLatencyEngine,
)
from epcomm.backends.p2p import PeerGroup
from epcomm.backends.reference_internode import InternodeCall, combine_by_node, zero_header_words
from epcomm.backends.reference_ll import ReferenceLowLatency
from epcomm.backends.rows import RowLayout, expert_counts_list, pad_rows, received_rows
from epcomm.fingerprint import (
    FINGERPRINT_WORDS,
    CallFingerprint,
    CallNumbers,
    check_fingerprints,
    check_row_counts,
)
from epcomm.handles import DispatchHandle, InternodeHandle, NormalHandle
from epcomm.layout import DispatchLayout, compute_dispatch_layout, rows_in_order
from epcomm.topology import NodeTopology
from epcomm.traffic import CallBytes, count_call_bytes, row_bytes

__all__ = ["ReferenceBackend"]


def _exchange(
    peers: PeerGroup, operation: str, sends: list[torch.Tensor], recv_sizes: list[int]
) -> list[torch.Tensor]:
    """Send the 1-D ``sends[j]`` to each rank ``j``; return what each rank ``s`` sent here (1-D,
    ``recv_sizes[s]`` elements of the same dtype; this rank's own ``sends[rank]``)."""
    mine = sends[peers.rank]
    recvs = {
        src: torch.empty(recv_sizes[src], dtype=mine.dtype, device=mine.device)
        for src in range(peers.num_ranks)
        if src != peers.rank
    }
    others = {dst: sends[dst] for dst in range(peers.num_ranks) if dst != peers.rank}
    peers.post(operation, others, recvs).wait()
    return [mine if src == peers.rank else recvs[src] for src in range(peers.num_ranks)]


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, 1-D uint8."""
    return tensor.contiguous().view(torch.uint8).reshape(-1)


class ReferenceBackend(LowLatencyDelegation):
    """Normal and low-latency modes over ``torch.distributed``.

    Arguments:
        group: the process group (gloo or NCCL).
        timeout_s: bound of every wait for a peer.
        num_ranks_per_node: ranks per node, for the per-node layout counts.
        enable_shrink: shrink mode: a low-latency wait masks a peer that does not arrive within
            ``shrink_timeout_s`` instead of raising (on gloo groups; see ``ReferenceLowLatency``).
        shrink_timeout_s: that bound, in seconds.
        multi_node: multi-node mode (normal mode with DeepEP's internode semantics).

    Raises:
        ValueError: the ranks disagree on ``num_ranks_per_node`` or ``multi_node`` (checked with
            one bounded message each way, in the constructor).
    """

    name = "reference"

    def __init__(
        self,
        group: Any,
        timeout_s: float,
        num_ranks_per_node: int,
        enable_shrink: bool,
        *,
        shrink_timeout_s: float,
        multi_node: bool = False,
    ) -> None:
        self.peers = PeerGroup(group, timeout_s)
        self.rank = self.peers.rank
        self.num_ranks = self.peers.num_ranks
        self.num_ranks_per_node = num_ranks_per_node
        self.topology = NodeTopology(self.num_ranks, num_ranks_per_node)
        self.multi_node = multi_node
        self.calls = CallNumbers()
        # Both modes share the call counter, and the first message of every call has one size in
        # both modes (see ``_exchange_header``): a rank in a normal-mode call and one in a
        # low-latency call raise InconsistentCallError and stay in step for the next call.
        extra_words = len(zero_header_words(self.topology)) if multi_node else 0
        self.low_latency = ReferenceLowLatency(
            self.peers,
            shrink_timeout_s if enable_shrink else None,
            extra_header_words=extra_words,
            calls=self.calls,
        )
        self.enable_shrink = enable_shrink
        self._last_call: tuple[str, int, NormalHandle] | None = None
        self._check_same_topology()

    def _check_same_topology(self) -> None:
        """Every rank must see the same nodes and mode: the call headers' size depends on them."""
        if self.num_ranks == 1:
            return
        mine = [self.num_ranks_per_node, int(self.multi_node)]
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.peers.supports_cuda
            else torch.device("cpu")
        )
        words = torch.tensor(mine, dtype=torch.int64, device=device)
        received = _exchange(
            self.peers, "Buffer() (topology check)", [words] * self.num_ranks, [2] * self.num_ranks
        )
        for peer, theirs in enumerate(received):
            if theirs.tolist() != mine:
                raise ValueError(
                    f"Buffer(): rank {self.rank} has {mine[0]} ranks per node and multi-node mode "
                    f"{bool(mine[1])}, rank {peer} has {theirs[0]} and {bool(theirs[1])}: set "
                    "EPCOMM_RANKS_PER_NODE / LOCAL_WORLD_SIZE and num_rdma_bytes alike on every rank"
                )

    # ---- layout -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """See ``epcomm.layout.compute_dispatch_layout``."""
        return compute_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)

    # ---- normal mode --------------------------------------------------------------------------
    def _exchange_header(
        self,
        operation: str,
        fingerprint: CallFingerprint,
        send_counts: list[int],
        device: torch.device,
        node_words: list[int] | None = None,
    ) -> list[list[int]]:
        """The first message of every normal-mode call, and the check of its fingerprint.

        Every rank sends every peer ``[fingerprint (FINGERPRINT_WORDS) | rows it sends to each rank
        (num_ranks)]`` int64, in multi-node mode followed by ``node_words`` (``num_nodes + 1``
        words, ``InternodeCall.header_words``; zeros when not given): the same size in every
        call and every operation, so it always arrives whole whatever the peer called, and the
        peers' fingerprints are compared before anything else of the call is posted. On a
        difference every rank that sees it raises (each rank hears from every peer, so every rank
        does) and no message of the call is left pending.

        Returns:
            ``words[s]``: what rank ``s`` sent after its fingerprint; ``words[s][j]`` for
            ``j < num_ranks`` = rows rank ``s`` sends to rank ``j`` in this call.

        Raises:
            InconsistentCallError: a peer's fingerprint differs from this rank's.
        """
        if self.multi_node:
            send_counts = send_counts + (node_words or zero_header_words(self.topology))
        header = torch.tensor(fingerprint.words() + send_counts, dtype=torch.int64, device=device)
        size = header.numel()
        received = _exchange(self.peers, operation, [header] * self.num_ranks, [size] * self.num_ranks)
        rows = torch.stack(received).cpu().tolist()
        check_fingerprints(
            self.rank,
            fingerprint,
            {
                src: CallFingerprint.from_words(row[:FINGERPRINT_WORDS])
                for src, row in enumerate(rows)
                if src != self.rank
            },
        )
        return [row[FINGERPRINT_WORDS:] for row in rows]

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Normal-mode dispatch; see ``Buffer.dispatch``."""
        if request.handle is not None:
            return self._cached_dispatch(request, request.handle)
        assert request.num_tokens_per_expert is not None
        x, is_token_in_rank = request.x, request.is_token_in_rank
        device, num_tokens, rank = x.device, x.size(0), self.rank
        num_experts = request.num_tokens_per_expert.numel()
        num_local_experts = num_experts // self.num_ranks
        fingerprint = self.calls.stamp(request.fingerprint)
        internode = (
            InternodeCall(is_token_in_rank, self.topology, rank, request.config.num_channels)
            if self.multi_node
            else None
        )
        words = self._exchange_header(
            "dispatch (count exchange)",
            fingerprint,
            is_token_in_rank.sum(dim=0).tolist(),
            device,
            internode.header_words() if internode is not None else None,
        )
        counts = [row[: self.num_ranks] for row in words]
        if internode is not None:
            internode.accept_header(fingerprint, words)
        matrix = torch.tensor(counts, dtype=torch.int64, device="cpu")
        rank_prefix_matrix = matrix.cumsum(dim=0).to(torch.int32)
        recv_counts = matrix[:, rank].tolist()
        num_recv = int(sum(recv_counts))

        token_idx = torch.arange(num_tokens, dtype=torch.int32, device=device).view(-1, 1)
        layout, tensors = RowLayout.of(
            [x, token_idx, request.x_scales, request.topk_idx, request.topk_weights]
        )
        packed = layout.pack(tensors)
        # Each message to rank j: the counts of j's local experts (num_local_experts int64), then the
        # rows. Their size depends on num_experts, which the header could not carry without growing
        # with it: here it is fixed by the fingerprints the header compared.
        # In multi-node mode each message ends in its InternodeMessage (sizes from the header).
        per_expert_bytes = _as_bytes(request.num_tokens_per_expert.to(torch.int64))
        expert_bytes = num_local_experts * 8
        sends = [
            torch.cat(
                [
                    per_expert_bytes[dst * expert_bytes : (dst + 1) * expert_bytes],
                    packed[is_token_in_rank[:, dst]].reshape(-1),
                ]
                + ([internode.message_to(dst)] if internode is not None else [])
            )
            for dst in range(self.num_ranks)
        ]
        row_ends = [expert_bytes + n * layout.row_bytes for n in recv_counts]
        sizes = [
            end + (internode.message_bytes(src, n) if internode is not None else 0)
            for src, (end, n) in enumerate(zip(row_ends, recv_counts))
        ]
        received = _exchange(self.peers, "dispatch", sends, sizes)
        messages = [
            internode.read(src, message[end:], n)
            for src, (message, end, n) in enumerate(zip(received, row_ends, recv_counts))
            if internode is not None
        ]
        received = [message[:end] for message, end in zip(received, row_ends)]
        per_expert = sum(
            (message[:expert_bytes].cpu().clone().view(torch.int64) for message in received),
            torch.zeros(num_local_experts, dtype=torch.int64, device="cpu"),
        )
        per_expert_list = expert_counts_list(per_expert, request.expert_alignment, request.num_worst_tokens)
        rows = torch.cat([message[expert_bytes:] for message in received]).view(-1, layout.row_bytes)
        unpacked = layout.unpack(rows)
        recv_src_idx = unpacked[1].view(-1)
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights, num_rows = received_rows(
            [unpacked[0], *unpacked[2:]],
            request.x_scales is not None,
            request.topk_idx is not None,
            request.topk_weights is not None,
            rank,
            num_local_experts,
            request.num_worst_tokens,
        )
        recv_src_idx = pad_rows(recv_src_idx, num_rows, -1)

        handle: NormalHandle
        if internode is not None:
            handle = internode.handle(recv_counts, messages, num_rows).with_sequence(fingerprint.sequence)
            self._record("dispatch", handle, x, request.x_scales, request.topk_idx, request.topk_weights)
            return DispatchResult(
                recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle
            )
        previous = rank_prefix_matrix[rank - 1] if rank > 0 else torch.zeros_like(rank_prefix_matrix[0])
        recv_row_of_token = rows_in_order(is_token_in_rank, previous.to(device))
        handle = DispatchHandle(
            rank_prefix_matrix=rank_prefix_matrix.to(device),
            is_token_in_rank=is_token_in_rank,
            recv_row_of_token=recv_row_of_token,
            recv_src_idx=recv_src_idx,
            num_recv_tokens=torch.tensor([num_recv], dtype=torch.int32, device=device),
            num_recv_rows=num_rows,
            num_max_rows=request.num_worst_tokens
            or int(max(int(matrix.sum(dim=0).max()), int(matrix.sum(dim=1).max()))),
            sequence=fingerprint.sequence,
        )
        self._record("dispatch", handle, x, request.x_scales, request.topk_idx, request.topk_weights)
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle)

    def _record(self, operation: str, handle: NormalHandle, *tensors: torch.Tensor | None) -> None:
        """Keep what ``last_call_bytes`` needs (counted only when asked)."""
        self._last_call = (operation, row_bytes(*tensors), handle)

    def last_call_bytes(self) -> CallBytes | None:
        """Bytes this rank sent in the last normal-mode call under each scheme (``epcomm.traffic``);
        ``None`` before the first call, and when the group spans nodes outside multi-node mode."""
        if self._last_call is None:
            return None
        operation, num_row_bytes, handle = self._last_call
        if isinstance(handle, DispatchHandle) and self.topology.num_nodes > 1:
            return None
        return count_call_bytes(operation, num_row_bytes, handle, self.topology, self.rank)

    def _source_ranges(self, handle: NormalHandle) -> list[tuple[int, int]]:
        if isinstance(handle, InternodeHandle):
            column = handle.recv_gbl_rank_prefix_sum.tolist()
        else:
            column = handle.rank_prefix_matrix[:, self.rank].tolist()
        starts = [0, *column[:-1]]
        return list(zip(starts, column))

    def _handle_header(
        self,
        operation: str,
        fingerprint: CallFingerprint,
        send_counts: list[int],
        expected: list[int],
        device: torch.device,
    ) -> None:
        """The header of a call on a dispatch's handle (cached dispatch, combine): the call has no
        exchange of a size known in advance (its rows follow from the handle), so this one small
        message is added as its first; besides the fingerprints, it checks that every peer sends
        the rows this rank's handle expects from it, so the payload sizes cannot disagree either."""
        counts = self._exchange_header(operation, fingerprint, send_counts, device)
        check_row_counts(
            self.rank,
            fingerprint,
            expected,
            {src: row[self.rank] for src, row in enumerate(counts) if src != self.rank},
        )

    def _cached_dispatch(self, request: DispatchRequest, handle: NormalHandle) -> DispatchResult:
        layout, tensors = RowLayout.of([request.x, request.x_scales])
        recv_counts = [end - start for start, end in self._source_ranges(handle)]
        send_counts = handle.is_token_in_rank.sum(dim=0).tolist()
        fingerprint = self.calls.stamp(request.fingerprint)
        self._handle_header(
            "cached dispatch (header exchange)", fingerprint, send_counts, recv_counts, request.x.device
        )
        packed = layout.pack(tensors)
        sends = [packed[handle.is_token_in_rank[:, dst]].reshape(-1) for dst in range(self.num_ranks)]
        received = _exchange(
            self.peers, "cached dispatch", sends, [n * layout.row_bytes for n in recv_counts]
        )
        rows = torch.cat(received).view(-1, layout.row_bytes)
        unpacked = [pad_rows(t, handle.num_recv_rows, 0) for t in layout.unpack(rows)]
        recv_scales = unpacked[1] if request.x_scales is not None else None
        self._record("cached dispatch", handle, request.x, request.x_scales)
        return DispatchResult(unpacked[0], recv_scales, None, None, [], handle)

    def combine(self, request: CombineRequest) -> CombineResult:
        """Normal-mode combine; see ``Buffer.combine``."""
        handle = request.handle
        x = request.x
        layout, tensors = RowLayout.of([x, request.topk_weights])
        ranges = self._source_ranges(handle)
        recv_counts = handle.is_token_in_rank.sum(dim=0).tolist()
        fingerprint = self.calls.stamp(request.fingerprint)
        self._handle_header(
            "combine (header exchange)",
            fingerprint,
            [end - start for start, end in ranges],
            recv_counts,
            x.device,
        )
        packed = layout.pack(tensors)
        sends = [packed[start:end].reshape(-1) for start, end in ranges]
        received = _exchange(self.peers, "combine", sends, [n * layout.row_bytes for n in recv_counts])
        self._record("combine", handle, x, request.topk_weights)
        if isinstance(handle, InternodeHandle):
            returned = [layout.unpack(message.view(-1, layout.row_bytes)) for message in received]
            return CombineResult(
                *combine_by_node(handle.is_token_in_rank, returned, self.topology, request.bias)
            )
        num_tokens = handle.is_token_in_rank.size(0)
        combined = torch.zeros(num_tokens, x.size(1), dtype=torch.float32, device=x.device)
        combined_weights = None
        if request.topk_weights is not None:
            combined_weights = torch.zeros(
                num_tokens, request.topk_weights.size(1), dtype=torch.float32, device=x.device
            )
        # Fixed reduction order (rank 0 first), one index_add per rank with unique indices:
        # deterministic, and the order the GPU kernels follow.
        for dst in range(self.num_ranks):
            token_idx = handle.is_token_in_rank[:, dst].nonzero().view(-1)
            parts = layout.unpack(received[dst].view(-1, layout.row_bytes).to(x.device))
            combined.index_add_(0, token_idx, parts[0].float())
            if combined_weights is not None:
                combined_weights.index_add_(0, token_idx, parts[1])
        for bias in request.bias:
            combined += bias.float()
        return CombineResult(combined.to(torch.bfloat16), combined_weights)

    # ---- low-latency mode: LowLatencyDelegation forwards to ReferenceLowLatency -----------------
    def _low_latency_engine(self) -> LowLatencyEngine:
        return self.low_latency

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Drop the low-latency result buffers, then a bounded barrier among the unmasked ranks
        (in shrink mode a peer missing there is masked; otherwise ``PeerTimeoutError``)."""
        self.low_latency.clean()
        self.low_latency.barrier(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def destroy(self) -> None:
        """Release the result buffers."""
        self.low_latency.clean()
