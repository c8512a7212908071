"""Barrier over NVLink: each rank releases an epoch flag at every peer, then waits (bounded) for
every peer's flag. One program per peer. Also the peer-pointer select every kernel shares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epcomm.config import NUM_MAX_NVL_PEERS
from epcomm.kernels.launch import LeadingArgs, launch
from epcomm.kernels.primitives import signal_release_sys, wait_epoch

__all__ = ["MAX_PEERS", "PeerArgs", "as_peer_args", "launch_barrier"]

MAX_PEERS = NUM_MAX_NVL_PEERS


class PeerArgs(LeadingArgs):
    """The ``p0..p7`` arguments of the NVLink kernels: one int32 view per rank, padded to
    ``MAX_PEERS`` with rank 0's (never dereferenced), resolved once per buffer allocation.

    Arguments:
        buffers: per rank (1..8), an int32 view of that rank's symmetric buffer.
    """

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        if not 1 <= len(buffers) <= MAX_PEERS:
            raise ValueError(f"the NVLink backend supports 1..{MAX_PEERS} ranks; got {len(buffers)}")
        self.num_ranks = len(buffers)
        self.buffers = list(buffers)
        super().__init__(self.buffers + [self.buffers[0]] * (MAX_PEERS - self.num_ranks))


def as_peer_args(peers: list[torch.Tensor] | PeerArgs) -> PeerArgs:
    """``peers`` as ``PeerArgs`` (a list is resolved now)."""
    return peers if isinstance(peers, PeerArgs) else PeerArgs(peers)


@triton.jit
def _peer(peer, p0, p1, p2, p3, p4, p5, p6, p7):
    # Pointer select: keeps the 16-byte alignment Triton knows of each tensor argument.
    base = tl.where(peer == 0, p0, p1)
    base = tl.where(peer == 2, p2, base)
    base = tl.where(peer == 3, p3, base)
    base = tl.where(peer == 4, p4, base)
    base = tl.where(peer == 5, p5, base)
    base = tl.where(peer == 6, p6, base)
    base = tl.where(peer == 7, p7, base)
    return base


@triton.jit(do_not_specialize=["rank", "epoch", "timeout_ns", "error_address", "operation_code"])
def barrier_kernel(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    rank,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    FLAG_OFFSET: tl.constexpr,
):
    # Program p releases this rank's flag at peer p, then waits for peer p's flag here.
    peer = tl.program_id(0)
    remote = _peer(peer, p0, p1, p2, p3, p4, p5, p6, p7)
    local = _peer(rank, p0, p1, p2, p3, p4, p5, p6, p7)
    signal_release_sys(remote + FLAG_OFFSET + rank, epoch)
    error_pointer = error_address.to(tl.pointer_type(tl.int32))
    wait_epoch(local + FLAG_OFFSET + peer, epoch, timeout_ns, error_pointer, operation_code, peer, rank)


def launch_barrier(
    peers: list[torch.Tensor] | PeerArgs,
    rank: int,
    epoch: int,
    timeout_ns: int,
    error_address: int,
    operation_code: int,
    flag_offset: int,
) -> None:
    """Barrier over the ranks of ``peers`` on the current stream (bounded wait).

    Arguments:
        peers: per rank, an int32 view of that rank's symmetric buffer (``MAX_PEERS`` max).
        rank: this rank.
        epoch: a value larger than any earlier epoch of this buffer.
        timeout_ns: bound of the wait.
        error_address: address of the host-mapped ``[4]`` int32 error word.
        operation_code: written into the error word on timeout, names the operation.
        flag_offset: int32-element offset of the ``MAX_PEERS`` flags in every buffer.
    """
    peer_args = as_peer_args(peers)
    launch(
        barrier_kernel,
        (peer_args.num_ranks,),
        (rank, epoch, timeout_ns, error_address, operation_code),
        {"FLAG_OFFSET": flag_offset},
        1,
        peer_args,
    )
