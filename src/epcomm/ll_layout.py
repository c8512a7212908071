"""Sizes of the low-latency buffers (``Buffer.get_low_latency_rdma_size_hint``).

Same accounting as DeepEP V1's ``LowLatencyLayout`` so that clients sizing ``num_rdma_bytes`` from
the hint (vLLM, SGLang) get a buffer our backends fit in: two alternating sets, each with a send
area, a receive area and signal words.
"""

from __future__ import annotations

__all__ = ["low_latency_rdma_size_hint"]

_ALIGNMENT = 128
_HEADER_BYTES = 16  # one int4 per message, as DeepEP


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of ``num_rdma_bytes`` low-latency mode needs.

    Arguments:
        num_max_dispatch_tokens_per_rank: capacity ``M`` per rank.
        hidden: hidden size (a multiple of 128).
        num_ranks: ranks of the group.
        num_experts: total experts.

    Returns:
        int, a multiple of 128.
    """
    num_scales = hidden // 128
    dispatch_message = _HEADER_BYTES + max(hidden * 2, hidden + num_scales * 4)
    combine_message = num_scales * 4 + hidden * 2
    slots = num_experts * num_max_dispatch_tokens_per_rank
    send_bytes = max(num_max_dispatch_tokens_per_rank * dispatch_message, slots * combine_message)
    recv_bytes = max(slots * dispatch_message, slots * combine_message)
    signal_bytes = (num_experts * 4 + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT
    per_set = send_bytes + recv_bytes + signal_bytes
    total = 2 * per_set
    return (total + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT
