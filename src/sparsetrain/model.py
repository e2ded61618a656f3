"""GPT-2 / GPT-3 style decoder-only transformer. Knows nothing of sparsity.

Parameter names are chosen so that the sparsity heuristic of the seed (skip names containing
``norm`` or ``embed``, and the LM head) reads naturally on them:

    embed_tokens.weight            (V, d)
    embed_positions.weight         (n, d)
    layers.{i}.norm_1.{weight,bias}
    layers.{i}.attn.qkv.{weight,bias}    (3d, d)
    layers.{i}.attn.proj.{weight,bias}   (d, d)
    layers.{i}.norm_2.{weight,bias}
    layers.{i}.mlp.fc.{weight,bias}      (f, d)
    layers.{i}.mlp.proj.{weight,bias}    (d, f)
    norm_f.{weight,bias}
    lm_head.weight                 (V, d), the same tensor as embed_tokens.weight when tied
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.config.sections import ModelParams


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.use_bias)
        self.proj = nn.Linear(d, d, bias=cfg.use_bias)
        self.dropout = cfg.dropout_rate
        self.resid_dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, d) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.num_heads, d // self.num_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        f = cfg.filter_size or 4 * cfg.hidden_size
        self.fc = nn.Linear(cfg.hidden_size, f, bias=cfg.use_bias)
        self.proj = nn.Linear(f, cfg.hidden_size, bias=cfg.use_bias)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        eps, bias = cfg.layer_norm_epsilon, cfg.use_bias
        self.norm_1 = nn.LayerNorm(cfg.hidden_size, eps=eps, bias=bias)
        self.attn = CausalSelfAttention(cfg)
        self.norm_2 = nn.LayerNorm(cfg.hidden_size, eps=eps, bias=bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    """Pre-norm GPT decoder: ``forward(idx)`` returns logits, ``forward(idx, targets)`` the loss.

    With targets only the loss leaves the model, so a compiled graph never has to keep the
    (batch, seq, vocab) logits alive as an output.
    """

    def __init__(self, cfg: ModelParams) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelParams.vocab_size must be resolved before building the model")
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, d)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm_f = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon, bias=cfg.use_bias)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.share_embedding_weights:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.initializer_range
        # GPT-2: residual projections scaled by 1/sqrt(2 L) so the residual stream keeps its scale.
        resid_std = std / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            elif name.endswith("proj.weight"):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
        pos = torch.arange(T, device=idx.device)
        x = self.dropout(self.embed_tokens(idx) + self.embed_positions(pos))  # (B, T, d)
        for block in self.layers:
            x = block(x)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            return logits
        # Under autocast cross_entropy computes in fp32 by itself.
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

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
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
