"""The put path of the multi-node modes: NVSHMEM puts, each behind a ``triton.jit`` function of
this module, so Triton's interpreter checks replace them with copies through the peer's address
(``tests/unit``) while the kernels' own logic runs unchanged.

Every function takes ``local`` (word 0 of this rank's symmetric buffer: a symmetric address of this
process, which NVSHMEM translates for the PE) and ``remote`` (word 0 of the peer's buffer in this
process: unused on the GPU, where it may be 0 for a PE on another node; the CPU stand-ins copy
through it). Offsets are int32 words from word 0; sources are this rank's symmetric memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from epcomm.kernels import nvshmem_primitives as nv

__all__ = ["put_block", "put_bytes", "put_quiet", "put_signal"]


@triton.jit
def put_block(local, remote, dst_word, src, num_bytes, signal_word, value, pe):
    """NVSHMEM put-with-signal: ``num_bytes`` from local ``src`` to word ``dst_word`` of the buffer
    on PE ``pe``, then ``value`` set at its uint64 at ``signal_word`` (after the data)."""
    nv.put_signal_block(
        (local + dst_word).to(tl.int64),
        src.to(tl.int64),
        tl.cast(num_bytes, tl.int64),
        (local + signal_word).to(tl.int64),
        tl.cast(value, tl.uint64),
        nv.SIGNAL_SET,
        pe,
    )


@triton.jit
def put_bytes(local, remote, dst_word, src, num_bytes, pe):
    """NVSHMEM non-blocking put: ``num_bytes`` from local ``src`` to word ``dst_word`` of the buffer
    on PE ``pe`` (complete after ``put_quiet``)."""
    nv.put_nbi_block((local + dst_word).to(tl.int64), src.to(tl.int64), tl.cast(num_bytes, tl.int64), pe)


@triton.jit
def put_quiet():
    """NVSHMEM quiet: every put this program issued is complete (visible at its PE)."""
    nv.quiet()


@triton.jit
def put_signal(local, remote, signal_word, value, pe):
    """NVSHMEM signal: ``value`` set at the uint64 at ``signal_word`` of the buffer on PE ``pe``."""
    nv.signal_op((local + signal_word).to(tl.int64), tl.cast(value, tl.uint64), nv.SIGNAL_SET, pe)
