"""``epcomm.moe.MoELayer`` on 2 gloo processes: training against a dense single-process model with
the same initial weights, and ``torch.compile`` of its forward and backward."""

from __future__ import annotations

import pytest

from .cases import RunOnRanks
from .workers_moe import compile_worker, train_vs_dense_worker

# float32 on CPU: the layer and the dense model do the same float32 operations except the order
# of the per-token sums over experts (the layer sums each rank's experts, then the ranks). Measured
# over 6 steps: loss <= 1.2e-7 relative, parameters <= 1.0e-7 relative (of their largest entry).
LOSS_RTOL = 1e-6
PARAM_RTOL = 1e-6


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_matches_dense(run_on_ranks: RunOnRanks, optimizer: str) -> None:
    results = run_on_ranks(2, train_vs_dense_worker, optimizer, 6, 1)
    losses, dense_losses = results[0]["losses"], results[0]["dense_losses"]
    assert results[1]["losses"] == losses, "every rank sees the same summed loss"
    for step, (got, want) in enumerate(zip(losses, dense_losses)):
        assert abs(got - want) <= LOSS_RTOL * abs(want), f"step {step}: loss {got}, dense {want}"
    assert losses[-1] != losses[0], "the loss must change (the model trains)"
    for rank, result in enumerate(results):
        assert result["param_error"] <= PARAM_RTOL, f"rank {rank}: parameters differ {result['param_error']}"


@pytest.mark.parametrize(("num_worst_tokens", "fullgraph"), [(0, True), (40, False)])
def test_compile_without_graph_breaks(
    run_on_ranks: RunOnRanks, num_worst_tokens: int, fullgraph: bool
) -> None:
    """No graph break: with data-dependent receive sizes dynamo needs ``fullgraph=True`` (or
    ``capture_dynamic_output_shape_ops``) to keep them in the graph; ``num_worst_tokens`` makes
    them static. The forward graph holds dispatch and combine, the backward graph their backward
    (a cached dispatch and a combine); results equal eager mode exactly."""
    for rank, result in enumerate(run_on_ranks(2, compile_worker, num_worst_tokens, fullgraph)):
        assert result["graph_breaks"] == 0, f"rank {rank}: {result['reasons']}"
        assert result["ops"] == {
            "forward": {"epcomm.dispatch.default": 1, "epcomm.combine.default": 1},
            "backward": {"epcomm.cached_dispatch.default": 1, "epcomm.combine.default": 1},
        }, result["ops"]
        assert result["max_diff"] == 0.0, result["max_diff"]


def test_compile_names_dispatch_when_it_breaks(run_on_ranks: RunOnRanks) -> None:
    """Without ``fullgraph``, ``num_worst_tokens`` or ``capture_dynamic_output_shape_ops``, dynamo
    breaks the graph at ``epcomm.dispatch`` (its output shape depends on data) and says so;
    everything still runs and equals eager mode."""
    for result in run_on_ranks(2, compile_worker, 0, False):
        assert result["graph_breaks"] > 0
        assert all("epcomm.dispatch" in reason for reason in result["reasons"]), result["reasons"]
        assert result["max_diff"] == 0.0
