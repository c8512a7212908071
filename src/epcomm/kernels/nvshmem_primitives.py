"""NVSHMEM device functions for the multi-node transport, declared for Triton.

The cross-node leg moves data only with NVSHMEM's put-with-signal (``put_signal_block``) and waits
on signals (``signal_wait_until``); same-node peers are reached by plain stores through
``peer_address`` (``nvshmem_ptr``). Each function is an ``extern_elementwise`` call into
``libnvshmem_device.bc`` (the ``nvidia-nvshmem`` wheel's device library), which a kernel links
with the ``extern_libs`` option (``device_library()``); PyTorch's own wrappers
(``torch.distributed._symmetric_memory._nvshmem_triton``) are defined only where CUDA is
available, so these are declared here, where CI can compile them for sm_90 without a GPU.

The constants are NVSHMEM 3.4.5's header values (``nvshmem_common_transport.h``,
``nvshmem_constants.h``), checked against the installed headers by a unit test: PyTorch's
docstrings give other values (``SIGNAL_SET = 0`` hangs a wait loop).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from triton.language import core

__all__ = [
    "CMP_EQ",
    "CMP_GE",
    "SIGNAL_ADD",
    "SIGNAL_SET",
    "device_library",
    "fence",
    "launchable",
    "my_pe",
    "n_pes",
    "peer_address",
    "put_nbi_block",
    "put_signal_block",
    "quiet",
    "signal_op",
    "signal_wait_until",
]

SIGNAL_SET = 9  # nvshmemx_signal_op_t
SIGNAL_ADD = 10
CMP_EQ = 0  # nvshmem_cmp_type: EQ, NE, GT, LE, LT, GE
CMP_GE = 5


@functools.cache
def launchable(kernel: Any) -> Any:
    """``kernel`` (a ``triton.jit`` function calling NVSHMEM) wrapped by PyTorch's
    ``requires_nvshmem``, which links the device library and initialises NVSHMEM's device state in
    each module it compiles; one wrapper per kernel and process. A kernel whose module calls no
    NVSHMEM function must not be wrapped: that initialisation fails on it."""
    from torch.distributed._symmetric_memory._nvshmem_triton import requires_nvshmem

    return requires_nvshmem(kernel)


def device_library(directory: str | None = None) -> str:
    """Path of ``libnvshmem_device.bc`` in ``directory``, by default the ``nvidia-nvshmem`` wheel's
    ``lib`` folder.

    Raises:
        RuntimeError: no device library found (install ``nvidia-nvshmem-cu13``).
    """
    if directory is None:
        try:
            import nvidia.nvshmem as wheel
        except ImportError:
            raise RuntimeError(
                "the NVSHMEM device library is not installed: pip install nvidia-nvshmem-cu13 "
                "(or pass the folder of libnvshmem_device.bc)"
            ) from None
        directory = str(Path(next(iter(wheel.__path__))) / "lib")
    path = Path(directory) / "libnvshmem_device.bc"
    if not path.exists():
        raise RuntimeError(f"no libnvshmem_device.bc in {directory}")
    return str(path)


_I32, _I64, _U64 = core.dtype("int32"), core.dtype("int64"), core.dtype("uint64")


@core.extern
def put_signal_block(dst, src, size_bytes, signal, signal_value, signal_op, pe, _semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmemx_putmem_signal_block``: the program copies ``size_bytes`` from local ``src`` to
    symmetric ``dst`` on PE ``pe``, then applies ``signal_op`` (``SIGNAL_SET`` / ``SIGNAL_ADD``)
    with ``signal_value`` to the uint64 ``signal`` there, ordered after the data. Addresses as int64."""
    return core.extern_elementwise(
        "",
        "",
        [dst, src, size_bytes, signal, signal_value, signal_op, pe],
        {(_I64, _I64, _I64, _I64, _U64, _I32, _I32): ("nvshmemx_putmem_signal_block", _I32)},
        is_pure=False,
        _semantic=_semantic,
    )


@core.extern
def put_nbi_block(dst, src, size_bytes, pe, _semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmemx_putmem_nbi_block``: the program starts copying ``size_bytes`` from local ``src``
    to symmetric ``dst`` on PE ``pe`` and returns; ``quiet`` completes it. Addresses as int64."""
    return core.extern_elementwise(
        "",
        "",
        [dst, src, size_bytes, pe],
        {(_I64, _I64, _I64, _I32): ("nvshmemx_putmem_nbi_block", _I32)},
        is_pure=False,
        _semantic=_semantic,
    )


@core.extern
def signal_op(signal, value, op, pe, _semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmemx_signal_op``: apply ``op`` (``SIGNAL_SET`` / ``SIGNAL_ADD``) with ``value`` to the
    symmetric uint64 ``signal`` (an int64 address) on PE ``pe``, after this thread's earlier puts
    to that PE only where a fence or quiet orders them."""
    return core.extern_elementwise(
        "",
        "",
        [signal, value, op, pe],
        {(_I64, _U64, _I32, _I32): ("nvshmemx_signal_op", _I32)},
        is_pure=False,
        _semantic=_semantic,
    )


@core.extern
def signal_wait_until(signal, cmp, value, _semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmem_signal_wait_until``: wait until the local uint64 ``signal`` (an int64 address)
    compares ``cmp`` (``CMP_GE``, ...) to ``value``."""
    return core.extern_elementwise(
        "",
        "",
        [signal, cmp, value],
        {(_I64, _I32, _U64): ("nvshmem_signal_wait_until", _U64)},
        is_pure=False,
        _semantic=_semantic,
    )


@core.extern
def peer_address(address, pe, _semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmem_ptr``: the address, in this process, of symmetric ``address`` on PE ``pe``
    (int64), or 0 when that PE is not reachable by loads and stores (another node)."""
    return core.extern_elementwise(
        "",
        "",
        [address, pe],
        {(_I64, _I32): ("nvshmem_ptr", _I64)},
        is_pure=True,
        _semantic=_semantic,
    )


@core.extern
def quiet(_semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmem_quiet``: every put this thread issued is complete and visible."""
    return core.extern_elementwise(
        "", "", [], {(): ("nvshmem_quiet", _I32)}, is_pure=False, _semantic=_semantic
    )


@core.extern
def fence(_semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmem_fence``: puts to each PE are delivered in the order issued."""
    return core.extern_elementwise(
        "", "", [], {(): ("nvshmem_fence", _I32)}, is_pure=False, _semantic=_semantic
    )


@core.extern
def my_pe(_semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmem_my_pe``: this PE's number (the global rank)."""
    return core.extern_elementwise(
        "", "", [], {(): ("nvshmem_my_pe", _I32)}, is_pure=True, _semantic=_semantic
    )


@core.extern
def n_pes(_semantic=None):  # type: ignore[no-untyped-def]
    """``nvshmem_n_pes``: the number of PEs."""
    return core.extern_elementwise(
        "", "", [], {(): ("nvshmem_n_pes", _I32)}, is_pure=True, _semantic=_semantic
    )
