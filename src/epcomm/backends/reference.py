"""The pure-PyTorch reference backend: every mode on ``torch.distributed`` point-to-point messages.

Runs wherever ``torch.distributed`` does (gloo on CPU, NCCL on GPUs) and is the oracle the GPU
backends are tested against. It is written for clarity, not speed: it synchronizes with the host
to size its normal-mode messages (the low-latency path does not: it sends fixed-capacity blocks).
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
)
from epcomm.backends.p2p import PeerGroup
from epcomm.backends.reference_ll import ReferenceLowLatency
from epcomm.backends.rows import RowLayout
from epcomm.handles import DispatchHandle
from epcomm.layout import DispatchLayout, compute_dispatch_layout, rows_in_order

__all__ = ["ReferenceBackend"]


def _exchange_rows(
    peers: PeerGroup, operation: str, send_rows: list[torch.Tensor], recv_counts: list[int], row_bytes: int
) -> list[torch.Tensor]:
    """Send ``send_rows[j]`` (uint8 ``[n_j, row_bytes]``) to each rank ``j``; return what each sent."""
    device = send_rows[peers.rank].device
    recvs = {
        src: torch.empty(recv_counts[src], row_bytes, dtype=torch.uint8, device=device)
        for src in range(peers.num_ranks)
        if src != peers.rank
    }
    sends = {dst: send_rows[dst] for dst in range(peers.num_ranks) if dst != peers.rank}
    peers.post(operation, sends, recvs).wait()
    return [send_rows[src] if src == peers.rank else recvs[src] for src in range(peers.num_ranks)]


class ReferenceBackend(LowLatencyDelegation):
    """Normal and low-latency modes over ``torch.distributed``.

    Arguments:
        group: the process group (gloo or NCCL).
        timeout_s: bound of every wait for a peer.
        num_ranks_per_node: ranks per node, for the per-node layout counts.
        enable_shrink: shrink mode: a low-latency wait masks a peer that does not arrive within
            ``shrink_timeout_s`` instead of raising (on gloo groups; see ``ReferenceLowLatency``).
        shrink_timeout_s: that bound, in seconds.
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
    ) -> None:
        self.peers = PeerGroup(group, timeout_s)
        self.rank = self.peers.rank
        self.num_ranks = self.peers.num_ranks
        self.num_ranks_per_node = num_ranks_per_node
        self.low_latency = ReferenceLowLatency(self.peers, shrink_timeout_s if enable_shrink else None)
        self.enable_shrink = enable_shrink

    # ---- layout -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """See ``epcomm.layout.compute_dispatch_layout``."""
        return compute_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)

    # ---- normal mode --------------------------------------------------------------------------
    def _exchange_counts(
        self, send_counts: torch.Tensor, num_tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        """All ranks' ``[num_ranks + num_experts]`` count vectors, ``[num_ranks, num_ranks + num_experts]``."""
        mine = torch.cat([send_counts.long(), num_tokens_per_expert.long().to(send_counts.device)])
        row_bytes = mine.numel() * 8
        rows = [mine.view(torch.uint8).view(1, row_bytes)] * self.num_ranks
        received = _exchange_rows(
            self.peers, "dispatch (count exchange)", rows, [1] * self.num_ranks, row_bytes
        )
        return torch.stack([r.reshape(-1).view(torch.int64) for r in received]).cpu()

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Normal-mode dispatch; see ``Buffer.dispatch``."""
        if request.handle is not None:
            return self._cached_dispatch(request, request.handle)
        assert request.num_tokens_per_expert is not None
        x, is_token_in_rank = request.x, request.is_token_in_rank
        device, num_tokens, rank = x.device, x.size(0), self.rank
        num_experts = request.num_tokens_per_expert.numel()
        num_local_experts = num_experts // self.num_ranks
        send_counts = is_token_in_rank.sum(dim=0)
        all_counts = self._exchange_counts(send_counts, request.num_tokens_per_expert)
        matrix = all_counts[:, : self.num_ranks]
        rank_prefix_matrix = matrix.cumsum(dim=0).to(torch.int32)
        recv_counts = matrix[:, rank].tolist()
        num_recv = int(sum(recv_counts))
        per_expert = all_counts[:, self.num_ranks + rank * num_local_experts :][:, :num_local_experts].sum(
            dim=0
        )
        alignment = request.expert_alignment
        per_expert_list = (
            []
            if request.num_worst_tokens > 0
            else [(int(c) + alignment - 1) // alignment * alignment for c in per_expert.tolist()]
        )

        token_idx = torch.arange(num_tokens, dtype=torch.int32, device=device).view(-1, 1)
        fields: list[tuple[int, torch.dtype]] = [(x.size(1), x.dtype), (1, torch.int32)]
        tensors: list[torch.Tensor] = [x, token_idx]
        for extra in (request.x_scales, request.topk_idx, request.topk_weights):
            if extra is not None:
                fields.append((extra.size(1), extra.dtype))
                tensors.append(extra)
        layout = RowLayout(fields)
        packed = layout.pack(tensors)
        send_rows = [packed[is_token_in_rank[:, dst]] for dst in range(self.num_ranks)]
        received = _exchange_rows(self.peers, "dispatch", send_rows, recv_counts, layout.row_bytes)
        unpacked = layout.unpack(torch.cat(received))
        recv_x, recv_src_idx = unpacked[0], unpacked[1].view(-1)
        rest = iter(unpacked[2:])
        recv_scales = next(rest) if request.x_scales is not None else None
        recv_topk_idx = recv_topk_weights = None
        if request.topk_idx is not None:
            global_idx = next(rest)
            local_idx = global_idx - rank * num_local_experts
            is_local = (global_idx >= 0) & (local_idx >= 0) & (local_idx < num_local_experts)
            recv_topk_idx = torch.where(is_local, local_idx, torch.full_like(local_idx, -1))
            if request.topk_weights is not None:
                weights = next(rest)
                recv_topk_weights = torch.where(is_local, weights, torch.zeros_like(weights))

        num_rows = num_recv
        if request.num_worst_tokens > 0:
            if num_recv > request.num_worst_tokens:
                raise ValueError(
                    f"dispatch: num_worst_tokens={request.num_worst_tokens} but rank {rank} receives "
                    f"{num_recv} tokens; num_worst_tokens must be >= the largest receive count "
                    f"(at most num_tokens * num_ranks)"
                )
            num_rows = request.num_worst_tokens
            recv_x = _pad_rows(recv_x, num_rows, 0)
            recv_src_idx = _pad_rows(recv_src_idx, num_rows, -1)
            recv_scales = None if recv_scales is None else _pad_rows(recv_scales, num_rows, 0)
            recv_topk_idx = None if recv_topk_idx is None else _pad_rows(recv_topk_idx, num_rows, -1)
            recv_topk_weights = (
                None if recv_topk_weights is None else _pad_rows(recv_topk_weights, num_rows, 0)
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
        )
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle)

    def _source_ranges(self, handle: DispatchHandle) -> list[tuple[int, int]]:
        column = handle.rank_prefix_matrix[:, self.rank].tolist()
        starts = [0, *column[:-1]]
        return list(zip(starts, column))

    def _cached_dispatch(self, request: DispatchRequest, handle: DispatchHandle) -> DispatchResult:
        fields: list[tuple[int, torch.dtype]] = [(request.x.size(1), request.x.dtype)]
        tensors = [request.x]
        if request.x_scales is not None:
            fields.append((request.x_scales.size(1), request.x_scales.dtype))
            tensors.append(request.x_scales)
        layout = RowLayout(fields)
        packed = layout.pack(tensors)
        send_rows = [packed[handle.is_token_in_rank[:, dst]] for dst in range(self.num_ranks)]
        recv_counts = [end - start for start, end in self._source_ranges(handle)]
        received = _exchange_rows(self.peers, "cached dispatch", send_rows, recv_counts, layout.row_bytes)
        unpacked = [_pad_rows(t, handle.num_recv_rows, 0) for t in layout.unpack(torch.cat(received))]
        recv_scales = unpacked[1] if request.x_scales is not None else None
        return DispatchResult(unpacked[0], recv_scales, None, None, [], handle)

    def combine(self, request: CombineRequest) -> CombineResult:
        """Normal-mode combine; see ``Buffer.combine``."""
        handle = request.handle
        x = request.x
        fields: list[tuple[int, torch.dtype]] = [(x.size(1), x.dtype)]
        tensors = [x]
        if request.topk_weights is not None:
            fields.append((request.topk_weights.size(1), torch.float32))
            tensors.append(request.topk_weights)
        layout = RowLayout(fields)
        ranges = self._source_ranges(handle)
        packed = layout.pack(tensors)
        send_rows = [packed[start:end] for start, end in ranges]
        recv_counts = handle.is_token_in_rank.sum(dim=0).tolist()
        received = _exchange_rows(self.peers, "combine", send_rows, recv_counts, layout.row_bytes)
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
            parts = layout.unpack(received[dst].to(x.device))
            combined.index_add_(0, token_idx, parts[0].float())
            if combined_weights is not None:
                combined_weights.index_add_(0, token_idx, parts[1])
        for bias in request.bias:
            combined += bias.float()
        return CombineResult(combined.to(torch.bfloat16), combined_weights)

    # ---- low-latency mode: LowLatencyDelegation forwards to ReferenceLowLatency -----------------
    def _low_latency_engine(self) -> ReferenceLowLatency:
        return self.low_latency

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Drop the low-latency result buffers, then a bounded barrier among the unmasked ranks
        (in shrink mode a peer missing there is masked; otherwise ``PeerTimeoutError``)."""
        self.low_latency.clean()
        self.low_latency.barrier()

    def destroy(self) -> None:
        """Release the result buffers."""
        self.low_latency.clean()


def _pad_rows(tensor: torch.Tensor, num_rows: int, value: float) -> torch.Tensor:
    if tensor.size(0) == num_rows:
        return tensor
    padded = torch.empty((num_rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    if value == 0:
        padded.view(torch.uint8).zero_()  # also for float8, which has no fill kernel
    else:
        padded.fill_(value)
    padded[: tensor.size(0)] = tensor
    return padded
