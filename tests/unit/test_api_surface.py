"""The DeepEP V1 surface real clients rely on (API.md "What real clients rely on").

vLLM, SGLang, Megatron-LM, torchtitan and NeMo switch from ``deep_ep`` by changing the import, so
names, keyword names, defaults, return shapes and a few behaviours must match exactly. Runs in one
process on a single-rank gloo group (the reference backend).
"""

from __future__ import annotations

import ast
import inspect
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import epcomm
import epcomm.utils
from epcomm import Buffer, Config, EventHandle, EventOverlap, topk_idx_t
from epcomm.testing import find_free_port

NUM_TOKENS = 6
HIDDEN = 256
NUM_EXPERTS = 4
NUM_TOPK = 2
LL_CAPACITY = 8

SRC_DIR = Path(epcomm.__file__).resolve().parent
DEEPEP_RANK_COUNTS = [2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160]


# ---- fixtures ------------------------------------------------------------------------------------


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
    return Buffer(group)


@pytest.fixture(scope="module")
def ll_buffer(group: Any) -> Buffer:
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(LL_CAPACITY, HIDDEN, 1, NUM_EXPERTS)
    return Buffer(group, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True)


@pytest.fixture(autouse=True)
def _restore_num_sms() -> Iterator[None]:
    saved = Buffer.num_sms
    yield
    Buffer.num_sms = saved


def _routing() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    topk_idx = torch.rand(NUM_TOKENS, NUM_EXPERTS, generator=generator).topk(NUM_TOPK, dim=1).indices
    topk_idx = topk_idx.to(topk_idx_t)
    topk_idx[0, 1] = -1
    return topk_idx, torch.rand(NUM_TOKENS, NUM_TOPK, generator=generator)


def _x() -> torch.Tensor:
    return torch.randn(NUM_TOKENS, HIDDEN, generator=torch.Generator().manual_seed(3)).bfloat16()


def _dispatch(buffer: Buffer, **kwargs: Any) -> tuple[Any, ...]:
    topk_idx, topk_weights = _routing()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
        buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    )
    return buffer.dispatch(
        _x(),
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        **kwargs,
    )


# ---- module-level names -------------------------------------------------------------------------


def test_imports_deepep_names() -> None:
    namespace: dict[str, object] = {}
    exec("from epcomm import Buffer, Config, EventOverlap, topk_idx_t", namespace)
    assert namespace["Buffer"] is Buffer
    assert namespace["Config"] is Config
    assert namespace["EventOverlap"] is EventOverlap
    assert namespace["topk_idx_t"] is topk_idx_t
    assert epcomm.EventHandle is EventHandle
    assert epcomm.utils.EventOverlap is EventOverlap
    assert epcomm.utils.EventHandle is EventHandle
    assert isinstance(epcomm.__version__, str)


def test_topk_idx_t_is_int64() -> None:
    assert topk_idx_t is torch.int64


_PROBED_NAMES = ("ElasticBuffer", "HybridEPBuffer")


@pytest.mark.parametrize("name", _PROBED_NAMES)
def test_probed_names_absent_from_public_modules(name: str) -> None:
    # Clients do `hasattr(deep_ep, "ElasticBuffer")` to switch code paths.
    assert not hasattr(epcomm, name)
    assert not hasattr(epcomm.utils, name)
    assert name not in getattr(epcomm, "__all__", [])


def _bound_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __all__ entries, setattr(...) names
    return names


