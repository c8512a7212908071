"""``EventHandle`` / ``EventOverlap`` without CUDA: completed no-ops with DeepEP's call shapes."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import epcomm.utils
from epcomm import Buffer, EventHandle, EventOverlap
from epcomm.event import comm_stream_scope

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the behaviour without CUDA (no event is recorded)"
)


def test_event_handle_without_cuda_has_no_event() -> None:
    handle = EventHandle()
    assert handle.event is None


def test_event_handle_waits_are_noops() -> None:
    handle = EventHandle()
    handle.current_stream_wait()
    handle.stream_wait(None)  # type: ignore[arg-type]


def test_event_overlap_defaults() -> None:
    overlap = EventOverlap()
    assert overlap.event is None
    assert overlap.extra_tensors is None


def test_current_stream_wait_without_event_raises() -> None:
    with pytest.raises(RuntimeError, match="no event to wait for"):
        EventOverlap(None).current_stream_wait()


def test_current_stream_wait_with_cpu_handle_is_noop() -> None:
    EventOverlap(EventHandle()).current_stream_wait()
    Buffer.capture().current_stream_wait()


@pytest.mark.parametrize("make_event", [lambda: None, EventHandle], ids=["no_event", "cpu_handle"])
def test_context_manager_is_noop(make_event: object) -> None:
    overlap = EventOverlap(make_event())  # type: ignore[operator]
    with overlap as entered:
        assert entered is overlap


def test_context_manager_does_not_swallow_exceptions() -> None:
    with pytest.raises(KeyError), EventOverlap(EventHandle()):
        raise KeyError("inside")


def test_extra_tensors_kept_alive() -> None:
    tensor = torch.ones(3)
    ref = weakref.ref(tensor)
    overlap = EventOverlap(EventHandle(), (tensor,))
    del tensor
    gc.collect()
    assert ref() is not None
    assert overlap.extra_tensors is not None
    assert overlap.extra_tensors[0] is ref()
    del overlap
    gc.collect()
    assert ref() is None


def test_utils_reexports() -> None:
    assert epcomm.utils.EventOverlap is EventOverlap
    assert epcomm.utils.EventHandle is EventHandle
    assert isinstance(epcomm.utils.EventOverlap(epcomm.utils.EventHandle()), EventOverlap)


def test_capture_returns_event_overlap_with_handle() -> None:
    captured = Buffer.capture()
    assert isinstance(captured, EventOverlap)
    assert isinstance(captured.event, EventHandle)


@pytest.mark.parametrize("async_finish", [False, True])
def test_comm_stream_scope_without_stream(async_finish: bool) -> None:
    tensor = torch.zeros(2)

    class Foreign:  # previous_event is read as getattr(previous_event, "event", None)
        event = None

    for previous_event in (None, Foreign(), Buffer.capture()):
        with comm_stream_scope(None, previous_event, [tensor]) as scope:
            assert scope.stream is None
            assert scope.keep_alive == [tensor]
            overlap = scope.finish((tensor,), async_finish, False)
        assert isinstance(overlap, EventOverlap)
        if not async_finish:
            assert overlap.event is None
