"""``flops.py``: training FLOPs per token, dense and sparse (the GPT-3 XL headline ratio), and
which linear weights it counts."""

from __future__ import annotations

import pytest

from sparsetrain.config import params_from_dict
from sparsetrain.flops import flops_report, training_flops_per_token
from tests.helpers import tiny_gpt

SMALL = dict(hidden_size=32, max_position_embeddings=16, vocab_size=50)
KINDS = (
    *(f"self_attn.proj_{x}_dense_layer.weight" for x in ("q", "k", "v", "output")),
    "ffn.ffn.0.linear_layer.weight",
    "ffn.ffn.1.linear_layer.weight",
)


def test_flops_gpt3_xl_ratio_matches_seed():
    cfg = params_from_dict({"model": {"preset": "gpt3-xl"}}).model
    dense = training_flops_per_token(cfg, 2048)
    L, d, n, V = 24, 2048, 2048, 50257
    assert dense == pytest.approx(3 * (2 * 12 * L * d * d + 4 * L * n * d + 2 * d * V))
    from sparsetrain.flops import block_linear_weights

    report = flops_report(cfg, 2048, {k: 0.75 for k in block_linear_weights(cfg)})
    assert report["ratio"] == pytest.approx(2.49, abs=0.005)


def test_flops_headline_gpt3_xl():
    """SPEC §5: GPT-3 XL at 75% sparsity trains with 2.49x fewer FLOPs than dense."""
    cfg = params_from_dict({"model": {"preset": "gpt3-xl"}}).model
    names = {f"transformer_decoder.layers.{i}.{k}": 0.75 for i in range(cfg.num_hidden_layers) for k in KINDS}
    report = flops_report(cfg, 2048, names)
    assert round(report["ratio"], 2) == 2.49
    d, L_, n, V = 2048, 24, 2048, 50257
    assert report["dense"] == 3 * (2 * 12 * L_ * d * d + 4 * L_ * n * d + 2 * d * V)


def test_flops_count_model_linears():
    model = tiny_gpt(seed=None, **SMALL, filter_size=48)
    cfg = model.cfg
    from sparsetrain.flops import block_linear_weights

    sizes = block_linear_weights(cfg)
    params = dict(model.named_parameters())
    assert all(params[k].numel() == v for k, v in sizes.items())
    assert len(sizes) == 12  # q, k, v, output, ffn 0, ffn 1 of 2 layers
