"""Our state dict <-> GPT2LMHeadModel's: names, layouts, and the exact round trip."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparsetrain.hf import hf_config
from sparsetrain.hf.names import entries, from_hf, hf_name, layer_count, masks_to_hf, scale_queries, to_hf
from tests.helpers import BLOCK_MATRICES, tiny_config, tiny_gpt

D = 64  # tiny_gpt's width
VARIANTS = {
    "default": {},
    "untied": {"share_embedding_weights": False},
    "no_bias": {"use_bias": False},
    "no_qkv_bias": {"use_projection_bias_in_attention": False, "filter_size": 96},
}


def hf_gpt2(**overrides) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(tiny_config(**overrides), eos_id=0)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_names_and_shapes_are_gpt2s(variant):
    sd = tiny_gpt(**VARIANTS[variant]).state_dict()
    hf = to_hf(sd)
    expected = hf_gpt2(**VARIANTS[variant]).state_dict()
    assert list(hf) == list(expected)
    assert {k: tuple(v.shape) for k, v in hf.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_layouts():
    sd = tiny_gpt().state_dict()
    hf = to_hf(sd)
    ours = "transformer_decoder.layers.1."
    q, k, v = (sd[f"{ours}self_attn.proj_{x}_dense_layer.weight"] for x in "qkv")
    c_attn = hf["transformer.h.1.attn.c_attn.weight"]
    assert c_attn.shape == (D, 3 * D)  # Conv1D: (in, out), q | k | v along the output
    assert torch.equal(c_attn, torch.cat([q, k, v]).t())
    assert torch.equal(hf["transformer.h.1.attn.c_attn.bias"],
                       torch.cat([sd[f"{ours}self_attn.proj_{x}_dense_layer.bias"] for x in "qkv"]))
    assert torch.equal(hf["transformer.h.1.mlp.c_fc.weight"], sd[f"{ours}ffn.ffn.0.linear_layer.weight"].t())
    assert torch.equal(hf["transformer.h.1.ln_2.weight"], sd[f"{ours}norm3.weight"])
    assert torch.equal(hf["transformer.ln_f.bias"], sd["ln_f.bias"])
    assert all(t.is_contiguous() for t in hf.values())
    x = torch.randn(3, D)  # the same function: Conv1D's x @ W + b is nn.Linear's x @ W.T + b
    layer = transformers.pytorch_utils.Conv1D(3 * D, D)
    layer.load_state_dict({"weight": c_attn, "bias": hf["transformer.h.1.attn.c_attn.bias"]})
    ref = torch.cat([x @ w.t() for w in (q, k, v)], dim=-1) + hf["transformer.h.1.attn.c_attn.bias"]
    torch.testing.assert_close(layer(x), ref)


def test_missing_biases_are_zeros():
    hf = to_hf(tiny_gpt(use_bias=False).state_dict())
    biases = [k for k in hf if k.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1  # per layer: ln_1, c_attn, c_proj, ln_2, c_fc, c_proj; ln_f
    assert all(hf[k].count_nonzero() == 0 for k in biases)
    assert hf["transformer.h.0.attn.c_attn.bias"].shape == (3 * D,)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_exact(variant):
    sd = tiny_gpt(seed=1, **VARIANTS[variant]).state_dict()
    back = from_hf(to_hf(sd), sd.keys())
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    hf = to_hf(sd)
    assert all(torch.equal(a, b) for a, b in zip(to_hf(back).values(), hf.values(), strict=True))
    # A GPT2LMHeadModel's own state dict, loaded into ours, is the same function.
    theirs = hf_gpt2(**VARIANTS[variant]).eval()
    theirs.load_state_dict(hf)
    ours = tiny_gpt(seed=2, **VARIANTS[variant]).eval()
    ours.load_state_dict(from_hf(theirs.state_dict(), ours.state_dict().keys()))
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), rtol=1e-5, atol=1e-6)


def test_from_hf_without_keys_gives_the_alias_and_the_tied_head():
    hf = to_hf(tiny_gpt().state_dict())
    hf.pop("lm_head.weight")  # as save_pretrained writes a tied model
    hf["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # an older version's causal-mask buffer
    back = from_hf(hf)
    assert torch.equal(back["ln_f.weight"], back["transformer_decoder.norm.weight"])
    assert torch.equal(back["lm_head.weight"], back["embedding_layer.word_embeddings.weight"])


def test_from_hf_refuses_what_our_model_cannot_hold():
    keys = tiny_gpt(use_bias=False).state_dict().keys()
    hf = to_hf(tiny_gpt().state_dict())
    hf["transformer.h.0.ln_1.bias"] = torch.full((D,), 0.5)
    with pytest.raises(ValueError, match=r"transformer_decoder\.layers\.0\.norm1\.bias.*nonzero"):
        from_hf(hf, keys)
    with pytest.raises(ValueError, match="lm_head.bias"):
        from_hf(to_hf(tiny_gpt().state_dict()), [*keys, "lm_head.bias"])
    with pytest.raises(ValueError, match="transformer.h.0.attn.q_attn.weight"):
        from_hf({**hf, "transformer.h.0.attn.q_attn.weight": torch.zeros(D, D)})


def test_to_hf_refuses_an_lm_head_bias_and_foreign_names():
    sd = tiny_gpt(use_bias_in_output=True).state_dict()
    with pytest.raises(ValueError, match="'lm_head.bias' has no place"):
        to_hf(sd)
    sd = tiny_gpt().state_dict()
    with pytest.raises(ValueError, match="differs from 'transformer_decoder.norm.weight'"):
        to_hf({**sd, "ln_f.weight": sd["ln_f.weight"] + 1})
    sd.pop("transformer_decoder.layers.1.norm3.weight")
    with pytest.raises(ValueError, match="norm3.weight' is missing"):
        to_hf(sd)


def test_masks_in_hf_layout():
    sd = tiny_gpt().state_dict()
    q, v, fc = (f"transformer_decoder.layers.0.{n}" for n in (
        "self_attn.proj_q_dense_layer.weight", "self_attn.proj_v_dense_layer.weight", "ffn.ffn.0.linear_layer.weight"))
    masks = {n: torch.rand(sd[n].shape) > 0.5 for n in (q, v, fc)}
    hf = masks_to_hf(masks, sd)
    assert set(hf) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"}
    c_attn = hf["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.dtype == torch.bool and c_attn.shape == (D, 3 * D)
    assert torch.equal(c_attn[:, :D], masks[q].t()) and torch.equal(c_attn[:, 2 * D:], masks[v].t())
    assert bool(c_attn[:, D : 2 * D].all())  # k has no mask: all kept
    assert torch.equal(hf["transformer.h.0.mlp.c_fc.weight"], masks[fc].t())
    assert masks_to_hf({}, sd) == {}


def test_every_block_matrix_has_a_place():
    assert layer_count(BLOCK_MATRICES) == 2 == layer_count(to_hf(tiny_gpt().state_dict()))
    assert hf_name(BLOCK_MATRICES[1]) == "transformer.h.0.attn.c_attn.weight"
    assert hf_name("ln_f.bias") == "transformer.ln_f.bias"
    assert hf_name("transformer_decoder.layers.1.ffn.ffn.1.linear_layer.weight") == "transformer.h.1.mlp.c_proj.weight"
    with pytest.raises(KeyError, match="lm_head.bias"):
        hf_name("lm_head.bias")
    assert sum(len(e.ours) for e in entries(2)) == len(tiny_gpt().state_dict()) - 2  # each once; not the ln_f alias


def test_scale_queries_scales_the_query_part_only():
    hf = to_hf(tiny_gpt().state_dict())
    scaled = scale_queries(hf, 8.0)
    for part in ("weight", "bias"):
        name = f"transformer.h.0.attn.c_attn.{part}"
        assert torch.equal(scaled[name][..., :D], 8 * hf[name][..., :D])
        assert torch.equal(scaled[name][..., D:], hf[name][..., D:])
    assert torch.equal(scale_queries(scaled, 1 / 8)["transformer.h.1.attn.c_attn.weight"], hf["transformer.h.1.attn.c_attn.weight"])
    assert all(scaled[k] is hf[k] for k in hf if "c_attn" not in k)
