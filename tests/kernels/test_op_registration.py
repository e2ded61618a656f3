"""The registration of ``sparsetrain::block_sparse_mm`` (and its backward op) as torch ops, on the
CPU: the kernels' two entry points are replaced by plain-torch products of the same contract, so
``torch.library.opcheck`` (schema, fake tensors, autograd, AOT dispatch) and ``torch.compile`` with
``fullgraph=True`` check the registration itself; the kernels behind it are covered on a GPU by
``test_block_sparse.py``."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.kernels import block_sparse_op as op
from sparsetrain.kernels.blocks import BlockLayout, pack_blocks, unpack_blocks


def _torch_forward(x, weight, tables, br, bc):
    layout = op.layout_of((op._out_features(weight, tables, br), x.shape[1]), tables, (br, bc))
    packed = weight.to(x.dtype, copy=True) if weight.dim() == 3 else pack_blocks(weight, layout, x.dtype)
    return x @ unpack_blocks(packed, layout).T, packed


def _torch_backward(dy, x, packed, tables, n, br, bc, weight_dtype, block_weight, need_input, need_weight):
    layout = op.layout_of((n, x.shape[1]), tables, (br, bc))
    dx = dy.to(x.dtype) @ unpack_blocks(packed, layout) if need_input else x.new_empty(0)
    dw = x.new_empty(0)
    if need_weight:
        blocks = pack_blocks((dy.to(x.dtype).T @ x).to(weight_dtype), layout)
        dw = blocks if block_weight else unpack_blocks(blocks, layout)
    return dx, dw


@pytest.fixture
def torch_products(monkeypatch):
    monkeypatch.setattr(op, "_forward_impl", _torch_forward)
    monkeypatch.setattr(op, "_backward_impl", _torch_backward)


def _case(stored_as_blocks: bool):
    torch.manual_seed(0)
    t = BlockLayout.build(torch.tensor([[True, False, True, False], [False, True, True, True]]), (16, 16))
    tables = [getattr(t, name) for name in op.TABLES]
    w = torch.randn(32, 64)
    weight = pack_blocks(w, t) if stored_as_blocks else unpack_blocks(pack_blocks(w, t), t)
    return torch.randn(40, 64, requires_grad=True), weight.requires_grad_(), tables, t


@pytest.mark.parametrize("stored_as_blocks", [False, True], ids=["dense", "live_blocks"])
def test_the_op_passes_opcheck(torch_products, stored_as_blocks):
    x, weight, tables, _ = _case(stored_as_blocks)
    torch.library.opcheck(op.block_sparse_mm, (x, weight, tables, 16, 16))


@pytest.mark.parametrize("stored_as_blocks", [False, True], ids=["dense", "live_blocks"])
def test_the_op_compiles_whole_and_its_gradients_are_the_dense_ones(torch_products, stored_as_blocks):
    x, weight, tables, t = _case(stored_as_blocks)

    def f(x, weight):
        y, _ = op.block_sparse_mm(x, weight, tables, 16, 16)
        return (y * y).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, )  # inductor; a graph break would raise
    compiled(x, weight).backward()
    gx, gw = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    dense = unpack_blocks(weight, t) if stored_as_blocks else weight
    xr, wr = x.detach().clone().requires_grad_(), dense.detach().clone().requires_grad_()
    ((xr @ wr.T) ** 2).sum().backward()
    torch.testing.assert_close(gx, xr.grad)
    want = pack_blocks(wr.grad, t) if stored_as_blocks else unpack_blocks(pack_blocks(wr.grad, t), t)
    torch.testing.assert_close(gw, want)
    assert gw.shape == weight.shape


def test_a_gradient_of_the_gradient_is_refused_in_one_line(torch_products):
    """create_graph=True (a gradient penalty) through the kernels' products would drop terms
    silently: both the op and the eager autograd Function refuse it instead."""
    x, weight, tables, _ = _case(stored_as_blocks=False)
    y, _ = op.block_sparse_mm(x, weight, tables, 16, 16)
    with pytest.raises(NotImplementedError, match="its gradient has no gradient of its own .create_graph=True"):
        torch.autograd.grad((y * y).sum(), x, create_graph=True)
    y = op._EagerBlockSparseMM.apply(x, weight, 16, 16, *tables)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (gx * gx).sum().backward()
