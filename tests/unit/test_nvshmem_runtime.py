"""The per-process symmetric-memory backend claim (``backends.nvshmem.runtime``), with a stand-in for
PyTorch's module: PyTorch's ``get_backend`` names the default ("CUDA") before anything is allocated,
so epcomm records which backend its own Buffers use."""

from __future__ import annotations

import pytest
import torch

from epcomm.backends.nvshmem import runtime


class FakeSymmetricMemory:
    """PyTorch's behaviour: ``get_backend`` answers "CUDA" until ``set_backend`` is called, and
    ``set_backend`` fails once something was allocated."""

    def __init__(self, allocated: bool = False) -> None:
        self.backend = "CUDA"
        self.allocated = allocated

    def get_backend(self, device: torch.device) -> str:
        return self.backend

    def set_backend(self, name: str) -> None:
        if self.allocated:
            raise RuntimeError("Cannot change backend after a symmetric tensor was allocated")
        self.backend = name


@pytest.fixture(autouse=True)
def _fresh_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_CLAIMED", None)


DEVICE = torch.device("cpu")


def test_nvshmem_first_is_selected_although_pytorch_names_cuda_as_its_default() -> None:
    fake = FakeSymmetricMemory()
    runtime.claim_symmetric_memory_backend("NVSHMEM", DEVICE, fake)
    runtime.claim_symmetric_memory_backend("NVSHMEM", DEVICE, fake)  # a second Buffer: fine
    assert fake.backend == "NVSHMEM"


def test_nvlink_after_nvshmem_names_both_backends() -> None:
    fake = FakeSymmetricMemory()
    runtime.claim_symmetric_memory_backend("NVSHMEM", DEVICE, fake)
    with pytest.raises(RuntimeError, match=r"^backend 'nvlink': .*NVSHMEM.*one backend per process"):
        runtime.claim_symmetric_memory_backend("CUDA", DEVICE, fake)


def test_nvshmem_after_nvlink_names_both_backends() -> None:
    fake = FakeSymmetricMemory()
    runtime.claim_symmetric_memory_backend("CUDA", DEVICE, fake)
    with pytest.raises(RuntimeError, match=r"^backend 'nvshmem': .*NVLink Buffer.*backend='nvlink'"):
        runtime.claim_symmetric_memory_backend("NVSHMEM", DEVICE, fake)
    assert fake.backend == "CUDA"


def test_symmetric_memory_allocated_outside_epcomm_gives_a_clear_error() -> None:
    fake = FakeSymmetricMemory(allocated=True)
    with pytest.raises(RuntimeError, match=r"^backend 'nvshmem': PyTorch refused .*one backend per process"):
        runtime.claim_symmetric_memory_backend("NVSHMEM", DEVICE, fake)


def test_nvlink_when_nvshmem_was_selected_outside_epcomm() -> None:
    fake = FakeSymmetricMemory()
    fake.backend = "NVSHMEM"
    with pytest.raises(RuntimeError, match=r"^backend 'nvlink': this process selected NVSHMEM"):
        runtime.claim_symmetric_memory_backend("CUDA", DEVICE, fake)
