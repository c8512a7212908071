"""Workers of ``test_model_multinode``: a group-limited dispatch (FP8) and combine (BF16) on the
reference backend in multi-node mode, returning ``Buffer.last_call_bytes()`` after each; a
low-latency dispatch in a multi-node ``Buffer``, returning what it delivered per source rank."""

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
from model_multinode import LowLatencySpec, ModelSpec, group_limited_routing, low_latency_routing


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


def low_latency_delivery_worker(pgi: ProcessGroupInfo, spec: LowLatencySpec) -> tuple[list[int], list[int]]:
    """One low-latency dispatch of this rank's ``low_latency_routing`` tokens on the reference
    backend in a multi-node ``Buffer``; returns, per source rank, the (token, expert) rows it
    delivered here (``recv_layout_range`` counts summed over the local experts, which add up to
    ``recv_count``) and the distinct source tokens among them (``recv_src_info``)."""
    me = pgi.rank
    topk_idx = low_latency_routing(spec, me)
    generator = torch.Generator().manual_seed(me)
    x = torch.randn(spec.num_tokens, spec.hidden, generator=generator).to(torch.bfloat16)
    size = Buffer.get_low_latency_rdma_size_hint(
        spec.num_tokens, spec.hidden, spec.num_ranks, spec.num_experts
    )
    settings = Settings(ranks_per_node=spec.ranks_per_node)
    with Buffer(
        pgi.group, num_rdma_bytes=size, low_latency_mode=True, backend="reference", settings=settings
    ) as buffer:
        assert buffer.is_multi_node
        _, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, spec.num_tokens, spec.num_experts, use_fp8=True
        )
    recv_src_info, recv_layout_range = handle[0], handle[1]
    per_expert = [0] * spec.num_ranks
    tokens: list[set[int]] = [set() for _ in range(spec.num_ranks)]
    for local_expert in range(recv_layout_range.size(0)):
        for src in range(spec.num_ranks):
            value = int(recv_layout_range[local_expert, src])
            begin, count = value >> 32, value & 0xFFFFFFFF
            per_expert[src] += count
            tokens[src].update(recv_src_info[local_expert, begin : begin + count].tolist())
    assert sum(per_expert) == int(recv_count.sum()), (per_expert, recv_count.tolist())
    return per_expert, [len(t) for t in tokens]
