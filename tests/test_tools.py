"""``tools.py``: ``plan`` (its JSON and text, structured groups, the GPU-kernel marks, errors in one
line), ``inspect`` (NaN at pruned positions told apart from poison) and ``finalize``, on tiny runs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sparsetrain import checkpoint as ckpt
from sparsetrain import training as tr
from sparsetrain.config import load_params
from sparsetrain.sparsity.masks import block_random_mask, num_pruned
from tests.helpers import BLOCK_KINDS, QKV_KINDS, block_kernel_run, cli, layer_names

SPARSE = {"sparsity": 0.75, "init_method": "topk"}


# -- plan ----------------------------------------------------------------------------------------


def test_plan_json_shape_and_counts(tiny_params, write_params, capsys):
    patterns = {"ffn.*linear_layer.weight": {"sparsity": 0.75}, "proj_[qkv]_dense_layer": {}}
    path = write_params(tiny_params(sparsity={"sparsity": 0.5, "param_name_patterns": patterns}))
    assert cli("plan", "--params", path, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"parameters", "dense", "flops_per_token", "training_state_bytes", "sequence_length", "schedules"}
    assert report["schedules"] == []
    assert report["sequence_length"] == {"value": 32, "from": "train_input.max_sequence_length"}
    assert set(report["training_state_bytes"]) == {"dense", "masked_dense", "block_kernels"}
    names = [r["name"] for r in report["parameters"]]
    assert names == layer_names(*QKV_KINDS, *BLOCK_KINDS[4:])
    for r in report["parameters"]:
        assert set(r) >= {"name", "shape", "numel", "group", "sparsity", "init_method", "pruned"}
        assert r["pruned"] == num_pruned(r["numel"], r["sparsity"])
        assert r["sparsity"] == (0.75 if "ffn" in r["name"] else 0.5)
    assert "transformer_decoder.layers.0.self_attn.proj_output_dense_layer.weight" in report["dense"]
    assert "embedding_layer.word_embeddings.weight" in report["dense"]
    f = report["flops_per_token"]
    assert f["ratio"] == pytest.approx(f["dense"] / f["sparse"]) and f["ratio"] > 1


def test_plan_text_needs_no_data_or_memory(tmp_path, capsys):
    # gpt3-xl shapes on the meta device; the data path is never read by a dry run.
    assert cli("plan", "--params", "configs/gpt3_xl.yaml", "--set", "sparsity.sparsity=0.75",
               "--set", "model.vocab_size=50257") == 0
    out = capsys.readouterr().out
    assert "144 sparsified tensors" in out and "ratio 2.49x" in out  # 24 layers x (q, k, v, output, 2 ffn)


def test_plan_of_every_sparse_config():
    from sparsetrain.tools import plan

    for name in ("default", "regex", "list", "groups"):
        report = plan(load_params(f"configs/gpt2_small_sparse_{name}.yaml"))
        assert report["parameters"], name


def test_plan_json_and_text_show_structure(tiny_params, write_params, capsys):
    block = {"sparsity": 0.75, "structure": "block", "block_size": [16, 24], "param_name_patterns": {
        "ffn.ffn.0": {"init_method": "random"}, "ffn.ffn.1": {}, "proj_[qkv]_dense_layer": {"structure": "2:4"},
        "proj_output_dense_layer": {"structure": "unstructured"}}}
    path = write_params(tiny_params(sparsity=block))
    assert cli("plan", "--params", path, "--json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["parameters"]}
    for r in rows.values():  # the existing contract holds for every row
        assert set(r) >= {"name", "shape", "numel", "group", "sparsity", "init_method", "pruned", "kept", "structure"}
        assert r["pruned"] + r["kept"] == r["numel"]
    fc = rows["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"]  # 128 x 32 in 16x24 blocks: 8 x 2, the second column partial
    assert (fc["structure"], fc["block_size"], fc["blocks"], fc["pruned_blocks"]) == ("block", [16, 24], 16, 12)
    expected = block_random_mask("transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight", (128, 32), 0.75, 0, (16, 24))
    assert fc["pruned"] == int((~expected).sum()) and fc["pruned_exact"] is True
    proj = rows["transformer_decoder.layers.0.ffn.ffn.1.linear_layer.weight"]  # 32 x 128: 2 x 6 blocks, topk, partial -> estimate
    assert (proj["blocks"], proj["pruned_blocks"], proj["pruned_exact"]) == (12, 9, False)
    assert proj["pruned"] == 2 * 16 * 8 + 7 * 16 * 24  # the two 16x8 edge blocks go first
    for kind in QKV_KINDS:  # 32 x 32 each
        qkv = rows[f"transformer_decoder.layers.1.{kind}"]
        assert (qkv["structure"], qkv["sparsity"], qkv["pruned"]) == ("2:4", 0.5, 32 * 32 // 2) and "block_size" not in qkv
    assert rows["transformer_decoder.layers.0.self_attn.proj_output_dense_layer.weight"]["structure"] == "unstructured"
    assert cli("plan", "--params", path) == 0
    out = capsys.readouterr().out
    assert "structure" in out and "block 16x24" in out and "2:4" in out and "unstructured" in out
    assert "~" in out  # the estimated count is marked


def test_plan_marks_weights_on_the_gpu_kernels(tiny_params, write_params, capsys):
    block = {"sparsity": 0.5, "structure": "block", "block_size": 16, "param_name_patterns": {
        "ffn.ffn.0": {}, "ffn.ffn.1": {"block_size": 24}, "proj_[qkv]_dense_layer": {"block_size": [16, 32]}}}
    path = write_params(tiny_params(sparsity=block))  # width 32: ffn 0 128x32, ffn 1 32x128, q, k, v 32x32
    assert cli("plan", "--params", path, "--json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["parameters"]}
    assert rows["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"]["gpu_kernels"] is True
    assert rows["transformer_decoder.layers.0.ffn.ffn.1.linear_layer.weight"]["gpu_kernels"] is False  # 24: no power of two
    for kind in QKV_KINDS:
        assert rows[f"transformer_decoder.layers.0.{kind}"]["gpu_kernels"] is True  # rectangular 16x32 fits 32x32
    assert cli("plan", "--params", path) == 0
    out = capsys.readouterr().out
    assert "block 16x16*" in out and "block 24x24 " in out and "runs on the block-sparse GPU kernels" in out
    assert "train masked dense (no speedup)" in out


# -- plan: errors in one line ---------------------------------------------------------------------


def test_plan_bad_pattern_lists_names(tiny_params, write_params, capsys):
    path = write_params(tiny_params(sparsity={"sparsity": 0.5, "param_name_patterns": "fc_layers.*weight"}))
    assert cli("plan", "--params", path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fc_layers.*weight" in err
    assert "self_attn.proj_q_dense_layer.weight" in err and "linear_layer.weight" in err


def test_plan_rejects_nm_on_indivisible_shape(tiny_params, write_params, capsys):
    path = write_params(tiny_params(sparsity={"structure": "3:64", "param_name_patterns": "ffn.ffn.0"}))
    assert cli("plan", "--params", path) == 2
    err = capsys.readouterr().err
    assert "transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight" in err and "(128, 32)" in err and "not a multiple of 64" in err


def _plan_rc(tmp_path, doc, capsys) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert cli("plan", "--params", path) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_plan_pattern_with_a_line_break_is_one_line(tmp_path, capsys):
    # config.py: group_where() writes a dict-form pattern raw into the message
    doc = {"model": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2},
           "sparsity": {"sparsity": 0.5, "param_name_patterns": {"mlp\nweight": {}}}}
    _plan_rc(tmp_path, doc, capsys)


def test_plan_shards_without_data_path_is_one_line(tmp_path, capsys):
    # tools.py: _vocab_size() calls Path(None) before data.check_input() has said what is missing
    err = _plan_rc(tmp_path, {"train_input": {"source": "shards"}}, capsys)
    assert "train_input.data_path" in err


# -- inspect and finalize --------------------------------------------------------------------------


@pytest.fixture
def sparse_run(tmp_path, tiny_params, write_params):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params(sparsity=SPARSE)), "--model_dir", d) == 0
    return d / "checkpoint_4.mdl"


def test_inspect_counts_nan(sparse_run, capsys):
    capsys.readouterr()
    assert cli("inspect", sparse_run, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["global_step"] == 4
    by_name = {t["name"]: t for t in report["tensors"]}
    for kind in QKV_KINDS:
        qkv = by_name[f"transformer_decoder.layers.0.{kind}"]
        assert qkv["nan"] == num_pruned(32 * 32, 0.75) and qkv["sparsity"] == pytest.approx(qkv["nan"] / qkv["numel"])
    assert by_name["embedding_layer.word_embeddings.weight"]["nan"] == 0
    assert "lm_head.weight" not in by_name  # tied to the word embeddings: listed once
    assert report["total"]["nan"] == sum(t["nan"] for t in report["tensors"])
    assert cli("inspect", sparse_run) == 0
    assert "NaN (pruned)" in capsys.readouterr().out


def test_inspect_tells_pruned_nan_from_poison(tmp_path, tiny_params, write_params, capsys, one_thread):
    d = tmp_path / "run"
    params = write_params(tiny_params(sparsity={"sparsity": 0.5}, runconfig={"max_steps": 2}))
    assert cli("train", "--params", params, "--model_dir", d) == 0
    sparse = d / "checkpoint_2.mdl"
    capsys.readouterr()
    assert cli("inspect", sparse, "--json") == 0
    clean = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert clean["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"]["nan"] > 0  # pruned positions
    assert all(t.get("nonfinite") == 0 for t in clean.values()), "pruned NaN is not poison"
    assert cli("inspect", sparse) == 0
    assert "non-finite" not in capsys.readouterr().out

    state = ckpt.load_checkpoint(sparse)
    state["model"]["transformer_decoder.norm.weight"][0] = float("nan")  # never pruned: a norm
    fc = state["model"]["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"]
    fc[~torch.isnan(fc)] = fc[~torch.isnan(fc)].index_fill(0, torch.tensor([0]), float("inf"))  # inf is never pruning
    poisoned = tmp_path / "poisoned.mdl"
    torch.save(state, poisoned)
    assert cli("inspect", poisoned, "--json") == 0
    report = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert report["transformer_decoder.norm.weight"]["nonfinite"] == 1
    assert report["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"]["nonfinite"] == 1
    assert report["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"]["nan"] == clean["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"]["nan"]
    assert cli("inspect", poisoned) == 0
    out = capsys.readouterr().out
    for name in ("transformer_decoder.norm.weight", "transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"):
        assert any(name in line and "non-finite" in line for line in out.splitlines()), out


def test_finalize_mdl_and_safetensors(sparse_run, tmp_path):
    out = tmp_path / "dense.mdl"
    assert cli("finalize", "-i", sparse_run, "-o", out) == 0
    dense = torch.load(out, weights_only=True)
    assert not any(torch.isnan(t).any() for t in dense["model"].values())
    fc = "transformer_decoder.layers.1.ffn.ffn.0.linear_layer.weight"
    sparse = torch.load(sparse_run, weights_only=True)["model"][fc]
    torch.testing.assert_close(dense["model"][fc], sparse.nan_to_num(0.0))
    from safetensors.torch import load_file

    st = tmp_path / "dense.safetensors"
    assert cli("finalize", "-i", sparse_run, "-o", st) == 0
    weights = load_file(str(st))
    assert not any(torch.isnan(t).any() for t in weights.values())
    assert cli("finalize", "-i", sparse_run, "-o", sparse_run) == 2  # never overwrite the input


def test_inspect_and_finalize_read_a_packed_runs_checkpoint(tmp_path, tiny_params, monkeypatch, capsys):
    from sparsetrain.cli import main

    run = block_kernel_run(tmp_path / "run", tiny_params, monkeypatch, packed=True, max_steps=2)
    tr.train_step(run)
    path = tr.save(run)
    assert main(["inspect", str(path)]) == 0
    assert "transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight" in capsys.readouterr().out
    out = tmp_path / "final.mdl"
    assert main(["finalize", "--input", str(path), "--output", str(out)]) == 0
    final = torch.load(out, weights_only=True)
    model = final.get("model", final)
    assert not any(torch.isnan(v).any() for v in model.values() if v.is_floating_point())
