"""Per-token x per-128-channel FP8 (``float8_e4m3fn``) quantization helpers.

These match the FP8 layout DeepEP uses for dispatch: every token row of ``hidden`` channels is split into
groups of ``FP8_GROUP_SIZE`` (128) channels, each group gets one float32 scale ``scale_inv = amax / 448``
and the data are stored as ``x / scale_inv`` in ``float8_e4m3fn``. With ``round_scale`` the scale is rounded
up to a power of two, and with ``use_ue8m0`` those power-of-two scales are stored as their 8-bit biased
exponents (UE8M0), packed four per ``int32`` (group ``4 * i + j`` in byte ``j`` of word ``i``).

Everything is pure torch, works on CPU and CUDA, never synchronizes with the device (no ``.item()``, no
data-dependent shapes) and is usable as a reference for the Triton kernels.
"""

from __future__ import annotations

import torch

__all__ = [
    "AMAX_MIN",
    "FP8_GROUP_SIZE",
    "FP8_MAX",
    "UE8M0_PER_INT32",
    "compute_scales",
    "num_packed_ue8m0",
    "num_scales",
    "pack_ue8m0",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "unpack_ue8m0",
]

FP8_MAX: float = 448.0
"""Largest finite ``float8_e4m3fn`` value; ``scale_inv = amax / FP8_MAX``."""

FP8_GROUP_SIZE: int = 128
"""Channels sharing one scale."""

UE8M0_PER_INT32: int = 4
"""UE8M0 exponent bytes packed into one ``int32``."""

AMAX_MIN: float = 1e-4
"""Lower clamp of a group's absolute maximum (as DeepEP), so all-zero groups get a finite, non-zero scale."""

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MANTISSA_BITS = 23
_MANTISSA_MASK = (1 << _MANTISSA_BITS) - 1
_EXPONENT_MASK = 0xFF


def num_scales(hidden: int) -> int:
    """Number of per-group scales of one token row.

    Arguments:
        hidden: the hidden size (channels per token), a positive multiple of ``FP8_GROUP_SIZE`` (128).

    Returns:
        num_scales: ``hidden // 128``.

    Raises:
        ValueError: ``hidden`` is not a positive multiple of 128.
    """
    if isinstance(hidden, bool) or not isinstance(hidden, int):
        raise TypeError(f"num_scales: `hidden` must be an int, got {type(hidden).__name__} ({hidden!r})")
    if hidden <= 0 or hidden % FP8_GROUP_SIZE != 0:
        raise ValueError(
            f"num_scales: `hidden` must be a positive multiple of {FP8_GROUP_SIZE} for FP8 "
            f"per-{FP8_GROUP_SIZE}-channel scales, got hidden={hidden}"
        )
    return hidden // FP8_GROUP_SIZE


