"""What every kernel that reaches peers gets from the transport, in one typed record."""

from __future__ import annotations

from typing import NamedTuple

import torch

from epcomm._math import next_pow2

__all__ = ["SymmetricPeers", "flag_block"]


def flag_block(num_ranks: int) -> int:
    """Lanes of a wait over every rank's flag: the next power of two >= ``num_ranks``, at least 2."""
    return max(2, next_pow2(num_ranks))


class SymmetricPeers(NamedTuple):
    """The peers of one symmetric buffer, as the kernels' launchers take them.

    Attributes:
        peer_table: ``[num_ranks]`` int64 on this rank's device: the address, in this process, of
            word 0 of every rank's symmetric buffer (this rank's included); each 16-byte aligned.
        rank: this rank.
        num_ranks: ranks of the group (any number: the table has one entry per rank).
        timeout_ns: bound of every wait.
        error_address: address of the host-mapped ``[4]`` int32 error word.
        flag_offset: int32-word offset of the barrier flags in every buffer (word ``s``: the latest
            epoch rank ``s`` released here; ``flag_block`` words, readable).
        counter_offset: int32-word offset of this rank's done counter (zero between kernels).
    """

    peer_table: torch.Tensor
    rank: int
    num_ranks: int
    timeout_ns: int
    error_address: int
    flag_offset: int
    counter_offset: int

    @property
    def flag_block(self) -> int:
        """Lanes of a wait over every rank's flag (``flag_block(num_ranks)``)."""
        return flag_block(self.num_ranks)
