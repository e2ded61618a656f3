"""Dynamic sparsity on packed block-sparse layers: ``set_layout`` with as many live blocks as before
moves blocks, optimizer state and tables IN PLACE (same tensors: CUDA graphs keep their
addresses), a changed count still makes new tensors; and ``dense_grad.collect_dense_grads`` gives
the dense ``dL/dW`` of packed layers (dead blocks included) equal to a plain dense layer's, without
changing the layers' own gradients. CPU: the fallback path (blocks unpacked, ``F.linear``); the
``cuda`` test runs the Triton kernels in bf16."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.kernels.block_sparse_op import TABLES, kernel_path
from sparsetrain.kernels.blocks import BlockLayout, layout_to_mask, pack_blocks, unpack_blocks
from sparsetrain.sparsity.block_linear import FUSED, BlockSparseLinear, _fuse_stacks, use_block_kernels
from sparsetrain.sparsity.dense_grad import collect_dense_grads
from sparsetrain.sparsity.sparsifier import sparsify
from tests.helpers import rel_err, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

B = (16, 16)


def _layout(n: int, k: int, live: int, seed: int, block=B) -> torch.Tensor:
    """A random bool block layout of an ``(n, k)`` weight with exactly ``live`` live blocks."""
    rows, cols = n // block[0], k // block[1]
    order = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))
    layout = torch.zeros(rows * cols, dtype=torch.bool)
    layout[order[:live]] = True
    return layout.view(rows, cols)


def _moved(layout: torch.Tensor, live: int, seed: int) -> torch.Tensor:
    """``layout`` with ``live`` of its live blocks dead and as many dead ones live (SET / RigL)."""
    g = torch.Generator().manual_seed(seed)
    flat = layout.flatten().clone()
    on, off = flat.nonzero().flatten(), (~flat).nonzero().flatten()
    flat[on[torch.randperm(on.numel(), generator=g)[:live]]] = False
    flat[off[torch.randperm(off.numel(), generator=g)[:live]]] = True
    return flat.view(layout.shape)


def _packed(n: int, k: int, layout: torch.Tensor, seed: int = 0, device="cpu", block=B) -> BlockSparseLinear:
    """A packed ``BlockSparseLinear`` (live blocks only) of an ``nn.Linear(k, n)``."""
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, device=device)
    layer.__class__ = BlockSparseLinear
    layer.set_layout(layout.to(device), block)
    layer.pack()
    return layer


def _mask(layer: BlockSparseLinear, layout: torch.Tensor) -> torch.Tensor:
    return layout_to_mask(layout, layer.block, (layer.out_features, layer.in_features)).to(layer.bias.device)


def _pointers(layer: BlockSparseLinear, opt: torch.optim.Optimizer) -> dict[str, int]:
    p = layer.weight_blocks
    ptrs = {"weight_blocks": p.data_ptr(), **{f"_bs_{n}": getattr(layer, f"_bs_{n}").data_ptr() for n in TABLES}}
    ptrs.update({f"state.{k}": v.data_ptr() for k, v in opt.state[p].items() if v.shape == p.shape})
    return ptrs


def _adamw_step(layer: BlockSparseLinear) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(3, layer.in_features, device=layer.bias.device)).square().sum().backward()
    opt.step()
    return opt


# -- in-place repack -----------------------------------------------------------------------------


def test_equal_block_count_repacks_in_place():
    n, k = 64, 48  # a 4 x 3 block grid
    old = _layout(n, k, 6, seed=1)
    new = _moved(old, 2, seed=2)
    layer = _packed(n, k, old)
    opt = _adamw_step(layer)
    p = layer.weight_blocks
    before = _pointers(layer, opt)
    assert len(before) == 1 + len(TABLES) + 2  # weight, tables, exp_avg and exp_avg_sq
    dense = {"weight": layer.dense_weight(), **{k: unpack_blocks(v, layer.layout()) for k, v in opt.state[p].items()
                                                if v.shape == p.shape}}  # fmt: skip

    layer.set_layout(new, B, [opt])

    assert layer.weight_blocks is p and p.grad is None
    assert _pointers(layer, opt) == before  # every tensor kept: CUDA graphs keep their addresses
    tables = BlockLayout.build(new, B)
    for name in TABLES:
        assert torch.equal(getattr(layer, f"_bs_{name}"), getattr(tables, name)), name
    mask = _mask(layer, new)
    fresh = mask & ~_mask(layer, old)  # blocks that became live
    assert fresh.any()
    # the reference: the dense masked tensors packed from scratch with the new layout
    torch.testing.assert_close(p, pack_blocks(dense["weight"] * mask, tables), rtol=0, atol=0)
    for key in ("exp_avg", "exp_avg_sq"):
        state = opt.state[p][key]
        torch.testing.assert_close(state, pack_blocks(dense[key] * mask, tables), rtol=0, atol=0)
        assert (unpack_blocks(state, tables)[fresh] == 0).all()
    assert (layer.dense_weight()[fresh] == 0).all()
    x = torch.randn(2, 5, k)
    torch.testing.assert_close(layer(x), F.linear(x, dense["weight"] * mask, layer.bias))
    # training goes on with the same state tensors
    layer(x).square().sum().backward()
    opt.step()
    assert _pointers(layer, opt) == before and (unpack_blocks(opt.state[p]["exp_avg"], tables)[fresh] != 0).any()


def test_changed_block_count_makes_new_tensors():
    n, k = 64, 48
    old = _layout(n, k, 6, seed=1)
    new = _moved(old, 2, seed=2).flatten()
    new[(~new).nonzero()[0]] = True  # and one block more (GMP: counts change)
    new = new.view(old.shape)
    layer = _packed(n, k, old)
    opt = _adamw_step(layer)
    p = layer.weight_blocks
    weight = layer.dense_weight()
    exp_avg = unpack_blocks(opt.state[p]["exp_avg"], layer.layout())
    layer.set_layout(new, B, [opt])
    assert layer.weight_blocks is p and p.shape == (7, *B) and p.grad is None
    assert layer._bs_row_cols.shape == (7,) and opt.state[p]["exp_avg"].shape == p.shape
    mask = _mask(layer, new)
    torch.testing.assert_close(layer.dense_weight(), weight * mask, rtol=0, atol=0)
    torch.testing.assert_close(unpack_blocks(opt.state[p]["exp_avg"], layer.layout()), exp_avg * mask, rtol=0, atol=0)
    x = torch.randn(4, k)
    torch.testing.assert_close(layer(x), F.linear(x, weight * mask, layer.bias))


class QKV(nn.Module):
    """Three layers run as one product, as ``sparsetrain.model.Attention`` runs q, k, v."""

    fused_linears = ("q", "k", "v")

    def __init__(self, layers) -> None:
        super().__init__()
        self.q, self.k, self.v = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BlockSparseLinear.fused_forward(x, (self.q, self.k, self.v))


def _stack(d: int = 32, device="cpu", block=B) -> tuple[QKV, list[torch.Tensor]]:
    layouts = [_layout(d, d, 2, seed=s, block=block) for s in range(3)]  # 2 of 4 blocks each
    stack = QKV([_packed(d, d, layout, seed=s, device=device, block=block) for s, layout in enumerate(layouts)])
    _fuse_stacks(stack)
    return stack, layouts


def _stack_reference(stack: QKV, x: torch.Tensor) -> torch.Tensor:
    layers = (stack.q, stack.k, stack.v)
    weight = torch.cat([m.dense_weight() for m in layers])
    return F.linear(x, weight, torch.cat([m.bias for m in layers]))


def test_fused_stack_follows_a_new_layout():
    stack, layouts = _stack()
    fused = {n: getattr(stack.q, f"{FUSED}{n}") for n in TABLES}
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(stack(x), _stack_reference(stack, x))
    stack.k.set_layout(_moved(layouts[1], 1, seed=5), B)  # the same count: refreshed in place
    _fuse_stacks(stack)
    assert all(getattr(stack.q, f"{FUSED}{n}") is t for n, t in fused.items())
    assert not hasattr(stack.k, f"{FUSED}row_ptr")
    expected = BlockLayout.build(torch.cat([_grid(m) for m in (stack.q, stack.k, stack.v)]), B)
    for name in TABLES:
        assert torch.equal(fused[name], getattr(expected, name)), name
    torch.testing.assert_close(stack(x), _stack_reference(stack, x))
    stack.v.set_layout(torch.ones(2, 2, dtype=torch.bool), B)  # more blocks: new tables
    _fuse_stacks(stack)
    assert getattr(stack.q, f"{FUSED}row_cols").numel() == 2 + 2 + 4
    torch.testing.assert_close(stack(x), _stack_reference(stack, x))


def _grid(layer: BlockSparseLinear) -> torch.Tensor:
    layout = layer.layout()
    grid = torch.zeros(layout.grid, dtype=torch.bool, device=layout.row_cols.device)
    grid[layout.blk_rows.long(), layout.row_cols.long()] = True
    return grid


def test_sparsifier_mask_update_keeps_every_tensor():
    """Through the sparsifier (``load_state_dict`` -> ``use_block_kernels``): new masks of the same
    block counts leave weights, Adam state and every table (stacks too) where they were."""
    model = tiny_gpt()
    sp = sparsify(model, {"sparsity": 0.5, "structure": "block", "block_size": 16, "init_method": "random"})
    use_block_kernels(model, sp, packed=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp.attach(opt)
    idx = torch.randint(0, 97, (2, 16))
    model(idx, torch.roll(idx, -1, 1)).backward()
    opt.step()
    layers = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in sp.masks}
    before = {n: _pointers(m, opt) for n, m in layers.items()}
    q = model.transformer_decoder.layers[0].self_attn.proj_q_dense_layer
    fused = {n: getattr(q, f"{FUSED}{n}").data_ptr() for n in TABLES}
    state = sp.state_dict()
    masks, layouts = dict(state["masks"]), {}
    prefix = "transformer_decoder.layers."
    for name in (f"{prefix}0.self_attn.proj_k_dense_layer.weight", f"{prefix}1.ffn.ffn.0.linear_layer.weight"):
        layout = masks[name].view(masks[name].shape[0] // 16, 16, -1, 16).any(3).any(1)
        layouts[name] = _moved(layout, 2, seed=7)
        masks[name] = layout_to_mask(layouts[name], B, masks[name].shape)
    sp.load_state_dict({**state, "masks": masks})
    assert {n: _pointers(m, opt) for n, m in layers.items()} == before
    assert {n: getattr(q, f"{FUSED}{n}").data_ptr() for n in TABLES} == fused
    for name, layout in layouts.items():
        assert torch.equal(_grid(layers[name]), layout)
    for name, layer in layers.items():
        assert (layer.dense_weight()[~masks[name]] == 0).all()
    attn = model.transformer_decoder.layers[0].self_attn
    stack = tuple(getattr(attn, n) for n in attn.fused_linears)
    x = torch.randn(2, 5, q.in_features)
    torch.testing.assert_close(BlockSparseLinear.fused_forward(x, stack), torch.cat([m(x) for m in stack], -1))


# -- dense gradients on demand ---------------------------------------------------------------------


def _dense_twin(layer: BlockSparseLinear) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``layer``'s masked dense weight, requiring its gradient."""
    twin = nn.Linear(layer.in_features, layer.out_features, device=layer.bias.device)
    with torch.no_grad():
        twin.weight.copy_(layer.dense_weight())
        twin.bias.copy_(layer.bias)
    return twin


