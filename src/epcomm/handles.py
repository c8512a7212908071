"""Handles returned by dispatch and consumed by combine / cached dispatch.

They are ``NamedTuple``s: tuple-compatible with DeepEP (element 0 of the normal-mode handle is
``rank_prefix_matrix``; the multi-node handle is DeepEP's internode 10-tuple; the low-latency handle
starts with DeepEP's five fields), with names and types for everything else.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

import torch

__all__ = [
    "DispatchHandle",
    "InternodeHandle",
    "LowLatencyHandle",
    "NormalHandle",
    "TensorHandle",
    "as_handle",
    "intranode_handle",
]


class DispatchHandle(NamedTuple):
    """Layout of one normal-mode dispatch: everything cached dispatch and combine need.

    Fields:
        rank_prefix_matrix: ``[num_ranks, num_ranks]`` int32; ``[i][j]`` = tokens ranks ``0..i``
            send to rank ``j`` (cumulative over ``i``). Rows from source ``i`` land at
            ``[rank_prefix_matrix[i-1][me], rank_prefix_matrix[i][me])`` of ``recv_x``.
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, the sender's routing.
        recv_row_of_token: ``[num_tokens, num_ranks]`` int32, the row each local token occupies in
            rank ``j``'s ``recv_x``, or ``-1`` when it is not sent there.
        recv_src_idx: ``[num_recv_rows]`` int32, the source token index of each received row
            (``-1`` for padding rows past the real count).
        num_recv_tokens: ``[1]`` int32 on the data's device, the real number of received rows.
        num_recv_rows: rows of ``recv_x`` (``num_worst_tokens`` when that was given, otherwise
            the real count).
        num_max_rows: the largest number of rows any rank receives in this dispatch or sends in
            it (so receives back in combine); ``num_worst_tokens`` in that mode. Host value, the
            same on every rank: it sizes the NVLink buffers.
        sequence: this dispatch's normal-mode call number on its ``Buffer`` (word 1 of its
            fingerprint, ``epcomm.fingerprint``), the same on every rank. Cached dispatch and
            combine send it, so ranks passing handles of different dispatches are told so.
    """

    rank_prefix_matrix: torch.Tensor
    is_token_in_rank: torch.Tensor
    recv_row_of_token: torch.Tensor
    recv_src_idx: torch.Tensor
    num_recv_tokens: torch.Tensor
    num_recv_rows: int
    num_max_rows: int
    sequence: int


# The attribute of ``InternodeHandle.recv_src_meta`` that holds the dispatch's call number (the
# handle is DeepEP's ten tensors, so the number rides on one of them and survives ``tuple(handle)``).
_SEQUENCE_ATTRIBUTE = "_epcomm_dispatch_sequence"


class InternodeHandle(NamedTuple):
    """Layout of one multi-node normal-mode dispatch: DeepEP V1's internode handle, in its order.

    Notation: ``num_ranks`` ranks in ``num_nodes`` nodes of ``num_ranks_per_node`` consecutive ranks
    (``epcomm.topology``); this rank is ``me`` on node ``my_node`` with local rank ``my_local``. The
    sender splits its ``num_tokens`` tokens into ``num_channels = config.num_sms // 2`` channels of
    ``ceil(num_tokens / num_channels)`` consecutive tokens (the last ones shorter or empty), as
    DeepEP. The *RDMA peer* of ``me`` on node ``n`` is rank ``n * num_ranks_per_node + my_local``:
    under DeepEP's scheme a token crosses to node ``n`` once, to that rank, which forwards it
    within node ``n``. Every entry is computed from the routing alone, with DeepEP's meaning; the
    reference backend computes all of them.

    Fields (all on the data's device):
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, this rank's routing (the dispatch's
            argument).
        rdma_channel_prefix_matrix: ``[num_nodes, num_channels]`` int32; ``[n][c]`` = this rank's
            tokens of channels ``0..c`` that go to node ``n`` (counted once per node).
        gbl_channel_prefix_matrix: ``[num_ranks, num_channels]`` int32; ``[j][c]`` = this rank's
            tokens of channels ``0..c`` that go to rank ``j``.
        recv_rdma_channel_prefix_matrix: ``[num_nodes, num_channels]`` int32; row ``n`` is the
            ``rdma_channel_prefix_matrix[my_node]`` row of the RDMA peer on node ``n``.
        recv_rdma_rank_prefix_sum: ``[num_nodes]`` int32, inclusive prefix sum over ``n`` of the
            tokens the RDMA peer on node ``n`` sends to ``my_node`` (the tokens this rank receives
            over RDMA and forwards).
        recv_gbl_channel_prefix_matrix: ``[num_ranks, num_channels]`` int32; ``[s][c]`` = the first
            row of ``recv_x`` that holds a token of rank ``s``'s channel ``c``.
        recv_gbl_rank_prefix_sum: ``[num_ranks]`` int32, inclusive prefix sum of the rows received
            from each rank: rows from rank ``s`` are ``recv_x[prefix[s-1]:prefix[s]]`` (rows
            grouped by source rank ascending, then source token). Clients read it as ``handle[-4]``.
        recv_src_meta: ``[num_recv_rows, 8]`` uint8, DeepEP's ``SourceMeta`` of each row: int32
            source node, int32 bits ``1 << l`` for each local rank ``l`` of ``my_node`` the token
            goes to (native byte order). Rows past the real count (``num_worst_tokens``) hold
            node ``-1`` and no bits.
        send_rdma_head: ``[num_tokens, num_nodes]`` int32; ``[t][n]`` = the index of token ``t``
            among its channel's tokens that go to node ``n``, or ``-1``. (DeepEP's combine rewrites
            the ``-1`` entries in place; epcomm leaves them.)
        send_nvl_head: ``[num_rdma_recv_tokens, num_ranks_per_node]`` int32 (DeepEP: 8 columns, its
            node size), one row per token received over RDMA, ordered by source node, then token;
            ``[u][l]`` = the index of token ``u`` among the tokens of the same source rank and
            channel that go to local rank ``l`` of ``my_node``, or ``-1`` (left as is by combine,
            as ``send_rdma_head``).

    The dispatch's call number (for the call fingerprints of cached dispatch and combine) is kept
    as an attribute of the ``recv_src_meta`` tensor, so a plain tuple of these ten tensors works
    as the handle too.
    """

    is_token_in_rank: torch.Tensor
    rdma_channel_prefix_matrix: torch.Tensor
    gbl_channel_prefix_matrix: torch.Tensor
    recv_rdma_channel_prefix_matrix: torch.Tensor
    recv_rdma_rank_prefix_sum: torch.Tensor
    recv_gbl_channel_prefix_matrix: torch.Tensor
    recv_gbl_rank_prefix_sum: torch.Tensor
    recv_src_meta: torch.Tensor
    send_rdma_head: torch.Tensor
    send_nvl_head: torch.Tensor

    @property
    def num_recv_rows(self) -> int:
        """Rows of ``recv_x`` (``num_worst_tokens`` when that was given, else the real count)."""
        return int(self.recv_src_meta.size(0))

    @property
    def sequence(self) -> int:
        """The dispatch's normal-mode call number (0 when the tensors were copied since)."""
        return int(getattr(self.recv_src_meta, _SEQUENCE_ATTRIBUTE, 0))

    def with_sequence(self, sequence: int) -> InternodeHandle:
        """This handle, its ``recv_src_meta`` tagged with the dispatch's call number ``sequence``."""
        setattr(self.recv_src_meta, _SEQUENCE_ATTRIBUTE, sequence)
        return self


