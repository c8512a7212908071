"""Every Triton kernel compiles for sm_90 on the CPU (no GPU needed), with the specializations the
launchers use; the copy kernels must keep their 16-byte vector accesses."""

from __future__ import annotations

import re
from typing import Any

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from epcomm.kernels.exchange import barrier_kernel  # noqa: E402
from epcomm.kernels.layout import dispatch_layout_kernel  # noqa: E402
from epcomm.kernels.normal_combine import combine_reduce_kernel  # noqa: E402
from epcomm.kernels.normal_copy_out import copy_out_meta_kernel  # noqa: E402
from epcomm.kernels.normal_push import push_rows_kernel  # noqa: E402
from epcomm.kernels.normal_rows import combine_rows_kernel, dispatch_counts_kernel  # noqa: E402

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
    "segment_ptr": "*i32",
    "num_rows": "i32",
    "rank": "i32",
    "num_local_experts": "i32",
    "capacity": "i32",
    "x_offset": "i32",
    "scales_offset": "i32",
    "topk_idx_offset": "i32",
    "topk_weights_offset": "i32",
    "src_idx_offset": "i32",
    "entry_epoch": "i32",
    "exit_epoch": "i32",
    "timeout_ns": "i64",
    "error_address": "i64",
    "entry_code": "i32",
    "exit_code": "i32",
}
PUSH_ALIGNED = [
    *PEERS,
    "x_ptr",
    "scales_ptr",
    "topk_idx_ptr",
    "topk_weights_ptr",
    "dst_row_ptr",
    "segment_ptr",
    "x_offset",
    "scales_offset",
    "topk_idx_offset",
    "topk_weights_offset",
    "src_idx_offset",
]


@pytest.mark.parametrize(
    ("num_ranks", "x_words", "scale_words", "has_topk", "localize", "rows", "warps", "barriers"),
    [
        (4, 3584, 1, True, True, 2, 16, "exit"),  # bf16 dispatch, hidden 7168
        (4, 3584, 1, True, True, 2, 16, "progress"),  # bf16 dispatch with progress flags (copy engine)
        (8, 1792, 56, True, True, 2, 16, "progress"),  # fp8 dispatch with scales
        (2, 3584, 1, False, False, 2, 16, "both"),  # cached dispatch push
        (4, 3584, 1, False, False, 4, 16, "both"),  # combine push (one destination per row)
        (4, 3584, 1, False, False, 4, 16, "balanced"),  # combine push, balanced over destinations
        (4, 3584, 1, True, True, 4, 32, "none"),  # the tuning variants, no barriers
    ],
)
def test_push_rows_compiles_with_vector_accesses(
    num_ranks: int,
    x_words: int,
    scale_words: int,
    has_topk: bool,
    localize: bool,
    rows: int,
    warps: int,
    barriers: str,
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
        "ROWS": rows,
        "LOCALIZE_TOPK": localize,
        "WRITE_SRC_IDX": has_topk,
        "PAYLOAD_OFFSET": 32832,
        "FLAG_OFFSET": 0,
        "COUNTER_OFFSET": 32,
        "ENTRY": barriers in ("both", "balanced"),
        "EXIT": barriers != "none",
        "CHECKPOINTS": 4 if barriers == "progress" else 1,
        "PROGRESS": barriers == "progress",
        "PROGRESS_OFFSET": 64,
        "CHECKPOINT_COUNTER_OFFSET": 40,
        "BALANCE": barriers == "balanced",
    }
    compiled = _compile(push_rows_kernel, PUSH_SIGNATURE, constexprs, PUSH_ALIGNED, num_warps=warps)
    accesses = _accesses(compiled)
    assert "ld.global.v4.b32" in accesses, accesses
    assert "st.global.v4.b32" in accesses, accesses
    ptx = compiled.asm["ptx"]
    if barriers != "none":
        # The exit: every thread fences its peer stores at system scope before the done count.
        _assert_system_scope_ordering(ptx)
        assert "fence.acq_rel.sys" in ptx
    else:
        assert "atom." not in ptx
        assert "fence.acq_rel.sys" not in ptx


def _assert_system_scope_ordering(ptx: str) -> None:
    assert "ld.acquire.sys" in ptx
    assert re.search(r"atom\.[a-z.]*sys[a-z.]*release|atom\.[a-z.]*release[a-z.]*sys", ptx), (
        "no release atomic"
    )


def test_barrier_compiles_with_system_scope_ordering() -> None:
    signature = {
        **PEERS,
        "rank": "i32",
        "epoch": "i32",
        "timeout_ns": "i64",
        "error_address": "i64",
        "operation_code": "i32",
    }
    compiled = _compile(barrier_kernel, signature, {"FLAG_OFFSET": 0}, [*PEERS], 1)
    _assert_system_scope_ordering(compiled.asm["ptx"])


