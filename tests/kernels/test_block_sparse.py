"""``kernels/block_sparse.py`` and ``kernels/block_sparse_op.py``: the Triton kernels of a
block-sparse linear layer (forward, input and weight gradients, the packed weight gradient) and
the custom op over them (``opcheck``, autograd, the eager path, weights stored as live blocks),
under Triton's CPU interpreter where Triton is installed, and on a GPU (``cuda`` marker) against
the plain-torch oracle of ``kernels/reference.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsetrain.kernels.blocks import BlockLayout, layout_to_mask, pack_blocks
from sparsetrain.kernels.reference import (
    block_sparse_linear_grad_input,
    block_sparse_linear_grad_weight,
    block_sparse_linear_reference,
)
from tests.helpers import rel_err


def _layout(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < density


# -- Triton's CPU interpreter (Triton installed, no GPU) -----------------------------------------


INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from sparsetrain.kernels.blocks import BlockLayout, pack_blocks
    from sparsetrain.kernels import block_sparse as bs
    from sparsetrain.kernels.block_sparse_op import block_sparse_mm, TABLES
    from sparsetrain.kernels.reference import (block_sparse_linear_reference as fwd,
        block_sparse_linear_grad_input as dgrad, block_sparse_linear_grad_weight as wgrad)
    torch.manual_seed(0)
    close = dict(atol=3e-2, rtol=2e-2)
    for tma in (False, True):
        for (n, k, br, bc, m, density) in [(64, 128, 32, 64, 100, 0.5), (128, 64, 64, 32, 130, 0.6),
                                           (32, 32, 16, 16, 7, 1.0), (64, 64, 32, 32, 40, 0.0)]:
            layout = torch.rand(n // br, k // bc) < density
            t = BlockLayout.build(layout, (br, bc))
            w = torch.randn(n, k).half().float()
            x = torch.randn(m, k).half()
            dy = torch.randn(m, n).half()
            wp = pack_blocks(w, t, torch.float16)
            torch.testing.assert_close(bs.forward(x, wp, t, use_tma=tma).float(), fwd(x.float(), w, layout, (br, bc)), **close)
            torch.testing.assert_close(bs.dgrad(dy, wp, t, use_tma=tma).float(), dgrad(dy.float(), w, layout, (br, bc)), **close)
            dw = bs.wgrad(x, dy, t, out_dtype=torch.float32, use_tma=tma)
            torch.testing.assert_close(dw, wgrad(x.float(), dy.float(), layout, (br, bc)), **close)
    # a broadcast gradient (row stride 0, as from y.sum()) is copied, never handed to TMA as is
    layout = torch.tensor([[True, False], [True, True]])
    t = BlockLayout.build(layout, (32, 32))
    w = torch.randn(64, 64).half().float()
    dy = torch.ones(1, 64).half().expand(50, 64)
    for tma in (False, True):
        got = bs.dgrad(dy, pack_blocks(w, t, torch.float16), t, use_tma=tma).float()
        torch.testing.assert_close(got, dgrad(dy.float(), w, layout, (32, 32)), **close)
    t = BlockLayout.build(torch.rand(2, 4) < 0.5, (32, 32))
    tables = [getattr(t, name) for name in TABLES]
    x = torch.randn(40, 128).half().requires_grad_()
    torch.library.opcheck(block_sparse_mm, (x, torch.randn(64, 128, requires_grad=True), tables, 32, 32))
    from sparsetrain.kernels.reference import BlockSparseLinearFunction
    w = torch.randn(64, 128).half().float().requires_grad_()
    y, _ = block_sparse_mm(x, w, tables, 32, 32)
    g = torch.randn_like(y)
    y.backward(g)
    x2, w2 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    from sparsetrain.kernels.blocks import unpack_blocks
    live = unpack_blocks(torch.ones(t.nnz, 32, 32), t).view(2, 32, 4, 32)[:, 0, :, 0].bool()
    yr = BlockSparseLinearFunction.apply(x2, w2, live, (32, 32))
    yr.backward(g.float())
    torch.testing.assert_close(y.float(), yr, **close)
    torch.testing.assert_close(x.grad.float(), x2.grad, **close)
    torch.testing.assert_close(w.grad, w2.grad, **close)
    # the eager path (autograd.Function, no custom-op dispatch) computes the same
    from sparsetrain.kernels.block_sparse_op import _EagerBlockSparseMM
    x3, w3 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _EagerBlockSparseMM.apply(x3, w3, 32, 32, *tables).backward(g)
    torch.testing.assert_close(x3.grad, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(w3.grad, w.grad, rtol=0, atol=0)
    w = torch.randn(64, 128)
    torch.testing.assert_close(bs.pack(w, t, torch.float16), pack_blocks(w, t, torch.float16), rtol=0, atol=0)
    print("interpreter ok")
    """
)


