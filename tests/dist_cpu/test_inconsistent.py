"""Ranks that call normal or low-latency mode differently raise ``InconsistentCallError`` at once, not a transport
abort or a silent result, and the group still works afterwards.

Every call of the reference backend starts with a header exchanged between every pair of ranks
(the call's fingerprint; in normal mode then the rows it sends to each rank), so every rank sees
every peer's call and raises: the test expects the error on every rank, naming both ranks.
"""

from __future__ import annotations

import pytest

from .cases import RunOnRanks, make_case
from .workers_inconsistent import (
    LOW_LATENCY_ROWS,
    ROWS,
    TIMEOUT_S,
    inconsistent_call_worker,
    inconsistent_low_latency_worker,
)

MAX_MESSAGE_CHARS = 300


@pytest.mark.parametrize(
    ("world_size", "row", "odd_rank"),
    [
        *((2, row, 1) for row in ROWS),
        (4, "hidden", 3),
        (4, "call_order", 0),
        *((2, row, 1) for row in LOW_LATENCY_ROWS),
        (4, "ll_capacity", 2),
    ],
)
def test_inconsistent_call_raises_on_every_rank(
    run_on_ranks: RunOnRanks, world_size: int, row: str, odd_rank: int
) -> None:
    case = make_case("inconsistent_call", world_size)
    worker = inconsistent_low_latency_worker if row in LOW_LATENCY_ROWS else inconsistent_call_worker
    outcomes = run_on_ranks(world_size, worker, case, row, odd_rank)
    rows = {**ROWS, **LOW_LATENCY_ROWS}
    for rank, outcome in enumerate(outcomes):
        message = outcome["message"]
        assert outcome["kind"] == "InconsistentCallError", f"rank {rank}: {row}: raised nothing"
        assert outcome["is_value_error"]
        # The odd rank differs from every peer and names the lowest; the others name the odd rank.
        peer = min(r for r in range(world_size) if r != rank) if rank == odd_rank else odd_rank
        assert (outcome["rank"], outcome["peer"]) == (rank, peer), message
        assert f"rank {rank}: {outcome['mine']};" in message, message
        assert message.endswith(f"rank {peer}: {outcome['theirs']}"), message
        assert outcome["mine"] != outcome["theirs"], message
        assert rows[row] in message, message
        assert "\n" not in message, message
        assert len(message) <= MAX_MESSAGE_CHARS, (len(message), message)
        assert outcome["elapsed_s"] < TIMEOUT_S / 2, f"rank {rank} waited {outcome['elapsed_s']:.1f} s"
        assert outcome["recovered"], f"rank {rank}: the calls after the error failed"
    if world_size > 2:
        assert "2 more rank(s) differ" in outcomes[odd_rank]["message"], outcomes[odd_rank]["message"]
