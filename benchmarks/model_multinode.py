"""Bytes per NIC of multi-node normal mode, without processes: the hierarchical scheme (DeepEP V1's
internode mode), the minimum and a flat all-to-all, and the time they take at a NIC bandwidth.

Every rank's routing is drawn here (``group_limited_routing``: DeepEP's ``tests/test_internode.py``
recipe, seeded per rank), turned into token counts (``epcomm.traffic.token_counts``) and counted
with the formula ``Buffer.last_call_bytes()`` of the reference backend uses
(``epcomm.traffic.routes_from_matrices`` + ``count_rows``): a CPU test checks that both give the same
bytes (``tests/dist_cpu/test_model_multinode.py``).

* **hierarchical**: what the multi-node mode sends; across nodes each token once per other node it
  needs (dispatch) and one partial per (token, other node) (combine).
* **minimum**: the (token, other node) pairs, counted straight from ``topk_idx`` (independently of
  ``epcomm.traffic``): no scheme can move fewer rows across nodes. Per NIC it is their mean.
* **flat**: every row from its source rank to its destination rank (dispatch: one row per (token,
  rank); combine: every received row back).

A NIC (one per GPU) sends and receives at once, so a call takes at least ``max over ranks of
max(sent, received) / bandwidth`` (the bottleneck NIC); a rank receives across nodes in the dispatch
what it sends across nodes in the combine, and the other way round.

DeepEP's published internode figures are "bottleneck RDMA bandwidths": ``num_rdma_token_sent * hidden``
bytes (x 2 for BF16, x ``(1 + 4/128)`` for FP8 rows with their scales; ``topk_idx``/``topk_weights``
not counted) over the kernel time, where ``num_rdma_token_sent`` counts each token once per node it
needs, its own node included. ``deepep_time_us`` = those bytes / the published bandwidth: the time
DeepEP's kernels took for this routing.

    python benchmarks/model_multinode.py                       # EP16..EP256, DeepSeek-V3 routing
    python benchmarks/model_multinode.py --ep 16,32 --nic-gbps 50
    python benchmarks/model_multinode.py --mode low-latency    # 128 tokens a rank, both message schemes

``--mode low-latency`` models one low-latency dispatch (FP8) and combine (BF16) with plain top-k
routing (DeepEP's ``tests/test_low_latency.py``) and, where there are more nodes than the limit,
the group-limited routing above: the messages each rank's NIC carries across nodes per (token,
expert) (DeepEP's scheme) and per (token, destination rank) (the dedup of epcomm's NVLink
kernels), with their real message sizes (``deepep_low_latency_message_bytes``,
``epcomm_low_latency_message_bytes``), the busiest NIC's time at the line rate (a lower bound)
and DeepEP's published times. A CPU test checks the per-rank message counts against what the
reference backend's low-latency dispatch delivers (``tests/dist_cpu/test_model_multinode.py``).

Rows are appended to ``results/model_multinode.jsonl`` (low-latency: ``model_multinode_ll.jsonl``;
``$OUT/...`` when ``OUT`` is set).
"""

# ruff: noqa: E402  (imports follow the sys.path set-up below, so a checkout runs without installing)
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
try:
    import epcomm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_HERE.parent / "src"))

import torch

from epcomm.topology import NodeTopology
from epcomm.traffic import CallBytes, count_rows, routes_from_matrices, row_bytes, token_counts
from report import append_jsonl, environment_info, results_path

__all__ = [
    "DEEPEP_BOTTLENECK_GBPS",
    "DEEPEP_LOW_LATENCY",
    "LINE_RATE_GBPS",
    "LowLatencyRow",
    "LowLatencySpec",
    "ModelRow",
    "ModelSpec",
    "call_row_bytes",
    "cross_node_messages",
    "deepep_low_latency_message_bytes",
    "epcomm_low_latency_message_bytes",
    "format_low_latency_tables",
    "format_model_tables",
    "group_limited_routing",
    "low_latency_messages",
    "low_latency_routing",
    "low_latency_rows",
    "minimum_inter_node_rows",
    "model_call_bytes",
    "model_rows",
    "text_table",
    "tokens_in_rank",
]

LINE_RATE_GBPS = 50.0
"""400 Gb/s (one CX7 / ConnectX-7 InfiniBand NIC per GPU) in GB/s (1e9 bytes/s)."""

DEEPEP_BOTTLENECK_GBPS: dict[int, tuple[float, float]] = {
    16: (43.0, 43.0),
    32: (58.0, 57.0),
    64: (51.0, 50.0),
}
"""DeepEP V1's published internode normal-mode "bottleneck bandwidth (RDMA)", dispatch (FP8) /
combine (BF16), by EP size: H800 + CX7 400 Gb/s InfiniBand, 4096 tokens, hidden 7168, top-4 groups,
top-8 experts (https://github.com/deepseek-ai/DeepEP, README, "Normal kernels with NVLink and RDMA
forwarding")."""

