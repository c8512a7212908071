"""The NVSHMEM device functions of the multi-node transport: their constants are the installed
headers' values, and a kernel using every one of them compiles for sm_90 with the device library
linked (no GPU needed). Both skip where the ``nvidia-nvshmem-cu13`` wheel is not installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
wheel = pytest.importorskip(
    "nvidia.nvshmem", reason="the NVSHMEM wheel (nvidia-nvshmem-cu13) is not installed"
)

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from epcomm.kernels import nvshmem_primitives as nv  # noqa: E402

INCLUDE = Path(next(iter(wheel.__path__))) / "include" / "device_host_transport"


def _enum_values(header: str, enum_body_pattern: str) -> dict[str, int]:
    """``NAME -> value`` of the C enum whose body matches ``enum_body_pattern`` in ``header``."""
    text = (INCLUDE / header).read_text()
    body = re.search(enum_body_pattern, text, re.S)
    assert body, f"no such enum in {header}"
    values: dict[str, int] = {}
    next_value = 0
    for name, value in re.findall(r"(NVSHMEM_\w+)\s*(?:=\s*(\d+))?\s*,?", body.group(1)):
        next_value = int(value) if value else next_value
        values[name] = next_value
        next_value += 1
    return values


def test_constants_are_the_headers() -> None:
    signal_ops = _enum_values(
        "nvshmem_common_transport.h", r"typedef enum \{([^}]*NVSHMEM_SIGNAL_SET[^}]*)\}"
    )
    assert (
        signal_ops["NVSHMEM_SIGNAL_SET"],
        signal_ops["NVSHMEM_SIGNAL_ADD"],
    ) == (nv.SIGNAL_SET, nv.SIGNAL_ADD)
    compares = _enum_values("nvshmem_constants.h", r"\{([^}]*NVSHMEM_CMP_EQ[^}]*)\}")
    assert (compares["NVSHMEM_CMP_EQ"], compares["NVSHMEM_CMP_GE"]) == (nv.CMP_EQ, nv.CMP_GE)


@triton.jit
def _probe_kernel(dst, src, signal, pe, NUM_WORDS: tl.constexpr):
    nv.put_signal_block(
        dst.to(tl.int64),
        src.to(tl.int64),
        tl.full([], NUM_WORDS * 4, tl.int64),
        signal.to(tl.int64),
        tl.full([], 1, tl.uint64),
        nv.SIGNAL_SET,
        pe,
    )
    nv.fence()
    nv.quiet()
    nv.signal_wait_until(signal.to(tl.int64), nv.CMP_GE, tl.full([], 1, tl.uint64))
    local = nv.peer_address(dst.to(tl.int64), pe)
    tl.store(local.to(tl.pointer_type(tl.int32)), nv.my_pe() + nv.n_pes())


def test_primitives_compile_for_sm90_with_the_device_library() -> None:
    source = ASTSource(
        _probe_kernel,
        {"dst": "*i32", "src": "*i32", "signal": "*u64", "pe": "i32", "NUM_WORDS": "constexpr"},
        constexprs={"NUM_WORDS": 64},
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4, "extern_libs": (("libnvshmem_device", nv.device_library()),)},
    )
    ptx = compiled.asm["ptx"]
    assert "nvshmemi_transfer_put_signal" in ptx  # the block put-with-signal, from the device library
    assert "nvshmemi_transfer_quiet" in ptx
    assert compiled.asm.get("cubin"), "ptxas produced no cubin"


def test_peer_table_kernel_compiles_for_sm90() -> None:
    from epcomm.kernels.nvshmem_peers import peer_table_kernel

    source = ASTSource(
        peer_table_kernel,
        {"base": "i64", "pes": "*i32", "table": "*i64", "num_ranks": "i32", "BLOCK": "constexpr"},
        constexprs={"BLOCK": 16},
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 1, "extern_libs": (("libnvshmem_device", nv.device_library()),)},
    )
    assert "nvshmem_ptr" in compiled.asm["ptx"]
    assert compiled.asm.get("cubin"), "ptxas produced no cubin"
