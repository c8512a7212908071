"""epcomm: expert-parallel MoE communication (dispatch / combine) with DeepEP V1's API.

``from epcomm import Buffer, Config, EventOverlap`` replaces ``from deep_ep import ...``.
``InconsistentCallError`` (a ``ValueError``): ranks made different normal-mode calls.
Training and ``torch.compile``: ``epcomm.autograd`` (differentiable dispatch / combine),
``epcomm.moe`` (``MoELayer``), ``epcomm.ops`` (low-latency custom ops); imported on first use.
"""

import importlib
from types import ModuleType

import torch

from epcomm._version import __version__
from epcomm.buffer import Buffer
from epcomm.config import Config
from epcomm.errors import InconsistentCallError
from epcomm.event import EventHandle, EventOverlap

topk_idx_t = torch.int64
"""dtype of ``topk_idx`` tensors (DeepEP's ``topk_idx_t``)."""

__all__ = [
    "Buffer",
    "Config",
    "EventHandle",
    "EventOverlap",
    "InconsistentCallError",
    "__version__",
    "topk_idx_t",
]

_SUBMODULES = ("autograd", "moe", "ops")


def __getattr__(name: str) -> ModuleType:
    """``epcomm.autograd``, ``epcomm.moe`` and ``epcomm.ops`` without importing them explicitly
    (they register the ``torch.ops.epcomm`` custom ops when first imported)."""
    if name in _SUBMODULES:
        return importlib.import_module(f"epcomm.{name}")
    raise AttributeError(f"module 'epcomm' has no attribute {name!r}")
