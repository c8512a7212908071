"""Every Triton kernel compiles for sm_90 on the CPU (no GPU needed), with the specializations the
launchers use; the copy kernels must keep their 16-byte vector accesses."""

from __future__ import annotations

import re
from typing import Any

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from epcomm.kernels.exchange import exchange_counts_barrier_kernel  # noqa: E402
from epcomm.kernels.normal_combine import combine_reduce_kernel  # noqa: E402
from epcomm.kernels.normal_push import push_rows_kernel  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
PEERS = {f"p{i}": "*i32" for i in range(8)}


def _compile(
    kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], aligned: list[str], num_warps: int
) -> Any:
    names = list(signature)
    full = dict(signature)
    for name in constexprs:
        full[name] = "constexpr"
    # Triton's JIT marks 16-byte-aligned pointers and multiples of 16 this way at launch.
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(kernel, full, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=SM90, options={"num_warps": num_warps})


def _accesses(compiled: Any) -> set[str]:
    return set(re.findall(r"(?:ld|st)\.global[a-z0-9.]*", compiled.asm["ptx"]))


PUSH_SIGNATURE = {
    **PEERS,
    "x_ptr": "*i32",
    "scales_ptr": "*i32",
    "topk_idx_ptr": "*i64",
    "topk_weights_ptr": "*fp32",
    "dst_row_ptr": "*i32",
    "num_rows": "i32",
    "rank": "i32",
    "num_local_experts": "i32",
    "x_offset": "i32",
    "scales_offset": "i32",
    "topk_idx_offset": "i32",
    "topk_weights_offset": "i32",
    "src_idx_offset": "i32",
}
PUSH_ALIGNED = [
    *PEERS,
    "x_ptr",
    "scales_ptr",
    "topk_idx_ptr",
    "topk_weights_ptr",
    "dst_row_ptr",
    "x_offset",
    "scales_offset",
    "topk_idx_offset",
    "topk_weights_offset",
    "src_idx_offset",
]


@pytest.mark.parametrize(
    ("num_ranks", "x_words", "scale_words", "has_topk", "localize"),
    [
        (4, 3584, 1, True, True),  # bf16 dispatch, hidden 7168
        (8, 1792, 56, True, True),  # fp8 dispatch with scales
        (2, 3584, 1, False, False),  # cached dispatch / combine push
    ],
)
def test_push_rows_compiles_with_vector_accesses(
    num_ranks: int, x_words: int, scale_words: int, has_topk: bool, localize: bool
) -> None:
    constexprs = {
        "NUM_RANKS": num_ranks,
        "X_WORDS": x_words,
        "X_BLOCK": triton.next_power_of_2(x_words),
        "S_WORDS": scale_words,
        "S_BLOCK": triton.next_power_of_2(scale_words),
        "NUM_TOPK": 8,
        "K_BLOCK": 8,
        "HAS_SCALES": scale_words > 1,
        "HAS_TOPK_IDX": has_topk,
        "HAS_TOPK_WEIGHTS": True,
        "LOCALIZE_TOPK": localize,
        "WRITE_SRC_IDX": has_topk,
    }
    compiled = _compile(push_rows_kernel, PUSH_SIGNATURE, constexprs, PUSH_ALIGNED, num_warps=16)
    accesses = _accesses(compiled)
    assert "ld.global.v4.b32" in accesses, accesses
    assert "st.global.v4.b32" in accesses, accesses


@pytest.mark.parametrize("num_counts", [0, 4 + 256])
def test_exchange_compiles_with_system_scope_ordering(num_counts: int) -> None:
    signature = {
        **PEERS,
        "counts_ptr": "*i32",
        "rank": "i32",
        "epoch": "i32",
        "timeout_ns": "i64",
        "error_address": "i64",
        "operation_code": "i32",
    }
    constexprs = {"FLAG_OFFSET": 0, "TABLE_OFFSET": 64, "NUM_COUNTS": num_counts, "BLOCK": 512}
    compiled = _compile(exchange_counts_barrier_kernel, signature, constexprs, [*PEERS, "counts_ptr"], 4)
    ptx = compiled.asm["ptx"]
    assert "ld.acquire.sys" in ptx
    assert re.search(r"atom\.[a-z.]*sys[a-z.]*release|atom\.[a-z.]*release[a-z.]*sys", ptx), (
        "no release atomic"
    )


@pytest.mark.parametrize(("hidden", "num_bias"), [(7168, 0), (4096, 2)])
def test_combine_reduce_compiles(hidden: int, num_bias: int) -> None:
    signature = {
        "area_x_ptr": "*bf16",
        "area_weights_ptr": "*fp32",
        "slot_ptr": "*i32",
        "bias0_ptr": "*bf16",
        "bias1_ptr": "*bf16",
        "out_x_ptr": "*bf16",
        "out_weights_ptr": "*fp32",
        "num_tokens": "i32",
    }
    constexprs = {
        "NUM_RANKS": 4,
        "HIDDEN": hidden,
        "H_BLOCK": triton.next_power_of_2(hidden),
        "NUM_TOPK": 8,
        "K_BLOCK": 8,
        "HAS_WEIGHTS": True,
        "NUM_BIAS": num_bias,
    }
    aligned = [name for name in signature if name.endswith("_ptr")]
    compiled = _compile(combine_reduce_kernel, signature, constexprs, aligned, num_warps=16)
    accesses = _accesses(compiled)
    assert any(a.startswith("ld.global.cg") for a in accesses), accesses
