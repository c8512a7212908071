"""Workers of the decode-ops tier: ``epcomm.ops`` low-latency custom ops against the ``Buffer``'s own
calls, eager and under ``torch.compile``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from epcomm import Buffer, ops
from epcomm.quant import per_token_cast_back
from epcomm.testing import ProcessGroupInfo, make_routing

BACKEND = "reference"
CAPACITY, HIDDEN, EXPERTS_PER_RANK, NUM_TOPK = 8, 256, 2, 3

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _experts(recv: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Local expert ``e`` multiplies its rows by ``scales[e]``: bf16 ``[L, rows, hidden]``."""
    return (recv.float() * scales.view(-1, 1, 1)).to(torch.bfloat16)


def buffer_step(buffer: Buffer, num_experts: int, use_fp8: bool, scales: torch.Tensor) -> Step:
    """One decode step with the ``Buffer``'s calls."""

    def step(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, CAPACITY, num_experts, use_fp8=use_fp8
        )
        recv = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
        out, _, _ = buffer.low_latency_combine(_experts(recv, scales), topk_idx, topk_weights, handle)
        return out

    return step


def ops_step(buffer: Buffer, num_experts: int, use_fp8: bool, scales: torch.Tensor) -> Step:
    """The same step with ``epcomm.ops`` (compilable)."""

    def step(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        out = ops.low_latency_dispatch(buffer, x, topk_idx, CAPACITY, num_experts, use_fp8=use_fp8)
        recv = per_token_cast_back(*out.recv_x) if isinstance(out.recv_x, tuple) else out.recv_x
        return ops.low_latency_combine(buffer, _experts(recv, scales), topk_idx, topk_weights, out.handle)

    return step


def decode_inputs(
    pgi: ProcessGroupInfo, num_experts: int, seed: int, device: Any = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100 + pgi.rank)
    num_tokens = CAPACITY - pgi.rank % 2
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx, topk_weights = make_routing(
        num_tokens, num_experts, NUM_TOPK, seed=seed, rank=pgi.rank, masked_prob=0.1
    )
    return x.to(device), topk_idx.to(device), topk_weights.to(device)


def decode_ops_worker(pgi: ProcessGroupInfo, use_fp8: bool) -> dict[str, Any]:
    """The Buffer's step, the ops' step eager and compiled (``aot_eager``, ``fullgraph=True``), on
    the same inputs. Returns the graph breaks, the epcomm ops in the graph and whether the three
    results are equal."""
    import torch._dynamo

    num_experts = EXPERTS_PER_RANK * pgi.world_size
    size = Buffer.get_low_latency_rdma_size_hint(CAPACITY, HIDDEN, pgi.world_size, num_experts)
    scales = torch.tensor([0.5, 2.0], dtype=torch.float32)
    found: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        found.extend(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("epcomm."))
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)

    with Buffer(pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend=BACKEND) as buffer:
        inputs = decode_inputs(pgi, num_experts, seed=3)
        want = buffer_step(buffer, num_experts, use_fp8, scales)(*inputs)
        eager = ops_step(buffer, num_experts, use_fp8, scales)(*inputs)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(
            ops_step(buffer, num_experts, use_fp8, scales), backend=recording_backend, fullgraph=True
        )
        got = compiled(*inputs)
        again = compiled(*decode_inputs(pgi, num_experts, seed=4))
        want_again = buffer_step(buffer, num_experts, use_fp8, scales)(
            *decode_inputs(pgi, num_experts, seed=4)
        )
    return {
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "ops": sorted(found),
        "eager_equal": torch.equal(eager, want),
        "compiled_equal": torch.equal(got, want) and torch.equal(again, want_again),
    }
