"""One symmetric buffer per ``Buffer``: allocated with ``torch.distributed._symmetric_memory``,
mapped on every rank, grown collectively when a call needs more.

Ranks that share one GPU (a test set-up: several processes on a single device, which symmetric
memory refuses) map each other's buffers through CUDA IPC instead. The kernels are the same; the
processes' kernels then take turns on the device (time slices), so only correctness, not speed,
carries over to a real NVLink node.

Layout (int32 words): ``[flags: 128][count table: MAX_PEERS x MAX_COUNTS][payload ...]``; the
flags are ``MAX_PEERS`` epoch flags (word ``s``: rank ``s`` arrived), at ``COUNTER_WORD`` the push
kernel's done counter, from ``CHECKPOINT_COUNTER_WORD`` its per-range done counters and from
``PROGRESS_WORD`` the ``MAX_PEERS x MAX_CHECKPOINTS`` progress flags (word ``s * 8 + k``: rank
``s`` pushed its range ``k`` here; a copy engine waits on them). The payload is reused by every
operation; an entry barrier before each push (the count exchange, for a dispatch) guarantees every
peer has consumed the previous contents.
"""

from __future__ import annotations

import ctypes
import enum
import pickle
import time
from typing import Any

import torch

from epcomm._collectives import all_gather_bytes
from epcomm._logging import get_logger
from epcomm.errors import PeerTimeoutError
from epcomm.kernels.exchange import MAX_PEERS, PeerArgs, launch_barrier
from epcomm.kernels.normal_push import MAX_CHECKPOINTS, PushBarriers
from epcomm.kernels.normal_rows import HOST_TABLE_WORD, launch_dispatch_counts

__all__ = ["Operation", "SymmetricTransport"]

