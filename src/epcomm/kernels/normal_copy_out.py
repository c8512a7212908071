"""Normal-mode dispatch, receive side: copy the per-row metadata out of the symmetric area.

One launch copies the source index, top-k ids and top-k weights of every received row into the
caller's tensors (the payload itself is cloned by a copy engine); with ``num_worst_tokens`` the rows
past the real receive count get ``-1`` / ``-1`` / ``0.0``, read from a device count (no CPU sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm._math import cdiv, next_pow2
from epcomm.kernels.launch import launch

__all__ = ["launch_copy_out_meta"]

_BLOCK = 256


@triton.jit(do_not_specialize=["num_rows"])
def copy_out_meta_kernel(
    src_idx_area_ptr,
    topk_idx_area_ptr,
    topk_weights_area_ptr,
    src_idx_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    num_real_ptr,
    num_rows,
    NUM_TOPK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    HAS_TOPK_IDX: tl.constexpr,
    HAS_TOPK_WEIGHTS: tl.constexpr,
    HAS_NUM_REAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    k_cols = tl.arange(0, K_BLOCK)[None, :]
    k_mask = k_cols < NUM_TOPK
    num_real = num_rows
    if HAS_NUM_REAL:
        num_real = tl.load(num_real_ptr)
    for start in range(pid * BLOCK, num_rows, grid * BLOCK):
        rows = tl.arange(0, BLOCK).to(tl.int64) + start
        inside = rows < num_rows
        real = rows < num_real
        # Written by peers over NVLink: .cg bypasses the non-coherent L1.
        src = tl.load(src_idx_area_ptr + rows, mask=inside & real, other=-1, cache_modifier=".cg")
        tl.store(src_idx_ptr + rows, src, mask=inside)
        mask2 = inside[:, None] & k_mask
        real2 = real[:, None]
        if HAS_TOPK_IDX:
            ids = tl.load(
                topk_idx_area_ptr + rows[:, None] * NUM_TOPK + k_cols,
                mask=mask2 & real2,
                other=-1,
                cache_modifier=".cg",
            )
            tl.store(topk_idx_ptr + rows[:, None] * NUM_TOPK + k_cols, ids, mask=mask2)
        if HAS_TOPK_WEIGHTS:
            weights = tl.load(
                topk_weights_area_ptr + rows[:, None] * NUM_TOPK + k_cols,
                mask=mask2 & real2,
                other=0.0,
                cache_modifier=".cg",
            )
            tl.store(topk_weights_ptr + rows[:, None] * NUM_TOPK + k_cols, weights, mask=mask2)


def launch_copy_out_meta(
    *,
    src_idx_area: torch.Tensor,
    topk_idx_area: torch.Tensor | None,
    topk_weights_area: torch.Tensor | None,
    num_rows: int,
    num_topk: int,
    num_real_rows: torch.Tensor | None,
    num_sms: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Copy the first ``num_rows`` rows of metadata out of the receive area, on the current stream.

    Arguments:
        src_idx_area: ``[capacity]`` int32 view of the source-index region.
        topk_idx_area: ``[capacity * num_topk]`` int64 view, or ``None``.
        topk_weights_area: ``[capacity * num_topk]`` float32 view, or ``None``.
        num_rows: rows to copy (``<= capacity``).
        num_topk: top-k entries per row.
        num_real_rows: ``[1]`` int32 device count of real rows (``num_worst_tokens`` mode) or ``None``.
        num_sms: programs to launch at most.

    Returns:
        ``recv_src_idx [num_rows]`` int32, ``recv_topk_idx [num_rows, num_topk]`` int64 or ``None``,
        ``recv_topk_weights [num_rows, num_topk]`` float32 or ``None``.
    """
    device = src_idx_area.device
    src_idx = torch.empty(num_rows, dtype=torch.int32, device=device)
    topk_idx = (
        torch.empty(num_rows, num_topk, dtype=torch.int64, device=device)
        if topk_idx_area is not None
        else None
    )
    topk_weights = (
        torch.empty(num_rows, num_topk, dtype=torch.float32, device=device)
        if topk_weights_area is not None
        else None
    )
    if num_rows == 0:
        return src_idx, topk_idx, topk_weights
    launch(
        copy_out_meta_kernel,
        (max(1, min(num_sms, cdiv(num_rows, _BLOCK))),),
        (
            src_idx_area,
            topk_idx_area if topk_idx_area is not None else src_idx_area,
            topk_weights_area if topk_weights_area is not None else src_idx_area,
            src_idx,
            topk_idx if topk_idx is not None else src_idx,
            topk_weights if topk_weights is not None else src_idx,
            num_real_rows if num_real_rows is not None else src_idx,
            num_rows,
        ),
        {
            "NUM_TOPK": num_topk,
            "K_BLOCK": next_pow2(num_topk),
            "HAS_TOPK_IDX": topk_idx_area is not None,
            "HAS_TOPK_WEIGHTS": topk_weights_area is not None,
            "HAS_NUM_REAL": num_real_rows is not None,
            "BLOCK": _BLOCK,
        },
        4,
    )
    return src_idx, topk_idx, topk_weights
