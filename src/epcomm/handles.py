"""Handles returned by dispatch and consumed by combine / cached dispatch.

They are ``NamedTuple``s: tuple-compatible with DeepEP (element 0 of the normal-mode handle is
``rank_prefix_matrix``; the low-latency handle starts with DeepEP's five fields), with names and
types for everything else.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

import torch

__all__ = ["DispatchHandle", "LowLatencyHandle", "TensorHandle", "as_handle"]


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
    """

    recv_src_info: torch.Tensor
    recv_layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    combine_gather_idx: torch.Tensor
    buffer_parity: int


HandleType = TypeVar("HandleType", DispatchHandle, LowLatencyHandle)


def as_handle(handle: Any, kind: type[HandleType], returned_by: str) -> HandleType:
    """``handle`` as a ``kind``: itself, or built from a plain tuple of the same length (DeepEP
    code may pass the tuple on); anything else (the other mode's handle too) raises a one-line
    ``TypeError`` naming ``returned_by``."""
    if isinstance(handle, kind):
        return handle
    if type(handle) is tuple and len(handle) == len(kind._fields):
        return kind(*handle)
    other = {DispatchHandle: "dispatch", LowLatencyHandle: "low_latency_dispatch"}.get(type(handle))
    got = f"the {type(handle).__name__} of {other}" if other else type(handle).__name__
    raise TypeError(f"handle must be the handle {returned_by} returned; got {got}")
