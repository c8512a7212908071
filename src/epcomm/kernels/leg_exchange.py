"""One exchange of byte blocks between the peers of a leg of the hierarchical multi-node scheme.

Program ``i`` serves peer ``i`` of the leg: it moves this rank's block for peer ``i`` from the send
staging area into peer ``i``'s receive slot for this rank, publishes the exchange's epoch in peer
``i``'s flag for this rank, then waits (bounded) for peer ``i``'s epoch in this rank's flag for it.
The RDMA leg (``USE_PUT``) moves the block with NVSHMEM's put-with-signal to the peer's PE (the
data, then the signal, ordered by NVSHMEM), whatever the peer's GPU is reachable by; the NVLink leg
stores through the peer's address in the peer table and releases the flag after the data.

Every flag is a 64-bit word (NVSHMEM signals are 64-bit); the epochs fit its low 32 bits, which the
waits read. Offsets are int32 words from word 0 of the leg buffer (``backends.nvshmem.legs``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from epcomm.kernels import puts
from epcomm.kernels.launch import launch
from epcomm.kernels.primitives import peer_pointer, signal_release_sys, wait_epoch

__all__ = ["launch_leg_exchange", "leg_put_kernel", "leg_store_kernel"]

COPY_BLOCK = 1024  # int32 words per step of a store-path copy


_RUNTIME = [
    "rank",
    "me_index",
    "epoch",
    "timeout_ns",
    "error_address",
    "operation_code",
    "flag_word",
    "staging_word",
    "recv_word",
    "slot_words",
]


@triton.jit
def _exchange(
    peer_table,
    leg_ranks,
    leg_pes,
    send_bytes,
    rank,
    me_index,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    flag_word,
    staging_word,
    recv_word,
    slot_words,
    USE_PUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    local = peer_pointer(peer_table, rank)
    peer_rank = tl.load(leg_ranks + i)
    if i != me_index:
        num_bytes = tl.load(send_bytes + i)
        src = local + staging_word + i * slot_words
        remote = peer_pointer(peer_table, peer_rank)
        if USE_PUT:
            puts.put_block(
                local,
                remote,
                recv_word + me_index * slot_words,
                src,
                num_bytes,
                flag_word + 2 * me_index,
                epoch,
                tl.load(leg_pes + i),
            )
        else:
            dst = remote + recv_word + me_index * slot_words
            num_words = num_bytes // 4
            for start in range(0, num_words, BLOCK):
                offsets = start + tl.arange(0, BLOCK)
                mask = offsets < num_words
                tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)
            signal_release_sys(remote + flag_word + 2 * me_index, epoch)
        error_pointer = error_address.to(tl.pointer_type(tl.int32))
        wait_epoch(
            local + flag_word + 2 * i, epoch, timeout_ns, error_pointer, operation_code, peer_rank, rank
        )


@triton.jit(do_not_specialize=_RUNTIME)
def leg_put_kernel(
    peer_table,
    leg_ranks,
    leg_pes,
    send_bytes,
    rank,
    me_index,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    flag_word,
    staging_word,
    recv_word,
    slot_words,
    BLOCK: tl.constexpr,
):
    """The RDMA leg: NVSHMEM put-with-signal to each peer's PE (launched through
    ``requires_nvshmem``, which links the device library)."""
    _exchange(
        peer_table, leg_ranks, leg_pes, send_bytes, rank, me_index, epoch, timeout_ns, error_address,
        operation_code, flag_word, staging_word, recv_word, slot_words, True, BLOCK,
    )  # fmt: skip


@triton.jit(do_not_specialize=_RUNTIME)
def leg_store_kernel(
    peer_table,
    leg_ranks,
    leg_pes,
    send_bytes,
    rank,
    me_index,
    epoch,
    timeout_ns,
    error_address,
    operation_code,
    flag_word,
    staging_word,
    recv_word,
    slot_words,
    BLOCK: tl.constexpr,
):
    """The NVLink leg: stores through the peer table, then a released flag."""
    _exchange(
        peer_table, leg_ranks, leg_pes, send_bytes, rank, me_index, epoch, timeout_ns, error_address,
        operation_code, flag_word, staging_word, recv_word, slot_words, False, BLOCK,
    )  # fmt: skip


def launch_leg_exchange(
    *,
    peer_table: torch.Tensor,
    leg_ranks: torch.Tensor,
    leg_pes: torch.Tensor,
    send_bytes: torch.Tensor,
    rank: int,
    me_index: int,
    epoch: int,
    timeout_ns: int,
    error_address: int,
    operation_code: int,
    flag_word: int,
    staging_word: int,
    recv_word: int,
    slot_words: int,
    kernel: Any,
) -> None:
    """Exchange one block with each peer of a leg, on the current stream (bounded waits).

    Arguments:
        peer_table: ``[num_ranks]`` int64, word 0 of every rank's leg buffer in this process.
        leg_ranks: ``[num_peers]`` int32 on the device, the group rank of each peer of the leg
            (this rank at ``me_index``).
        leg_pes: ``[num_peers]`` int32, each peer's NVSHMEM PE (read by the put path only).
        send_bytes: ``[num_peers]`` int64, bytes of the block staged for each peer (multiples of 16,
            at most ``4 * slot_words``).
        rank: this rank (group rank).
        me_index: this rank's index among the leg's peers.
        epoch: larger than every earlier epoch of the buffer.
        timeout_ns: bound of each wait.
        error_address: host-mapped ``[4]`` int32 error word.
        operation_code: written there on a timeout.
        flag_word: first flag of this exchange (peer ``i``'s at ``flag_word + 2 * i``).
        staging_word: the send staging area (peer ``i``'s block at ``staging_word + i * slot_words``).
        recv_word: this exchange's receive area (from peer ``i`` at ``recv_word + i * slot_words``).
        slot_words: int32 words of one slot.
        kernel: ``leg_store_kernel`` (the NVLink leg), or ``leg_put_kernel`` wrapped by PyTorch's
            ``requires_nvshmem`` (the RDMA leg).
    """
    launch(
        kernel,
        (leg_ranks.numel(),),
        (
            peer_table,
            leg_ranks,
            leg_pes,
            send_bytes,
            rank,
            me_index,
            epoch,
            timeout_ns,
            error_address,
            operation_code,
            flag_word,
            staging_word,
            recv_word,
            slot_words,
        ),
        {"BLOCK": COPY_BLOCK},
        4,
    )
