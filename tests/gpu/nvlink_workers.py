"""Workers for the multi-GPU tier: the NVLink backend against the reference backend in the same processes."""

from __future__ import annotations

import time
from typing import Any

import torch

import epcomm
from epcomm import quant
from epcomm.env import Settings
from epcomm.testing import ProcessGroupInfo, make_routing


def _routing(
    num_tokens: int, num_experts: int, num_topk: int, seed: int, device: torch.device
) -> torch.Tensor:
    return make_routing(
        num_tokens, num_experts, num_topk, seed=seed, masked_prob=0.05, device=device
    ).topk_idx


def _first_mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != {list(want.shape)}"
    if got.numel() == 0:
        return "equal"
    diff = (got.view(torch.uint8) != want.view(torch.uint8)).reshape(got.size(0), -1).any(dim=1).nonzero()
    return "equal" if diff.numel() == 0 else f"first differing row {int(diff[0])}"


def compare_normal_mode(
    pgi: ProcessGroupInfo,
    settings: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    transport: str = "nvlink",
) -> list[str]:
    """Run every setting on both backends; return one line per failed check (empty = all passed).
    ``options``: fields of ``epcomm.env.Settings`` for the buffer under test (kernel knobs);
    ``transport``: its backend (``nvlink`` or ``nvshmem``)."""
    failures: list[str] = []
    nvlink = epcomm.Buffer(
        pgi.group, num_nvl_bytes=1 << 24, backend=transport, settings=Settings(**(options or {}))
    )
    reference = epcomm.Buffer(pgi.group, backend="reference")
    assert nvlink.backend_name == transport
    for setting in settings:
        num_tokens, hidden, num_experts, num_topk = (
            setting["num_tokens"],
            setting["hidden"],
            setting["num_experts"],
            setting["num_topk"],
        )
        if setting.get("zero_tokens_rank") == pgi.rank:
            num_tokens = 0
        seed = setting["seed"] * 1000 + pgi.rank
        torch.manual_seed(seed)
        x = torch.randn(num_tokens, hidden, dtype=torch.float32, device=pgi.device).bfloat16()
        x[:, 0] = pgi.rank
        x[:, 1] = torch.arange(num_tokens, device=pgi.device) % 256
        topk_idx = _routing(num_tokens, num_experts, num_topk, seed, pgi.device)
        topk_weights = torch.rand(num_tokens, num_topk, dtype=torch.float32, device=pgi.device)
        worst = setting.get("num_worst_tokens", 0)
        if worst == "max":  # every token of every rank could land here
            worst = setting["num_tokens"] * pgi.world_size
        bias = torch.randn(num_tokens, hidden, device=pgi.device).bfloat16() if setting.get("bias") else None
        payload: Any = quant.per_token_cast_to_fp8(x) if setting.get("fp8") else x
        outputs = []
        layouts = [buffer.get_dispatch_layout(topk_idx, num_experts) for buffer in (nvlink, reference)]
        for got_part, want_part in zip(layouts[0][:4], layouts[1][:4]):
            assert (got_part is None and want_part is None) or torch.equal(got_part, want_part), (
                f"rank {pgi.rank}: get_dispatch_layout differs from the reference"
            )
        for buffer in (nvlink, reference):
            layout = buffer.get_dispatch_layout(topk_idx, num_experts)
            recv = buffer.dispatch(
                payload,
                num_tokens_per_rank=layout[0],
                is_token_in_rank=layout[3],
                num_tokens_per_expert=layout[2],
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                num_worst_tokens=worst,
                expert_alignment=setting.get("alignment", 1),
            )
            recv_x, recv_idx, recv_w, counts, handle, _ = recv
            cached = buffer.dispatch(payload, handle=handle)[0]
            expert_x = (recv_x if not setting.get("fp8") else quant.per_token_cast_back(*recv_x)).contiguous()
            combined, combined_w, _ = buffer.combine(expert_x, handle, topk_weights=recv_w, bias=bias)
            again, _, _ = buffer.combine(expert_x, handle, topk_weights=recv_w, bias=bias)
            outputs.append((recv_x, recv_idx, recv_w, counts, handle, cached, combined, combined_w, again))
        name = f"rank {pgi.rank} {setting}"
        got, want = outputs
        got_x = got[0] if not setting.get("fp8") else got[0][0]
        want_x = want[0] if not setting.get("fp8") else want[0][0]
        real = int(want[4].num_recv_tokens)
        checks = {
            "recv_x": _first_mismatch(got_x[:real], want_x[:real]),
            "recv_topk_idx": _first_mismatch(got[1], want[1]),
            "recv_topk_weights": _first_mismatch(got[2][:real], want[2][:real]),
            "rank_prefix_matrix": _first_mismatch(got[4].rank_prefix_matrix, want[4].rank_prefix_matrix),
            "cached recv_x": _first_mismatch(
                (got[5] if not setting.get("fp8") else got[5][0])[:real],
                (want[5] if not setting.get("fp8") else want[5][0])[:real],
            ),
            "combine (bitwise vs reference)": _first_mismatch(got[6], want[6]),
            "combine repeat": _first_mismatch(got[6], got[8]),
            "combined weights": _first_mismatch(got[7], want[7]),
        }
        if setting.get("fp8"):
            checks["recv scales"] = _first_mismatch(got[0][1][:real], want[0][1][:real])
        if got[3] != want[3]:
            checks["num_recv_tokens_per_expert_list"] = f"{got[3]} != {want[3]}"
        for check, result in checks.items():
            if result != "equal":
                failures.append(f"{name}: {check}: {result}")
    nvlink.destroy()
    reference.destroy()
    torch.cuda.synchronize()
    return failures


