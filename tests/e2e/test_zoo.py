"""The model zoo's files end to end: every GPT-3 sparsity file (and GPT-2 small 1.x) in every
release layout trains a few CPU steps on HDF5 data in the zoo's formats with only sizes and
data_dir changed; the SPDF flow from its own three files; zoo checkpoints; its command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from sparsetrain.zoo_cli import run_py
from tests.helpers import cli, records
from tests.zoo_files import KINDS, gpt2_small_1x, gpt3

h5py = pytest.importorskip("h5py")

DYNAMIC = ("set75", "rigl75", "sparsewide-ift_rigl75")
MSL, VOCAB = 16, 96


def _sample_file(path, n, seed, mask_first=0):
    """The zoo's 'sample' form: (n, 3, msl) = input ids, loss mask, labels."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(n, MSL + 1))
    data = np.stack([tokens[:, :-1], np.ones((n, MSL), np.int64), tokens[:, 1:]], axis=1).astype(np.int32)
    data[:, 1, :mask_first] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.attrs["n_examples"] = n


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_data")
    for i in range(2):
        _sample_file(root / "train" / str(i) / "data_0.h5", 24, seed=i, mask_first=2)
    _sample_file(root / "val" / "data_0.h5", 12, seed=9)
    return root


def _write(tmp_path, raw, name="params.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("layout", ["2.0", "2.2", "2.4"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_zoo_gpt3_file_plans_and_trains(tmp_path, zoo_data, capsys, layout, kind):
    train = [str(zoo_data / "train" / "0"), str(zoo_data / "train" / "1")]
    params = _write(tmp_path, gpt3(kind, layout, train, str(zoo_data / "val")))
    if kind in DYNAMIC:  # 12 steps: one update, at step 10 (tests/zoo_files.py: update every 10, stop 30)
        assert cli("plan", "--params", params) == 0
        assert "every 10 steps before step 30" in capsys.readouterr().out
        assert cli("train", "--params", params, "--model_dir", tmp_path / "m", "--set", "runconfig.max_steps=12") == 0
        updates = [r for r in records(tmp_path / "m", kind="sparsity_update")]
        assert sorted({r["step"] for r in updates}) == [10] and len(updates) == 3  # the file's three patterns
        assert all(r["algorithm"] == ("set" if "set" in kind else "rigl") for r in updates)
        assert all(r["dropped"] == r["regrown"] > 0 for r in updates)
        ckpt = torch.load(tmp_path / "m" / "checkpoint_12.mdl", weights_only=True)
        for name, t in ckpt["model"].items():
            if name.endswith(("dense_layer.weight", "linear_layer.weight")):
                assert torch.isnan(t).sum().item() == round(0.75 * t.numel()), name
        assert ckpt["dynamic_sparsity"]["updates_done"] and ckpt["dynamic_sparsity"]["last_update"] == 10
        return
    assert cli("plan", "--params", params) == 0
    out = capsys.readouterr().out
    assert f"sequence length: {MSL} (from the train_input data)" in out
    assert "zoo keys with no effect on GPUs (accepted, ignored):" in out
    assert cli("train", "--params", params, "--model_dir", tmp_path / "m") == 0
    train_records = records(tmp_path / "m")
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in train_records)
    saved = yaml.safe_load((tmp_path / "m" / "params.yaml").read_text())
    assert saved["train_input"]["max_sequence_length"] == MSL  # taken from the data
    ckpt = torch.load(tmp_path / "m" / "checkpoint_3.mdl", weights_only=True)
    q = ckpt["model"]["transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"]
    expected = {"static75": 0.75, "sparsewide-ift_static50": 0.5, "vspdf_phase1": 0.9}.get(kind, 0.0)
    assert torch.isnan(q).sum().item() == round(expected * q.numel())


def test_gpt2_small_1x_file_trains(tmp_path, zoo_data):
    params = _write(tmp_path, gpt2_small_1x(str(zoo_data / "train" / "0"), str(zoo_data / "val")))
    assert cli("train", "--params", params, "--model_dir", tmp_path / "m") == 0
    assert [r["step"] for r in records(tmp_path / "m")] == [1, 2, 3]


