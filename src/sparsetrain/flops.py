"""Training FLOPs per token, dense and with sparse weights (the accounting of the sparse GPT-3 paper).

    3 * [ 2 * sum_w (1 - s_w) * numel(w)  +  4 * L * n * d  +  2 * d * V * (1 - s_head) ]

where the sum runs over the linear weights of the transformer blocks (QKV, attention output
projection, MLP in and out: ``12 * L * d^2`` when the MLP is 4x wide), ``n`` is the training
context length, and the factor 3 counts the forward pass and the two backward products. Attention
scores and the LM head are dense unless a config sparsifies the head. Embedding lookups, softmax,
norms and biases are not counted. ``s_w`` is the actual pruned fraction of each tensor (exact
counts, so ``round(s * numel) / numel``).
"""

from __future__ import annotations

from collections.abc import Mapping

from sparsetrain.config.sections import ModelParams

HEAD_NAMES = ("lm_head.weight", "embedding_layer.word_embeddings.weight")


def block_linear_weights(cfg: ModelParams) -> dict[str, int]:
    """Names and sizes of the weights whose products scale with ``d^2`` (all blocks)."""
    d = cfg.hidden_size
    f = cfg.filter_size or 4 * d
    attn = {f"self_attn.proj_{x}_dense_layer.weight": d * d for x in ("q", "k", "v", "output")}
    sizes = {**attn, "ffn.ffn.0.linear_layer.weight": f * d, "ffn.ffn.1.linear_layer.weight": d * f}
    return {f"transformer_decoder.layers.{i}.{k}": v for i in range(cfg.num_hidden_layers) for k, v in sizes.items()}


def training_flops_per_token(
    cfg: ModelParams, seq_len: int, sparsity: Mapping[str, float] | None = None
) -> float:
    """Per-token training FLOPs; ``sparsity`` maps parameter names to their pruned fraction."""
    sparsity = sparsity or {}
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    assert V is not None, "vocab_size must be resolved"
    linear = sum((1.0 - sparsity.get(name, 0.0)) * n for name, n in block_linear_weights(cfg).items())
    head_name = "lm_head.weight" if not cfg.share_embedding_weights else HEAD_NAMES[1]
    head = 2 * d * V * (1.0 - sparsity.get(head_name, sparsity.get("lm_head.weight", 0.0)))
    return 3.0 * (2.0 * linear + 4.0 * L * seq_len * d + head)


def flops_report(cfg: ModelParams, seq_len: int, sparsity: Mapping[str, float] | None = None) -> dict[str, float]:
    """Dense and sparse FLOPs per token and their ratio (dense / sparse, >= 1)."""
    dense = training_flops_per_token(cfg, seq_len)
    sparse = training_flops_per_token(cfg, seq_len, sparsity)
    return {"dense": dense, "sparse": sparse, "ratio": dense / sparse}


def dense_grad_extra_per_token(cfg: ModelParams, sparsity: Mapping[str, float]) -> float:
    """Extra FLOPs per token of a step whose weight-gradient products are dense for the weights
    in ``sparsity`` (RigL's update steps: regrow scores need the dense gradient): the third of
    the three products runs at ``numel`` instead of ``(1 - s) * numel``, ``2 * s * numel`` more."""
    sizes = block_linear_weights(cfg)
    return sum(2.0 * s * sizes[name] for name, s in sparsity.items() if name in sizes)
