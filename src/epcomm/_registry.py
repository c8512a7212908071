"""Buffers by integer id, for the ``torch.library`` custom ops (``epcomm.autograd``, ``epcomm.ops``).

A custom op's schema takes tensors and plain values, not a Python object such as a ``Buffer``;
every ``Buffer`` gets an id when it is created (``Buffer.op_id``) and the ops find it here. The
registry holds weak references: it never keeps a buffer alive.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epcomm.buffer import Buffer

__all__ = ["lookup_buffer", "register_buffer"]

_BUFFERS: dict[int, weakref.ref[Any]] = {}
_NEXT_ID = itertools.count(1)


def register_buffer(buffer: Buffer) -> int:
    """A new id (1, 2, ...) for ``buffer``, valid while the buffer is alive."""
    buffer_id = next(_NEXT_ID)
    _BUFFERS[buffer_id] = weakref.ref(buffer, lambda _: _BUFFERS.pop(buffer_id, None))
    return buffer_id


def lookup_buffer(buffer_id: int) -> Buffer:
    """The live ``Buffer`` of ``buffer_id``.

    Raises:
        RuntimeError: no live buffer has this id (it was garbage-collected, or the id comes from
            another process).
    """
    ref = _BUFFERS.get(buffer_id)
    buffer = ref() if ref is not None else None
    if buffer is None:
        raise RuntimeError(
            f"epcomm op: no live Buffer with op_id={buffer_id} in this process (was it deleted?)"
        )
    result: Buffer = buffer
    return result
