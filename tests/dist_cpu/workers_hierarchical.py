"""Workers of the hierarchical multi-node algorithm (``epcomm.backends.hierarchical``) over
``torch.distributed`` legs, against the reference backend's multi-node mode in the same processes.

Both buffers get the same inputs; every result must be equal bit for bit (rows, scales, top-k ids
and weights, per-expert counts, all ten handle entries, combined rows and weights), and the bytes
the legs sent must be the hierarchical scheme's (``epcomm.traffic``): each token crosses to each
node it needs once.
"""

from __future__ import annotations

from typing import Any

import torch

from epcomm import Buffer, quant
from epcomm.backends.hierarchical import hierarchical_buffer
from epcomm.env import Settings
from epcomm.handles import InternodeHandle
from epcomm.testing import ProcessGroupInfo, make_routing

RDMA_BYTES = 1 << 20

# The settings of the check (the CPU tier and the GPU tier run them all).
SETTINGS: list[dict[str, Any]] = [
    {"seed": 1, "num_tokens": 40, "hidden": 64, "num_experts": 16, "num_topk": 4, "biases": 1},
    {"seed": 2, "num_tokens": 24, "hidden": 256, "num_experts": 8, "num_topk": 3, "fp8": True, "biases": 2},
    {"seed": 3, "num_tokens": 17, "hidden": 32, "num_experts": 16, "num_topk": 6, "num_worst_tokens": 136},
    {
        "seed": 4,
        "num_tokens": 30,
        "hidden": 48,
        "num_experts": 8,
        "num_topk": 2,
        "alignment": 4,
        "empty_rank": 1,
    },
    {
        "seed": 5,
        "num_tokens": 20,
        "hidden": 32,
        "num_experts": 16,
        "num_topk": 4,
        "allowed": 2,
    },  # all to rank 0
]


def _same(name: str, got: Any, want: Any) -> list[str]:
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return [
                f"{name}: {getattr(got, 'shape', got)} {getattr(got, 'dtype', '')} != {list(want.shape)} {want.dtype}"
            ]
        if got.numel() and not torch.equal(
            got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
        ):
            return [f"{name}: values differ"]
        return []
    return [] if got == want else [f"{name}: {got} != {want}"]


def _same_handle(name: str, got: Any, want: Any) -> list[str]:
    assert isinstance(got, InternodeHandle)
    assert isinstance(want, InternodeHandle)
    lines = []
    for field in InternodeHandle._fields:
        g, w = getattr(got, field), getattr(want, field)
        if isinstance(w, torch.Tensor):
            lines += _same(f"{name}.{field}", g, w)
    return lines