NormalHandle = DispatchHandle | InternodeHandle
"""A normal-mode handle: within a node (``DispatchHandle``) or multi-node (``InternodeHandle``)."""


def intranode_handle(handle: NormalHandle) -> DispatchHandle:
    """``handle`` if it is a ``DispatchHandle`` (backends without multi-node mode); else ``TypeError``."""
    if not isinstance(handle, DispatchHandle):
        raise TypeError("this backend has no multi-node mode; got an InternodeHandle")
    return handle


class TensorHandle(NamedTuple):
    """A ``DispatchHandle`` made only of tensors: the handle ``epcomm.autograd.dispatch`` returns.

    ``torch.library`` custom ops take and return tensors, so the handle travels through them (and
    through ``torch.compile`` graphs and autograd's saved tensors) as these six tensors; the three
    host integers of ``DispatchHandle`` are either a tensor size or held in ``meta``.

    Fields:
        rank_prefix_matrix: ``[num_ranks, num_ranks]`` int32 (element 0, as in DeepEP's handle).
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
        recv_row_of_token: ``[num_tokens, num_ranks]`` int32.
        recv_src_idx: ``[num_recv_rows]`` int32; its size is ``num_recv_rows``.
        num_recv_tokens: ``[1]`` int32 on the data's device.
        meta: ``[2]`` int64 on the CPU: ``(num_max_rows, sequence)``.
    """

    rank_prefix_matrix: torch.Tensor
    is_token_in_rank: torch.Tensor
    recv_row_of_token: torch.Tensor
    recv_src_idx: torch.Tensor
    num_recv_tokens: torch.Tensor
    meta: torch.Tensor

    @staticmethod
    def of(handle: DispatchHandle) -> TensorHandle:
        """The tensors of ``handle`` (fresh tensors where a field is a host integer or another dtype)."""
        return TensorHandle(
            handle.rank_prefix_matrix.to(torch.int32),
            handle.is_token_in_rank,
            handle.recv_row_of_token.to(torch.int32),
            handle.recv_src_idx.to(torch.int32),
            handle.num_recv_tokens.to(torch.int32),
            torch.tensor([handle.num_max_rows, handle.sequence], dtype=torch.int64, device="cpu"),
        )

    def dispatch_handle(self) -> DispatchHandle:
        """The ``DispatchHandle`` these tensors hold (reads ``meta``, a CPU tensor: no device sync)."""
        num_max_rows, sequence = (int(v) for v in self.meta.tolist())
        return DispatchHandle(
            self.rank_prefix_matrix,
            self.is_token_in_rank,
            self.recv_row_of_token,
            self.recv_src_idx,
            self.num_recv_tokens,
            self.recv_src_idx.size(0),
            num_max_rows,
            sequence,
        )