@pytest.mark.parametrize("name", _PROBED_NAMES)
def test_probed_names_defined_nowhere_in_package(name: str) -> None:
    offenders = [
        str(path.relative_to(SRC_DIR))
        for path in sorted(SRC_DIR.rglob("*.py"))
        if name in _bound_names(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert offenders == []


def test_event_overlap_wraps_event_handle() -> None:
    handle = EventHandle()
    event = EventOverlap(handle)
    assert event.event is handle
    with event:
        pass
    event.current_stream_wait()
    assert isinstance(Buffer.capture(), EventOverlap)


# ---- Buffer attributes and lifetime ----------------------------------------------------------------


def test_buffer_is_weak_referenceable(buffer: Buffer) -> None:
    ref = weakref.ref(buffer)
    assert ref() is buffer


def test_buffer_attributes(group: Any) -> None:
    buffer = Buffer(group, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 21, low_latency_mode=True)
    assert buffer.group is group
    assert buffer.group_size == 1
    assert buffer.rank == 0
    assert buffer.num_nvl_bytes == 1 << 20
    assert buffer.num_rdma_bytes == 1 << 21
    assert buffer.low_latency_mode is True
    buffer.destroy()


def test_buffer_group_none_means_world(group: Any) -> None:
    buffer = Buffer(None)
    assert buffer.group_size == dist.get_world_size()
    buffer.destroy()


def test_buffer_context_manager(group: Any) -> None:
    topk_idx, _ = _routing()
    with Buffer(group) as buffer:
        assert isinstance(buffer, Buffer)
        buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    with pytest.raises(RuntimeError, match="destroy"):
        buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    buffer.destroy()  # idempotent


def test_explicitly_destroy(group: Any) -> None:
    buffer = Buffer(group, explicitly_destroy=True)
    buffer.destroy()
    with pytest.raises(RuntimeError):
        _dispatch(buffer)


# ---- num_sms and configs ---------------------------------------------------------------------------


def test_num_sms_class_attribute_default_20() -> None:
    assert Buffer.__dict__["num_sms"] == 20
    assert Buffer.num_sms == 20


def test_set_num_sms_mutates_class_attribute(buffer: Buffer) -> None:
    Buffer.set_num_sms(24)
    assert Buffer.num_sms == 24
    assert buffer.num_sms == 24
    assert Buffer.get_dispatch_config(8).num_sms == 24
    assert Buffer.get_combine_config(8).num_sms == 24
    Buffer.num_sms = 32  # clients also assign the attribute directly
    assert Buffer.get_dispatch_config(2).num_sms == 32


@pytest.mark.parametrize("num_ranks", [*DEEPEP_RANK_COUNTS, 1, 6, 12, 200])
@pytest.mark.parametrize("getter", ["get_dispatch_config", "get_combine_config"])
def test_default_configs_cover_every_rank_count(getter: str, num_ranks: int) -> None:
    config = getattr(Buffer, getter)(num_ranks)
    assert isinstance(config, Config)
    assert config.num_sms == Buffer.num_sms
    assert config.num_max_nvl_chunked_send_tokens < config.num_max_nvl_chunked_recv_tokens
    assert config.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks) > 0


def test_config_positional_and_keyword() -> None:
    positional = Config(24, 6, 256, 6, 128)
    keyword = Config(
        num_sms=24,
        num_max_nvl_chunked_send_tokens=6,
        num_max_nvl_chunked_recv_tokens=256,
        num_max_rdma_chunked_send_tokens=6,
        num_max_rdma_chunked_recv_tokens=128,
    )
    assert positional == keyword
    assert (
        keyword.num_sms,
        keyword.num_max_nvl_chunked_send_tokens,
        keyword.num_max_nvl_chunked_recv_tokens,
        keyword.num_max_rdma_chunked_send_tokens,
        keyword.num_max_rdma_chunked_recv_tokens,
    ) == (24, 6, 256, 6, 128)


@pytest.mark.parametrize("num_ranks", [1, 2, 8, 16, 32, 64, 160])
@pytest.mark.parametrize("hidden_bytes", [7168 * 2, 4096, 7168 + 7168 // 128 * 4])
def test_config_size_hints(num_ranks: int, hidden_bytes: int) -> None:
    config = Buffer.get_dispatch_config(max(num_ranks, 2))
    nvl = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
    rdma = config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks)
    assert isinstance(nvl, int)
    assert isinstance(rdma, int)
    assert nvl > 0
    assert nvl % 128 == 0
    assert rdma % 128 == 0
    if num_ranks <= 8:
        assert rdma == 0
    else:
        assert rdma > 0


# ---- signatures ---------------------------------------------------------------------------------

_REQUIRED = inspect.Parameter.empty

# API.md, exactly: (name, default) in order. Extra trailing keywords are allowed with a default.
DEEPEP_SIGNATURES: dict[str, list[tuple[str, Any]]] = {
    "__init__": [
        ("group", _REQUIRED),
        ("num_nvl_bytes", 0),
        ("num_rdma_bytes", 0),
        ("low_latency_mode", False),
        ("num_qps_per_rank", 24),
        ("allow_nvlink_for_low_latency_mode", True),
        ("allow_mnnvl", False),
        ("use_fabric", False),
        ("explicitly_destroy", False),
        ("enable_shrink", False),
        ("comm", None),
    ],
    "get_dispatch_layout": [
        ("topk_idx", _REQUIRED),
        ("num_experts", _REQUIRED),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "dispatch": [
        ("x", _REQUIRED),
        ("handle", None),
        ("num_tokens_per_rank", None),
        ("num_tokens_per_rdma_rank", None),
        ("is_token_in_rank", None),
        ("num_tokens_per_expert", None),
        ("topk_idx", None),
        ("topk_weights", None),
        ("expert_alignment", 1),
        ("num_worst_tokens", 0),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "combine": [
        ("x", _REQUIRED),
        ("handle", _REQUIRED),
        ("topk_weights", None),
        ("bias", None),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "low_latency_dispatch": [
        ("x", _REQUIRED),
        ("topk_idx", _REQUIRED),
        ("num_max_dispatch_tokens_per_rank", _REQUIRED),
        ("num_experts", _REQUIRED),
        ("cumulative_local_expert_recv_stats", None),
        ("dispatch_wait_recv_cost_stats", None),
        ("use_fp8", True),
        ("round_scale", False),
        ("use_ue8m0", False),
        ("async_finish", False),
        ("return_recv_hook", False),
    ],
    "low_latency_combine": [
        ("x", _REQUIRED),
        ("topk_idx", _REQUIRED),
        ("topk_weights", _REQUIRED),
        ("handle", _REQUIRED),
        ("use_logfmt", False),
        ("zero_copy", False),
        ("async_finish", False),
        ("return_recv_hook", False),
        ("out", None),
        ("combine_wait_recv_cost_stats", None),
    ],
    "get_local_buffer_tensor": [
        ("dtype", _REQUIRED),
        ("size", None),
        ("offset", 0),
        ("use_rdma_buffer", False),
    ],
    "clean_low_latency_buffer": [
        ("num_max_dispatch_tokens_per_rank", _REQUIRED),
        ("hidden", _REQUIRED),
        ("num_experts", _REQUIRED),
    ],
    "get_next_low_latency_combine_buffer": [("handle", _REQUIRED)],
    "low_latency_update_mask_buffer": [("rank_to_mask", _REQUIRED), ("mask", False)],
    "low_latency_query_mask_buffer": [("mask_status", _REQUIRED)],
    "low_latency_clean_mask_buffer": [],
    "destroy": [],
    "get_comm_stream": [],
}

DEEPEP_STATIC_SIGNATURES: dict[str, list[tuple[str, Any]]] = {
    "set_num_sms": [("new_num_sms", _REQUIRED)],
    "capture": [],
    "get_dispatch_config": [("num_ranks", _REQUIRED)],
    "get_combine_config": [("num_ranks", _REQUIRED)],
    "get_low_latency_rdma_size_hint": [
        ("num_max_dispatch_tokens_per_rank", _REQUIRED),
        ("hidden", _REQUIRED),
        ("num_ranks", _REQUIRED),
        ("num_experts", _REQUIRED),
    ],
    "is_sm90_compiled": [],
}


def _same_default(actual: Any, expected: Any) -> bool:
    if expected is _REQUIRED:
        return actual is _REQUIRED
    return type(actual) is type(expected) and actual == expected


def _check_signature(parameters: list[inspect.Parameter], expected: list[tuple[str, Any]]) -> None:
    got = [(p.name, p.default) for p in parameters]
    assert [name for name, _ in got[: len(expected)]] == [name for name, _ in expected], got
    for parameter, (name, default) in zip(parameters, expected):
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        assert _same_default(parameter.default, default), (
            f"{name}: default {parameter.default!r}, DeepEP has {default!r}"
        )
    for extra in parameters[len(expected) :]:
        assert extra.default is not _REQUIRED, f"extra parameter {extra.name} needs a default"


@pytest.mark.parametrize("method", list(DEEPEP_SIGNATURES))
def test_method_signature_matches_deepep(method: str) -> None:
    parameters = list(inspect.signature(getattr(Buffer, method)).parameters.values())
    assert parameters[0].name == "self"
    _check_signature(parameters[1:], DEEPEP_SIGNATURES[method])


@pytest.mark.parametrize("method", list(DEEPEP_STATIC_SIGNATURES))
def test_static_method_signature_matches_deepep(method: str) -> None:
    assert isinstance(inspect.getattr_static(Buffer, method), staticmethod)
    parameters = list(inspect.signature(getattr(Buffer, method)).parameters.values())
    _check_signature(parameters, DEEPEP_STATIC_SIGNATURES[method])


def test_config_signature_matches_deepep() -> None:
    names = list(inspect.signature(Config).parameters)
    assert names == [
        "num_sms",
        "num_max_nvl_chunked_send_tokens",
        "num_max_nvl_chunked_recv_tokens",
        "num_max_rdma_chunked_send_tokens",
        "num_max_rdma_chunked_recv_tokens",
    ]


def test_event_constructors_take_deepep_arguments() -> None:
    assert list(inspect.signature(EventHandle).parameters) == []
    assert list(inspect.signature(EventOverlap).parameters)[:2] == ["event", "extra_tensors"]


# ---- return conventions ----------------------------------------------------------------------------


def test_get_dispatch_layout_returns(buffer: Buffer) -> None:
    topk_idx, _ = _routing()
    result = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    assert len(result) == 5
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = result
    assert (num_tokens_per_rank.dtype, list(num_tokens_per_rank.shape)) == (torch.int32, [1])
    assert num_tokens_per_rdma_rank is None
    assert (num_tokens_per_expert.dtype, list(num_tokens_per_expert.shape)) == (torch.int32, [NUM_EXPERTS])
    assert (is_token_in_rank.dtype, list(is_token_in_rank.shape)) == (torch.bool, [NUM_TOKENS, 1])
    assert isinstance(event, EventOverlap)
    assert event.event is None


def test_dispatch_and_combine_returns(buffer: Buffer) -> None:
    result = _dispatch(buffer)
    assert len(result) == 6
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = result
    num_recv = recv_x.size(0)
    assert (recv_x.dtype, list(recv_x.shape)) == (torch.bfloat16, [num_recv, HIDDEN])
    assert (recv_topk_idx.dtype, list(recv_topk_idx.shape)) == (topk_idx_t, [num_recv, NUM_TOPK])
    assert (recv_topk_weights.dtype, list(recv_topk_weights.shape)) == (torch.float32, [num_recv, NUM_TOPK])
    assert isinstance(num_recv_tokens_per_expert_list, list)
    assert len(num_recv_tokens_per_expert_list) == NUM_EXPERTS
    assert isinstance(handle, tuple)
    rank_prefix_matrix = handle[0]
    assert (rank_prefix_matrix.dtype, list(rank_prefix_matrix.shape)) == (torch.int32, [1, 1])
    assert int(rank_prefix_matrix[0, 0]) == num_recv
    assert event.event is None

    combined = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights)
    assert len(combined) == 3
    combined_x, combined_topk_weights, combine_event = combined
    assert (combined_x.dtype, list(combined_x.shape)) == (torch.bfloat16, [NUM_TOKENS, HIDDEN])
    assert combined_topk_weights is not None
    assert combined_topk_weights.dtype == torch.float32
    assert combine_event.event is None
    assert buffer.combine(recv_x, handle)[1] is None


def test_handle_works_as_a_plain_tuple(buffer: Buffer) -> None:
    recv_x, _, _, _, handle, _ = _dispatch(buffer)
    expected, _, _ = buffer.combine(recv_x, handle)
    combined_x, _, _ = buffer.combine(recv_x, tuple(handle))
    assert torch.equal(combined_x, expected)


def test_cached_dispatch_returns_nones(buffer: Buffer) -> None:
    recv_x, _, _, _, handle, _ = _dispatch(buffer)
    result = buffer.dispatch(_x(), handle=handle)
    assert len(result) == 6
    assert torch.equal(result[0], recv_x)
    assert result[1:5] == (None, None, None, None)
    assert isinstance(result[5], EventOverlap)
    assert result[5].event is None


def test_num_worst_tokens_gives_empty_list(buffer: Buffer) -> None:
    recv_x, recv_topk_idx, _, num_recv_tokens_per_expert_list, _, _ = _dispatch(buffer, num_worst_tokens=32)
    assert recv_x.size(0) == 32
    assert num_recv_tokens_per_expert_list == []
    # Every token has an expert (slot 0 is never -1) and all experts are local on one rank.
    assert bool((recv_topk_idx[:NUM_TOKENS] >= 0).any(dim=1).all())
    assert bool((recv_topk_idx[NUM_TOKENS:] == -1).all())


def test_low_latency_returns_and_noop_hook(ll_buffer: Buffer) -> None:
    topk_idx, topk_weights = _routing()
    result = ll_buffer.low_latency_dispatch(_x(), topk_idx, LL_CAPACITY, NUM_EXPERTS, use_fp8=False)
    assert len(result) == 5
    recv_x, recv_count, handle, event, hook = result
    assert (recv_x.dtype, list(recv_x.shape)) == (torch.bfloat16, [NUM_EXPERTS, LL_CAPACITY, HIDDEN])
    assert (recv_count.dtype, list(recv_count.shape)) == (torch.int32, [NUM_EXPERTS])
    assert event.event is None
    assert hook is None or callable(hook)
    if hook is not None:
        hook()
    combined = ll_buffer.low_latency_combine(recv_x, topk_idx, topk_weights, handle)
    assert len(combined) == 3
    combined_x, combine_event, combine_hook = combined
    assert (combined_x.dtype, list(combined_x.shape)) == (torch.bfloat16, [NUM_TOKENS, HIDDEN])
    assert combine_event.event is None
    assert combine_hook is None or callable(combine_hook)
    if combine_hook is not None:
        combine_hook()


def test_low_latency_fp8_returns(ll_buffer: Buffer) -> None:
    topk_idx, _ = _routing()
    (x_fp8, scales), _, _, _, _ = ll_buffer.low_latency_dispatch(_x(), topk_idx, LL_CAPACITY, NUM_EXPERTS)
    assert (x_fp8.dtype, list(x_fp8.shape)) == (torch.float8_e4m3fn, [NUM_EXPERTS, LL_CAPACITY, HIDDEN])
    assert (scales.dtype, list(scales.shape)) == (torch.float32, [NUM_EXPERTS, LL_CAPACITY, HIDDEN // 128])
    # Column-major in the last two dims, as DeepEP returns them.
    assert scales.stride()[-2:] == (1, LL_CAPACITY)


def test_async_finish_event_can_be_waited_on_cpu(buffer: Buffer) -> None:
    topk_idx, _ = _routing()
    *_, event = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS, async_finish=True)
    event.current_stream_wait()
    *_, event = _dispatch(buffer, async_finish=True)
    event.current_stream_wait()


def test_previous_event_is_read_with_getattr(buffer: Buffer) -> None:
    class Foreign:  # any object with an `event` attribute, as DeepEP reads getattr(previous_event, "event")
        event = None

    topk_idx, _ = _routing()
    buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS, previous_event=Foreign())
    buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS, previous_event=Buffer.capture())


# ---- static helpers --------------------------------------------------------------------------------


def test_is_sm90_compiled_returns_bool() -> None:
    assert isinstance(Buffer.is_sm90_compiled(), bool)


_LL_HINT_BASE = {"num_max_dispatch_tokens_per_rank": 128, "hidden": 7168, "num_ranks": 16, "num_experts": 256}


@pytest.mark.parametrize("argument", list(_LL_HINT_BASE))
def test_low_latency_rdma_size_hint_positive_and_monotone(argument: str) -> None:
    sizes = []
    for factor in (1, 2, 4):
        kwargs = dict(_LL_HINT_BASE)
        kwargs[argument] *= factor
        size = Buffer.get_low_latency_rdma_size_hint(**kwargs)
        assert isinstance(size, int)
        assert size > 0
        sizes.append(size)
    assert sizes == sorted(sizes), f"not monotone in {argument}: {sizes}"
    # The buffer holds one message per (source rank, token) and one combine row per (token, top-k
    # slot): it grows with everything but the expert count (which only caps the top-k slots).
    if argument != "num_experts":
        assert sizes[0] < sizes[1] < sizes[2], f"does not grow with {argument}: {sizes}"


def test_low_latency_rdma_size_hint_is_enough_for_a_buffer(group: Any) -> None:
    size = Buffer.get_low_latency_rdma_size_hint(LL_CAPACITY, HIDDEN, 1, NUM_EXPERTS)
    buffer = Buffer(group, num_rdma_bytes=size, low_latency_mode=True)
    topk_idx, _ = _routing()
    buffer.low_latency_dispatch(_x(), topk_idx, LL_CAPACITY, NUM_EXPERTS)
    buffer.destroy()
