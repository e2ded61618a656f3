from __future__ import annotations

import math

import pytest
import torch

from sparsetrain.config import ModelParams, params_from_dict
from sparsetrain.flops import flops_report, training_flops_per_token
from sparsetrain.model import GPT


def tiny(**kw) -> ModelParams:
    base = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, max_position_embeddings=16, vocab_size=50)
    return ModelParams(**{**base, **kw})


def test_names_and_tying():
    model = GPT(tiny())
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["embed_tokens.weight", "embed_positions.weight"]
    assert "layers.1.attn.qkv.weight" in names and "layers.0.mlp.proj.weight" in names
    assert "lm_head.weight" not in names  # tied: one tensor, named once
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = GPT(tiny(share_embedding_weights=False, use_bias=False))
    names = [n for n, _ in untied.named_parameters()]
    assert "lm_head.weight" in names and not any(n.endswith("bias") for n in names)


def test_initial_loss_is_uniform_and_causal():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(0, 50, (3, 16))
    logits, loss = model(x), model(x, torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.3
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 50
    torch.testing.assert_close(model(x2)[:, :10], logits[:, :10])


def test_generate_extends():
    model = GPT(tiny()).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 20, temperature=1.0, top_k=5)
    assert out.shape == (1, 23)  # longer than the context: the window slides


def test_flops_gpt3_xl_ratio_matches_seed():
    cfg = params_from_dict({"model": {"preset": "gpt3-xl"}}).model
    dense = training_flops_per_token(cfg, 2048)
    L, d, n, V = 24, 2048, 2048, 50257
    assert dense == pytest.approx(3 * (2 * 12 * L * d * d + 4 * L * n * d + 2 * d * V))
    from sparsetrain.flops import block_linear_weights

    report = flops_report(cfg, 2048, {k: 0.75 for k in block_linear_weights(cfg)})
    assert report["ratio"] == pytest.approx(2.49, abs=0.005)


def test_flops_count_model_linears():
    cfg = tiny(filter_size=48)
    model = GPT(cfg)
    from sparsetrain.flops import block_linear_weights

    sizes = block_linear_weights(cfg)
    params = dict(model.named_parameters())
    assert all(params[k].numel() == v for k, v in sizes.items())
    assert len(sizes) == 8