_RANK_STRIDE = 1_000_003  # as epcomm.testing.make_routing: (seed, rank) never share a stream


@dataclass(frozen=True)
class ModelSpec:
    """One group and routing to model.

    Attributes:
        num_ranks: ranks (EP size).
        ranks_per_node: GPUs per node (one NIC each).
        num_tokens: tokens per rank.
        hidden: hidden size (a multiple of 128 for FP8).
        num_experts: experts in total; a multiple of ``num_ranks``.
        num_topk: experts per token.
        max_nodes_per_token: group limit: each token picks its top ``max_nodes_per_token`` node groups.
        seed: routing seed (rank ``r`` draws from ``seed * 1_000_003 + r``).
        dispatch_fp8: FP8 dispatch rows (``x`` float8 + float32 scales per 128 channels), else BF16.
        combine_weights: combine also sends ``topk_weights`` (DeepEP's benchmark loop does not).
    """

    num_ranks: int
    ranks_per_node: int = 8
    num_tokens: int = 4096
    hidden: int = 7168
    num_experts: int = 256
    num_topk: int = 8
    max_nodes_per_token: int = 4
    seed: int = 0
    dispatch_fp8: bool = True
    combine_weights: bool = False

    @property
    def topology(self) -> NodeTopology:
        """The group's nodes."""
        return NodeTopology(self.num_ranks, self.ranks_per_node)