def hierarchical_against_reference(
    pgi: ProcessGroupInfo,
    ranks_per_node: int,
    setting: dict[str, Any],
    transport: str = "hierarchical",
    num_rdma_bytes: int = RDMA_BYTES,
) -> list[str]:
    """Dispatch, cached dispatch (same and new ``x``) and combine (with weights and biases) on both;
    return one line per difference (empty: all equal). ``transport``: ``hierarchical`` (the
    algorithm over torch.distributed) or ``nvshmem`` (over NVSHMEM, on GPUs, with
    ``num_rdma_bytes``: small ones move blocks in rounds)."""
    settings = Settings(ranks_per_node=ranks_per_node)
    reference = Buffer(pgi.group, num_rdma_bytes=RDMA_BYTES, backend="reference", settings=settings)
    if transport == "hierarchical":
        hierarchical = hierarchical_buffer(pgi.group, RDMA_BYTES, settings)
    else:
        hierarchical = Buffer(pgi.group, num_rdma_bytes=num_rdma_bytes, backend=transport, settings=settings)
    assert hierarchical.backend_name == transport
    assert reference.is_multi_node
    num_tokens = 0 if setting.get("empty_rank") == pgi.rank else setting["num_tokens"]
    hidden, num_experts, num_topk = setting["hidden"], setting["num_experts"], setting["num_topk"]
    allowed = range(setting["allowed"]) if "allowed" in setting else None
    routing = make_routing(
        num_tokens,
        num_experts,
        num_topk,
        seed=setting["seed"],
        rank=pgi.rank,
        masked_prob=0.1,
        allowed_experts=allowed,
        device=pgi.device,
    )
    generator = torch.Generator().manual_seed(setting["seed"] * 100 + pgi.rank)
    x = (torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float32) * 3).to(
        pgi.device, torch.bfloat16
    )
    x_new = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float32).to(
        pgi.device, torch.bfloat16
    )
    payload: Any = quant.per_token_cast_to_fp8(x) if setting.get("fp8") else x
    worst = setting.get("num_worst_tokens", 0)
    failures: list[str] = []
    results = []
    for buffer in (hierarchical, reference):
        layout = buffer.get_dispatch_layout(routing.topk_idx, num_experts)
        out = buffer.dispatch(
            payload,
            num_tokens_per_rank=layout[0],
            num_tokens_per_rdma_rank=layout[1],
            num_tokens_per_expert=layout[2],
            is_token_in_rank=layout[3],
            topk_idx=routing.topk_idx,
            topk_weights=routing.topk_weights,
            expert_alignment=setting.get("alignment", 1),
            num_worst_tokens=worst,
        )
        recv_x, recv_idx, recv_weights, per_expert, handle, _ = out
        dispatch_bytes = buffer.last_call_bytes()
        recv_bf16 = recv_x[0].float() if isinstance(recv_x, tuple) else recv_x.float()
        expert_out = (recv_bf16 * 0.5 + pgi.rank).to(torch.bfloat16)
        bias = [
            (
                torch.randn(
                    num_tokens, hidden, generator=torch.Generator().manual_seed(b), dtype=torch.float32
                )
            ).to(pgi.device, torch.bfloat16)
            for b in range(setting.get("biases", 0))
        ]
        combined, combined_weights, _ = buffer.combine(
            expert_out,
            handle,
            topk_weights=recv_weights,
            bias=tuple(bias) if len(bias) > 1 else (bias[0] if bias else None),
        )
        combine_bytes = buffer.last_call_bytes()
        cached_same = buffer.dispatch(payload, handle=handle)[0]
        cached_bytes = buffer.last_call_bytes()
        cached_new = buffer.dispatch(x_new, handle=handle)[0]
        results.append(
            (
                recv_x,
                recv_idx,
                recv_weights,
                per_expert,
                handle,
                combined,
                combined_weights,
                cached_same,
                cached_new,
            )
            + (dispatch_bytes, combine_bytes, cached_bytes)
        )
    got, want = results
    names = ("recv_x", "recv_topk_idx", "recv_topk_weights", "per_expert", "handle", "combined_x",
             "combined_topk_weights", "cached_same", "cached_new")  # fmt: skip
    for name, g, w in zip(names, got[:9], want[:9]):
        if name == "handle":
            failures += _same_handle(name, g, w)
        elif isinstance(w, tuple):
            failures += [
                line for i, (gi, wi) in enumerate(zip(g, w)) for line in _same(f"{name}[{i}]", gi, wi)
            ]
        else:
            failures += _same(name, g, w)
    for name, g, w in zip(("dispatch", "combine", "cached dispatch"), got[9:], want[9:]):
        # The legs' bytes (got) must be the scheme's (want: counted from the handle).
        if g is None or w is None or (g.inter_node, g.intra_node) != (w.inter_node, w.intra_node):
            failures.append(f"{name} bytes: legs sent {g}, the scheme needs {w}")
    return [f"rank {pgi.rank} {setting}: {line}" for line in failures]


def _buffer(pgi: ProcessGroupInfo, settings: Settings, transport: str) -> Buffer:
    """The Buffer under test: ``hierarchical`` (over torch.distributed legs) or ``nvshmem``."""
    if transport == "hierarchical":
        return hierarchical_buffer(pgi.group, RDMA_BYTES, settings)
    return Buffer(pgi.group, num_rdma_bytes=RDMA_BYTES, backend=transport, settings=settings)


def _dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> Any:
    """``get_dispatch_layout``, then a plain dispatch of ``x`` with it."""
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    return buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        num_tokens_per_rdma_rank=layout[1],
        num_tokens_per_expert=layout[2],
        is_token_in_rank=layout[3],
        topk_idx=topk_idx,
    )


def hierarchical_inconsistent_call(
    pgi: ProcessGroupInfo, ranks_per_node: int, odd_rank: int, transport: str = "hierarchical"
) -> dict[str, Any]:
    """Rank ``odd_rank`` dispatches a wider ``x`` than the others: every rank must raise
    ``InconsistentCallError`` (a ``ValueError``) at the header, before any payload moves; then a
    consistent call on the same buffer works. Returns what this rank raised and whether it recovered."""
    from epcomm.errors import InconsistentCallError

    settings = Settings(ranks_per_node=ranks_per_node, timeout_s=20.0)
    buffer = _buffer(pgi, settings, transport)
    num_experts = 4 * pgi.world_size
    routing = make_routing(8, num_experts, 2, seed=5, rank=pgi.rank, device=pgi.device)

    def call(hidden: int) -> Any:
        x = torch.ones(8, hidden, dtype=torch.bfloat16, device=pgi.device)
        return _dispatch(buffer, x, routing.topk_idx, num_experts)

    outcome: dict[str, Any] = {"kind": None, "message": ""}
    try:
        call(64 if pgi.rank == odd_rank else 32)
    except InconsistentCallError as error:
        outcome = {
            "kind": "InconsistentCallError",
            "message": str(error),
            "is_value_error": isinstance(error, ValueError),
        }
    recv_x = call(32)[0]
    outcome["recovered"] = isinstance(recv_x, torch.Tensor) and recv_x.size(1) == 32
    return outcome


