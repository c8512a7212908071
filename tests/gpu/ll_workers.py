"""Workers for the multi-GPU low-latency tier: NVLink LL kernels against the reference backend."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

import epcomm
from epcomm import quant
from epcomm.env import Settings
from epcomm.testing import ProcessGroupInfo, make_routing


def _inputs(
    pgi: ProcessGroupInfo, num_tokens: int, hidden: int, num_experts: int, num_topk: int, seed: int
) -> Any:
    generator = torch.Generator(device="cpu").manual_seed(seed * 100 + pgi.rank)
    x = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float32, device="cpu").bfloat16()
    x[:, 0] = pgi.rank
    x[:, 1] = torch.arange(num_tokens, device="cpu") % 256
    topk_idx, weights = make_routing(
        num_tokens, num_experts, num_topk, seed=seed, rank=pgi.rank, masked_prob=0.05, device=pgi.device
    )
    return x.to(pgi.device), topk_idx, weights


def _buffers(
    pgi: ProcessGroupInfo,
    capacity: int,
    hidden: int,
    num_experts: int,
    transport: str = "nvlink",
    **kwargs: Any,
) -> tuple[Any, Any]:
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, pgi.world_size, num_experts)
    nvlink = epcomm.Buffer(pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend=transport, **kwargs)
    reference = epcomm.Buffer(
        pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend="reference", **kwargs
    )
    return nvlink, reference


def _valid_rows_equal(name: str, got: Any, want: Any, counts: torch.Tensor) -> list[str]:
    failures = []
    for expert, count in enumerate(counts.tolist()):
        g, w = got[expert, :count], want[expert, :count]
        if g.dtype != torch.bool and g.element_size() in (1, 2):
            g, w = g.view(torch.uint8), w.view(torch.uint8)
        if not torch.equal(g, w):
            bad = (g != w).reshape(count, -1).any(dim=1).nonzero()
            failures.append(f"{name}: expert {expert} first differing row {int(bad[0])} of {count}")
            break
    return failures


def _dispatch_both(
    buffers: Any, x: Any, topk_idx: Any, capacity: int, num_experts: int, **kwargs: Any
) -> list[Any]:
    results = []
    for buffer in buffers:
        recv_x, count, handle, _, hook = buffer.low_latency_dispatch(
            x, topk_idx, capacity, num_experts, **kwargs
        )
        hook()
        results.append((recv_x, count, handle))
    return results


def compare_low_latency(
    pgi: ProcessGroupInfo,
    settings: list[dict[str, Any]],
    transport: str = "nvlink",
    buffer_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Dispatch/combine on both backends (``transport``: ``nvlink`` or ``nvshmem`` under test) for
    each setting, both Buffers made with ``buffer_kwargs`` too; return the failed checks."""
    failures: list[str] = []
    for setting in settings:
        capacity, hidden, num_experts, num_topk = (
            setting["capacity"],
            setting["hidden"],
            setting["num_experts"],
            setting["num_topk"],
        )
        num_tokens = setting.get("num_tokens", capacity)
        use_fp8, round_scale, use_ue8m0 = (
            setting.get("fp8", False),
            setting.get("round", False),
            setting.get("ue8m0", False),
        )
        buffers = _buffers(pgi, capacity, hidden, num_experts, transport, **(buffer_kwargs or {}))
        x, topk_idx, weights = _inputs(pgi, num_tokens, hidden, num_experts, num_topk, setting["seed"])
        if setting.get("duplicate"):
            # Every 7th token lists its first expert twice: both slots must count (reference semantics).
            topk_idx[::7, 1] = topk_idx[::7, 0]
        kwargs = {
            "use_fp8": use_fp8,
            "round_scale": round_scale,
            "use_ue8m0": use_ue8m0,
            "return_recv_hook": setting.get("hook", False),
        }
        stats = [
            torch.zeros(num_experts // pgi.world_size, dtype=torch.int32, device=pgi.device) for _ in buffers
        ]
        (got_x, got_count, got_handle), (want_x, want_count, want_handle) = [
            _dispatch_both(
                [b], x, topk_idx, capacity, num_experts, cumulative_local_expert_recv_stats=s, **kwargs
            )[0]
            for b, s in zip(buffers, stats, strict=True)
        ]
        name = f"rank {pgi.rank} {setting}"
        if not torch.equal(got_count, want_count):
            failures.append(f"{name}: recv_count {got_count.tolist()} != {want_count.tolist()}")
            continue
        if not torch.equal(stats[0], stats[1]):
            failures.append(f"{name}: cumulative stats differ")
        if use_fp8:
            failures += _valid_rows_equal(f"{name} x_fp8", got_x[0], want_x[0], want_count)
            failures += _valid_rows_equal(f"{name} scales", got_x[1], want_x[1], want_count)
            if got_x[1].stride(-2) != 1:
                failures.append(f"{name}: scales are not column-major: strides {got_x[1].stride()}")
            expert_x = quant.per_token_cast_back(got_x[0], got_x[1])
        else:
            failures += _valid_rows_equal(f"{name} x", got_x, want_x, want_count)
            expert_x = got_x
        failures += _valid_rows_equal(
            f"{name} src_info", got_handle.recv_src_info, want_handle.recv_src_info, want_count
        )
        if not torch.equal(got_handle.recv_layout_range, want_handle.recv_layout_range):
            failures.append(f"{name}: recv_layout_range differs")
        if not torch.equal(got_handle.combine_gather_idx, want_handle.combine_gather_idx):
            failures.append(f"{name}: combine_gather_idx differs")
        # Same expert outputs into both combines: a deterministic per-expert scaling.
        scale = (1 + torch.arange(expert_x.size(0), device=pgi.device) / 8).view(-1, 1, 1)
        expert_out = (expert_x.float() * scale).bfloat16()
        outs = []
        for buffer, handle in zip(buffers, (got_handle, want_handle), strict=True):
            out, _, hook = buffer.low_latency_combine(
                expert_out, topk_idx, weights, handle, return_recv_hook=setting.get("hook", False)
            )
            hook()
            outs.append(out)
        error = (outs[0].float() - outs[1].float()).abs().max().item()
        bound = 1e-2 * max(outs[1].float().abs().max().item(), 1e-6)
        if error > bound:
            failures.append(f"{name}: combine differs from reference by {error} (bound {bound})")
        again, _, hook = buffers[0].low_latency_combine(expert_out, topk_idx, weights, got_handle)
        if not torch.equal(again, outs[0]):
            failures.append(f"{name}: combine not repeatable")
        # zero_copy (expert outputs written into the library's buffer), out= and wait statistics.
        staged = buffers[0].get_next_low_latency_combine_buffer(got_handle)
        staged.copy_(expert_out)
        out = torch.empty_like(outs[0])
        stats = torch.zeros(pgi.world_size, pgi.world_size, dtype=torch.int64, device=pgi.device)
        zero_copy, _, _ = buffers[0].low_latency_combine(
            torch.randn_like(expert_out),
            topk_idx,
            weights,
            got_handle,
            zero_copy=True,
            out=out,
            combine_wait_recv_cost_stats=stats,
        )
        if zero_copy.data_ptr() != out.data_ptr() or not torch.equal(out, outs[0]):
            failures.append(f"{name}: zero_copy/out= combine differs from the plain combine")
        if int(stats.view(-1)[: pgi.world_size].min()) < 0:
            failures.append(f"{name}: negative combine_wait_recv_cost_stats: {stats.view(-1).tolist()}")
        for buffer in buffers:
            buffer.destroy()
    torch.cuda.synchronize()
    return failures


def graph_replay(
    pgi: ProcessGroupInfo,
    capacity: int,
    hidden: int,
    num_experts: int,
    num_topk: int,
    transport: str = "nvlink",
    buffer_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Capture dispatch + experts + combine in a CUDA graph; replay it with new data; compare to the
    reference (``transport`` under test; both Buffers made with ``buffer_kwargs`` too)."""
    failures: list[str] = []
    nvlink, reference = _buffers(pgi, capacity, hidden, num_experts, transport, **(buffer_kwargs or {}))
    x, topk_idx, weights = _inputs(pgi, capacity, hidden, num_experts, num_topk, 1)
    static_x, static_idx, static_w = x.clone(), topk_idx.clone(), weights.clone()

    def step() -> torch.Tensor:
        (x_fp8, scales), _, handle, _, _ = nvlink.low_latency_dispatch(
            static_x, static_idx, capacity, num_experts
        )
        expert_out = quant.per_token_cast_back(x_fp8, scales)
        out, _, _ = nvlink.low_latency_combine(expert_out, static_idx, static_w, handle)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles every kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for seed in (2, 3, 4):
        x, topk_idx, weights = _inputs(pgi, capacity, hidden, num_experts, num_topk, seed)
        static_x.copy_(x)
        static_idx.copy_(topk_idx)
        static_w.copy_(weights)
        graph.replay()
        (x_fp8, scales), _, handle, _, _ = reference.low_latency_dispatch(x, topk_idx, capacity, num_experts)
        want, _, _ = reference.low_latency_combine(
            quant.per_token_cast_back(x_fp8, scales), topk_idx, weights, handle
        )
        error = (static_out.float() - want.float()).abs().max().item()
        bound = 1e-2 * want.float().abs().max().item()
        if error > bound:
            failures.append(f"rank {pgi.rank} replay seed {seed}: error {error} > {bound}")
    torch.cuda.synchronize()
    nvlink.destroy()
    reference.destroy()
    return failures


def shrink_masked_rank(
    pgi: ProcessGroupInfo, transport: str = "nvlink", buffer_kwargs: dict[str, Any] | None = None
) -> list[str]:
    """Every rank masks the last rank, which then stops calling; the others still get correct
    results (``transport`` under test; both Buffers made with ``buffer_kwargs`` too)."""
    capacity, hidden, num_experts, num_topk = 32, 512, 8 * pgi.world_size, 4
    nvlink, reference = _buffers(
        pgi, capacity, hidden, num_experts, transport, enable_shrink=True, **(buffer_kwargs or {})
    )
    dead = pgi.world_size - 1
    if transport == "nvshmem":
        # The put path's buffer grows at its first call (a collective of every rank): one call of
        # every rank first, as a serving engine warms up before any rank can fail.
        x, topk_idx, weights = _inputs(pgi, capacity, hidden, num_experts, num_topk, 8)
        recv_x, _, handle, _, _ = nvlink.low_latency_dispatch(
            x, topk_idx, capacity, num_experts, use_fp8=False
        )
        nvlink.low_latency_combine(recv_x, topk_idx, weights, handle)
        torch.cuda.synchronize()
    for buffer in (nvlink, reference):
        buffer.low_latency_update_mask_buffer(dead, True)
    status = torch.zeros(pgi.world_size, dtype=torch.int32, device=pgi.device)
    nvlink.low_latency_query_mask_buffer(status)
    if pgi.rank == dead:
        return [] if status[dead] == 1 else ["mask not reported"]
    x, topk_idx, weights = _inputs(pgi, capacity, hidden, num_experts, num_topk, 9)
    outs = []
    for buffer in (nvlink, reference):
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, capacity, num_experts, use_fp8=False
        )
        out, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
        outs.append(out)
    torch.cuda.synchronize()
    failures = []
    if not (outs[0].float() - outs[1].float()).abs().max() <= 1e-2 * outs[1].float().abs().max():
        failures.append(f"rank {pgi.rank}: shrink-mode combine differs from reference")
    return failures


def skip_low_latency(pgi: ProcessGroupInfo, timeout_s: float) -> str:
    """Rank 1 never calls; rank 0's receive times out and the next call raises a named error."""
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(16, 256, pgi.world_size, 16)
    buffer = epcomm.Buffer(
        pgi.group,
        num_rdma_bytes=size,
        low_latency_mode=True,
        backend="nvlink",
        settings=Settings(timeout_s=timeout_s),
    )
    x, topk_idx, _ = _inputs(pgi, 16, 256, 16, 2, 5)
    if pgi.rank == 1:
        time.sleep(timeout_s * 3)
        return "skipped"
    begin = time.monotonic()
    buffer.low_latency_dispatch(x, topk_idx, 16, 16, use_fp8=False)
    torch.cuda.synchronize()
    waited = time.monotonic() - begin
    try:
        buffer.low_latency_dispatch(x, topk_idx, 16, 16, use_fp8=False)
    except epcomm.errors.PeerTimeoutError as error:
        return f"raised after {waited:.1f}s: {error}"
    return "no error"


def two_outstanding(
    pgi: ProcessGroupInfo, transport: str = "nvlink", buffer_kwargs: dict[str, Any] | None = None
) -> list[str]:
    """Two dispatches issued before either is consumed (two micro-batches): both stay valid
    (``transport`` under test; both Buffers made with ``buffer_kwargs`` too)."""
    capacity, hidden, num_experts, num_topk = 32, 1024, 8 * pgi.world_size, 4
    nvlink, reference = _buffers(pgi, capacity, hidden, num_experts, transport, **(buffer_kwargs or {}))
    batches = [_inputs(pgi, capacity, hidden, num_experts, num_topk, seed) for seed in (11, 12)]
    pending = []
    for x, topk_idx, _ in batches:
        recv_x, count, handle, _, hook = nvlink.low_latency_dispatch(
            x, topk_idx, capacity, num_experts, use_fp8=False, return_recv_hook=True
        )
        pending.append((recv_x, count, handle, hook))
    for _, _, _, hook in pending:
        hook()
    failures = []
    for (x, topk_idx, _), (recv_x, count, _, _) in zip(batches, pending, strict=True):
        want_x, want_count, _, _, _ = reference.low_latency_dispatch(
            x, topk_idx, capacity, num_experts, use_fp8=False
        )
        if not torch.equal(count, want_count):
            failures.append(f"rank {pgi.rank}: outstanding dispatch counts differ")
            continue
        failures += _valid_rows_equal(f"rank {pgi.rank} outstanding", recv_x, want_x, want_count)
    stats = torch.zeros(pgi.world_size, pgi.world_size, dtype=torch.int64, device=pgi.device)
    x, topk_idx, _ = batches[0]
    for _ in range(10):  # the global timer ticks coarsely: accumulate over several calls
        nvlink.low_latency_dispatch(
            x, topk_idx, capacity, num_experts, use_fp8=False, dispatch_wait_recv_cost_stats=stats
        )
    torch.cuda.synchronize()
    waited = stats.view(-1)[: pgi.world_size]
    if int(waited.min()) < 0 or int(waited.sum()) <= 0:
        failures.append(f"rank {pgi.rank}: dispatch_wait_recv_cost_stats not filled: {waited.tolist()}")
    nvlink.destroy()
    reference.destroy()
    return failures


def shrink_drops(
    pgi: ProcessGroupInfo, drops: dict[int, str], rounds: int, shrink_timeout_s: float
) -> list[str]:
    """Shrink mode masking dead ranks by itself: rank ``r`` stops at its first ``drops[r]``
    (``"dispatch"``, ``"combine"`` or ``"clean"``: it calls nothing more, then waits at the final
    group barrier). Every other rank runs ``rounds`` x (dispatch, combine, clean) and after each
    call checks that the mask holds exactly the ranks dropped so far, that a ``PeerMaskedWarning``
    named the op, this rank and each newly dropped peer, and that its combined output is the
    weighted sum over the experts of the ranks not masked."""
    capacity, hidden, num_topk = 32, 512, 4
    num_experts = 4 * pgi.world_size
    num_local = num_experts // pgi.world_size
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, pgi.world_size, num_experts)
    buffer = epcomm.Buffer(
        pgi.group,
        num_rdma_bytes=size,
        low_latency_mode=True,
        backend="nvlink",
        enable_shrink=True,
        settings=Settings(timeout_s=60.0, shrink_timeout_s=shrink_timeout_s),
    )
    order = ("dispatch", "combine", "clean")
    failures: list[str] = []
    dropped: set[int] = set()
    status = torch.zeros(pgi.world_size, dtype=torch.int32, device=pgi.device)

    warned: set[int] = set()

    def check(op: str, round_index: int, caught: list[warnings.WarningMessage]) -> None:
        if round_index == 0:
            dropped.update(rank for rank, at in drops.items() if order.index(at) <= order.index(op))
        torch.cuda.synchronize()
        buffer.low_latency_query_mask_buffer(status)
        masked = set(status.nonzero().view(-1).tolist())
        if masked != dropped:
            failures.append(
                f"rank {pgi.rank} round {round_index} {op}: mask {sorted(masked)} != {sorted(dropped)}"
            )
        for warning in caught:
            if isinstance(warning.message, epcomm.errors.PeerMaskedWarning):
                peer, message = warning.message.peer, str(warning.message)
                warned.add(peer)
                if peer not in drops or f"rank {pgi.rank}" not in message or drops[peer] not in message:
                    failures.append(f"rank {pgi.rank}: unexpected warning: {message}")

    stopped = False
    for round_index in range(rounds):
        x, topk_idx, weights = _inputs(pgi, capacity, hidden, num_experts, num_topk, 20 + round_index)
        for op in order:
            if round_index == 0 and drops.get(pgi.rank) == op:
                stopped = True
                break
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if op == "dispatch":
                    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(
                        x, topk_idx, capacity, num_experts, use_fp8=False
                    )
                elif op == "combine":
                    scale = (1 + torch.arange(num_local, device=pgi.device) / 8).view(-1, 1, 1)
                    expert_out = (recv_x.float() * scale).bfloat16()
                    out, _, _ = buffer.low_latency_combine(expert_out, topk_idx, weights, handle)
                else:
                    buffer.clean_low_latency_buffer(capacity, hidden, num_experts)
                check(op, round_index, caught)
            if op == "combine":
                masked = torch.tensor(sorted(dropped), dtype=torch.int64, device=pgi.device)
                use = (topk_idx >= 0) & ~torch.isin(topk_idx.clamp(min=0) // num_local, masked)
                factor = 1 + (topk_idx.clamp(min=0) % num_local) / 8
                rows = (x.float().unsqueeze(1) * factor.unsqueeze(-1)).bfloat16().float()
                want = (rows * torch.where(use, weights, 0.0).unsqueeze(-1)).sum(1)
                error = (out.float() - want).abs().max().item()
                bound = 1e-2 * max(want.abs().max().item(), 1e-6)
                if error > bound:
                    failures.append(
                        f"rank {pgi.rank} round {round_index}: combine off by {error} (bound {bound})"
                    )
        if stopped:
            break
    if not stopped and warned != set(drops):
        failures.append(f"rank {pgi.rank}: warned for {sorted(warned)}, dropped {sorted(drops)}")
    torch.distributed.barrier(group=pgi.group)
    return failures


def inconsistent_low_latency(pgi: ProcessGroupInfo, row: str) -> dict[str, Any]:
    """Rank 1 makes a low-latency call that differs from rank 0's (``row``: ``ll_hidden``,
    ``ll_capacity``, ``ll_fp8_vs_bf16``, ``ll_num_experts`` or ``ll_hidden_hook`` in a dispatch;
    ``ll_other_handle``: a combine with the handle of the dispatch two calls earlier, the same
    parity). No host synchronization: the receive phase sees the fingerprints differ, takes nothing
    from the peer and records both calls. Returns what the differing call raised (``message``),
    whether a differing dispatch received no row from the peer (``nothing_from_peer``), what the
    next call raised after a device synchronization (``next_message``) and whether a matching
    dispatch afterwards received what the reference backend receives (``recovered``)."""
    capacity, hidden, num_topk = 32, 1024, 4
    num_experts = 8 * pgi.world_size
    nvlink, reference = _buffers(pgi, 2 * capacity, 2 * hidden, 2 * num_experts)
    x, topk_idx, weights = _inputs(pgi, capacity, hidden, num_experts, num_topk, 9)
    odd, peer = pgi.rank == 1, 1 - pgi.rank
    outcome: dict[str, Any] = {"message": None, "next_message": None, "nothing_from_peer": None}
    try:
        if row == "ll_other_handle":
            handles = []
            for _ in range(3):
                recv_x, _, handle, _, _ = nvlink.low_latency_dispatch(
                    x, topk_idx, capacity, num_experts, use_fp8=False
                )
                handles.append((recv_x, handle))
            recv_x, handle = handles[0] if odd else handles[2]
            nvlink.low_latency_combine(recv_x, topk_idx, weights, handle)
        else:
            sent, cap, experts, use_fp8 = x, capacity, num_experts, False
            if odd and row in ("ll_hidden", "ll_hidden_hook"):
                sent = torch.cat([x, x], dim=1)
            if odd and row == "ll_capacity":
                cap = 2 * capacity
            if odd and row == "ll_num_experts":
                experts = 2 * num_experts
            if odd and row == "ll_fp8_vs_bf16":
                use_fp8 = True
            _, _, handle, _, hook = nvlink.low_latency_dispatch(
                sent, topk_idx, cap, experts, use_fp8=use_fp8, return_recv_hook=row == "ll_hidden_hook"
            )
            hook()
            torch.cuda.synchronize()
            from_peer = handle.recv_layout_range[:, peer] & 0xFFFFFFFF
            outcome["nothing_from_peer"] = not bool(from_peer.any())
    except epcomm.InconsistentCallError as error:
        outcome["message"] = str(error)
    torch.cuda.synchronize()
    try:
        nvlink.low_latency_dispatch(x, topk_idx, capacity, num_experts, use_fp8=False)
    except epcomm.InconsistentCallError as error:  # the receive phase recorded it
        outcome["next_message"] = str(error)
    got, want = _dispatch_both([nvlink, reference], x, topk_idx, capacity, num_experts, use_fp8=False)
    torch.cuda.synchronize()
    outcome["recovered"] = bool(torch.equal(got[1], want[1])) and not _valid_rows_equal(
        "recv_x", got[0], want[0], want[1]
    )
    nvlink.destroy()
    reference.destroy()
    torch.cuda.synchronize()
    return outcome