@pytest.mark.parametrize(
    ("hidden", "num_bias", "num_ranks", "checkpoints"),
    [(7168, 0, 4, 0), (4096, 2, 8, 0), (7168, 0, 2, 0), (7168, 0, 4, 4)],  # 4: beside the push
)
def test_combine_reduce_compiles(hidden: int, num_bias: int, num_ranks: int, checkpoints: int) -> None:
    signature = {
        "area_x_ptr": "*bf16",
        "area_weights_ptr": "*fp32",
        "slot_ptr": "*i32",
        "bias0_ptr": "*bf16",
        "bias1_ptr": "*bf16",
        "out_x_ptr": "*bf16",
        "out_weights_ptr": "*fp32",
        "num_tokens": "i32",
        "prefix_ptr": "*i32",
        "progress_address": "i64",
        "rank": "i32",
        "epoch": "i32",
        "timeout_ns": "i64",
        "error_address": "i64",
        "error_code": "i32",
    }
    constexprs = {
        "NUM_RANKS": num_ranks,
        "HIDDEN": hidden,
        "H_BLOCK": triton.next_power_of_2(hidden),
        "NUM_TOPK": 8,
        "K_BLOCK": 8,
        "TOKENS": 2,
        "HAS_WEIGHTS": True,
        "NUM_BIAS": num_bias,
        "CHECKPOINTS": checkpoints,
        "MAX_CHECKPOINTS": 8,
    }
    aligned = [name for name in signature if name.endswith("_ptr")]
    compiled = _compile(combine_reduce_kernel, signature, constexprs, aligned, num_warps=16)
    accesses = _accesses(compiled)
    assert any(a.startswith("ld.global.cg") for a in accesses), accesses
    # Beside the push: it polls the progress flags and acquires them at system scope.
    assert ("ld.acquire.sys" in compiled.asm["ptx"]) == (checkpoints > 0)


LL_SIGNAL_POINTERS = {"arrival_ptr": "*i32", "send_seq_ptr": "*i32", "recv_expected_ptr": "*i32"}


def _assert_fused_signal(ptx: str) -> None:
    """A send kernel signals by itself: one acquire-release arrival on the counter (system scope),
    then the last program's system-scope release of the sequence number at each peer's flag."""
    atomics = re.findall(r"atom\.[a-z0-9_.]+", ptx)
    assert any("acq_rel" in a and "sys" in a and ".add" in a for a in atomics), atomics
    assert any("release" in a and "sys" in a and ".exch" in a for a in atomics), atomics


def _assert_light_wait(ptx: str) -> None:
    """A receive kernel spins on relaxed system-scope loads (no barrier in the loop) and acquires once."""
    spin = ptx[ptx.index("ld.relaxed.sys") : ptx.index("ld.acquire.sys")]
    assert "bar.sync" not in spin
    assert "ld.acquire" not in spin


LL_DISPATCH_RECV_SIGNATURE = {
    "local_ptr": "*i32",
    "mask_ptr": "*i32",
    "expected_ptr": "*i32",
    "scratch_ptr": "*i32",
    "recv_x_ptr": "*i32",
    "recv_scales_ptr": "*i32",
    "recv_count_ptr": "*i32",
    "recv_src_info_ptr": "*i32",
    "recv_layout_range_ptr": "*i64",
    "combine_gather_idx_ptr": "*i64",
    "cumulative_stats_ptr": "*i32",
    "wait_stats_ptr": "*i64",
    "rank": "i32",
    "timeout_ns": "i64",
    "error_address": "i64",
    "flag_offset": "i32",
    "count_offset": "i32",
    "parity_offset": "i32",
}


