"""The symmetric buffer of one group: its whole map, allocation and rendezvous, epochs, error word.

One ``SymmetricBuffer`` per mode of a ``Buffer`` (normal mode: ``num_nvl_bytes``; low-latency
mode: ``num_rdma_bytes``), mapped on every rank by one of three ``Allocator``s: PyTorch's symmetric
memory (CUDA backend, peers from its rendezvous); CUDA IPC, for ranks that share one GPU (a test
set-up: several processes on a single device, which symmetric memory refuses; the processes'
kernels then take turns on the device, so only correctness carries over); or NVSHMEM (PyTorch's
symmetric memory with the NVSHMEM backend, peers' addresses from ``nvshmem_ptr`` on the device,
``backends.nvshmem.runtime``), which also serves ranks sharing a GPU. The kernels are the same for
all three: they reach peers through the peer table.
This module launches no mode kernel (only the barrier that brackets an allocation); the modes
(``normal.py``, ``low_latency.py``) sequence their kernels over it.

The map, in int32 words (``R`` ranks; ``B`` = the next power of two >= ``R``, at least 2: the
lanes of one wait over every rank's flag, so ``B`` words of every flag array must be readable)::

    header (HeaderLayout)
      [flags,   flags + align32(B))        barrier flags: word s = the last epoch rank s released here
      [counter, counter + 32)              word 0: done counter of this rank's push kernel
      [table,   table + R * (8 + R + 4096)) count table (normal mode only): R call fingerprints
                                           of 8 words (row s = rank s's), then R count rows of
                                           [tokens per rank (R), tokens per expert (<= 4096)]
      [payload, end)                       payload, 4 KB aligned, grown on demand
    normal-mode payload (reused by every call; an entry barrier guards each reuse)
      dispatch (DispatchRegions): capacity rows of x | scales | top-k ids (int64) | top-k
                                  weights | source index, each region 32-word aligned
      combine (CombineRegions):   capacity rows of bf16 x | top-k weights
    low-latency payload (LowLatencyLayout; S = max(4, B) rounded up to a multiple of 4)
      [0, 4S)        sequence flags, (phase, parity) = (dispatch|combine, 0|1): S words each
      [4S, 6S)       dispatch token counts per parity: word s = tokens rank s sent in its last
                     dispatch of that parity
      [6S, 6S + 32R) call fingerprints per (phase, parity): R rows of 8 words, row s = the
                     fingerprint of rank s's last call of that phase and parity
      align32(6S + 32R)..  per parity: dispatch staging [R, M, message_words] (slot = source, token),
                     then combine staging [M, num_topk, hidden / 2] (slot = token, top-k slot)

Every offset the kernels get comes from here, from word 0 of the buffer.
"""

from __future__ import annotations

import ctypes
import enum
import pickle
from dataclasses import dataclass
from typing import Any

import torch

from epcomm._collectives import all_gather_bytes
from epcomm._logging import get_logger
from epcomm._math import align_up
from epcomm.errors import PeerTimeoutError
from epcomm.fingerprint import FINGERPRINT_WORDS
from epcomm.kernels.low_latency_dispatch import MINE_HEAD, PUT_FLAG_STRIDE
from epcomm.kernels.symmetric_peers import SymmetricPeers, flag_block

__all__ = [
    "MAX_EXPERTS",
    "MAX_LOW_LATENCY_TOPK",
    "Allocator",
    "CombineRegions",
    "DispatchRegions",
    "HeaderLayout",
    "LowLatencyLayout",
    "Operation",
    "SymmetricBuffer",
    "low_latency_rdma_size_hint",
    "operation_name",
]

ALIGN_WORDS = 32  # 128 bytes: every area starts on its own cache line
# The payload starts on a 4 KB boundary, so the receive areas' rows (a BF16 row of hidden 7168 is
# 14 KB) are at least 1 KB aligned. The alignment shows in the copies' speed: at EP1 on an H200 the
# copy-out memcpy, unchanged code, took 27.7 us from a 1 KB-aligned receive area and 28.4 us from a
# 128-byte-aligned one (docs/performance.md).
PAYLOAD_ALIGN_WORDS = 1024
MAX_EXPERTS = 4096
"""Most experts of a normal-mode dispatch on this transport: the width of a count-table row."""
MAX_LOW_LATENCY_TOPK = 32
"""Largest ``num_topk`` of low-latency mode (DeepEP: 11). The size hint reserves the combine
staging area for this many slots per token."""
# Grow by a quarter more than asked, so slowly rising batch sizes do not reallocate every call.
GROWTH_FACTOR = 1.25