def test_loss_mask_is_honoured(tmp_path, zoo_data):
    """Masking every position but one changes the loss to that position's loss alone."""
    from sparsetrain import data
    from sparsetrain.config import params_from_dict

    raw = gpt3("static75", "2.0", str(zoo_data / "train" / "0"), str(zoo_data / "val"))
    p = params_from_dict(raw)
    stream = data.hdf5_stream(p.train_input)
    x, y = data.get_batch(stream, 4, MSL, seed=0, step=0, shuffle=True)
    assert torch.all(y[:, :2] == -100) and torch.all(y[:, 2:] >= 0)  # mask_first=2 in the fixture


def test_spdf_flow_from_the_zoos_three_files(tmp_path, zoo_data):
    """vspdf phase 1 (90% sparse), phase 2 (dense, from phase 1's checkpoint), DART fine-tuning."""
    train, val = str(zoo_data / "train" / "0"), str(zoo_data / "val")
    phase1 = _write(tmp_path, gpt3("vspdf_phase1", "2.4", train, val), "phase1.yaml")
    phase2 = _write(tmp_path, gpt3("vspdf_phase2", "2.4", train, val), "phase2.yaml")
    dart = _write(tmp_path, gpt3("vspdf_dart", "2.4", train, val), "dart.yaml")
    assert cli("train", "--params", phase1, "--model_dir", tmp_path / "p1") == 0
    p1 = tmp_path / "p1" / "checkpoint_3.mdl"
    assert cli("train", "--params", phase2, "--model_dir", tmp_path / "p2", "--checkpoint_path", p1) == 0
    p2 = torch.load(tmp_path / "p2" / "checkpoint_3.mdl", weights_only=True)
    q = p2["model"]["transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"]
    assert not torch.isnan(q).any() and (q != 0).float().mean() > 0.5  # dense now: pruned weights regrew
    assert cli("train", "--params", dart, "--model_dir", tmp_path / "dart",
               "--checkpoint_path", tmp_path / "p2" / "checkpoint_3.mdl") == 0
    assert records(tmp_path / "dart")[0]["step"] == 1  # a warm start: step 0, fresh optimizer


def _zoo_checkpoint(tmp_path, form: str):
    """A checkpoint as the zoo writes it, from one of ours: zoo keys, a 0-d step, its sparsity form."""
    ours = torch.load(tmp_path / "m" / "checkpoint_3.mdl", weights_only=True)
    model = dict(ours["model"])
    state = {"model": model, "global_step": torch.tensor(3), "lr_scheduler": {"last_epoch": 3}}
    if form == "2.2":
        for name, t in list(model.items()):
            if torch.isnan(t).any():
                model[name + "_mask"] = ~torch.isnan(t)
                model[name] = torch.nan_to_num(t, nan=0.0)
        state["sparsity"] = {"state": {}}
    path = tmp_path / f"zoo_{form}" / "checkpoint_3.mdl"
    path.parent.mkdir()
    torch.save(state, path)
    return path


