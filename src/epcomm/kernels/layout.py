"""``get_dispatch_layout`` on the GPU: one kernel instead of a dozen torch ops.

Each program takes ``BLOCK_T`` tokens: it maps every top-k entry to its rank (and node), writes
``is_token_in_rank`` for its tokens and adds its per-rank, per-node and per-expert counts into one
zeroed int32 buffer with integer atomics (exact, so the result does not depend on their order).
``epcomm.layout.compute_dispatch_layout`` is the definition it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm._math import cdiv, next_pow2
from epcomm.kernels.launch import launch
from epcomm.layout import DispatchLayout

__all__ = ["launch_dispatch_layout"]

_BLOCK_T = 128


@triton.jit(do_not_specialize=["num_tokens"])
def dispatch_layout_kernel(
    topk_idx_ptr,
    in_rank_ptr,
    counts_ptr,
    num_tokens,
    NUM_TOPK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    NUM_LOCAL_EXPERTS: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    NUM_NODES: tl.constexpr,
    N_BLOCK: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # counts_ptr: [NUM_RANKS per-rank | NUM_EXPERTS per-expert | NUM_NODES per-node] int32, zeroed.
    pid = tl.program_id(0)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = tokens < num_tokens
    k_cols = tl.arange(0, K_BLOCK)
    entry_mask = inside[:, None] & (k_cols[None, :] < NUM_TOPK)
    expert = tl.load(
        topk_idx_ptr + tokens[:, None].to(tl.int64) * NUM_TOPK + k_cols[None, :], mask=entry_mask, other=-1
    )
    valid = entry_mask & (expert >= 0)
    safe = tl.where(valid, expert, 0).to(tl.int32)
    # Per-expert counts: one atomic per valid entry (a token listing an expert twice counts twice,
    # as the reference's scatter_add does).
    tl.atomic_add(counts_ptr + NUM_RANKS + safe, tl.full(safe.shape, 1, tl.int32), mask=valid, sem="relaxed")
    rank_of = tl.where(valid, safe // NUM_LOCAL_EXPERTS, -1)  # [BLOCK_T, K_BLOCK]
    ranks = tl.arange(0, R_BLOCK)
    hit = tl.max((rank_of[:, :, None] == ranks[None, None, :]).to(tl.int32), axis=1)  # [BLOCK_T, R_BLOCK]
    rank_mask = inside[:, None] & (ranks[None, :] < NUM_RANKS)
    tl.store(
        in_rank_ptr + tokens[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :],
        hit.to(tl.int8),
        mask=rank_mask,
    )
    tl.atomic_add(counts_ptr + ranks, tl.sum(hit, axis=0), mask=ranks < NUM_RANKS, sem="relaxed")
    if NUM_NODES > 1:
        nodes = tl.arange(0, N_BLOCK)
        node_of = tl.where(valid, safe // (NUM_LOCAL_EXPERTS * RANKS_PER_NODE), -1)
        node_hit = tl.max((node_of[:, :, None] == nodes[None, None, :]).to(tl.int32), axis=1)
        tl.atomic_add(
            counts_ptr + NUM_RANKS + NUM_EXPERTS + nodes,
            tl.sum(node_hit, axis=0),
            mask=nodes < NUM_NODES,
            sem="relaxed",
        )


def launch_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int | None = None
) -> DispatchLayout:
    """``compute_dispatch_layout`` in one kernel (plus one memset), on the current stream.

    Arguments:
        topk_idx: ``[num_tokens, num_topk]`` int64 expert ids on a CUDA device, ``-1`` = none.
        num_experts: total experts (a multiple of ``num_ranks``).
        num_ranks: ranks of the group.
        num_ranks_per_node: ranks per node; per-node counts are returned when it is smaller than
            ``num_ranks``.

    Returns:
        ``DispatchLayout``: ``num_tokens_per_rank [num_ranks]`` int32, ``num_tokens_per_rdma_rank
        [num_nodes]`` int32 or ``None``, ``num_tokens_per_expert [num_experts]`` int32,
        ``is_token_in_rank [num_tokens, num_ranks]`` bool.
    """
    num_tokens, num_topk = topk_idx.shape
    per_node = num_ranks_per_node if num_ranks_per_node is not None else num_ranks
    num_nodes = num_ranks // per_node if per_node < num_ranks else 1
    device = topk_idx.device
    counts = torch.zeros(num_ranks + num_experts + num_nodes, dtype=torch.int32, device=device)
    in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device)
    if num_tokens > 0:
        launch(
            dispatch_layout_kernel,
            (cdiv(num_tokens, _BLOCK_T),),
            (topk_idx.contiguous(), in_rank.view(torch.int8), counts, num_tokens),
            {
                "NUM_TOPK": num_topk,
                "K_BLOCK": next_pow2(max(num_topk, 1)),
                "NUM_RANKS": num_ranks,
                "R_BLOCK": max(next_pow2(num_ranks), 2),
                "NUM_LOCAL_EXPERTS": num_experts // num_ranks,
                "NUM_EXPERTS": num_experts,
                "NUM_NODES": num_nodes,
                "N_BLOCK": max(next_pow2(num_nodes), 2),
                "RANKS_PER_NODE": per_node,
                "BLOCK_T": _BLOCK_T,
            },
            4,
        )
    per_rdma = counts[num_ranks + num_experts :] if num_nodes > 1 else None
    return DispatchLayout(counts[:num_ranks], per_rdma, counts[num_ranks : num_ranks + num_experts], in_rank)
