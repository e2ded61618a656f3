"""Checkpoints of before the zoo's names (fused qkv, ``embed_tokens``, ...) still load."""

from __future__ import annotations

import re

import torch

from sparsetrain.sparsity.legacy_names import from_legacy, is_legacy
from tests.helpers import tiny_gpt

BACK = [  # today's name -> the name of before
    (r"^embedding_layer\.word_embeddings\.", "embed_tokens."),
    (r"^embedding_layer\.position_embeddings\.", "embed_positions."),
    (r"^transformer_decoder\.norm\.", "norm_f."),
    (r"^transformer_decoder\.layers\.(\d+)\.norm1\.", r"layers.\1.norm_1."),
    (r"^transformer_decoder\.layers\.(\d+)\.norm3\.", r"layers.\1.norm_2."),
    (r"^transformer_decoder\.layers\.(\d+)\.self_attn\.proj_output_dense_layer\.", r"layers.\1.attn.proj."),
    (r"^transformer_decoder\.layers\.(\d+)\.ffn\.ffn\.0\.linear_layer\.", r"layers.\1.mlp.fc."),
    (r"^transformer_decoder\.layers\.(\d+)\.ffn\.ffn\.1\.linear_layer\.", r"layers.\1.mlp.proj."),
]


def legacy_state(sd: dict) -> dict:
    """A state dict as the model of before wrote it (built from today's, with NaN-pruned q)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("ln_f."):
            continue
        m = re.match(r"^transformer_decoder\.layers\.(\d+)\.self_attn\.proj_([qkv])_dense_layer\.(weight|bias)$", key)
        if m:
            if m.group(2) == "q":
                parts = [sd[key.replace("proj_q_", f"proj_{x}_")] for x in "qkv"]
                out[f"layers.{m.group(1)}.attn.qkv.{m.group(3)}"] = torch.cat(parts)
            continue
        for pattern, replacement in BACK:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    return out


def test_legacy_names_round_trip_with_nans():
    sd = {k: v.clone() for k, v in tiny_gpt().state_dict().items()}
    q = "transformer_decoder.layers.1.self_attn.proj_q_dense_layer.weight"
    sd[q][0, :5] = float("nan")  # a pruned position survives the split
    old = legacy_state(sd)
    assert is_legacy(old) and not is_legacy(sd)
    assert "layers.0.attn.qkv.weight" in old
    new = from_legacy(old)
    assert list(sorted(new)) == sorted(sd)
    for key in sd:
        torch.testing.assert_close(new[key], sd[key], equal_nan=True, rtol=0, atol=0)
