"""``model.py``: the GPT's parameter names and tying, its initial loss and causal mask, generation."""

from __future__ import annotations

import math

import torch

from tests.helpers import tiny_gpt

# The model of these tests: width 32, context 16, vocab 50 (2 layers, 2 heads).
SMALL = dict(hidden_size=32, max_position_embeddings=16, vocab_size=50)


def test_names_and_tying():
    model = tiny_gpt(seed=None, **SMALL)
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["embedding_layer.word_embeddings.weight", "embedding_layer.position_embeddings.weight"]
    assert "transformer_decoder.layers.1.self_attn.proj_q_dense_layer.weight" in names
    assert "transformer_decoder.layers.0.ffn.ffn.1.linear_layer.weight" in names
    assert "lm_head.weight" not in names  # tied: one tensor, named once
    assert model.lm_head.weight is model.embedding_layer.word_embeddings.weight
    untied = tiny_gpt(seed=None, **SMALL, share_embedding_weights=False, use_bias=False)
    names = [n for n, _ in untied.named_parameters()]
    assert "lm_head.weight" in names and not any(n.endswith("bias") for n in names)


def test_initial_loss_is_uniform_and_causal():
    model = tiny_gpt(seed=0, **SMALL).eval()
    x = torch.randint(0, 50, (3, 16))
    logits, loss = model(x), model(x, torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.3
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 50
    torch.testing.assert_close(model(x2)[:, :10], logits[:, :10])


def test_generate_extends():
    model = tiny_gpt(seed=None, **SMALL).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 20, temperature=1.0, top_k=5)
    assert out.shape == (1, 23)  # longer than the context: the window slides
