"""Attention's q, k, v on the block kernels as ONE block-sparse product over their stacked
layouts (``BlockSparseLinear.fused_forward``), as the dense model fuses them for plain layers."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.sparsity.block_linear import FUSED, BlockSparseLinear, use_block_kernels, use_dense_kernels
from sparsetrain.sparsity.sparsifier import sparsify
from tests.helpers import tiny_gpt

BLOCK = {"sparsity": 0.5, "structure": "block", "block_size": 16, "init_method": "random"}


def _attn(model):
    return model.transformer_decoder.layers[0].self_attn


@pytest.mark.parametrize("packed", [False, True])
def test_fused_stack_equals_the_three_products(packed):
    model = tiny_gpt()
    sp = sparsify(model, BLOCK)
    use_block_kernels(model, sp, packed=packed)
    attn = _attn(model)
    q, k, v = (getattr(attn, n) for n in attn.fused_linears)
    assert hasattr(q, f"{FUSED}row_ptr") and not hasattr(k, f"{FUSED}row_ptr")
    nnz = sum(m.layout().nnz for m in (q, k, v))
    assert getattr(q, f"{FUSED}row_cols").numel() == nnz  # the stack holds every live block once
    x = torch.randn(2, 5, q.in_features, requires_grad=True)
    fused = BlockSparseLinear.fused_forward(x, (q, k, v))
    separate = torch.cat([q(x), k(x), v(x)], dim=-1)
    torch.testing.assert_close(fused, separate)
    gx_f, *gw_f = torch.autograd.grad(fused.square().sum(), [x, *(m.stored_weight() for m in (q, k, v))])
    gx_s, *gw_s = torch.autograd.grad(separate.square().sum(), [x, *(m.stored_weight() for m in (q, k, v))])
    torch.testing.assert_close(gx_f, gx_s)
    for a, b in zip(gw_f, gw_s):
        torch.testing.assert_close(a, b)


def test_the_model_takes_the_fused_path_only_when_all_three_are_on_the_kernels():
    model = tiny_gpt()
    sp = sparsify(model, {**BLOCK, "param_name_patterns": ["proj_[qk]_dense_layer", "ffn"]})  # v stays dense
    use_block_kernels(model, sp)
    attn = _attn(model)
    assert isinstance(attn.proj_q_dense_layer, BlockSparseLinear)
    assert type(attn.proj_v_dense_layer) is torch.nn.Linear
    assert not hasattr(attn.proj_q_dense_layer, f"{FUSED}row_ptr")  # a mixed stack is not fused
    x = torch.randn(2, 5, attn.proj_q_dense_layer.in_features)
    expected = (attn.proj_q_dense_layer(x), attn.proj_k_dense_layer(x), attn.proj_v_dense_layer(x))
    for got, want in zip(attn._qkv(x), expected):
        torch.testing.assert_close(got, want)


def test_dense_kernels_drop_the_stack_tables():
    model = tiny_gpt()
    sp = sparsify(model, BLOCK)
    use_block_kernels(model, sp)
    use_dense_kernels(model)
    q = _attn(model).proj_q_dense_layer
    assert type(q) is torch.nn.Linear and not hasattr(q, f"{FUSED}row_ptr")


def test_stack_tables_follow_new_masks():
    model = tiny_gpt()
    sp = sparsify(model, BLOCK)
    use_block_kernels(model, sp)
    state = sp.state_dict()
    name = "transformer_decoder.layers.0.self_attn.proj_k_dense_layer.weight"
    sp.load_state_dict({**state, "masks": {**state["masks"], name: ~state["masks"][name]}})
    attn = _attn(model)
    q, k, v = (getattr(attn, n) for n in attn.fused_linears)
    assert getattr(q, f"{FUSED}row_cols").numel() == sum(m.layout().nnz for m in (q, k, v))
    x = torch.randn(2, 5, attn.proj_q_dense_layer.in_features)
    torch.testing.assert_close(BlockSparseLinear.fused_forward(x, (q, k, v)), torch.cat([q(x), k(x), v(x)], -1))
