"""``export_hf``: a checkpoint of ours as a directory that ``GPT2LMHeadModel.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load, with our logits and our greedy decoding; pruned weights
exact zeros with their masks beside them; what GPT-2 cannot express refused in one line."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from sparsetrain import checkpoint as ckpt
from sparsetrain.data.tokenizers import ByteTokenizer
from sparsetrain.errors import CheckpointError
from sparsetrain.hf import export as export_module
from sparsetrain.hf import export_hf
from tests.helpers import cli
from tests.hf.helpers import hf_model, our_model

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "dense": dict(sparsity=0.0),
    "gelu_new": dict(),
    "gelu": dict(nonlinearity="gelu"),
    "untied": dict(share_embedding_weights=False, seed=1),
    "no_bias": dict(use_bias=False, seed=2),
    "untied_gelu_no_bias": dict(share_embedding_weights=False, nonlinearity="gelu", use_bias=False, sparsity=0.75),
    "relu_unscaled": dict(nonlinearity="relu", attention_type="dot_product", filter_size=48, dropout_rate=0.1),
    "silu_eps": dict(nonlinearity="silu", layer_norm_epsilon=1e-3, use_projection_bias_in_attention=False,
                     use_ffn_bias=False, attention_dropout_rate=0.2),
}


def same_logits(ours, theirs, idx: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), rtol=1e-5, atol=1e-5)


def greedy(theirs, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Hugging Face greedy decoding of ``n`` tokens, not stopping at end-of-text (ours never does)."""
    return theirs.generate(idx, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(idx))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_greedy_decoding_are_ours(variant, make_checkpoint, tmp_path):
    keys = dict(VARIANTS[variant])
    path = make_checkpoint(**keys)
    summary = export_hf(path, tmp_path / "hf")
    assert summary["global_step"] == 7 and summary["output"] == str(tmp_path / "hf")
    ours, theirs = our_model(path), hf_model(tmp_path / "hf")
    config = theirs.config
    assert config.activation_function == keys.get("nonlinearity", "gelu_new")
    assert config.tie_word_embeddings == keys.get("share_embedding_weights", True)
    assert config.scale_attn_weights  # dot_product: the scale is folded into the queries
    assert (config.n_inner, config.n_positions, config.vocab_size) == (keys.get("filter_size", 128), 64, 256)
    tied = theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    assert tied == config.tie_word_embeddings
    torch.manual_seed(5)
    same_logits(ours, theirs, torch.randint(0, 256, (3, 64)))
    prompt = torch.randint(1, 256, (2, 6))
    n = 64 - prompt.shape[1]  # up to the context: both refuse longer
    expected = ours.generate(prompt, n, temperature=0)
    assert torch.equal(greedy(theirs, prompt, n), expected)
    if keys.get("attention_type") == "dot_product":  # every attention backend: eager as SDPA
        eager = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
        same_logits(ours, eager, torch.randint(0, 256, (2, 64)))


def test_unscaled_attention_has_its_scale_in_the_queries(make_checkpoint, tmp_path):
    path = make_checkpoint(attention_type="dot_product")  # head size 16: queries times 4, exactly
    export_hf(path, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "sparsetrain.json").read_text())["query_scale"] == 4.0
    weights, source = load_file(tmp_path / "hf" / "model.safetensors"), ckpt.load_checkpoint(path)["model"]
    layer = "transformer_decoder.layers.1.self_attn.proj_{}_dense_layer.{}"
    for part in ("weight", "bias"):
        c_attn = weights[f"transformer.h.1.attn.c_attn.{part}"]
        q, k = (source[layer.format(x, part)].nan_to_num(0.0) for x in "qk")
        assert torch.equal(c_attn[..., :32], (4 * q).t() if part == "weight" else 4 * q)
        assert torch.equal(c_attn[..., 32:64], k.t() if part == "weight" else k)


