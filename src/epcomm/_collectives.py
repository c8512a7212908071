"""Small host-side collectives used at ``Buffer`` construction (no numpy, no pickling here:
``all_gather_bytes`` moves bytes its caller made).

``torch.distributed.all_gather_object`` needs numpy, which a CPU-only install may lack.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_bytes", "all_gather_ints", "host_id"]


def _device_for(group: Any) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ints(values: Sequence[int], group: Any) -> list[list[int]]:
    """Every rank's ``values`` (the same length on all ranks), in rank order.

    Arguments:
        values: this rank's integers.
        group: the process group.

    Returns:
        ``[num_ranks][len(values)]`` Python ints.
    """
    device = _device_for(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return [t.tolist() for t in gathered]


def all_gather_bytes(blob: bytes, group: Any) -> list[bytes]:
    """Every rank's ``blob`` (lengths may differ), in rank order.

    Arguments:
        blob: this rank's bytes.
        group: the process group.

    Returns:
        ``num_ranks`` byte strings.
    """
    lengths = [row[0] for row in all_gather_ints([len(blob)], group)]
    device = _device_for(group)
    mine = torch.zeros(max(lengths), dtype=torch.uint8, device="cpu")
    if blob:
        mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    mine = mine.to(device)
    gathered = [torch.empty_like(mine) for _ in lengths]
    dist.all_gather(gathered, mine, group=group)
    return [bytes(t[:n].cpu().tolist()) for t, n in zip(gathered, lengths, strict=True)]


def host_id(hostname: str) -> int:
    """A 32-bit id of ``hostname`` (equal names give equal ids)."""
    return zlib.crc32(hostname.encode())
