"""Block-sparse layers that store their live blocks only (``use_block_kernels(..., packed=True)``,
``sparsity.block_linear``): on the CPU fallback they compute, train, clip and checkpoint as the
masked-dense model does, with weights, gradients and optimizer state at the live fraction of the
dense bytes; checkpoints move both ways between the two storages. The Triton pieces (the packed
weight gradient, the op on packed weights) run under Triton's CPU interpreter where Triton is
installed, and on a GPU (``cuda`` marker)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsetrain import training as tr
from sparsetrain.config import ModelParams, OptimizerParams, params_from_dict
from sparsetrain.kernels.blocks import pack_blocks
from sparsetrain.model import GPT
from sparsetrain.optim import build_optimizer
from sparsetrain.sparsity import nan_format
from sparsetrain.sparsity.block_linear import (
    BLOCKS,
    BlockSparseLinear,
    packed_layers,
    use_block_kernels,
    use_dense_kernels,
)
from sparsetrain.sparsity.sparsifier import sparsify
from sparsetrain.training import build

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = {"sparsity": 0.75, "structure": "block", "block_size": 16, "init_method": "topk"}
WEIGHTS = [f"layers.{i}.{k}.weight" for i in range(2) for k in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


def _gpt(device: str = "cpu") -> GPT:
    torch.manual_seed(0)
    cfg = ModelParams(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=97, max_position_embeddings=32)
    return GPT(cfg).to(device)


def _pair(block: dict = BLOCK, device: str = "cpu"):
    """A masked-dense and a packed model with the same weights and masks, and their sparsifiers."""
    dense, packed = _gpt(device), _gpt(device)
    sp_dense, sp_packed = sparsify(dense, block), sparsify(packed, block)
    assert sorted(use_block_kernels(packed, sp_packed, packed=True)) == sorted(WEIGHTS)
    return dense, sp_dense, packed, sp_packed


def _batch(step: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 97, (4, 24), generator=g)
    return idx.to(device), torch.roll(idx, -1, 1).to(device)


def _module(model: torch.nn.Module, weight_name: str) -> torch.nn.Module:
    return model.get_submodule(weight_name.rsplit(".", 1)[0])


# -- storage, forward and gradients --------------------------------------------------------------


def test_packed_layers_store_live_blocks_only():
    dense, sp_dense, packed, sp_packed = _pair()
    names = [n for n, _ in packed.named_parameters()]
    assert not any(n in names for n in WEIGHTS) and all(n[: -len("weight")] + BLOCKS in names for n in WEIGHTS)
    assert set(packed_layers(packed)) == set(WEIGHTS)
    for name in WEIGHTS:
        module = _module(packed, name)
        assert isinstance(module, BlockSparseLinear) and module.packed
        blocks, mask = module.weight_blocks, sp_packed.masks[name]
        assert blocks.dtype == torch.float32 and blocks.shape[1:] == (16, 16)
        assert blocks.numel() == int(mask.sum())  # whole blocks: the live entries, nothing else
        torch.testing.assert_close(module.dense_weight(), _module(dense, name).weight, rtol=0, atol=0)
        assert "stored=live blocks" in repr(module)
    assert sp_packed._bound == []  # nothing pruned is stored: no hook enforces anything
    # statistics and summary read the same as masked dense
    assert sp_packed.stats() == sp_dense.stats() and sp_packed.summary() == sp_dense.summary()


def test_forward_loss_and_gradients_match_masked_dense():
    dense, sp_dense, packed, _ = _pair()
    idx, targets = _batch(0)
    torch.testing.assert_close(packed(idx), dense(idx), rtol=0, atol=0)
    loss_dense, loss_packed = dense(idx, targets), packed(idx, targets)
    torch.testing.assert_close(loss_packed, loss_dense, rtol=0, atol=0)
    loss_dense.backward()
    loss_packed.backward()
    for name in WEIGHTS:
        module = _module(packed, name)
        grad = module.weight_blocks.grad
        assert grad.shape == module.weight_blocks.shape
        torch.testing.assert_close(grad, pack_blocks(_module(dense, name).weight.grad, module.layout()))
    others = {n: p.grad for n, p in packed.named_parameters() if not n.endswith(BLOCKS)}
    for n, p in dense.named_parameters():
        if n not in WEIGHTS:
            torch.testing.assert_close(others[n], p.grad, msg=n)


def test_fallback_traces_whole_under_torch_compile():
    """The unpack is an ``index_copy``: dynamo traces the layer without a graph break (the GPU
    test below does the same with the kernels' custom op)."""
    dense, _, packed, _ = _pair()
    idx, targets = _batch(0)
    loss = torch.compile(packed, fullgraph=True, backend="aot_eager")(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, dense(idx, targets))
    assert all(_module(packed, n).weight_blocks.grad is not None for n in WEIGHTS)


def test_bytes_are_the_live_fraction_of_dense():
    dense, sp_dense, packed, sp_packed = _pair()
    opts = {}
    for model, sp in ((dense, sp_dense), (packed, sp_packed)):
        opt = build_optimizer(model, OptimizerParams(optimizer_type="AdamW"), torch.device("cpu"))
        sp.attach(opt)
        idx, targets = _batch(0)
        model(idx, targets).backward()
        opt.step()
        opts[id(model)] = opt
    live = sum(int(m.sum()) for m in sp_dense.masks.values()) / sum(m.numel() for m in sp_dense.masks.values())
    assert live == pytest.approx(0.25)

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    dense_w = [_module(dense, n).weight for n in WEIGHTS]
    packed_w = [_module(packed, n).weight_blocks for n in WEIGHTS]
    assert sum(map(nbytes, packed_w)) == live * sum(map(nbytes, dense_w))
    assert sum(nbytes(p.grad) for p in packed_w) == live * sum(nbytes(p.grad) for p in dense_w)

    def state_bytes(model, params) -> int:
        state = opts[id(model)].state
        return sum(nbytes(v) for p in params for k, v in state[p].items() if k != "step")

    assert state_bytes(packed, packed_w) == live * state_bytes(dense, dense_w)


# -- training ------------------------------------------------------------------------------------

KINDS = {
    "AdamW": dict(optimizer_type="AdamW", weight_decay_rate=0.1, beta2=0.95),
    "Adam": dict(optimizer_type="Adam", weight_decay_rate=0.01),
    "SGD": dict(optimizer_type="SGD", momentum=0.9, weight_decay_rate=0.01),
}
LR = {"AdamW": 3e-3, "Adam": 3e-3, "SGD": 0.1}


def _train(
    model, sp, kind: str, packed_state: bool, steps: int, clip: float = 0.0
) -> tuple[list[float], list[float], torch.optim.Optimizer]:
    opt = build_optimizer(model, OptimizerParams(**KINDS[kind]), torch.device("cpu"), packed=packed_state)
    sp.attach(opt)
    for group in opt.param_groups:
        group["lr"] = LR[kind]
    losses, norms = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(*_batch(step % 2))  # two batches: the loss falls as it fits them
        loss.backward()
        sp.mask_gradients()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))))
        opt.step()
        losses.append(float(loss.detach()))
    return losses, norms, opt


