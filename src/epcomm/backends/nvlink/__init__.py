"""Intranode transport: PyTorch symmetric memory (CUDA IPC over NVLink) + Triton kernels."""

from epcomm.backends.nvlink.backend import NvlinkBackend, nvlink_placement

__all__ = ["NvlinkBackend", "nvlink_placement"]
