"""Checkpoints written before the model took the zoo's parameter names (sparsetrain up to
2026-12-01: ``embed_tokens``, ``layers.N.attn.qkv``, ...), renamed to today's names so that a
model_dir of then still resumes. The fused ``qkv`` weight (3d, d) splits into q, k, v; its NaNs
(pruned positions) split with it, so the masks survive. Its optimizer state was kept in the
fused layout and in the order of that model's parameters: it is not converted (a resume starts a
fresh optimizer and says so).
"""

from __future__ import annotations

import re

import torch

LEGACY_MARK = "embed_tokens.weight"
_RENAMES = [
    (r"^embed_tokens\.", "embedding_layer.word_embeddings."),
    (r"^embed_positions\.", "embedding_layer.position_embeddings."),
    (r"^norm_f\.", "transformer_decoder.norm."),
    (r"^layers\.(\d+)\.norm_1\.", r"transformer_decoder.layers.\1.norm1."),
    (r"^layers\.(\d+)\.norm_2\.", r"transformer_decoder.layers.\1.norm3."),
    (r"^layers\.(\d+)\.attn\.proj\.", r"transformer_decoder.layers.\1.self_attn.proj_output_dense_layer."),
    (r"^layers\.(\d+)\.mlp\.fc\.", r"transformer_decoder.layers.\1.ffn.ffn.0.linear_layer."),
    (r"^layers\.(\d+)\.mlp\.proj\.", r"transformer_decoder.layers.\1.ffn.ffn.1.linear_layer."),
]
_QKV = re.compile(r"^layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def is_legacy(model_state: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's model state has the names of before the zoo's."""
    return LEGACY_MARK in model_state


def from_legacy(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under today's names: q, k, v split from ``qkv``, the ``ln_f.*`` alias
    of the final norm added."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        match = _QKV.match(key)
        if match:
            layer, kind = match.groups()
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"transformer_decoder.layers.{layer}.self_attn.proj_{part}_dense_layer.{kind}"] = chunk.clone()
            continue
        for pattern, replacement in _RENAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    for key in [k for k in out if k.startswith("transformer_decoder.norm.")]:
        out["ln_f." + key.removeprefix("transformer_decoder.norm.")] = out[key]
    return out