def group_limited_routing(
    num_tokens: int,
    num_experts: int,
    num_topk: int,
    num_groups: int,
    max_groups: int,
    *,
    seed: int,
    rank: int,
) -> torch.Tensor:
    """DeepSeek-V3 style group-limited routing of one rank's tokens (DeepEP's internode test recipe).

    ``scores = |randn(num_tokens, num_experts)| + 1`` from a CPU generator seeded with
    ``seed * 1_000_003 + rank``; experts form ``num_groups`` groups of consecutive ids (one per node);
    a group's score is its best expert's; each token keeps its top ``min(max_groups, num_groups)``
    groups and then its top ``num_topk`` experts inside them.

    Returns:
        ``[num_tokens, num_topk]`` int64 ``topk_idx``: distinct expert ids per token, in at most
        ``max_groups`` groups.
    """
    if num_experts % num_groups != 0:
        raise ValueError(f"num_groups {num_groups} must divide num_experts {num_experts}")
    kept = min(max_groups, num_groups)
    if kept * (num_experts // num_groups) < num_topk:
        raise ValueError(
            f"{kept} groups of {num_experts // num_groups} experts hold fewer than top-{num_topk}"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed * _RANK_STRIDE + rank)
    scores = torch.randn(num_tokens, num_experts, generator=generator, device="cpu").abs() + 1
    group_scores = scores.view(num_tokens, num_groups, -1).amax(dim=-1)
    group_idx = torch.topk(group_scores, k=kept, dim=-1).indices
    in_group = torch.zeros(num_tokens, num_groups, dtype=torch.bool).scatter_(1, group_idx, True)
    masked = scores.masked_fill(~in_group.repeat_interleave(num_experts // num_groups, dim=1), 0.0)
    return torch.topk(masked, k=num_topk, dim=-1).indices.to(torch.int64)


def tokens_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """``[num_tokens, num_ranks]`` bool: which ranks need each token (expert ``e`` lives on rank
    ``e // (num_experts // num_ranks)``; ``-1`` entries need none), as ``get_dispatch_layout``'s
    ``is_token_in_rank``. ``topk_idx``: ``[num_tokens, num_topk]`` int64."""
    rank_idx = torch.div(topk_idx, num_experts // num_ranks, rounding_mode="floor")
    valid = topk_idx >= 0
    in_rank = torch.zeros(topk_idx.size(0), num_ranks + 1, dtype=torch.bool)
    in_rank.scatter_(1, torch.where(valid, rank_idx, num_ranks), True)
    return in_rank[:, :num_ranks]


def minimum_inter_node_rows(
    topk_idx: torch.Tensor, num_experts: int, topology: NodeTopology, rank: int
) -> int:
    """(token, other node) pairs of ``rank``'s tokens, from ``topk_idx`` alone (``[num_tokens,
    num_topk]`` int64): the fewest rows its tokens can take across nodes in a dispatch (and the
    fewest partials they can bring back in a combine)."""
    node_idx = torch.div(topk_idx, num_experts // topology.num_nodes, rounding_mode="floor")
    # Column num_nodes collects the -1 entries; a token's nodes are set once however many experts.
    hit = torch.zeros(topk_idx.size(0), topology.num_nodes + 1, dtype=torch.bool)
    hit.scatter_(1, torch.where(topk_idx >= 0, node_idx, topology.num_nodes), True)
    hit[:, topology.node_of(rank)] = False
    return int(hit[:, : topology.num_nodes].sum())


def call_row_bytes(spec: ModelSpec) -> tuple[int, int]:
    """Bytes of one dispatch row and one combine row, as ``epcomm.traffic.row_bytes`` counts the
    tensors a caller passes (dispatch: ``x`` (+ ``x_scales``), ``topk_idx`` int64, ``topk_weights``
    float32; combine: BF16 ``x`` (+ ``topk_weights``))."""
    hidden, k = spec.hidden, spec.num_topk
    idx, weights = torch.empty(0, k, dtype=torch.int64), torch.empty(0, k, dtype=torch.float32)
    if spec.dispatch_fp8:
        x = torch.empty(0, hidden, dtype=torch.float8_e4m3fn)
        dispatch = row_bytes(x, torch.empty(0, hidden // 128, dtype=torch.float32), idx, weights)
    else:
        dispatch = row_bytes(torch.empty(0, hidden, dtype=torch.bfloat16), None, idx, weights)
    combine = row_bytes(
        torch.empty(0, hidden, dtype=torch.bfloat16), weights if spec.combine_weights else None
    )
    return dispatch, combine


def _routing(spec: ModelSpec) -> list[torch.Tensor]:
    topology = spec.topology
    return [
        group_limited_routing(
            spec.num_tokens,
            spec.num_experts,
            spec.num_topk,
            topology.num_nodes,
            spec.max_nodes_per_token,
            seed=spec.seed,
            rank=rank,
        )
        for rank in range(spec.num_ranks)
    ]


def model_call_bytes(
    spec: ModelSpec, routing: Sequence[torch.Tensor] | None = None
) -> list[tuple[CallBytes, CallBytes]]:
    """Per rank, the ``CallBytes`` of a dispatch and of the combine on its handle, as
    ``Buffer.last_call_bytes()`` would report them after those calls.

    Arguments:
        spec: the group and routing.
        routing: every rank's ``topk_idx`` (``[num_tokens, num_topk]`` int64); default: drawn with
            ``group_limited_routing`` from ``spec``.
    """
    topology = spec.topology
    routing = _routing(spec) if routing is None else routing
    counts = [
        token_counts(tokens_in_rank(idx, spec.num_experts, spec.num_ranks), topology) for idx in routing
    ]
    to_rank = torch.stack([c[0] for c in counts])
    to_node = torch.stack([c[1] for c in counts])
    dispatch_bytes, combine_bytes = call_row_bytes(spec)
    result = []
    for rank in range(spec.num_ranks):
        routes = routes_from_matrices(to_rank, to_node, topology, rank)
        calls = []
        for operation, size in (("dispatch", dispatch_bytes), ("combine", combine_bytes)):
            rows = count_rows(operation, routes, topology, rank)
            calls.append(
                CallBytes(
                    operation,
                    size,
                    rows.inter_node * size,
                    rows.intra_node * size,
                    rows.flat_inter_node * size,
                    rows.flat_intra_node * size,
                )
            )
        result.append((calls[0], calls[1]))
    return result


@dataclass(frozen=True)
class ModelRow:
    """One (EP size, operation) of the model; bytes per NIC (per rank), times in microseconds.

    Attributes:
        num_ranks, num_nodes, operation, row_bytes: the call.
        hier_mb, min_mb, flat_mb: mean MB (1e6 bytes) a NIC sends across nodes, per scheme.
        hier_max_mb, flat_max_mb: the busiest NIC: max over ranks of max(sent, received) MB.
        nvlink_mb: mean MB a rank sends to the ranks of its node in the hierarchical scheme.
        hier_us, min_us, flat_us: at ``nic_gbps``: busiest NIC (min: mean) / bandwidth.
        nic_gbps: the bandwidth of those times (GB/s).
        deepep_gbps: DeepEP's published bottleneck bandwidth at this EP size, or ``None``.
        hier_at_deepep_us: ``hier_max_mb`` at ``deepep_gbps``.
        deepep_logical_mb: DeepEP's bytes per rank for this routing (the module docstring).
        deepep_us: ``deepep_logical_mb / deepep_gbps``: the time DeepEP's kernels took.
        deepep_nic_gbps: ``hier_mb / deepep_us``: the rate DeepEP's NICs actually moved bytes across
            nodes, if they moved the hierarchical bytes.
    """

    num_ranks: int
    num_nodes: int
    operation: str
    row_bytes: int
    hier_mb: float
    min_mb: float
    flat_mb: float
    hier_max_mb: float
    flat_max_mb: float
    nvlink_mb: float
    nic_gbps: float
    hier_us: float
    min_us: float
    flat_us: float
    deepep_gbps: float | None
    hier_at_deepep_us: float | None
    deepep_logical_mb: float
    deepep_us: float | None
    deepep_nic_gbps: float | None


def model_rows(spec: ModelSpec, nic_gbps: float = LINE_RATE_GBPS) -> list[ModelRow]:
    """The dispatch and combine ``ModelRow`` of ``spec`` at NIC bandwidth ``nic_gbps`` (GB/s)."""
    topology = spec.topology
    routing = _routing(spec)
    calls = model_call_bytes(spec, routing)
    minimum = sum(
        minimum_inter_node_rows(idx, spec.num_experts, topology, r) for r, idx in enumerate(routing)
    )
    logical = (
        sum(
            int(
                torch.div(idx, spec.num_experts // topology.num_nodes, rounding_mode="floor")
                .unsqueeze(2)
                .eq(torch.arange(topology.num_nodes))
                .any(dim=1)
                .sum()
            )
            for idx in routing
        )
        / spec.num_ranks
    )
    deepep = DEEPEP_BOTTLENECK_GBPS.get(spec.num_ranks)
    rows = []
    for index, operation in enumerate(("dispatch", "combine")):
        mine = [call[index] for call in calls]
        other = [call[1 - index] for call in calls]
        size = mine[0].row_bytes
        # Across nodes a rank receives in one call what it sends in the other (rows).
        hier_nic = [
            max(m.inter_node, o.inter_node // o.row_bytes * size) for m, o in zip(mine, other, strict=True)
        ]
        flat_nic = [
            max(m.flat_inter_node, o.flat_inter_node // o.row_bytes * size)
            for m, o in zip(mine, other, strict=True)
        ]
        hier_mb = sum(m.inter_node for m in mine) / len(mine) / 1e6
        min_mb = minimum * size / spec.num_ranks / 1e6
        deepep_row = (
            spec.hidden * (1 + 4 / 128) if operation == "dispatch" and spec.dispatch_fp8 else spec.hidden * 2
        )
        deepep_mb = logical * deepep_row / 1e6
        gbps = None if deepep is None else deepep[index]
        deepep_us = None if gbps is None else deepep_mb / gbps * 1e3
        rows.append(
            ModelRow(
                num_ranks=spec.num_ranks,
                num_nodes=topology.num_nodes,
                operation=operation,
                row_bytes=size,
                hier_mb=hier_mb,
                min_mb=min_mb,
                flat_mb=sum(m.flat_inter_node for m in mine) / len(mine) / 1e6,
                hier_max_mb=max(hier_nic) / 1e6,
                flat_max_mb=max(flat_nic) / 1e6,
                nvlink_mb=sum(m.intra_node for m in mine) / len(mine) / 1e6,
                nic_gbps=nic_gbps,
                hier_us=max(hier_nic) / nic_gbps / 1e3,
                min_us=min_mb / nic_gbps * 1e3,
                flat_us=max(flat_nic) / nic_gbps / 1e3,
                deepep_gbps=gbps,
                hier_at_deepep_us=None if gbps is None else max(hier_nic) / gbps / 1e3,
                deepep_logical_mb=deepep_mb,
                deepep_us=deepep_us,
                deepep_nic_gbps=None if deepep_us is None else hier_mb / deepep_us * 1e3,
            )
        )
    return rows


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def text_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the header, a rule, then ``lines`` (rows of cells), columns right-aligned."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def format_model_tables(rows: Sequence[ModelRow]) -> str:
    """Two tables: MB per NIC per scheme, then times (us) at the NIC bandwidth and at DeepEP's."""
    gbps = rows[0].nic_gbps if rows else LINE_RATE_GBPS
    bytes_table = text_table(
        ["EP", "nodes", "op", "row B", "hier MB", "min MB", "flat MB", "hier max", "flat max", "NVLink MB"],
        [
            [
                str(r.num_ranks),
                str(r.num_nodes),
                r.operation,
                str(r.row_bytes),
                f"{r.hier_mb:.2f}",
                f"{r.min_mb:.2f}",
                f"{r.flat_mb:.2f}",
                f"{r.hier_max_mb:.2f}",
                f"{r.flat_max_mb:.2f}",
                f"{r.nvlink_mb:.2f}",
            ]
            for r in rows
        ],
    )
    time_table = text_table(
        [
            "EP",
            "op",
            f"hier us @{gbps:g}",
            f"min us @{gbps:g}",
            f"flat us @{gbps:g}",
            "DeepEP GB/s",
            "hier us @DeepEP",
            "DeepEP MB",
            "DeepEP us",
            "DeepEP NIC GB/s",
        ],
        [
            [
                str(r.num_ranks),
                r.operation,
                f"{r.hier_us:.0f}",
                f"{r.min_us:.0f}",
                f"{r.flat_us:.0f}",
                _cell(r.deepep_gbps, ".0f"),
                _cell(r.hier_at_deepep_us, ".0f"),
                f"{r.deepep_logical_mb:.2f}",
                _cell(r.deepep_us, ".0f"),
                _cell(r.deepep_nic_gbps, ".1f"),
            ]
            for r in rows
        ],
    )
    return (
        "MB (1e6 bytes) per NIC across nodes, mean over ranks (max: busiest NIC, max(sent, received))\n"
        f"{bytes_table}\n\n"
        f"times (us): busiest NIC at {gbps:g} GB/s and at DeepEP's published bandwidth; DeepEP MB / us: "
        f"its own byte count (own node included) and the time it implies\n{time_table}"
    )


# ---- low-latency mode ---------------------------------------------------------------------------

DEEPEP_LOW_LATENCY: dict[int, tuple[float, float, float, float]] = {
    16: (118.0, 63.0, 195.0, 74.0),
    32: (155.0, 48.0, 273.0, 53.0),
    64: (173.0, 43.0, 314.0, 46.0),
    128: (192.0, 39.0, 369.0, 39.0),
    256: (194.0, 39.0, 360.0, 40.0),
}
"""DeepEP V1's published low-latency figures by EP size: dispatch us, dispatch "RDMA bandwidth"
GB/s, combine us, combine GB/s. H800 + CX7 400 Gb/s InfiniBand, 128 tokens per batch, hidden 7168,
top-8 experts, FP8 dispatch, BF16 combine, NVLink used within a node
(https://github.com/deepseek-ai/DeepEP, README, "Low-latency kernels with pure RDMA"). Its
``tests/test_low_latency.py`` computes the bandwidth as ``(hidden + hidden / 128 * 4 + 16)`` bytes
(dispatch) or ``hidden * 2`` bytes (combine) per valid top-k selection of the rank's tokens, own
node and own rank included, over the kernel time."""


def deepep_low_latency_message_bytes(hidden: int) -> tuple[int, int]:
    """DeepEP V1's low-latency message bytes, ``(dispatch, combine)``: one FP8 message per (token,
    expert) = ``hidden`` FP8 bytes + ``hidden / 128`` float32 scales + a 16-byte header (the
    ``int4`` of source info in ``csrc/kernels/internode_ll.cu``; the same count as
    ``tests/test_low_latency.py``); one BF16 row (``hidden * 2`` bytes) per (token, expert) back."""
    return hidden + hidden // 128 * 4 + 16, hidden * 2


def epcomm_low_latency_message_bytes(hidden: int, num_topk: int) -> tuple[int, int]:
    """The bytes epcomm's NVLink low-latency kernels write per message, ``(dispatch, combine)``.

    Dispatch (``kernels/low_latency_dispatch.py``, ``_send_tokens``): one message per (token,
    destination rank holding one of its experts): ``hidden`` FP8 bytes (``hidden / 4`` int32
    words), ``hidden / 128`` float32 scales and the token's ``num_topk`` int32 expert ids, into a
    slot of ``LowLatencyLayout.message_words`` words (sized for the BF16 row; only those bytes are
    written). Combine (``kernels/low_latency_combine.py``): one BF16 row (``hidden * 2`` bytes) per
    (token, top-k slot), weighted at the token's rank.
    """
    return hidden + hidden // 128 * 4 + num_topk * 4, hidden * 2


@dataclass(frozen=True)
class LowLatencySpec:
    """One group and routing of the low-latency model.

    Attributes:
        num_ranks: ranks (EP size); ``num_experts`` is a multiple of it.
        ranks_per_node: GPUs per node (one NIC each).
        num_tokens: tokens per rank (DeepEP's ``num_max_dispatch_tokens_per_rank``).
        hidden: hidden size (a multiple of 128).
        num_experts: experts in total.
        num_topk: experts per token.
        max_nodes_per_token: ``None``: plain top-k of the scores (DeepEP's low-latency test);
            else the group limit of ``group_limited_routing`` (node groups per token).
        seed: routing seed (rank ``r`` draws from ``seed * 1_000_003 + r``).
    """

    num_ranks: int
    ranks_per_node: int = 8
    num_tokens: int = 128
    hidden: int = 7168
    num_experts: int = 256
    num_topk: int = 8
    max_nodes_per_token: int | None = None
    seed: int = 0

    @property
    def topology(self) -> NodeTopology:
        """The group's nodes."""
        return NodeTopology(self.num_ranks, self.ranks_per_node)

    @property
    def routing_name(self) -> str:
        """``"top-k"`` (plain) or ``"<=N nodes"`` (group-limited)."""
        if self.max_nodes_per_token is None:
            return f"top-{self.num_topk}"
        return f"<={self.max_nodes_per_token} nodes"


def low_latency_routing(spec: LowLatencySpec, rank: int) -> torch.Tensor:
    """``[num_tokens, num_topk]`` int64 ``topk_idx`` of ``rank``: plain top-k of ``|randn| + 1``
    scores (one group of all experts in ``group_limited_routing``: the same draws), or with
    ``spec.max_nodes_per_token`` the group-limited routing of the normal-mode model."""
    limited = spec.max_nodes_per_token is not None
    return group_limited_routing(
        spec.num_tokens,
        spec.num_experts,
        spec.num_topk,
        spec.topology.num_nodes if limited else 1,
        spec.max_nodes_per_token if spec.max_nodes_per_token is not None else 1,
        seed=spec.seed,
        rank=rank,
    )


def low_latency_messages(
    routing: Sequence[torch.Tensor], num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Messages of one low-latency dispatch between every pair of ranks, under both schemes.

    Arguments:
        routing: every rank's ``topk_idx``, ``[num_tokens, num_topk]`` int64 (``-1``: none).
        num_experts: experts in total (expert ``e`` on rank ``e // (num_experts // num_ranks)``).
        num_ranks: ranks.

    Returns:
        ``(per_expert, per_rank)``, each ``[num_ranks, num_ranks]`` int64 indexed ``[source,
        destination]``: ``per_expert`` = (token, expert) pairs of the source's tokens whose expert
        lives on the destination (DeepEP's messages; what the destination's ``recv_count`` sums
        over its local experts); ``per_rank`` = the source's tokens with at least one expert on
        the destination (epcomm's NVLink messages). The combine sends the same counts back.
    """
    per_expert = torch.zeros(num_ranks, num_ranks, dtype=torch.int64)
    per_rank = torch.zeros(num_ranks, num_ranks, dtype=torch.int64)
    for src, idx in enumerate(routing):
        ranks = torch.div(idx[idx >= 0], num_experts // num_ranks, rounding_mode="floor")
        per_expert[src] = torch.bincount(ranks, minlength=num_ranks)
        per_rank[src] = tokens_in_rank(idx, num_experts, num_ranks).sum(dim=0)
    return per_expert, per_rank


def cross_node_messages(messages: torch.Tensor, topology: NodeTopology) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sent, received)``, ``[num_ranks]`` int64 each: the messages of ``messages`` (``[source,
    destination]``) that each rank sends to and receives from ranks of other nodes, i.e. through
    its NIC."""
    node = torch.arange(topology.num_ranks) // topology.num_ranks_per_node
    other = node.view(-1, 1) != node.view(1, -1)
    crossing = torch.where(other, messages, torch.zeros_like(messages))
    return crossing.sum(dim=1), crossing.sum(dim=0)


@dataclass(frozen=True)
class LowLatencyRow:
    """One (EP size, routing, operation) of the low-latency model; MB = 1e6 bytes, times in us.

    Attributes:
        num_ranks, num_nodes, routing, operation: the call.
        expert_msg_bytes, rank_msg_bytes: bytes of one message per (token, expert) (DeepEP's) and
            per (token, destination rank) (epcomm's NVLink kernels' dispatch message; the combine
            row is BF16 in both).
        expert_msgs, rank_msgs: messages a NIC sends across nodes, mean over ranks.
        expert_mb, rank_mb: those messages' MB, mean over ranks.
        expert_max_mb, rank_max_mb: the busiest NIC: max over ranks of max(sent, received) MB.
        topk_rows_mb: dispatch of epcomm's NVLink kernel only: the ``num_topk`` int32 ids it also
            writes to every rank holding none of the token's experts, across nodes, mean MB.
        nic_gbps: the NIC bandwidth (GB/s) of the times.
        expert_us, rank_us: busiest NIC / ``nic_gbps``: a lower bound of the call's time.
        deepep_us, deepep_gbps: DeepEP's published time and logical bandwidth (plain routing only).
        deepep_logical_mb: DeepEP's byte count for this routing (every valid selection), mean.
        deepep_logical_gbps: ``deepep_logical_mb / deepep_us``: to check against ``deepep_gbps``.
        deepep_nic_gbps: ``expert_max_mb / deepep_us``: the rate the busiest NIC moved the
            per-(token, expert) bytes across nodes in DeepEP's published time.
    """

    num_ranks: int
    num_nodes: int
    routing: str
    operation: str
    expert_msg_bytes: int
    rank_msg_bytes: int
    expert_msgs: float
    rank_msgs: float
    expert_mb: float
    rank_mb: float
    expert_max_mb: float
    rank_max_mb: float
    topk_rows_mb: float
    nic_gbps: float
    expert_us: float
    rank_us: float
    deepep_us: float | None
    deepep_gbps: float | None
    deepep_logical_mb: float
    deepep_logical_gbps: float | None
    deepep_nic_gbps: float | None


def low_latency_rows(spec: LowLatencySpec, nic_gbps: float = LINE_RATE_GBPS) -> list[LowLatencyRow]:
    """The dispatch (FP8) and combine (BF16) ``LowLatencyRow`` of ``spec`` at ``nic_gbps`` GB/s."""
    topology = spec.topology
    routing = [low_latency_routing(spec, rank) for rank in range(spec.num_ranks)]
    per_expert, per_rank = low_latency_messages(routing, spec.num_experts, spec.num_ranks)
    expert_sent, expert_received = cross_node_messages(per_expert, topology)
    rank_sent, rank_received = cross_node_messages(per_rank, topology)
    # Across nodes a rank receives in the combine the messages it sent in the dispatch, and sends
    # what it received: its NIC's busiest direction has the same message count in both calls.
    expert_busiest = int(torch.maximum(expert_sent, expert_received).max())
    rank_busiest = int(torch.maximum(rank_sent, rank_received).max())
    # The NVLink kernel writes the top-k ids to every destination, also those without a hit.
    node = torch.arange(spec.num_ranks) // spec.ranks_per_node
    other = node.view(-1, 1) != node.view(1, -1)
    idle = torch.where(other, spec.num_tokens - per_rank, torch.zeros_like(per_rank)).sum(dim=1)
    topk_rows_mb = float(idle.double().mean()) * spec.num_topk * 4 / 1e6
    selections = sum(int((idx >= 0).sum()) for idx in routing) / spec.num_ranks
    deepep_bytes = deepep_low_latency_message_bytes(spec.hidden)
    epcomm_bytes = epcomm_low_latency_message_bytes(spec.hidden, spec.num_topk)
    published = DEEPEP_LOW_LATENCY.get(spec.num_ranks) if spec.max_nodes_per_token is None else None
    rows = []
    for index, operation in enumerate(("dispatch", "combine")):
        expert_size, rank_size = deepep_bytes[index], epcomm_bytes[index]
        expert_max_mb = expert_busiest * expert_size / 1e6
        rank_max_mb = rank_busiest * rank_size / 1e6
        logical_mb = selections * expert_size / 1e6
        deepep_us = None if published is None else published[2 * index]
        rows.append(
            LowLatencyRow(
                num_ranks=spec.num_ranks,
                num_nodes=topology.num_nodes,
                routing=spec.routing_name,
                operation=operation,
                expert_msg_bytes=expert_size,
                rank_msg_bytes=rank_size,
                expert_msgs=float(expert_sent.double().mean()),
                rank_msgs=float(rank_sent.double().mean()),
                expert_mb=float(expert_sent.double().mean()) * expert_size / 1e6,
                rank_mb=float(rank_sent.double().mean()) * rank_size / 1e6,
                expert_max_mb=expert_max_mb,
                rank_max_mb=rank_max_mb,
                topk_rows_mb=topk_rows_mb if operation == "dispatch" else 0.0,
                nic_gbps=nic_gbps,
                expert_us=expert_max_mb / nic_gbps * 1e3,
                rank_us=rank_max_mb / nic_gbps * 1e3,
                deepep_us=deepep_us,
                deepep_gbps=None if published is None else published[2 * index + 1],
                deepep_logical_mb=logical_mb,
                deepep_logical_gbps=None if deepep_us is None else logical_mb / deepep_us * 1e3,
                deepep_nic_gbps=None if deepep_us is None else expert_max_mb / deepep_us * 1e3,
            )
        )
    return rows


def format_low_latency_tables(rows: Sequence[LowLatencyRow]) -> str:
    """Two tables: messages and MB per NIC under both schemes, then the times (us) at the NIC
    bandwidth beside DeepEP's published ones."""
    gbps = rows[0].nic_gbps if rows else LINE_RATE_GBPS
    bytes_table = text_table(
        [
            "EP",
            "nodes",
            "routing",
            "op",
            "msgs/(t,e)",
            "msgs/(t,r)",
            "MB/(t,e)",
            "MB/(t,r)",
            "max MB/(t,e)",
            "max MB/(t,r)",
            "top-k only MB",
        ],
        [
            [
                str(r.num_ranks),
                str(r.num_nodes),
                r.routing,
                r.operation,
                f"{r.expert_msgs:.1f}",
                f"{r.rank_msgs:.1f}",
                f"{r.expert_mb:.3f}",
                f"{r.rank_mb:.3f}",
                f"{r.expert_max_mb:.3f}",
                f"{r.rank_max_mb:.3f}",
                f"{r.topk_rows_mb:.3f}" if r.operation == "dispatch" else "-",
            ]
            for r in rows
        ],
    )
    time_table = text_table(
        [
            "EP",
            "routing",
            "op",
            f"(t,e) us @{gbps:g}",
            f"(t,r) us @{gbps:g}",
            "DeepEP us",
            "DeepEP GB/s",
            "DeepEP MB",
            "DeepEP MB/us",
            "DeepEP NIC GB/s",
        ],
        [
            [
                str(r.num_ranks),
                r.routing,
                r.operation,
                f"{r.expert_us:.1f}",
                f"{r.rank_us:.1f}",
                _cell(r.deepep_us, ".0f"),
                _cell(r.deepep_gbps, ".0f"),
                f"{r.deepep_logical_mb:.3f}",
                _cell(r.deepep_logical_gbps, ".1f"),
                _cell(r.deepep_nic_gbps, ".1f"),
            ]
            for r in rows
        ],
    )
    sizes = rows[0] if rows else None
    legend = (
        ""
        if sizes is None
        else f" (dispatch message {sizes.expert_msg_bytes} B per (token, expert), {sizes.rank_msg_bytes} B per "
        f"(token, rank); combine {rows[1].expert_msg_bytes} B both)"
    )
    return (
        "messages and MB (1e6 bytes) per NIC across nodes, mean over ranks (max: busiest NIC, "
        f"max(sent, received)); (t,e): per (token, expert), (t,r): per (token, destination rank){legend}\n"
        f"{bytes_table}\n\n"
        f"times (us): busiest NIC at {gbps:g} GB/s (a lower bound), DeepEP's published time and "
        "bandwidth, its byte count for this routing (every selection) over its time, and the busiest "
        f"NIC's per-(token, expert) bytes over its time\n{time_table}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the tables, append JSON rows; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ep", default="16,32,64,128,256", help="EP sizes (default %(default)s)")
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument(
        "--mode",
        choices=("normal", "low-latency"),
        default="normal",
        help="which mode to model (default normal)",
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens per rank (normal 4096, low-latency 128)"
    )
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument(
        "--max-nodes",
        type=int,
        default=4,
        help="node groups per token (group limit; low-latency: the second routing besides plain top-k)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16-dispatch", action="store_true", help="BF16 dispatch rows (default FP8)")
    parser.add_argument("--combine-weights", action="store_true", help="combine sends topk_weights")
    parser.add_argument("--nic-gbps", type=float, default=LINE_RATE_GBPS, help="NIC GB/s (default 400 Gb/s)")
    parser.add_argument("--out", default=None, help="JSON lines file ('' writes none)")
    args = parser.parse_args(argv)
    if args.mode == "low-latency":
        return _main_low_latency(args)
    if args.tokens is None:
        args.tokens = 4096
    rows: list[ModelRow] = []
    for ep in (int(v) for v in args.ep.split(",")):
        spec = ModelSpec(
            num_ranks=ep,
            ranks_per_node=args.ranks_per_node,
            num_tokens=args.tokens,
            hidden=args.hidden,
            num_experts=args.experts,
            num_topk=args.topk,
            max_nodes_per_token=args.max_nodes,
            seed=args.seed,
            dispatch_fp8=not args.bf16_dispatch,
            combine_weights=args.combine_weights,
        )
        rows += model_rows(spec, args.nic_gbps)
    print(
        f"model: {args.tokens} tokens/rank, hidden {args.hidden}, top-{args.topk} of {args.experts} experts, "
        f"<= {args.max_nodes} nodes/token, {args.ranks_per_node} GPUs (NICs) per node, "
        f"{'BF16' if args.bf16_dispatch else 'FP8'} dispatch, BF16 combine, seed {args.seed}"
    )
    print(format_model_tables(rows))
    _append_rows(args.out, "model_multinode.jsonl", rows)
    return 0


def _main_low_latency(args: argparse.Namespace) -> int:
    """``--mode low-latency``: print the tables, append JSON rows; exit status 0."""
    tokens = 128 if args.tokens is None else args.tokens
    rows: list[LowLatencyRow] = []
    for ep in (int(v) for v in args.ep.split(",")):
        # The group limit changes nothing where a token may reach every node anyway.
        limited = ep // args.ranks_per_node > args.max_nodes
        for limit in (None, args.max_nodes) if limited else (None,):
            spec = LowLatencySpec(
                num_ranks=ep,
                ranks_per_node=args.ranks_per_node,
                num_tokens=tokens,
                hidden=args.hidden,
                num_experts=args.experts,
                num_topk=args.topk,
                max_nodes_per_token=limit,
                seed=args.seed,
            )
            rows += low_latency_rows(spec, args.nic_gbps)
    print(
        f"low-latency model: {tokens} tokens/rank, hidden {args.hidden}, top-{args.topk} of {args.experts} "
        f"experts (plain top-{args.topk}; and <= {args.max_nodes} nodes/token where there are more nodes), "
        f"{args.ranks_per_node} GPUs "
        f"(NICs) per node, FP8 dispatch, BF16 combine, seed {args.seed}"
    )
    print(format_low_latency_tables(rows))
    _append_rows(args.out, "model_multinode_ll.jsonl", rows)
    return 0


def _append_rows(out: str | None, default_name: str, rows: Sequence[Any]) -> None:
    """Append ``rows`` (dataclasses) as JSON lines to ``out`` (``None``: ``results/default_name``;
    ``""``: nowhere), each with the environment."""
    path = results_path(default_name) if out is None else out
    if path:
        env: dict[str, Any] = environment_info(0, "cpu")
        append_jsonl(path, [{**env, **asdict(row)} for row in rows])
        print(f"rows appended to {path}")


if __name__ == "__main__":
    sys.exit(main())
