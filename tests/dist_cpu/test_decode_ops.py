"""``epcomm.ops``: the low-latency custom ops on 2 gloo processes, eager and compiled, against the
``Buffer``'s own calls."""

from __future__ import annotations

import pytest

from .cases import RunOnRanks
from .workers_decode import decode_ops_worker


@pytest.mark.parametrize("use_fp8", [False, True])
def test_decode_ops_match_buffer_and_compile(run_on_ranks: RunOnRanks, use_fp8: bool) -> None:
    for rank, result in enumerate(run_on_ranks(2, decode_ops_worker, use_fp8)):
        assert result["eager_equal"], f"rank {rank}: the ops differ from the Buffer's calls"
        assert result["compiled_equal"], f"rank {rank}: the compiled step differs"
        assert result["graph_breaks"] == 0
        assert result["ops"] == ["epcomm.low_latency_combine.default", "epcomm.low_latency_dispatch.default"]
