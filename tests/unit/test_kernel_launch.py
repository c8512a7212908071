"""``epcomm.kernels.launch``: the host-side helpers and the specialization key of the cached launch
path (it must tell apart every argument Triton would compile differently for)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from epcomm._math import cdiv, next_pow2
from epcomm.kernels.launch import _arg_key, _KernelInfo
from epcomm.kernels.normal_push import push_rows_kernel


@pytest.mark.parametrize(("n", "want"), [(1, 1), (2, 2), (3, 4), (8, 8), (3584, 4096), (4097, 8192)])
def test_next_pow2(n: int, want: int) -> None:
    assert next_pow2(n) == want


@pytest.mark.parametrize(("a", "b", "want"), [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (4096, 24, 171)])
def test_cdiv(a: int, b: int, want: int) -> None:
    assert cdiv(a, b) == want


def test_key_separates_what_triton_specializes_on() -> None:
    base = torch.zeros(64, dtype=torch.int32)
    # Tensors: dtype and 16-byte alignment of the address.
    assert _arg_key(base, True) == _arg_key(base[4:], True)  # 16 bytes further: still aligned
    assert _arg_key(base, True) != _arg_key(base[1:], True)  # 4 bytes further: not aligned
    assert _arg_key(base, True) != _arg_key(base.view(torch.float32), True)
    # Specialized integers: 1, multiples of 16 and 64-bit values are compiled differently.
    assert _arg_key(1, True) != _arg_key(2, True)
    assert _arg_key(16, True) != _arg_key(17, True)
    assert _arg_key(3, True) == _arg_key(5, True)
    assert _arg_key(2**31, True) != _arg_key(2**31 - 3, True)
    # do_not_specialize integers: only their width matters.
    assert _arg_key(1, False) == _arg_key(16, False) == _arg_key(7, False)
    assert _arg_key(2**40, False) != _arg_key(7, False)


def test_kernel_info_reads_the_signature() -> None:
    info = _KernelInfo(push_rows_kernel)
    assert info.cacheable
    assert info.constexpr_names[0] == "NUM_RANKS"
    assert info.constexpr_names[-1] == "FP_WORDS"
    names = [p.name for p in push_rows_kernel.params if not p.is_constexpr]
    not_specialized = {name for name, special in zip(names, info.specialize) if not special}
    # Per-call scalars are not specialized (no recompilation when they change); the region offsets
    # are, so Triton knows their 16-byte alignment.
    assert {"num_rows", "rank", "exit_epoch", "fp1", "record_address"} <= not_specialized
    assert not {"x_offset", "scales_offset", "topk_idx_offset", "topk_weights_offset"} & not_specialized


def test_push_rows_per_step_keeps_the_bytes_in_flight() -> None:
    import epcomm.kernels.normal_push as push

    assert push.push_rows_per_step(3584 + 1, False) == 2  # BF16 hidden 7168 (measured best at EP4)
    assert push.push_rows_per_step(1792 + 56, False) == 4  # FP8 hidden 7168 with its scales
    assert push.push_rows_per_step(3584 + 1, True) == 4  # combine: one destination per row
    assert push.push_rows_per_step(64, False) == 8  # small rows: capped
    assert push.push_rows_per_step(100_000, True) == 2  # huge rows: at least 2
    assert push.push_rows_per_step(3584 + 1, False, forced=1) == 1  # Settings.push_rows forces it