def _loss(y: torch.Tensor, seed: int) -> torch.Tensor:
    """A loss whose gradient is not a function of ``y`` alone (a fixed random projection)."""
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    return (y.float().tanh() * w).sum()


def _inputs(passes: int, k: int, device="cpu") -> list[torch.Tensor]:
    return [torch.randn(2, 5, k, device=device) for _ in range(passes)]


@pytest.mark.parametrize("passes", [1, 2])
def test_dense_grads_of_a_packed_layer_equal_a_dense_layers(passes):
    layer = _packed(64, 48, _layout(64, 48, 5, seed=3))
    model = nn.Sequential(layer)
    twin = _dense_twin(layer)
    xs = _inputs(passes, 48)
    for i, x in enumerate(xs):  # without the probe: the layer's own gradient
        _loss(layer(x), i).backward()
    plain = layer.weight_blocks.grad.clone()
    layer.weight_blocks.grad = None
    with collect_dense_grads(model, ["0.weight"]) as grads:
        assert grads["0.weight"].shape == (64, 48) and grads["0.weight"].dtype == torch.float32
        for i, x in enumerate(xs):
            _loss(model(x), i).backward()
            _loss(twin(x), i).backward()
    torch.testing.assert_close(grads["0.weight"], twin.weight.grad)
    assert (grads["0.weight"][~_mask(layer, _grid(layer))] != 0).any()  # dead blocks too
    torch.testing.assert_close(layer.weight_blocks.grad, plain, rtol=0, atol=0)  # unchanged by the probe
    # outside the context nothing is probed
    assert "_dense_grad_probe" not in vars(layer) and layer._dense_grad_probe is None
    kept = grads["0.weight"].clone()
    _loss(model(xs[0]), 0).backward()
    torch.testing.assert_close(grads["0.weight"], kept, rtol=0, atol=0)


