"""``kernels/gluon_block_sparse.py``: the Hopper ping-pong forward and input-gradient kernels,
on an sm_90 GPU (``cuda`` marker; skipped elsewhere), against the float64 masked dense product:
odd token counts (not a multiple of 128, also fewer than 128), empty and full block-rows and
block-columns, every block live, no block live, bf16 and fp16, the output poisoned with NaN
first; and the op's dispatch (``SPARSETRAIN_BLOCK_KERNEL``) giving the Triton kernels' results."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.kernels.blocks import BlockLayout, pack_blocks, unpack_blocks
from tests.helpers import rel_err, triton_module


def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    triton_module("block_sparse")
    return pytest.importorskip("sparsetrain.kernels.gluon_block_sparse", reason="this Triton has no Gluon")


def _grid(rows: int, cols: int, density: float, seed: int, special: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(rows, cols, generator=g) < density
    if special:  # block-row 0 and block-column 2 empty, block-row 1 and block-column 3 full (but col 2)
        grid[1] = True
        grid[:, 3] = True
        grid[0] = False
        grid[:, 2] = False
    return grid


CASES = [  # (n, k, m, density, special)
    (512, 384, 1000, 0.5, False),
    (384, 640, 129, 0.3, False),
    (256, 256, 77, 1.0, False),  # every block live, fewer rows than one tile
    (640, 512, 4099, 0.4, True),
    (256, 384, 300, 0.0, False),  # no block live
]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-d{c[3]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gluon_kernels_match_oracle(case, dtype):
    gb = _hopper()
    n, k, m, density, special = case
    t = BlockLayout.build(_grid(n // 128, k // 128, density, seed=n + k + m, special=special).cuda(), (128, 128))
    wp = pack_blocks(torch.randn(n, k, device="cuda"), t, dtype)
    wm = unpack_blocks(wp, t, torch.float64)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    for fwd, a, ref, width in ((True, x, x.double() @ wm.T, n), (False, dy, dy.double() @ wm, k)):
        if t.nnz == 0:
            got = (gb.forward if fwd else gb.dgrad)(a, wp, t)
            assert got.shape == (m, width) and not got.any()
            continue
        got = torch.full((m, width), float("nan"), dtype=dtype, device="cuda")
        gb._run(a, wp, got, t, fwd, gb.CONFIG)
        assert not got.isnan().any(), "an output element was not written"
        assert rel_err(got, ref) < TOLERANCE[dtype]
        if special:  # the empty block-row of W / block-column of W gives exact zeros
            zero = got[:, :128] if fwd else got[:, 256:384]
            assert not zero.any()


@pytest.mark.cuda
def test_op_dispatch_gives_the_triton_kernels_results(monkeypatch):
    """The layer through autograd with the Gluon kernels and with the Triton kernels forced."""
    _hopper()
    from sparsetrain.kernels.block_sparse_op import TABLES, block_sparse_linear

    t = BlockLayout.build(_grid(4, 6, 0.5, seed=5, special=False).cuda(), (128, 128))
    tables = [getattr(t, name) for name in TABLES]
    w = (unpack_blocks(pack_blocks(torch.randn(512, 768, device="cuda"), t), t)).requires_grad_()
    x = torch.randn(3, 333, 768, device="cuda", requires_grad=True)
    g = torch.randn(3, 333, 512, device="cuda")
    results = {}
    for kernel in ("gluon", "triton"):
        monkeypatch.setenv("SPARSETRAIN_BLOCK_KERNEL", kernel)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block_sparse_linear(x, w, None, tables, (128, 128))
        gx, gw = torch.autograd.grad(y, (x, w), g)
        results[kernel] = (y.float(), gx.float(), gw)
    for got, want in zip(results["gluon"], results["triton"], strict=True):
        assert rel_err(got, want) < 1e-2
