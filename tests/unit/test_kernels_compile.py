"""Every Triton kernel compiles for sm_90 on the CPU (no GPU needed), with the arguments and
specializations its typed launcher really passes (the launcher runs on CPU tensors with ``launch``
replaced by a recorder); the copy kernels must keep their 16-byte vector accesses."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import epcomm.kernels.barrier as barrier_module  # noqa: E402
import epcomm.kernels.layout as layout_module  # noqa: E402
import epcomm.kernels.leg_exchange as leg_module  # noqa: E402
import epcomm.kernels.low_latency_combine as ll_combine_module  # noqa: E402
import epcomm.kernels.low_latency_dispatch as ll_dispatch_module  # noqa: E402
import epcomm.kernels.normal_combine as combine_module  # noqa: E402
import epcomm.kernels.normal_copy_out as copy_out_module  # noqa: E402
import epcomm.kernels.normal_push as push_module  # noqa: E402
import epcomm.kernels.normal_rows as rows_module  # noqa: E402
from epcomm.kernels.low_latency_dispatch import (  # noqa: E402
    CallCheck,
    DispatchOutputs,
    LowLatencyWords,
    Phase,
    PutPath,
    SignalState,
)
from epcomm.kernels.normal_push import PushBarriers, PushFingerprint, PushRegions  # noqa: E402
from epcomm.kernels.symmetric_peers import SymmetricPeers  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
_TYPES = {
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.bool: "i1",
}


def _launches(module: Any, launcher: Any, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> list[Any]:
    """Run ``launcher(**kwargs)`` with ``module.launch`` recording its calls instead of launching."""
    calls: list[Any] = []
    monkeypatch.setattr(module, "launch", lambda *args: calls.append(args))
    launcher(**kwargs)
    assert calls, f"{launcher.__name__} launched nothing"
    return calls


def _compile(call: Any, extern_libs: tuple[tuple[str, str], ...] = ()) -> Any:
    """Compile a recorded ``launch(kernel, grid, args, constexprs, num_warps)`` for sm_90 as Triton's
    JIT would: tensors are 16-byte-aligned pointers, specialized integers that are multiples of 16
    get the divisibility hint, specialized integers equal to 1 become constants."""
    kernel, _grid, args, constexprs, num_warps = call
    runtime = [p for p in kernel.params if not p.is_constexpr]
    assert len(runtime) == len(args), (
        f"{kernel.__name__}: {len(args)} arguments for {len(runtime)} parameters"
    )
    signature: dict[str, str] = {}
    values = dict(constexprs)
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for index, (param, value) in enumerate(zip(runtime, args)):
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif not param.do_not_specialize and value == 1:
            signature[param.name] = "constexpr"
            values[param.name] = 1
        else:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if not param.do_not_specialize and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    source = ASTSource(kernel, signature, constexprs=values, attrs=attrs)
    options: dict[str, Any] = {"num_warps": num_warps}
    if extern_libs:
        options["extern_libs"] = extern_libs
    return triton.compile(source, target=SM90, options=options)


def _accesses(compiled: Any) -> set[str]:
    return set(re.findall(r"(?:ld|st)\.global[a-z0-9.]*", compiled.asm["ptx"]))


def _assert_system_scope_ordering(ptx: str) -> None:
    assert "ld.acquire.sys" in ptx
    assert re.search(r"atom\.[a-z.]*sys[a-z.]*release|atom\.[a-z.]*release[a-z.]*sys", ptx), (
        "no release atomic"
    )


def _peers(num_ranks: int, rank: int = 1) -> SymmetricPeers:
    """A peer group as the symmetric buffer builds it (the addresses are never dereferenced here)."""
    return SymmetricPeers(
        peer_table=torch.zeros(num_ranks, dtype=torch.int64),
        rank=rank % num_ranks,
        num_ranks=num_ranks,
        timeout_ns=30 * 10**9,
        error_address=1 << 40,
        flag_offset=0,
        counter_offset=32,
    )


@pytest.mark.parametrize(
    ("num_ranks", "x_words", "scale_words", "kind", "warps"),
    [
        (4, 3584, 0, "dispatch", 16),  # bf16 dispatch, hidden 7168
        (8, 1792, 56, "dispatch", 16),  # fp8 dispatch with scales
        (2, 3584, 0, "cached", 16),  # cached dispatch push (entry with fingerprint, exit barriers)
        (8, 1792, 56, "cached", 16),  # fp8 cached dispatch: two fills on a difference
        (4, 3584, 0, "combine", 16),  # combine push (one destination per row, fingerprint)
        (4, 3584, 0, "none", 32),  # no barriers (the tuning variants)
        (16, 3584, 0, "dispatch", 16),  # more ranks than DeepEP's 8
        (72, 1792, 56, "combine", 16),  # an NVL72-sized domain
    ],
)
def test_push_rows_compiles_with_vector_accesses(
    num_ranks: int, x_words: int, scale_words: int, kind: str, warps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    num_rows, num_topk = 64, 8
    dispatch = kind == "dispatch"
    barriers = {
        "dispatch": PushBarriers(0, 7, 0, 3),
        "cached": PushBarriers(6, 7, 4, 5),
        "combine": PushBarriers(6, 7, 6, 7),
        "none": None,
    }[kind]
    payload = 33024
    fingerprint = None
    if kind in ("cached", "combine"):  # as the backend passes it: entry barrier with the fingerprint
        fill = torch.zeros(4096 * x_words, dtype=torch.int32)
        fills = ((fill, 0),) if kind == "combine" or not scale_words else ((fill, 0), (fill[:4096], 0))
        fingerprint = PushFingerprint([2, 7, 3, 7168, 0, 0, 0, 0], 64, 1 << 41, fills)
    (call,) = _launches(
        push_module,
        push_module.launch_push_rows,
        monkeypatch,
        peers=_peers(num_ranks),
        x_words=torch.zeros(num_rows, x_words, dtype=torch.int32),
        dst_row=torch.zeros(num_rows, num_ranks, dtype=torch.int32),
        regions=PushRegions(
            payload, payload + 4096 * 32, payload + 8192 * 32, payload + 12288 * 32, payload + 16384 * 32
        ),
        capacity=4096,
        num_sms=24,
        num_warps=warps,
        scales_words=torch.zeros(num_rows, scale_words, dtype=torch.int32) if scale_words else None,
        topk_idx=torch.zeros(num_rows, num_topk, dtype=torch.int64) if dispatch else None,
        topk_weights=torch.zeros(num_rows, num_topk, dtype=torch.float32) if kind != "cached" else None,
        num_local_experts=256 // num_ranks,
        localize_topk=dispatch,
        write_src_idx=dispatch,
        barriers=barriers,
        one_destination=kind == "combine",
        fingerprint=fingerprint,
    )
    compiled = _compile(call)
    accesses = _accesses(compiled)
    assert "ld.global.v4.b32" in accesses, accesses
    assert "st.global.v4.b32" in accesses, accesses  # through the peer table: the alignment hint holds
    ptx = compiled.asm["ptx"]
    if barriers is not None:
        # The exit: every thread fences its peer stores at system scope before the done count.
        _assert_system_scope_ordering(ptx)
        assert "fence.acq_rel.sys" in ptx
    else:
        assert "atom." not in ptx
        assert "fence.acq_rel.sys" not in ptx


@pytest.mark.parametrize("num_ranks", [2, 8, 16])
def test_barrier_compiles_with_system_scope_ordering(num_ranks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    (call,) = _launches(
        barrier_module,
        barrier_module.launch_barrier,
        monkeypatch,
        peers=_peers(num_ranks),
        epoch=3,
        operation_code=1,
    )
    _assert_system_scope_ordering(_compile(call).asm["ptx"])


def _masked_barrier_launch(
    num_ranks: int, shrink: bool, monkeypatch: pytest.MonkeyPatch, put: Any = None
) -> Any:
    (call,) = _launches(
        barrier_module,
        barrier_module.launch_masked_barrier,
        monkeypatch,
        peers=_peers(num_ranks),
        rank_mask=torch.zeros(num_ranks, dtype=torch.int32),
        epoch=3,
        operation_code=10,
        shrink=shrink,
        put=put,
    )
    return call


@pytest.mark.parametrize("shrink", [False, True])
@pytest.mark.parametrize("num_ranks", [2, 16])
def test_masked_barrier_compiles(num_ranks: int, shrink: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    ptx = _compile(_masked_barrier_launch(num_ranks, shrink, monkeypatch)).asm["ptx"]
    _assert_system_scope_ordering(ptx)
    _assert_light_wait(ptx)


@pytest.mark.parametrize("shrink", [False, True])
def test_masked_barrier_put_kernel_compiles(shrink: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The put path of the masked barrier: NVSHMEM signals to the ranks of other nodes, a bounded
    wait on the low words of uint64 flags."""
    pytest.importorskip("nvidia.nvshmem", reason="the NVSHMEM wheel (nvidia-nvshmem-cu13) is not installed")
    from epcomm.kernels.barrier import BarrierPut
    from epcomm.kernels.nvshmem_primitives import device_library

    num_ranks = 16
    put = BarrierPut(
        torch.zeros(num_ranks, dtype=torch.int32),
        torch.zeros(num_ranks, dtype=torch.int32),
        barrier_module.masked_barrier_put_kernel,
    )
    call = _masked_barrier_launch(num_ranks, shrink, monkeypatch, put)
    assert call[0] is barrier_module.masked_barrier_put_kernel
    ptx = _compile(call, (("libnvshmem_device", device_library()),)).asm["ptx"]
    assert "signal_op" in ptx
    _assert_light_wait(ptx)


