"""Block-sparse linear kernels: index tables and packing (CPU), the module swap and its fallback
(CPU), the Triton kernels under Triton's CPU interpreter (where Triton is installed), and the
kernels on a GPU (``cuda`` marker) against the plain-torch oracle of ``kernels/reference.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsetrain.config import ModelParams
from sparsetrain.kernels.blocks import BlockLayout, kernel_block_ok, layout_to_mask, pack_blocks, unpack_blocks
from sparsetrain.kernels.reference import (
    block_sparse_linear_grad_input,
    block_sparse_linear_grad_weight,
    block_sparse_linear_reference,
)
from sparsetrain.model import GPT
from sparsetrain.sparsity.block_linear import BlockSparseLinear, use_block_kernels, use_dense_kernels
from sparsetrain.sparsity.sparsifier import sparsify

ROOT_DIR = Path(__file__).resolve().parents[1]


def _layout(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < density


# -- tables and packing (pure torch) -----------------------------------------------------------


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


@pytest.mark.parametrize(
    ("m", "nnz", "slices"),
    [
        # the H200 sweep (132 SMs, 16384 tokens): measured best 1 at 102-1024 live blocks, 3 at 36,
        # 6-9 at 14 (benchmarks/kernel_configs.py; NOTES_block_kernels.md)
        (16384, 1024, 1), (16384, 256, 1), (16384, 102, 1), (16384, 36, 3), (16384, 14, 9),
        (16384, 144, 3),  # 144 blocks: 12 would wait for a second full-length wave
        (512, 1, 1), (2048, 1, 2),  # slices of at least 1024 rows
        (16384, 0, 16),
    ],
)
def test_wgrad_slices_follow_the_measured_sweep(m, nnz, slices):
    from sparsetrain.kernels.wgrad_slices import wgrad_slices

    assert wgrad_slices(m, nnz, sms=132) == slices


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


# -- the module swap (CPU: the fallback path) ----------------------------------------------------


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelParams(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=97, max_position_embeddings=32))


BLOCK_SPARSITY = {"sparsity": 0.5, "structure": "block", "block_size": 16, "init_method": "topk"}


def test_block_linears_switch_and_fall_back_on_cpu():
    model = _tiny_gpt()
    sp = sparsify(model, BLOCK_SPARSITY)
    idx = torch.randint(0, 97, (2, 16))
    before = model(idx)
    keys = list(model.state_dict())
    names = use_block_kernels(model, sp)
    assert sorted(names) == sorted(sp.masks) and len(names) == 8  # qkv, proj, fc, proj of 2 layers
    assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), BlockSparseLinear) for n in names)
    assert list(model.state_dict()) == keys  # tables are non-persistent: checkpoints unchanged
    torch.testing.assert_close(model(idx), before, rtol=0, atol=0)  # CPU: F.linear on the masked weight
    use_dense_kernels(model)
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())
    torch.testing.assert_close(model(idx), before, rtol=0, atol=0)


def test_cpu_runs_count_dense_executed_flops(tmp_path, tiny_params):
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16}, model={"hidden_size": 64})
    run = tr.setup(params_from_dict(p), tmp_path, evaluate=False, write_metrics=False)
    assert run.block_kernel_layers == []  # no GPU: masked dense, which executes the dense FLOPs
    assert run.executed_flops == run.flops["dense"] > run.flops["sparse"]


@pytest.mark.parametrize(
    ("setting", "kernels", "distributed", "mode"),
    [("auto", True, False, "reduce-overhead"), ("auto", False, False, "default"), ("auto", True, True, "default"),
     ("default", True, False, "default"), ("max-autotune", False, False, "max-autotune")],
)
def test_compile_mode_auto_takes_cuda_graphs_for_the_block_kernels(setting, kernels, distributed, mode):
    from sparsetrain.training.build import compile_mode

    assert compile_mode(setting, kernels, distributed) == mode


@pytest.mark.parametrize("forced", [True, False], ids=["kernel-layers", "masked-dense"])
def test_setup_logs_the_compile_mode_it_chose(tmp_path, tiny_params, monkeypatch, caplog, forced):
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict
    from sparsetrain.training import build

    monkeypatch.setattr(build, "block_kernels_apply", lambda run: forced)  # what CUDA + bf16 decide
    p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16},
                    model={"hidden_size": 64}, runconfig={"compile": True})
    with caplog.at_level("INFO", logger="sparsetrain"):
        tr.setup(params_from_dict(p), tmp_path, evaluate=False, write_metrics=False)
    expected = "mode reduce-overhead, for the block-sparse kernels" if forced else "mode default)"
    assert any(expected in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_unstructured_and_unfit_weights_stay_dense():
    model = _tiny_gpt()
    sp = sparsify(model, {"sparsity": 0.5, "init_method": "topk"})
    assert use_block_kernels(model, sp) == []
    model = _tiny_gpt()
    sp = sparsify(model, {**BLOCK_SPARSITY, "block_size": 48})  # 48 is not a power of two
    assert use_block_kernels(model, sp) == []


def test_tables_follow_loaded_masks():
    model = _tiny_gpt()
    sp = sparsify(model, BLOCK_SPARSITY)
    use_block_kernels(model, sp)
    state = sp.state_dict()
    name = next(iter(sp.masks))
    flipped = ~state["masks"][name]  # still whole blocks, the complement
    sp.load_state_dict({**state, "masks": {**state["masks"], name: flipped}})
    module = model.get_submodule(name.rsplit(".", 1)[0])
    expected = BlockLayout.build(flipped.view(module.out_features // 16, 16, -1, 16).any(3).any(1), (16, 16))
    assert torch.equal(module._bs_row_cols, expected.row_cols)


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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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
    assert _rel(y, ref_y) < 1e-2 and _rel(dx, ref_dx) < 1e-2 and _rel(dw, ref_dw) < 1e-2
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
    assert _rel(y, block_sparse_linear_reference(x.double(), w.bfloat16().double(), layout, block)) < 1e-2


def _block_model(device="cuda"):
    model = _tiny_gpt().to(device)
    sp = sparsify(model, {**BLOCK_SPARSITY, "block_size": 32})
    return model, sp


@pytest.mark.cuda
def test_block_linear_autograd_under_autocast_matches_masked_dense():
    model, sp = _block_model()
    name = "layers.0.mlp.fc.weight"
    dense = model.get_submodule("layers.0.mlp.fc")
    x = torch.randn(4, 50, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref = dense(x)
    (g_ref_x, g_ref_w) = torch.autograd.grad(y_ref.float().square().sum(), (x, dense.weight))
    g_ref_w = g_ref_w * sp.masks[name]  # F.linear's is dense; the sparsifier masks it on accumulation
    use_block_kernels(model, sp)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = dense(x)
    assert isinstance(dense, BlockSparseLinear) and y.dtype == torch.bfloat16
    g_x, g_w = torch.autograd.grad(y.float().square().sum(), (x, dense.weight))
    assert g_w.dtype == torch.float32 and g_x.dtype == torch.float32
    assert _rel(y, y_ref) < 1e-2 and _rel(g_x, g_ref_x) < 1e-2 and _rel(g_w, g_ref_w) < 1e-2
    assert (g_w[~sp.masks[name]] == 0).all()


@pytest.mark.cuda
def test_block_linear_compiles_without_graph_break():
    model, sp = _block_model()
    use_block_kernels(model, sp)
    idx = torch.randint(0, 97, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(idx)
        compiled = torch.compile(model, fullgraph=True)(idx)  # fullgraph: a graph break would raise
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_training_with_block_kernels_matches_masked_dense(tmp_path, tiny_params):
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    losses = {}
    for kernels in ("auto", "off"):
        p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16}, model={"hidden_size": 64})
        p["runconfig"].update({"device": "cuda", "max_steps": 20, "compile": False, "sparse_kernels": kernels})
        run = tr.setup(params_from_dict(p), tmp_path / kernels, evaluate=False, write_metrics=False)
        switched = sum(isinstance(m, BlockSparseLinear) for m in run.model.modules())
        assert switched == (8 if kernels == "auto" else 0) == len(run.block_kernel_layers)
        # MFU counts executed FLOPs: the live blocks on the kernels, dense work when masked dense
        expected = run.flops["sparse"] if kernels == "auto" else run.flops["dense"]
        assert run.executed_flops == pytest.approx(expected) and run.flops["sparse"] < run.flops["dense"]
        losses[kernels] = [float(tr.train_step(run)) for _ in range(20)]
        for p_, mask in run.sparsifier._bound:
            assert (p_[~mask] == 0).all()  # the invariant holds on the kernel path too
    torch.testing.assert_close(losses["auto"], losses["off"], rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("accum", [1, 2])
def test_compiled_training_on_the_kernels_takes_cuda_graphs_and_matches(tmp_path, tiny_params, caplog, accum):
    """The default compile_mode (auto) with layers on the kernels: CUDA graphs (reduce-overhead)
    over the custom op and live-block storage, against eager masked dense; with 2 micro-batches
    the first one's gradients must survive the second replay."""
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    losses = {}
    for kernels, compiled in (("auto", True), ("off", False)):
        p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16}, model={"hidden_size": 64})
        p["runconfig"].update({"device": "cuda", "compile": compiled, "sparse_kernels": kernels})
        p["optimizer"]["grad_accum_steps"] = accum
        with caplog.at_level("INFO", logger="sparsetrain"):
            run = tr.setup(params_from_dict(p), tmp_path / kernels, evaluate=False, write_metrics=False)
        losses[kernels] = [float(tr.train_step(run)) for _ in range(20)]
    assert "mode reduce-overhead, for the block-sparse kernels" in caplog.text
    torch.testing.assert_close(losses["auto"], losses["off"], rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_dense_cuda_graphs_with_micro_batches_match_eager(tmp_path, tiny_params):
    """compile_mode reduce-overhead with gradient accumulation, no sparsity: same losses as eager."""
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    losses = {}
    for compiled in (True, False):
        p = tiny_params(model={"hidden_size": 64})
        p.pop("sparsity", None)
        p["runconfig"].update({"device": "cuda", "compile": compiled, "compile_mode": "reduce-overhead"})
        p["optimizer"]["grad_accum_steps"] = 2
        run = tr.setup(params_from_dict(p), tmp_path / str(compiled), evaluate=False, write_metrics=False)
        assert run.cuda_graphs == compiled
        losses[compiled] = [float(tr.train_step(run)) for _ in range(10)]
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_fp32_runs_keep_block_weights_masked_dense_with_a_warning(tmp_path, tiny_params, caplog):
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16}, model={"hidden_size": 64})
    p["runconfig"].update({"device": "cuda", "compile": False, "precision": "fp32"})
    with caplog.at_level("WARNING"):
        run = tr.setup(params_from_dict(p), tmp_path, evaluate=False, write_metrics=False)
    assert run.block_kernel_layers == [] and not any(isinstance(m, BlockSparseLinear) for m in run.model.modules())
    assert "block-sparse kernels run in bf16" in caplog.text


