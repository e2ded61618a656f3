"""``optim/packed_state.py``: the layout of a packed mask (bits, per-tile offsets) and packing /
unpacking with it. Its plain-torch steps are the reference of ``kernels/test_packed_step.py``."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.optim.packed_state import PackedMask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_packed_mask_layout():
    mask = torch.zeros(3, 700, dtype=torch.bool)
    mask[0, 5] = mask[1, 3] = mask[2, 699] = True
    mask[1, 400:500] = True
    pack = PackedMask(mask, block=512)
    flat = mask.reshape(-1)
    assert pack.kept == int(flat.sum()) and pack.numel == flat.numel()
    assert pack.bits.dtype == torch.uint8 and pack.bits.numel() == 5 * 512 // 8
    bits = ((pack.bits[:, None].to(torch.int32) >> torch.arange(8)) & 1).reshape(-1).bool()
    assert torch.equal(bits[: flat.numel()], flat) and not bits[flat.numel() :].any()
    counts = torch.nn.functional.pad(flat, (0, 5 * 512 - flat.numel())).view(5, 512).sum(1)
    assert pack.offsets.tolist() == (counts.cumsum(0) - counts).tolist()
    dense = torch.randn(3, 700)
    torch.testing.assert_close(pack.unpack(pack.pack(dense)), dense * mask)
