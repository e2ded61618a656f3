"""``model.init_from: hf:DIR`` (and ``--checkpoint_path DIR``): a run starting from a Hugging Face
GPT-2 directory on disk -- dense continued pre-training, sparse training from dense weights (topk
masks from them), SPDF dense fine-tuning of an exported sparse model -- and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from sparsetrain import checkpoint as ckpt
from sparsetrain.config import load_params, params_from_dict
from sparsetrain.errors import ConfigError
from sparsetrain.hf import export_hf, read_hf_dir
from sparsetrain.hf.tokenizer import BYTE_EOS, TokenizerSource, write_tokenizer
from sparsetrain.model import GPT
from sparsetrain.sparsity.masks import topk_mask
from sparsetrain.sparsity.nan_format import decode_state_dict
from tests.helpers import BLOCK_MATRICES, cli, records

pytestmark = pytest.mark.usefixtures("one_thread")

HF = dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=None, activation_function="gelu_new")


def save_gpt2(directory: Path, tokenizer: bool = True, seed: int = 0, **config) -> transformers.GPT2LMHeadModel:
    """A tiny random GPT2LMHeadModel saved as from_pretrained reads it (with our byte tokenizer's
    tokenizer.json, whose 256 ids fit its vocabulary)."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**HF, **config})).eval()
    model.save_pretrained(directory)
    if tokenizer:  # as an export writes it: its end-of-text (NUL) named in special_tokens_map.json
        write_tokenizer(TokenizerSource("byte", None, BYTE_EOS, 0, 256), directory, 64)
    return model


def params_for(tiny_params, directory: Path, **sections):
    model = {"init_from": f"hf:{directory}", **sections.pop("model", {})}
    raw = tiny_params(model=None, **sections)
    raw["model"] = model
    return raw


def our_logits(params, state: dict) -> tuple[GPT, dict]:
    model = GPT(params.model)
    clean, masks = decode_state_dict(state["model"])
    model.load_state_dict(clean)
    return model.eval(), masks


def test_a_plain_gpt2_gives_its_shape_tokenizer_and_logits(tiny_params, tmp_path):
    theirs = save_gpt2(tmp_path / "gpt2", activation_function="gelu", layer_norm_epsilon=1e-3, n_inner=48)
    params = params_from_dict(params_for(tiny_params, tmp_path / "gpt2"))
    m = params.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_heads, m.filter_size, m.vocab_size) == (32, 2, 2, 48, 256)
    assert (m.nonlinearity, m.layer_norm_epsilon, m.max_position_embeddings) == ("gelu", 1e-3, 64)
    assert params.train_input.tokenizer == str(tmp_path / "gpt2" / "tokenizer.json")
    assert params.eval_input.tokenizer == params.train_input.tokenizer
    ours, masks = our_logits(params, read_hf_dir(tmp_path / "gpt2", GPT(params.model).state_dict()))
    assert masks == {}
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, rtol=1e-5, atol=1e-5)


def test_unscaled_attention_and_untied_head(tiny_params, tmp_path):
    theirs = save_gpt2(tmp_path / "gpt2", scale_attn_weights=False, tie_word_embeddings=False)
    params = params_from_dict(params_for(tiny_params, tmp_path / "gpt2"))
    assert params.model.attention_type == "dot_product" and not params.model.share_embedding_weights
    ours, _ = our_logits(params, read_hf_dir(tmp_path / "gpt2", GPT(params.model).state_dict()))
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, rtol=1e-5, atol=1e-5)


def test_continued_pretraining_starts_from_the_weights_and_resumes_its_own_checkpoints(tiny_params, write_params, tmp_path):
    save_gpt2(tmp_path / "gpt2")
    path = write_params(params_for(tiny_params, tmp_path / "gpt2", runconfig={"max_steps": 2}))
    run = tmp_path / "run"
    assert cli("train", "--params", path, "--model_dir", run) == 0
    state = ckpt.load_checkpoint(run / "checkpoint_2.mdl")
    assert state["warm_start_from"] == {"path": str((tmp_path / "gpt2").resolve()), "step": 0}
    assert cli("train", "--params", path, "--model_dir", run, "--set", "runconfig.max_steps=3") == 0
    assert [r["step"] for r in records(run)] == [1, 2, 3]  # resumed at 2, not a second warm start
    assert ckpt.load_checkpoint(run / "checkpoint_3.mdl")["run_id"] == state["run_id"]


def test_step_zero_checkpoint_holds_the_imported_weights(tiny_params, write_params, tmp_path):
    theirs = save_gpt2(tmp_path / "gpt2")
    raw = params_for(tiny_params, tmp_path / "gpt2", runconfig={"max_steps": 0, "save_initial_checkpoint": True})
    assert cli("train", "--params", write_params(raw), "--model_dir", tmp_path / "run") == 0
    params = load_params(tmp_path / "params.yaml")
    ours, _ = our_logits(params, ckpt.load_checkpoint(tmp_path / "run" / "checkpoint_0.mdl"))
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, rtol=1e-5, atol=1e-5)


