"""``cli.py``: the subcommands (train, eval, train_and_eval, generate, prepare) and ``run.py`` on a
tiny model (2 layers, width 32): shipped configs run, errors are one line with exit 2 (a
traceback only with ``--debug``), a params file is read and parsed once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from sparsetrain import checkpoint as ckpt
from tests.helpers import ROOT, cli, records

TINY_CONFIGS = sorted((ROOT / "configs").glob("*tiny*.yaml"))
FAST = ["--set", "runconfig.progress=false"]


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda p: p.name)
def test_shipped_tiny_configs_run(config, tmp_path, capsys):
    overrides = ["runconfig.max_steps=3", "runconfig.eval_steps=1", "runconfig.log_steps=1",
                 "train_input.batch_size=2", "eval_input.batch_size=2", "runconfig.checkpoint_steps=0"]
    rc = cli("train", "--params", config, "--model_dir", tmp_path / "run", *[x for o in overrides for x in ("--set", o)], *FAST)
    assert rc == 0
    out = capsys.readouterr().out
    assert "sparsetrain summary" in out and "eval loss" in out
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "checkpoint_3.mdl"


def test_eval_and_train_and_eval_modes(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params(runconfig={"max_steps": 6, "eval_frequency": 2}))
    d = tmp_path / "run"
    assert cli("train_and_eval", "--params", params, "--model_dir", d) == 0
    assert [r["step"] for r in records(d, "eval")] == [2, 4, 6]
    assert cli("eval", "--params", params, "--model_dir", d) == 0
    evals = records(d, "eval")
    assert evals[-1]["step"] == 6 and evals[-1]["eval_loss"] == pytest.approx(evals[-2]["eval_loss"])
    empty = tmp_path / "empty"
    assert cli("eval", "--params", params, "--model_dir", empty) == 2


def test_generate_samples_text(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 0
    capsys.readouterr()
    assert cli("generate", "--model_dir", d, "--prompt", "def ", "--max_new_tokens", "20") == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out) > 10


def test_prepare_shards_then_train_with_bpe(tmp_path, tiny_params, write_params, capsys):
    p = tiny_params(train_input={"tokenizer": "bpe", "bpe_vocab_size": 300})
    assert cli("prepare", "--params", write_params(p), "--output", tmp_path / "shards") == 0
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["vocab_size"] <= 300
    shard = {"source": "shards", "data_path": str(tmp_path / "shards"), "tokenizer": "bpe"}
    p2 = tiny_params(train_input={**shard, "split": "train"}, eval_input={**shard, "split": "eval"})
    assert cli("train", "--params", write_params(p2, "p2.yaml"), "--model_dir", tmp_path / "run") == 0
    assert yaml.safe_load((tmp_path / "run" / "params.yaml").read_text())["model"]["vocab_size"] == meta["vocab_size"]


def _run_py(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _start_run_py(*args, cwd=ROOT) -> subprocess.Popen:
    """``_run_py`` started, not waited for (see ``_finish``)."""
    cmd = [sys.executable, str(ROOT / "run.py"), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_run_py_bad_inputs_one_line_exit_2(tmp_path, tiny_params, write_params):
    good = write_params(tiny_params())
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  hidden_size: 32\n  oops: [1, 2\n")
    wrong_type = write_params(tiny_params(model={"hidden_size": "wide"}), "wrong.yaml")
    missing_data = write_params(tiny_params(train_input={"data_path": str(tmp_path / "nowhere")}), "nodata.yaml")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["--params", tmp_path / "missing.yaml"], "missing.yaml: params file not found"),
        (["--params", bad_yaml], "bad.yaml:4"),
        (["--params", wrong_type], "model.hidden_size: expected an integer, got 'wide'"),
        (["--params", missing_data], "train_input.data_path"),
        (["--params", good, "--model_dir", blocker / "sub"], "cannot write there"),
    ]
    # The five processes at once (each is mostly its imports, on one core): half the time on two
    # cores; each case is still its own process and is checked, and named, on its own.
    procs = []
    for i, (args, fragment) in enumerate(cases):
        if "--model_dir" not in args:
            args = [*args, "--model_dir", tmp_path / f"m{i}"]  # one each: the runs are at once
        procs.append((args, fragment, _start_run_py("--mode", "train", *args)))
    for args, fragment, proc in procs:
        r = _finish(proc)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_checkpoint_from_other_model_shape(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 0
    wider = write_params(tiny_params(model={"hidden_size": 64}), "wide.yaml")
    capsys.readouterr()
    assert cli("train", "--params", wider, "--model_dir", d) == 2
    err = capsys.readouterr().err
    assert "checkpoint_4.mdl: checkpoint is for another model shape" in err
    assert ckpt.latest_checkpoint(d).name == "checkpoint_4.mdl"  # nothing saved was lost


def test_debug_shows_traceback(tmp_path):
    r = _run_py("--mode", "train", "--params", tmp_path / "missing.yaml", "--model_dir", tmp_path / "m", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_a_params_file_is_read_and_parsed_once_on_its_way_to_training(tmp_path, tiny_params, write_params, monkeypatch):
    from sparsetrain.config import params as params_module
    from sparsetrain.sparsity import sparsifier

    calls = {"read_yaml": 0, "parse_sparsity": 0}

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(params_module, "read_yaml")
    counting(params_module, "parse_sparsity")
    counting(sparsifier, "parse_sparsity")
    p = tiny_params(sparsity={"sparsity": 0.5, "param_name_patterns": {"ffn.*linear_layer.weight": {}}},
                    runconfig={"max_steps": 2, "eval_steps": 1})
    assert cli("train", "--params", write_params(p), "--model_dir", tmp_path / "run", *FAST) == 0
    assert calls == {"read_yaml": 1, "parse_sparsity": 1}


def test_a_pattern_that_selects_nothing_names_the_params_file(tmp_path, tiny_params, write_params, capsys):
    path = write_params(tiny_params(sparsity={"sparsity": 0.5, "param_name_patterns": "encoder.*weight"}))
    assert cli("train", "--params", path, "--model_dir", tmp_path / "run", *FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: sparsity.param_name_patterns ('encoder.*weight'): matches no parameter"), err
    assert not list((tmp_path / "run").glob("checkpoint_*")) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_bad_pattern_on_a_trained_model_dir_is_one_line_before_anything_loads(tmp_path, tiny_params, write_params, capsys):
    good = write_params(tiny_params(sparsity={"sparsity": 0.5}, runconfig={"max_steps": 1, "eval_steps": 1}), "good.yaml")
    assert cli("train", "--params", good, "--model_dir", tmp_path / "run", *FAST) == 0
    saved = (tmp_path / "run" / "checkpoint_1.mdl").read_bytes()
    bad = write_params(tiny_params(sparsity={"structure": "2:3"}), "bad.yaml")  # width 32: no whole groups of 3
    capsys.readouterr()
    assert cli("train", "--params", bad, "--model_dir", tmp_path / "run", *FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: sparsity.structure 2:3: parameter "), err
    assert (tmp_path / "run" / "checkpoint_1.mdl").read_bytes() == saved
