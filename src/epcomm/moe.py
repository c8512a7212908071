"""``MoELayer``: a small expert-parallel Mixture-of-Experts layer on ``epcomm.autograd``.

gate (linear) -> softmax -> top-k -> dispatch -> this rank's experts -> combine. Trainable with
``loss.backward()``, and ``torch.compile``-able without graph breaks at the epcomm calls (the
expert loop selects rows with ``nonzero``: compile with
``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` to keep that in the graph too).
It is a reference layer: one small MLP per local expert, run in a Python loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional

from epcomm import autograd as ep
from epcomm.buffer import Buffer

__all__ = ["Expert", "MoELayer"]


class Expert(nn.Module):
    """One expert: ``fc2(silu(fc1(x)))``, no biases.

    Arguments:
        hidden: model width.
        ffn_hidden: the expert's inner width.
        dtype, device: of the parameters.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn_hidden, bias=False, dtype=dtype, device=device)
        self.fc2 = nn.Linear(ffn_hidden, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, hidden]`` -> ``[rows, hidden]``, the parameters' dtype."""
        out: torch.Tensor = self.fc2(functional.silu(self.fc1(x)))
        return out


class MoELayer(nn.Module):
    """An expert-parallel MoE layer: rank ``r`` of the buffer's group owns experts
    ``[r * L, (r + 1) * L)``, ``L = num_experts // group size``; the gate is replicated.

    Arguments:
        buffer: the normal-mode ``Buffer`` of the expert-parallel group.
        hidden: model width (a multiple of 128 with ``use_fp8``).
        ffn_hidden: each expert's inner width.
        num_experts: experts in total, a multiple of the group size.
        num_topk: experts per token.
        use_fp8: dispatch bf16 tokens as FP8 (see ``epcomm.autograd.dispatch``).
        num_worst_tokens: ``> 0``: static receive size (see ``epcomm.autograd.dispatch``).
        dtype, device: of the parameters; the input ``x`` must have this dtype (bf16, float32 or
            float64: the dispatch payload).

    The gate's weight is broadcast from rank 0 at construction, so every rank starts from the same
    gate. Each rank's gate gradient covers only its own tokens: call ``sync_gate_grads()`` after
    ``backward()`` (it sums them over the group) so the replicated gate stays replicated. The
    expert parameters need no reduction: their gradients already hold every rank's tokens
    (through the combine and dispatch backward). Under DDP instead, let DDP handle only the gate
    (list the expert parameters in ``_ddp_params_and_buffers_to_ignore``); DDP averages, so the
    gate then sees the gradient of the mean of the ranks' losses while the experts see the sum:
    scale one of them by the group size.

    Forward: ``x [num_tokens, hidden]`` -> ``[num_tokens, hidden]``, ``x``'s dtype. Router
    probabilities are float32 (float64 for float64 ``x``); the top-k weights are the softmax
    probabilities of the chosen experts (not renormalized).
    """

    def __init__(
        self,
        buffer: Buffer,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        num_topk: int,
        *,
        use_fp8: bool = False,
        num_worst_tokens: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_experts % buffer.group_size != 0:
            raise ValueError(
                f"num_experts must be a multiple of the group size {buffer.group_size}; got {num_experts}"
            )
        if not 1 <= num_topk <= num_experts:
            raise ValueError(f"num_topk must be in [1, num_experts={num_experts}]; got {num_topk}")
        self.buffer = buffer
        self.num_experts = num_experts
        self.num_topk = num_topk
        self.num_local_experts = num_experts // buffer.group_size
        self.first_expert = buffer.rank * self.num_local_experts
        self.use_fp8 = use_fp8
        self.num_worst_tokens = num_worst_tokens
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=dtype, device=device)
        self.experts = nn.ModuleList(
            Expert(hidden, ffn_hidden, dtype=dtype, device=device) for _ in range(self.num_local_experts)
        )
        with torch.no_grad():
            for param in self.gate.parameters():
                self._collective(param, "broadcast")

    def _collective(self, tensor: torch.Tensor, kind: str) -> None:
        """Broadcast from rank 0 or sum ``tensor`` in place over the buffer's group (through a
        CPU copy when a gloo group holds GPU data)."""
        group = self.buffer.group
        staged = tensor
        if tensor.is_cuda and "gloo" in str(dist.get_backend(group)).lower():
            staged = tensor.cpu()
        if kind == "broadcast":
            dist.broadcast(staged, src=dist.get_global_rank(group, 0), group=group)
        else:
            dist.all_reduce(staged, group=group)
        if staged is not tensor:
            tensor.copy_(staged)

    @torch.no_grad()
    def sync_gate_grads(self) -> None:
        """Sum the gate's gradients over the group (a ``torch.distributed`` all-reduce, bounded by
        the process group's timeout). Call it on every rank after ``backward()``."""
        for param in self.gate.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            self._collective(param.grad, "all_reduce")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router: ``topk_idx [num_tokens, num_topk]`` int64 and ``topk_weights`` (float32, or
        float64 for float64 ``x``) of ``x [num_tokens, hidden]``."""
        weight_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        probs = self.gate(x).to(weight_dtype).softmax(dim=-1)
        topk_weights, topk_idx = probs.topk(self.num_topk, dim=-1)
        return topk_idx, topk_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [num_tokens, hidden]`` -> ``[num_tokens, hidden]`` (see the class docstring)."""
        topk_idx, topk_weights = self.route(x)
        out = ep.dispatch(
            self.buffer,
            x,
            topk_idx,
            topk_weights,
            self.num_experts,
            use_fp8=self.use_fp8,
            num_worst_tokens=self.num_worst_tokens,
        )
        y = torch.zeros_like(out.recv_x)
        for local, expert in enumerate(self.experts):
            hit = out.recv_topk_idx == local
            rows = hit.any(dim=1).nonzero().squeeze(1)
            weight = (out.recv_topk_weights * hit).sum(dim=1)[rows].unsqueeze(1)
            y = y.index_add(0, rows, (expert(out.recv_x[rows]) * weight).to(y.dtype))
        return ep.combine(self.buffer, y, out.handle).combined_x
