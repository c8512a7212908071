"""The peer table of an NVSHMEM symmetric buffer, built on the device with ``nvshmem_ptr``.

With several processes on one GPU NVSHMEM runs in its limited mode, where a host collective, a
host barrier or a team split ends the process, so PyTorch's ``symm_mem.rendezvous`` (which splits a
team) cannot give the peers' addresses there. Every PE can still translate a symmetric address on
the device: ``nvshmem_ptr(address, pe)`` is the address in this process of the same word on ``pe``
(0 when ``pe`` is not reachable by loads and stores). One program writes that for every rank of
the group into the ``[num_ranks]`` int64 table the NVLink-mode kernels take, so they run unchanged
over NVSHMEM memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm._math import next_pow2
from epcomm.kernels import nvshmem_primitives as nv

__all__ = ["build_peer_table", "peer_table_kernel"]


@triton.jit
def peer_table_kernel(base, pes, table, num_ranks, BLOCK: tl.constexpr):
    """``table[r] = nvshmem_ptr(base, pes[r])`` for ``r < num_ranks`` (``base``: int64 address of
    word 0 of this PE's symmetric buffer; ``pes``: ``[num_ranks]`` int32; ``table``: int64)."""
    offsets = tl.arange(0, BLOCK)
    mask = offsets < num_ranks
    pe = tl.load(pes + offsets, mask=mask, other=0)
    address = nv.peer_address(tl.full([BLOCK], 0, tl.int64) + base, pe)
    tl.store(table + offsets, address, mask=mask)


def build_peer_table(buffer: torch.Tensor, pes: list[int]) -> torch.Tensor:
    """The peer table of the NVSHMEM symmetric ``buffer`` for the group whose rank ``r`` is PE ``pes[r]``.

    Arguments:
        buffer: this PE's symmetric tensor (``symm_mem.empty`` under the NVSHMEM backend), on its GPU.
        pes: the NVSHMEM PE (global rank) of each rank of the group, in group order.

    Returns:
        ``[len(pes)]`` int64 on ``buffer``'s device: the address in this process of ``buffer``'s
        word 0 on each rank (0 for a rank this GPU cannot reach by loads and stores). Written by a
        kernel on the current stream.
    """
    table = torch.empty(len(pes), dtype=torch.int64, device=buffer.device)
    pe_tensor = torch.tensor(pes, dtype=torch.int32, device="cpu").to(buffer.device)
    nv.launchable(peer_table_kernel)[(1,)](
        buffer.data_ptr(), pe_tensor, table, len(pes), BLOCK=next_pow2(max(len(pes), 2))
    )
    return table