def align(words: int) -> int:
    """``words`` rounded up to a multiple of ``ALIGN_WORDS``."""
    return align_up(words, ALIGN_WORDS)


class Allocator(enum.Enum):
    """How a ``SymmetricBuffer`` is allocated and its peers mapped."""

    SYMMETRIC_MEMORY = "symmetric memory"
    """``symm_mem.empty`` (CUDA backend) and ``symm_mem.rendezvous``: one GPU per rank."""
    CUDA_IPC = "CUDA IPC"
    """The caching allocator, peers opened through CUDA IPC handles: ranks sharing a GPU."""
    NVSHMEM = "NVSHMEM"
    """``symm_mem.empty`` under the NVSHMEM backend, peers from ``nvshmem_ptr`` (no rendezvous)."""


# ---- the map ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeaderLayout:
    """Offsets of the header (int32 words from word 0), the same on every rank.

    Arguments:
        num_ranks: ranks of the group.
        count_table: whether the buffer holds the normal-mode count table.
        wide_flags: uint64 barrier flags (the put path's: NVSHMEM signals), two words each.
    """

    num_ranks: int
    count_table: bool
    wide_flags: bool = False

    @property
    def flags(self) -> int:
        """Barrier flags: ``flag_block(num_ranks)`` words (twice that with ``wide_flags``)."""
        return 0

    @property
    def counter(self) -> int:
        """The push kernel's done counter (zero between pushes)."""
        return align((PUT_FLAG_STRIDE.value if self.wide_flags else 1) * flag_block(self.num_ranks))

    @property
    def table(self) -> int:
        """The count table: ``num_ranks`` fingerprints of ``FINGERPRINT_WORDS`` words, then
        ``num_ranks`` count rows of up to ``num_ranks + MAX_EXPERTS`` words."""
        return self.counter + ALIGN_WORDS

    @property
    def table_words(self) -> int:
        """Words of the count table (0 without one)."""
        if not self.count_table:
            return 0
        return self.num_ranks * (FINGERPRINT_WORDS + self.num_ranks + MAX_EXPERTS)

    @property
    def payload(self) -> int:
        """First payload word (4 KB aligned: ``PAYLOAD_ALIGN_WORDS``)."""
        end = self.table + self.table_words
        return align_up(end, PAYLOAD_ALIGN_WORDS)


# Up to five regions per area, each aligned to 32 words: this much slack always covers them.
REGION_SLACK_WORDS = 8 * ALIGN_WORDS


