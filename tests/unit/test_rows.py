"""``backends/rows.py``: rows packed to bytes and back, whatever the input strides (the reference
backend packs every field of a row this way)."""

from __future__ import annotations

import torch

from epcomm.backends.rows import RowLayout


def test_pack_takes_any_strides_and_unpack_restores_the_fields() -> None:
    layout = RowLayout([(4, torch.bfloat16), (2, torch.float32), (3, torch.int64)])
    x = torch.randn(5, 4).bfloat16()
    scales = torch.randn(2, 5).t()  # column-major, as FP8 scales often are
    idx = torch.arange(15).view(5, 3)
    x_back, scales_back, idx_back = layout.unpack(layout.pack([x, scales, idx]))
    assert torch.equal(x_back, x)
    assert torch.equal(scales_back, scales)
    assert torch.equal(idx_back, idx)


def test_pack_takes_empty_and_one_row_tensors_with_odd_strides() -> None:
    """An empty or one-row tensor counts as contiguous whatever its strides (stride 0 from an
    expand): an FP8 dispatch from a rank with no token gave such scales."""
    layout = RowLayout([(3, torch.float32)])
    empty = torch.empty(0, 3).as_strided((0, 3), (1, 0))  # stride 0 in the last dimension
    assert layout.pack([empty]).shape == (0, 12)
    one_row = torch.randn(3, 7).t()[:1]  # [1, 3], strides (1, 7)
    (back,) = layout.unpack(layout.pack([one_row]))
    assert torch.equal(back, one_row)
