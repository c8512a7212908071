"""``EventHandle`` / ``EventOverlap`` (DeepEP-compatible) and the communication-stream helpers.

On CUDA an ``EventHandle`` wraps a recorded ``torch.cuda.Event``. Without CUDA (the reference
backend on CPU) work runs synchronously, so the handle is a completed no-op that keeps the same
call shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

__all__ = ["EventHandle", "EventOverlap", "StreamContext", "comm_stream_scope"]


class EventHandle:
    """A CUDA event recorded on the current stream at construction (a no-op without CUDA).

    ``EventHandle()`` takes no arguments, like DeepEP's.
    """

    def __init__(self) -> None:
        self.event: torch.cuda.Event | None = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream())

    @classmethod
    def recorded_on(cls, stream: torch.cuda.Stream) -> EventHandle:
        """An ``EventHandle`` recorded on ``stream`` instead of the current stream."""
        handle = cls.__new__(cls)
        handle.event = torch.cuda.Event()
        handle.event.record(stream)
        return handle

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (no-op without CUDA)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: torch.cuda.Stream) -> None:
        """Make ``stream`` wait for this event (no-op without CUDA)."""
        if self.event is not None:
            stream.wait_event(self.event)


class EventOverlap:
    """A recorded event plus the tensors that must stay alive until it completes (as DeepEP's).

    Arguments:
        event: the ``EventHandle``, or ``None`` (nothing to wait for).
        extra_tensors: tensors kept referenced until this object is dropped.

    Use ``event.current_stream_wait()``, or ``with event:`` to make the current stream wait at
    exit.
    """

    def __init__(
        self, event: EventHandle | None = None, extra_tensors: tuple[Any, ...] | None = None
    ) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event.

        Raises:
            RuntimeError: there is no event (the call ran with ``async_finish=False``).
        """
        if self.event is None:
            raise RuntimeError(
                "EventOverlap.current_stream_wait(): no event to wait for "
                "(the operation ran with async_finish=False and is already ordered on the stream)"
            )
        self.event.current_stream_wait()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


def _cuda_tensors(items: Iterable[Any]) -> Iterator[torch.Tensor]:
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.is_cuda:
                yield item
        elif isinstance(item, (tuple, list)):
            yield from _cuda_tensors(item)


# ``torch.cuda.Stream`` objects by raw stream handle: ``torch.cuda.current_stream()`` resolves the
# device in Python on every call (~9 us of host time on the GPU hosts); the raw handle is one C call.
_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


def current_stream() -> torch.cuda.Stream:
    """``torch.cuda.current_stream()`` of the current device, cached by its raw handle."""
    device = torch.cuda.current_device()
    key = (device, torch._C._cuda_getCurrentRawStream(device))  # type: ignore[attr-defined]
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = torch.cuda.current_stream(device)
    return stream


# One reusable event per waited-on stream: a wait captures the event's latest record when it is
# enqueued, so re-recording it later never changes an earlier wait (torch's ``wait_stream`` creates
# and destroys a CUDA event per call, a measurable share of a call's host time).
_WAIT_EVENTS: dict[int, torch.cuda.Event] = {}


def stream_wait(waiter: torch.cuda.Stream, waited: torch.cuda.Stream) -> None:
    """``waiter.wait_stream(waited)`` through a cached event."""
    event = _WAIT_EVENTS.get(waited.cuda_stream)
    if event is None:
        event = _WAIT_EVENTS[waited.cuda_stream] = torch.cuda.Event()
    event.record(waited)
    waiter.wait_event(event)


@dataclass
class StreamContext:
    """What ``comm_stream_scope`` hands the operation: the stream it runs on and its inputs.

    ``waited_all`` is true when the communication stream waited for everything queued on the
    compute stream (no ``previous_event``)."""

    stream: torch.cuda.Stream | None
    compute_stream: torch.cuda.Stream | None
    keep_alive: list[Any] = field(default_factory=list)
    waited_all: bool = False

    def finish(
        self, outputs: tuple[Any, ...], async_finish: bool, allocate_on_comm_stream: bool
    ) -> EventOverlap:
        """Order ``outputs`` for the caller and build the returned ``EventOverlap``.

        With ``async_finish`` the caller gets an event recorded on the communication stream and
        the inputs and outputs are kept alive by it; otherwise the current stream waits for the
        communication stream and the returned ``EventOverlap`` has no event.
        """
        if self.stream is None or self.compute_stream is None:
            # Synchronous (CPU) work is complete already: async callers get a completed no-op event.
            return EventOverlap(EventHandle() if async_finish else None)
        compute_stream = self.compute_stream
        if self.stream != compute_stream and (async_finish or not self.waited_all):
            # Tensors used on the comm stream but owned by the compute stream's allocator (and the
            # reverse with allocate_on_comm_stream) must not be reused before the comm work ends.
            # Not needed when the call is ordered both ways (the comm stream waited for the whole
            # compute stream and the compute stream waits for the comm stream below): a freed
            # block is then reused only by work ordered after every use of it.
            for tensor in _cuda_tensors(self.keep_alive):
                tensor.record_stream(self.stream)
            for tensor in _cuda_tensors(outputs):
                tensor.record_stream(compute_stream if allocate_on_comm_stream else self.stream)
        if async_finish:
            return EventOverlap(EventHandle.recorded_on(self.stream), tuple(self.keep_alive) + tuple(outputs))
        if self.stream != compute_stream:
            stream_wait(compute_stream, self.stream)
        return EventOverlap(None)


@contextmanager
def comm_stream_scope(
    comm_stream: torch.cuda.Stream | None,
    previous_event: Any,
    inputs: Iterable[Any],
) -> Iterator[StreamContext]:
    """Run the body on ``comm_stream`` after ``previous_event`` (or the current stream's work).

    Arguments:
        comm_stream: the Buffer's communication stream, or ``None`` on CPU / when the operation
            must run on the current stream (low-latency calls with a receive hook).
        previous_event: an ``EventOverlap`` (read as ``getattr(previous_event, "event", None)``)
            to wait for instead of the current stream.
        inputs: tensors (or nested tuples of tensors) the body reads.

    Yields:
        ``StreamContext``; call its ``finish`` with the outputs to get the ``EventOverlap``.
    """
    compute_stream = current_stream() if comm_stream is not None else None
    context = StreamContext(comm_stream, compute_stream, list(inputs))
    if comm_stream is None:
        yield context
        return
    handle: EventHandle | None = getattr(previous_event, "event", None)
    if handle is not None:
        handle.stream_wait(comm_stream)
    elif compute_stream is not None and comm_stream != compute_stream:
        stream_wait(comm_stream, compute_stream)
        context.waited_all = True
    if compute_stream is None or comm_stream.device_index != compute_stream.device_index:
        with torch.cuda.stream(comm_stream):  # another device: the context manager switches it too
            yield context
        return
    # Same device: set and restore the stream directly (the context manager costs ~15 us of host
    # time on the GPU hosts, a share of a cold call).
    torch.cuda.set_stream(comm_stream)
    try:
        yield context
    finally:
        torch.cuda.set_stream(compute_stream)
