"""The NVSHMEM transport: NVSHMEM symmetric memory under the NVLink-mode kernels (``runtime``)."""