@pytest.mark.parametrize("packed_state", [False, True], ids=["torch-state", "packed-state"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_training_matches_masked_dense(kind, packed_state):
    """Without clipping every operation sees the same values in the same order: equal bit for bit."""
    dense, sp_dense, packed, sp_packed = _pair()
    loss_d, _, opt_d = _train(dense, sp_dense, kind, packed_state, 20)
    loss_p, _, opt_p = _train(packed, sp_packed, kind, packed_state, 20)
    assert loss_d[-1] < loss_d[0] - 1.0  # it trains
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(loss_p, loss_d, **exact)
    sd_d, sd_p = dense.state_dict(), packed.state_dict()
    assert list(sd_p) == list(sd_d)
    torch.testing.assert_close(sd_p, sd_d, **exact)
    for name in WEIGHTS:  # pruned entries still exactly zero in the dense view
        assert (sd_p[name][~sp_dense.masks[name]] == 0).all()
    # the optimizer state, in the dense layout in state_dict(), is the masked-dense one
    os_d, os_p = opt_d.state_dict(), opt_p.state_dict()
    assert os_p["param_groups"] == os_d["param_groups"]
    torch.testing.assert_close(os_p["state"], os_d["state"], **exact)


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradient_clipping_matches_masked_dense(kind):
    """The global norm is summed in another order over blocks than over the dense weight: equal
    to rounding. (Adam then magnifies rounding where a gradient is pure noise, e.g. the key bias,
    whose true gradient is 0, hence the looser weight tolerance.)"""
    dense, sp_dense, packed, sp_packed = _pair()
    loss_d, norm_d, _ = _train(dense, sp_dense, kind, False, 20, clip=0.5)
    loss_p, norm_p, _ = _train(packed, sp_packed, kind, False, 20, clip=0.5)
    assert min(norm_d) > 0.5  # every step clips
    torch.testing.assert_close(norm_p, norm_d, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-6, atol=0)
    torch.testing.assert_close(packed.state_dict(), dense.state_dict(), rtol=1e-3, atol=2e-5)


def test_train_step_with_clipping_matches(tmp_path, tiny_params, monkeypatch):
    runs = {}
    for storage in ("dense", "packed"):
        run = _setup(tmp_path / storage, tiny_params, monkeypatch, packed=storage == "packed", max_steps=5)
        assert run.params.optimizer.max_gradient_norm == 1.0
        losses = [float(tr.train_step(run)) for _ in range(5)]
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
        runs[storage] = (losses, float(norm))
    torch.testing.assert_close(runs["packed"], runs["dense"], rtol=1e-5, atol=0)


# -- state dicts and checkpoints -------------------------------------------------------------------


def test_state_dict_is_the_dense_models():
    plain = _gpt()
    dense, _, packed, sp = _pair()
    sd, expected = packed.state_dict(), plain.state_dict()
    assert list(sd) == list(expected)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in expected.items()}
    encoded = nan_format.encode_state_dict(sd, sp.masks)
    for name in WEIGHTS:
        assert int(torch.isnan(encoded[name]).sum()) == int((~sp.masks[name]).sum()) == round(0.75 * sd[name].numel())

    # load_state_dict takes the dense weight and packs it; values at pruned places are dropped
    source = {k: v + 1.0 if v.is_floating_point() else v for k, v in dense.state_dict().items()}
    blocks = {n: _module(packed, n).weight_blocks for n in WEIGHTS}
    packed.load_state_dict(source)
    for name in WEIGHTS:
        module = _module(packed, name)
        assert module.weight_blocks is blocks[name]  # loaded in place: an optimizer keeps holding it
        torch.testing.assert_close(module.dense_weight(), torch.where(sp.masks[name], source[name], 0.0))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"layers.0.attn.qkv.weight\""):
        packed.load_state_dict({k: v for k, v in source.items() if k != "layers.0.attn.qkv.weight"})
    bad = {**source, "layers.0.mlp.fc.weight": torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match="size mismatch for layers.0.mlp.fc.weight"):
        packed.load_state_dict(bad)


