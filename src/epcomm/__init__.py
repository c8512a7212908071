"""epcomm: expert-parallel MoE communication (dispatch / combine) with DeepEP V1's API.

``from epcomm import Buffer, Config, EventOverlap`` replaces ``from deep_ep import ...``.
``InconsistentCallError`` (a ``ValueError``): ranks made different normal-mode calls.
"""

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
