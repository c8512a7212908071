"""The transport primitives every kernel uses to reach peers: address, store, fence, signal, wait.

A kernel never touches a peer's memory except through these functions, so a second transport
(NVSHMEM put-with-signal for the cross-node leg) replaces this file's peer functions, not the
kernels. The NVLink transport's meaning:

- **address**: ``peer_pointer(peer_table, peer)`` (``peer_pointers`` for a block of ranks). ``peer_table`` is an int64 device tensor with
  one entry per rank: the address, in this process, of that rank's symmetric buffer (its own
  included). No fixed peer count: the table has as many entries as the group has ranks.
- **store**: ``store_remote`` is a plain ``st.global`` through that address (NVLink or local).
- **fence**: ``fence_acq_rel_sys`` orders a thread's earlier stores (peers' memory included) before
  its later ones at system scope.
- **signal**: a block barrier, then one system-scope release (an atomic exchange) per flag
  (``signal_release_sys``, ``release_at_peers``).
- **wait**: relaxed system-scope polls until every awaited flag reaches its value or the time bound
  passes, then acquire loads (``wait_flags``, ``wait_all_epoch``, ``wait_epoch``). An expired
  wait writes ``[1, operation code, peer, rank]`` into the host-mapped error word and returns, so a
  stream never hangs; the host raises the error naming the operation and the peer.

Peer-written payloads are read with ``.cg`` loads (bypass the non-coherent L1), never ``.nc``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "HOISTED_PEERS",
    "fence_acq_rel_sys",
    "global_timer_ns",
    "load_acquire_sys",
    "load_relaxed_sys",
    "peer_pointer",
    "peer_pointers",
    "release_at_peers",
    "signal_release_sys",
    "store_remote",
    "wait_all_epoch",
    "wait_epoch",
    "wait_flags",
]


# Destinations whose buffer addresses a kernel loads once per program and keeps in registers (two
# per address); past this many it loads each where it is used. A table load inside a loop that also
# stores cannot be hoisted by the compiler (the stores may alias the table): EP1 cached-dispatch
# push 72 us with the addresses as kernel arguments, 104 us with a load per step.
HOISTED_PEERS = tl.constexpr(8)


@triton.jit
def global_timer_ns():
    """The GPU's global nanosecond timer (``%globaltimer``)."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def peer_pointer(peer_table, peer):
    """``*int32`` pointer to word 0 of rank ``peer``'s symmetric buffer (``peer_table``: ``[num_ranks]``
    int64 addresses). The 16-byte alignment hint keeps the stores through it 16-byte vectors (the
    buffers are allocated 16-byte aligned; without the hint the compiler emits 4-byte stores)."""
    return tl.multiple_of(tl.load(peer_table + peer).to(tl.pointer_type(tl.int32)), 16)


@triton.jit
def peer_pointers(peer_table, peers, mask):
    """``peer_pointer`` for a block of ranks: ``[BLOCK]`` pointers to word 0 of each ``peers[i]``'s
    buffer where ``mask[i]`` holds (null elsewhere), with the same 16-byte alignment hint."""
    return tl.multiple_of(tl.load(peer_table + peers, mask=mask, other=0).to(tl.pointer_type(tl.int32)), 16)


@triton.jit
def store_remote(pointer, value, mask=None):
    """Store ``value`` at ``pointer`` (a peer's memory, reached through ``peer_pointer``) where
    ``mask`` holds."""
    tl.store(pointer, value, mask=mask)