class LowLatencyHandle(NamedTuple):
    """Layout of one low-latency dispatch (DeepEP's five fields first, then ours).

    Fields:
        recv_src_info: ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank]`` int32,
            the source token index of each received row (``-1`` past ``recv_count``).
        recv_layout_range: ``[num_local_experts, num_ranks]`` int64, ``(begin << 32) | count`` of
            the rows each source rank occupies in each local expert's block (as DeepEP).
        num_max_dispatch_tokens_per_rank: capacity per rank.
        hidden: hidden size.
        num_experts: total experts.
        combine_gather_idx: ``[num_ranks, num_max_dispatch_tokens_per_rank, num_topk]`` int64, for
            each (source rank, token, top-k slot) routed to a local expert, the flat row
            ``e * num_ranks * num_max_dispatch_tokens_per_rank + row`` of its expert output;
            ``-1`` otherwise.
        buffer_parity: which of the two alternating result buffers holds this call's data.
        sequence: the low-latency call number of the dispatch that made it (its identity in a
            combine's call fingerprint; 0 where the backend does not number calls).
    """

    recv_src_info: torch.Tensor
    recv_layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    combine_gather_idx: torch.Tensor
    buffer_parity: int
    sequence: int = 0


HandleType = TypeVar("HandleType", DispatchHandle, InternodeHandle, LowLatencyHandle)


def as_handle(handle: Any, kind: type[HandleType], returned_by: str) -> HandleType:
    """``handle`` as a ``kind``: itself, or built from a plain tuple (or list, as DeepEP's internode
    combine takes) of the same length (DeepEP code may pass the tuple on); anything else (another
    mode's handle too) raises a one-line ``TypeError`` naming ``returned_by``."""
    if isinstance(handle, kind):
        return handle
    if type(handle) in (tuple, list) and len(handle) == len(kind._fields):
        return kind(*handle)
    other = {
        DispatchHandle: "dispatch within a node",
        InternodeHandle: "multi-node dispatch",
        LowLatencyHandle: "low_latency_dispatch",
    }.get(type(handle))
    got = f"the {type(handle).__name__} of {other}" if other else type(handle).__name__
    if type(handle) in (tuple, list):
        got += f" of {len(handle)} entries (expected {len(kind._fields)})"
    raise TypeError(f"handle must be the handle {returned_by} returned; got {got}")
