"""Worker of ``test_placement``: ``nvlink_placement`` on gloo ranks that pretend to have GPUs.

Each rank patches the few CUDA queries and the host name the decision reads (restored before it
returns: the pool's processes run other tests afterwards), then runs the real collective.
"""

from __future__ import annotations

from unittest import mock

import torch

from epcomm.testing import ProcessGroupInfo


def placement_worker(
    pgi: ProcessGroupInfo, gpus: list[int], hosts: list[str], peer_access: list[bool]
) -> str:
    """``nvlink_placement`` with rank ``r`` on GPU ``gpus[r]`` of host ``hosts[r]`` (4 GPUs per
    host), peer access as ``peer_access[r]``; returns ``str`` of the result."""
    import epcomm.backends.nvlink.backend as backend

    rank = pgi.rank
    with (
        mock.patch.object(torch.cuda, "is_available", return_value=True),
        mock.patch.object(torch.cuda, "current_device", return_value=gpus[rank]),
        mock.patch.object(torch.cuda, "device_count", return_value=4),
        mock.patch.object(torch.cuda, "can_device_access_peer", return_value=peer_access[rank]),
        mock.patch.object(backend.socket, "gethostname", return_value=hosts[rank]),
    ):
        return str(backend.nvlink_placement(pgi.group))
