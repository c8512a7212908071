"""Multi-process CPU tier: epcomm's ``Buffer`` on gloo with 2 and 4 processes, checked per rank
against the naive per-token oracle in ``naive.py``.

This directory is a package so that its helper modules (``naive``, ``workers_*``) get unique module
names (``dist_cpu.naive``...) that spawned children can import by reference.
"""
