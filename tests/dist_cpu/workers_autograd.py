"""Workers of the autograd tier: ``epcomm.autograd`` dispatch -> experts -> combine, forward and
backward, against a dense single-process computation of the same MoE math.

Every rank builds its own inputs from ``(seed, rank)``, runs the distributed step, then all-gathers
every rank's inputs and expert weights and computes the dense reference in float64 for all tokens
(autograd on plain indexing, no epcomm), and compares its own slice. The communication is done
before any check, so a wrong result on one rank cannot leave another waiting.

The MoE math (both sides): ``out[t] = sum_k w[t, k] * (x[t] @ W[idx[t, k]])`` over the slots with
``idx >= 0``; the loss is ``sum_t <out[t], G[t]>`` over every rank's tokens, with a fixed upstream
gradient ``G``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from epcomm import Buffer
from epcomm import autograd as ep
from epcomm.quant import per_token_cast_back, per_token_cast_to_fp8
from epcomm.testing import ProcessGroupInfo, make_routing

BACKEND = "reference"

# Largest |got - reference| allowed, as a fraction of max |reference| of the compared tensor
# (measured over seeds at 2 and 4 ranks: float64 <= 8e-16, float32 <= 4.1e-7, bf16 <= 5.1e-3,
# FP8 <= 5.5e-3). float64 payloads are moved bit for bit and summed in float64: only the order of
# the float64 sums differs from the dense reference. float32: experts and sums in float32. bf16:
# the expert outputs and the combined sums are rounded to bf16 (2**-9 relative each), and so are
# the gradients that travel. FP8: compared with a reference fed the dequantized x (the backward
# is straight-through), so the bf16 bound holds.
TOLERANCE = {"float64": 1e-13, "float32": 2e-6, "bfloat16": 1e-2, "fp8": 1e-2}


@dataclass(frozen=True)
class MoECase:
    """Sizes of one autograd case; every rank rebuilds every rank's inputs from it."""

    seed: int
    num_tokens: int = 12  # rank r holds num_tokens - r tokens (num_tokens with same_tokens; 0 on empty_rank)
    hidden: int = 128  # a multiple of 128 for FP8
    experts_per_rank: int = 2
    num_topk: int = 3
    masked_prob: float = 0.2
    empty_rank: int = -1
    same_tokens: bool = False

    def tokens_of(self, rank: int) -> int:
        if rank == self.empty_rank:
            return 0
        return self.num_tokens if self.same_tokens else max(self.num_tokens - rank, 0)


