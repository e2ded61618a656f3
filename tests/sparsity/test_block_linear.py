"""``sparsity/block_linear.py``: block-sparse ``nn.Linear`` layers swapped to the block kernels'
class, and (``packed=True``) storing their live blocks only. On the CPU fallback they compute
exactly what masked dense computes, keep checkpoints unchanged, and -- stored as live blocks --
train, clip and checkpoint as the masked-dense model does, with weights, gradients and optimizer
state at the live fraction of the dense bytes; checkpoints move both ways between the two
storages, and new masks repack the blocks and the optimizer state. On a GPU (``cuda`` marker):
the kernels under autocast and ``torch.compile``. The kernels themselves are in
``kernels/test_block_sparse.py``."""

from __future__ import annotations

import pytest
import torch

from sparsetrain import training as tr
from sparsetrain.config import OptimizerParams, params_from_dict
from sparsetrain.kernels.blocks import BlockLayout, pack_blocks
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
from tests.helpers import BLOCK16_75, BLOCK_MATRICES, block_kernel_run, rel_err, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = BLOCK16_75
WEIGHTS = BLOCK_MATRICES


# -- the module swap (CPU: the fallback path) ----------------------------------------------------


BLOCK_SPARSITY = {"sparsity": 0.5, "structure": "block", "block_size": 16, "init_method": "topk"}


def test_block_linears_switch_and_fall_back_on_cpu():
    model = tiny_gpt()
    sp = sparsify(model, BLOCK_SPARSITY)
    idx = torch.randint(0, 97, (2, 16))
    before = model(idx)
    keys = list(model.state_dict())
    names = use_block_kernels(model, sp)
    assert sorted(names) == sorted(sp.masks) and len(names) == 12  # q, k, v, output, ffn 0, ffn 1 of 2 layers
    assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), BlockSparseLinear) for n in names)
    assert list(model.state_dict()) == keys  # tables are non-persistent: checkpoints unchanged
    torch.testing.assert_close(model(idx), before, rtol=0, atol=0)  # CPU: F.linear on the masked weight
    use_dense_kernels(model)
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())
    torch.testing.assert_close(model(idx), before, rtol=0, atol=0)


def test_unstructured_and_unfit_weights_stay_dense():
    model = tiny_gpt()
    sp = sparsify(model, {"sparsity": 0.5, "init_method": "topk"})
    assert use_block_kernels(model, sp) == []
    model = tiny_gpt()
    sp = sparsify(model, {**BLOCK_SPARSITY, "block_size": 48})  # 48 is not a power of two
    assert use_block_kernels(model, sp) == []


def test_tables_follow_loaded_masks():
    model = tiny_gpt()
    sp = sparsify(model, BLOCK_SPARSITY)
    use_block_kernels(model, sp)
    state = sp.state_dict()
    name = next(iter(sp.masks))
    flipped = ~state["masks"][name]  # still whole blocks, the complement
    sp.load_state_dict({**state, "masks": {**state["masks"], name: flipped}})
    module = model.get_submodule(name.rsplit(".", 1)[0])
    expected = BlockLayout.build(flipped.view(module.out_features // 16, 16, -1, 16).any(3).any(1), (16, 16))
    assert torch.equal(module._bs_row_cols, expected.row_cols)


# -- live blocks only: storage, forward and gradients ---------------------------------------------


def _pair(block: dict = BLOCK, device: str = "cpu"):
    """A masked-dense and a packed model with the same weights and masks, and their sparsifiers."""
    dense, packed = tiny_gpt(device=device), tiny_gpt(device=device)
    sp_dense, sp_packed = sparsify(dense, block), sparsify(packed, block)
    assert sorted(use_block_kernels(packed, sp_packed, packed=True)) == sorted(WEIGHTS)
    return dense, sp_dense, packed, sp_packed


def _batch(step: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 97, (4, 24), generator=g)
    return idx.to(device), torch.roll(idx, -1, 1).to(device)


def _module(model: torch.nn.Module, weight_name: str) -> torch.nn.Module:
    return model.get_submodule(weight_name.rsplit(".", 1)[0])


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
        run = block_kernel_run(tmp_path / storage, tiny_params, monkeypatch, packed=storage == "packed", max_steps=5)
        assert run.params.optimizer.max_gradient_norm == 1.0
        losses = [float(tr.train_step(run)) for _ in range(5)]
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
        runs[storage] = (losses, float(norm))
    torch.testing.assert_close(runs["packed"], runs["dense"], rtol=1e-5, atol=0)


# -- state dicts and checkpoints -------------------------------------------------------------------


def test_state_dict_is_the_dense_models():
    plain = tiny_gpt()
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
    q = "transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\) in state_dict: \"{q}\""):
        packed.load_state_dict({k: v for k, v in source.items() if k != q})
    fc = "transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"
    bad = {**source, fc: torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match=f"size mismatch for {fc}"):
        packed.load_state_dict(bad)


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
    straight = block_kernel_run(tmp_path / "straight", tiny_params, monkeypatch, packed=False, max_steps=6, **opt)
    losses = [float(tr.train_step(straight)) for _ in range(6)]
    expected = tr.checkpoint_state(straight)

    half = block_kernel_run(tmp_path / "halves", tiny_params, monkeypatch, packed=first == "packed", max_steps=3, **opt)
    head = [float(tr.train_step(half)) for _ in range(3)]
    path = tr.save(half)
    saved = torch.load(path, weights_only=True)
    _check_nan_checkpoint(saved, half)
    rest = block_kernel_run(tmp_path / "halves", tiny_params, monkeypatch, packed=first != "packed", max_steps=6, **opt)
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


# -- masks that change, switching back ----------------------------------------------------------


def test_new_masks_repack_blocks_and_optimizer_state():
    block = {**BLOCK, "sparsity": 0.5}
    dense, sp_dense, packed, sp_packed = _pair(block)
    _train(dense, sp_dense, "AdamW", False, 3)
    _, _, opt = _train(packed, sp_packed, "AdamW", False, 3)
    name = "transformer_decoder.layers.1.ffn.ffn.0.linear_layer.weight"
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
    model = tiny_gpt()
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


# -- on a GPU ------------------------------------------------------------------------------------


def _block_model(device="cuda"):
    model = tiny_gpt(device=device)
    sp = sparsify(model, {**BLOCK_SPARSITY, "block_size": 32})
    return model, sp


@pytest.mark.cuda
def test_block_linear_autograd_under_autocast_matches_masked_dense():
    model, sp = _block_model()
    name = "transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"
    dense = model.get_submodule("transformer_decoder.layers.0.ffn.ffn.0.linear_layer")
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
    assert rel_err(y, y_ref) < 1e-2 and rel_err(g_x, g_ref_x) < 1e-2 and rel_err(g_w, g_ref_w) < 1e-2
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
        assert len(layers) == (12 if kernels == "auto" else 0)
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