@pytest.mark.parametrize(
    ("hidden", "num_bias", "num_ranks"), [(7168, 0, 4), (4096, 2, 8), (7168, 0, 2), (7168, 1, 16)]
)
def test_combine_reduce_compiles(
    hidden: int, num_bias: int, num_ranks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    num_tokens, capacity = 32, 128
    out_x = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16)
    (call,) = _launches(
        combine_module,
        combine_module.launch_combine_reduce,
        monkeypatch,
        area_x=torch.zeros(capacity, hidden, dtype=torch.bfloat16),
        area_weights=torch.zeros(capacity * 8, dtype=torch.float32),
        slot=torch.zeros(num_tokens, num_ranks, dtype=torch.int32),
        bias=tuple(torch.zeros_like(out_x) for _ in range(num_bias)),
        out_x=out_x,
        out_weights=torch.zeros(num_tokens, 8, dtype=torch.float32),
        num_sms=24,
        num_warps=16,
    )
    accesses = _accesses(_compile(call))
    assert any(a.startswith("ld.global.cg") for a in accesses), accesses


def _assert_fused_signal(ptx: str) -> None:
    """A send phase signals by itself: one acquire-release arrival on the counter (system scope),
    then the last program's system-scope release of the sequence number at each peer's flag."""
    atomics = re.findall(r"atom\.[a-z0-9_.]+", ptx)
    assert any("acq_rel" in a and "sys" in a and ".add" in a for a in atomics), atomics
    assert any("release" in a and "sys" in a and ".exch" in a for a in atomics), atomics


