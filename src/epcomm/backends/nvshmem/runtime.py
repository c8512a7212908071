"""NVSHMEM through PyTorch's symmetric memory: set-up, allocation and the peer table.

Everything here is imported lazily (only a ``Buffer`` that asks for NVSHMEM reaches it), and a
machine without NVSHMEM gets one clear error.

Facts the code relies on (NVSHMEM 3.4.5 under PyTorch's ``torch.distributed._symmetric_memory``):

* ``set_backend("NVSHMEM")`` is global per process and fixed once any symmetric tensor exists: a
  process that already made an NVLink buffer (the CUDA backend) cannot make an NVSHMEM one.
* The first ``symm_mem.empty`` initialises NVSHMEM over the default group's store, and every
  allocation is a collective of the whole job: every process must allocate the same sizes in the
  same order. The PE number is the global rank, so the group must be the whole job.
* With several processes on one GPU NVSHMEM runs in a limited mode where host barriers, host
  collectives and team splits end the process. So nothing here calls ``symm_mem.rendezvous``: the
  peers' addresses come from ``nvshmem_ptr`` on the device (``kernels.nvshmem_peers``). Freeing a
  symmetric allocation is collective too; buffers are therefore kept until the process ends
  (``retain``), and a grown buffer keeps its old allocation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["claim_symmetric_memory_backend", "group_pes", "nvshmem_symmetric_memory", "retain"]

_RETAINED: list[torch.Tensor] = []
# The symmetric-memory backend this process's Buffers allocate through ("CUDA" or "NVSHMEM"), set
# by the first Buffer that allocates. PyTorch's ``get_backend`` cannot tell: it names the backend a
# first allocation would use ("CUDA" by default), not one already in use.
_CLAIMED: str | None = None

_OTHER_BUFFER = {"CUDA": "an NVLink Buffer", "NVSHMEM": "a Buffer with backend='nvshmem'"}
_EPCOMM_NAME = {"CUDA": "nvlink", "NVSHMEM": "nvshmem"}


def claim_symmetric_memory_backend(name: str, device: torch.device, symm_mem: Any = None) -> None:
    """Record that this process allocates symmetric memory through backend ``name`` ("CUDA" or
    "NVSHMEM"), selecting it in PyTorch the first time.

    Arguments:
        name: "CUDA" (the NVLink mode's allocator) or "NVSHMEM".
        device: this rank's CUDA device.
        symm_mem: ``torch.distributed._symmetric_memory`` (imported when None).

    Raises:
        RuntimeError: this process already allocates through the other backend (PyTorch fixes one
            symmetric-memory backend per process once a symmetric tensor exists).
    """
    global _CLAIMED
    if name == _CLAIMED:
        return
    this = _EPCOMM_NAME[name]
    if _CLAIMED is not None:
        raise RuntimeError(
            f"backend '{this}': this process already allocates symmetric memory through {_CLAIMED} "
            f"({_OTHER_BUFFER[_CLAIMED]}), and PyTorch fixes one backend per process: use "
            f"backend='{_EPCOMM_NAME[_CLAIMED]}' for this Buffer too"
        )
    if symm_mem is None:
        import torch.distributed._symmetric_memory as symm_mem
    if name == "NVSHMEM":
        try:
            symm_mem.set_backend("NVSHMEM")
        except RuntimeError as error:
            raise RuntimeError(
                f"backend 'nvshmem': PyTorch refused the NVSHMEM symmetric-memory backend ({error}); "
                "this process has probably allocated symmetric memory through another backend, and "
                "PyTorch fixes one backend per process"
            ) from None
    else:
        get_backend = getattr(symm_mem, "get_backend", None)
        if get_backend is not None and get_backend(device) == "NVSHMEM":
            raise RuntimeError(
                f"backend '{this}': this process selected NVSHMEM for symmetric memory, and PyTorch fixes "
                "one backend per process: use backend='nvshmem' for this Buffer too"
            )
    _CLAIMED = name


def nvshmem_symmetric_memory(device: torch.device) -> Any:
    """PyTorch's symmetric-memory module with the NVSHMEM backend selected for this process.

    Arguments:
        device: this rank's CUDA device.

    Returns:
        ``torch.distributed._symmetric_memory``.

    Raises:
        RuntimeError: NVSHMEM is not usable here (PyTorch built without it, or the
            ``nvidia-nvshmem-cu13`` wheel missing), or this process already allocates symmetric
            memory through another backend.
    """
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError as error:  # pragma: no cover - every supported torch has the module
        raise RuntimeError(
            f"backend 'nvshmem': PyTorch's symmetric memory is unavailable ({error})"
        ) from None
    if not symm_mem.is_nvshmem_available():
        raise RuntimeError(
            "backend 'nvshmem': NVSHMEM is not available to PyTorch on this machine "
            "(pip install nvidia-nvshmem-cu13, on a CUDA build of torch)"
        )
    claim_symmetric_memory_backend("NVSHMEM", device, symm_mem)
    return symm_mem


def group_pes(group: Any) -> list[int]:
    """The NVSHMEM PE of each rank of ``group`` (its global rank), in group order.

    Raises:
        ValueError: ``group`` is not the whole job (NVSHMEM allocations are collectives of every
            process, so every process must make the same ``Buffer``).
    """
    world = dist.get_world_size()
    size = dist.get_world_size(group)
    if size != world:
        raise ValueError(
            f"backend 'nvshmem' needs a group of every process of the job ({world}); this one has {size} "
            "(NVSHMEM allocations are collectives of the whole job)"
        )
    return [dist.get_global_rank(group, rank) for rank in range(size)]


def retain(buffer: torch.Tensor) -> None:
    """Keep ``buffer`` allocated until the process ends (freeing it would be a collective)."""
    _RETAINED.append(buffer)
