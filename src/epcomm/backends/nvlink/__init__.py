"""One NVLink domain: PyTorch symmetric memory (CUDA IPC when ranks share a GPU) + Triton kernels.

``backend.py`` (the backend and its placement check), ``normal.py`` and ``low_latency.py`` (mode
sequencing), ``symmetric_buffer.py`` (the buffer, its whole map, epochs, error word). Nothing is
imported here, so the facade can read the buffer's map without importing Triton.
"""