@pytest.mark.parametrize(
    ("use_fp8", "round_scale", "use_ue8m0", "hidden"),
    [
        (False, False, False, 7168),
        (True, False, False, 7168),
        (True, True, True, 640),
        (True, True, False, 128),
    ],
)
def test_low_latency_dispatch_kernels_compile(
    use_fp8: bool, round_scale: bool, use_ue8m0: bool, hidden: int
) -> None:
    from epcomm.kernels.low_latency_dispatch import ll_dispatch_recv_kernel, ll_dispatch_send_kernel

    num_groups = hidden // 128
    x_words = hidden // 4 if use_fp8 else hidden // 2
    common = {
        "NUM_RANKS": 4,
        "NUM_LOCAL_EXPERTS": 64,
        "CAPACITY": 128,
        "HIDDEN": hidden,
        "NUM_TOPK": 8,
        "K_BLOCK": 8,
        "MESSAGE_WORDS": (hidden // 2 + 8 + 3) // 4 * 4,
        "X_WORDS": x_words,
        "X_BLOCK": triton.next_power_of_2(x_words),
        "G_BLOCK": max(4, triton.next_power_of_2(num_groups)),
        "USE_FP8": use_fp8,
    }
    send_signature = {
        **PEERS,
        "x_ptr": "*bf16",
        "topk_idx_ptr": "*i64",
        "mask_ptr": "*i32",
        "combine_gather_idx_ptr": "*i64",
        **LL_SIGNAL_POINTERS,
        "num_tokens": "i32",
        "rank": "i32",
        "flag_offset": "i32",
        "count_offset": "i32",
        "parity_offset": "i32",
    }
    send = _compile(
        ll_dispatch_send_kernel,
        send_signature,
        {**common, "ROUND_SCALE": round_scale},
        [*(n for n, t in send_signature.items() if t.startswith("*")), "parity_offset"],
        num_warps=8,
    )
    # parity_offset is specialized by Triton (a multiple of 16): the message stores stay 16-byte wide
    # (for small rows 256 threads hold one word each, so there is nothing to vectorize).
    if hidden >= 4096:
        assert "st.global.v4.b32" in _accesses(send)
    if use_fp8:
        assert "cvt.rn.satfinite.e4m3x2.f32" in send.asm["ptx"]
    _assert_fused_signal(send.asm["ptx"])
    recv_constexprs = {
        **common,
        "ROWS_BLOCK": 512,
        "USE_UE8M0": use_ue8m0,
        "SCALE_COLUMNS": (num_groups + 3) // 4 if use_ue8m0 else num_groups,
        "HAS_CUMULATIVE_STATS": True,
        "HAS_WAIT_STATS": True,
    }
    recv = _compile(
        ll_dispatch_recv_kernel,
        LL_DISPATCH_RECV_SIGNATURE,
        recv_constexprs,
        [*(n for n, t in LL_DISPATCH_RECV_SIGNATURE.items() if t.startswith("*")), "parity_offset"],
        num_warps=16,
    )
    _assert_light_wait(recv.asm["ptx"])


def test_low_latency_combine_kernels_compile() -> None:
    from epcomm.kernels.low_latency_combine import ll_combine_recv_kernel, ll_combine_send_kernel

    send_signature = {
        **PEERS,
        "x_ptr": "*i32",
        "gather_idx_ptr": "*i64",
        "mask_ptr": "*i32",
        **LL_SIGNAL_POINTERS,
        "rank": "i32",
        "flag_offset": "i32",
        "parity_offset": "i32",
    }
    send = _compile(
        ll_combine_send_kernel,
        send_signature,
        {"NUM_RANKS": 4, "CAPACITY": 128, "NUM_TOPK": 8, "X_WORDS": 3584, "X_BLOCK": 4096},
        [*(n for n, t in send_signature.items() if t.startswith("*")), "parity_offset"],
        num_warps=8,
    )
    assert "st.global.v4.b32" in _accesses(send)
    _assert_fused_signal(send.asm["ptx"])
    recv_signature = {
        "local_ptr": "*i32",
        "mask_ptr": "*i32",
        "expected_ptr": "*i32",
        "topk_idx_ptr": "*i64",
        "topk_weights_ptr": "*fp32",
        "out_ptr": "*bf16",
        "wait_stats_ptr": "*i64",
        "num_tokens": "i32",
        "rank": "i32",
        "timeout_ns": "i64",
        "error_address": "i64",
        "flag_offset": "i32",
        "parity_offset": "i32",
    }
    recv = _compile(
        ll_combine_recv_kernel,
        recv_signature,
        {
            "NUM_RANKS": 4,
            "NUM_LOCAL_EXPERTS": 64,
            "HIDDEN": 7168,
            "H_BLOCK": 8192,
            "NUM_TOPK": 8,
            "HAS_WAIT_STATS": True,
        },
        [*(n for n, t in recv_signature.items() if t.startswith("*")), "parity_offset"],
        num_warps=16,
    )
    _assert_light_wait(recv.asm["ptx"])


def test_low_latency_kernel_names_say_their_operation() -> None:
    """A profiler trace attributes each launched low-latency kernel to dispatch or combine."""
    from epcomm.kernels import low_latency_combine, low_latency_dispatch

    for module, operation in ((low_latency_dispatch, "dispatch"), (low_latency_combine, "combine")):
        kernels = [name for name in vars(module) if name.endswith("_kernel")]
        assert kernels, module.__name__
        for name in kernels:
            assert operation in name, f"{module.__name__}.{name} does not say {operation!r}"


@pytest.mark.parametrize(
    ("num_ranks", "num_experts", "checkpoints"), [(1, 8, 4), (2, 256, 1), (4, 256, 4), (8, 4096, 8)]
)
def test_normal_rows_kernels_compile(num_ranks: int, num_experts: int, checkpoints: int) -> None:
    r_block = max(triton.next_power_of_2(num_ranks), 2)
    counts_signature = {
        **PEERS,
        "counts_ptr": "*i32",
        "in_rank_ptr": "*i8",
        "recv_row_ptr": "*i32",
        "rank_prefix_ptr": "*i32",
        "num_recv_ptr": "*i32",
        "num_tokens": "i32",
        "rank": "i32",
        "epoch": "i32",
        "timeout_ns": "i64",
        "error_address": "i64",
        "operation_code": "i32",
        "host_address": "i64",
        "write_host": "i32",
    }
    constexprs = {
        "FLAG_OFFSET": 0,
        "TABLE_OFFSET": 64,
        "NUM_RANKS": num_ranks,
        "NUM_EXPERTS": num_experts,
        "E_BLOCK": min(max(triton.next_power_of_2(num_experts), 32), 1024),
        "R_BLOCK": r_block,
        "T_BLOCK": 512,
        "HOST_TABLE": 4,
        "CK_BLOCK": max(2, triton.next_power_of_2(checkpoints)),
        "CHECKPOINTS": checkpoints,
    }
    aligned = [*PEERS, *(name for name in counts_signature if name.endswith("_ptr"))]
    compiled = _compile(dispatch_counts_kernel, counts_signature, constexprs, aligned, num_warps=4)
    _assert_system_scope_ordering(compiled.asm["ptx"])
    combine_signature = {
        "rank_prefix_ptr": "*i32",
        "recv_row_ptr": "*i32",
        "dst_row_ptr": "*i32",
        "token_slot_ptr": "*i32",
        "num_rows": "i32",
        "num_tokens": "i32",
        "rank": "i32",
    }
    aligned = [name for name in combine_signature if name.endswith("_ptr")]
    constexprs = {"NUM_RANKS": num_ranks, "R_BLOCK": r_block, "BLOCK": 256}
    _compile(combine_rows_kernel, combine_signature, constexprs, aligned, num_warps=4)


@pytest.mark.parametrize(("has_topk", "has_num_real"), [(True, False), (True, True), (False, False)])
def test_copy_out_meta_compiles(has_topk: bool, has_num_real: bool) -> None:
    signature = {
        "src_idx_area_ptr": "*i32",
        "topk_idx_area_ptr": "*i64",
        "topk_weights_area_ptr": "*fp32",
        "src_idx_ptr": "*i32",
        "topk_idx_ptr": "*i64",
        "topk_weights_ptr": "*fp32",
        "num_real_ptr": "*i32",
        "num_rows": "i32",
    }
    constexprs = {
        "NUM_TOPK": 8,
        "K_BLOCK": 8,
        "HAS_TOPK_IDX": has_topk,
        "HAS_TOPK_WEIGHTS": has_topk,
        "HAS_NUM_REAL": has_num_real,
        "BLOCK": 256,
    }
    aligned = [name for name in signature if name.endswith("_ptr")]
    compiled = _compile(copy_out_meta_kernel, signature, constexprs, aligned, num_warps=4)
    assert any(a.startswith("ld.global.cg") for a in _accesses(compiled))


@pytest.mark.parametrize(("num_ranks", "num_nodes"), [(4, 1), (8, 2), (2, 1)])
def test_dispatch_layout_compiles_with_atomics(num_ranks: int, num_nodes: int) -> None:
    signature = {"topk_idx_ptr": "*i64", "in_rank_ptr": "*i8", "counts_ptr": "*i32", "num_tokens": "i32"}
    constexprs = {
        "NUM_TOPK": 8,
        "K_BLOCK": 8,
        "NUM_RANKS": num_ranks,
        "R_BLOCK": max(num_ranks, 2),
        "NUM_LOCAL_EXPERTS": 256 // num_ranks,
        "NUM_EXPERTS": 256,
        "NUM_NODES": num_nodes,
        "N_BLOCK": 2,
        "RANKS_PER_NODE": num_ranks // num_nodes,
        "BLOCK_T": 128,
    }
    compiled = _compile(
        dispatch_layout_kernel, signature, constexprs, ["topk_idx_ptr", "in_rank_ptr", "counts_ptr"], 4
    )
    assert "atom.global" in compiled.asm["ptx"] or "red.global" in compiled.asm["ptx"]
