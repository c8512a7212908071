"""Workers for the GPU training tier: ``epcomm.autograd``, ``epcomm.moe`` and ``epcomm.ops`` on the
NVLink backend against the reference backend (the CPU tier's oracle) in the same processes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional

import epcomm
from epcomm import autograd as ep
from epcomm import ops, quant
from epcomm.moe import MoELayer
from epcomm.testing import ProcessGroupInfo, make_routing

# Largest |NVLink - reference| as a fraction of max |reference|: float32 / float64 payloads move bit
# for bit and are summed in the same order on both backends; bf16 and FP8 rows are bitwise equal
# after dispatch and the NVLink combine sums in the reference's order, so only the GPU expert math
# could differ (it runs on the same inputs).
TOLERANCE = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 1e-2, "fp8": 1e-2}


def _buffers(pgi: ProcessGroupInfo) -> tuple[epcomm.Buffer, epcomm.Buffer]:
    nvlink = epcomm.Buffer(pgi.group, num_nvl_bytes=1 << 24, backend="nvlink")
    reference = epcomm.Buffer(pgi.group, backend="reference")
    assert nvlink.backend_name == "nvlink"
    return nvlink, reference


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    return float((got.double() - want.double()).abs().max()) / max(float(want.double().abs().max()), 1e-30)


def _moe_step(
    buffer: epcomm.Buffer,
    x: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    W: torch.Tensor,
    G: torch.Tensor,
    num_experts: int,
    use_fp8: bool,
) -> dict[str, torch.Tensor]:
    """dispatch -> ``sum_e (recv_x @ W[e]) * weight_e`` -> combine -> ``<out, G>`` -> backward."""
    x, w, W = (t.detach().clone().requires_grad_() for t in (x, w, W))
    out = ep.dispatch(buffer, x, idx, w, num_experts, use_fp8=use_fp8)
    recv = out.recv_x.to(W.dtype)
    y = torch.zeros_like(recv)
    for expert in range(W.size(0)):
        weight = (out.recv_topk_weights.to(W.dtype) * (out.recv_topk_idx == expert)).sum(1, keepdim=True)
        y = y + (recv @ W[expert]) * weight
    combined = ep.combine(buffer, y.to(x.dtype), out.handle).combined_x
    (combined.double() * G).sum().backward()
    assert x.grad is not None
    assert w.grad is not None
    assert W.grad is not None
    return {"out": combined.detach(), "grad_x": x.grad, "grad_w": w.grad, "grad_W": W.grad}


def autograd_matches_reference(pgi: ProcessGroupInfo, payloads: list[str]) -> list[str]:
    """Forward and backward of the MoE step on both backends for each payload; one line per
    tensor that differs beyond ``TOLERANCE`` (empty: all passed)."""
    failures: list[str] = []
    nvlink, reference = _buffers(pgi)
    # FP8 rows on the NVLink backend need hidden % 512 == 0 (16-byte rows of float32 scales).
    num_tokens, hidden, experts_per_rank, num_topk = 96 - 8 * pgi.rank, 512, 4, 3
    num_experts = experts_per_rank * pgi.world_size
    gen = torch.Generator().manual_seed(1234 + pgi.rank)
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    G = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64).to(pgi.device)
    W = (torch.randn(experts_per_rank, hidden, hidden, generator=gen) / math.sqrt(hidden)).to(pgi.device)
    idx, w = make_routing(
        num_tokens, num_experts, num_topk, seed=99, rank=pgi.rank, masked_prob=0.1, device=pgi.device
    )
    for payload in payloads:
        x_dtype = torch.bfloat16 if payload in ("bfloat16", "fp8") else getattr(torch, payload)
        w_dtype = torch.float64 if payload == "float64" else torch.float32
        W_dtype = torch.float64 if payload == "float64" else torch.float32
        args = (
            x.to(pgi.device, x_dtype),
            idx,
            w.to(w_dtype),
            W.to(W_dtype),
            G,
            num_experts,
            payload == "fp8",
        )
        got = _moe_step(nvlink, *args)
        want = _moe_step(reference, *args)
        for name in want:
            error = _relative(got[name], want[name])
            if not error <= TOLERANCE[payload]:
                failures.append(f"rank {pgi.rank} {payload} {name}: relative error {error:.3e}")
    torch.cuda.synchronize()
    nvlink.destroy()
    reference.destroy()
    return failures


def gradcheck_nvlink(pgi: ProcessGroupInfo) -> list[str]:
    """``gradcheck`` / ``gradgradcheck`` of dispatch -> row-wise experts -> combine in float64 on the
    NVLink backend (float64 travels bit for bit through its bf16 rows and a dispatch back)."""
    nvlink = epcomm.Buffer(pgi.group, num_nvl_bytes=1 << 22, backend="nvlink")
    num_tokens, hidden, experts_per_rank, num_topk = 3, 8, 2, 2  # the same on every rank
    num_experts = experts_per_rank * pgi.world_size
    gen = torch.Generator().manual_seed(5 + pgi.rank)
    idx, _ = make_routing(num_tokens, num_experts, num_topk, seed=5, rank=pgi.rank, device=pgi.device)
    W = torch.randn(experts_per_rank, hidden, hidden, generator=gen, dtype=torch.float64).to(pgi.device)

    def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = ep.dispatch(nvlink, x, idx, w, num_experts)
        y = torch.zeros_like(out.recv_x)
        for expert in range(experts_per_rank):
            weight = (out.recv_topk_weights * (out.recv_topk_idx == expert)).sum(1, keepdim=True)
            y = y + torch.tanh(out.recv_x @ W[expert]) * weight
        return ep.combine(nvlink, y, out.handle).combined_x

    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64).to(pgi.device).requires_grad_()
    w = torch.rand(num_tokens, num_topk, generator=gen, dtype=torch.float64).to(pgi.device).requires_grad_()
    failures = []
    if not torch.autograd.gradcheck(step, (x, w), raise_exception=False):
        failures.append(f"rank {pgi.rank}: gradcheck failed")
    if not torch.autograd.gradgradcheck(step, (x, w), raise_exception=False):
        failures.append(f"rank {pgi.rank}: gradgradcheck failed")
    torch.cuda.synchronize()
    nvlink.destroy()
    return failures


def moe_training_matches_reference(pgi: ProcessGroupInfo, compiled: bool) -> list[str]:
    """``MoELayer`` (float32) on each backend, same initial weights, 4 Adam steps side by side;
    with ``compiled`` the NVLink layer runs under ``torch.compile(fullgraph=True)`` (Inductor).
    One line per step or parameter that differs (empty: all passed)."""
    nvlink, reference = _buffers(pgi)
    hidden, ffn_hidden, num_experts, num_topk, num_tokens = 256, 512, 4 * pgi.world_size, 2, 64
    torch.manual_seed(17 + pgi.rank)
    layers = [
        MoELayer(buffer, hidden, ffn_hidden, num_experts, num_topk, dtype=torch.float32, device=pgi.device)
        for buffer in (nvlink, reference)
    ]
    layers[1].load_state_dict(layers[0].state_dict())
    run: list[Callable[[torch.Tensor], torch.Tensor]] = [layers[0], layers[1]]
    if compiled:
        run[0] = torch.compile(layers[0], fullgraph=True)
    optimizers = [torch.optim.Adam(layer.parameters(), lr=1e-3) for layer in layers]
    failures = []
    # Inductor may fuse and reorder float32 math: a looser bound when compiled.
    tolerance = 1e-4 if compiled else 1e-6
    for step in range(4):
        gen = torch.Generator().manual_seed(step * 31 + pgi.rank)
        x = torch.randn(num_tokens, hidden, generator=gen).to(pgi.device)
        target = torch.randn(num_tokens, hidden, generator=gen).to(pgi.device)
        losses = []
        for layer, forward, optimizer in zip(layers, run, optimizers):
            loss = functional.mse_loss(forward(x), target)
            optimizer.zero_grad()
            loss.backward()
            layer.sync_gate_grads()
            optimizer.step()
            losses.append(float(loss.detach()))
        if not abs(losses[0] - losses[1]) <= tolerance * abs(losses[1]):
            failures.append(f"rank {pgi.rank} step {step}: loss {losses[0]} vs reference {losses[1]}")
    for (name, got), want in zip(layers[0].named_parameters(), layers[1].parameters()):
        error = _relative(got.detach(), want.detach())
        if not error <= 10 * tolerance:
            failures.append(f"rank {pgi.rank} {name}: relative difference {error:.3e}")
    torch.cuda.synchronize()
    nvlink.destroy()
    reference.destroy()
    return failures


def compiled_decode_in_cuda_graph(pgi: ProcessGroupInfo, use_fp8: bool) -> list[str]:
    """A decode step (``epcomm.ops`` low-latency dispatch, experts, combine) compiled with
    ``torch.compile(fullgraph=True)``, captured in a CUDA graph and replayed with new inputs,
    against the reference backend's eager ``Buffer`` calls."""
    capacity, hidden, num_topk = 32, 1024, 4
    num_experts = 4 * pgi.world_size
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, pgi.world_size, num_experts)
    nvlink = epcomm.Buffer(pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend="nvlink")
    reference = epcomm.Buffer(pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend="reference")
    scales = torch.linspace(0.5, 2.0, num_experts // pgi.world_size, device=pgi.device).view(-1, 1, 1)

    def experts(recv: torch.Tensor) -> torch.Tensor:
        return (recv.float() * scales).to(torch.bfloat16)

    def step(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        out = ops.low_latency_dispatch(nvlink, x, topk_idx, capacity, num_experts, use_fp8=use_fp8)
        recv = quant.per_token_cast_back(*out.recv_x) if isinstance(out.recv_x, tuple) else out.recv_x
        return ops.low_latency_combine(nvlink, experts(recv), topk_idx, topk_weights, out.handle)

    def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 100 + pgi.rank)
        x = torch.randn(capacity, hidden, generator=gen).to(pgi.device, torch.bfloat16)
        idx, w = make_routing(
            capacity, num_experts, num_topk, seed=seed, rank=pgi.rank, masked_prob=0.05, device=pgi.device
        )
        return x, idx, w

    def expected(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        recv_x, _, handle, _, _ = reference.low_latency_dispatch(
            x, idx, capacity, num_experts, use_fp8=use_fp8
        )
        recv = quant.per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
        combined, _, _ = reference.low_latency_combine(experts(recv), idx, w, handle)
        return combined

    compiled = torch.compile(step, fullgraph=True)
    static = [t.clone() for t in inputs(1)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compiled(*static)  # warm-up: compiles the graph and every kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = compiled(*static)
    failures = []
    for seed in (2, 3, 4):
        fresh = inputs(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        want = expected(*fresh)
        error = _relative(static_out, want)
        if not error <= 1e-2:
            failures.append(f"rank {pgi.rank} replay seed {seed}: relative error {error:.3e}")
    torch.cuda.synchronize()
    nvlink.destroy()
    reference.destroy()
    return failures


def run_checks(pgi: ProcessGroupInfo, name: str, *args: Any) -> list[str]:
    """Dispatch to a worker of this module by name (one entry point for ``parallel_launch``)."""
    worker = {
        "autograd": autograd_matches_reference,
        "gradcheck": gradcheck_nvlink,
        "moe": moe_training_matches_reference,
        "decode_graph": compiled_decode_in_cuda_graph,
    }[name]
    result: list[str] = worker(pgi, *args)
    return result
