"""Barrier over the peers of a symmetric buffer: each rank releases an epoch flag at every peer,
then waits (bounded) for every peer's flag. One program per peer."""

from __future__ import annotations

import triton
import triton.language as tl

from epcomm.kernels.launch import launch
from epcomm.kernels.primitives import peer_pointer, signal_release_sys, wait_epoch
from epcomm.kernels.symmetric_peers import SymmetricPeers

__all__ = ["launch_barrier"]


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