# -- sparsetrain bench layer ---------------------------------------------------------------------

SAVED_LAYER_BENCH = ROOT_DIR / "benchmarks" / "results" / "2026-11-28_h200_block_sparse_linear.json"


def test_bench_layer_show_prints_a_saved_table(capsys):
    from sparsetrain.cli import main

    assert main(["bench", "layer", "--show", str(SAVED_LAYER_BENCH)]) == 0
    out = capsys.readouterr().out
    assert "8192x2048" in out and "2.66x" in out and "cuSPARSELt" in out


def test_bench_layer_errors_are_one_line(tmp_path, capsys):
    from sparsetrain.cli import main

    (tmp_path / "x.json").write_text("[1, 2]")
    assert main(["bench", "layer", "--show", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    if not torch.cuda.is_available():
        assert main(["bench", "layer"]) == 2
        assert "needs a CUDA GPU and Triton" in capsys.readouterr().err


@pytest.mark.cuda
def test_bench_layer_runs_on_the_gpu(tmp_path, capsys):
    from sparsetrain.cli import main

    out = tmp_path / "layer.json"
    args = ["bench", "layer", "--shapes", "256x512", "--sparsity", "0,0.5", "--block_size", "64", "--tokens", "1024"]
    assert main([*args, "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [r["sparsity"] for r in saved["rows"]] == [0.0, 0.5]
    assert all(r["rel_err"] < 2e-2 and r["fwd_ours_ms"] > 0 for r in saved["rows"])
    assert main(["bench", "layer", "--shapes", "100x128", "--block_size", "64"]) == 2  # not a multiple
