"""Multi-node mode workers: nodes simulated with ``Settings(ranks_per_node=...)`` and
``num_rdma_bytes > 0`` on the reference backend, checked against ``naive`` and ``naive_nodes``.

As in the other workers, every rank communicates first and checks afterwards.
"""

from __future__ import annotations

import torch

from epcomm import Buffer, Config
from epcomm.env import Settings
from epcomm.errors import InconsistentCallError
from epcomm.handles import InternodeHandle
from epcomm.testing import ProcessGroupInfo
from epcomm.traffic import CallBytes

from .naive import (
    Case,
    RankInputs,
    assert_rows_equal,
    make_all_inputs,
    make_x,
    naive_combine,
    naive_dispatch,
    power_of_two_scale,
)
from .naive_nodes import (
    ExpectedInternode,
    Topology,
    naive_call_rows,
    naive_combine_by_node,
    naive_internode_handle,
    naive_tokens_per_node,
)
from .workers_normal import assert_combined_close

BACKEND = "reference"
RDMA_BYTES = 1 << 20

# (name, dtype, shape as a function of rows, nodes, ranks, channels, ranks per node): DeepEP's.
HANDLE_SHAPES = (
    ("is_token_in_rank", torch.bool, lambda t, r, n, c, p: [t, r]),
    ("rdma_channel_prefix_matrix", torch.int32, lambda t, r, n, c, p: [n, c]),
    ("gbl_channel_prefix_matrix", torch.int32, lambda t, r, n, c, p: [r, c]),
    ("recv_rdma_channel_prefix_matrix", torch.int32, lambda t, r, n, c, p: [n, c]),
    ("recv_rdma_rank_prefix_sum", torch.int32, lambda t, r, n, c, p: [n]),
    ("recv_gbl_channel_prefix_matrix", torch.int32, lambda t, r, n, c, p: [r, c]),
    ("recv_gbl_rank_prefix_sum", torch.int32, lambda t, r, n, c, p: [r]),
    ("recv_src_meta", torch.uint8, None),
    ("send_rdma_head", torch.int32, lambda t, r, n, c, p: [t, n]),
    ("send_nvl_head", torch.int32, None),
)


def _buffer(pgi: ProcessGroupInfo, ranks_per_node: int) -> Buffer:
    settings = Settings(ranks_per_node=ranks_per_node)
    return Buffer(pgi.group, num_rdma_bytes=RDMA_BYTES, backend=BACKEND, settings=settings)


def _dispatch(
    buffer: Buffer, mine: RankInputs, num_experts: int, config: Config | None, **kwargs: object
) -> tuple[tuple[object, ...], tuple[object, ...]]:
    layout = buffer.get_dispatch_layout(mine.topk_idx, num_experts)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = layout
    result = buffer.dispatch(
        mine.x,
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
        config=config,
        **kwargs,  # type: ignore[arg-type]
    )
    return layout, result


def _check_handle(
    handle: object, expected: ExpectedInternode, num_rows: int, topology: Topology, num_tokens: int
) -> None:
    """The handle is DeepEP's 10-tuple: types, shapes, dtypes and every entry against ``naive``."""
    assert isinstance(handle, InternodeHandle), type(handle)
    assert len(handle) == 10, len(handle)
    sizes = (
        num_tokens,
        topology.num_ranks,
        topology.num_nodes,
        topology.num_channels,
        topology.ranks_per_node,
    )
    for (name, dtype, shape), entry in zip(HANDLE_SHAPES, handle, strict=True):
        assert isinstance(entry, torch.Tensor), name
        assert entry.dtype == dtype, f"handle.{name}: dtype {entry.dtype}, expected {dtype}"
        if shape is not None:
            assert list(entry.shape) == shape(*sizes), f"handle.{name}: shape {list(entry.shape)}"
    assert list(handle.recv_src_meta.shape) == [num_rows, 8], handle.recv_src_meta.shape
    assert handle[-4] is handle.recv_gbl_rank_prefix_sum
    for name in (
        "rdma_channel_prefix_matrix",
        "gbl_channel_prefix_matrix",
        "recv_rdma_channel_prefix_matrix",
        "recv_rdma_rank_prefix_sum",
        "recv_gbl_channel_prefix_matrix",
        "recv_gbl_rank_prefix_sum",
        "send_rdma_head",
    ):
        got, want = getattr(handle, name).tolist(), getattr(expected, name)
        assert got == want, f"handle.{name} {got}, expected {want}"
    nvl_head = handle.send_nvl_head.tolist()
    assert nvl_head == expected.send_nvl_head, (
        f"handle.send_nvl_head {nvl_head}, expected {expected.send_nvl_head}"
    )
    num_recv = len(expected.recv_src_meta)
    meta = handle.recv_src_meta[:num_recv].contiguous().view(torch.int32).view(-1, 2).tolist()
    assert [tuple(row) for row in meta] == expected.recv_src_meta, (
        f"handle.recv_src_meta {meta}, expected {expected.recv_src_meta}"
    )
    padding = handle.recv_src_meta[num_recv:].contiguous().view(torch.int32).view(-1, 2).tolist()
    assert all(row == [-1, 0] for row in padding), padding


