"""GPT-2 / GPT-3 style decoder-only transformer. Knows nothing of sparsity.

Parameter names are the model zoo's (its GPT-2 / GPT-3 models), so the zoo's sparsity patterns,
checkpoints and tools apply unchanged, and q, k and v are separate weights that a pattern can
select one by one:

    embedding_layer.word_embeddings.weight                          (V, d)
    embedding_layer.position_embeddings.weight                      (n, d)
    transformer_decoder.layers.{i}.self_attn.proj_{q,k,v}_dense_layer.{weight,bias}   (d, d)
    transformer_decoder.layers.{i}.self_attn.proj_output_dense_layer.{weight,bias}    (d, d)
    transformer_decoder.layers.{i}.norm1.{weight,bias}              before attention
    transformer_decoder.layers.{i}.norm3.{weight,bias}              before the feed-forward
    transformer_decoder.layers.{i}.ffn.ffn.0.linear_layer.{weight,bias}   (f, d)
    transformer_decoder.layers.{i}.ffn.ffn.1.linear_layer.{weight,bias}   (d, f)
    transformer_decoder.norm.{weight,bias}   also ``ln_f.*`` in the state dict, as in the zoo
    lm_head.weight (V, d), the same tensor as the word embeddings when tied; lm_head.bias optional

The sparsity heuristic of the seed (skip names containing ``norm`` or ``embed``, and the LM head)
reads naturally on these names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.config.sections import INITIALIZERS, ModelParams

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def _bias(value: bool | None, default: bool) -> bool:
    return default if value is None else value


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q, k, v projections."""

    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        d = cfg.hidden_size
        qkv_bias = _bias(cfg.use_projection_bias_in_attention, cfg.use_bias)
        self.num_heads = cfg.num_heads
        self.proj_q_dense_layer = nn.Linear(d, d, bias=qkv_bias)
        self.proj_k_dense_layer = nn.Linear(d, d, bias=qkv_bias)
        self.proj_v_dense_layer = nn.Linear(d, d, bias=qkv_bias)
        self.proj_output_dense_layer = nn.Linear(d, d, bias=_bias(cfg.use_ffn_bias_in_attention, cfg.use_bias))
        self.dropout = cfg.dropout_rate if cfg.attention_dropout_rate is None else cfg.attention_dropout_rate
        self.scale = 1.0 if cfg.attention_type == "dot_product" else None  # None: 1/sqrt(head size)
        self.resid_dropout = nn.Dropout(cfg.dropout_rate)

    # Layers that run as one product over their weights stacked along the outputs (as fast as
    # a fused qkv layer). Layers of another class take part when the class offers
    # ``fused_forward(x, layers)``; otherwise each runs on its own.
    fused_linears = ("proj_q_dense_layer", "proj_k_dense_layer", "proj_v_dense_layer")

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = tuple(getattr(self, name) for name in self.fused_linears)
        kind = type(layers[0])
        if any(type(m) is not kind for m in layers):
            return tuple(m(x) for m in layers)
        if kind is nn.Linear:
            weight = torch.cat([m.weight for m in layers])
            bias = torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None
            return F.linear(x, weight, bias).split(x.shape[-1], dim=-1)
        fused = getattr(kind, "fused_forward", None)
        if fused is None:
            return tuple(m(x) for m in layers)
        return fused(x, layers).split(x.shape[-1], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        # (B, T, d) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.num_heads, d // self.num_heads).transpose(1, 2) for t in self._qkv(x))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        y = y.transpose(1, 2).contiguous().view(B, T, d)
        return self.resid_dropout(self.proj_output_dense_layer(y))


class FeedForwardLayer(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.linear_layer = nn.Linear(n_in, n_out, bias=bias)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        f, bias = cfg.filter_size or 4 * cfg.hidden_size, _bias(cfg.use_ffn_bias, cfg.use_bias)
        self.ffn = nn.ModuleList([FeedForwardLayer(cfg.hidden_size, f, bias), FeedForwardLayer(f, cfg.hidden_size, bias)])
        self.activation = ACTIVATIONS[cfg.nonlinearity]
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.ffn[0].linear_layer(x))
        return self.dropout(self.ffn[1].linear_layer(hidden))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        eps, bias = cfg.layer_norm_epsilon, cfg.use_bias
        self.self_attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=eps, bias=bias)
        self.norm3 = nn.LayerNorm(cfg.hidden_size, eps=eps, bias=bias)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self.ffn(self.norm3(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, bias=cfg.use_bias)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class GPT(nn.Module):
    """Pre-norm GPT decoder: ``forward(idx)`` returns logits, ``forward(idx, targets)`` the loss.

    Targets equal to -100 are left out of the loss (the zoo's loss mask). ``model.loss_scaling``:
    ``num_tokens`` divides the summed loss by the number of counted targets (the mean per token),
    ``batch_size`` by the number of sequences and multiplies it by ``model.loss_weight``.
    With targets only the loss leaves the model, so a compiled graph never has to keep the
    (batch, seq, vocab) logits alive as an output.
    """

    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelParams.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.embedding_layer = Embeddings(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.transformer_decoder = Decoder(cfg)
        self.ln_f = self.transformer_decoder.norm  # the zoo's alias: both names in the state dict
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=bool(cfg.use_bias_in_output))
        if cfg.share_embedding_weights:
            self.lm_head.weight = self.embedding_layer.word_embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The zoo's initializers where the params give them; else normal(0, initializer_range)
        and, as in GPT-2, residual output layers scaled by 1/sqrt(2 L)."""
        cfg = self.cfg
        std = cfg.initializer_range
        default = {"name": "normal", "std": std}
        inner = cfg.initializer or default
        if cfg.output_layer_initializer is not None:
            output = cfg.output_layer_initializer
        elif cfg.initializer is not None:
            output = cfg.initializer  # the zoo: output layers take `initializer` when given alone
        else:
            output = {"name": "normal", "std": std / math.sqrt(2 * cfg.num_hidden_layers)}
        embedding = cfg.embedding_initializer or default
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            elif name.startswith("embedding_layer."):
                init_tensor(p, embedding)
            elif name.endswith(("proj_output_dense_layer.weight", "ffn.1.linear_layer.weight")):
                init_tensor(p, output)
            elif name == "lm_head.weight":
                init_tensor(p, default)
            else:
                init_tensor(p, inner)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
        pos = torch.arange(T, device=idx.device)
        emb = self.embedding_layer
        x = self.dropout(emb.word_embeddings(idx) + emb.position_embeddings(pos))  # (B, T, d)
        for layer in self.transformer_decoder.layers:
            x = layer(x)
        logits = self.lm_head(self.transformer_decoder.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        return self.loss(logits, targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Under autocast cross_entropy computes in fp32 by itself.
        flat = logits.view(-1, logits.size(-1)), targets.view(-1)
        if self.cfg.loss_scaling == "batch_size":
            return F.cross_entropy(*flat, reduction="sum") * (self.cfg.loss_weight / targets.shape[0])
        return F.cross_entropy(*flat)

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
        top_k: int | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T)."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.max_position_embeddings :]
            logits = self(context)[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                # The largest logit first, then the division: a tiny temperature gives -inf, never inf - inf.
                logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def init_tensor(t: torch.Tensor, spec: str | dict[str, Any]) -> None:
    """Fill ``t`` in place from a zoo initializer spec: a name, or ``{name, mean, std, a, b, val}``
    with the zoo's defaults (std 0.05; truncated normal cut at mean +- 2 std unless ``a``/``b``)."""
    spec = {"name": spec} if isinstance(spec, str) else spec
    name = spec["name"]
    mean, std = float(spec.get("mean", 0.0)), float(spec.get("std", 0.05))
    if name == "normal":
        nn.init.normal_(t, mean, std)
    elif name == "truncated_normal":
        nn.init.trunc_normal_(t, mean, std, float(spec.get("a", mean - 2 * std)), float(spec.get("b", mean + 2 * std)))
    elif name == "uniform":
        nn.init.uniform_(t, float(spec.get("a", -0.05)), float(spec.get("b", 0.05)))
    elif name == "constant":
        nn.init.constant_(t, float(spec.get("val", 0.0)))
    elif name in ("zeros", "ones"):
        t.fill_(0.0 if name == "zeros" else 1.0)
    elif name in ("xavier_uniform", "xavier_normal"):
        getattr(nn.init, name + "_")(t, gain=float(spec.get("gain", 1.0)))
    else:
        raise ValueError(f"initializer {name!r}: choose one of {', '.join(INITIALIZERS)}")
