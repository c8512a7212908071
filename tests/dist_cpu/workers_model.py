"""Worker of ``test_model_multinode``: a group-limited dispatch (FP8) and combine (BF16) on the
reference backend in multi-node mode, returning ``Buffer.last_call_bytes()`` after each."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from epcomm import Buffer
from epcomm.env import Settings
from epcomm.quant import per_token_cast_to_fp8
from epcomm.testing import ProcessGroupInfo
from epcomm.traffic import CallBytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from model_multinode import ModelSpec, group_limited_routing


def model_calls_worker(pgi: ProcessGroupInfo, spec: ModelSpec) -> tuple[CallBytes | None, CallBytes | None]:
    """Dispatch this rank's ``group_limited_routing`` tokens and combine them; the bytes of each."""
    me = pgi.rank
    topology = spec.topology
    topk_idx = group_limited_routing(
        spec.num_tokens,
        spec.num_experts,
        spec.num_topk,
        topology.num_nodes,
        spec.max_nodes_per_token,
        seed=spec.seed,
        rank=me,
    )
    generator = torch.Generator().manual_seed(me)
    x = torch.randn(spec.num_tokens, spec.hidden, generator=generator).to(torch.bfloat16)
    topk_weights = torch.rand(spec.num_tokens, spec.num_topk, generator=generator)
    settings = Settings(ranks_per_node=spec.ranks_per_node)
    with Buffer(pgi.group, num_rdma_bytes=1 << 20, backend="reference", settings=settings) as buffer:
        per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, spec.num_experts)
        recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(
            per_token_cast_to_fp8(x) if spec.dispatch_fp8 else x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
        )
        dispatch_bytes = buffer.last_call_bytes()
        rows = recv_x[0] if isinstance(recv_x, tuple) else recv_x
        y = torch.ones(rows.size(0), spec.hidden, dtype=torch.bfloat16)
        buffer.combine(y, handle, topk_weights=recv_weights if spec.combine_weights else None)
        combine_bytes = buffer.last_call_bytes()
    return dispatch_bytes, combine_bytes