def _check_bytes(
    got: CallBytes | None,
    all_inputs: list[RankInputs],
    me: int,
    topology: Topology,
    operation: str,
    row_bytes: int,
) -> None:
    want = naive_call_rows(all_inputs, me, topology, "combine" if operation == "combine" else "dispatch")
    assert got is not None, f"last_call_bytes() after {operation}: None"
    assert (got.operation, got.row_bytes) == (operation, row_bytes), (got.operation, got.row_bytes)
    values = (got.inter_node, got.intra_node, got.flat_inter_node, got.flat_intra_node)
    expected = tuple(rows * row_bytes for rows in (want.inter, want.intra, want.flat_inter, want.flat_intra))
    assert values == expected, (
        f"{operation}: bytes (inter, intra, flat inter, flat intra) {values}, expected {expected}"
    )


def internode_round_trip_worker(
    pgi: ProcessGroupInfo, case: Case, ranks_per_node: int, num_sms: int, num_biases: int
) -> None:
    """Layout, dispatch (internode handle), byte counts, combine (DeepEP's order, with weights and
    ``num_biases`` biases), cached dispatch and combine with the handle as a plain tuple."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    second_x = make_x(case, me, salt=1)
    biases = tuple(make_x(case, me, salt=10 + i) for i in range(num_biases))
    config = Config(num_sms) if num_sms else None
    with _buffer(pgi, ranks_per_node) as buffer:
        modes = (buffer.num_ranks_per_node, buffer.num_nodes, buffer.is_multi_node)
        layout, (recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _) = _dispatch(
            buffer, mine, case.num_experts, config
        )
        dispatch_bytes = buffer.last_call_bytes()
        assert isinstance(recv_x, torch.Tensor)
        expert_output = recv_x * power_of_two_scale(me)
        combined, combined_weights, _ = buffer.combine(
            expert_output, handle, topk_weights=recv_topk_weights, bias=biases or None
        )
        combine_bytes = buffer.last_call_bytes()
        cached_x, *cached_rest = buffer.dispatch(second_x, handle=tuple(handle))  # type: ignore[arg-type]
        cached_bytes = buffer.last_call_bytes()
        combined_again, _, _ = buffer.combine(expert_output, list(handle), bias=biases or None)  # type: ignore[arg-type]

    num_channels = (num_sms or Buffer.num_sms) // 2
    topology = Topology(num_ranks, ranks_per_node, num_channels, case.num_experts)
    assert modes == (ranks_per_node, num_ranks // ranks_per_node, True), modes
    per_node = layout[1]
    assert isinstance(per_node, torch.Tensor), per_node
    assert per_node.dtype == torch.int32, per_node.dtype
    assert per_node.tolist() == naive_tokens_per_node(mine, topology), (
        f"num_tokens_per_rdma_rank {per_node.tolist()}, expected {naive_tokens_per_node(mine, topology)}"
    )

    expected = naive_dispatch(all_inputs, me, case.num_experts)
    assert_rows_equal(recv_x, expected.x, expected.keys, "recv_x (rows grouped by source rank, then token)")
    assert recv_topk_idx is not None
    assert recv_topk_weights is not None
    assert_rows_equal(recv_topk_idx, expected.topk_idx, expected.keys, "recv_topk_idx")
    assert_rows_equal(recv_topk_weights, expected.topk_weights, expected.keys, "recv_topk_weights")
    assert per_expert == expected.num_tokens_per_expert, (per_expert, expected.num_tokens_per_expert)
    naive_handle = naive_internode_handle(all_inputs, me, topology)
    _check_handle(handle, naive_handle, len(expected.keys), topology, mine.x.size(0))

    token_keys = [(me, token) for token in range(mine.x.size(0))]
    want_x, want_weights = naive_combine_by_node(mine, topology, biases)
    assert_rows_equal(combined, want_x, token_keys, "combined_x (DeepEP's per-node order, bitwise)")
    assert combined_weights is not None
    assert_rows_equal(combined_weights, want_weights, token_keys, "combined_topk_weights (bitwise)")
    # Against the flat sum: the bf16 partials round once more, by up to half an ulp of a partial,
    # which cancellation (biases) can leave large relative to the result: a bf16 ulp of the largest.
    flat_x, flat_weights = naive_combine(mine, num_ranks, case.num_experts, biases=biases)
    assert_combined_close(combined, flat_x, token_keys, "combined_x against the flat oracle", 1e-2, 2**-7)
    assert_combined_close(
        combined_weights, flat_weights, token_keys, "combined_topk_weights (flat)", 1e-6, 0.0
    )
    assert_rows_equal(combined_again, combined, token_keys, "combined_x with the handle as a list")

    assert cached_rest[:4] == [None, None, None, None], cached_rest
    expected_cached = naive_dispatch(
        all_inputs, me, case.num_experts, xs=[make_x(case, r, salt=1) for r in range(num_ranks)]
    )
    assert isinstance(cached_x, torch.Tensor)
    assert_rows_equal(
        cached_x, expected_cached.x, expected_cached.keys, "recv_x of cached dispatch (plain tuple)"
    )

    hidden, num_topk = case.hidden, case.num_topk
    _check_bytes(dispatch_bytes, all_inputs, me, topology, "dispatch", hidden * 2 + num_topk * (8 + 4))
    _check_bytes(combine_bytes, all_inputs, me, topology, "combine", hidden * 2 + num_topk * 4)
    _check_bytes(cached_bytes, all_inputs, me, topology, "cached dispatch", hidden * 2)


def internode_worst_tokens_worker(
    pgi: ProcessGroupInfo, case: Case, ranks_per_node: int, num_worst_tokens: int
) -> None:
    """``num_worst_tokens`` in multi-node mode: padded rows, ``recv_src_meta`` padding, combine."""
    me, num_ranks = pgi.rank, pgi.world_size
    all_inputs = make_all_inputs(case, num_ranks)
    mine = all_inputs[me]
    with _buffer(pgi, ranks_per_node) as buffer:
        _, (recv_x, recv_topk_idx, recv_topk_weights, _, handle, _) = _dispatch(
            buffer, mine, case.num_experts, None, num_worst_tokens=num_worst_tokens
        )
        assert isinstance(recv_x, torch.Tensor)
        combined, _, _ = buffer.combine(
            recv_x * power_of_two_scale(me), handle, topk_weights=recv_topk_weights
        )
    topology = Topology(num_ranks, ranks_per_node, Buffer.num_sms // 2, case.num_experts)
    expected = naive_dispatch(all_inputs, me, case.num_experts)
    num_recv = len(expected.keys)
    assert recv_x.size(0) == num_worst_tokens, recv_x.shape
    assert_rows_equal(recv_x[:num_recv], expected.x, expected.keys, "recv_x (real rows)")
    assert recv_topk_idx is not None
    assert bool((recv_topk_idx[num_recv:] == -1).all()), "padding rows need recv_topk_idx == -1"
    _check_handle(
        handle, naive_internode_handle(all_inputs, me, topology), num_worst_tokens, topology, mine.x.size(0)
    )
    want_x, _ = naive_combine_by_node(mine, topology)
    assert_rows_equal(combined, want_x, [(me, t) for t in range(mine.x.size(0))], "combined_x (worst)")


def internode_errors_worker(pgi: ProcessGroupInfo, case: Case) -> list[str]:
    """Argument errors of multi-node mode, each raised on every rank before any payload moves."""
    me, num_ranks = pgi.rank, pgi.world_size
    mine = make_all_inputs(case, num_ranks)[me]
    errors = []
    try:
        Buffer(pgi.group, num_rdma_bytes=RDMA_BYTES, backend=BACKEND, settings=Settings(ranks_per_node=3))
    except ValueError as error:
        errors.append(f"ranks_per_node: {error}")
    with _buffer(pgi, 2) as buffer:
        layout = buffer.get_dispatch_layout(mine.topk_idx, case.num_experts)
        per_rank, per_node, per_expert, in_rank, _ = layout
        kwargs = {
            "num_tokens_per_rank": per_rank,
            "is_token_in_rank": in_rank,
            "num_tokens_per_expert": per_expert,
        }
        for what, value in (("missing", None), ("shape", torch.zeros(3, dtype=torch.int32))):
            try:
                buffer.dispatch(mine.x, num_tokens_per_rdma_rank=value, **kwargs)
            except ValueError as error:
                errors.append(f"{what}: {error}")
        # Another rank count of SMs on rank 0: every rank sees it in the header and raises.
        try:
            buffer.dispatch(
                mine.x, num_tokens_per_rdma_rank=per_node, config=Config(8 if me == 0 else 4), **kwargs
            )
        except InconsistentCallError as error:
            errors.append(f"num_sms: {error}")
        recv_x, _, _, _, handle, _ = buffer.dispatch(mine.x, num_tokens_per_rdma_rank=per_node, **kwargs)
        _, _, _, _, later, _ = buffer.dispatch(mine.x, num_tokens_per_rdma_rank=per_node, **kwargs)
        # The handles' call numbers ride with them (here through plain tuples): rank 0 combining
        # the rows of the other dispatch is told so on every rank.
        assert isinstance(handle, InternodeHandle)
        assert isinstance(later, InternodeHandle)
        assert later.sequence == handle.sequence + 1, (handle.sequence, later.sequence)
        try:
            buffer.combine(recv_x, tuple(handle if me == 0 else later))  # type: ignore[arg-type]
        except InconsistentCallError as error:
            errors.append(f"handle: {error}")
    with Buffer(pgi.group, backend=BACKEND, settings=Settings(ranks_per_node=2)) as flat:
        assert not flat.is_multi_node
        try:
            flat.combine(mine.x[:0], handle)
        except TypeError as error:
            errors.append(f"handle kind: {error}")
    return errors
