"""Multi-node pieces that need no process group: nodes, DeepEP's channels, the internode handle as a
tuple, the per-node combine order and the byte counts."""

from __future__ import annotations

import pytest
import torch

from epcomm.backends.reference_internode import (
    SenderLayout,
    channel_of_tokens,
    channel_prefix_matrix,
    combine_by_node,
    ordinal_in_channel,
)
from epcomm.handles import DispatchHandle, InternodeHandle, as_handle
from epcomm.topology import NodeTopology, is_multi_node
from epcomm.traffic import count_call_bytes, row_bytes


def test_topology_of_consecutive_ranks() -> None:
    topology = NodeTopology(8, 4)
    assert topology.num_nodes == 2
    assert [topology.node_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [topology.local_rank_of(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="must divide the group size 8; got 3"):
        NodeTopology(8, 3)


@pytest.mark.parametrize(
    ("num_ranks", "per_node", "num_rdma_bytes", "expected"),
    [(4, 2, 1, True), (4, 2, 0, False), (4, 4, 1, False), (4, 1, 1, True)],
)
def test_multi_node_mode_needs_nodes_and_rdma_bytes(
    num_ranks: int, per_node: int, num_rdma_bytes: int, expected: bool
) -> None:
    assert is_multi_node(num_ranks, per_node, num_rdma_bytes) is expected


@pytest.mark.parametrize(
    ("num_tokens", "num_channels", "expected"),
    [(10, 4, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]), (3, 10, [0, 1, 2]), (0, 4, []), (5, 1, [0] * 5)],
)
def test_channels_are_deepeps_task_ranges(num_tokens: int, num_channels: int, expected: list[int]) -> None:
    assert channel_of_tokens(num_tokens, num_channels, torch.device("cpu")).tolist() == expected


def test_channel_prefix_and_ordinals() -> None:
    # 6 tokens, 3 channels of 2; two targets.
    mask = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    channel = channel_of_tokens(6, 3, torch.device("cpu"))
    prefix = channel_prefix_matrix(mask, channel, 3)
    assert prefix.dtype == torch.int32
    assert prefix.tolist() == [[2, 3, 4], [1, 3, 3]]
    ordinals = ordinal_in_channel(mask, channel, prefix)
    assert ordinals.dtype == torch.int32
    assert ordinals.tolist() == [[0, -1], [1, 0], [-1, 0], [0, 1], [0, -1], [-1, -1]]


def test_sender_layout_node_bits_and_heads() -> None:
    # 4 ranks in 2 nodes of 2; 3 tokens, 1 channel.
    in_rank = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    layout = SenderLayout.of(in_rank, NodeTopology(4, 2), 1)
    assert layout.node_bits.tolist() == [[1, 2], [0, 3], [3, 0]]
    assert layout.send_rdma_head.tolist() == [[0, 0], [-1, 1], [1, -1]]
    assert layout.rdma_channel_prefix_matrix.tolist() == [[2], [2]]
    assert layout.gbl_channel_prefix_matrix.tolist() == [[2], [1], [1], [2]]


def test_bit_31_of_a_32_rank_node_is_the_sign_bit() -> None:
    in_rank = torch.zeros(1, 64, dtype=torch.bool)
    in_rank[0, 31] = True
    layout = SenderLayout.of(in_rank, NodeTopology(64, 32), 1)
    assert layout.node_bits.dtype == torch.int32
    assert layout.node_bits.tolist() == [[-(2**31), 0]]


def _handle(num_recv: int = 3) -> InternodeHandle:
    i32 = torch.int32
    return InternodeHandle(
        torch.zeros(2, 4, dtype=torch.bool),
        torch.zeros(2, 1, dtype=i32),
        torch.zeros(4, 1, dtype=i32),
        torch.zeros(2, 1, dtype=i32),
        torch.zeros(2, dtype=i32),
        torch.zeros(4, 1, dtype=i32),
        torch.tensor([1, 1, 3, 3], dtype=i32),
        torch.zeros(num_recv, 8, dtype=torch.uint8),
        torch.zeros(2, 2, dtype=i32),
        torch.zeros(0, 2, dtype=i32),
    ).with_sequence(7)


def test_internode_handle_is_deepeps_ten_tuple() -> None:
    handle = _handle()
    assert len(handle) == 10
    assert handle[-4] is handle.recv_gbl_rank_prefix_sum
    assert handle.num_recv_rows == 3
    assert handle.sequence == 7
    # A plain tuple or list of the same tensors is the same handle, call number included.
    for plain in (tuple(handle), list(handle)):
        again = as_handle(plain, InternodeHandle, "a multi-node dispatch")
        assert again.sequence == 7
        assert all(a is b for a, b in zip(again, handle, strict=True))


def test_handle_kinds_are_not_mixed() -> None:
    with pytest.raises(TypeError, match="InternodeHandle of multi-node dispatch"):
        as_handle(_handle(), DispatchHandle, "a dispatch")
    with pytest.raises(TypeError, match=r"tuple of 9 entries \(expected 10\)"):
        as_handle(tuple(_handle())[:9], InternodeHandle, "a multi-node dispatch")


def test_combine_by_node_rounds_each_node_partial_to_bf16() -> None:
    # One token on ranks 0, 1 (node 0) and 2 (node 1); a bf16 ulp of 1 is 2^-7.
    in_rank = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    a, b, c = 1.0, 2.0**-8, 2.0**-8
    parts = [
        [torch.tensor([[a]], dtype=torch.bfloat16), torch.tensor([[0.5]])],
        [torch.tensor([[b]], dtype=torch.bfloat16), torch.tensor([[0.25]])],
        [torch.tensor([[c]], dtype=torch.bfloat16), torch.tensor([[0.125]])],
        [torch.zeros(0, 1, dtype=torch.bfloat16), torch.zeros(0, 1)],
    ]
    combined, weights = combine_by_node(in_rank, parts, NodeTopology(4, 2), ())
    # Flat, one rounding: 1 + 2^-8 + 2^-8 = 1 + 2^-7. By node: bf16(1 + 2^-8) = 1 (a tie, to even),
    # then 1 + 2^-8 rounds to 1 again.
    assert combined.tolist() == [[1.0]]
    assert weights is not None
    assert weights.tolist() == [[0.875]]


def test_combine_by_node_adds_both_biases() -> None:
    in_rank = torch.tensor([[1, 0]], dtype=torch.bool)
    parts = [[torch.tensor([[2.0**-8]], dtype=torch.bfloat16)], [torch.zeros(0, 1, dtype=torch.bfloat16)]]
    bias = (torch.tensor([[1.0]], dtype=torch.bfloat16), torch.tensor([[2.0**-8]], dtype=torch.bfloat16))
    combined, weights = combine_by_node(in_rank, parts, NodeTopology(2, 1), bias)
    assert weights is None
    # (1 + 2^-8) + 2^-8 = 1 + 2^-7 in float32, a bf16 value.
    assert combined.tolist() == [[1.0 + 2.0**-7]]


def test_row_bytes_counts_each_tensors_row() -> None:
    x = torch.zeros(0, 7168, dtype=torch.bfloat16)
    idx = torch.zeros(0, 8, dtype=torch.int64)
    assert row_bytes(x, None, idx, torch.zeros(0, 8)) == 7168 * 2 + 8 * 8 + 8 * 4


def test_byte_counts_of_one_node_are_flat() -> None:
    in_rank = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    handle = DispatchHandle(
        torch.tensor([[2, 2, 1], [3, 4, 2], [5, 5, 3]], dtype=torch.int32),
        in_rank,
        torch.zeros(3, 3, dtype=torch.int32),
        torch.zeros(5, dtype=torch.int32),
        torch.tensor([5], dtype=torch.int32),
        5,
        5,
        1,
    )
    dispatch = count_call_bytes("dispatch", 10, handle, NodeTopology(3, 3), 0)
    # Tokens of rank 0 to ranks 1 and 2: token 0 -> 1, token 1 -> 1 and 2.
    assert (dispatch.inter_node, dispatch.flat_inter_node) == (0, 0)
    assert dispatch.intra_node == dispatch.flat_intra_node == 30
    combine = count_call_bytes("combine", 10, handle, NodeTopology(3, 3), 0)
    # Rows received from ranks 1 and 2: (3 - 2) + (5 - 3).
    assert combine.intra_node == combine.flat_intra_node == 30
    assert combine.total == combine.flat_total == 30
