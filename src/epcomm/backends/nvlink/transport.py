"""One symmetric buffer per ``Buffer``: allocated with ``torch.distributed._symmetric_memory``,
mapped on every rank, grown collectively when a call needs more.

Layout (int32 words): ``[flags: 64][count table: MAX_PEERS x MAX_COUNTS][payload ...]``. The
payload is reused by every operation; an entry barrier before each push guarantees every peer
has consumed the previous contents.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Any

import torch

from epcomm._logging import get_logger
from epcomm.errors import PeerTimeoutError
from epcomm.kernels.exchange import MAX_PEERS, launch_exchange

__all__ = ["Operation", "SymmetricTransport"]

FLAG_WORDS = 64
MAX_COUNTS = 8 + 4096 + 8  # per-rank counts, per-expert counts (up to 4096 experts), extras
TABLE_OFFSET = FLAG_WORDS
PAYLOAD_OFFSET = (TABLE_OFFSET + MAX_PEERS * MAX_COUNTS + 31) // 32 * 32
# Grow by a quarter more than asked, so slowly rising batch sizes do not reallocate every call.
GROWTH_FACTOR = 1.25


class Operation(enum.IntEnum):
    """Codes the kernels write into the error word; they name the operation in errors."""

    INIT = 1
    DISPATCH_COUNTS = 2
    DISPATCH = 3
    CACHED_DISPATCH_ENTRY = 4
    CACHED_DISPATCH = 5
    COMBINE_ENTRY = 6
    COMBINE = 7
    LOW_LATENCY_DISPATCH = 8
    LOW_LATENCY_COMBINE = 9


_OPERATION_NAMES = {
    Operation.INIT: "Buffer init (NVLink barrier)",
    Operation.DISPATCH_COUNTS: "dispatch (count exchange)",
    Operation.DISPATCH: "dispatch (data)",
    Operation.CACHED_DISPATCH_ENTRY: "cached dispatch (entry barrier)",
    Operation.CACHED_DISPATCH: "cached dispatch (data)",
    Operation.COMBINE_ENTRY: "combine (entry barrier)",
    Operation.COMBINE: "combine (data)",
    Operation.LOW_LATENCY_DISPATCH: "low_latency_dispatch (receive)",
    Operation.LOW_LATENCY_COMBINE: "low_latency_combine (receive)",
}


class SymmetricTransport:
    """The symmetric buffer of one group, its peers' views, epochs and the error word.

    Arguments:
        group: the process group (NCCL or gloo; only used for the rendezvous).
        device: this rank's CUDA device.
        timeout_s: bound of every wait.
        initial_payload_bytes: payload bytes to allocate now (grown later when needed).
    """

    def __init__(
        self, group: Any, device: torch.device, timeout_s: float, initial_payload_bytes: int
    ) -> None:
        import torch.distributed as dist

        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        if self.num_ranks > MAX_PEERS:
            raise ValueError(f"the NVLink backend supports up to {MAX_PEERS} ranks; got {self.num_ranks}")
        self.timeout_ns = int(timeout_s * 1e9)
        self.timeout_s = timeout_s
        self.epoch = 0
        # Host-mapped error word: kernels write it on a timed-out wait, the host reads it at any
        # time without synchronizing the device.
        self.error_word = torch.zeros(4, dtype=torch.int32, pin_memory=True)
        # Read through ctypes on every call: indexing the tensor costs a tensor op each time.
        self._error_flag = ctypes.c_int32.from_address(self.error_word.data_ptr())
        self.payload_words = 0
        self._handle: Any = None
        self._local: torch.Tensor | None = None
        self.peer_buffers: list[torch.Tensor] = []
        self._allocate(max(initial_payload_bytes, 1 << 20) // 4)
        self.barrier(Operation.INIT)
        torch.cuda.current_stream(device).synchronize()
        self.check_error()

    def _allocate(self, payload_words: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        total_words = PAYLOAD_OFFSET + payload_words
        buffer = symm_mem.empty(total_words, dtype=torch.int32, device=self.device)
        buffer.zero_()
        torch.cuda.current_stream(self.device).synchronize()
        handle = symm_mem.rendezvous(buffer, self.group)
        self.peer_buffers = [handle.get_buffer(r, (total_words,), torch.int32) for r in range(self.num_ranks)]
        self._local, self._handle = buffer, handle
        self.payload_words = payload_words
        # A fresh buffer starts with zero flags everywhere: epochs keep increasing from here.
        self.epoch = 0

    @property
    def local(self) -> torch.Tensor:
        """This rank's buffer, ``[total_words]`` int32."""
        assert self._local is not None
        return self._local

    def payload(self, offset_words: int, num_words: int, dtype: torch.dtype) -> torch.Tensor:
        """A view of this rank's payload words ``[offset, offset + num_words)`` as ``dtype``."""
        start = PAYLOAD_OFFSET + offset_words
        return self.local[start : start + num_words].view(dtype)

    def ensure_payload(self, payload_words: int) -> None:
        """Grow the buffer to at least ``payload_words`` (collective: every rank must ask alike)."""
        if payload_words <= self.payload_words:
            return
        new_words = int(payload_words * GROWTH_FACTOR) // 32 * 32 + 32
        get_logger().info("epcomm NVLink buffer: growing payload to %.1f MB", new_words * 4 / 1e6)
        torch.cuda.current_stream(self.device).synchronize()
        self.barrier(Operation.INIT)
        torch.cuda.current_stream(self.device).synchronize()
        self.check_error()
        self._allocate(new_words)
        self.barrier(Operation.INIT)

    def next_epoch(self) -> int:
        """A value larger than every earlier epoch of this buffer."""
        self.epoch += 1
        return self.epoch

    def barrier(
        self,
        operation: Operation,
        counts: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
    ) -> None:
        """Entry/exit barrier on the current stream, optionally publishing ``counts`` to every peer
        (preceded by the per-rank token counts of ``is_token_in_rank`` when given; see
        ``launch_exchange``)."""
        launch_exchange(
            self.peer_buffers,
            counts,
            self.rank,
            self.next_epoch(),
            self.timeout_ns,
            self.error_word.data_ptr(),
            int(operation),
            0,
            TABLE_OFFSET,
            is_token_in_rank,
        )

    def count_table(self, num_counts: int) -> torch.Tensor:
        """``[num_ranks, num_counts]`` int32 view of the counts every rank published."""
        return self.local[TABLE_OFFSET : TABLE_OFFSET + self.num_ranks * num_counts].view(
            self.num_ranks, num_counts
        )

    def check_error(self) -> None:
        """Raise ``PeerTimeoutError`` if a kernel reported a timed-out wait (no device sync)."""
        if self._error_flag.value != 0:
            code, peer, rank = (int(v) for v in self.error_word[1:4])
            try:
                name = _OPERATION_NAMES[Operation(code)]
            except ValueError:
                name = f"operation {code}"
            self.error_word.zero_()
            raise PeerTimeoutError(name, rank, [peer], self.timeout_s)

    def destroy(self) -> None:
        """Drop the buffer and its peer mappings."""
        self.peer_buffers = []
        self._local = None
        self._handle = None
