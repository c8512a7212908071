"""epcomm's public testing helpers: run a function on N local processes, and generate MoE routing.

Public and documented (the tests, the benchmarks and ``python -m epcomm`` use them; so can you):

* :func:`parallel_launch` ``(world_size, worker, *args, backend=, timeout_s=)``: start ``world_size``
  fresh local processes, each with an initialized ``torch.distributed`` group (gloo on CPU, nccl
  with one GPU per rank, or :data:`SHARED_GPU`: every rank on ``cuda:0``), call
  ``worker(pgi, *args)`` on every rank and return the results in rank order; a failing or hung rank
  raises in the caller with every rank's traceback.
* :class:`ProcessGroupPool`: the same processes kept alive across many ``run(worker, *args)`` calls
  (a test module pays the start-up once).
* :class:`ProcessGroupInfo`: what a worker gets (``rank``, ``world_size``, ``device``, ``group``...).
* :func:`find_free_port`: a free loopback port (the rendezvous of the launchers).
* :func:`make_routing` / :class:`TopkRouting`: DeepEP-style random ``topk_idx`` / ``topk_weights``,
  deterministic from ``(seed, rank)``, with optional masked (``-1``) slots and restricted experts.

Workers must be module-level functions of an importable module (children are spawned and import
them by name). ``epcomm.testing.launch`` and ``epcomm.testing.routing`` are the implementation
modules; import from ``epcomm.testing``.
"""

from epcomm.testing.launch import (
    SHARED_GPU,
    ProcessGroupInfo,
    ProcessGroupPool,
    find_free_port,
    parallel_launch,
)
from epcomm.testing.routing import TopkRouting, make_routing

__all__ = [
    "SHARED_GPU",
    "ProcessGroupInfo",
    "ProcessGroupPool",
    "TopkRouting",
    "find_free_port",
    "make_routing",
    "parallel_launch",
]
