"""``kernels/reference.py``: the plain-torch block-sparse linear oracle (forward, input and weight
gradients, the autograd function, the masked-dense fallback) against masked dense in float64."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetrain.kernels.blocks import block_grid, layout_to_mask
from sparsetrain.kernels.reference import (
    BlockSparseLinearFunction,
    block_sparse_linear_grad_input,
    block_sparse_linear_grad_weight,
    block_sparse_linear_reference,
    masked_dense,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _layout(grid, kind: str, gen: torch.Generator) -> torch.Tensor:
    layout = torch.rand(grid, generator=gen) < 0.5
    if kind == "rows":  # one all-empty and one all-full block row (and column)
        layout[0] = False
        layout[-1] = True
        layout[:, 0] = False
    elif kind == "empty":
        layout[:] = False
    elif kind == "full":
        layout[:] = True
    return layout


def _dense(x, weight, layout, block):
    """Masked dense in float64: the ground truth the oracle must match."""
    mask = layout_to_mask(layout, block, weight.shape)
    return x.double() @ torch.where(mask, weight.double(), 0.0).T


CASES = [((4, 7), 37, 29, (8, 8)), ((3, 5), 64, 48, (16, 16)), ((9,), 33, 130, (16, 32)), ((2, 1, 3), 20, 20, (7, 3)),
         ((0, 4), 16, 16, (8, 8)), ((5,), 1, 1, (1, 1))]

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1.3e-6}, torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2}}


@pytest.mark.parametrize(("lead", "out_f", "in_f", "block"), CASES)
@pytest.mark.parametrize("kind", ["random", "rows", "empty", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_ops_match_masked_dense(lead, out_f, in_f, block, kind, dtype):
    gen = torch.Generator().manual_seed(out_f * 1000 + in_f)
    layout = _layout(block_grid((out_f, in_f), block), kind, gen)
    x = torch.randn(*lead, in_f, generator=gen).to(dtype)
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype)
    dy = torch.randn(*lead, out_f, generator=gen).to(dtype)
    mask = layout_to_mask(layout, block, weight.shape)
    junk = weight.masked_fill(~mask, float("nan"))  # entries outside live blocks are never read
    tol = TOL[dtype]
    # bf16 sums of k products carry error growing with k: compare against float64 truth, scaled.
    scale = math.sqrt(max(in_f, out_f, 1)) if dtype == torch.bfloat16 else 1.0

    y = block_sparse_linear_reference(x, junk, layout, block)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    torch.testing.assert_close(y.double(), _dense(x, weight, layout, block), atol=tol["atol"] * scale, rtol=tol["rtol"])
    torch.testing.assert_close(y, masked_dense(x, junk, layout, block), **tol)

    dx = block_sparse_linear_grad_input(dy, junk, layout, block)
    mw = torch.where(mask, weight.double(), 0.0)
    assert dx.dtype == dtype and dx.shape == x.shape
    torch.testing.assert_close(dx.double(), dy.double() @ mw, atol=tol["atol"] * scale, rtol=tol["rtol"])

    dw = block_sparse_linear_grad_weight(x, dy, layout, block)
    assert dw.dtype == dtype and dw.shape == weight.shape
    full = dy.double().reshape(-1, out_f).T @ x.double().reshape(-1, in_f)
    rows = max(math.prod(lead), 1)
    bscale = math.sqrt(rows) if dtype == torch.bfloat16 else 1.0
    torch.testing.assert_close(dw.double(), torch.where(mask, full, 0.0), atol=tol["atol"] * bscale, rtol=tol["rtol"])
    assert (dw[~mask] == 0).all()
    if kind == "empty":
        assert (y == 0).all() and (dx == 0).all() and (dw == 0).all()


def test_reference_ops_accept_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(0)
    block = (8, 4)
    x = torch.randn(24, 3, 6, generator=gen).permute(1, 2, 0)[:, :, 1:22]  # (3, 6, 21), strided
    weight = torch.randn(21, 19, generator=gen).T  # (19, 21) transposed view
    dy = torch.randn(3, 19, 6, generator=gen).transpose(1, 2)
    assert not x.is_contiguous() and not weight.is_contiguous() and not dy.is_contiguous()
    layout = _layout(block_grid(weight.shape, block), "rows", gen)
    y = block_sparse_linear_reference(x, weight, layout, block)
    torch.testing.assert_close(y, masked_dense(x.contiguous(), weight.contiguous(), layout, block))
    dx = block_sparse_linear_grad_input(dy, weight, layout, block)
    mask = layout_to_mask(layout, block, weight.shape)
    torch.testing.assert_close(dx, dy.contiguous() @ torch.where(mask, weight, 0.0))
    dw = block_sparse_linear_grad_weight(x, dy, layout, block)
    expected = dy.reshape(-1, 19).T @ x.reshape(-1, 21)
    torch.testing.assert_close(dw, torch.where(mask, expected, 0.0))


def test_autograd_function_matches_masked_dense_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    block = (3, 2)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    layout = _layout(block_grid(weight.shape, block), "rows", gen)
    assert torch.autograd.gradcheck(
        lambda a, w, b: BlockSparseLinearFunction.apply(a, w, layout, block, b), (x, weight, bias)
    )
    assert torch.autograd.gradcheck(lambda a, w: BlockSparseLinearFunction.apply(a, w, layout, block), (x, weight))
    # same values and gradients as the masked-dense fallback, in float32
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    x2, w2, b2 = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    y1 = BlockSparseLinearFunction.apply(x32, w32, layout, block, b32)
    y2 = masked_dense(x2, w2, layout, block, b2)
    torch.testing.assert_close(y1, y2)
    g = torch.randn(y1.shape, generator=gen)
    y1.backward(g)
    y2.backward(g)
    for a, b in ((x32, x2), (w32, w2), (b32, b2)):
        torch.testing.assert_close(a.grad, b.grad)
    mask = layout_to_mask(layout, block, weight.shape)
    assert (w32.grad[~mask] == 0).all()


def test_masked_dense_ignores_nan_outside_live_blocks_and_checks_layout():
    weight = torch.full((4, 4), float("nan"))
    weight[:2, :2] = 1.0
    layout = torch.tensor([[True, False], [False, False]])
    y = masked_dense(torch.ones(1, 4), weight, layout, 2)
    assert y.tolist() == [[2.0, 2.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="layout must be a bool tensor of shape"):
        masked_dense(torch.ones(1, 4), weight, torch.ones(2, 3, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="layout must be a bool tensor"):
        block_sparse_linear_reference(torch.ones(1, 4), weight, layout.int(), 2)