def skip_one_dispatch(pgi: ProcessGroupInfo, timeout_s: float) -> str:
    """Rank 1 skips a dispatch; rank 0 must fail with an error naming the operation and rank 1."""
    buffer = epcomm.Buffer(
        pgi.group, num_nvl_bytes=1 << 22, backend="nvlink", settings=Settings(timeout_s=timeout_s)
    )
    x = torch.randn(64, 256, device=pgi.device).bfloat16()
    topk_idx = _routing(64, 8 * pgi.world_size, 4, pgi.rank, pgi.device)
    layout = buffer.get_dispatch_layout(topk_idx, 8 * pgi.world_size)
    if pgi.rank == 1:
        time.sleep(timeout_s * 3)
        return "skipped"
    begin = time.monotonic()
    try:
        buffer.dispatch(
            x,
            num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=topk_idx,
        )
    except epcomm.errors.PeerTimeoutError as error:
        return f"raised after {time.monotonic() - begin:.1f}s: {error}"
    return "no error"


def skip_one_combine(pgi: ProcessGroupInfo, timeout_s: float) -> str:
    """Rank 1 skips a combine after a dispatch both ran; rank 0's combine must end on its own
    (every wait bounded: the push's entry and exit waits) and its next call must fail naming
    combine and rank 1."""
    buffer = epcomm.Buffer(
        pgi.group, num_nvl_bytes=1 << 22, backend="nvlink", settings=Settings(timeout_s=timeout_s)
    )
    x = torch.randn(64, 256, device=pgi.device).bfloat16()
    topk_idx = _routing(64, 8 * pgi.world_size, 4, pgi.rank, pgi.device)
    layout = buffer.get_dispatch_layout(topk_idx, 8 * pgi.world_size)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=topk_idx,
        topk_weights=torch.rand(64, 4, device=pgi.device),
    )
    torch.cuda.synchronize()
    if pgi.rank == 1:
        time.sleep(timeout_s * 6)
        return "skipped"
    begin = time.monotonic()
    buffer.combine(recv_x, handle, topk_weights=recv_w)
    torch.cuda.synchronize()
    ended = time.monotonic() - begin
    try:
        buffer.combine(recv_x, handle, topk_weights=recv_w)
    except epcomm.errors.PeerTimeoutError as error:
        return f"raised; the combine ended after {ended:.1f}s: {error}"
    return "no error"


def _nvlink_dispatch(
    buffer: epcomm.Buffer, x: Any, topk_idx: torch.Tensor, num_experts: int, num_worst_tokens: int = 0
) -> tuple[Any, ...]:
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    return buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=topk_idx,
        topk_weights=torch.rand(topk_idx.shape, device=topk_idx.device),
        num_worst_tokens=num_worst_tokens,
    )


def _inconsistent_setup(pgi: ProcessGroupInfo) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """An NVLink buffer (5 s timeout), 64 tokens of hidden 512 and their top-4 routing over 8
    experts per rank; returns ``(buffer, x, topk_idx, num_experts)``."""
    num_experts = 8 * pgi.world_size
    buffer = epcomm.Buffer(
        pgi.group, num_nvl_bytes=1 << 22, backend="nvlink", settings=Settings(timeout_s=5.0)
    )
    torch.manual_seed(pgi.rank)
    x = torch.randn(64, 512, device=pgi.device).bfloat16()
    return buffer, x, _routing(64, num_experts, 4, pgi.rank, pgi.device), num_experts


def _next_call_and_recovery(
    buffer: Any, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, outcome: dict[str, Any]
) -> dict[str, Any]:
    """After the differing call: a matching dispatch (``next_message``: what it raised, a recorded
    difference surfacing there; then once more), a combine, and whether it summed every token once
    per destination rank (``recovered``); destroys the buffer."""
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    try:
        recv_x, _, _, _, handle, _ = _nvlink_dispatch(buffer, x, topk_idx, num_experts)
    except epcomm.InconsistentCallError as error:
        outcome["next_message"] = str(error)
        recv_x, _, _, _, handle, _ = _nvlink_dispatch(buffer, x, topk_idx, num_experts)
    combined, _, _ = buffer.combine(recv_x, handle)
    hits = layout[3].sum(dim=1, dtype=torch.float32)
    outcome["recovered"] = bool(torch.equal(combined.float(), x.float() * hits[:, None]))
    buffer.destroy()
    torch.cuda.synchronize()
    return outcome


