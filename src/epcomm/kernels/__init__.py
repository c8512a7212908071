"""Triton kernels (``@triton.jit``) and their typed launchers, one file per (mode, op).

Importing this package imports Triton; the reference backend never does.
"""
