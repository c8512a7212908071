"""``Buffer``: the DeepEP V1-compatible facade. Validates arguments, picks the backend, runs it on
the right stream and packs results into DeepEP's tuples. It launches no kernel itself.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from epcomm import env, validation
from epcomm._logging import set_log_level
from epcomm._registry import register_buffer
from epcomm.backends import create_backend
from epcomm.backends.base import (
    Backend,
    CombineRequest,
    DispatchRequest,
)
from epcomm.backends.nvlink.symmetric_buffer import low_latency_rdma_size_hint
from epcomm.backends.p2p import PeerGroup
from epcomm.buffer_low_latency import LowLatencyMethods
from epcomm.config import Config, combine_config_preset, dispatch_config_preset
from epcomm.event import EventHandle, EventOverlap, comm_stream_scope
from epcomm.fingerprint import CallFingerprint
from epcomm.handles import DispatchHandle, InternodeHandle, NormalHandle, as_handle
from epcomm.topology import detect_topology, is_multi_node
from epcomm.traffic import CallBytes
from epcomm.validation import check_dtype, check_int, check_same_device, check_shape, check_tensor

__all__ = ["Buffer"]

DispatchOutput = tuple[
    torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    torch.Tensor | None,
    torch.Tensor | None,
    list[int] | None,
    NormalHandle | None,
    EventOverlap,
]


def _rendezvous(group: Any, timeout_s: float) -> None:
    """Every rank of a gloo group says it is in ``Buffer()``, with a bounded wait: a rank that never
    builds its ``Buffer`` makes the others raise ``PeerTimeoutError`` naming it, instead of hanging
    in the collectives that follow. NCCL groups skip it (their first point-to-point message would
    set up extra communicators; the NCCL collectives that follow are bounded by NCCL's own timeout)."""
    backend = str(dist.get_backend(group)).lower()
    num_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_ranks == 1 or "gloo" not in backend:
        return
    hello = torch.tensor([rank], dtype=torch.int64, device="cpu")
    replies = {
        peer: torch.empty(1, dtype=torch.int64, device="cpu") for peer in range(num_ranks) if peer != rank
    }
    PeerGroup(group, timeout_s).post("Buffer() (rendezvous)", dict.fromkeys(replies, hello), replies).wait()


class Buffer(LowLatencyMethods):
    """The communication buffer of one process group (DeepEP's ``deep_ep.Buffer``).

    Arguments:
        group: the ``torch.distributed`` process group (NCCL or gloo; with GPU data a gloo group
            works too, as vLLM uses it).
        num_nvl_bytes: bytes for intranode normal-mode buffers (DeepEP's meaning).
        num_rdma_bytes: bytes for internode / low-latency buffers; in low-latency mode it must be
            at least ``get_low_latency_rdma_size_hint(...)``. ``> 0`` with a group of several
            nodes selects multi-node mode (``epcomm.topology``): ``get_dispatch_layout`` counts
            tokens per node, ``dispatch`` takes them and returns DeepEP's internode 10-tuple handle
            (``epcomm.handles.InternodeHandle``), combine reduces per node as DeepEP does.
        low_latency_mode: enable the low-latency calls.
        allow_nvlink_for_low_latency_mode: with ``backend="nvshmem"`` in multi-node mode, ``False``
            sends every low-latency message through NVSHMEM puts, to the ranks of this node too
            (DeepEP's meaning); other backends accept it for compatibility.
        num_qps_per_rank, allow_mnnvl, use_fabric, comm: DeepEP's RDMA options; accepted for
            compatibility.
        explicitly_destroy: resources are released only by ``destroy()``.
        enable_shrink: shrink mode (elastic serving): the rank mask (``low_latency_update_mask_buffer``,
            ``low_latency_query_mask_buffer``, ``low_latency_clean_mask_buffer``), and low-latency
            waits (dispatch, combine, the barrier of ``clean_low_latency_buffer``) that give a peer
            ``EPCOMM_SHRINK_TIMEOUT_S``, then mask it with an ``epcomm.errors.PeerMaskedWarning``
            and finish the call without it instead of raising ``PeerTimeoutError`` (README,
            "Shrink mode").
        backend: ``"auto"`` (default: ``settings.backend``, else picked from the devices),
            ``"reference"``, ``"nvlink"`` or ``"nvshmem"`` (extra keyword, not in DeepEP).
        settings: every ``EPCOMM_*`` option (extra keyword, not in DeepEP); default: read from the
            environment now (``epcomm.env.read_settings``).

    Attributes:
        rank, group_size, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, backend_name,
        settings; num_ranks_per_node, num_nodes (nodes are blocks of consecutive ranks,
        ``epcomm.topology``) and is_multi_node; ``op_id``: this buffer's id in the
        ``torch.library`` custom ops (``epcomm.autograd``, ``epcomm.ops``), unique in the process.

    Raises:
        ValueError: ``EPCOMM_RANKS_PER_NODE`` does not divide the group size, or the ranks do not
            agree on their nodes (see ``epcomm.topology.detect_topology``).
    """

    num_sms: ClassVar[int] = 20

    def __init__(
        self,
        group: Any,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
        backend: str | None = None,
        settings: env.Settings | None = None,
    ) -> None:
        if group is None:
            if not dist.is_initialized():
                raise ValueError("group: torch.distributed is not initialized; call init_process_group first")
            group = dist.group.WORLD
        check_int("num_nvl_bytes", num_nvl_bytes, 0)
        check_int("num_rdma_bytes", num_rdma_bytes, 0)
        self.group = group
        self.rank: int = dist.get_rank(group)
        self.group_size: int = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        if settings is not None and not isinstance(settings, env.Settings):
            raise TypeError(f"settings must be an epcomm.env.Settings or None; got {type(settings).__name__}")
        self.settings: env.Settings = settings if settings is not None else env.read_settings()
        set_log_level(self.settings.log_level)
        choice = self._check_backend(backend) if backend is not None else self.settings.backend
        _rendezvous(group, self.settings.timeout_s)
        topology = detect_topology(
            group, self.settings.ranks_per_node, self.settings.local_world_size, num_rdma_bytes
        )
        self.num_ranks_per_node: int = topology.num_ranks_per_node
        self.num_nodes: int = topology.num_nodes
        self.is_multi_node: bool = is_multi_node(self.group_size, self.num_ranks_per_node, num_rdma_bytes)
        self._backend: Backend | None = create_backend(
            choice,
            group,
            self.settings,
            self.num_ranks_per_node,
            enable_shrink,
            num_nvl_bytes,
            low_latency_mode,
            num_rdma_bytes,
            allow_nvlink_for_low_latency_mode=bool(allow_nvlink_for_low_latency_mode),
        )
        self.backend_name: str = self._backend.name
        self._comm_stream: torch.cuda.Stream | None = None
        self._local_buffers: dict[bool, torch.Tensor] = {}
        self.op_id: int = register_buffer(self)

    @staticmethod
    def _check_backend(backend: Any) -> env.BackendChoice:
        choices = ", ".join(repr(c.value) for c in env.BackendChoice)
        if not isinstance(backend, str):
            raise TypeError(
                f"backend must be a str ({choices}) or None; got {type(backend).__name__} {backend!r}"
            )
        try:
            return env.BackendChoice(backend.lower())
        except ValueError:
            raise ValueError(f"backend must be one of {choices}; got {backend!r}") from None

    # ---- lifetime -----------------------------------------------------------------------------
    def destroy(self) -> None:
        """Release every resource; the buffer cannot be used afterwards."""
        if self._backend is not None:
            self._backend.destroy()
            self._backend = None
            self._local_buffers.clear()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.destroy()

    @property
    def backend(self) -> Backend:
        """The live backend (raises once ``destroy()`` was called)."""
        if self._backend is None:
            raise RuntimeError("Buffer: used after destroy()")
        return self._backend

    # ---- static helpers -----------------------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs the normal-mode kernels use (class-wide, even, as DeepEP)."""
        check_int("new_num_sms", new_num_sms, 2)
        if new_num_sms % 2 != 0:
            raise ValueError(f"new_num_sms must be even; got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An ``EventOverlap`` recorded on the current stream now."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The default dispatch ``Config`` for ``num_ranks`` (uses the current ``Buffer.num_sms``)."""
        return dispatch_config_preset(Buffer.num_sms, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The default combine ``Config`` for ``num_ranks`` (uses the current ``Buffer.num_sms``)."""
        return combine_config_preset(Buffer.num_sms, num_ranks)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int,
        hidden: int,
        num_ranks: int,
        num_experts: int,
        across_nodes: bool = False,
    ) -> int:
        """Bytes of ``num_rdma_bytes`` the low-latency mode needs for these sizes (an int, a multiple
        of 128); ``across_nodes``: for ``backend="nvshmem"`` in multi-node mode, whose put path needs
        more (with less, its buffer grows at the first call of each size, a collective)."""
        return low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, across_nodes
        )

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether the SM90 (Hopper) kernels can be built here: true when Triton is importable."""
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        """The communication stream (``None`` without CUDA)."""
        if self._comm_stream is None and torch.cuda.is_available():
            self._comm_stream = torch.cuda.Stream()
        return self._comm_stream

    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: torch.Size | None = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """A view of this rank's NVLink (or RDMA) buffer bytes as ``dtype``.

        Arguments:
            dtype: element type of the view.
            size: shape of the view (default: all elements after ``offset``).
            offset: byte offset into the buffer.
            use_rdma_buffer: view the RDMA buffer instead of the NVLink one.

        Returns:
            Tensor of ``size`` and ``dtype`` on the current device.
        """
        check_int("offset", offset, 0)
        num_bytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if use_rdma_buffer not in self._local_buffers:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
            self._local_buffers[use_rdma_buffer] = torch.zeros(num_bytes, dtype=torch.uint8, device=device)
        raw = self._local_buffers[use_rdma_buffer][offset:]
        count = raw.numel() // dtype.itemsize
        view = raw[: count * dtype.itemsize].view(dtype)
        if size is None:
            return view
        numel = 1
        for dim in size:
            numel *= dim
        if numel > count:
            raise ValueError(
                f"size {list(size)} needs {numel * dtype.itemsize} bytes; the buffer has {raw.numel()}"
            )
        return view[:numel].view(size)

    def _stream_for(self, tensor: torch.Tensor) -> torch.cuda.Stream | None:
        return self.get_comm_stream() if tensor.is_cuda else None

    # ---- normal mode --------------------------------------------------------------------------
    def _check_events(self, previous_event: Any, async_finish: bool, allocate_on_comm_stream: bool) -> None:
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError(
                "allocate_on_comm_stream=True requires previous_event and async_finish=True; got "
                f"previous_event={previous_event!r}, async_finish={async_finish}"
            )

    def _normal_handle(self, handle: Any) -> NormalHandle:
        """``handle`` as this buffer's kind of normal-mode handle (multi-node: ``InternodeHandle``)."""
        if self.is_multi_node:
            return as_handle(handle, InternodeHandle, "a multi-node dispatch")
        return as_handle(handle, DispatchHandle, "a dispatch")

    def _check_tokens_per_node(
        self, num_tokens_per_rdma_rank: Any, device: torch.device
    ) -> torch.Tensor | None:
        """Multi-node mode: ``num_tokens_per_rdma_rank`` checked (required); else ignored."""
        if not self.is_multi_node:
            return None
        if num_tokens_per_rdma_rank is None:
            raise ValueError(
                "dispatch: num_tokens_per_rdma_rank is required in multi-node mode (use get_dispatch_layout)"
            )
        per_node = check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank)
        check_dtype("num_tokens_per_rdma_rank", per_node, torch.int32)
        check_shape("num_tokens_per_rdma_rank", per_node, [self.num_nodes])
        check_same_device("num_tokens_per_rdma_rank", per_node, device, "x")
        return per_node

    def last_call_bytes(self) -> CallBytes | None:
        """Bytes this rank sent in the last normal-mode call, under DeepEP's hierarchical scheme
        and under a flat all-to-all (``epcomm.traffic``; extra method, not in DeepEP).

        Returns:
            ``CallBytes`` (operation, row bytes, bytes across nodes and within the node under each
            scheme), or ``None`` before the first normal-mode call and when the group spans nodes
            outside multi-node mode.

        Raises:
            NotImplementedError: the backend does not count bytes (only the reference backend does).
        """
        counter = getattr(self.backend, "last_call_bytes", None)
        if counter is None:
            raise NotImplementedError(f"the {self.backend_name} backend does not count bytes")
        result: CallBytes | None = counter()
        return result

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Count where each token goes.

        Arguments:
            topk_idx: ``[num_tokens, num_topk]`` int64 (``epcomm.topk_idx_t``), ``-1`` = no expert.
            num_experts: total experts, a multiple of the group size.
            previous_event, async_finish, allocate_on_comm_stream: as in ``dispatch``.

        Returns:
            ``num_tokens_per_rank [num_ranks]`` int32, ``num_tokens_per_rdma_rank [num_nodes]``
            int32 (``None`` within one node), ``num_tokens_per_expert [num_experts]`` int32,
            ``is_token_in_rank [num_tokens, num_ranks]`` bool, and the event.

        It computes on this rank alone (no message), so it carries no call fingerprint and takes no
        call number (see ``dispatch``).
        """
        validation.check_num_experts("num_experts", num_experts, self.group_size)
        idx, _ = validation.check_topk(topk_idx, None, None, None)
        self._check_events(previous_event, async_finish, allocate_on_comm_stream)
        if validation.should_check_values(idx, self.settings.check_values):
            validation.check_expert_ids("topk_idx", idx, num_experts)
        backend = self.backend
        with comm_stream_scope(self._stream_for(idx), previous_event, [idx]) as scope:
            layout = backend.get_dispatch_layout(idx, num_experts)
            event = scope.finish(
                tuple(t for t in layout if t is not None), async_finish, allocate_on_comm_stream
            )
        return (*layout, event)

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: NormalHandle | tuple[Any, ...] | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> DispatchOutput:
        """Send each token once to every rank that holds one of its experts.

        Arguments:
            x: ``[num_tokens, hidden]`` bf16, or ``(x_fp8 [num_tokens, hidden] float8_e4m3fn,
                x_scales [num_tokens, num_scales] float32 or int32 (packed UE8M0), any strides)``.
            handle: an earlier dispatch's handle: cached mode (no layout or top-k arguments).
            num_tokens_per_rank: ``[num_ranks]`` int32 from ``get_dispatch_layout``.
            num_tokens_per_rdma_rank: ``[num_nodes]`` int32 from ``get_dispatch_layout``: required
                in multi-node mode, unused otherwise.
            is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
            num_tokens_per_expert: ``[num_experts]`` int32.
            topk_idx: ``[num_tokens, num_topk]`` int64 or ``None``.
            topk_weights: ``[num_tokens, num_topk]`` float32 or ``None``.
            expert_alignment: round each per-expert receive count up to this.
            num_worst_tokens: ``> 0``: receive exactly this many rows with no CPU synchronization
                (rows past the real count have ``recv_topk_idx == -1``).
            config: performance knobs (default ``get_dispatch_config(group_size)``).
            previous_event: wait for this event instead of the current stream.
            async_finish: return an event instead of ordering the current stream after the work.
            allocate_on_comm_stream: allocate outputs on the communication stream.

        Returns:
            ``recv_x`` (same form as ``x``; rows ordered by source rank, then source token),
            ``recv_topk_idx [num_recv_tokens, num_topk]`` int64 (local expert ids, ``-1``
            elsewhere), ``recv_topk_weights`` float32 (``0.0`` where not local),
            ``num_recv_tokens_per_expert_list`` (``list[int]`` of ``num_local_experts``, empty with
            ``num_worst_tokens``), ``handle`` and the event. Cached mode returns
            ``(recv_x, None, None, None, None, event)``. The handle is a ``DispatchHandle``
            (element 0 ``rank_prefix_matrix``), or in multi-node mode DeepEP's internode 10-tuple
            (``InternodeHandle``; ``handle[-4]`` = ``recv_gbl_rank_prefix_sum [num_ranks]`` int32).
            Multi-node mode also takes ``num_worst_tokens`` (DeepEP V1 does not).

        Raises:
            epcomm.InconsistentCallError: (a ``ValueError``) another rank made a different call:
                another operation (e.g. combine, or cached dispatch against a fresh one), another
                call number, another ``hidden``, FP8 against BF16 or another scale format, another
                ``num_experts`` or ``num_topk``, or (cached) another dispatch's handle. Every normal-mode
                call sends a fingerprint of these (``epcomm.fingerprint``) in its first message and
                compares the peers' before any payload moves.
        """
        data, scales = validation.split_x(x)
        num_tokens, device = data.size(0), data.device
        check_int("expert_alignment", expert_alignment, 1)
        check_int("num_worst_tokens", num_worst_tokens, 0)
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config must be an epcomm.Config or None; got {type(config).__name__}")
        self._check_events(previous_event, async_finish, allocate_on_comm_stream)
        config = config or self.get_dispatch_config(self.group_size)
        if handle is not None:
            cached = self._normal_handle(handle)
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("dispatch: cached mode (handle given) takes no topk_idx/topk_weights")
            check_shape("x (cached dispatch)", data, [cached.is_token_in_rank.size(0), None])
            request = DispatchRequest(
                data,
                scales,
                None,
                None,
                cached.is_token_in_rank,
                None,
                cached,
                1,
                0,
                config,
                CallFingerprint.for_cached_dispatch(data, scales, cached.sequence),
            )
        else:
            for name, value in (
                ("num_tokens_per_rank", num_tokens_per_rank),
                ("is_token_in_rank", is_token_in_rank),
                ("num_tokens_per_expert", num_tokens_per_expert),
            ):
                if value is None:
                    raise ValueError(
                        f"dispatch: {name} is required without a handle (use get_dispatch_layout)"
                    )
            per_rank = check_tensor("num_tokens_per_rank", num_tokens_per_rank)
            in_rank = check_tensor("is_token_in_rank", is_token_in_rank)
            per_expert = check_tensor("num_tokens_per_expert", num_tokens_per_expert)
            check_dtype("num_tokens_per_rank", per_rank, torch.int32)
            check_shape("num_tokens_per_rank", per_rank, [self.group_size])
            check_dtype("is_token_in_rank", in_rank, torch.bool)
            check_shape("is_token_in_rank", in_rank, [num_tokens, self.group_size])
            check_dtype("num_tokens_per_expert", per_expert, torch.int32)
            check_shape("num_tokens_per_expert", per_expert, [None])
            num_experts = validation.check_num_experts(
                "num_tokens_per_expert.size(0) (num_experts)", per_expert.size(0), self.group_size
            )
            for name, tensor in (
                ("num_tokens_per_rank", per_rank),
                ("is_token_in_rank", in_rank),
                ("num_tokens_per_expert", per_expert),
            ):
                check_same_device(name, tensor, device, "x")
            per_node = self._check_tokens_per_node(num_tokens_per_rdma_rank, device)
            idx = weights = None
            if topk_idx is not None:
                idx, weights = validation.check_topk(topk_idx, topk_weights, num_tokens, device)
                if validation.should_check_values(idx, self.settings.check_values):
                    validation.check_expert_ids("topk_idx", idx, num_experts)
            elif topk_weights is not None:
                raise ValueError("dispatch: topk_weights needs topk_idx")
            request = DispatchRequest(
                data,
                scales,
                idx,
                weights,
                in_rank,
                per_expert,
                None,
                expert_alignment,
                num_worst_tokens,
                config,
                CallFingerprint.for_dispatch(data, scales, num_experts, idx, weights),
                per_node,
            )
        backend = self.backend
        inputs = [data, scales, request.topk_idx, request.topk_weights, request.is_token_in_rank]
        with comm_stream_scope(self._stream_for(data), previous_event, inputs) as scope:
            result = backend.dispatch(request)
            recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = result.recv_x
            if result.recv_x_scales is not None:
                recv_x = (result.recv_x, result.recv_x_scales)
            outputs = (result.recv_x, result.recv_x_scales, result.recv_topk_idx, result.recv_topk_weights)
            event = scope.finish(outputs, async_finish, allocate_on_comm_stream)
        if handle is not None:
            return recv_x, None, None, None, None, event
        return (
            recv_x,
            result.recv_topk_idx,
            result.recv_topk_weights,
            result.num_recv_tokens_per_expert_list,
            result.handle,
            event,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: NormalHandle | tuple[Any, ...],
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Sum the rows dispatch delivered back onto each token's rank (unweighted).

        Arguments:
            x: ``[num_recv_tokens, hidden]`` bf16 (the rows of ``recv_x``, after the experts).
            handle: the handle of the dispatch that delivered them (or a plain tuple of it).
            topk_weights: ``[num_recv_tokens, num_topk]`` float32, summed the same way, or ``None``.
            bias: ``None``, one or two ``[num_tokens, hidden]`` bf16 tensors added to the result.
            config, previous_event, async_finish, allocate_on_comm_stream: as in ``dispatch``.

        Returns:
            ``combined_x [num_tokens, hidden]`` bf16, ``combined_topk_weights [num_tokens,
            num_topk]`` float32 or ``None``, and the event.

        In multi-node mode the sums are DeepEP's internode ones, bit for bit: one bf16 partial
        per (token, node), then the partials (``reference_internode.combine_by_node`` states the
        order).

        Raises:
            epcomm.InconsistentCallError: (a ``ValueError``) another rank made a different call
                (another operation, call number, ``hidden`` or ``topk_weights`` width) or combines
                the rows of another dispatch (the handle's dispatch number differs).
        """
        cached = self._normal_handle(handle)
        data = check_tensor("x", x)
        check_dtype("x", data, torch.bfloat16)
        check_shape("x", data, [cached.num_recv_rows, None])
        num_tokens = cached.is_token_in_rank.size(0)
        weights = None
        if topk_weights is not None:
            weights = check_tensor("topk_weights", topk_weights)
            check_dtype("topk_weights", weights, torch.float32)
            check_shape("topk_weights", weights, [cached.num_recv_rows, None])
            check_same_device("topk_weights", weights, data.device, "x")
        biases: tuple[torch.Tensor, ...] = ()
        if bias is not None:
            biases = bias if isinstance(bias, tuple) else (bias,)
            if len(biases) > 2:
                raise ValueError(
                    f"bias must be None, a tensor or a tuple of up to 2 tensors; got {len(biases)}"
                )
            for i, b in enumerate(biases):
                check_tensor(f"bias[{i}]", b)
                check_dtype(f"bias[{i}]", b, torch.bfloat16)
                check_shape(f"bias[{i}]", b, [num_tokens, data.size(1)])
                check_same_device(f"bias[{i}]", b, data.device, "x")
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config must be an epcomm.Config or None; got {type(config).__name__}")
        self._check_events(previous_event, async_finish, allocate_on_comm_stream)
        request = CombineRequest(
            data,
            cached,
            weights,
            biases,
            config or self.get_combine_config(self.group_size),
            CallFingerprint.for_combine(data, weights, cached.sequence),
        )
        backend = self.backend
        with comm_stream_scope(self._stream_for(data), previous_event, [data, weights, *biases]) as scope:
            result = backend.combine(request)
            event = scope.finish(tuple(result), async_finish, allocate_on_comm_stream)
        return result.combined_x, result.combined_topk_weights, event