FLAG_WORDS = 128
FLAG_OFFSET = 0
COUNTER_WORD = 32
CHECKPOINT_COUNTER_WORD = 40
PROGRESS_WORD = 64
# Per-rank counts, per-expert counts (up to 4096 experts), per-rank counts below each checkpoint.
MAX_COUNTS = MAX_PEERS + 4096 + MAX_PEERS * (MAX_CHECKPOINTS - 1)
TABLE_OFFSET = FLAG_WORDS
PAYLOAD_OFFSET = (TABLE_OFFSET + MAX_PEERS * MAX_COUNTS + 31) // 32 * 32
# Grow by a quarter more than asked, so slowly rising batch sizes do not reallocate every call.
GROWTH_FACTOR = 1.25
# The host waits at most this long for the count table (DeepEP's CPU timeout is 100 s as well): the
# device may be busy with the caller's earlier work; a missing peer is reported by the kernel's own,
# shorter bound.
HOST_WAIT_S = 100.0


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
        shared_device: ranks share a GPU (``nvlink_placement`` said ``"shared"``): map peer buffers
            through CUDA IPC, since symmetric memory refuses overlapping devices.
    """

    def __init__(
        self,
        group: Any,
        device: torch.device,
        timeout_s: float,
        initial_payload_bytes: int,
        shared_device: bool = False,
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
        self._error_address = self.error_word.data_ptr()
        self._error_flag = ctypes.c_int32.from_address(self._error_address)
        # Host-mapped count words the dispatch count kernel writes (kernels/normal_rows.py).
        self.host_counts = torch.zeros(
            HOST_TABLE_WORD + MAX_PEERS * MAX_COUNTS, dtype=torch.int32, pin_memory=True
        )
        address = self.host_counts.data_ptr()
        # Sliced into Python lists at C speed (no numpy needed).
        self._host_table = (ctypes.c_int32 * (MAX_PEERS * MAX_COUNTS)).from_address(
            address + 4 * HOST_TABLE_WORD
        )
        self._host_table_epoch = ctypes.c_int32.from_address(address)
        self._host_recv_count = ctypes.c_int32.from_address(address + 4)
        self._host_recv_epoch = ctypes.c_int32.from_address(address + 8)
        self.payload_words = 0
        self.shared_device = shared_device
        self._handle: Any = None
        self._local: torch.Tensor | None = None
        self.peer_buffers: list[torch.Tensor] = []
        self.peer_args: PeerArgs | None = None
        self._allocate(max(initial_payload_bytes, 1 << 20) // 4)
        self.barrier(Operation.INIT)
        torch.cuda.current_stream(device).synchronize()
        self.check_error()

    def _allocate(self, payload_words: int) -> None:
        total_words = PAYLOAD_OFFSET + payload_words
        if self.shared_device:
            buffer, handle, self.peer_buffers = self._allocate_ipc(total_words)
        else:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(total_words, dtype=torch.int32, device=self.device)
            buffer.zero_()
            torch.cuda.current_stream(self.device).synchronize()
            handle = symm_mem.rendezvous(buffer, self.group)
            self.peer_buffers = [
                handle.get_buffer(r, (total_words,), torch.int32) for r in range(self.num_ranks)
            ]
        self.peer_args = PeerArgs(self.peer_buffers)
        self._local, self._handle = buffer, handle
        self.payload_words = payload_words
        # A fresh buffer starts with zero flags everywhere, below every epoch. Epochs are not reset
        # (every rank grows at the same call, so they stay equal): the host-mapped count words
        # are matched against epochs and must never see a stale word equal to a new epoch.

    def _allocate_ipc(self, total_words: int) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
        """Allocate with the caching allocator and map every peer's buffer through CUDA IPC (the
        ``torch.multiprocessing`` reduction, its handles gathered over the group)."""
        from torch.multiprocessing.reductions import reduce_tensor

        buffer = torch.zeros(total_words, dtype=torch.int32, device=self.device)
        torch.cuda.current_stream(self.device).synchronize()
        rebuild, args = reduce_tensor(buffer)
        blobs = all_gather_bytes(pickle.dumps(args), self.group)
        peers = [buffer if r == self.rank else rebuild(*pickle.loads(blob)) for r, blob in enumerate(blobs)]
        return buffer, None, peers

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

    def barrier(self, operation: Operation) -> None:
        """Entry/exit barrier on the current stream (``launch_barrier``); ``operation`` names it in
        a timeout."""
        assert self.peer_args is not None
        launch_barrier(
            self.peer_args,
            self.rank,
            self.next_epoch(),
            self.timeout_ns,
            self._error_address,
            int(operation),
            FLAG_OFFSET,
        )

    def push_barriers(self, entry: Operation | None, exit_: Operation, checkpoints: int = 0) -> PushBarriers:
        """The barriers to fold into the next push: an entry barrier (unless ``entry`` is
        ``None``) and an exit barrier, each named by its operation in a timeout; with
        ``checkpoints``, progress flags after each of that many ranges (``PushBarriers``)."""
        entry_epoch = self.next_epoch() if entry is not None else 0
        return PushBarriers(
            entry_epoch,
            self.next_epoch(),
            self.timeout_ns,
            self._error_address,
            int(entry) if entry is not None else 0,
            int(exit_),
            PAYLOAD_OFFSET,
            FLAG_OFFSET,
            COUNTER_WORD,
            checkpoints,
            PROGRESS_WORD,
            CHECKPOINT_COUNTER_WORD,
        )

    def progress_address(self, source: int, checkpoint: int) -> int:
        """Device address of this rank's progress flag for ``source``'s range ``checkpoint``: the
        push's ``exit_epoch`` once that range has landed here (``PushBarriers.checkpoints``)."""
        return self.local.data_ptr() + 4 * (PROGRESS_WORD + source * MAX_CHECKPOINTS + checkpoint)

    def dispatch_counts(
        self,
        epoch: int,
        num_tokens_per_expert: torch.Tensor,
        is_token_in_rank: torch.Tensor,
        read_on_host: bool,
        checkpoints: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exchange the dispatch counts and compute the rows (``launch_dispatch_counts``).

        Arguments:
            epoch: from ``next_epoch()`` (taken before the push's barriers, so in launch order).
            num_tokens_per_expert: ``[num_experts]`` int32, contiguous.
            is_token_in_rank: ``[num_tokens, num_ranks]`` bool, contiguous.
            read_on_host: copy the table to host-mapped memory for ``read_counts(epoch, ...)``;
                without it, the receive count goes there for ``received_count(epoch)``.
            checkpoints: the push's ranges; each row then ends with the counts below each inner
                checkpoint (``counts_row_words``).

        Returns:
            ``recv_row_of_token``, ``rank_prefix_matrix`` and ``num_recv_tokens`` (device tensors).
        """
        assert self.peer_args is not None
        return launch_dispatch_counts(
            self.peer_args,
            num_tokens_per_expert,
            is_token_in_rank,
            self.rank,
            epoch,
            self.timeout_ns,
            self._error_address,
            int(Operation.DISPATCH_COUNTS),
            FLAG_OFFSET,
            TABLE_OFFSET,
            self.host_counts.data_ptr(),
            read_on_host,
            checkpoints,
        )

    def read_counts(self, epoch: int, num_counts: int) -> list[list[int]]:
        """Wait (host spin, bounded) for the table ``dispatch_counts(read_on_host=True)`` copies to
        the host and return its ``num_ranks`` rows of ``num_counts`` ints; raise a peer's timeout.
        Epochs only increase, so an older table's word never equals ``epoch``."""
        flag, error = self._host_table_epoch, self._error_flag
        if flag.value != epoch:
            deadline = time.monotonic() + max(HOST_WAIT_S, self.timeout_s)
            spins = 0
            while flag.value != epoch:
                if error.value != 0:
                    self.check_error()
                spins += 1
                if spins % 4096 == 0 and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"dispatch (count read): rank {self.rank} did not get the count table from its "
                        f"device within {max(HOST_WAIT_S, self.timeout_s):.0f} s (device busy or stuck)"
                    )
        self.check_error()
        table = self._host_table
        return [table[r * num_counts : (r + 1) * num_counts] for r in range(self.num_ranks)]

    def received_count(self, epoch: int) -> int | None:
        """The receive count of the ``dispatch_counts(read_on_host=False)`` call at ``epoch``, or
        ``None`` while the device has not written it (or a later call replaced it)."""
        if self._host_recv_epoch.value != epoch:
            return None
        return int(self._host_recv_count.value)

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
        self.peer_args = None
        self._local = None
        self._handle = None