@pytest.mark.parametrize("passes", [1, 2])
def test_dense_grads_of_a_fused_stack(passes):
    stack, _ = _stack()
    twins = [_dense_twin(m) for m in (stack.q, stack.k, stack.v)]
    xs = [x.requires_grad_() for x in _inputs(passes, 32)]
    for i, x in enumerate(xs):
        _loss(stack(x), i).backward()
    plain = [m.weight_blocks.grad.clone() for m in (stack.q, stack.k, stack.v)]
    plain_x = [x.grad.clone() for x in xs]
    for m in (stack.q, stack.k, stack.v):
        m.weight_blocks.grad = None
    for x in xs:
        x.grad = None
    names = ["q.weight", "k.weight", "v.weight"]
    with collect_dense_grads(stack, names) as grads:
        for i, x in enumerate(xs):
            _loss(stack(x), i).backward()
            _loss(torch.cat([t(x.detach()) for t in twins], -1), i).backward()
    for name, twin, m, g in zip(names, twins, (stack.q, stack.k, stack.v), plain):
        torch.testing.assert_close(grads[name], twin.weight.grad, msg=name)
        torch.testing.assert_close(m.weight_blocks.grad, g, msg=name)
    for x, g in zip(xs, plain_x):
        torch.testing.assert_close(x.grad, g)  # the probe passes grad_out on unchanged


