"""``epcomm.Config``: DeepEP's five fields, validation, presets per rank count and buffer-size hints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from epcomm import Config
from epcomm.config import combine_config_preset, dispatch_config_preset

FIELDS = (
    "num_sms",
    "num_max_nvl_chunked_send_tokens",
    "num_max_nvl_chunked_recv_tokens",
    "num_max_rdma_chunked_send_tokens",
    "num_max_rdma_chunked_recv_tokens",
)

# DeepEP V1 (deep_ep/buffer.py get_dispatch_config / get_combine_config), chunk sizes after num_sms.
DEEPEP_DISPATCH = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (32, 288, 8, 128),
    32: (32, 288, 8, 128),
    48: (32, 288, 8, 128),
    64: (32, 288, 8, 128),
    96: (20, 480, 12, 128),
    128: (20, 560, 12, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
DEEPEP_COMBINE = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    48: (1, 288, 8, 128),
    64: (1, 288, 8, 128),
    96: (1, 480, 8, 128),
    128: (1, 560, 8, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}


def _fields(config: Config) -> tuple[int, ...]:
    return tuple(getattr(config, name) for name in FIELDS)


# ---- construction ---------------------------------------------------------------------------------


def test_defaults() -> None:
    assert Config().num_sms == 20
    assert all(value > 0 for value in _fields(Config()))


def test_positional_order_is_deepeps() -> None:
    assert _fields(Config(24, 1, 2, 3, 4)) == (24, 1, 2, 3, 4)


def test_keywords_are_deepeps_field_names() -> None:
    config = Config(**dict(zip(FIELDS, (24, 1, 2, 3, 4))))
    assert config == Config(24, 1, 2, 3, 4)
    assert [f.name for f in dataclasses.fields(Config)] == list(FIELDS)


def test_frozen_and_hashable() -> None:
    config = Config(24, 6, 256, 6, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_sms = 22  # type: ignore[misc]
    assert hash(config) == hash(Config(24, 6, 256, 6, 128))
    assert dataclasses.replace(config, num_sms=32).num_sms == 32


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("bad", [0, -2])
def test_non_positive_field_rejected(field: str, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"Config\.{field} must be a positive int; got {bad}"):
        Config(**{field: bad})


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("bad", [2.0, True, "8", None])
def test_non_int_field_rejected(field: str, bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match=rf"Config\.{field}") as info:
        Config(**{field: bad})
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [2.0, "8"])
def test_non_int_field_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match=r"Config\.num_sms"):
        Config(num_sms=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_sms", [1, 3, 21])
def test_odd_num_sms_rejected(num_sms: int) -> None:
    with pytest.raises(ValueError, match=rf"num_sms must be even.*got {num_sms}"):
        Config(num_sms)


# ---- presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_ranks", list(DEEPEP_DISPATCH))
@pytest.mark.parametrize("num_sms", [20, 24, 132])
def test_dispatch_preset_matches_deepep(num_ranks: int, num_sms: int) -> None:
    assert _fields(dispatch_config_preset(num_sms, num_ranks)) == (num_sms, *DEEPEP_DISPATCH[num_ranks])


@pytest.mark.parametrize("num_ranks", list(DEEPEP_COMBINE))
@pytest.mark.parametrize("num_sms", [20, 24, 132])
def test_combine_preset_matches_deepep(num_ranks: int, num_sms: int) -> None:
    assert _fields(combine_config_preset(num_sms, num_ranks)) == (num_sms, *DEEPEP_COMBINE[num_ranks])


@pytest.mark.parametrize(
    ("num_ranks", "covered"),
    [(1, 2), (3, 4), (6, 8), (12, 16), (40, 48), (80, 96), (150, 160), (200, 160), (1024, 160)],
)
def test_uncovered_rank_count_uses_nearest_covered_preset(num_ranks: int, covered: int) -> None:
    # DeepEP raises here; epcomm uses the nearest covered count at or above (or the largest).
    assert dispatch_config_preset(20, num_ranks) == dispatch_config_preset(20, covered)
    assert combine_config_preset(20, num_ranks) == combine_config_preset(20, covered)


@pytest.mark.parametrize("num_ranks", [0, -1])
def test_preset_rejects_non_positive_rank_count(num_ranks: int) -> None:
    with pytest.raises(ValueError, match=rf"num_ranks must be >= 1; got {num_ranks}"):
        dispatch_config_preset(20, num_ranks)


# ---- size hints ------------------------------------------------------------------------------------


def _deepep_nvl_hint(config: Config, hidden_bytes: int, num_ranks: int) -> int:
    """DeepEP V1 ``Config::get_nvl_buffer_size_hint`` (csrc/config.hpp), with NVSHMEM built."""
    num_max_nvl_peers, num_max_topk, num_max_scales, source_meta_bytes = 8, 128, 128, 8
    num_rdma_ranks = max(num_ranks // num_max_nvl_peers, 1)
    num_nvl_ranks = min(num_ranks, num_max_nvl_peers)
    num_channels = config.num_sms // 2
    slots = num_channels * num_nvl_ranks * config.num_max_nvl_chunked_recv_tokens
    num_bytes = num_channels * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
    num_bytes += slots * hidden_bytes
    num_bytes += slots * source_meta_bytes
    num_bytes += slots * num_max_topk * 8
    num_bytes += slots * num_max_topk * 4
    num_bytes += slots * num_max_scales * 4
    return (num_bytes + 127) // 128 * 128


@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16, 32, 64, 160])
@pytest.mark.parametrize("hidden_bytes", [7168 * 2, 4096 * 2, 7168 + 56 * 4, 100])
def test_nvl_hint_matches_deepep(num_ranks: int, hidden_bytes: int) -> None:
    config = dispatch_config_preset(24, num_ranks)
    assert config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) == _deepep_nvl_hint(
        config, hidden_bytes, num_ranks
    )


def _deepep_rdma_hint(config: Config, hidden_bytes: int, num_ranks: int) -> int:
    """DeepEP V1 ``Config::get_rdma_buffer_size_hint``, after its constructor rounds the RDMA receive
    ring up to whole send chunks."""
    num_max_nvl_peers, num_max_topk, num_max_scales, source_meta_bytes = 8, 128, 128, 8
    send = config.num_max_rdma_chunked_send_tokens
    recv = (config.num_max_rdma_chunked_recv_tokens + send - 1) // send * send
    num_rdma_ranks = num_ranks // num_max_nvl_peers
    num_channels = config.num_sms // 2
    num_bytes = num_channels * num_rdma_ranks * (num_max_nvl_peers * 2 + 2) * 2 * 4
    num_bytes += num_channels * num_rdma_ranks * recv * hidden_bytes * 2
    num_bytes += num_channels * num_rdma_ranks * recv * source_meta_bytes * 2
    num_bytes += num_channels * num_rdma_ranks * recv * num_max_topk * 8 * 2
    num_bytes += num_channels * num_rdma_ranks * recv * num_max_topk * 4 * 2
    num_bytes += num_channels * num_rdma_ranks * recv * num_max_scales * 4 * 2
    num_bytes += num_channels * num_rdma_ranks * recv * 16 * 2
    return (num_bytes + 127) // 128 * 128


@pytest.mark.parametrize("num_ranks", [16, 24, 32, 64, 96, 128, 144, 160])
@pytest.mark.parametrize("hidden_bytes", [7168 * 2, 7168 + 56 * 4])
@pytest.mark.parametrize("preset", [dispatch_config_preset, combine_config_preset])
def test_rdma_hint_matches_deepep(
    preset: Callable[[int, int], Config], num_ranks: int, hidden_bytes: int
) -> None:
    config = preset(24, num_ranks)
    assert config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) == _deepep_rdma_hint(
        config, hidden_bytes, num_ranks
    )


def test_short_field_names_alias_deepeps() -> None:
    config = Config(24, 6, 256, 12, 128)
    assert (config.nvl_chunk_size, config.nvl_buffer_size) == (6, 256)
    assert (config.rdma_chunk_size, config.rdma_buffer_size) == (12, 128)
    assert config.num_channels == 12


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
def test_rdma_hint_zero_within_one_node(num_ranks: int) -> None:
    assert Config().get_rdma_buffer_size_hint(7168 * 2, num_ranks) == 0


@pytest.mark.parametrize("num_ranks", [16, 32, 64, 128, 160])
def test_rdma_hint_positive_multiple_of_128(num_ranks: int) -> None:
    config = dispatch_config_preset(24, num_ranks)
    hint = config.get_rdma_buffer_size_hint(7168 * 2, num_ranks)
    assert hint > 0
    assert hint % 128 == 0


def test_hints_grow_with_size_and_ranks() -> None:
    config = Config(24, 6, 256, 6, 128)
    nvl = [config.get_nvl_buffer_size_hint(hidden_bytes, 8) for hidden_bytes in (1024, 2048, 4096)]
    assert nvl == sorted(nvl)
    assert len(set(nvl)) == 3
    rdma = [config.get_rdma_buffer_size_hint(4096, num_ranks) for num_ranks in (16, 32, 64)]
    assert rdma == sorted(rdma)
    assert len(set(rdma)) == 3
    bigger = Config(48, 6, 512, 6, 256)
    assert bigger.get_nvl_buffer_size_hint(4096, 8) > config.get_nvl_buffer_size_hint(4096, 8)
    assert bigger.get_rdma_buffer_size_hint(4096, 16) > config.get_rdma_buffer_size_hint(4096, 16)
