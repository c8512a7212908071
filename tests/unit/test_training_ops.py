"""The custom ops of ``epcomm.autograd`` and ``epcomm.ops`` in one process (a one-rank gloo group):
``torch.library.opcheck``, argument errors, the Buffer registry."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

import epcomm
from epcomm import Buffer, _normal_ops
from epcomm import autograd as ep
from epcomm._registry import lookup_buffer
from epcomm.handles import TensorHandle
from epcomm.testing import find_free_port

NUM_TOKENS, HIDDEN, NUM_EXPERTS, NUM_TOPK = 5, 16, 4, 2


@pytest.fixture(scope="module")
def group() -> Iterator[Any]:
    """A one-rank gloo group in this process (reused if some group is already initialized)."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1
        )
    if dist.get_world_size() != 1:
        pytest.skip("an already-initialized process group has more than one rank")
    yield dist.group.WORLD
    if owned:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def buffer(group: Any) -> Buffer:
    return Buffer(group, backend="reference")


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(dtype).requires_grad_()
    idx = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1], [1, 2]])
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen, dtype=w_dtype).requires_grad_()
    return x, idx, w


# test_aot_dispatch_dynamic compares two runs of the op: dispatch's handle holds its call number
# (TensorHandle.meta[1]), which differs between any two calls by design. The compiled path is
# checked end to end in the multi-process tier (tests/dist_cpu/test_moe.py).
DISPATCH_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize(
    ("dtype", "num_worst_tokens"), [(torch.bfloat16, 0), (torch.float32, 12), (torch.float64, 0)]
)
def test_opcheck(buffer: Buffer, dtype: torch.dtype, num_worst_tokens: int) -> None:
    x, idx, w = _inputs(dtype)
    args = (x, idx, w, buffer.op_id, NUM_EXPERTS, False, 1, num_worst_tokens, [])
    torch.library.opcheck(_normal_ops.dispatch_op, args, test_utils=DISPATCH_OPCHECKS)
    outputs = _normal_ops.dispatch_op(*args)
    handle = outputs[4:]
    rows = outputs[0].detach().requires_grad_()
    torch.library.opcheck(_normal_ops.combine_op, ([rows], *handle, buffer.op_id, []))
    weights = outputs[2].detach().requires_grad_()
    torch.library.opcheck(
        _normal_ops.combine_op, ([rows, weights], *handle, buffer.op_id, [20, 6, 256, 6, 128])
    )
    grads = torch.randn(NUM_TOKENS, HIDDEN).to(dtype).requires_grad_()
    torch.library.opcheck(_normal_ops.cached_dispatch_op, ([grads], *handle, buffer.op_id, []))


def test_outputs_and_gradients_one_rank(buffer: Buffer) -> None:
    """One rank: combine(dispatch(x)) sums each token's copies (one per rank: here one), so the
    result is x; gradients flow to x and the weights."""
    x, idx, w = _inputs(torch.float64)
    out = ep.dispatch(buffer, x, idx, w, NUM_EXPERTS)
    assert isinstance(out.handle, TensorHandle)
    assert out.recv_x.grad_fn is not None
    assert out.num_recv_tokens_per_expert.tolist() == [2, 2, 2, 1]
    assert out.event.event is None
    combined = ep.combine(buffer, out.recv_x * out.recv_topk_weights.sum(1, keepdim=True), out.handle)
    assert combined.combined_topk_weights is None
    combined.combined_x.sum().backward()
    assert x.grad is not None
    assert w.grad is not None
    sent = (idx >= 0).any(dim=1)
    assert torch.equal(x.grad[~sent], torch.zeros_like(x.grad[~sent]))
    assert torch.equal(w.grad[idx < 0], torch.zeros_like(w.grad[idx < 0]))


def test_combine_takes_the_buffers_own_handle(buffer: Buffer) -> None:
    """A ``DispatchHandle`` from ``Buffer.dispatch`` works too (converted to a ``TensorHandle``)."""
    x, idx, _ = _inputs(torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, NUM_EXPERTS)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x.detach(),
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
    )
    assert isinstance(recv_x, torch.Tensor)
    assert handle is not None
    rows = recv_x.clone().requires_grad_()
    combined = ep.combine(buffer, rows, handle).combined_x
    assert torch.equal(combined, buffer.combine(recv_x, handle)[0])
    combined.sum().backward()
    assert rows.grad is not None


def test_argument_errors(buffer: Buffer) -> None:
    x, idx, w = _inputs(torch.float32)
    with pytest.raises(TypeError, match="x must have dtype"):
        ep.dispatch(buffer, x.half(), idx, w, NUM_EXPERTS)
    with pytest.raises(TypeError, match=r"use_fp8=True needs x of dtype torch\.bfloat16"):
        ep.dispatch(buffer, x, idx, w, NUM_EXPERTS, use_fp8=True)
    with pytest.raises(TypeError, match="topk_weights"):
        ep.dispatch(buffer, x.bfloat16(), idx, w.double(), NUM_EXPERTS)
    with pytest.raises(TypeError, match=r"buffer must be an epcomm\.Buffer"):
        ep.dispatch(object(), x, idx, w, NUM_EXPERTS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="handle must be the handle"):
        ep.combine(buffer, x, (1, 2))  # type: ignore[arg-type]


def test_registry_forgets_dropped_buffers(group: Any) -> None:
    dropped = Buffer(group, backend="reference")
    op_id = dropped.op_id
    assert lookup_buffer(op_id) is dropped
    del dropped
    gc.collect()
    with pytest.raises(RuntimeError, match=f"op_id={op_id}"):
        lookup_buffer(op_id)


def test_submodules_reachable_from_package() -> None:
    assert epcomm.autograd.dispatch is ep.dispatch
    assert epcomm.moe.MoELayer.__name__ == "MoELayer"
    assert callable(epcomm.ops.low_latency_dispatch)