@triton.jit
def fence_acq_rel_sys():
    """``fence.acq_rel.sys`` in every thread: this thread's earlier writes (peers' memory included)
    are ordered before its later ones at system scope. Each writing thread runs it before the block
    barrier that precedes a release standing for the whole grid (``push_rows_kernel``'s exit)."""
    tl.inline_asm_elementwise(
        "fence.acq_rel.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def load_acquire_sys(pointer):
    """Load int32s with acquire semantics at system scope (sees peers' released writes)."""
    return tl.inline_asm_elementwise(
        "ld.acquire.sys.global.b32 $0, [$1];", "=r,l", [pointer], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def load_relaxed_sys(pointer):
    """Load int32s relaxed at system scope: a coherent poll (no L1 hit, sees peers' writes) with no
    acquire fence, for spinning; follow the last poll with ``load_acquire_sys`` before reading data."""
    return tl.inline_asm_elementwise(
        "ld.relaxed.sys.global.b32 $0, [$1];", "=r,l", [pointer], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def signal_release_sys(pointer, value):
    """Publish ``value`` at ``pointer`` (possibly a peer's) after every prior write of this block."""
    tl.debug_barrier()
    tl.atomic_xchg(pointer, value, sem="release", scope="sys")


@triton.jit
def release_at_peers(peer_table, word, value, NUM_RANKS: tl.constexpr):
    """``signal_release_sys`` of ``value`` at word ``word`` of every rank's buffer."""
    for peer in range(NUM_RANKS):
        signal_release_sys(peer_pointer(peer_table, peer) + word, value)


@triton.jit
def _report_timeout(error_pointer, operation_code, peer, rank):
    """Write ``[1, operation_code, peer, rank]`` into the host-mapped error word (flag last)."""
    tl.store(error_pointer + 1, operation_code)
    tl.store(error_pointer + 2, peer)
    tl.store(error_pointer + 3, rank)
    tl.atomic_xchg(error_pointer, 1, sem="release", scope="sys")


@triton.jit
def wait_epoch(flag_pointer, epoch, timeout_ns, error_pointer, operation_code, peer, rank):
    """Spin until ``*flag_pointer >= epoch`` or ``timeout_ns`` passes; on expiry report ``peer``
    (``_report_timeout``) and return, then a block barrier."""
    start = global_timer_ns()
    value = load_acquire_sys(flag_pointer)
    expired = False
    while (value < epoch) & (not expired):
        value = load_acquire_sys(flag_pointer)
        expired = (global_timer_ns() - start) > timeout_ns
    if value < epoch:
        _report_timeout(error_pointer, operation_code, peer, rank)
    tl.debug_barrier()


@triton.jit
def wait_flags(
    flags,
    waited_on,
    expected,
    timeout_ns,
    error_pointer,
    operation_code,
    rank,
    TRACK: tl.constexpr,
    BLOCK: tl.constexpr,
    REPORT: tl.constexpr,
):
    """Bounded wait on ``BLOCK`` flags at once: until ``flags[s] >= expected[s]`` for every ``s`` in
    ``waited_on`` (``[BLOCK]`` pointers / bools / values; ``expected`` may be a scalar) or
    ``timeout_ns`` passes.

    One relaxed system-scope poll of all flags per round (no acquire fence in the spin); once all
    arrived (or the bound passed), one acquire load per flag orders this program's later reads after
    the peers' releases. On expiry reports the first missing ``s`` (if ``REPORT``; else the caller
    handles ``missing``) and returns, so the stream never hangs. No block barrier: the caller adds it. Returns ``(missing [BLOCK], start_ns, seen_at_ns
    [BLOCK])``; with ``TRACK``, ``seen_at`` is when each flag was first seen arrived (else the
    first poll's time).
    """
    sources = tl.arange(0, BLOCK)
    start = global_timer_ns()
    missing = waited_on & (load_relaxed_sys(flags) < expected)
    now = global_timer_ns()
    seen_at = tl.zeros([BLOCK], dtype=tl.int64) + now
    expired = False
    while (tl.max(missing.to(tl.int32), axis=0) > 0) & (not expired):
        was_missing = missing
        missing = missing & (load_relaxed_sys(flags) < expected)
        now = global_timer_ns()
        if TRACK:
            seen_at = tl.where(was_missing & ~missing, now, seen_at)
        expired = (now - start) > timeout_ns
    missing = waited_on & (load_acquire_sys(flags) < expected)
    if REPORT:
        if tl.max(missing.to(tl.int32), axis=0) > 0:
            _report_timeout(
                error_pointer, operation_code, tl.min(tl.where(missing, sources, BLOCK), axis=0), rank
            )
    return missing, start, seen_at


@triton.jit
def wait_all_epoch(
    flags_pointer,
    epoch,
    timeout_ns,
    error_pointer,
    operation_code,
    rank,
    NUM_RANKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``wait_flags`` for every peer ``s < NUM_RANKS``, ``s != rank``: word ``s`` at
    ``flags_pointer`` reaching ``epoch`` (``BLOCK``: a power of two >= ``NUM_RANKS``; the
    ``BLOCK`` words there must be readable), then a block barrier."""
    sources = tl.arange(0, BLOCK)
    waited_on = (sources < NUM_RANKS) & (sources != rank)
    wait_flags(
        flags_pointer + sources,
        waited_on,
        epoch,
        timeout_ns,
        error_pointer,
        operation_code,
        rank,
        False,
        BLOCK,
        True,
    )
    tl.debug_barrier()