def test_checkpoint_path_naming_a_directory_is_init_from(tiny_params, write_params, tmp_path):
    save_gpt2(tmp_path / "gpt2")
    raw = tiny_params(model=None, runconfig={"max_steps": 1})
    assert cli("train", "--params", write_params(raw), "--model_dir", tmp_path / "run",
               "--checkpoint_path", tmp_path / "gpt2") == 0
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint_1.mdl")
    assert state["params"]["model"]["init_from"] == f"hf:{tmp_path / 'gpt2'}"
    assert state["warm_start_from"]["path"] == str((tmp_path / "gpt2").resolve())


def test_sparse_training_from_dense_weights_takes_topk_masks(tiny_params, write_params, tmp_path):
    theirs = save_gpt2(tmp_path / "gpt2")
    raw = params_for(tiny_params, tmp_path / "gpt2", runconfig={"max_steps": 0, "save_initial_checkpoint": True},
                     sparsity={"sparsity": 0.5})
    assert cli("train", "--params", write_params(raw), "--model_dir", tmp_path / "run") == 0
    _, masks = decode_state_dict(ckpt.load_checkpoint(tmp_path / "run" / "checkpoint_0.mdl")["model"])
    assert set(masks) == set(BLOCK_MATRICES)
    fc = theirs.state_dict()["transformer.h.1.mlp.c_fc.weight"].t()
    expected = topk_mask(fc, 0.5)
    assert torch.equal(masks["transformer_decoder.layers.1.ffn.ffn.0.linear_layer.weight"], expected)
    assert int(expected.sum()) == fc.numel() // 2


@pytest.mark.parametrize("keys", [dict(), dict(attention_type="dot_product", use_bias=False, nonlinearity="relu")])
def test_export_then_import_gives_back_the_weights_and_masks(keys, make_checkpoint, tiny_params, tmp_path):
    source = make_checkpoint(sparsity=0.5, **keys)
    export_hf(source, tmp_path / "hf")
    info = json.loads((tmp_path / "hf" / "sparsetrain.json").read_text())
    assert info["model"]["hidden_size"] == 32
    raw = tiny_params(model=None, sparsity={"sparsity": 0.5})
    raw["model"] = {"init_from": f"hf:{tmp_path / 'hf'}"}
    params = params_from_dict(raw)
    for key, value in keys.items():
        assert getattr(params.model, key) == value
    assert params.train_input.tokenizer == "byte"
    state = read_hf_dir(tmp_path / "hf", GPT(params.model).state_dict())
    assert state["global_step"] == 7
    original = ckpt.load_checkpoint(source)["model"]
    assert set(state["model"]) == set(original)
    for name, tensor in original.items():
        torch.testing.assert_close(state["model"][name], tensor, equal_nan=True, rtol=1e-6, atol=1e-6)
        assert torch.equal(state["model"][name].isnan(), tensor.isnan()), name


def sparse_run_export(tiny_params, write_params, tmp_path) -> Path:
    """A real 50% sparse run of one step (masks of exact counts), exported."""
    raw = tiny_params(runconfig={"max_steps": 1}, sparsity={"sparsity": 0.5}, model={"vocab_size": 256})
    assert cli("train", "--params", write_params(raw, "sparse.yaml"), "--model_dir", tmp_path / "sparse") == 0
    export_hf(tmp_path / "sparse" / "checkpoint_1.mdl", tmp_path / "hf")
    return tmp_path / "sparse" / "checkpoint_1.mdl"


def test_spdf_fine_tuning_of_an_exported_sparse_model_is_dense(tiny_params, write_params, tmp_path, capsys):
    sparse_run_export(tiny_params, write_params, tmp_path)
    capsys.readouterr()
    raw = params_for(tiny_params, tmp_path / "hf", runconfig={"max_steps": 1})
    assert cli("train", "--params", write_params(raw), "--model_dir", tmp_path / "ft") == 0
    assert f"{tmp_path / 'hf'} is sparse (12288 pruned weights in 12 tensors) and the params have no sparsity block: dense fine-tuning" in capsys.readouterr().err
    model = ckpt.load_checkpoint(tmp_path / "ft" / "checkpoint_1.mdl")["model"]
    assert not any(t.isnan().any() for t in model.values() if t.is_floating_point())


def test_sparse_continuation_of_an_export_keeps_its_masks(tiny_params, write_params, tmp_path, capsys):
    source = sparse_run_export(tiny_params, write_params, tmp_path)
    raw = params_for(tiny_params, tmp_path / "hf", runconfig={"max_steps": 1}, sparsity={"sparsity": 0.5})
    assert cli("train", "--params", write_params(raw), "--model_dir", tmp_path / "run") == 0
    _, before = decode_state_dict(ckpt.load_checkpoint(source)["model"])
    _, after = decode_state_dict(ckpt.load_checkpoint(tmp_path / "run" / "checkpoint_1.mdl")["model"])
    assert len(before) == 12 and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "drawing a new" not in capsys.readouterr().err