def row_capacity(payload_words: int, row_words: int) -> int:
    """Rows of ``row_words`` words (over all regions) a payload of ``payload_words`` holds."""
    return max(0, (payload_words - REGION_SLACK_WORDS) // row_words)


@dataclass(frozen=True)
class DispatchRegions:
    """Receive area of a dispatch at word ``payload``: ``capacity`` rows of x, scales, top-k ids
    (int64), top-k weights (float32) and source index (int32), each region 32-word aligned."""

    payload: int
    capacity: int
    x_words: int
    scale_words: int
    num_topk: int

    @property
    def x(self) -> int:
        return self.payload

    @property
    def scales(self) -> int:
        return self.x + align(self.capacity * self.x_words)

    @property
    def topk_idx(self) -> int:
        return self.scales + align(self.capacity * self.scale_words)

    @property
    def topk_weights(self) -> int:
        return self.topk_idx + align(self.capacity * self.num_topk * 2)

    @property
    def src_idx(self) -> int:
        return self.topk_weights + align(self.capacity * self.num_topk)

    @staticmethod
    def row_words(x_words: int, scale_words: int, num_topk: int) -> int:
        """Words one row takes over all fields (int64 top-k ids count twice, plus the source index)."""
        return x_words + scale_words + 3 * num_topk + 1


@dataclass(frozen=True)
class CombineRegions:
    """Receive area of a combine at word ``payload``: ``capacity`` rows of bf16 x (``x_words``
    int32 words each), then their float32 top-k weights."""

    payload: int
    capacity: int
    x_words: int
    num_topk: int

    @property
    def x(self) -> int:
        return self.payload

    @property
    def topk_weights(self) -> int:
        return self.x + align(self.capacity * self.x_words)

    @staticmethod
    def row_words(x_words: int, num_topk: int) -> int:
        """Words one row takes over all fields."""
        return x_words + num_topk


@dataclass(frozen=True)
class LowLatencyLayout:
    """Low-latency payload offsets (int32 words from the payload's start) for one
    ``(num_ranks, M, hidden, num_topk)``, the same on every rank.

    With ``put_path`` (multi-node: peers of other nodes reached by NVSHMEM puts), each flag is a
    uint64 signal (two words; the sequence in the low one), and the areas only the put path uses
    follow both parities' staging: the top-k rows apart, the ``mine`` words of each op and the
    outboxes the puts read (``kernels.low_latency_dispatch.PutPath``); the combine outbox has the
    shape of the expert outputs, ``num_local_experts`` of them.
    """

    num_ranks: int
    capacity: int
    hidden: int
    num_topk: int
    put_path: bool = False
    num_local_experts: int = 0

    @property
    def flag_stride(self) -> int:
        """Words of one (phase, parity)'s flags or one parity's counts: ``S``."""
        return align_up(
            max(4, (PUT_FLAG_STRIDE.value if self.put_path else 1) * flag_block(self.num_ranks)), 4
        )

    def flags(self, phase: int, parity: int) -> int:
        """Sequence flags of ``phase`` (0 dispatch, 1 combine) and ``parity``."""
        return (phase * 2 + parity) * self.flag_stride

    def counts(self, parity: int) -> int:
        """``parity``'s dispatch token counts, one word per source rank."""
        return (4 + parity) * self.flag_stride

    def fingerprints(self, phase: int, parity: int) -> int:
        """``(phase, parity)``'s call fingerprints: ``[num_ranks, FINGERPRINT_WORDS]``, row ``s``
        written by rank ``s`` before it releases its sequence flag."""
        return 6 * self.flag_stride + (phase * 2 + parity) * self.num_ranks * FINGERPRINT_WORDS

    @property
    def message_words(self) -> int:
        """Words of one dispatch message: bf16 row (the larger format) + top-k ids, 16-byte aligned."""
        return (self.hidden // 2 + self.num_topk + 3) // 4 * 4

    @property
    def dispatch_words(self) -> int:
        """Words of one parity's dispatch staging area."""
        return align(self.num_ranks * self.capacity * self.message_words)

    @property
    def combine_words(self) -> int:
        """Words of one parity's combine staging area."""
        return align(self.capacity * self.num_topk * self.hidden // 2)

    @property
    def staging(self) -> int:
        """The first staging area (after the flags, counts and fingerprints; 32-word aligned)."""
        return align(self.fingerprints(2, 0))

    def dispatch_staging(self, parity: int) -> int:
        """``parity``'s dispatch staging area."""
        return self.staging + parity * (self.dispatch_words + self.combine_words)

    def combine_staging(self, parity: int) -> int:
        """``parity``'s combine staging area."""
        return self.dispatch_staging(parity) + self.dispatch_words

    def topk(self, parity: int) -> int:
        """Put path: ``parity``'s dispatch top-k rows, ``[num_ranks, M, num_topk]``."""
        return self.dispatch_staging(2) + parity * align(self.num_ranks * self.capacity * self.num_topk)

    def mine(self, phase: int) -> int:
        """Put path: ``phase``'s ``mine`` words (``MINE_HEAD``, then dispatch's ``[M, num_topk]``
        top-k rows)."""
        dispatch_mine = align(MINE_HEAD.value + self.capacity * self.num_topk)
        return self.topk(2) + phase * dispatch_mine

    @property
    def dispatch_outbox(self) -> int:
        """Put path: the dispatch send copies, ``[M, message_words]``."""
        return self.mine(1) + align(MINE_HEAD.value)

    @property
    def combine_outbox(self) -> int:
        """Put path: the combine send copies, ``[num_local_experts, num_ranks * M, hidden / 2]``."""
        return self.dispatch_outbox + align(self.capacity * self.message_words)

    @property
    def total_words(self) -> int:
        """Payload words both parities need."""
        if not self.put_path:
            return self.dispatch_staging(2)
        rows = self.num_local_experts * self.num_ranks * self.capacity
        return self.combine_outbox + align(rows * self.hidden // 2)


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int,
    hidden: int,
    num_ranks: int,
    num_experts: int,
    across_nodes: bool = False,
) -> int:
    """Bytes of ``num_rdma_bytes`` low-latency mode needs: the real size of ``LowLatencyLayout``
    for ``min(num_experts, MAX_LOW_LATENCY_TOPK)`` top-k slots (DeepEP's formula asks for ~17x
    more at 128 tokens, hidden 7168, 256 experts; any larger buffer works too).

    Arguments:
        num_max_dispatch_tokens_per_rank: capacity ``M`` per rank.
        hidden: hidden size (a multiple of 128).
        num_ranks: ranks of the group.
        num_experts: total experts.
        across_nodes: the layout of the put path (``backend="nvshmem"`` in multi-node mode), whose
            send copies make it larger; a smaller buffer grows at the first call of each size.

    Returns:
        int, a multiple of 128.
    """
    num_topk = max(1, min(num_experts, MAX_LOW_LATENCY_TOPK))
    layout = LowLatencyLayout(
        num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_topk, across_nodes, num_experts // num_ranks
    )
    return layout.total_words * 4


# ---- errors -----------------------------------------------------------------------------------
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
    LOW_LATENCY_CLEAN = 10
    GROW = 11


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
    Operation.LOW_LATENCY_CLEAN: "clean_low_latency_buffer (barrier)",
    Operation.GROW: "buffer growth (barrier before a collective allocation)",
}


def operation_name(code: int) -> str:
    """The name errors and warnings give operation ``code`` (an ``Operation``)."""
    try:
        return _OPERATION_NAMES[Operation(code)]
    except ValueError:
        return f"operation {code}"


# ---- the buffer -------------------------------------------------------------------------------
class SymmetricBuffer:
    """The symmetric buffer of one group: allocation, peers' views and the peer table, epochs and
    the host-mapped error word.

    Arguments:
        group: the process group (NCCL or gloo; only used for the rendezvous).
        device: this rank's CUDA device.
        timeout_s: bound of every wait.
        initial_payload_bytes: payload bytes to allocate now (grown later when needed).
        count_table: reserve the normal-mode count table in the header.
        allocator: how the buffer is allocated and the peers mapped (``Allocator``).
        store_ranks: the ranks this rank reaches by loads and stores (``None``: all). With fewer
            (``Allocator.NVSHMEM`` across nodes: the low-latency put path), the others' table
            entries may be 0 (never dereferenced) and the buffer's barriers signal them through
            NVSHMEM (``barrier_put``).
    """

    def __init__(
        self,
        group: Any,
        device: torch.device,
        timeout_s: float,
        initial_payload_bytes: int,
        count_table: bool,
        allocator: Allocator = Allocator.SYMMETRIC_MEMORY,
        store_ranks: list[int] | None = None,
    ) -> None:
        import torch.distributed as dist

        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.store_ranks = list(range(self.num_ranks)) if store_ranks is None else sorted(store_ranks)
        # Some ranks reached by puts only (the multi-node put path): barriers with NVSHMEM signals.
        self.put_barriers = len(self.store_ranks) < self.num_ranks
        self.header = HeaderLayout(self.num_ranks, count_table, wide_flags=self.put_barriers)
        self._barrier_put: Any = None
        self.timeout_ns = int(timeout_s * 1e9)
        self.timeout_s = timeout_s
        self.epoch = 0
        # Host-mapped error word: kernels write it on a timed-out wait, the host reads it at any
        # time without synchronizing the device. Words [0, 4): [flag, operation, peer, rank];
        # word 4 + s: the operation whose shrink-mode wait masked rank s (0: none).
        self.error_word = torch.zeros(4 + self.num_ranks, dtype=torch.int32, device="cpu", pin_memory=True)
        self.error_address = self.error_word.data_ptr()
        # Read through ctypes on every call: indexing the tensor costs a tensor op each time.
        self._error_flag = ctypes.c_int32.from_address(self.error_address)
        self.payload_words = 0
        # Bumped at every allocation: views cached by the modes are valid for one generation.
        self.generation = 0
        self.allocator = allocator
        self._handle: Any = None
        self._local: torch.Tensor | None = None
        # Peers' tensors where the allocator gives them (symmetric memory, CUDA IPC), kept alive
        # with the buffer; NVSHMEM gives addresses only.
        self.peer_buffers: list[torch.Tensor] = []
        self._peers: SymmetricPeers | None = None
        self._allocate(max(initial_payload_bytes, 1 << 20) // 4)
        self.barrier(Operation.INIT)
        torch.cuda.current_stream(device).synchronize()
        self.check_error()

    def _allocate(self, payload_words: int) -> None:
        total_words = self.header.payload + payload_words
        if self.allocator is Allocator.NVSHMEM:
            buffer, addresses, table = self._allocate_nvshmem(total_words)
            handle = None
        else:
            if self.allocator is Allocator.CUDA_IPC:
                buffer, handle, self.peer_buffers = self._allocate_ipc(total_words)
            else:
                import torch.distributed._symmetric_memory as symm_mem

                from epcomm.backends.nvshmem.runtime import claim_symmetric_memory_backend

                claim_symmetric_memory_backend("CUDA", self.device, symm_mem)
                buffer = symm_mem.empty(total_words, dtype=torch.int32, device=self.device)
                buffer.zero_()
                torch.cuda.current_stream(self.device).synchronize()
                handle = symm_mem.rendezvous(buffer, self.group)
                self.peer_buffers = [
                    handle.get_buffer(r, (total_words,), torch.int32) for r in range(self.num_ranks)
                ]
            addresses = [peer.data_ptr() for peer in self.peer_buffers]
            table = torch.tensor(addresses, dtype=torch.int64, device="cpu").to(self.device)
        misaligned = [r for r, address in enumerate(addresses) if address % 16 != 0]
        if misaligned:
            raise RuntimeError(f"symmetric buffers of ranks {misaligned} are not 16-byte aligned")
        self._peers = SymmetricPeers(
            peer_table=table,
            rank=self.rank,
            num_ranks=self.num_ranks,
            timeout_ns=self.timeout_ns,
            error_address=self.error_address,
            flag_offset=self.header.flags,
            counter_offset=self.header.counter,
        )
        self._local, self._handle = buffer, handle
        self.payload_words = payload_words
        self.generation += 1
        # A fresh buffer starts with zero flags everywhere, below every epoch. Epochs are not reset
        # (every rank grows at the same call, so they stay equal): host-mapped words the modes
        # match against epochs must never see a stale word equal to a new epoch.

    def _allocate_nvshmem(self, total_words: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Allocate under the NVSHMEM backend (a collective of the whole job) and build the peer
        table on the device with ``nvshmem_ptr`` (no rendezvous: see ``backends.nvshmem.runtime``).
        Returns the buffer, the peers' addresses and the table."""
        from epcomm.backends.nvshmem.runtime import group_pes, nvshmem_symmetric_memory, retain
        from epcomm.kernels.nvshmem_peers import build_peer_table

        pes = group_pes(self.group)
        symm_mem = nvshmem_symmetric_memory(self.device)
        buffer = symm_mem.empty(total_words, dtype=torch.int32, device=self.device)
        retain(buffer)
        buffer.zero_()
        table = build_peer_table(buffer, pes)
        addresses = table.tolist()  # synchronizes the stream: the zeroed buffer and the table
        unreachable = [rank for rank in self.store_ranks if addresses[rank] == 0]
        if unreachable:
            raise RuntimeError(
                f"backend 'nvshmem': rank {self.rank} cannot reach the buffers of ranks {unreachable} by "
                "loads and stores (nvshmem_ptr gave 0): they are not on this node"
            )
        return buffer, addresses, table

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
        """This rank's whole buffer, ``[total_words]`` int32."""
        assert self._local is not None
        return self._local

    @property
    def peers(self) -> SymmetricPeers:
        """The peer table and everything else the kernels need to reach the peers."""
        assert self._peers is not None
        return self._peers

    def view(self, offset_words: int, num_words: int, dtype: torch.dtype) -> torch.Tensor:
        """A view of this rank's words ``[offset, offset + num_words)`` as ``dtype``."""
        return self.local[offset_words : offset_words + num_words].view(dtype)

    def ensure_payload(self, payload_words: int) -> None:
        """Grow the payload to at least ``payload_words`` (collective: every rank must ask alike)."""
        if payload_words <= self.payload_words:
            return
        new_words = int(payload_words * GROWTH_FACTOR) // ALIGN_WORDS * ALIGN_WORDS + ALIGN_WORDS
        get_logger().info("epcomm NVLink buffer: growing payload to %.1f MB", new_words * 4 / 1e6)
        torch.cuda.current_stream(self.device).synchronize()
        self.barrier(Operation.GROW)
        torch.cuda.current_stream(self.device).synchronize()
        self.check_error()
        self._allocate(new_words)
        self.barrier(Operation.GROW)

    def next_epoch(self) -> int:
        """A value larger than every earlier epoch of this buffer."""
        self.epoch += 1
        return self.epoch

    @property
    def barrier_put(self) -> Any:
        """The put path of this buffer's barriers (``kernels.barrier.BarrierPut``), or ``None`` when
        every rank is reached by stores."""
        if not self.put_barriers:
            return None
        if self._barrier_put is None:
            from epcomm.backends.nvshmem.runtime import group_pes
            from epcomm.kernels.barrier import BarrierPut, masked_barrier_put_kernel
            from epcomm.kernels.nvshmem_primitives import launchable

            reach = [int(rank in self.store_ranks) for rank in range(self.num_ranks)]
            self._barrier_put = BarrierPut(
                torch.tensor(reach, dtype=torch.int32, device="cpu").to(self.device),
                torch.tensor(group_pes(self.group), dtype=torch.int32, device="cpu").to(self.device),
                launchable(masked_barrier_put_kernel),
            )
        return self._barrier_put

    def barrier(self, operation: Operation) -> None:
        """Barrier over every rank on the current stream; ``operation`` names it in a timeout (with
        ``barrier_put``, NVSHMEM signals to the ranks reached by puts only)."""
        from epcomm.kernels.barrier import launch_barrier, launch_masked_barrier

        if self.put_barriers:
            put = self.barrier_put
            launch_masked_barrier(
                peers=self.peers,
                rank_mask=torch.zeros_like(put.reach),
                epoch=self.next_epoch(),
                operation_code=int(operation),
                shrink=False,
                put=put,
            )
            return
        launch_barrier(peers=self.peers, epoch=self.next_epoch(), operation_code=int(operation))

    def check_error(self) -> None:
        """Raise ``PeerTimeoutError`` if a kernel reported a timed-out wait (no device sync)."""
        if self._error_flag.value != 0:
            code, peer, rank = (int(v) for v in self.error_word[1:4])
            self.error_word[:4].zero_()
            raise PeerTimeoutError(operation_name(code), rank, [peer], self.timeout_s)

    def masked_by_timeout(self) -> dict[int, int]:
        """Shrink mode: ``{rank: operation code}`` for each rank a kernel's wait masked on its own
        (read from the host-mapped error word without synchronizing the device)."""
        return {rank: code for rank, code in enumerate(self.error_word[4:].tolist()) if code != 0}

    def forget_masked(self, rank: int) -> None:
        """Clear ``rank``'s shrink-mode entry (the rank was unmasked)."""
        self.error_word[4 + rank] = 0

    def destroy(self) -> None:
        """Drop the buffer and its peer mappings."""
        self.peer_buffers = []
        self._peers = None
        self._local = None
        self._handle = None
