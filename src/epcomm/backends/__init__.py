"""Transports behind ``Buffer``; ``create_backend`` picks one."""

from __future__ import annotations

import logging
from typing import Any

import torch

from epcomm._logging import log_once
from epcomm.backends.base import Backend
from epcomm.env import BackendChoice

__all__ = ["Backend", "create_backend"]


def create_backend(
    choice: BackendChoice, group: Any, timeout_s: float, num_ranks_per_node: int, enable_shrink: bool
) -> Backend:
    """Build the backend ``choice`` names (``AUTO`` picks from the devices, never from the group).

    Arguments:
        choice: the requested transport.
        group: the process group.
        timeout_s: bound of every wait for a peer.
        num_ranks_per_node: ranks per node.
        enable_shrink: keep a rank mask (shrink mode).

    Returns:
        The backend.
    """
    from epcomm.backends.reference import ReferenceBackend

    if choice in (BackendChoice.NVLINK, BackendChoice.NVSHMEM):
        raise NotImplementedError(
            f"backend {choice.value!r} is not available in this version of epcomm; "
            "use backend='reference' (or EPCOMM_BACKEND=reference)"
        )
    if choice is BackendChoice.AUTO and torch.cuda.is_available():
        log_once(
            "auto-reference",
            "epcomm: the NVLink/NVSHMEM backends are not built yet; using the reference backend "
            "(torch.distributed point-to-point messages)",
            logging.WARNING,
        )
    return ReferenceBackend(group, timeout_s, num_ranks_per_node, enable_shrink)