def _setup(model_dir, tiny_params, monkeypatch, *, packed: bool, max_steps: int, **optimizer):
    """A CPU run; ``packed`` stands in for a CUDA bf16 run, whose block layers go to the kernels
    with live blocks stored only (on the CPU the fallback computes the same function)."""
    monkeypatch.setattr(build, "block_kernels_apply", lambda run: packed)
    p = tiny_params(sparsity=BLOCK, model={"hidden_size": 64})
    p["optimizer"].update(optimizer)
    p["runconfig"].update({"max_steps": max_steps, "device": "cpu", "compile": False})
    model_dir.mkdir(exist_ok=True)
    run = tr.setup(params_from_dict(p), model_dir, evaluate=False, write_metrics=False)
    assert len(packed_layers(run.model)) == (8 if packed else 0) == len(run.block_kernel_layers)
    return run


def _check_nan_checkpoint(state: dict, run: tr.Run) -> None:
    """Exactly the pruned entries are NaN (0.75 of each block weight), in the weights and in their
    optimizer moments, nowhere else."""
    model, masks = state["model"], run.sparsifier.masks
    assert set(masks) == set(WEIGHTS)
    for key, value in model.items():
        pruned = round(0.75 * value.numel()) if key in masks else 0
        assert int(torch.isnan(value).sum()) == pruned, key
        if key in masks:
            assert torch.equal(torch.isnan(value), ~masks[key].cpu()), key
    names = nan_format._index_to_name(state["optimizer"], run.optimizer, run.model)
    moments = 0
    for index, entry in state["optimizer"]["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                expected = torch.isnan(model[names[index]])
                assert torch.equal(torch.isnan(value), expected), f"{names[index]} {key}"
                moments += names[index] in masks
    assert moments == 2 * len(WEIGHTS)  # exp_avg and exp_avg_sq of every block weight


@pytest.mark.parametrize("packed_state", [True, False], ids=["packed-state", "torch-state"])
@pytest.mark.parametrize("first", ["packed", "dense"])
def test_checkpoints_resume_across_storages(tmp_path, tiny_params, monkeypatch, first, packed_state):
    """Without clipping (see test_gradient_clipping_matches_masked_dense) a resumed run is the
    straight one bit for bit, whichever storage wrote the checkpoint and whichever reads it."""
    opt = {"packed_state": packed_state, "max_gradient_norm": None}
    straight = _setup(tmp_path / "straight", tiny_params, monkeypatch, packed=False, max_steps=6, **opt)
    losses = [float(tr.train_step(straight)) for _ in range(6)]
    expected = tr.checkpoint_state(straight)

    half = _setup(tmp_path / "halves", tiny_params, monkeypatch, packed=first == "packed", max_steps=3, **opt)
    head = [float(tr.train_step(half)) for _ in range(3)]
    path = tr.save(half)
    saved = torch.load(path, weights_only=True)
    _check_nan_checkpoint(saved, half)
    rest = _setup(tmp_path / "halves", tiny_params, monkeypatch, packed=first != "packed", max_steps=6, **opt)
    assert rest.step == 3 and rest.loaded_from == path
    tail = [float(tr.train_step(rest)) for _ in range(3)]
    got = tr.checkpoint_state(rest)

    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(head + tail, losses, **exact)
    assert list(got["model"]) == list(expected["model"])
    torch.testing.assert_close(got["model"], expected["model"], **exact)
    assert got["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    torch.testing.assert_close(got["optimizer"]["state"], expected["optimizer"]["state"], **exact)
    _check_nan_checkpoint(got, rest)


def test_inspect_and_finalize_read_a_packed_runs_checkpoint(tmp_path, tiny_params, monkeypatch, capsys):
    from sparsetrain.cli import main

    run = _setup(tmp_path / "run", tiny_params, monkeypatch, packed=True, max_steps=2)
    tr.train_step(run)
    path = tr.save(run)
    assert main(["inspect", str(path)]) == 0
    assert "layers.0.mlp.fc.weight" in capsys.readouterr().out
    out = tmp_path / "final.mdl"
    assert main(["finalize", "--input", str(path), "--output", str(out)]) == 0
    final = torch.load(out, weights_only=True)
    model = final.get("model", final)
    assert not any(torch.isnan(v).any() for v in model.values() if v.is_floating_point())


# -- masks that change, switching back ----------------------------------------------------------


def test_new_masks_repack_blocks_and_optimizer_state():
    block = {**BLOCK, "sparsity": 0.5}
    dense, sp_dense, packed, sp_packed = _pair(block)
    _train(dense, sp_dense, "AdamW", False, 3)
    _, _, opt = _train(packed, sp_packed, "AdamW", False, 3)
    name = "layers.1.mlp.fc.weight"
    state = sp_dense.state_dict()
    layout = state["masks"][name].view(16, 16, 4, 16).any(3).any(1)  # (256, 64) in 16x16 blocks
    live, dead = layout.nonzero()[0], (~layout).nonzero()[:2]
    layout[tuple(live)] = False
    for cell in dead:  # one block more than before: the block count changes too
        layout[tuple(cell)] = True
    new = layout.repeat_interleave(16, 0).repeat_interleave(16, 1)
    for sp in (sp_dense, sp_packed):
        sp.load_state_dict({**state, "masks": {**state["masks"], name: new}})
    module = _module(packed, name)
    blocks = module.weight_blocks
    assert blocks.shape[0] == int(layout.sum()) and blocks.grad is None
    torch.testing.assert_close(module.dense_weight(), _module(dense, name).weight, rtol=0, atol=0)
    assert (module.dense_weight()[~new] == 0).all()
    dense_state = opt.state_dict()["state"]
    index = next(i for i, p in enumerate(p for g in opt.param_groups for p in g["params"]) if p is blocks)
    assert opt.state[blocks]["exp_avg"].shape == blocks.shape
    assert (dense_state[index]["exp_avg"][~new] == 0).all()
    # training goes on, both storages alike
    loss_d, _, _ = _train(dense, sp_dense, "SGD", False, 3)
    loss_p, _, _ = _train(packed, sp_packed, "SGD", False, 3)
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-5, atol=1e-6)


def test_packing_after_the_optimizer_is_an_error_and_dense_kernels_unpack():
    model = _gpt()
    sp = sparsify(model, BLOCK)
    opt = torch.optim.AdamW(model.parameters())
    sp.attach(opt)
    with pytest.raises(ValueError, match="before building the optimizer"):
        use_block_kernels(model, sp, packed=True)

    dense, _, packed, sp_packed = _pair()
    use_dense_kernels(packed)
    assert not packed_layers(packed) and not any(isinstance(m, BlockSparseLinear) for m in packed.modules())
    for name in WEIGHTS:
        torch.testing.assert_close(_module(packed, name).weight, _module(dense, name).weight, rtol=0, atol=0)
    sp_packed.attach(torch.optim.SGD(packed.parameters(), lr=0.1))  # binds the masks to the new weights
    assert len(sp_packed._bound) == len(WEIGHTS)


# -- Triton's CPU interpreter (Triton installed, no GPU) -----------------------------------------

INTERPRETER_SCRIPT = textwrap.dedent(
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
    script.write_text(INTERPRETER_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "interpreter ok" in out.stdout, out.stderr[-3000:]


# -- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_gpu_packed_layer_matches_dense_storage_under_autocast():
    dense, sp_dense, packed, _ = _pair({**BLOCK, "block_size": 32}, device="cuda")
    assert len(use_block_kernels(dense, sp_dense)) == len(WEIGHTS)  # the kernels on dense storage
    idx, targets = _batch(0, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_d, loss_p = dense(idx, targets), packed(idx, targets)
    loss_d.backward()
    loss_p.backward()
    torch.testing.assert_close(loss_p, loss_d)  # the same bf16 blocks, the same kernels
    for name in WEIGHTS:
        module = _module(packed, name)
        grad = module.weight_blocks.grad
        assert grad.dtype == torch.float32 and grad.shape == module.weight_blocks.shape
        torch.testing.assert_close(grad, pack_blocks(_module(dense, name).weight.grad, module.layout()))


@pytest.mark.cuda
def test_gpu_packed_layers_compile_without_graph_break():
    _, _, packed, _ = _pair({**BLOCK, "block_size": 32}, device="cuda")
    idx, targets = _batch(0, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = packed(idx, targets)
        compiled = torch.compile(packed, fullgraph=True)(idx, targets)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)
    compiled.backward()
    assert all(_module(packed, n).weight_blocks.grad is not None for n in WEIGHTS)


@pytest.mark.cuda
def test_gpu_training_stores_live_blocks_and_matches_masked_dense(tmp_path, tiny_params):
    losses, states = {}, {}
    for kernels in ("auto", "off"):
        p = tiny_params(sparsity=BLOCK, model={"hidden_size": 64})
        p["runconfig"].update({"device": "cuda", "max_steps": 20, "compile": False, "sparse_kernels": kernels})
        run = tr.setup(params_from_dict(p), tmp_path / kernels, evaluate=False, write_metrics=False)
        layers = packed_layers(run.model)
        assert len(layers) == (8 if kernels == "auto" else 0)
        losses[kernels] = [float(tr.train_step(run)) for _ in range(20)]
        states[kernels] = tr.checkpoint_state(run)
        for name, module in layers.items():
            blocks = module.weight_blocks
            assert blocks.grad.shape == blocks.shape
            assert blocks.numel() == int(run.sparsifier.masks[name].sum())
    torch.testing.assert_close(losses["auto"], losses["off"], rtol=2e-2, atol=2e-2)
    a, b = states["auto"], states["off"]
    assert list(a["model"]) == list(b["model"])
    for k in a["model"]:
        assert torch.equal(torch.isnan(a["model"][k]), torch.isnan(b["model"][k])), k