def num_packed_ue8m0(hidden: int) -> int:
    """Number of ``int32`` words holding one token row's packed UE8M0 scales.

    Arguments:
        hidden: the hidden size, a positive multiple of 128.

    Returns:
        num_packed: ``ceil(hidden / 128 / 4)`` (= ``ceil(hidden / 512)``).

    Raises:
        ValueError: ``hidden`` is not a positive multiple of 128.
    """
    return -(-num_scales(hidden) // UE8M0_PER_INT32)


def _check_tensor(fn: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_input(fn: str, x: torch.Tensor) -> tuple[int, int]:
    """Validates a ``[num_tokens, hidden]`` bf16/fp16/fp32 input; returns ``(num_tokens, num_scales)``."""
    _check_tensor(fn, "x", x)
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"{fn}: `x` must have dtype torch.bfloat16, torch.float16 or torch.float32, got {x.dtype}"
        )
    if x.dim() != 2:
        raise ValueError(
            f"{fn}: `x` must be 2-D [num_tokens, hidden], got {x.dim()}-D with shape {tuple(x.shape)}"
        )
    hidden = int(x.shape[1])
    if hidden <= 0 or hidden % FP8_GROUP_SIZE != 0:
        raise ValueError(
            f"{fn}: `x` hidden size (x.shape[1]) must be a positive multiple of {FP8_GROUP_SIZE}, "
            f"got hidden={hidden}"
        )
    return int(x.shape[0]), hidden // FP8_GROUP_SIZE


def _round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= s`` for positive normal float32 ``s``, exactly (integer exponent math)."""
    bits = s.view(torch.int32)
    exponent = bits >> _MANTISSA_BITS  # s > 0: the sign bit is clear, so this is the biased exponent
    exponent = exponent + ((bits & _MANTISSA_MASK) != 0).to(torch.int32)
    return (exponent << _MANTISSA_BITS).view(torch.float32)


def compute_scales(x: torch.Tensor, round_scale: bool = False) -> torch.Tensor:
    """Per-token, per-128-channel dequantization scales ``scale_inv = max(amax, 1e-4) / 448``.

    The absolute maximum of each group of 128 consecutive channels is taken in float32 and clamped below
    at ``AMAX_MIN``; the division by ``FP8_MAX`` is an IEEE float32 division. With ``round_scale`` every
    scale is replaced by the smallest power of two ``>=`` it (``2 ** ceil(log2(scale_inv))``), computed
    exactly from the float32 bits (a float ``log2`` can be off by one at exact powers of two).

    Arguments:
        x: ``torch.Tensor`` with ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``,
            shape ``[num_tokens, hidden]``, ``hidden`` a multiple of 128; any strides.
        round_scale: round every scale up to a power of two (needed for UE8M0 scales).

    Returns:
        scales: ``torch.Tensor`` with ``torch.float32``, shape ``[num_tokens, hidden // 128]``, contiguous,
            every element positive (NaN if its group holds a NaN, ``inf`` if it holds an infinity).
    """
    num_tokens, n_scales = _check_input("compute_scales", x)
    groups = x.float().reshape(num_tokens, n_scales, FP8_GROUP_SIZE)
    amax = groups.abs().amax(dim=-1).clamp(min=AMAX_MIN)
    # Divide by a same-device tensor, not a python scalar: CUDA torch turns ``tensor / scalar`` into a
    # multiplication by the rounded reciprocal, which is not the IEEE quotient (differs in the last bit).
    scale_inv = amax / torch.full_like(amax, FP8_MAX)
    if round_scale:
        scale_inv = _round_up_pow2(scale_inv)
    return scale_inv.contiguous()


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Packs power-of-two float32 scales into UE8M0 exponent bytes, four per ``int32``.

    Scale ``4 * i + j`` of a row becomes byte ``j`` (little-endian) of word ``i``: its IEEE biased exponent
    ``(bits >> 23) & 0xFF``, i.e. ``word |= exponent << (8 * j)``. Padding bytes (when ``num_scales`` is not
    a multiple of 4) are 0. The values are NOT checked (that would need a device sync): every scale must
    be a positive power of two (e.g. from ``compute_scales(..., round_scale=True)``), otherwise its mantissa
    and sign are silently dropped.

    Arguments:
        scales: ``torch.Tensor`` with ``torch.float32``, shape ``[..., num_scales]``, any strides.

    Returns:
        packed: ``torch.Tensor`` with ``torch.int32``, shape ``[..., ceil(num_scales / 4)]``, contiguous.
    """
    _check_tensor("pack_ue8m0", "scales", scales)
    if scales.dtype != torch.float32:
        raise TypeError(f"pack_ue8m0: `scales` must have dtype torch.float32, got {scales.dtype}")
    if scales.dim() < 1:
        raise ValueError(
            f"pack_ue8m0: `scales` must have at least 1 dimension, got shape {tuple(scales.shape)}"
        )
    n_scales = int(scales.shape[-1])
    n_packed = -(-n_scales // UE8M0_PER_INT32)
    lead = tuple(scales.shape[:-1])
    exponents = ((scales.view(torch.int32) >> _MANTISSA_BITS) & _EXPONENT_MASK).to(torch.int64)
    padded = exponents.new_zeros((*lead, n_packed * UE8M0_PER_INT32))
    padded[..., :n_scales] = exponents
    padded = padded.reshape(*lead, n_packed, UE8M0_PER_INT32)
    words = padded[..., 0]
    for j in range(1, UE8M0_PER_INT32):
        words = words | (padded[..., j] << (8 * j))
    # The words are in [0, 2**32); wrap them into int32 range without relying on overflowing casts.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_ue8m0(packed: torch.Tensor, num_scales: int) -> torch.Tensor:
    """Unpacks UE8M0 exponent bytes (four per ``int32``) into float32 power-of-two scales.

    Inverse of ``pack_ue8m0``: byte ``j`` of word ``i`` is scale ``4 * i + j``; exponent byte ``e`` becomes
    the float32 with bits ``e << 23`` (i.e. ``2 ** (e - 127)``; ``e = 0`` gives 0.0, ``e = 255`` gives inf).

    Arguments:
        packed: ``torch.Tensor`` with ``torch.int32``, shape ``[..., ceil(num_scales / 4)]``, any strides.
        num_scales: number of scales per row (``hidden // 128``), positive.

    Returns:
        scales: ``torch.Tensor`` with ``torch.float32``, shape ``[..., num_scales]``, contiguous.
    """
    _check_tensor("unpack_ue8m0", "packed", packed)
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_ue8m0: `packed` must have dtype torch.int32, got {packed.dtype}")
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales <= 0:
        raise ValueError(f"unpack_ue8m0: `num_scales` must be a positive int, got {num_scales!r}")
    n_packed = -(-num_scales // UE8M0_PER_INT32)
    if packed.dim() < 1 or int(packed.shape[-1]) != n_packed:
        raise ValueError(
            f"unpack_ue8m0: `packed` must have shape [..., {n_packed}] (= ceil(num_scales / 4) for "
            f"num_scales={num_scales}), got {tuple(packed.shape)}"
        )
    lead = tuple(packed.shape[:-1])
    exponents = torch.stack(
        [(packed >> (8 * j)) & _EXPONENT_MASK for j in range(UE8M0_PER_INT32)], dim=-1
    ).reshape(*lead, n_packed * UE8M0_PER_INT32)[..., :num_scales]
    return (exponents << _MANTISSA_BITS).contiguous().view(torch.float32)


def per_token_cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes tokens to FP8 with one scale per token and 128 channels (DeepEP's dispatch FP8 layout).

    ``x_fp8 = (x.float() / scale_inv).to(torch.float8_e4m3fn)`` per group, an IEEE float32 division followed
    by torch's round-to-nearest-even cast, with ``scale_inv`` from ``compute_scales``.

    Arguments:
        x: ``torch.Tensor`` with ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``,
            shape ``[num_tokens, hidden]``, ``hidden`` a multiple of 128; any strides.
        round_scale: round every scale up to a power of two.
        use_ue8m0: return the scales packed as UE8M0 (requires ``round_scale=True``).

    Returns:
        x_fp8: ``torch.Tensor`` with ``torch.float8_e4m3fn``, shape ``[num_tokens, hidden]``, contiguous.
        scales: without ``use_ue8m0``: ``torch.Tensor`` with ``torch.float32``, shape
            ``[num_tokens, hidden // 128]``, contiguous (``x ~= x_fp8 * scales`` per group); with
            ``use_ue8m0``: ``torch.Tensor`` with ``torch.int32``, shape ``[num_tokens, ceil(hidden / 512)]``,
            contiguous, see ``pack_ue8m0``.
    """
    if use_ue8m0 and not round_scale:
        raise ValueError(
            "per_token_cast_to_fp8: `use_ue8m0=True` requires `round_scale=True` (UE8M0 scales are powers "
            f"of two), got round_scale={round_scale!r}"
        )
    num_tokens, n_scales = _check_input("per_token_cast_to_fp8", x)
    scale_inv = compute_scales(x, round_scale=round_scale)
    groups = x.float().reshape(num_tokens, n_scales, FP8_GROUP_SIZE)
    x_fp8 = (groups / scale_inv.unsqueeze(-1)).reshape(num_tokens, n_scales * FP8_GROUP_SIZE)
    x_fp8 = x_fp8.to(torch.float8_e4m3fn).contiguous()
    if use_ue8m0:
        return x_fp8, pack_ue8m0(scale_inv)
    return x_fp8, scale_inv


def per_token_cast_back(
    x_fp8: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantizes FP8 tokens: ``x_fp8.float() * scale`` per group of 128 channels, cast to ``out_dtype``.

    Leading dimensions are free, so both the normal layout ``[num_tokens, hidden]`` and the low-latency
    layout ``[num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden]`` work.

    Arguments:
        x_fp8: ``torch.Tensor`` with ``torch.float8_e4m3fn``, shape ``[..., hidden]``, ``hidden`` a multiple
            of 128; any strides.
        scales: either ``torch.Tensor`` with ``torch.float32``, shape ``[..., hidden // 128]``, or packed
            UE8M0 ``torch.Tensor`` with ``torch.int32``, shape ``[..., ceil(hidden / 512)]``; leading
            dimensions equal to ``x_fp8``'s; any strides (e.g. DeepEP's column-major scale views).
        out_dtype: floating-point dtype of the result.

    Returns:
        x: ``torch.Tensor`` with ``out_dtype``, shape ``[..., hidden]`` (same as ``x_fp8``), contiguous.
    """
    fn = "per_token_cast_back"
    _check_tensor(fn, "x_fp8", x_fp8)
    _check_tensor(fn, "scales", scales)
    if x_fp8.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{fn}: `x_fp8` must have dtype torch.float8_e4m3fn, got {x_fp8.dtype}")
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"{fn}: `out_dtype` must be a floating-point torch.dtype, got {out_dtype!r}")
    if x_fp8.dim() < 1:
        raise ValueError(f"{fn}: `x_fp8` must have shape [..., hidden], got a 0-D tensor")
    hidden = int(x_fp8.shape[-1])
    if hidden <= 0 or hidden % FP8_GROUP_SIZE != 0:
        raise ValueError(
            f"{fn}: `x_fp8` hidden size (x_fp8.shape[-1]) must be a positive multiple of "
            f"{FP8_GROUP_SIZE}, got hidden={hidden}"
        )
    n_scales = hidden // FP8_GROUP_SIZE
    lead = tuple(x_fp8.shape[:-1])
    if scales.dtype == torch.float32:
        expected = (*lead, n_scales)
    elif scales.dtype == torch.int32:
        expected = (*lead, -(-n_scales // UE8M0_PER_INT32))
    else:
        raise TypeError(
            f"{fn}: `scales` must have dtype torch.float32 (plain scales) or torch.int32 (packed UE8M0), "
            f"got {scales.dtype}"
        )
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"{fn}: `scales` ({scales.dtype}) must have shape {expected} for x_fp8 of shape "
            f"{tuple(x_fp8.shape)}, got {tuple(scales.shape)}"
        )
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales, n_scales)
    groups = x_fp8.float().reshape(*lead, n_scales, FP8_GROUP_SIZE)
    out = (groups * scales.unsqueeze(-1)).reshape(*lead, hidden)
    return out.to(out_dtype).contiguous()
