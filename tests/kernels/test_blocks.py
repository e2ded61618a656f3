"""``kernels/blocks.py``: the kernels' index tables (CSR / CSC of the live blocks), packing and
unpacking of live blocks, block layouts of masks, and which block shapes the kernels take."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.kernels.blocks import (
    BlockLayout,
    block_layout,
    is_block_structured,
    kernel_block_ok,
    layout_to_mask,
    pack_blocks,
    unpack_blocks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _layout(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < density


@pytest.mark.parametrize("seed", range(6))
def test_tables_describe_the_layout(seed):
    layout = _layout(5, 7, 0.4, seed)
    layout[seed % 5] = False  # an empty block-row
    layout[:, seed % 7] = False  # an empty block-column
    t = BlockLayout.build(layout, (32, 16))
    live = [tuple(b) for b in layout.nonzero().tolist()]
    assert t.nnz == len(live) and t.shape == (160, 112) and t.grid == (5, 7)
    assert all(x.dtype == torch.int32 for x in (t.row_ptr, t.row_cols, t.col_ptr, t.col_rows, t.col_ids, t.blk_rows))
    # CSR: block-row n owns ids row_ptr[n]..row_ptr[n+1]-1, numbered row-major
    from_rows = [(n, int(t.row_cols[i])) for n in range(5) for i in range(int(t.row_ptr[n]), int(t.row_ptr[n + 1]))]
    assert from_rows == live
    assert [(int(t.blk_rows[i]), int(t.row_cols[i])) for i in range(t.nnz)] == live
    # CSC: column k lists its blocks top to bottom, each with its packed id
    for k in range(7):
        entries = range(int(t.col_ptr[k]), int(t.col_ptr[k + 1]))
        rows = [int(t.col_rows[e]) for e in entries]
        assert rows == [n for n, c in live if c == k]
        for e in entries:
            i = int(t.col_ids[e])
            assert (int(t.blk_rows[i]), int(t.row_cols[i])) == (int(t.col_rows[e]), k)


def test_empty_and_full_layouts():
    empty = BlockLayout.build(torch.zeros(3, 4, dtype=torch.bool), (16, 16))
    assert empty.nnz == 0 and empty.row_ptr.tolist() == [0, 0, 0, 0] and empty.col_ptr.tolist() == [0] * 5
    full = BlockLayout.build(torch.ones(3, 4, dtype=torch.bool), (16, 16))
    assert full.nnz == 12 and full.row_ptr.tolist() == [0, 4, 8, 12] and full.density() == 1.0


def test_pack_unpack_round_trip():
    layout = _layout(4, 6, 0.5, 1)
    t = BlockLayout.build(layout, (16, 32))
    w = torch.randn(64, 192)
    packed = pack_blocks(w, t, torch.float64)
    assert packed.shape == (t.nnz, 16, 32) and packed.dtype == torch.float64 and packed.is_contiguous()
    mask = layout_to_mask(layout, (16, 32), w.shape)
    assert torch.equal(unpack_blocks(packed, t, torch.float32), torch.where(mask, w, 0.0))
    first = layout.nonzero()[0].tolist()
    assert torch.equal(packed[0].float(), w[first[0] * 16 : first[0] * 16 + 16, first[1] * 32 : first[1] * 32 + 32])


@pytest.mark.parametrize(
    ("shape", "block", "ok"),
    [((256, 128), (64, 64), True), ((256, 128), (128, 32), True), ((100, 128), (64, 64), False),
     ((256, 128), (48, 48), False), ((256, 128), (8, 8), False), ((512, 512), (512, 512), False)],
)  # fmt: skip
def test_kernel_block_ok(shape, block, ok):
    assert kernel_block_ok(shape, block) is ok


def test_block_layout_of_unstructured_mask_and_check():
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 0] = True
    mask[5, 5] = True
    assert block_layout(mask, 4).tolist() == [[True, False], [False, True]]
    assert not is_block_structured(mask, 4)
    assert is_block_structured(layout_to_mask(block_layout(mask, 4), 4, (6, 6)), 4)
    assert is_block_structured(torch.zeros(6, 6, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="layout of shape"):
        layout_to_mask(torch.ones(3, 3, dtype=torch.bool), 4, (6, 6))