def _assert_light_wait(ptx: str) -> None:
    """A receive phase spins on relaxed system-scope loads (no barrier in the loop) and acquires once."""
    spin = ptx[ptx.index("ld.relaxed.sys") : ptx.index("ld.acquire.sys")]
    assert "bar.sync" not in spin
    assert "ld.acquire" not in spin


def _signals(num_ranks: int) -> SignalState:
    stride = -(-num_ranks // 4) * 4
    return SignalState(
        torch.zeros(4, dtype=torch.int32),
        torch.zeros(stride, dtype=torch.int32),
        torch.zeros(stride, dtype=torch.int32),
    )


_WORDS = LowLatencyWords(flags=33024, counts=33056, staging=33280, fingerprints=33088)


def _check(num_ranks: int) -> CallCheck:
    """A low-latency call's fingerprint check as the backend passes it (the record's address is
    never dereferenced here)."""
    return CallCheck([4, 3, 0, 7168, 0, 256, 8, 128], torch.zeros(num_ranks, dtype=torch.int32), 1 << 41)


def _compile_phase(call: Any, phase: Phase) -> Any:
    """Compile a recorded low-latency launch of ``phase`` and check what every such launch holds: a
    send phase signals by itself, a receive phase spins lightly, neither does the other's part,
    and a ``BOTH`` launch has at most one program per SM (all resident while they wait)."""
    if phase == Phase.BOTH:
        assert call[1][0] <= 132, call[1]
    compiled = _compile(call)
    ptx = compiled.asm["ptx"]
    if phase & Phase.SEND:
        _assert_fused_signal(ptx)
    else:
        assert "atom" not in ptx.split("ld.relaxed.sys")[0], "a receive launch must not signal"
    if phase & Phase.RECEIVE:
        _assert_light_wait(ptx)
    else:
        assert "ld.relaxed.sys" not in ptx, "a send launch must not wait"
    return compiled


def _dispatch_launch(
    phase: Phase,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
    hidden: int,
    num_ranks: int,
    monkeypatch: pytest.MonkeyPatch,
    shrink: bool = False,
    put: PutPath | None = None,
) -> Any:
    num_tokens, num_topk, capacity = 128, 8, 128
    num_local_experts = 256 // num_ranks
    num_groups = hidden // 128
    num_rows = num_ranks * capacity
    x_words = hidden // 4 if use_fp8 else hidden // 2
    scale_columns = (num_groups + 3) // 4 if use_ue8m0 else num_groups
    outputs = DispatchOutputs(
        scratch=torch.zeros(num_local_experts, num_rows, dtype=torch.int32),
        recv_x_words=torch.zeros(1, dtype=torch.int32).expand(num_local_experts * num_rows * x_words),
        recv_scales_words=torch.zeros(num_local_experts, scale_columns, num_rows, dtype=torch.int32),
        recv_count=torch.zeros(num_local_experts, dtype=torch.int32),
        recv_src_info=torch.zeros(num_local_experts, num_rows, dtype=torch.int32),
        recv_layout_range=torch.zeros(num_local_experts, num_ranks, dtype=torch.int64),
        cumulative_stats=torch.zeros(num_local_experts, dtype=torch.int32),
        wait_stats=torch.zeros(num_ranks, dtype=torch.int64),
    )
    (call,) = _launches(
        ll_dispatch_module,
        ll_dispatch_module.launch_ll_dispatch,
        monkeypatch,
        phase=phase,
        peers=_peers(num_ranks),
        local=torch.zeros(64, dtype=torch.int32),
        x=torch.zeros(num_tokens, hidden, dtype=torch.bfloat16),
        topk_idx=torch.zeros(num_tokens, num_topk, dtype=torch.int64),
        rank_mask=torch.zeros(num_ranks, dtype=torch.int32),
        combine_gather_idx=torch.zeros(num_ranks, capacity, num_topk, dtype=torch.int64),
        signals=_signals(num_ranks),
        words=_WORDS,
        outputs=None if phase == Phase.SEND else outputs,
        operation_code=8,
        num_local_experts=num_local_experts,
        message_words=(hidden // 2 + num_topk + 3) // 4 * 4,
        use_fp8=use_fp8,
        round_scale=round_scale,
        use_ue8m0=use_ue8m0,
        num_sms=132,
        check=_check(num_ranks),
        shrink=shrink,
        put=put,
    )
    return call


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize(
    ("use_fp8", "round_scale", "use_ue8m0", "hidden", "num_ranks"),
    [
        (False, False, False, 7168, 4),
        (True, False, False, 7168, 4),
        (True, True, True, 640, 4),
        (True, True, False, 128, 4),
        (True, False, False, 7168, 16),
    ],
)
def test_low_latency_dispatch_kernel_compiles(
    phase: Phase,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
    hidden: int,
    num_ranks: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    call = _dispatch_launch(phase, use_fp8, round_scale, use_ue8m0, hidden, num_ranks, monkeypatch)
    compiled = _compile_phase(call, phase)
    if phase & Phase.SEND:
        # The staging offset is specialized by Triton (a multiple of 16): the message stores stay
        # 16-byte wide (for small rows 256 threads hold one word each: nothing to vectorize).
        if hidden >= 4096:
            assert "st.global.v4.b32" in _accesses(compiled)
        if use_fp8:
            assert "cvt.rn.satfinite.e4m3x2.f32" in compiled.asm["ptx"]


def _combine_launch(
    phase: Phase,
    num_ranks: int,
    monkeypatch: pytest.MonkeyPatch,
    shrink: bool = False,
    put: PutPath | None = None,
) -> Any:
    hidden, capacity, num_topk, num_tokens = 7168, 128, 8, 128
    num_local_experts = 256 // num_ranks
    (call,) = _launches(
        ll_combine_module,
        ll_combine_module.launch_ll_combine,
        monkeypatch,
        phase=phase,
        peers=_peers(num_ranks),
        local=torch.zeros(64, dtype=torch.int32),
        x_words=torch.zeros(1, dtype=torch.int32).expand(
            num_local_experts, num_ranks * capacity, hidden // 2
        ),
        combine_gather_idx=torch.zeros(num_ranks, capacity, num_topk, dtype=torch.int64),
        rank_mask=torch.zeros(num_ranks, dtype=torch.int32),
        signals=_signals(num_ranks),
        words=_WORDS,
        operation_code=9,
        topk_idx=torch.zeros(num_tokens, num_topk, dtype=torch.int64),
        topk_weights=torch.zeros(num_tokens, num_topk, dtype=torch.float32),
        out=torch.zeros(num_tokens, hidden, dtype=torch.bfloat16),
        wait_stats=torch.zeros(num_ranks, dtype=torch.int64),
        num_local_experts=num_local_experts,
        num_sms=132,
        check=_check(num_ranks),
        shrink=shrink,
        put=put,
    )
    return call


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("num_ranks", [4, 16])
def test_low_latency_combine_kernel_compiles(
    phase: Phase, num_ranks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = _compile_phase(_combine_launch(phase, num_ranks, monkeypatch), phase)
    if phase & Phase.SEND:
        assert "st.global.v4.b32" in _accesses(compiled)


@pytest.mark.parametrize("phase", [Phase.RECEIVE, Phase.BOTH])
def test_low_latency_kernels_compile_in_shrink_mode(phase: Phase, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink mode: an expired wait masks the missing sources (stores into the mask and the error
    word's log) instead of reporting an error."""
    for call in (
        _dispatch_launch(phase, True, False, False, 7168, 4, monkeypatch, shrink=True),
        _combine_launch(phase, 4, monkeypatch, shrink=True),
    ):
        assert call[3]["SHRINK"] is True
        _assert_light_wait(_compile(call).asm["ptx"])


def test_low_latency_ops_are_one_kernel_each() -> None:
    """A profiler table shows one kernel name containing ``dispatch`` and one containing ``combine``
    for the low-latency ops (DeepEP users time them by name): each module defines one kernel per
    path (stores within one NVLink domain; puts to other nodes), and an op launches one of them."""
    for module, operation in ((ll_dispatch_module, "dispatch"), (ll_combine_module, "combine")):
        kernels = [
            name
            for name, value in vars(module).items()
            if hasattr(value, "params") and name.endswith("_kernel")
        ]
        assert sorted(kernels) == [f"ll_{operation}_kernel", f"ll_{operation}_put_kernel"], kernels


@pytest.mark.parametrize(
    ("num_ranks", "num_experts"), [(1, 8), (2, 256), (4, 256), (8, 4096), (16, 256), (72, 288)]
)
def test_normal_rows_kernels_compile(
    num_ranks: int, num_experts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    num_tokens = 100
    (counts,) = _launches(
        rows_module,
        rows_module.launch_dispatch_counts,
        monkeypatch,
        peers=_peers(num_ranks),
        num_tokens_per_expert=torch.zeros(num_experts, dtype=torch.int32),
        is_token_in_rank=torch.zeros(num_tokens, num_ranks, dtype=torch.bool),
        epoch=5,
        operation_code=2,
        table_offset=64,
        host_address=1 << 41,
        write_host=True,
        fingerprint=[1, 7, 0, 7168, 0, num_experts, 8, 1],
    )
    _assert_system_scope_ordering(_compile(counts).asm["ptx"])
    (rows,) = _launches(
        rows_module,
        rows_module.launch_combine_rows,
        monkeypatch,
        rank_prefix_matrix=torch.zeros(num_ranks, num_ranks, dtype=torch.int32),
        recv_row_of_token=torch.zeros(num_tokens, num_ranks, dtype=torch.int32),
        num_rows=300,
        rank=num_ranks - 1,
        num_sms=24,
    )
    _compile(rows)


@pytest.mark.parametrize(("has_topk", "has_num_real"), [(True, False), (True, True), (False, False)])
def test_copy_out_meta_compiles(has_topk: bool, has_num_real: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    capacity, num_topk = 1024, 8
    (call,) = _launches(
        copy_out_module,
        copy_out_module.launch_copy_out_meta,
        monkeypatch,
        src_idx_area=torch.zeros(capacity, dtype=torch.int32),
        topk_idx_area=torch.zeros(capacity * num_topk, dtype=torch.int64) if has_topk else None,
        topk_weights_area=torch.zeros(capacity * num_topk, dtype=torch.float32) if has_topk else None,
        num_rows=700,
        num_topk=num_topk,
        num_real_rows=torch.zeros(1, dtype=torch.int32) if has_num_real else None,
        num_sms=24,
    )
    assert any(a.startswith("ld.global.cg") for a in _accesses(_compile(call)))


@pytest.mark.parametrize(("num_ranks", "per_node"), [(4, None), (8, 4), (2, None), (16, 8)])
def test_dispatch_layout_compiles_with_atomics(
    num_ranks: int, per_node: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(layout_module, "launch", lambda *args: calls.append(args))
    layout_module.launch_dispatch_layout(torch.zeros(300, 8, dtype=torch.int64), 256, num_ranks, per_node)
    (call,) = calls
    ptx = _compile(call).asm["ptx"]
    assert "atom.global" in ptx or "red.global" in ptx


def _leg_launch(kernel: Any, num_peers: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    (call,) = _launches(
        leg_module,
        leg_module.launch_leg_exchange,
        monkeypatch,
        peer_table=torch.zeros(8, dtype=torch.int64),
        leg_ranks=torch.zeros(num_peers, dtype=torch.int32),
        leg_pes=torch.zeros(num_peers, dtype=torch.int32),
        send_bytes=torch.zeros(num_peers, dtype=torch.int64),
        rank=1,
        me_index=1,
        epoch=7,
        timeout_ns=30 * 10**9,
        error_address=1 << 40,
        operation_code=1,
        flag_word=64,
        staging_word=4096,
        recv_word=1 << 20,
        slot_words=1 << 16,
        kernel=kernel,
    )
    return call


@pytest.mark.parametrize("num_peers", [2, 8])
def test_leg_store_kernel_compiles_with_system_scope_ordering(
    num_peers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = _compile(_leg_launch(leg_module.leg_store_kernel, num_peers, monkeypatch))
    _assert_system_scope_ordering(compiled.asm["ptx"])
    assert "nvshmem" not in compiled.asm["ptx"]


def test_leg_put_kernel_compiles_with_the_nvshmem_device_library(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nvidia.nvshmem", reason="the NVSHMEM wheel (nvidia-nvshmem-cu13) is not installed")
    from epcomm.kernels.nvshmem_primitives import device_library

    call = _leg_launch(leg_module.leg_put_kernel, 4, monkeypatch)
    ptx = _compile(call, (("libnvshmem_device", device_library()),)).asm["ptx"]
    assert "nvshmemi_transfer_put_signal" in ptx
    assert "ld.acquire.sys" in ptx  # the bounded wait on the signal


def _put_path(num_ranks: int, kernel: Any) -> PutPath:
    """A put path as the backend builds it (every peer through puts; the offsets are never
    dereferenced here)."""
    zeros = torch.zeros(num_ranks, dtype=torch.int32)
    return PutPath(zeros, zeros, 1 << 20, 1 << 21, 1 << 19, kernel)


@pytest.mark.parametrize("phase", list(Phase))
def test_low_latency_put_kernels_compile_with_the_nvshmem_device_library(
    phase: Phase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The put path of both low-latency ops (peers of other nodes through NVSHMEM puts): a send
    phase issues non-blocking puts, completes them (quiet) and signals by put-with-signal; a
    receive phase issues none and waits on the low words of the uint64 flags. A receive launch is
    the store entry point with ``PUT``: its module refers to no NVSHMEM symbol, and NVSHMEM's module
    initialisation (which ``requires_nvshmem`` runs on the put entry points) fails on such a module."""
    pytest.importorskip("nvidia.nvshmem", reason="the NVSHMEM wheel (nvidia-nvshmem-cu13) is not installed")
    from epcomm.kernels.nvshmem_primitives import device_library

    num_ranks = 4
    for kernel, store_kernel, launch_of in (
        (ll_dispatch_module.ll_dispatch_put_kernel, ll_dispatch_module.ll_dispatch_kernel,
         lambda put: _dispatch_launch(phase, True, False, False, 7168, num_ranks, monkeypatch, put=put)),
        (ll_combine_module.ll_combine_put_kernel, ll_combine_module.ll_combine_kernel,
         lambda put: _combine_launch(phase, num_ranks, monkeypatch, put=put)),
    ):  # fmt: skip
        call = launch_of(_put_path(num_ranks, kernel))
        ptx = _compile(call, (("libnvshmem_device", device_library()),)).asm["ptx"]
        if phase & Phase.SEND:
            assert call[0] is kernel
            assert "nvshmemi_transfer_put_signal" in ptx or "put_signal" in ptx
            assert "quiet" in ptx
        else:
            assert call[0] is store_kernel
            assert call[3]["PUT"] is True
            assert "nvshmem" not in ptx
        if phase & Phase.RECEIVE:
            _assert_light_wait(ptx)


def test_low_latency_dispatch_send_compiles_at_256_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``HOISTED_PEERS`` destinations the send phase loops over them instead of unrolling
    (unrolled, 256 destinations took minutes to compile): both paths compile for EP256."""
    pytest.importorskip("nvidia.nvshmem", reason="the NVSHMEM wheel (nvidia-nvshmem-cu13) is not installed")
    from epcomm.kernels.nvshmem_primitives import device_library

    num_ranks = 256
    _compile(_dispatch_launch(Phase.SEND, True, False, False, 7168, num_ranks, monkeypatch))
    put = _put_path(num_ranks, ll_dispatch_module.ll_dispatch_put_kernel)
    call = _dispatch_launch(Phase.SEND, True, False, False, 7168, num_ranks, monkeypatch, put=put)
    _compile(call, (("libnvshmem_device", device_library()),))
