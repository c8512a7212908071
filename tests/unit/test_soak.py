"""``epcomm.soak``: its scenarios agree on every rank and cover the cases it names, and its
comparison catches a one-bit difference."""

from __future__ import annotations

import torch

from epcomm.soak import SoakConfig, _differs, _scenario


def test_scenarios_are_the_same_on_every_rank_and_valid() -> None:
    cfg = SoakConfig(iterations=200, max_tokens=16, transport="reference", seed=3)
    seen: dict[str, set[object]] = {key: set() for key in ("mode", "fp8", "cached", "skewed", "duplicate")}
    for iteration in range(cfg.iterations):
        scenario = _scenario(cfg, iteration, 4)
        assert scenario == _scenario(cfg, iteration, 4)  # drawn from (seed, iteration) alone
        assert scenario["num_experts"] % 4 == 0
        assert 1 <= scenario["num_topk"] <= scenario["num_experts"]
        assert scenario["hidden"] % 128 == 0
        assert all(0 <= tokens <= cfg.max_tokens for tokens in scenario["tokens"])
        assert scenario["capacity"] >= max(scenario["tokens"])
        for key, values in seen.items():
            values.add(scenario[key])
    assert seen["mode"] == {"normal", "low_latency"}
    for key in ("fp8", "cached", "skewed", "duplicate"):
        assert seen[key] == {False, True}, key


def test_differs_catches_one_bit() -> None:
    base = torch.randn(5, 3)
    flipped = base.clone()
    flipped.view(torch.int32)[2, 1] ^= 1
    assert _differs("x", base.clone(), base) == []
    assert _differs("x", flipped, base) == ["x: values differ"]
    assert _differs("x", base[:4], base) != []
    assert _differs("x", base.double(), base) != []
    # Any strides, one element too (the low-latency scales are column-major views).
    column_major = torch.randn(3, 7).t()[:1]
    assert _differs("s", column_major, column_major.clone()) == []
    assert _differs("pair", (base, flipped), (base, base)) == ["pair[1]: values differ"]
    assert _differs("counts", [1, 2], [1, 3]) == ["counts: [1, 2] != [1, 3]"]
