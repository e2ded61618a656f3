"""The meaning of the zoo's model keys in the model: initializers, activation, attention scaling,
biases, loss scaling and the fused q/k/v product."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.config import params_from_dict
from sparsetrain.model import GPT

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 64, "max_position_embeddings": 256}


def gpt(**model) -> GPT:
    torch.manual_seed(0)
    return GPT(params_from_dict({"model": {**TINY, **model}}).model)


def test_truncated_normal_initializers_respect_bounds_and_layers():
    init = {"name": "truncated_normal", "mean": 0.0, "std": 0.02, "a": -0.01, "b": 0.03}
    out = {"name": "truncated_normal", "std": 0.004, "a": -0.002, "b": 0.002}
    emb = {"name": "uniform", "a": 0.5, "b": 0.6}
    m = gpt(hidden_size=64, initializer=init, output_layer_initializer=out, embedding_initializer=emb)
    sd = dict(m.named_parameters())
    layer = "transformer_decoder.layers.0."
    for name in ("self_attn.proj_q_dense_layer.weight", "ffn.ffn.0.linear_layer.weight"):
        w = sd[layer + name]
        assert -0.01 <= w.min() and w.max() <= 0.03 and w.min() < -0.005 and w.max() > 0.02
    for name in ("self_attn.proj_output_dense_layer.weight", "ffn.ffn.1.linear_layer.weight"):
        w = sd[layer + name]
        assert w.abs().max() <= 0.002 and w.abs().max() > 0.001
    for name in ("embedding_layer.word_embeddings.weight", "embedding_layer.position_embeddings.weight"):
        assert 0.5 <= sd[name].min() and sd[name].max() <= 0.6
    assert torch.all(sd[layer + "self_attn.proj_q_dense_layer.bias"] == 0)
    assert torch.all(sd[layer + "norm1.weight"] == 1)


def test_default_initialization_is_unchanged_normal_with_scaled_output():
    m = gpt(hidden_size=64, num_hidden_layers=4)
    sd = dict(m.named_parameters())
    q = sd["transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"]
    o = sd["transformer_decoder.layers.0.ffn.ffn.1.linear_layer.weight"]
    assert q.std().item() == pytest.approx(0.02, rel=0.1)
    assert o.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)


def test_nonlinearity_gelu_is_exact_gelu_new_is_tanh():
    x = torch.linspace(-3, 3, 101)
    assert torch.equal(gpt(nonlinearity="gelu").transformer_decoder.layers[0].ffn.activation(x), F.gelu(x))
    assert torch.equal(gpt().transformer_decoder.layers[0].ffn.activation(x), F.gelu(x, approximate="tanh"))
    assert torch.equal(gpt(nonlinearity="relu").transformer_decoder.layers[0].ffn.activation(x), F.relu(x))


def test_dot_product_attention_is_unscaled():
    scaled, plain = gpt(), gpt(attention_type="dot_product")
    plain.load_state_dict(scaled.state_dict())
    attn_s, attn_p = scaled.transformer_decoder.layers[0].self_attn, plain.transformer_decoder.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    assert attn_s.scale is None and attn_p.scale == 1.0
    # Unscaled scores are sqrt(head size) times larger: the same as scaling q by sqrt(16).
    with torch.no_grad():
        attn_s.proj_q_dense_layer.weight.mul_(4.0)
        attn_s.proj_q_dense_layer.bias.mul_(4.0)
    torch.testing.assert_close(attn_s(x), attn_p(x))


def test_bias_switches_follow_the_zoo_keys():
    m = gpt(use_projection_bias_in_attention=False, use_ffn_bias_in_attention=True, use_ffn_bias=False,
            use_bias_in_output=True, share_embedding_weights=False)
    names = {n for n, _ in m.named_parameters()}
    layer = "transformer_decoder.layers.0."
    assert layer + "self_attn.proj_q_dense_layer.bias" not in names
    assert layer + "self_attn.proj_output_dense_layer.bias" in names
    assert layer + "ffn.ffn.0.linear_layer.bias" not in names
    assert "lm_head.bias" in names and layer + "norm1.bias" in names


def test_loss_scaling_num_tokens_and_batch_size_and_loss_mask():
    m = gpt()
    x = torch.randint(0, 64, (3, 8))
    y = torch.randint(0, 64, (3, 8))
    y[0, :4] = -100  # the zoo's loss mask, folded into the targets
    logits = m(x)
    per_token = F.cross_entropy(logits.view(-1, 64), y.view(-1), reduction="none")
    counted = (y.view(-1) != -100)
    torch.testing.assert_close(m(x, y), per_token[counted].mean())
    weighted = gpt(loss_scaling="batch_size", loss_weight=0.125)
    weighted.load_state_dict(m.state_dict())
    torch.testing.assert_close(weighted(x, y), per_token[counted].sum() / 3 * 0.125)


def test_loss_weight_needs_batch_size_scaling():
    with pytest.raises(Exception) as e:
        gpt(loss_weight=0.5)
    assert str(e.value) == (
        "model.loss_weight: 0.5 with loss_scaling num_tokens; as in the zoo (2.1+), loss_weight applies with loss_scaling "
        "batch_size only (use 1.0, or batch_size)"
    )


def test_fused_qkv_product_equals_three_projections():
    m = gpt()
    attn = m.transformer_decoder.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    q, k, v = attn._qkv(x)
    torch.testing.assert_close(q, attn.proj_q_dense_layer(x))
    torch.testing.assert_close(k, attn.proj_k_dense_layer(x))
    torch.testing.assert_close(v, attn.proj_v_dense_layer(x))


def test_state_dict_carries_the_zoo_alias_of_the_final_norm():
    sd = gpt().state_dict()
    assert torch.equal(sd["ln_f.weight"], sd["transformer_decoder.norm.weight"])
    assert "lm_head.weight" in sd


@pytest.mark.parametrize("spec, message", [
    ({"name": "variance_scaling"}, "model.initializer.name: 'variance_scaling' is not built here; choose one of normal, "
     "truncated_normal, uniform, constant, zeros, ones, xavier_uniform, xavier_normal"),
    ({"name": "normal", "a": 1.0}, "model.initializer.a: not a key of the normal initializer; valid keys: mean, name, std"),
    ({"name": "normal", "std": -1}, "model.initializer.std: -1.0 is below the minimum 0.0"),
])
def test_bad_initializer_one_line(spec, message):
    with pytest.raises(Exception) as e:
        gpt(initializer=spec)
    assert str(e.value) == message


def test_attention_dropout_rate_is_its_own():
    attn = gpt(dropout_rate=0.1, attention_dropout_rate=0.3).transformer_decoder.layers[0].self_attn
    assert attn.dropout == 0.3 and attn.resid_dropout.p == 0.1
    assert gpt(dropout_rate=0.1).transformer_decoder.layers[0].self_attn.dropout == 0.1


def test_decay_embeddings_is_the_zoos_weight_decay_rule():
    from sparsetrain.config import OptimizerParams
    from sparsetrain.optim import build_optimizer

    m = gpt()
    names = {id(p): n for n, p in m.named_parameters()}
    for zoo in (False, True):
        opt = build_optimizer(m, OptimizerParams(weight_decay_rate=0.1, decay_embeddings=zoo), torch.device("cpu"))
        decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert ("embedding_layer.word_embeddings.weight" in decayed) is zoo
        assert ("embedding_layer.position_embeddings.weight" in decayed) is zoo
        assert "transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight" in decayed
        assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
