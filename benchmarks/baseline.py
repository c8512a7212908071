"""The "user path" baseline: expert-parallel dispatch and combine as a user writes them with
``torch.distributed`` alone, without an EP library.

Dispatch exchanges the per-rank counts with ``all_to_all_single``, ``.tolist()``s them,
``index_select``s the rows into a send buffer grouped by destination rank and ``all_to_all_single``s
the rows; combine sends the rows back with the reverse ``all_to_all_single`` and sums them onto their
tokens with ``index_add_``. Each token goes once to every rank that holds one of its experts (as
epcomm's and DeepEP's dispatch), and rows arrive ordered by source rank, then source token index:
exactly epcomm's order, so its ``recv_x`` is comparable bit for bit.

Plain ``torch`` / ``torch.distributed`` only (no epcomm import), so the baseline is independent of
the library it is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TokenRows", "UserHandle", "user_combine", "user_dispatch", "user_dispatch_cached"]

TokenRows = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class UserHandle:
    """What the user path's combine (and cached dispatch) needs from a dispatch.

    Attributes:
        send_idx: ``[num_send_rows]`` int64 token indices, grouped by destination rank, each group
            in token order.
        send_splits: rows sent to each rank.
        recv_splits: rows received from each rank.
        num_tokens: tokens on this rank (rows of the combine result).
    """

    send_idx: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


def _a2a_rows(rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group: Any) -> torch.Tensor:
    """``all_to_all_single`` of token rows with row splits (FP8 travels as bytes)."""
    wire = rows.view(torch.uint8) if rows.dtype == torch.float8_e4m3fn else rows
    out = wire.new_empty((sum(recv_splits), *wire.shape[1:]))
    dist.all_to_all_single(out, wire.contiguous(), recv_splits, send_splits, group=group)
    return out.view(rows.dtype) if wire is not rows else out


def _select_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``index_select`` of rows; FP8 is moved as bytes (not every device supports FP8 there)."""
    if rows.dtype == torch.float8_e4m3fn:
        return rows.view(torch.uint8).index_select(0, index).view(rows.dtype)
    return rows.index_select(0, index)


def _send_rows(x: TokenRows, handle: UserHandle, group: Any) -> TokenRows:
    if isinstance(x, tuple):
        data, scales = x
        return (
            _a2a_rows(_select_rows(data, handle.send_idx), handle.recv_splits, handle.send_splits, group),
            _a2a_rows(
                _select_rows(scales.contiguous(), handle.send_idx),
                handle.recv_splits,
                handle.send_splits,
                group,
            ),
        )
    return _a2a_rows(_select_rows(x, handle.send_idx), handle.recv_splits, handle.send_splits, group)


def user_dispatch(
    x: TokenRows, num_tokens_per_rank: torch.Tensor, is_token_in_rank: torch.Tensor, group: Any
) -> tuple[TokenRows, UserHandle]:
    """Dispatch as a user writes it with ``torch.distributed`` alone.

    Arguments:
        x: ``[num_tokens, hidden]`` bf16, or ``(x_fp8, scales [num_tokens, hidden // 128] float32)``.
        num_tokens_per_rank: ``[num_ranks]`` rows for each rank (a token counts once per rank).
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
        group: the process group.

    Returns:
        The received rows (same form as ``x``; ordered by source rank, then source token) and the
        handle for ``user_combine`` / ``user_dispatch_cached``.
    """
    send_counts = num_tokens_per_rank.to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits: list[int] = send_counts.tolist()
    recv_splits: list[int] = recv_counts.tolist()
    # [num_ranks, num_tokens].nonzero() lists (rank, token) pairs sorted by rank, then token.
    send_idx = is_token_in_rank.t().nonzero()[:, 1]
    handle = UserHandle(send_idx, send_splits, recv_splits, is_token_in_rank.size(0))
    return _send_rows(x, handle, group), handle


def user_dispatch_cached(x: TokenRows, handle: UserHandle, group: Any) -> TokenRows:
    """Dispatch with the counts and indices of an earlier ``user_dispatch`` (no count exchange)."""
    return _send_rows(x, handle, group)


def user_combine(y: torch.Tensor, handle: UserHandle, group: Any) -> torch.Tensor:
    """Send rows back (reverse ``all_to_all_single``) and sum them onto their tokens (``index_add_``).

    Arguments:
        y: ``[num_recv_rows, hidden]`` bf16 in the order ``user_dispatch`` delivered.
        handle: the dispatch's handle.
        group: the process group.

    Returns:
        ``[num_tokens, hidden]`` bf16.
    """
    back = _a2a_rows(y, handle.send_splits, handle.recv_splits, group)
    out = torch.zeros(handle.num_tokens, y.size(1), dtype=y.dtype, device=y.device)
    out.index_add_(0, handle.send_idx, back)
    return out
