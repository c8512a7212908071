"""Every memory-ordering helper the kernels use: release signals, acquire loads, bounded waits.

Writers: block barrier, then one system-scope release (an atomic exchange of the epoch) per
signal. Readers: acquire loads at system scope until the epoch arrives or the time bound passes.
Peer-written payloads are read with ``.cg`` loads (bypass the non-coherent L1), never ``.nc``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "fence_acq_rel_sys",
    "global_timer_ns",
    "load_acquire_sys",
    "load_relaxed_sys",
    "signal_release_sys",
    "wait_all_epoch",
    "wait_epoch",
    "wait_flags",
]

# Written into the error word's first slot when a wait expired.
TIMEOUT_ERROR_CODE = 1


@triton.jit
def global_timer_ns():
    """The GPU's global nanosecond timer (``%globaltimer``)."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


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
    """Load one int32 with acquire semantics at system scope (sees peers' released writes)."""
    return tl.inline_asm_elementwise(
        "ld.acquire.sys.global.b32 $0, [$1];", "=r,l", [pointer], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def load_relaxed_sys(pointer):
    """Load one int32 relaxed at system scope: a coherent poll (no L1 hit, sees peers' writes) with no
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
def wait_epoch(flag_pointer, epoch, timeout_ns, error_pointer, operation_code, peer, rank):
    """Spin until ``*flag_pointer >= epoch`` or ``timeout_ns`` passes.

    On expiry writes ``[1, operation_code, peer, rank]`` to ``error_pointer`` (host-mapped memory
    the host reads without synchronizing) and returns, so the stream never hangs.
    """
    start = global_timer_ns()
    value = load_acquire_sys(flag_pointer)
    expired = False
    while (value < epoch) & (not expired):
        value = load_acquire_sys(flag_pointer)
        expired = (global_timer_ns() - start) > timeout_ns
    if value < epoch:
        tl.store(error_pointer + 1, operation_code)
        tl.store(error_pointer + 2, peer)
        tl.store(error_pointer + 3, rank)
        tl.atomic_xchg(error_pointer, 1, sem="release", scope="sys")
    tl.debug_barrier()


@triton.jit
def wait_flags(
    flags, waited_on, expected, timeout_ns, error_pointer, operation_code, rank, TRACK: tl.constexpr
):
    """Bounded wait on 8 flags at once: until ``flags[s] >= expected[s]`` for every ``s`` in
    ``waited_on`` (``[8]`` pointers / bools / values; ``expected`` may be a scalar) or ``timeout_ns``
    passes.

    One relaxed system-scope poll of all flags per round (no acquire fence in the spin); once all
    arrived (or the bound passed), one acquire load per flag orders this program's later reads after
    the peers' releases. On expiry writes ``[1, operation_code, first missing s, rank]`` to
    ``error_pointer`` (host-mapped) and returns, so the stream never hangs. No block barrier: the
    caller adds it. Returns ``(missing [8], start_ns, seen_at_ns [8])``; with ``TRACK``, ``seen_at``
    is when each flag was first seen arrived (else the first poll's time).
    """
    sources = tl.arange(0, 8)
    start = global_timer_ns()
    missing = waited_on & (load_relaxed_sys(flags) < expected)
    now = global_timer_ns()
    seen_at = tl.zeros([8], dtype=tl.int64) + now
    expired = False
    while (tl.max(missing.to(tl.int32), axis=0) > 0) & (not expired):
        was_missing = missing
        missing = missing & (load_relaxed_sys(flags) < expected)
        now = global_timer_ns()
        if TRACK:
            seen_at = tl.where(was_missing & ~missing, now, seen_at)
        expired = (now - start) > timeout_ns
    missing = waited_on & (load_acquire_sys(flags) < expected)
    if tl.max(missing.to(tl.int32), axis=0) > 0:
        tl.store(error_pointer + 1, operation_code)
        tl.store(error_pointer + 2, tl.min(tl.where(missing, sources, 8), axis=0))
        tl.store(error_pointer + 3, rank)
        tl.atomic_xchg(error_pointer, 1, sem="release", scope="sys")
    return missing, start, seen_at


@triton.jit
def wait_all_epoch(flags_pointer, epoch, num_ranks, timeout_ns, error_pointer, operation_code, rank):
    """``wait_flags`` for every peer ``s < num_ranks``, ``s != rank`` (at most 8 ranks; the 8 words
    at ``flags_pointer`` must be readable) reaching ``epoch``, then a block barrier."""
    sources = tl.arange(0, 8)
    waited_on = (sources < num_ranks) & (sources != rank)
    wait_flags(
        flags_pointer + sources, waited_on, epoch, timeout_ns, error_pointer, operation_code, rank, False
    )
    tl.debug_barrier()
