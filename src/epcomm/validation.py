"""Argument checks of the public API: clear ``TypeError``/``ValueError`` before any communication.

Every message names the argument, what was expected and what was received.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from epcomm.env import ValueCheck
from epcomm.quant import FP8_GROUP_SIZE, num_packed_ue8m0, num_scales

__all__ = [
    "check_dtype",
    "check_expert_ids",
    "check_int",
    "check_same_device",
    "check_shape",
    "check_tensor",
    "should_check_values",
]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={list(value.shape)}, dtype={value.dtype}, device={value.device})"
    return repr(value)


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` must be a ``torch.Tensor``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def check_dtype(name: str, tensor: torch.Tensor, dtypes: torch.dtype | Sequence[torch.dtype]) -> None:
    """``tensor.dtype`` must be one of ``dtypes``."""
    allowed = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    if tensor.dtype not in allowed:
        expected = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {expected}; got {tensor.dtype}")


def check_shape(name: str, tensor: torch.Tensor, shape: Sequence[int | None]) -> None:
    """``tensor`` must have ``len(shape)`` dims, each equal to ``shape[i]`` unless that is ``None``."""
    actual = tensor.shape
    if len(actual) == len(shape):
        for want, got in zip(shape, actual):
            if want is not None and want != got:
                break
        else:
            return  # the common case: no message built, no generator (called ~6 times per dispatch)
    expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    raise ValueError(f"{name} must have shape {expected}; got {list(actual)}")


def check_same_device(name: str, tensor: torch.Tensor, device: torch.device, reference_name: str) -> None:
    """``tensor`` must live on ``device`` (the device of ``reference_name``)."""
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device} like {reference_name}; got {tensor.device}")


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` must be an ``int`` (not ``bool``), at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def should_check_values(tensor: torch.Tensor, mode: ValueCheck) -> bool:
    """Whether to read ``tensor``'s values on the host (``Settings.check_values``, from
    ``EPCOMM_CHECK_VALUES``)."""
    if mode is ValueCheck.ALWAYS:
        return True
    if mode is ValueCheck.NEVER:
        return False
    # On GPUs a value check is a device-to-host read that stalls the host; "auto" leaves it out
    # there (1.9 ms of host stalls per dispatch + combine pair measured on an H200).
    return tensor.device.type == "cpu"


def check_expert_ids(name: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every entry of ``topk_idx`` must be ``-1`` or in ``[0, num_experts)`` (reads the values)."""
    if topk_idx.numel() == 0:
        return
    low, high = int(topk_idx.min()), int(topk_idx.max())
    if low < -1 or high >= num_experts:
        bad = low if low < -1 else high
        raise ValueError(f"{name} holds expert id {bad}; expected -1 (no expert) or 0..{num_experts - 1}")


# ---- per-operation checks: each returns the backend request ------------------------------------


def split_x(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` as ``(data [num_tokens, hidden], scales [num_tokens, num_scales] or None)``."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"x as a tuple must be (x_fp8, x_scales); got a tuple of {len(x)} items")
        data = check_tensor("x[0] (x_fp8)", x[0])
        scales = check_tensor("x[1] (x_scales)", x[1])
        check_dtype("x[0] (x_fp8)", data, torch.float8_e4m3fn)
        check_shape("x[0] (x_fp8)", data, [None, None])
        check_dtype("x[1] (x_scales)", scales, (torch.float32, torch.int32))
        check_shape("x[1] (x_scales)", scales, [data.size(0), None])
        check_same_device("x[1] (x_scales)", scales, data.device, "x[0]")
        hidden = data.size(1)
        if hidden % FP8_GROUP_SIZE != 0:
            raise ValueError(
                f"x[0] (x_fp8): FP8 needs hidden a multiple of {FP8_GROUP_SIZE} (one scale per "
                f"{FP8_GROUP_SIZE} channels); got hidden={hidden}"
            )
        want = num_scales(hidden) if scales.dtype == torch.float32 else num_packed_ue8m0(hidden)
        if scales.size(1) != want:
            kind = "float32 scales" if scales.dtype == torch.float32 else "packed UE8M0 int32 scales"
            raise ValueError(
                f"x[1] (x_scales): hidden={hidden} has {want} {kind} per token; got {scales.size(1)} columns"
            )
        return data, scales
    data = check_tensor("x", x)
    check_dtype("x", data, torch.bfloat16)
    check_shape("x", data, [None, None])
    return data, None


def check_num_experts(name: str, num_experts: int, num_ranks: int) -> int:
    """``num_experts`` must be a positive multiple of ``num_ranks``."""
    check_int(name, num_experts, 1)
    if num_experts % num_ranks != 0:
        raise ValueError(f"{name} must be a multiple of num_ranks={num_ranks}; got {num_experts}")
    return num_experts


def check_topk(
    topk_idx: Any, topk_weights: Any, num_tokens: int | None, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``topk_idx [num_tokens, num_topk]`` int64 and optional ``topk_weights`` of that shape, float32."""
    idx = check_tensor("topk_idx", topk_idx)
    check_dtype("topk_idx", idx, torch.int64)
    check_shape("topk_idx", idx, [num_tokens, None])
    if idx.size(1) < 1:
        raise ValueError(f"topk_idx must have at least one column (num_topk >= 1); got {list(idx.shape)}")
    if device is not None:
        check_same_device("topk_idx", idx, device, "x")
    weights = None
    if topk_weights is not None:
        weights = check_tensor("topk_weights", topk_weights)
        check_dtype("topk_weights", weights, torch.float32)
        check_shape("topk_weights", weights, list(idx.shape))
        check_same_device("topk_weights", weights, idx.device, "topk_idx")
    return idx, weights