def test_eval_evaluates_the_imported_model_without_a_checkpoint(tiny_params, write_params, tmp_path, capsys):
    save_gpt2(tmp_path / "gpt2")
    path = write_params(params_for(tiny_params, tmp_path / "gpt2"))
    assert cli("eval", "--params", path, "--model_dir", tmp_path / "run") == 0
    assert records(tmp_path / "run", "eval")[0]["step"] == 0
    assert not ckpt.list_checkpoints(tmp_path / "run")


@pytest.mark.parametrize("spec, message", [
    ("gpt2", "model.init_from: 'gpt2' is not valid; give hf:DIR"),
    ("hf:{tmp}/missing", "model.init_from: {tmp}/missing does not exist"),
    ("hf:{tmp}", "model.init_from: {tmp} holds no config.json"),
])
def test_bad_init_from_is_one_line(spec, message, tiny_params, write_params, tmp_path, capsys):
    raw = tiny_params(model={"init_from": spec.format(tmp=tmp_path)})
    path = write_params(raw)
    assert cli("train", "--params", path, "--model_dir", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: {message.format(tmp=tmp_path)}" or err.startswith(f"error: {path}: {message.format(tmp=tmp_path)}")
    assert not (tmp_path / "run").exists()


def test_conflicting_shape_key_names_both_values(tiny_params, tmp_path):
    save_gpt2(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"model\.hidden_size: 64, but .*gpt2 has 32; drop the key"):
        params_from_dict(params_for(tiny_params, tmp_path / "gpt2", model={"hidden_size": 64}))
    params_from_dict(params_for(tiny_params, tmp_path / "gpt2", model={"hidden_size": 32, "dropout_rate": 0.1}))


def test_other_architectures_and_missing_tokenizer_are_refused(tiny_params, tmp_path):
    save_gpt2(tmp_path / "gpt2", tokenizer=False)
    with pytest.raises(ConfigError, match=r"holds no tokenizer\.json; name the model's tokenizer in train_input\.tokenizer"):
        params_from_dict(params_for(tiny_params, tmp_path / "gpt2"))
    raw = params_for(tiny_params, tmp_path / "gpt2")
    raw["train_input"]["tokenizer"] = "byte"
    assert params_from_dict(raw).train_input.tokenizer == "byte"
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"model_type 'llama'; only GPT-2 \('gpt2'\) models are read"):
        params_from_dict(raw)


def test_a_model_dir_of_another_run_and_two_starting_points_are_refused(tiny_params, write_params, tmp_path, capsys):
    save_gpt2(tmp_path / "gpt2")
    other = write_params(tiny_params(runconfig={"max_steps": 1}), "other.yaml")
    assert cli("train", "--params", other, "--model_dir", tmp_path / "run") == 0
    capsys.readouterr()
    path = write_params(params_for(tiny_params, tmp_path / "gpt2"))
    assert cli("train", "--params", path, "--model_dir", tmp_path / "run") == 2
    assert "holds checkpoints of a run that did not start from it (checkpoint_1.mdl); give a new --model_dir" in capsys.readouterr().err
    assert cli("train", "--params", path, "--model_dir", tmp_path / "new",
               "--checkpoint_path", tmp_path / "run" / "checkpoint_1.mdl") == 2
    assert "two starting points; give one" in capsys.readouterr().err
    assert ckpt.list_checkpoints(tmp_path / "run")[-1][0] == 1


def test_truncated_weights_are_one_line(tiny_params, write_params, tmp_path, capsys):
    save_gpt2(tmp_path / "gpt2")
    weights = tmp_path / "gpt2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    path = write_params(params_for(tiny_params, tmp_path / "gpt2"))
    assert cli("train", "--params", path, "--model_dir", tmp_path / "run") == 2
    assert f"{weights}: cannot read it" in capsys.readouterr().err


def test_checkpoint_path_directories_are_named_as_the_flag(tiny_params, write_params, tmp_path, capsys):
    """A directory given as --checkpoint_path: without a config.json it is neither form it may be;
    with one, the import's errors name --checkpoint_path, the flag the user typed."""
    path = write_params(tiny_params(model=None))
    (tmp_path / "empty").mkdir()
    assert cli("train", "--params", path, "--model_dir", tmp_path / "run", "--checkpoint_path", tmp_path / "empty") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --checkpoint_path {tmp_path / 'empty'}: is a directory without a config.json; give a checkpoint file "
        "(checkpoint_<step>.mdl) or a Hugging Face GPT-2 directory (save_pretrained, sparsetrain export)")
    save_gpt2(tmp_path / "gpt2")
    capsys.readouterr()  # transformers' own progress output
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert cli("train", "--params", path, "--model_dir", tmp_path / "run", "--checkpoint_path", tmp_path / "gpt2") == 2
    assert capsys.readouterr().err.strip() == (f"error: --checkpoint_path: {tmp_path / 'gpt2' / 'config.json'}: "
                                               "model_type 'llama'; only GPT-2 ('gpt2') models are read")
    assert not (tmp_path / "run").exists()