def _inputs(case: MoECase, rank: int, num_ranks: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s float64 inputs: ``x``, ``idx``, ``w``, ``G`` and its local expert weights."""
    num_experts = case.experts_per_rank * num_ranks
    num_tokens = case.tokens_of(rank)
    gen = torch.Generator().manual_seed(case.seed * 7919 + rank)
    routing = make_routing(
        num_tokens, num_experts, case.num_topk, seed=case.seed, rank=rank, masked_prob=case.masked_prob
    )
    scale = 1.0 / math.sqrt(case.hidden)
    return {
        "x": torch.randn(num_tokens, case.hidden, generator=gen, dtype=torch.float64),
        "idx": routing.topk_idx,
        "w": routing.topk_weights.double(),
        "G": torch.randn(num_tokens, case.hidden, generator=gen, dtype=torch.float64),
        # float32-exact values, so float32 and float64 runs start from the same weights.
        "W": (torch.randn(case.experts_per_rank, case.hidden, case.hidden, generator=gen) * scale).double(),
    }


def _experts(
    recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """``sum_e (recv_x @ W[e]) * (weight of local expert e in the row)``, in ``W``'s dtype."""
    x = recv_x.to(W.dtype)
    out = torch.zeros_like(x)
    for expert in range(W.size(0)):
        weight = (recv_w.to(W.dtype) * (recv_idx == expert)).sum(dim=1, keepdim=True)
        out = out + (x @ W[expert]) * weight
    return out


def _dense(all_inputs: list[dict[str, torch.Tensor]], experts_per_rank: int) -> dict[str, list[torch.Tensor]]:
    """Forward and backward of the MoE math over every rank's tokens, float64, no communication."""
    x = torch.cat([i["x"] for i in all_inputs]).requires_grad_()
    w = torch.cat([i["w"] for i in all_inputs]).requires_grad_()
    idx = torch.cat([i["idx"] for i in all_inputs])
    W = torch.cat([i["W"] for i in all_inputs]).requires_grad_()
    out = torch.zeros_like(x)
    for expert in range(W.size(0)):
        weight = (w * (idx == expert)).sum(dim=1, keepdim=True)
        out = out + (x @ W[expert]) * weight
    (out * torch.cat([i["G"] for i in all_inputs])).sum().backward()
    assert x.grad is not None
    assert w.grad is not None
    assert W.grad is not None
    sizes = [i["x"].size(0) for i in all_inputs]
    return {
        "out": list(out.detach().split(sizes)),
        "grad_x": list(x.grad.split(sizes)),
        "grad_w": list(w.grad.split(sizes)),
        "grad_W": list(W.grad.split(experts_per_rank)),
    }


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    if want.numel() == 0:
        return 0.0
    return float((got.detach().double() - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def autograd_vs_dense_worker(
    pgi: ProcessGroupInfo, case: MoECase, payload: str, variant: str = ""
) -> dict[str, float]:
    """One distributed step (dispatch, experts, combine, backward) against the dense reference.

    ``payload``: ``bfloat16``, ``float32``, ``float64`` or ``fp8`` (bf16 sent as FP8).
    ``variant``: ``""``, ``"num_worst_tokens"`` or ``"events"`` (``previous_event`` and
    ``async_finish``). Returns the largest relative error of each compared tensor.
    """
    me, num_ranks = pgi.rank, pgi.world_size
    num_experts = case.experts_per_rank * num_ranks
    mine = _inputs(case, me, num_ranks)
    x_dtype = torch.bfloat16 if payload in ("bfloat16", "fp8") else getattr(torch, payload)
    w_dtype = torch.float64 if payload == "float64" else torch.float32
    compute_dtype = torch.float64 if payload == "float64" else torch.float32
    x = mine["x"].to(x_dtype).requires_grad_()
    w = mine["w"].to(w_dtype).requires_grad_()
    W = mine["W"].to(compute_dtype).requires_grad_()
    worst = sum(case.tokens_of(r) for r in range(num_ranks)) if variant == "num_worst_tokens" else 0
    events = variant == "events"
    with Buffer(pgi.group, backend=BACKEND) as buffer:
        out = ep.dispatch(
            buffer,
            x,
            mine["idx"],
            w,
            num_experts,
            use_fp8=payload == "fp8",
            num_worst_tokens=worst,
            previous_event=Buffer.capture() if events else None,
            async_finish=events,
        )
        if events:
            out.event.current_stream_wait()
        y = _experts(out.recv_x, out.recv_topk_idx, out.recv_topk_weights, W).to(x_dtype)
        combined = ep.combine(buffer, y, out.handle, async_finish=events)
        if events:
            combined.event.current_stream_wait()
        assert combined.combined_x.grad_fn is not None, "combined_x must have a grad_fn"
        (combined.combined_x.double() * mine["G"]).sum().backward()
        gathered: list[object] = [None] * num_ranks
        # What this rank fed in: the bf16 (or FP8-dequantized) x, the float32 weights.
        used_x = x.detach()
        if payload == "fp8":
            used_x = per_token_cast_back(*per_token_cast_to_fp8(used_x)) if used_x.numel() else used_x
        sent = {**mine, "x": used_x.double(), "w": w.detach().double(), "W": W.detach().double()}
        dist.all_gather_object(gathered, sent, group=pgi.group)

    assert x.grad is not None
    assert w.grad is not None
    assert W.grad is not None
    assert x.grad.dtype == x_dtype, f"grad of x has dtype {x.grad.dtype}, expected {x_dtype}"
    assert out.recv_x.dtype == x_dtype
    if worst:
        assert out.recv_x.size(0) == worst, (tuple(out.recv_x.shape), worst)
    dense = _dense([g for g in gathered if isinstance(g, dict)], case.experts_per_rank)
    errors = {
        "out": _relative_error(combined.combined_x, dense["out"][me]),
        "grad_x": _relative_error(x.grad, dense["grad_x"][me]),
        "grad_w": _relative_error(w.grad, dense["grad_w"][me]),
        "grad_W": _relative_error(W.grad, dense["grad_W"][me]),
    }
    bound = TOLERANCE[payload]
    bad = {name: err for name, err in errors.items() if not err <= bound}
    assert not bad, f"rank {me} {payload} {variant}: relative errors {bad} exceed {bound} (all: {errors})"
    # A slot with no expert (-1) has no effect: its weight's gradient is exactly zero.
    assert bool((w.grad[mine["idx"] < 0] == 0).all()), "grad of topk_weights nonzero at an id of -1"
    return errors


def gradcheck_worker(pgi: ProcessGroupInfo, case: MoECase, second_order: bool) -> None:
    """``torch.autograd.gradcheck`` (and with ``second_order`` ``gradgradcheck``) of dispatch ->
    experts -> combine in float64.

    The experts act on each row alone, so this rank's outputs depend only on this rank's ``x`` and
    ``w``: the finite differences of each rank (taken at the same time on every rank, the same
    number of evaluations, since every rank holds the same number of tokens) are the whole Jacobian
    its backward computes.
    """
    me, num_ranks = pgi.rank, pgi.world_size
    num_experts = case.experts_per_rank * num_ranks
    mine = _inputs(case, me, num_ranks)
    idx, W = mine["idx"], mine["W"]
    with Buffer(pgi.group, backend=BACKEND) as buffer:

        def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            out = ep.dispatch(buffer, x, idx, w, num_experts)
            y = torch.zeros_like(out.recv_x)
            for expert in range(W.size(0)):
                weight = (out.recv_topk_weights * (out.recv_topk_idx == expert)).sum(dim=1, keepdim=True)
                y = y + torch.tanh(out.recv_x @ W[expert]) * weight
            return ep.combine(buffer, y, out.handle).combined_x

        x = mine["x"].clone().requires_grad_()
        w = mine["w"].clone().requires_grad_()
        ok = torch.autograd.gradcheck(step, (x, w), raise_exception=False)
        ok_second = not second_order or torch.autograd.gradgradcheck(step, (x, w), raise_exception=False)
    assert ok, f"rank {me}: gradcheck failed"
    assert ok_second, f"rank {me}: gradgradcheck failed"