def test_kernels_under_triton_interpreter(tmp_path):
    pytest.importorskip("triton", reason="Triton is not installed (CPU install): the cuda tests cover the kernels")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = tmp_path / "interp.py"
    script.write_text(INTERPRETER_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "interpreter ok" in out.stdout, out.stderr[-3000:]


PACKED_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from sparsetrain.kernels import block_sparse as bs
    from sparsetrain.kernels.blocks import BlockLayout, pack_blocks
    from sparsetrain.kernels.block_sparse_op import TABLES, _EagerBlockSparseMM, block_sparse_mm
    from sparsetrain.kernels.reference import block_sparse_linear_grad_weight as wgrad_ref
    torch.manual_seed(0)
    close = dict(atol=3e-2, rtol=2e-2)
    # m <= 64: one slice (the kernel writes the packed result itself); m > 64: two slices summed
    for tma in (False, True):
        for (n, k, br, bc, m, density) in [(64, 128, 32, 64, 40, 0.5), (128, 64, 64, 32, 130, 0.6),
                                           (32, 32, 16, 16, 7, 1.0), (64, 64, 32, 32, 100, 0.0)]:
            layout = torch.rand(n // br, k // bc) < density
            t = BlockLayout.build(layout, (br, bc))
            x, dy = torch.randn(m, k).half(), torch.randn(m, n).half()
            got = bs.wgrad(x, dy, t, out_dtype=torch.float32, use_tma=tma, packed=True)
            dense = bs.wgrad(x, dy, t, out_dtype=torch.float32, use_tma=tma)
            assert got.shape == (t.nnz, br, bc) and got.dtype == torch.float32 and got.is_contiguous()
            torch.testing.assert_close(got, pack_blocks(dense, t), rtol=0, atol=0)
            ref = pack_blocks(wgrad_ref(x.float(), dy.float(), layout, (br, bc)), t)
            torch.testing.assert_close(got, ref, **close)
            half = bs.wgrad(x, dy, t, out_dtype=torch.float16, use_tma=tma, packed=True)
            assert half.dtype == torch.float16 and half.shape == got.shape
    # the op on a weight stored as live blocks: same products, the gradient packed
    t = BlockLayout.build(torch.rand(2, 4) < 0.5, (32, 32))
    tables = [getattr(t, name) for name in TABLES]
    w = torch.randn(64, 128).half().float()
    blocks = pack_blocks(w, t).requires_grad_()
    dense_w = w.clone().requires_grad_()
    for rows in (40, 80):  # the weight gradient from one slice (the kernel's own output) and from two
        torch.library.opcheck(block_sparse_mm, (torch.randn(rows, 128).half().requires_grad_(), blocks, tables, 32, 32))
    x = torch.randn(80, 128).half().requires_grad_()
    y, _ = block_sparse_mm(x, blocks, tables, 32, 32)
    y_dense, _ = block_sparse_mm(x.detach().requires_grad_(), dense_w, tables, 32, 32)
    torch.testing.assert_close(y, y_dense, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_dense.backward(g)
    assert blocks.grad.shape == blocks.shape
    torch.testing.assert_close(blocks.grad, pack_blocks(dense_w.grad, t), rtol=0, atol=0)
    x3, b3 = x.detach().clone().requires_grad_(), blocks.detach().clone().requires_grad_()
    _EagerBlockSparseMM.apply(x3, b3, 32, 32, *tables).backward(g)
    torch.testing.assert_close(x3.grad, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(b3.grad, blocks.grad, rtol=0, atol=0)
    print("interpreter ok")
    """
)


def test_packed_wgrad_and_op_under_triton_interpreter(tmp_path):
    pytest.importorskip("triton", reason="Triton is not installed (CPU install): the cuda tests cover the kernels")
    script = tmp_path / "interp.py"
    script.write_text(PACKED_INTERPRETER_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "interpreter ok" in out.stdout, out.stderr[-3000:]


# -- the kernels on a GPU ----------------------------------------------------------------------


SHAPES = [  # (out, in, block, tokens, density)
    (256, 512, (64, 64), 1000, 0.3),
    (512, 256, (128, 128), 2048, 0.5),
    (384, 256, (128, 64), 777, 0.4),
    (256, 256, (16, 16), 300, 0.25),
    (256, 512, (32, 128), 513, 0.6),
    (512, 512, (128, 128), 4096, 1.0),  # all blocks live
    (512, 512, (128, 128), 1024, 0.0),  # no live block
]


@pytest.mark.cuda
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}-m{c[3]}-d{c[4]}")
def test_kernels_match_oracle(case, dtype, tma):
    from sparsetrain.kernels import block_sparse as bs

    if tma and not bs.tma_available(torch.device("cuda")):
        pytest.skip("TMA needs Hopper")
    n, k, block, m, density = case
    layout = _layout(n // block[0], k // block[1], density, seed=n + k + m).cuda()
    t = BlockLayout.build(layout, block)
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    wq = w.to(dtype)
    wp = pack_blocks(w, t, dtype)
    y = bs.forward(x, wp, t, use_tma=tma)
    dx = bs.dgrad(dy, wp, t, use_tma=tma)
    dw = bs.wgrad(x, dy, t, out_dtype=torch.float32, use_tma=tma)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    ref_y = block_sparse_linear_reference(x.double(), wq.double(), layout, block)
    ref_dx = block_sparse_linear_grad_input(dy.double(), wq.double(), layout, block)
    ref_dw = block_sparse_linear_grad_weight(x.double(), dy.double(), layout, block)
    if density == 0.0:
        assert (y == 0).all() and (dx == 0).all() and (dw == 0).all()
        return
    assert rel_err(y, ref_y) < 1e-2 and rel_err(dx, ref_dx) < 1e-2 and rel_err(dw, ref_dw) < 1e-2
    dead = ~layout_to_mask(layout, block, (n, k))
    assert (dw[dead] == 0).all()  # exact zeros outside live blocks


@pytest.mark.cuda
def test_kernels_take_noncontiguous_and_junk_outside_blocks():
    from sparsetrain.kernels import block_sparse as bs

    n, k, block = 256, 256, (64, 64)
    layout = _layout(4, 4, 0.5, 3).cuda()
    t = BlockLayout.build(layout, block)
    w = torch.randn(n, k, device="cuda")
    mask = layout_to_mask(layout, block, (n, k))
    junk = torch.where(mask, w, torch.full_like(w, float("nan")))  # pruned entries are never read
    x = torch.randn(k, 600, device="cuda", dtype=torch.bfloat16).t()  # non-contiguous rows
    y = bs.forward(x, pack_blocks(junk, t, torch.bfloat16), t, use_tma=False)
    assert torch.isfinite(y).all()
    assert rel_err(y, block_sparse_linear_reference(x.double(), w.bfloat16().double(), layout, block)) < 1e-2
