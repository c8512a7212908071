"""``epcomm.soak``: its scenarios agree on every rank and cover the cases it names, its
comparison catches a one-bit difference, and it refuses what cannot run before any process starts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from epcomm.soak import SoakConfig, _differs, _scenario, run


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
        assert scenario["capacity"] == cfg.max_tokens  # one per run: the kernels compile once for it
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


@pytest.mark.parametrize(
    ("num_gpus", "argv", "message"),
    [
        (0, ["--transport", "nvlink"], "--transport nvlink needs one CUDA GPU per process: 2 processes, 0 GPUs"),
        (8, ["--transport", "nvlink", "--dist-backend", "gloo"], "--dist-backend gloo runs them on CPU"),
        (0, ["--dist-backend", "nccl"], "--dist-backend nccl needs one CUDA GPU per process"),
        (0, ["--dist-backend", "gloo-shared-gpu"], "this machine has no CUDA GPU"),
        (0, ["--num-processes", "0"], "--num-processes must be >= 1"),
        (0, ["--iterations", "0"], "--iterations must be >= 1"),
        (0, ["--max-tokens", "-1"], "--max-tokens must be >= 0"),
        (0, ["--timeout", "0"], "--timeout must be > 0"),
    ],
)  # fmt: skip
def test_impossible_combination_is_one_line_exit_2_before_any_process(
    machine: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
    num_gpus: int,
    argv: list[str],
    message: str,
) -> None:
    machine(num_gpus)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]], err
    assert err.splitlines()[-1].startswith("python -m epcomm soak: error: "), err
    assert message in err.splitlines()[-1], err