def inconsistent_dispatch(pgi: ProcessGroupInfo, row: str) -> dict[str, Any]:
    """Rank 1 dispatches differently (``row``: ``hidden``, ``num_topk``, ``fp8_vs_bf16``,
    ``num_experts``, ``worst_hidden``: another hidden with ``num_worst_tokens``, or ``call_order``:
    rank 1 combines while rank 0 dispatches). Returns what the differing call raised (``message``),
    the first receive rows' top-k ids in ``num_worst_tokens`` mode (``worst_idx_max``), what the next
    call raised (``next_message``), and whether a matching dispatch and combine afterwards summed
    every token once per destination rank (``recovered``)."""
    buffer, x, topk_idx, num_experts = _inconsistent_setup(pgi)
    num_tokens = x.size(0)
    odd = pgi.rank == 1
    outcome: dict[str, Any] = {"message": None, "next_message": None}
    sent: Any = x
    try:
        if row == "call_order":
            recv_x, _, recv_w, _, handle, _ = _nvlink_dispatch(buffer, x, topk_idx, num_experts)
            if odd:
                buffer.combine(recv_x, handle, topk_weights=recv_w)
            else:
                _nvlink_dispatch(buffer, x, topk_idx, num_experts)
        elif row == "worst_hidden":
            if odd:
                sent = torch.cat([x, x], dim=1)
            result = _nvlink_dispatch(buffer, sent, topk_idx, num_experts, num_tokens * pgi.world_size)
            outcome["worst_idx_max"] = int(result[1].max())
        else:
            idx, experts = topk_idx, num_experts
            if odd and row == "hidden":
                sent = torch.cat([x, x], dim=1)
            if odd and row == "num_topk":
                idx = topk_idx[:, :2]
            if odd and row == "fp8_vs_bf16":
                sent = quant.per_token_cast_to_fp8(x)
            if odd and row == "num_experts":
                experts = 2 * num_experts
            _nvlink_dispatch(buffer, sent, idx, experts)
    except epcomm.InconsistentCallError as error:
        outcome["message"] = str(error)
    torch.cuda.synchronize()
    return _next_call_and_recovery(buffer, x, topk_idx, num_experts, outcome)


def inconsistent_push_call(pgi: ProcessGroupInfo, row: str) -> dict[str, Any]:
    """After a matching dispatch, rank 1 makes a cached dispatch or a combine that differs from rank
    0's (``row``: ``cached_hidden``, another hidden; ``cached_vs_combine``, rank 0 cached-dispatches
    while rank 1 combines; ``combine_num_topk``, rank 1 combines without topk_weights;
    ``combine_other_handle``, rank 1 combines with the first of two dispatches' handles). These calls
    have no host synchronization: the push sees the fingerprints differ in its entry barrier, writes
    no row and records them. Returns what the differing call raised (``message``), whether what it
    returned holds no peer's row (``empty``: cached dispatch all zeros, combine all zeros), what the
    next call raised after a device synchronization (``next_message``) and whether a matching
    dispatch and combine afterwards summed every token once per destination rank (``recovered``)."""
    buffer, x, topk_idx, num_experts = _inconsistent_setup(pgi)
    odd = pgi.rank == 1
    outcome: dict[str, Any] = {"message": None, "next_message": None}
    recv_x, _, recv_w, _, handle, _ = _nvlink_dispatch(buffer, x, topk_idx, num_experts)
    returned: torch.Tensor | None = None
    try:
        if row == "cached_hidden":
            sent = torch.cat([x, x], dim=1) if odd else x
            returned = buffer.dispatch(sent, handle=handle)[0]
        elif row == "cached_vs_combine":
            if odd:
                returned = buffer.combine(recv_x, handle, topk_weights=recv_w)[0]
            else:
                returned = buffer.dispatch(x, handle=handle)[0]
        elif row == "combine_num_topk":
            returned = buffer.combine(recv_x, handle, topk_weights=None if odd else recv_w)[0]
        elif row == "combine_other_handle":
            second_x, _, second_w, _, second_handle, _ = _nvlink_dispatch(buffer, x, topk_idx, num_experts)
            if odd:
                returned = buffer.combine(recv_x, handle, topk_weights=recv_w)[0]
            else:
                returned = buffer.combine(second_x, second_handle, topk_weights=second_w)[0]
        else:
            raise ValueError(f"unknown row {row}")
    except epcomm.InconsistentCallError as error:
        outcome["message"] = str(error)
    torch.cuda.synchronize()
    outcome["empty"] = returned is not None and not bool(returned.any())
    return _next_call_and_recovery(buffer, x, topk_idx, num_experts, outcome)
