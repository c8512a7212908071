"""Barriers over the peers of a symmetric buffer: each rank releases an epoch flag at every peer,
then waits (bounded) for every peer's flag. ``barrier_kernel``: one program per peer, every rank.
``masked_barrier_kernel``: one program, the ranks a shrink-mode mask leaves (the low-latency
buffer clean); ``masked_barrier_put_kernel`` the same with NVSHMEM signals to the ranks of other
nodes (the multi-node put path's buffers: their init, growth and clean)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from epcomm.kernels import puts
from epcomm.kernels.launch import launch
from epcomm.kernels.low_latency_dispatch import PUT_FLAG_STRIDE, wait_sources
from epcomm.kernels.primitives import peer_pointer, signal_release_sys, wait_epoch
from epcomm.kernels.symmetric_peers import SymmetricPeers

__all__ = [
    "BarrierPut",
    "launch_barrier",
    "launch_masked_barrier",
    "masked_barrier_kernel",
    "masked_barrier_put_kernel",
]


@triton.jit(
    do_not_specialize=["rank", "epoch", "timeout_ns", "error_address", "operation_code", "flag_offset"]
)
def barrier_kernel(peer_table, rank, epoch, timeout_ns, error_address, operation_code, flag_offset):
    # Program p releases this rank's flag at peer p, then waits for peer p's flag here.
    peer = tl.program_id(0)
    signal_release_sys(peer_pointer(peer_table, peer) + flag_offset + rank, epoch)
    error_pointer = error_address.to(tl.pointer_type(tl.int32))
    local = peer_pointer(peer_table, rank)
    wait_epoch(local + flag_offset + peer, epoch, timeout_ns, error_pointer, operation_code, peer, rank)


def launch_barrier(*, peers: SymmetricPeers, epoch: int, operation_code: int) -> None:
    """Barrier over every rank of ``peers`` on the current stream (bounded wait).

    Arguments:
        peers: the group's peer table, rank, timeout, error word and flag offset.
        epoch: a value larger than any earlier epoch of this buffer.
        operation_code: written into the error word on timeout, names the operation.
    """
    launch(
        barrier_kernel,
        (peers.num_ranks,),
        (
            peers.peer_table,
            peers.rank,
            epoch,
            peers.timeout_ns,
            peers.error_address,
            operation_code,
            peers.flag_offset,
        ),
        {},
        1,
    )


@triton.jit
def _masked_barrier(
    peer_table,
    mask_ptr,
    reach_ptr,
    pe_ptr,
    rank,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    flag_offset,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    SHRINK: tl.constexpr,
    PUT: tl.constexpr,
):
    local = peer_pointer(peer_table, rank)
    for peer in range(NUM_RANKS):
        if tl.load(mask_ptr + peer) == 0:
            if PUT:
                # uint64 flags (two words each); a rank of another node gets an NVSHMEM signal.
                if tl.load(reach_ptr + peer) != 0:
                    signal_release_sys(
                        peer_pointer(peer_table, peer) + flag_offset + PUT_FLAG_STRIDE * rank, epoch
                    )
                else:
                    puts.put_signal(
                        local,
                        peer_pointer(peer_table, peer),
                        flag_offset + PUT_FLAG_STRIDE * rank,
                        epoch,
                        tl.load(pe_ptr + peer),
                    )
            else:
                signal_release_sys(peer_pointer(peer_table, peer) + flag_offset + rank, epoch)
    error_pointer = error_address.to(tl.pointer_type(tl.int32))
    wait_sources(
        local + flag_offset,
        mask_ptr,
        tl.full([R_BLOCK], epoch, tl.int32),
        timeout_ns,
        error_pointer,
        operation_code,
        rank,
        error_pointer,  # no stats
        False,
        NUM_RANKS,
        R_BLOCK,
        False,
        SHRINK,
        PUT_FLAG_STRIDE if PUT else 1,
    )


# Two entry points over one body, not one kernel with a flag: requires_nvshmem registers a kernel by
# name for NVSHMEM's module initialisation after it compiles, which the store path must not get
# (it runs where NVSHMEM is absent).
_BARRIER_RUNTIME = ["rank", "epoch", "timeout_ns", "error_address", "operation_code", "flag_offset"]


@triton.jit(do_not_specialize=_BARRIER_RUNTIME)
def masked_barrier_kernel(
    peer_table,
    mask_ptr,
    reach_ptr,
    pe_ptr,
    rank,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    flag_offset,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    SHRINK: tl.constexpr,
):
    """Every rank through stores (one NVLink domain)."""
    _masked_barrier(
        peer_table, mask_ptr, reach_ptr, pe_ptr, rank, epoch, timeout_ns, error_address, operation_code,
        flag_offset, NUM_RANKS, R_BLOCK, SHRINK, False,
    )  # fmt: skip


@triton.jit(do_not_specialize=_BARRIER_RUNTIME)
def masked_barrier_put_kernel(
    peer_table,
    mask_ptr,
    reach_ptr,
    pe_ptr,
    rank,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    flag_offset,
    NUM_RANKS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    SHRINK: tl.constexpr,
):
    """Ranks of other nodes (``reach_ptr[r] == 0``) through NVSHMEM signals, uint64 flags (the put
    path); launched through ``requires_nvshmem``."""
    _masked_barrier(
        peer_table, mask_ptr, reach_ptr, pe_ptr, rank, epoch, timeout_ns, error_address, operation_code,
        flag_offset, NUM_RANKS, R_BLOCK, SHRINK, True,
    )  # fmt: skip


class BarrierPut(NamedTuple):
    """A masked barrier's put path (multi-node: the ranks of other nodes get NVSHMEM signals).

    Attributes:
        reach: ``[num_ranks]`` int32 device tensor: 1 for a rank reached by stores, 0 for puts.
        pes: ``[num_ranks]`` int32 device tensor: each rank's NVSHMEM PE.
        kernel: ``requires_nvshmem(masked_barrier_put_kernel)`` (the jit function itself in the
            interpreter checks).
    """

    reach: torch.Tensor
    pes: torch.Tensor
    kernel: Any


def launch_masked_barrier(
    *,
    peers: SymmetricPeers,
    rank_mask: torch.Tensor,
    epoch: int,
    operation_code: int,
    shrink: bool,
    put: BarrierPut | None = None,
) -> None:
    """Barrier over the ranks ``rank_mask`` leaves, on the current stream (bounded wait): this rank
    releases ``epoch`` at every unmasked rank, then waits for theirs.

    Arguments:
        peers: the group's peer table, rank, timeout, error word and flag offset.
        rank_mask: ``[num_ranks]`` int32 device mask, non-zero = leave that rank out.
        epoch: a value larger than any earlier epoch of this buffer.
        operation_code: names the operation (error word, or the shrink log).
        shrink: a rank that misses the bound is masked and logged (``wait_sources``), not an error.
        put: the put path (``None``: every rank through stores); its flags are uint64, two words
            each from ``peers.flag_offset`` (``2 * flag_block`` words readable).
    """
    launch(
        put.kernel if put is not None else masked_barrier_kernel,
        (1,),
        (
            peers.peer_table,
            rank_mask,
            put.reach if put is not None else rank_mask,
            put.pes if put is not None else rank_mask,
            peers.rank,
            epoch,
            peers.timeout_ns,
            peers.error_address,
            operation_code,
            peers.flag_offset,
        ),
        {"NUM_RANKS": peers.num_ranks, "R_BLOCK": peers.flag_block, "SHRINK": shrink},
        1,
    )