def test_dense_grads_of_plain_linears_and_what_is_refused():
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    x = torch.randn(3, 8)
    with collect_dense_grads(model, ["0.weight", "2.weight"]) as grads:
        model(x).square().sum().backward()
    for name in grads:
        torch.testing.assert_close(grads[name], model.get_parameter(name).grad)
    assert all(not m._forward_hooks for m in model)  # no hook remains
    with pytest.raises(ValueError, match="not the weight of an nn.Linear"):
        with collect_dense_grads(model, ["1.weight"]):
            pass
    # a forward that bypasses the module (attention fuses plain q, k, v): a warning, grads read 0
    gpt = tiny_gpt()
    name = "transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"
    ffn = "transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"
    idx = torch.randint(0, 97, (2, 8))
    with pytest.warns(UserWarning, match="proj_q_dense_layer"):
        with collect_dense_grads(gpt, [name, ffn]) as grads:
            gpt(idx, idx).backward()
    assert (grads[name] == 0).all()
    torch.testing.assert_close(grads[ffn], gpt.get_parameter(ffn).grad)


def test_compiled_layer_outside_the_context():
    layer = _packed(32, 32, _layout(32, 32, 2, seed=0))
    with collect_dense_grads(nn.Sequential(layer), ["0.weight"]):
        layer(torch.randn(2, 32)).sum().backward()
    x = torch.randn(2, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, F.linear(x, layer.dense_weight(), layer.bias))


# -- on a GPU: the Triton kernels in bf16 --------------------------------------------------------------


@pytest.mark.cuda
def test_gpu_in_place_repack_and_dense_grads_on_the_kernels():
    block = (32, 32)
    n, k = 128, 96
    layout = _layout(n, k, 5, seed=1, block=block)
    layer = _packed(n, k, layout, device="cuda", block=block)
    opt = _adamw_step(layer)
    before = _pointers(layer, opt)
    weight = layer.dense_weight()
    new = _moved(layout, 2, seed=2)
    layer.set_layout(new.cuda(), block, [opt])
    assert _pointers(layer, opt) == before
    mask = _mask(layer, new)
    torch.testing.assert_close(layer.dense_weight(), weight * mask, rtol=0, atol=0)
    model, twin = nn.Sequential(layer), _dense_twin(layer)
    xs = _inputs(2, k, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert kernel_path(xs[0], layer.weight_blocks, block) == torch.bfloat16
        torch.testing.assert_close(layer(xs[0]).float(), twin(xs[0]).float(), rtol=2e-2, atol=2e-2)
        for i, x in enumerate(xs):
            _loss(layer(x), i).backward()
        plain = layer.weight_blocks.grad.clone()
        layer.weight_blocks.grad = None
        with collect_dense_grads(model, ["0.weight"]) as grads:
            for i, x in enumerate(xs):
                _loss(model(x), i).backward()
                _loss(twin(x), i).backward()
    assert rel_err(grads["0.weight"], twin.weight.grad) < 1e-2
    torch.testing.assert_close(layer.weight_blocks.grad, plain)

    stack, _ = _stack(64, device="cuda", block=block)
    twins = [_dense_twin(m) for m in (stack.q, stack.k, stack.v)]
    names = ["q.weight", "k.weight", "v.weight"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with collect_dense_grads(stack, names) as grads:
            for i, x in enumerate(_inputs(2, 64, "cuda")):
                _loss(stack(x), i).backward()
                _loss(torch.cat([t(x) for t in twins], -1), i).backward()
    for name, twin in zip(names, twins):
        assert rel_err(grads[name], twin.weight.grad) < 1e-2, name
