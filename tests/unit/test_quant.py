"""Tests of ``epcomm.quant`` against a naive per-group implementation written here (CPU only)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import struct
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest
import torch


def _load_quant() -> ModuleType:
    try:
        return importlib.import_module("epcomm.quant")
    except ImportError:
        # ``epcomm/__init__.py`` may pull in modules that are not importable here; quant.py is standalone.
        path = Path(__file__).resolve().parents[2] / "src" / "epcomm" / "quant.py"
        spec = importlib.util.spec_from_file_location("_epcomm_quant_under_test", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


quant = _load_quant()

HIDDENS = [128, 256, 640, 7168]
FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------------------
# Naive reference: python math per group, torch only for the final per-group division + fp8 cast.
# ----------------------------------------------------------------------------------------------------------


def _f32(v: float) -> float:
    """Rounds a python float to the nearest float32 (round-to-nearest-even)."""
    return float(struct.unpack("<f", struct.pack("<f", v))[0])


def _f32_bits(v: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", v))[0])


def _naive_scale(group: list[float], round_scale: bool) -> float:
    amax = max(max(abs(v) for v in group), 1e-4)
    amax = _f32(amax)  # the clamp constant 1e-4 is a float32 in torch
    # A float64 division of two float32 values, rounded once to float32, is the correctly rounded
    # float32 quotient (53 >= 2 * 24 + 2 bits), i.e. what an IEEE float32 division gives.
    s = _f32(amax / 448.0)
    if round_scale:
        mantissa, exponent = math.frexp(s)  # s = mantissa * 2**exponent, 0.5 <= mantissa < 1
        s = math.ldexp(1.0, exponent - 1) if mantissa == 0.5 else math.ldexp(1.0, exponent)
    return s


def _naive_quant(x: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, list[list[float]]]:
    num_tokens, hidden = x.shape
    xf = x.float()
    out = torch.empty(num_tokens, hidden, dtype=FP8)
    scales: list[list[float]] = []
    for t in range(num_tokens):
        row_scales = []
        for g in range(hidden // 128):
            group = xf[t, g * 128 : (g + 1) * 128]
            s = _naive_scale(group.tolist(), round_scale)
            row_scales.append(s)
            divisor = torch.full((128,), s, dtype=torch.float32)
            out[t, g * 128 : (g + 1) * 128] = (group / divisor).to(FP8)
        scales.append(row_scales)
    return out, scales


def _naive_pack(scales: list[list[float]]) -> torch.Tensor:
    rows = []
    for row in scales:
        words = [0] * math.ceil(len(row) / 4)
        for g, s in enumerate(row):
            words[g // 4] |= ((_f32_bits(s) >> 23) & 0xFF) << (8 * (g % 4))
        rows.append([w - (1 << 32) if w >= (1 << 31) else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


def _naive_cast_back(x_fp8: torch.Tensor, scales: list[list[float]]) -> torch.Tensor:
    out = torch.empty(x_fp8.shape, dtype=torch.float32)
    for t, row in enumerate(scales):
        for g, s in enumerate(row):
            out[t, g * 128 : (g + 1) * 128] = x_fp8[t, g * 128 : (g + 1) * 128].float() * s
    return out.to(torch.bfloat16)


def _random_bf16(seed: int, num_tokens: int, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    # Spread magnitudes over many binades per group so scales differ between groups and tokens.
    log_mag = torch.randint(-12, 12, (num_tokens, hidden // 128, 1), generator=gen).float()
    x = (x.view(num_tokens, hidden // 128, 128) * torch.exp2(log_mag)).view(num_tokens, hidden)
    x = x.to(torch.bfloat16)
    assert bool((x != 0).any())
    return x


def _fresh_seed(*parts: object) -> int:
    """A distinct, reproducible seed per test case."""
    return zlib.crc32(repr(("test_quant", *parts)).encode()) & 0x7FFFFFFF


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    if a.dtype == FP8:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _num_tokens(hidden: int) -> int:
    return 3 if hidden >= 4096 else 7


# ----------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------


def test_constants() -> None:
    assert quant.FP8_MAX == 448.0 == torch.finfo(FP8).max
    assert quant.FP8_GROUP_SIZE == 128
    assert quant.UE8M0_PER_INT32 == 4
    assert quant.AMAX_MIN == 1e-4


@pytest.mark.parametrize(
    ("hidden", "n", "p"), [(128, 1, 1), (256, 2, 1), (512, 4, 1), (640, 5, 2), (7168, 56, 14), (4096, 32, 8)]
)
def test_num_scales_and_packed(hidden: int, n: int, p: int) -> None:
    assert quant.num_scales(hidden) == n
    assert quant.num_packed_ue8m0(hidden) == p


@pytest.mark.parametrize("hidden", [0, 100, 129, 7000, -128])
def test_num_scales_rejects_bad_hidden(hidden: int) -> None:
    with pytest.raises(ValueError, match="hidden"):
        quant.num_scales(hidden)
    with pytest.raises(ValueError, match="hidden"):
        quant.num_packed_ue8m0(hidden)


# ----------------------------------------------------------------------------------------------------------
# Against the naive reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("hidden", HIDDENS)
def test_matches_naive(hidden: int, round_scale: bool) -> None:
    x = _random_bf16(_fresh_seed("naive", hidden, round_scale), _num_tokens(hidden), hidden)
    ref_fp8, ref_scales = _naive_quant(x, round_scale)

    x_fp8, scales = quant.per_token_cast_to_fp8(x, round_scale=round_scale)
    assert x_fp8.dtype == FP8
    assert x_fp8.shape == x.shape
    assert x_fp8.is_contiguous()
    assert scales.dtype == torch.float32
    assert scales.shape == (x.shape[0], hidden // 128)
    assert scales.is_contiguous()
    assert scales.tolist() == ref_scales
    assert _same_bits(x_fp8, ref_fp8)
    assert torch.equal(quant.compute_scales(x, round_scale=round_scale), scales)

    back = quant.per_token_cast_back(x_fp8, scales)
    assert back.dtype == torch.bfloat16
    assert back.shape == x.shape
    assert _same_bits(back, _naive_cast_back(x_fp8, ref_scales))


@pytest.mark.parametrize("hidden", HIDDENS)
def test_fp32_input_matches_naive(hidden: int) -> None:
    gen = torch.Generator().manual_seed(_fresh_seed("fp32", hidden))
    x = torch.randn(_num_tokens(hidden), hidden, generator=gen) * 3.7
    ref_fp8, ref_scales = _naive_quant(x, round_scale=False)
    x_fp8, scales = quant.per_token_cast_to_fp8(x)
    assert scales.tolist() == ref_scales
    assert _same_bits(x_fp8, ref_fp8)


@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("hidden", HIDDENS)
def test_cast_back_error_bound(hidden: int, round_scale: bool) -> None:
    num_tokens = _num_tokens(hidden)
    x = _random_bf16(_fresh_seed("err", hidden, round_scale), num_tokens, hidden)
    x_fp8, scales = quant.per_token_cast_to_fp8(x, round_scale=round_scale)
    back = quant.per_token_cast_back(x_fp8, scales, out_dtype=torch.float32)
    err = (back - x.float()).abs().view(num_tokens, -1, 128).amax(-1)
    group_max = x.float().abs().view(num_tokens, -1, 128).amax(-1)
    assert bool((err <= group_max / 16).all())
    # Not trivially passing: the quantization does lose precision somewhere.
    assert bool((err > 0).any())


# ----------------------------------------------------------------------------------------------------------
# Power-of-two scales and exact round trips
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDENS)
def test_round_scale_is_smallest_power_of_two(hidden: int) -> None:
    num_tokens = _num_tokens(hidden)
    x = _random_bf16(_fresh_seed("pow2", hidden), num_tokens, hidden)
    scales = quant.compute_scales(x, round_scale=True)
    plain = quant.compute_scales(x, round_scale=False)
    amax = x.float().abs().view(num_tokens, -1, 128).amax(-1).clamp(min=1e-4)
    for s, p, a in zip(
        scales.flatten().tolist(), plain.flatten().tolist(), amax.flatten().tolist(), strict=True
    ):
        mantissa, _ = math.frexp(s)
        assert mantissa == 0.5  # a power of two
        assert s >= p
        assert s * 448.0 >= a
        assert s / 2 < p  # the smallest such power of two


@pytest.mark.parametrize("exponent", [-20, -9, -1, 0, 1, 7, 15])
def test_round_scale_exact_at_powers_of_two(exponent: int) -> None:
    # amax = 448 * 2**e gives scale_inv exactly 2**e: rounding must keep it (a float log2 could bump it).
    x = torch.zeros(3, 256, dtype=torch.float32)
    x[0, 5] = 448.0 * 2.0**exponent
    x[1, 130] = -448.0 * 2.0**exponent
    x[2, :] = 448.0 * 2.0**exponent * (1 + 2.0**-20)  # just above: must go to the next power of two
    scales = quant.compute_scales(x, round_scale=True)
    assert scales[0, 0].item() == 2.0**exponent
    assert scales[1, 1].item() == 2.0**exponent
    assert scales[2, 0].item() == 2.0 ** (exponent + 1)


@pytest.mark.parametrize("hidden", HIDDENS)
def test_exact_round_trip_of_representable_data(hidden: int) -> None:
    num_tokens = _num_tokens(hidden)
    n_groups = hidden // 128
    gen = torch.Generator().manual_seed(_fresh_seed("exact", hidden))
    codes = torch.randint(0, 256, (num_tokens, hidden), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # drop the NaN encodings
    fp8 = codes.view(FP8).clone()
    # Put +-448 somewhere in every group so amax / 448 is exactly the group's power-of-two scale.
    pos = torch.randint(0, 128, (num_tokens, n_groups), generator=gen)
    sign = torch.randint(0, 2, (num_tokens, n_groups), generator=gen)
    for t in range(num_tokens):
        for g in range(n_groups):
            fp8[t, g * 128 + int(pos[t, g])] = 448.0 if int(sign[t, g]) else -448.0
    exps = torch.randint(-15, 16, (num_tokens, n_groups), generator=gen).float()
    pow2 = torch.exp2(exps)
    x = (fp8.float().view(num_tokens, n_groups, 128) * pow2.unsqueeze(-1)).view(num_tokens, hidden)
    x_bf16 = x.to(torch.bfloat16)
    assert torch.equal(x_bf16.float(), x)  # exactly representable

    for use_ue8m0 in (False, True):
        x_fp8, scales = quant.per_token_cast_to_fp8(x_bf16, round_scale=True, use_ue8m0=use_ue8m0)
        assert _same_bits(x_fp8, fp8)
        if not use_ue8m0:
            assert torch.equal(scales, pow2)
        back = quant.per_token_cast_back(x_fp8, scales)
        assert _same_bits(back, x_bf16)


# ----------------------------------------------------------------------------------------------------------
# UE8M0 packing
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDENS)
def test_ue8m0_matches_naive_and_float_path(hidden: int) -> None:
    num_tokens = _num_tokens(hidden)
    x = _random_bf16(_fresh_seed("ue8m0", hidden), num_tokens, hidden)
    x_fp8_f, scales_f = quant.per_token_cast_to_fp8(x, round_scale=True)
    x_fp8_p, packed = quant.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert packed.dtype == torch.int32
    assert packed.is_contiguous()
    assert packed.shape == (num_tokens, math.ceil(hidden / 512))
    assert _same_bits(x_fp8_p, x_fp8_f)
    assert torch.equal(packed, _naive_pack(scales_f.tolist()))
    assert torch.equal(quant.pack_ue8m0(scales_f), packed)
    assert torch.equal(quant.unpack_ue8m0(packed, hidden // 128), scales_f)
    assert _same_bits(
        quant.per_token_cast_back(x_fp8_p, packed), quant.per_token_cast_back(x_fp8_f, scales_f)
    )


@pytest.mark.parametrize("n_scales", [1, 3, 4, 5, 8, 56])
def test_pack_unpack_inverse(n_scales: int) -> None:
    gen = torch.Generator().manual_seed(_fresh_seed("pack", n_scales))
    # Exponent bytes over the whole usable range, including ones with the top bit set (negative int32).
    exps = torch.randint(1, 255, (2, 3, n_scales), generator=gen, dtype=torch.int32)
    exps[0, 0, -1] = 254
    scales = (exps << 23).view(torch.float32)
    packed = quant.pack_ue8m0(scales)
    assert packed.shape == (2, 3, math.ceil(n_scales / 4))
    assert packed.dtype == torch.int32
    assert torch.equal(packed.view(6, -1), _naive_pack(scales.view(6, -1).tolist()))
    assert torch.equal(quant.unpack_ue8m0(packed, n_scales), scales)
    # Padding bytes are zero.
    if n_scales % 4:
        last = packed[..., -1].to(torch.int64) & 0xFFFFFFFF
        assert bool((last >> (8 * (n_scales % 4)) == 0).all())


def test_pack_layout_little_endian() -> None:
    # 640 channels -> 5 groups -> 2 int32: group 4*i+j lives in byte j of word i.
    scales = torch.tensor([[2.0**-7, 2.0**0, 2.0**3, 2.0**-20, 2.0**5]])
    packed = quant.pack_ue8m0(scales)
    e = [127 - 7, 127, 130, 107, 132]
    word0 = e[0] | e[1] << 8 | e[2] << 16 | e[3] << 24
    assert packed.tolist() == [[word0, e[4]]]
    # Same bytes as a little-endian byte view (what DeepEP's reference per_token_cast_back reads).
    assert packed.view(torch.uint8)[0, :5].tolist() == e
    assert packed.view(torch.uint8)[0, 5:].tolist() == [0, 0, 0]


def test_pack_accepts_strided_scales() -> None:
    scales = torch.exp2(torch.randint(-10, 10, (5, 9), generator=torch.Generator().manual_seed(3)).float())
    col_major = scales.t().contiguous().t()
    assert not col_major.is_contiguous()
    assert torch.equal(quant.pack_ue8m0(col_major), quant.pack_ue8m0(scales))
    packed = quant.pack_ue8m0(scales)
    assert torch.equal(quant.unpack_ue8m0(packed.t().contiguous().t(), 9), scales)


# ----------------------------------------------------------------------------------------------------------
# per_token_cast_back layouts
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("hidden", [640, 7168])
def test_cast_back_column_major_scales(hidden: int, use_ue8m0: bool) -> None:
    x = _random_bf16(_fresh_seed("colmajor", hidden, use_ue8m0), 9, hidden)
    x_fp8, scales = quant.per_token_cast_to_fp8(x, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)
    col_major = scales.t().contiguous().t()  # DeepEP hands out scales as transposed views like this
    assert col_major.stride() == (1, 9)
    assert _same_bits(quant.per_token_cast_back(x_fp8, col_major), quant.per_token_cast_back(x_fp8, scales))


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_cast_back_low_latency_layout(use_ue8m0: bool) -> None:
    num_experts, rows, hidden = 3, 5, 640
    x = _random_bf16(_fresh_seed("ll", use_ue8m0), num_experts * rows, hidden)
    x_fp8, scales = quant.per_token_cast_to_fp8(x, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)
    flat = quant.per_token_cast_back(x_fp8, scales, out_dtype=torch.float32)
    x3 = x_fp8.view(num_experts, rows, hidden)
    s3 = scales.view(num_experts, rows, -1)
    # Column-major per expert, as the low-latency buffers are laid out.
    s3 = s3.transpose(1, 2).contiguous().transpose(1, 2)
    back = quant.per_token_cast_back(x3, s3, out_dtype=torch.float32)
    assert back.shape == (num_experts, rows, hidden)
    assert torch.equal(back.view(-1, hidden), flat)


def test_strided_input_and_empty() -> None:
    gen = torch.Generator().manual_seed(_fresh_seed("strided"))
    x = torch.randn(256, 6, generator=gen).to(torch.bfloat16).t()  # [6, 256] transposed view
    assert not x.is_contiguous()
    x_fp8, scales = quant.per_token_cast_to_fp8(x)
    ref_fp8, ref_scales = quant.per_token_cast_to_fp8(x.contiguous())
    assert _same_bits(x_fp8, ref_fp8)
    assert torch.equal(scales, ref_scales)

    empty = torch.empty(0, 640, dtype=torch.bfloat16)
    e_fp8, e_packed = quant.per_token_cast_to_fp8(empty, round_scale=True, use_ue8m0=True)
    assert e_fp8.shape == (0, 640)
    assert e_packed.shape == (0, 2)
    assert quant.per_token_cast_back(e_fp8, e_packed).shape == (0, 640)


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_all_zero_rows_are_finite(use_ue8m0: bool) -> None:
    x = _random_bf16(_fresh_seed("zero", use_ue8m0), 4, 640)
    x[1] = 0
    x[3, 128:256] = 0
    x_fp8, scales = quant.per_token_cast_to_fp8(x, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)
    plain = quant.compute_scales(x, round_scale=use_ue8m0)
    expected_zero_scale = _naive_scale([0.0], use_ue8m0)
    assert plain[1].tolist() == [expected_zero_scale] * 5
    assert plain[3, 1].item() == expected_zero_scale
    assert bool(torch.isfinite(plain).all())
    assert bool((plain > 0).all())
    assert bool(torch.isfinite(x_fp8.float()).all())
    back = quant.per_token_cast_back(x_fp8, scales)
    assert bool(torch.isfinite(back.float()).all())
    assert bool((back[1] == 0).all())
    assert bool((back[3, 128:256] == 0).all())


# ----------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------


def test_errors_cast_to_fp8() -> None:
    good = torch.randn(2, 256, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"`x`.*torch\.int32"):
        quant.per_token_cast_to_fp8(torch.ones(2, 256, dtype=torch.int32))
    with pytest.raises(TypeError, match="`x`"):
        quant.compute_scales(good.to(FP8))
    with pytest.raises(ValueError, match=r"`x`.*2-D.*\(512,\)"):
        quant.per_token_cast_to_fp8(torch.randn(512))
    with pytest.raises(ValueError, match=r"`x`.*3-D"):
        quant.compute_scales(torch.randn(2, 2, 256))
    with pytest.raises(ValueError, match=r"hidden=200"):
        quant.per_token_cast_to_fp8(torch.randn(2, 200))
    with pytest.raises(ValueError, match=r"use_ue8m0.*round_scale"):
        quant.per_token_cast_to_fp8(good, use_ue8m0=True)
    with pytest.raises(TypeError, match="`x`"):
        quant.compute_scales([[1.0] * 128])


def test_errors_cast_back() -> None:
    x_fp8, scales = quant.per_token_cast_to_fp8(torch.randn(4, 640))
    _, packed = quant.per_token_cast_to_fp8(torch.randn(4, 640), round_scale=True, use_ue8m0=True)
    with pytest.raises(TypeError, match=r"`x_fp8`.*torch\.bfloat16"):
        quant.per_token_cast_back(x_fp8.to(torch.bfloat16), scales)
    with pytest.raises(TypeError, match=r"`scales`.*torch\.float16"):
        quant.per_token_cast_back(x_fp8, scales.half())
    with pytest.raises(ValueError, match=r"`scales`.*\(4, 5\).*\(4, 4\)"):
        quant.per_token_cast_back(x_fp8, scales[:, :4])
    with pytest.raises(ValueError, match=r"`scales`.*\(4, 2\).*\(4, 5\)"):
        quant.per_token_cast_back(x_fp8, scales.view(torch.int32))
    with pytest.raises(ValueError, match=r"`scales`.*\(4, 2\).*\(2, 2\)"):
        quant.per_token_cast_back(x_fp8, packed[:2])
    with pytest.raises(ValueError, match=r"`scales`.*\(2, 2, 5\)"):
        quant.per_token_cast_back(x_fp8, scales.view(2, 2, 5))
    with pytest.raises(ValueError, match=r"`x_fp8`.*hidden=64"):
        quant.per_token_cast_back(x_fp8[:, :64], scales[:, :1])
    with pytest.raises(TypeError, match="`out_dtype`"):
        quant.per_token_cast_back(x_fp8, scales, out_dtype=torch.int32)


def test_errors_pack_unpack() -> None:
    with pytest.raises(TypeError, match=r"`scales`.*torch\.float64"):
        quant.pack_ue8m0(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"`packed`.*torch\.int64"):
        quant.unpack_ue8m0(torch.zeros(2, 2, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match=r"`packed`.*\[\.\.\., 2\].*\(2, 3\)"):
        quant.unpack_ue8m0(torch.zeros(2, 3, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="`num_scales`"):
        quant.unpack_ue8m0(torch.zeros(2, 3, dtype=torch.int32), 0)
