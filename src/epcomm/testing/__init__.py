"""Test utilities: run functions on several local processes with an initialized process group."""

from epcomm.testing.launch import (
    SHARED_GPU,
    ProcessGroupInfo,
    ProcessGroupPool,
    find_free_port,
    parallel_launch,
)

__all__ = ["SHARED_GPU", "ProcessGroupInfo", "ProcessGroupPool", "find_free_port", "parallel_launch"]
