"""Triton kernels (``@triton.jit``) and their typed launchers, one file per (mode, op).

Each kernel module imports Triton; this package file and ``symmetric_peers.py`` do not, so the
symmetric buffer's map can be read without it. The reference backend never imports a kernel.
"""