def hierarchical_async_calls(
    pgi: ProcessGroupInfo, ranks_per_node: int, transport: str = "hierarchical"
) -> list[str]:
    """Dispatch and combine with ``previous_event``, ``async_finish`` and ``allocate_on_comm_stream``
    must return bit for bit what the plain calls return (so the combine is deterministic too), and
    the event must order the caller's stream after them. Returns the differences."""
    settings = Settings(ranks_per_node=ranks_per_node, timeout_s=20.0)
    buffer = _buffer(pgi, settings, transport)
    num_experts = 4 * pgi.world_size
    routing = make_routing(24, num_experts, 3, seed=7, rank=pgi.rank, masked_prob=0.1, device=pgi.device)
    x = torch.randn(24, 256, generator=torch.Generator().manual_seed(pgi.rank)).to(pgi.device, torch.bfloat16)

    def round_trip(**events: Any) -> list[torch.Tensor]:
        layout = buffer.get_dispatch_layout(routing.topk_idx, num_experts)
        previous = Buffer.capture() if events else None
        out = buffer.dispatch(
            x,
            num_tokens_per_rank=layout[0],
            num_tokens_per_rdma_rank=layout[1],
            num_tokens_per_expert=layout[2],
            is_token_in_rank=layout[3],
            topk_idx=routing.topk_idx,
            topk_weights=routing.topk_weights,
            previous_event=previous,
            **events,
        )
        recv_x, recv_idx, recv_weights, _, handle, event = out
        if events:
            event.current_stream_wait()
        expert_out = (recv_x.float() * 2 - pgi.rank).to(torch.bfloat16)
        previous = Buffer.capture() if events else None
        combined, combined_weights, event = buffer.combine(
            expert_out, handle, topk_weights=recv_weights, previous_event=previous, **events
        )
        if events:
            event.current_stream_wait()
        return [recv_x, recv_idx, recv_weights, combined, combined_weights]

    plain = round_trip()
    overlapped = round_trip(async_finish=True, allocate_on_comm_stream=True)
    names = ("recv_x", "recv_topk_idx", "recv_topk_weights", "combined_x", "combined_topk_weights")
    return [
        f"rank {pgi.rank} async {line}"
        for name, g, w in zip(names, overlapped, plain)
        for line in _same(name, g, w)
    ]


def hierarchical_skipped_dispatch(
    pgi: ProcessGroupInfo, ranks_per_node: int, skipper: int, transport: str = "hierarchical"
) -> dict[str, Any]:
    """Rank ``skipper`` makes one dispatch, then skips the second (it waits, then returns): every
    other rank's second dispatch must raise ``PeerTimeoutError`` naming the dispatch within a few
    timeouts. Returns what this rank raised, and when."""
    import time

    from epcomm.errors import PeerLostError, PeerTimeoutError

    timeout_s = 3.0
    settings = Settings(ranks_per_node=ranks_per_node, timeout_s=timeout_s)
    buffer = _buffer(pgi, settings, transport)
    num_experts = 4 * pgi.world_size
    routing = make_routing(8, num_experts, 2, seed=9, rank=pgi.rank, device=pgi.device)
    x = torch.ones(8, 64, dtype=torch.bfloat16, device=pgi.device)

    def dispatch() -> Any:
        return _dispatch(buffer, x, routing.topk_idx, num_experts)

    dispatch()
    if pgi.rank == skipper:
        time.sleep(5 * timeout_s)
        return {"kind": "skipped"}
    start = time.monotonic()
    try:
        dispatch()
    except (PeerTimeoutError, PeerLostError) as error:
        seconds = time.monotonic() - start
        # Stay until every rank has given up on its own: a rank that exits closes its connections,
        # and a peer still waiting for it would see a lost peer instead of its own timeout.
        time.sleep(2 * timeout_s)
        return {"kind": type(error).__name__, "message": str(error), "seconds": seconds}
    return {"kind": None, "seconds": time.monotonic() - start}