@pytest.mark.parametrize("form", ["1.x", "2.2"])
def test_zoo_checkpoints_inspect_warm_start_and_resume(tmp_path, zoo_data, capsys, form):
    train, val = str(zoo_data / "train" / "0"), str(zoo_data / "val")
    params = _write(tmp_path, gpt3("static75", "2.2", train, val))
    assert cli("train", "--params", params, "--model_dir", tmp_path / "m") == 0
    path = _zoo_checkpoint(tmp_path, form)
    capsys.readouterr()
    assert cli("inspect", path, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    q = next(t for t in report["tensors"] if t["name"].endswith("layers.0.self_attn.proj_q_dense_layer.weight"))
    assert q["nan"] == round(0.75 * q["numel"]) and report["global_step"] == 3
    assert not any(t["name"].endswith("_mask") for t in report["tensors"])
    # Resume inside its model_dir: step 3, masks kept, 3 more steps.
    more = ["--set", "runconfig.max_steps=6"]
    assert cli("train", "--params", params, "--model_dir", path.parent, *more) == 0
    after = torch.load(path.parent / "checkpoint_6.mdl", weights_only=True)["model"]
    q6 = after["transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"]
    q3 = torch.load(tmp_path / "m" / "checkpoint_3.mdl", weights_only=True)["model"][
        "transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"]
    assert torch.equal(torch.isnan(q6), torch.isnan(q3))  # the zoo checkpoint's mask, kept
    assert [r["step"] for r in records(path.parent)] == [4, 5, 6]


def test_zoo_command_line(tmp_path, zoo_data, capsys):
    params = _write(tmp_path, gpt3("static75", "2.4", str(zoo_data / "train" / "0"), str(zoo_data / "val")))
    assert run_py(["CSX", "--mode", "train", "--params", str(params)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: CSX: the Cerebras wafer-scale system is not a target here; use GPU or CPU (or leave the word out)"
    )
    assert run_py(["--compile_only", "--params", str(params)]) == 2
    assert "--compile_only: there is no separate compile step on a GPU" in capsys.readouterr().err
    assert run_py(["--mode", "train", "--params", str(params), "--num_csx", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --num_csx: not a flag built here (the zoo's Cerebras-system flags have no effect on a GPU; "
        "settings go in the params file or --set SECTION.KEY=VALUE)"
    )
    assert run_py(["--mode", "predict", "--params", str(params)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: argument --mode/-m: invalid choice: 'predict'")
    assert run_py(["CPU", "--mode", "train", "--params", str(params), "--model_dir", str(tmp_path / "two"),
                   "--max_steps", "2"]) == 0
    assert [r["step"] for r in records(tmp_path / "two")] == [1, 2]  # the zoo's --max_steps
    assert run_py(["CPU", "--validate_only", "--params", str(params)]) == 0
    assert "sparsified tensors" in capsys.readouterr().out
    assert not (tmp_path / "model_dir").exists()
    m = str(tmp_path / "m")
    assert run_py(["CPU", "--mode", "train", "--params", str(params), "--model_dir", m,
                   "--set", "runconfig.checkpoint_steps=1"]) == 0
    capsys.readouterr()
    assert run_py(["cpu", "--mode", "eval_all", "--params", str(params), "--model_dir", m]) == 0
    steps = [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert steps == [1, 2, 3]


def test_convert_params_writes_the_same_run(tmp_path, zoo_data, capsys):
    params = _write(tmp_path, gpt3("static75", "2.4", str(zoo_data / "train" / "0"), str(zoo_data / "val")))
    out = tmp_path / "ours.yaml"
    assert cli("convert-params", params, "-o", out) == 0
    assert "(zoo trainer layout -> ours;" in capsys.readouterr().out
    for p in (params, out):
        assert cli("train", "--params", p, "--model_dir", tmp_path / p.stem) == 0
    a, b = records(tmp_path / params.stem), records(tmp_path / out.stem)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_a_model_dir_of_before_the_zoo_names_resumes(tmp_path, zoo_data, capsys):
    from tests.sparsity.test_legacy_names import legacy_state

    params = _write(tmp_path, gpt3("static75", "2.0", str(zoo_data / "train" / "0"), str(zoo_data / "val")))
    assert cli("train", "--params", params, "--model_dir", tmp_path / "m") == 0
    state = torch.load(tmp_path / "m" / "checkpoint_3.mdl", weights_only=True)
    state["model"] = legacy_state(state["model"])
    state.pop("writer")
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "checkpoint_3.mdl")
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", tmp_path / "old", "--set", "runconfig.max_steps=5") == 0
    assert "written with the parameter names of before the zoo's; renamed (qkv split into q, k, v)" in capsys.readouterr().err
    q = "transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"
    before = torch.load(tmp_path / "m" / "checkpoint_3.mdl", weights_only=True)["model"][q]
    after = torch.load(tmp_path / "old" / "checkpoint_5.mdl", weights_only=True)["model"][q]
    assert torch.equal(torch.isnan(before), torch.isnan(after))  # the mask of then, kept
    assert [r["step"] for r in records(tmp_path / "old")] == [4, 5]


def test_data_errors_name_the_key_as_the_zoo_file_wrote_it(tmp_path, zoo_data, capsys):
    (tmp_path / "empty").mkdir()
    params = _write(tmp_path, gpt3("static75", "2.4", str(tmp_path / "empty"), str(zoo_data / "val")))
    assert cli("train", "--params", params, "--model_dir", tmp_path / "m") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: trainer.fit.train_dataloader.data_dir: ") and "holds no .h5 files" in err
    raw = gpt3("static75", "2.4", str(zoo_data / "train" / "0"), str(zoo_data / "val"))
    raw["trainer"]["fit"]["train_dataloader"]["data_subset"] = "garbage"
    params = _write(tmp_path, raw, "subset.yaml")
    assert cli("train", "--params", params, "--model_dir", tmp_path / "m2") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {params}: trainer.fit.train_dataloader.data_subset: ")


def test_save_initial_checkpoint_and_the_files_model_dir(tmp_path, zoo_data, monkeypatch):
    raw = gpt3("static75", "2.0", str(zoo_data / "train" / "0"), str(zoo_data / "val"))
    raw["runconfig"].update(save_initial_checkpoint=True, model_dir=str(tmp_path / "from_file"))
    params = _write(tmp_path, raw)
    assert cli("train", "--params", params) == 0  # no --model_dir: the file's runconfig.model_dir
    first = torch.load(tmp_path / "from_file" / "checkpoint_0.mdl", weights_only=True)
    assert first["global_step"] == 0
    q = first["model"]["transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"]
    assert torch.isnan(q).sum().item() == round(0.75 * q.numel())  # the initial weights, masked
    assert (tmp_path / "from_file" / "checkpoint_3.mdl").exists()


def test_a_zoo_rigl_checkpoint_continues_its_dynamic_run(tmp_path, zoo_data):
    """A zoo 2.2+ checkpoint (mask buffers) of a RigL run at step 12, written from one of ours with
    masks that differ from any initial draw: resumed with the zoo's rigl75 file, the run keeps
    those masks, counts the update at step 10 as done and updates next at step 20."""
    train, val = str(zoo_data / "train" / "0"), str(zoo_data / "val")
    params = _write(tmp_path, gpt3("rigl75", "2.4", train, val))
    assert cli("train", "--params", params, "--model_dir", tmp_path / "m", "--set", "runconfig.max_steps=12") == 0
    ours = torch.load(tmp_path / "m" / "checkpoint_12.mdl", weights_only=True)
    model = dict(ours["model"])
    for name, t in list(model.items()):
        if torch.isnan(t).any():
            model[name + "_mask"] = ~torch.isnan(t)
            model[name] = torch.nan_to_num(t, nan=0.0)
    zoo_dir = tmp_path / "zoo"
    zoo_dir.mkdir()
    torch.save({"model": model, "global_step": torch.tensor(12), "sparsity": {"state": {}}}, zoo_dir / "checkpoint_12.mdl")
    name = "transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"
    assert cli("train", "--params", params, "--model_dir", zoo_dir, "--set", "runconfig.max_steps=13") == 0
    step13 = torch.load(zoo_dir / "checkpoint_13.mdl", weights_only=True)["model"][name]
    assert torch.equal(~torch.isnan(step13), model[name + "_mask"])  # the zoo checkpoint's mask, kept
    assert cli("train", "--params", params, "--model_dir", zoo_dir, "--set", "runconfig.max_steps=21") == 0
    updates = records(zoo_dir, kind="sparsity_update")
    assert sorted({r["step"] for r in updates}) == [20]
    after = torch.load(zoo_dir / "checkpoint_21.mdl", weights_only=True)
    assert after["dynamic_sparsity"]["updates_done"] == {g: 2 for g in after["dynamic_sparsity"]["updates_done"]}
    assert not torch.equal(torch.isnan(after["model"][name]), torch.isnan(step13))  # and updated at 20
    assert torch.isnan(after["model"][name]).sum() == round(0.75 * after["model"][name].numel())
