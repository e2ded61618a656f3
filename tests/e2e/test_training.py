"""Dense training end to end through the command line, on the tiny model: the loss falls on the
stdlib corpus, a resumed run is the uninterrupted one bit for bit (dropout, micro-batches, a
warm-up then cosine schedule), and a run writes its outputs (checkpoints kept, resolved params,
metrics, TensorBoard events, the log)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sparsetrain import checkpoint as ckpt
from tests.helpers import cli, records


def test_loss_falls_on_stdlib_corpus(tmp_path, tiny_params, write_params):
    p = tiny_params(
        train_input={"source": "stdlib", "data_path": None, "batch_size": 8, "max_sequence_length": 64},
        eval_input={"source": "stdlib", "data_path": None, "batch_size": 8, "max_sequence_length": 64},
        runconfig={"max_steps": 80, "log_steps": 1, "eval_steps": 4},
        optimizer={"learning_rate": 0.01},
    )
    assert cli("train", "--params", write_params(p), "--model_dir", tmp_path / "run") == 0
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert losses[0] > 5.0 and losses[-1] < 3.5, losses  # from ln(256) = 5.55 at the start
    (ev,) = records(tmp_path / "run", "eval")
    assert ev["eval_loss"] < 4.0 and ev["perplexity"] == pytest.approx(2.718281828 ** ev["eval_loss"], rel=1e-6)


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_params, write_params):
    p = tiny_params(
        model={"dropout_rate": 0.1},
        optimizer={"grad_accum_steps": 2, "learning_rate": [
            {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 0.01, "total_iters": 5},
            {"scheduler": "CosineDecay", "initial_learning_rate": 0.01, "end_learning_rate": 0.001, "total_iters": 15}]},
        runconfig={"max_steps": 20, "checkpoint_steps": 10},
    )
    params = write_params(p)
    assert cli("train", "--params", params, "--model_dir", tmp_path / "straight") == 0
    half = tmp_path / "halves"
    assert cli("train", "--params", params, "--model_dir", half, "--set", "runconfig.max_steps=10") == 0
    assert cli("train", "--params", params, "--model_dir", half) == 0
    a, b = _state(tmp_path / "straight" / "checkpoint_20.mdl"), _state(half / "checkpoint_20.mdl")
    assert a["global_step"] == b["global_step"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    straight = [(r["step"], r["loss"], r["lr"]) for r in records(tmp_path / "straight")]
    halves = [(r["step"], r["loss"], r["lr"]) for r in records(half)]
    assert straight == halves


def test_outputs_and_keep_checkpoints(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params(runconfig={"max_steps": 6, "checkpoint_steps": 2, "keep_checkpoints": 2, "log_steps": 3}))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d, "--set", "model.dropout_rate=0.05") == 0
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [4, 6]
    resolved = yaml.safe_load((d / "params.yaml").read_text())
    assert resolved["model"]["dropout_rate"] == 0.05 and resolved["model"]["vocab_size"] == 256
    assert "--set model.dropout_rate=0.05" in (d / "params.yaml").read_text()
    rec = records(d)
    assert [r["step"] for r in rec] == [3, 6]
    keys = {"step", "loss", "lr", "tokens", "tokens_per_s", "flops_per_step", "flops_per_step_dense",
            "flops_total", "flops_total_dense", "flops_ratio"}
    assert keys <= set(rec[0])
    assert rec[1]["tokens"] == 6 * 4 * 32
    assert rec[1]["flops_total"] == pytest.approx(rec[1]["flops_per_step"] * 6)
    assert list(d.glob("events.out.tfevents.*")) and (d / "train.log").read_text()
    state = _state(d / "checkpoint_6.mdl")
    assert set(state) >= {"model", "optimizer", "lr_scheduler", "global_step", "rng", "params"}
    assert not any(k.startswith(("_orig_mod", "module")) for k in state["model"])
