"""Workers of the MoE-layer tier: ``epcomm.moe.MoELayer`` trained on gloo against a dense
single-process model with the same initial weights, and ``torch.compile`` of the layer."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional

from epcomm import Buffer
from epcomm.moe import Expert, MoELayer
from epcomm.testing import ProcessGroupInfo

BACKEND = "reference"
SIZES = {"hidden": 32, "ffn_hidden": 48, "experts_per_rank": 2, "num_topk": 2, "num_tokens": 16}


class DenseMoE(nn.Module):
    """The same MoE math in one process: every expert here, every token at once."""

    def __init__(self, gate: torch.Tensor, experts: list[Expert], num_topk: int) -> None:
        super().__init__()
        self.gate = nn.Linear(gate.size(1), gate.size(0), bias=False, dtype=gate.dtype)
        self.experts = nn.ModuleList(experts)
        self.num_topk = num_topk
        with torch.no_grad():
            self.gate.weight.copy_(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).float().softmax(dim=-1)
        topk_weights, topk_idx = probs.topk(self.num_topk, dim=-1)
        out = torch.zeros_like(x)
        for expert_id, expert in enumerate(self.experts):
            hit = topk_idx == expert_id
            rows = hit.any(dim=1).nonzero().squeeze(1)
            weight = (topk_weights * hit).sum(dim=1)[rows].unsqueeze(1)
            out = out.index_add(0, rows, (expert(x[rows]) * weight).to(x.dtype))
        return out


def _all_gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _dense_copy(layer: MoELayer, group: Any) -> DenseMoE:
    """A ``DenseMoE`` holding the layer's gate and every rank's experts (all-gathered)."""
    gathered = {
        name: _all_gather(
            torch.stack([dict(e.named_parameters())[name].detach() for e in layer.experts]), group
        )
        for name in ("fc1.weight", "fc2.weight")
    }
    ffn_hidden, hidden = gathered["fc1.weight"].shape[1:]
    experts = []
    for expert_id in range(layer.num_experts):
        expert = Expert(hidden, ffn_hidden)
        with torch.no_grad():
            expert.fc1.weight.copy_(gathered["fc1.weight"][expert_id])
            expert.fc2.weight.copy_(gathered["fc2.weight"][expert_id])
        experts.append(expert)
    return DenseMoE(layer.gate.weight.detach(), experts, layer.num_topk)


def _batch(
    seed: int, step: int, rank: int, num_tokens: int, hidden: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    return torch.randn(num_tokens, hidden, generator=gen), torch.randn(num_tokens, hidden, generator=gen)


def _optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.Adam(params, lr=3e-3)


def train_vs_dense_worker(pgi: ProcessGroupInfo, optimizer: str, steps: int, seed: int) -> dict[str, Any]:
    """Train ``MoELayer`` (float32) and a dense copy with the same initial weights side by side.

    Each step every rank draws its own batch; the layer's loss on a rank is the squared error of
    its tokens divided by the number of tokens of all ranks, so the sum of the ranks' losses is
    the dense model's loss on all tokens. The gate gradient is summed with ``sync_gate_grads``.

    Returns:
        ``losses`` (the layer's, summed over ranks), ``dense_losses`` and the largest relative
        difference of the parameters after training (``param_error``).
    """
    me, num_ranks = pgi.rank, pgi.world_size
    hidden, num_tokens = SIZES["hidden"], SIZES["num_tokens"]
    total_tokens = num_tokens * num_ranks
    torch.manual_seed(seed + me)  # different experts on every rank; the gate comes from rank 0
    with Buffer(pgi.group, backend=BACKEND) as buffer:
        layer = MoELayer(
            buffer,
            hidden,
            SIZES["ffn_hidden"],
            SIZES["experts_per_rank"] * num_ranks,
            SIZES["num_topk"],
            dtype=torch.float32,
        )
        dense = _dense_copy(layer, pgi.group)
        opt = _optimizer(optimizer, layer.parameters())
        dense_opt = _optimizer(optimizer, dense.parameters())
        losses, dense_losses = [], []
        for step in range(steps):
            x, target = _batch(seed, step, me, num_tokens, hidden)
            loss = functional.mse_loss(layer(x), target, reduction="sum") / (total_tokens * hidden)
            opt.zero_grad()
            loss.backward()
            layer.sync_gate_grads()
            opt.step()
            total = loss.detach().clone()
            dist.all_reduce(total, group=pgi.group)
            losses.append(float(total))

            all_x, all_target = _all_gather(x, pgi.group), _all_gather(target, pgi.group)
            dense_loss = functional.mse_loss(dense(all_x), all_target, reduction="sum") / (
                total_tokens * hidden
            )
            dense_opt.zero_grad()
            dense_loss.backward()
            dense_opt.step()
            dense_losses.append(float(dense_loss.detach()))
        first = me * layer.num_local_experts
        pairs = [(layer.gate.weight, dense.gate.weight)]
        for local, expert in enumerate(layer.experts):
            pairs += list(zip(expert.parameters(), dense.experts[first + local].parameters()))
    param_error = max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)
    return {"losses": losses, "dense_losses": dense_losses, "param_error": param_error}


def compile_worker(pgi: ProcessGroupInfo, num_worst_tokens: int, fullgraph: bool) -> dict[str, Any]:
    """``torch.compile`` of ``MoELayer``'s forward, then backward, against the eager layer.

    The backend is AOTAutograd with no-op compilers (what ``aot_eager`` does), so the forward and
    backward graphs are traced through the ops' fake implementations and autograd formulas, and
    recorded here. No dynamo option is set: without ``num_worst_tokens`` the received row count is
    data-dependent and dynamo keeps such ops in the graph with ``fullgraph=True`` (or with
    ``capture_dynamic_output_shape_ops``); with ``num_worst_tokens`` every epcomm shape is static.

    Returns:
        ``graph_breaks`` (dynamo's counter) and their ``reasons``, ``ops``: for ``forward`` and
        ``backward``, how often each ``epcomm`` op appears in the traced graphs, and ``max_diff``,
        the largest difference from eager of the output and of every gradient.
    """
    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    me, num_ranks = pgi.rank, pgi.world_size
    hidden, num_tokens = SIZES["hidden"], SIZES["num_tokens"]
    torch.manual_seed(7 + me)
    ops: dict[str, Counter[str]] = {"forward": Counter(), "backward": Counter()}

    def recorder(kind: str) -> Any:
        def compiler(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            for node in gm.graph.nodes:
                if node.op == "call_function" and str(node.target).startswith("epcomm."):
                    ops[kind][str(node.target)] += 1
            return make_boxed_func(gm.forward)

        return compiler

    with Buffer(pgi.group, backend=BACKEND) as buffer:
        layer = MoELayer(
            buffer,
            hidden,
            SIZES["ffn_hidden"],
            SIZES["experts_per_rank"] * num_ranks,
            SIZES["num_topk"],
            num_worst_tokens=num_worst_tokens,
        )
        x = _batch(3, 0, me, num_tokens, hidden)[0].requires_grad_()
        params = (x, *layer.parameters())
        eager_out = layer(x)
        eager_out.square().sum().backward()
        eager_grads = [p.grad.clone() for p in params if p.grad is not None]
        for p in params:
            p.grad = None

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
        out = torch.compile(layer, backend=backend, fullgraph=fullgraph)(x)
        out.square().sum().backward()
        breaks = torch._dynamo.utils.counters["graph_break"]
        grads = [p.grad for p in params if p.grad is not None]
    assert len(grads) == len(eager_grads)
    diffs = [float((out.detach() - eager_out.detach()).abs().max())]
    diffs += [float((g - e).abs().max()) for g, e in zip(grads, eager_grads)]
    return {
        "graph_breaks": sum(breaks.values()),
        "reasons": list(breaks),
        "ops": {kind: dict(counts) for kind, counts in ops.items()},
        "max_diff": max(diffs),
    }