def test_trained_sparse_run(tiny_params, write_params, tmp_path, capsys):
    """A real run: 3 sparse steps through the command line, exported; Hugging Face's greedy text is
    ``sparsetrain generate --temperature 0``'s."""
    run = tmp_path / "run"
    params = tiny_params(sparsity={"sparsity": 0.5}, runconfig={"device": "cpu", "max_steps": 3, "eval_steps": 1})
    assert cli("train", "--params", write_params(params), "--model_dir", run) == 0
    path = ckpt.latest_checkpoint(run)
    summary = export_hf(path, tmp_path / "hf")
    assert summary["sparsified_tensors"] == 8 and summary["sparsity"] == pytest.approx(0.5, abs=0.01)
    ours, theirs = our_model(path), hf_model(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "def main("
    idx = tok(prompt, return_tensors="pt")["input_ids"]
    assert idx[0].tolist() == ByteTokenizer().encode(prompt)
    same_logits(ours, theirs, torch.randint(0, 256, (2, 64)))
    out = greedy(theirs, idx, 24)
    assert torch.equal(out, ours.generate(idx, 24, temperature=0))
    capsys.readouterr()
    assert cli("generate", "--model_dir", run, "--prompt", prompt, "--max_new_tokens", 24, "--temperature", 0) == 0
    assert capsys.readouterr().out == tok.decode(out[0], skip_special_tokens=True) + "\n"
    info = json.loads((tmp_path / "hf" / "sparsetrain.json").read_text())
    assert info["global_step"] == 3 and info["source_checkpoint"] == str(path.resolve())
    assert info["sparsity_config"] == {"sparsity": 0.5} and info["tokenizer"] == "byte"


def test_pruned_weights_are_exact_zeros_and_the_masks_travel(make_checkpoint, tmp_path):
    path = make_checkpoint(sparsity=0.6, share_embedding_weights=False)
    export_hf(path, tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    masks = load_file(tmp_path / "hf" / "sparsity_masks.safetensors")
    source = ckpt.load_checkpoint(path)["model"]
    assert not any(torch.isnan(t).any() for t in weights.values())
    layers = [f"transformer.h.{i}.{n}.weight" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sorted(masks) == sorted(layers)
    for name, mask in masks.items():
        w = weights[name]
        assert mask.dtype == torch.bool and mask.shape == w.shape
        pruned = w[~mask]
        assert pruned.numel() > 0 and bool((pruned == 0).all()) and not bool(pruned.signbit().any())  # +0.0
    for i in range(2):
        ours = f"transformer_decoder.layers.{i}.self_attn.proj_{{}}_dense_layer.weight"
        qkv = torch.cat([source[ours.format(x)] for x in "qkv"]).t()
        c_attn = f"transformer.h.{i}.attn.c_attn.weight"
        assert torch.equal(masks[c_attn], ~torch.isnan(qkv))  # the checkpoint's NaNs, in HF's layout
        assert torch.equal(weights[c_attn], qkv.nan_to_num(0.0))
    info = json.loads((tmp_path / "hf" / "sparsetrain.json").read_text())
    assert info["global_step"] == 7 and info["masks_file"] == "sparsity_masks.safetensors"
    assert info["sparsity"] == {k: pytest.approx(1 - m.float().mean().item(), abs=1e-6) for k, m in masks.items()}
    assert all(0.5 < s < 0.7 for s in info["sparsity"].values())


def test_a_dense_export_has_an_empty_masks_file(make_checkpoint, tmp_path):
    export_hf(make_checkpoint(sparsity=0.0), tmp_path / "hf")
    assert load_file(tmp_path / "hf" / "sparsity_masks.safetensors") == {}
    assert json.loads((tmp_path / "hf" / "sparsetrain.json").read_text())["sparsity"] == {}


def test_an_lm_head_bias_is_refused_in_one_line(make_checkpoint, tmp_path):
    path = make_checkpoint(use_bias_in_output=True)
    with pytest.raises(CheckpointError) as e:
        export_hf(path, tmp_path / "hf")
    assert "model.use_bias_in_output: true" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nan_outside_the_sparsified_weights_is_refused(make_checkpoint, tmp_path):
    path = make_checkpoint()
    state = ckpt.load_checkpoint(path)
    state["model"]["transformer_decoder.layers.0.norm1.weight"][3] = float("nan")
    ckpt.save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match="norm1.weight holds NaN, and it is no sparsified weight"):
        export_hf(path, tmp_path / "hf")


def test_the_output_directory_rules(make_checkpoint, tmp_path):
    path = make_checkpoint()
    out = tmp_path / "hf"
    out.mkdir()
    export_hf(path, out)  # an empty directory is taken
    (out / "extra.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not empty; choose another directory or pass --overwrite"):
        export_hf(path, out)
    assert (out / "extra.txt").read_text() == "mine"
    export_hf(path, out, overwrite=True)
    assert not (out / "extra.txt").exists() and (out / "model.safetensors").is_file()
    for run_dir in (path.parent, tmp_path):  # the run's own model_dir, or a directory above it
        with pytest.raises(CheckpointError, match="holds a run's checkpoints or params; the export never replaces it"):
            export_hf(path, run_dir, overwrite=True)
    assert path.is_file()
    with pytest.raises(CheckpointError, match="is a file"):
        export_hf(path, path, overwrite=True)
    with pytest.raises(CheckpointError, match="does not exist; create it first"):
        export_hf(path, tmp_path / "missing" / "hf")


def test_a_failed_export_leaves_nothing_behind(make_checkpoint, tmp_path, monkeypatch):
    path = make_checkpoint()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("before")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "write_tokenizer", full_disk)
    with pytest.raises(CheckpointError, match="cannot write .*nothing was written"):
        export_hf(path, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden temporary directory


def test_a_checkpoint_without_params_is_refused(make_checkpoint, tmp_path):
    path = make_checkpoint()
    state = ckpt.load_checkpoint(path)
    del state["params"]
    ckpt.save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match="holds no params.model"):
        export_hf(path, Path(tmp_path / "hf"))


def test_the_export_command(make_checkpoint, tmp_path, capsys):
    from tests.e2e.helpers import error_line

    path = make_checkpoint(sparsity=0.5)
    out = tmp_path / "hf"
    assert cli("export", "--format", "hf", "-i", path, "-o", out) == 0
    assert f"wrote Hugging Face GPT-2 directory {out} (step 7" in capsys.readouterr().out
    model, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    capsys.readouterr()  # transformers' loading progress
    assert cli("export", "-i", path, "-o", out) == 2  # not over an export without --overwrite
    assert "--overwrite" in error_line(capsys, only=True)
    assert cli("export", "-i", path, "-o", out, "--overwrite") == 0
