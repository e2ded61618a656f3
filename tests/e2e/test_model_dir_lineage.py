"""One run per model_dir, and resume that means what it says (issue 17): the lock, warm starts into
a used model_dir, rollback, a run killed after its last checkpoint, what a resume keeps and what it
takes from the params, checkpoint names that lie, and commands that fail before doing anything.

Each test reproduces a way a model_dir lost checkpoints, masks or the record of its run, or gave a
different result without a word, before ``sparsetrain.training.model_dir`` and
``resume_checks``; tiny model (2 layers, width 32), CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsetrain import checkpoint as ckpt
from sparsetrain import training
from sparsetrain.config import load_params
from sparsetrain.training.model_dir import LOCK_NAME, ModelDirLock
from tests.e2e.helpers import error_line
from tests.helpers import cli, records

SPARSE = {"sparsity": 0.5, "param_name_patterns": [".*dense.*weight"], "init_method": "random"}


def steps_of(model_dir: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(model_dir)]


def snapshot(model_dir: Path) -> dict[str, bytes]:
    """Every file of a model_dir and its bytes, but the lock and train.log (which records the refusal)."""
    return {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*"))
            if p.is_file() and p.name not in (LOCK_NAME, "train.log")}


@pytest.fixture
def sparse_run(tmp_path, tiny_params, write_params):
    """A sparse run of 4 steps with checkpoints at 2 and 4; returns (params file, model_dir)."""
    params = write_params(tiny_params(sparsity=SPARSE, runconfig={"max_steps": 4, "checkpoint_steps": 2}), "sparse.yaml")
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    assert steps_of(d) == [2, 4]
    return params, d


# -- data that was lost -----------------------------------------------------------------------------


def test_resuming_a_sparse_run_without_its_sparsity_block_is_refused(sparse_run, tiny_params, write_params, capsys):
    _, d = sparse_run
    before = snapshot(d)
    plain = write_params(tiny_params(runconfig={"max_steps": 8, "keep_checkpoints": 1}), "plain.yaml")
    capsys.readouterr()
    assert cli("train", "--params", plain, "--model_dir", d) == 2
    line = error_line(capsys)
    assert "checkpoint_4.mdl: a sparse run" in line and "no sparsity block" in line
    assert "sparsity: 0.0" in line and "--checkpoint_path" in line  # the two ways to go dense on purpose
    assert snapshot(d) == before  # masks and checkpoints intact, params.yaml not rewritten


def test_sparsity_zero_on_resume_goes_dense_on_purpose(sparse_run, tiny_params, write_params):
    _, d = sparse_run
    dense = write_params(tiny_params(sparsity={"sparsity": 0.0, "param_name_patterns": [".*dense.*weight"]},
                                     runconfig={"max_steps": 6, "checkpoint_steps": 2}), "dense.yaml")
    assert cli("train", "--params", dense, "--model_dir", d) == 0
    assert steps_of(d) == [2, 4, 6]
    assert not any(v.isnan().any() for v in ckpt.load_checkpoint(d / "checkpoint_6.mdl")["model"].values())


def test_warm_start_into_another_runs_model_dir_is_refused(sparse_run, tmp_path, tiny_params, write_params, capsys):
    params, d = sparse_run
    other = tmp_path / "other"
    assert cli("train", "--params", params, "--model_dir", other, "--set", "runconfig.max_steps=2") == 0
    before = snapshot(d)
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", d, "--checkpoint_path", other / "checkpoint_2.mdl") == 2
    line = error_line(capsys)
    assert "a warm start needs a model_dir without checkpoints" in line and "holds another run's" in line
    assert "checkpoint_4.mdl" in line and "new --model_dir" in line
    assert snapshot(d) == before


def test_rerunning_an_interrupted_warm_start_resumes_it(sparse_run, tmp_path, capsys):
    params, src = sparse_run
    d = tmp_path / "finetune"
    command = ("train", "--params", params, "--model_dir", d, "--checkpoint_path", src / "checkpoint_4.mdl",
               "--set", "runconfig.max_steps=6", "--set", "runconfig.checkpoint_steps=2")
    assert cli(*command) == 0
    (d / "checkpoint_6.mdl").unlink()  # as if killed after step 6's records, before its checkpoint
    (d / "checkpoint_4.mdl").unlink()
    capsys.readouterr()
    assert cli(*command) == 0
    err = capsys.readouterr().err
    assert "holds this warm start's checkpoints" in err and "resuming at step 2" in err
    assert steps_of(d) == [2, 4, 6]
    assert [r["step"] for r in records(d)] == list(range(1, 7))  # each step once
    state = ckpt.load_checkpoint(d / "checkpoint_6.mdl")
    assert state["warm_start_from"]["path"] == str((src / "checkpoint_4.mdl").resolve())
    assert state["run_id"] == ckpt.load_checkpoint(d / "checkpoint_2.mdl")["run_id"]


def test_rollback_moves_the_abandoned_future_aside_and_prunes_its_own(tmp_path, tiny_params, write_params, capsys):
    params = write_params(tiny_params(runconfig={"max_steps": 6, "checkpoint_steps": 2, "keep_checkpoints": 2}))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    assert steps_of(d) == [4, 6]
    old_six = (d / "checkpoint_6.mdl").read_bytes()
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", d, "--checkpoint_path", d / "checkpoint_4.mdl",
               "--set", "runconfig.max_steps=8") == 0
    captured = capsys.readouterr()
    assert "rolling back to checkpoint_4.mdl" in captured.err
    assert steps_of(d) == [6, 8]  # the new run's own, not the abandoned step 6
    assert (d / "checkpoint_6.mdl").read_bytes() != old_six
    (abandoned,) = (d / "abandoned").iterdir()
    assert (abandoned / "checkpoint_6.mdl").read_bytes() == old_six  # nothing lost
    assert [r["step"] for r in records(abandoned)] == [5, 6]
    assert [r["step"] for r in records(d)] == list(range(1, 9))
    summary_checkpoint = next(line for line in captured.out.splitlines() if line.startswith("checkpoint "))
    assert Path(summary_checkpoint.split()[-1]).exists()


def test_a_run_killed_after_its_checkpoint_resumes_without_duplicate_records(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params(runconfig={"max_steps": 4, "checkpoint_steps": 2}))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    (d / "checkpoint_4.mdl").unlink()  # kill -9 after step 4's record, before its checkpoint
    assert cli("train", "--params", params, "--model_dir", d) == 0
    assert [r["step"] for r in records(d)] == [1, 2, 3, 4]
    (abandoned,) = (d / "abandoned").iterdir()
    assert [r["step"] for r in records(abandoned)] == [3, 4]
    run_ids = {r["run_id"] for r in records(d)}
    assert len(run_ids) == 1 and run_ids == {ckpt.load_checkpoint(d / "checkpoint_4.mdl")["run_id"]}


def test_a_second_command_on_a_model_dir_in_use_is_refused(tmp_path, tiny_params, write_params, capsys):
    params = write_params(tiny_params())
    d = tmp_path / "run"
    d.mkdir()
    lock = ModelDirLock(d).acquire("sparsetrain train --params other.yaml")
    try:
        assert cli("train", "--params", params, "--model_dir", d) == 2
        line = error_line(capsys)
        assert "in use by another sparsetrain process" in line and f"pid {os.getpid()}" in line
        assert "sparsetrain train --params other.yaml" in line and "another --model_dir" in line
        assert steps_of(d) == []
    finally:
        lock.release()
    assert cli("train", "--params", params, "--model_dir", d) == 0  # released: the next one runs


def test_a_stale_lock_of_a_killed_run_is_no_obstacle(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params())
    d = tmp_path / "run"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from sparsetrain.training.model_dir import ModelDirLock; "
        f"ModelDirLock({str(d)!r}).acquire('killed'); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # kill -9: no clean-up ran
    holder.wait()
    assert (d / LOCK_NAME).exists()
    assert cli("train", "--params", params, "--model_dir", d) == 0


def test_a_save_keeps_another_living_writers_temporary_file(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        host = ckpt._host()
        living = tmp_path / f".checkpoint_7.mdl.{host}.{sleeper.pid}.abc123.tmp"
        dead = tmp_path / f".checkpoint_5.mdl.{host}.{gone.pid}.def456.tmp"
        elsewhere = tmp_path / f".checkpoint_5.mdl.otherhost.{gone.pid}.ghi789.tmp"
        for p in (living, dead, elsewhere):
            p.write_bytes(b"partial")
        ckpt.save_checkpoint({"model": {}, "global_step": 1}, tmp_path / "dense.mdl")  # e.g. finalize -o
        assert living.exists() and elsewhere.exists()  # a running training's save is left alone
        assert not dead.exists()  # its writer is gone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.save_checkpoint({"model": {}, "global_step": 1}, tmp_path / "checkpoint_1.mdl")
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint_1.mdl").stat().st_mode & 0o777 == 0o644


# -- silent wrong results ---------------------------------------------------------------------------


def test_changed_optimizer_settings_apply_on_resume_and_are_named(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 0
    changed = tiny_params(optimizer={"weight_decay_rate": 0.02, "beta1": 0.8, "eps": 1e-6}, runconfig={"max_steps": 6})
    capsys.readouterr()
    path = write_params(changed, "changed.yaml")
    run = training.setup(load_params(path), d, write_metrics=False)
    decayed = run.optimizer.param_groups[0]
    assert decayed["weight_decay"] == 0.02 and decayed["betas"][0] == 0.8 and decayed["eps"] == 1e-6
    assert run.optimizer.param_groups[1]["weight_decay"] == 0.0  # norms and biases stay undecayed
    err = capsys.readouterr().err
    assert "optimizer.weight_decay_rate: 0.1 -> 0.02" in err and "optimizer.beta1: 0.9 -> 0.8" in err
    assert "optimizer.eps: 1e-08 -> 1e-06" in err


def test_every_setting_a_resume_changes_is_named(tmp_path, tiny_params, write_params, capsys):
    """Found by the second adversarial pass: the learning rate, clipping, dropout and batch order
    changed without a word."""
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 0
    changed = tiny_params(optimizer={"learning_rate": 0.001, "max_gradient_norm": 0.5},
                          model={"dropout_rate": 0.1}, train_input={"shuffle_seed": 11},
                          runconfig={"max_steps": 5})
    capsys.readouterr()
    assert cli("train", "--params", write_params(changed, "changed.yaml"), "--model_dir", d) == 0
    err = capsys.readouterr().err
    for note in ("optimizer.learning_rate: 0.003 -> 0.001", "optimizer.max_gradient_norm: 1 -> 0.5",
                 "model.dropout_rate: 0 -> 0.1", "train_input.shuffle_seed: None -> 11 (another batch order"):
        assert note in err, (note, err)
    capsys.readouterr()
    regrouped = tiny_params(optimizer={"decay_embeddings": True}, runconfig={"max_steps": 6})
    assert cli("train", "--params", write_params(regrouped, "regrouped.yaml"), "--model_dir", d) == 2
    line = error_line(capsys)
    assert "optimizer.decay_embeddings: False -> True regroups the optimizer's parameters" in line


def test_resuming_as_another_optimizer_is_one_line_and_keeps_params_yaml(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 0
    before = snapshot(d)
    sgd = write_params(tiny_params(optimizer={"optimizer_type": "SGD", "momentum": 0.9}, runconfig={"max_steps": 6}), "sgd.yaml")
    capsys.readouterr()
    assert cli("train", "--params", sgd, "--model_dir", d) == 2
    line = error_line(capsys)
    assert "optimizer state is AdamW's" in line and "optimizer_type is SGD" in line and "warm start" in line
    assert snapshot(d) == before


def test_resume_names_changed_batch_context_data_and_max_steps(tmp_path, tiny_params, write_params, corpus, capsys):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params(runconfig={"max_steps": 2})), "--model_dir", d) == 0
    (corpus / "doc_000.txt").write_text("# the corpus changed\n" * 200)
    other = tiny_params(train_input={"batch_size": 2, "max_sequence_length": 16}, runconfig={"max_steps": 4})
    capsys.readouterr()
    assert cli("train", "--params", write_params(other, "other.yaml"), "--model_dir", d) == 0
    err = capsys.readouterr().err
    assert "train_input.batch_size: 4 -> 2" in err and "train_input.max_sequence_length: 32 -> 16" in err
    assert "runconfig.max_steps: 2 -> 4" in err
    assert "train_input: " in err and "changed" in err  # the data fingerprint


def test_a_checkpoint_whose_name_disagrees_with_its_step_is_refused(tmp_path, tiny_params, write_params, capsys):
    params = write_params(tiny_params(runconfig={"max_steps": 4, "checkpoint_steps": 2}))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    shutil.copy(d / "checkpoint_2.mdl", d / "checkpoint_100.mdl")
    before = snapshot(d)
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", d, "--set", "runconfig.max_steps=8") == 2
    line = error_line(capsys)
    assert "checkpoint_100.mdl: holds step 2, not 100" in line and "rename it checkpoint_2.mdl" in line
    assert snapshot(d) == before


# -- rough edges ------------------------------------------------------------------------------------


def test_eval_leaves_params_yaml_and_says_what_it_evaluates(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    params = write_params(tiny_params())
    assert cli("train", "--params", params, "--model_dir", d) == 0
    record = (d / "params.yaml").read_text()
    capsys.readouterr()
    assert cli("eval", "--params", params, "--model_dir", d, "--set", "runconfig.eval_steps=1") == 0
    captured = capsys.readouterr()
    assert (d / "params.yaml").read_text() == record
    assert "resuming" not in captured.err and "nothing to train" not in captured.out
    assert "evaluating" in captured.err and f"evaluated        {d / 'checkpoint_4.mdl'} (step 4)" in captured.out


def test_a_command_that_fails_in_setup_leaves_no_model_dir(tmp_path, tiny_params, write_params, capsys):
    params = write_params(tiny_params(train_input={"data_path": str(tmp_path / "missing")}))
    d = tmp_path / "new_run"
    assert cli("train", "--params", params, "--model_dir", d) == 2
    assert "missing" in error_line(capsys)
    assert not d.exists()


def test_ctrl_c_during_setup_is_one_line(tmp_path, tiny_params, write_params, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "setup", interrupted)
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", tmp_path / "run") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith("interrupted:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_the_final_evaluation_keeps_the_checkpoint(tmp_path, tiny_params, write_params, capsys, monkeypatch):
    from sparsetrain.training import loop

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate", interrupted)
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted:" in err.splitlines()[-1]
    assert steps_of(d) == [4]


def test_generate_top_k_zero_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("generate", "--model_dir", tmp_path, "--top_k", "0")
    assert exit_.value.code == 2
    assert "--top_k: 0 is not valid: give 1 or more" in capsys.readouterr().err


def test_mid_run_evaluations_reach_the_log(tmp_path, tiny_params, write_params):
    d = tmp_path / "run"
    params = write_params(tiny_params(runconfig={"max_steps": 4, "eval_frequency": 2}))
    assert cli("train_and_eval", "--params", params, "--model_dir", d) == 0
    log = (d / "train.log").read_text()
    assert "eval at step 2: loss" in log and "eval at step 4: loss" in log


def test_the_lock_names_its_holder(tmp_path):
    lock = ModelDirLock(tmp_path).acquire("sparsetrain train -p x.yaml")
    try:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["command"] == "sparsetrain train -p x.yaml"
    finally:
        lock.release()
    assert yaml.safe_load((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()  # left, harmless


# -- the second adversarial pass (same session) ------------------------------------------------------


def test_rerunning_an_interrupted_rollback_resumes_it(tmp_path, tiny_params, write_params, capsys):
    params = write_params(tiny_params(runconfig={"max_steps": 6, "checkpoint_steps": 2}))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    rollback = ("train", "--params", params, "--model_dir", d, "--checkpoint_path", d / "checkpoint_2.mdl",
                "--set", "runconfig.max_steps=8")
    assert cli(*rollback) == 0
    assert steps_of(d) == [2, 4, 6, 8]
    (d / "checkpoint_8.mdl").unlink()
    (d / "checkpoint_6.mdl").unlink()  # as if killed after step 4 of the rolled-back run
    capsys.readouterr()
    assert cli(*rollback) == 0  # the same command again: continues, does not roll back a second time
    err = capsys.readouterr().err
    assert "checkpoint_4.mdl continues the rollback to checkpoint_2.mdl: resuming it" in err
    assert "rolling back" not in err
    assert steps_of(d) == [2, 4, 6, 8]
    assert len(list((d / "abandoned").iterdir())) == 2  # the first rollback's, and the records after step 4
    branch = ckpt.load_checkpoint(d / "checkpoint_8.mdl")["branch_from"]
    assert branch == {"path": str((d / "checkpoint_2.mdl").resolve()), "step": 2}


def test_a_missing_checkpoint_path_is_one_line_before_any_note(tmp_path, tiny_params, write_params, capsys):
    params = write_params(tiny_params())
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", d, "--checkpoint_path", d / "checkpoint_1.mdl") == 2
    err = capsys.readouterr().err
    assert "rolling back" not in err
    assert err.strip().splitlines()[-1] == (f"error: --checkpoint_path {d / 'checkpoint_1.mdl'}: no such file; "
                                            "to resume the run there, drop --checkpoint_path")


def test_another_file_of_the_model_dir_is_a_warm_start_not_a_rollback(tmp_path, tiny_params, write_params, capsys):
    params = write_params(tiny_params())
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", d / "dense.mdl") == 0
    before = snapshot(d)
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", d, "--checkpoint_path", d / "dense.mdl") == 2
    assert "a warm start needs a model_dir without checkpoints" in error_line(capsys)
    assert snapshot(d) == before  # nothing moved aside


def test_sigterm_during_setup_is_one_line_and_leaves_no_model_dir(tmp_path, tiny_params, write_params, capsys, monkeypatch):
    import signal

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` while the data loads
        raise AssertionError("SIGTERM did not stop setup")

    monkeypatch.setattr(training, "setup", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", tmp_path / "run") == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith("terminated (SIGTERM):")
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) is previous  # restored for whoever called main


def test_a_changed_seed_on_resume_is_named(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 0
    capsys.readouterr()
    more = write_params(tiny_params(runconfig={"max_steps": 6, "seed": 7}), "more.yaml")
    assert cli("train", "--params", more, "--model_dir", d) == 0
    assert "runconfig.seed: 3 -> 7 (batches are drawn from the seed" in capsys.readouterr().err


def test_running_a_finished_run_again_trains_and_records_nothing(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    params = write_params(tiny_params())
    assert cli("train", "--params", params, "--model_dir", d) == 0
    before = (d / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", d, "--set", "runconfig.max_steps=2") == 0
    captured = capsys.readouterr()
    assert "already at step 4, max_steps is 2: nothing to train" in captured.err
    assert "runconfig.max_steps: 4 -> 2" not in captured.err
    assert "step             4 of 2 (nothing to train)" in captured.out
    assert (d / "metrics.jsonl").read_bytes() == before  # no second final evaluation


def test_eval_on_a_read_only_model_dir_says_how(tmp_path, tiny_params, write_params, capsys, monkeypatch):
    d = tmp_path / "run"
    params = write_params(tiny_params())
    assert cli("train", "--params", params, "--model_dir", d) == 0
    write_text = Path.write_text

    def read_only(self, *args, **kwargs):  # as chmod 555 for a user who is not root (CI runs as root)
        if self.parent == d:
            raise PermissionError(13, "Permission denied")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    capsys.readouterr()
    assert cli("eval", "--params", params, "--model_dir", d) == 2
    line = error_line(capsys, only=True)
    assert line == (f"error: --model_dir {d}: cannot write there (Permission denied); an evaluation writes its "
                    "records there: to evaluate a checkpoint of it, pass that as --checkpoint_path with a "
                    "--model_dir you can write")


def test_a_symlinked_metrics_file_stays_a_link(tmp_path, tiny_params, write_params):
    d = tmp_path / "run"
    params = write_params(tiny_params(runconfig={"max_steps": 4, "checkpoint_steps": 2}))
    assert cli("train", "--params", params, "--model_dir", d) == 0
    kept = tmp_path / "kept_metrics.jsonl"
    (d / "metrics.jsonl").rename(kept)
    (d / "metrics.jsonl").symlink_to(kept)
    (d / "checkpoint_4.mdl").unlink()  # killed after step 4's records: the resume moves them aside
    assert cli("train", "--params", params, "--model_dir", d) == 0
    assert (d / "metrics.jsonl").is_symlink()
    assert [r["step"] for r in records(d)] == [1, 2, 3, 4]
    assert kept.read_text() == (d / "metrics.jsonl").read_text()


@pytest.mark.parametrize("case", ["a file", "a dangling link"])
def test_a_model_dir_that_is_not_a_directory_is_one_line(tmp_path, tiny_params, write_params, capsys, case):
    d = tmp_path / "run"
    if case == "a file":
        d.write_text("not a directory")
        expect = f"--model_dir {d}: is a file, not a directory"
    else:
        d.symlink_to(tmp_path / "gone")
        expect = f"--model_dir {d}: a symbolic link to {tmp_path / 'gone'}, which does not exist"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 2
    line = error_line(capsys, only=True)
    assert line.startswith(f"error: {expect}"), line


def test_eval_of_another_dirs_checkpoint_reports_its_step(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    params = write_params(tiny_params())
    assert cli("train", "--params", params, "--model_dir", d) == 0
    capsys.readouterr()
    other = tmp_path / "evals"
    assert cli("eval", "--params", params, "--model_dir", other, "--checkpoint_path", d / "checkpoint_4.mdl") == 0
    captured = capsys.readouterr()
    assert f"evaluating {d / 'checkpoint_4.mdl'} (step 4)" in captured.err
    assert [r["step"] for r in records(other, "eval")] == [4]


def test_generate_temperatures(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 0
    capsys.readouterr()
    assert cli("generate", "--model_dir", d, "--temperature", "1e-30", "--max_new_tokens", "4") == 0  # no NaN
    greedy = capsys.readouterr().out
    assert cli("generate", "--model_dir", d, "--temperature", "0", "--max_new_tokens", "4") == 0
    assert capsys.readouterr().out == greedy  # a vanishing temperature is greedy decoding
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_:
            cli("generate", "--model_dir", d, "--temperature", bad)
        assert exit_.value.code == 2
        assert f"--temperature: {bad} is not valid: give a number >= 0 (0: greedy)" in capsys.readouterr().err


def test_a_params_file_of_the_users_own_in_model_dir_is_kept(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "own"
    d.mkdir()
    own = d / "params.yaml"
    own.write_text("# my notes\n" + yaml.safe_dump(tiny_params()))
    before = own.read_text()
    assert cli("train", "--params", own, "--model_dir", d) == 0
    assert own.read_text() == before
    assert "the params file given, not a record sparsetrain wrote: left as it is" in capsys.readouterr().err


def test_nothing_to_train_leaves_params_yaml_and_the_history(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params(runconfig={"max_steps": 6, "checkpoint_steps": 2}))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    record = (d / "params.yaml").read_text()
    assert cli("train", "--params", params, "--model_dir", d, "--set", "runconfig.max_steps=2") == 0
    assert (d / "params.yaml").read_text() == record
    assert cli("train", "--params", params, "--model_dir", d, "--checkpoint_path", d / "checkpoint_2.mdl",
               "--set", "runconfig.max_steps=2") == 0  # a rollback that trains nothing moves nothing
    assert steps_of(d) == [2, 4, 6] and not (d / "abandoned").exists()


def test_pruning_keeps_a_checkpoint_whose_name_lies(tmp_path, tiny_params, write_params, capsys):
    params = write_params(tiny_params(runconfig={"max_steps": 6, "checkpoint_steps": 2}))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    (d / "checkpoint_6.mdl").rename(d / "checkpoint_1.mdl")  # holds step 6
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", d, "--set", "runconfig.max_steps=8",
               "--set", "runconfig.keep_checkpoints=1") == 0
    assert (d / "checkpoint_1.mdl").exists() and steps_of(d) == [1, 8]
    assert "checkpoint_1.mdl holds step 6, not 1: not deleted" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["--params", "--checkpoint_path", "inspect", "metrics.jsonl"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, tiny_params, write_params, capsys, what):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = tmp_path / "run"
    params = write_params(tiny_params())
    if what == "--params":
        rc, expect = cli("train", "--params", fifo, "--model_dir", d), f"{fifo}: not a regular file"
    elif what == "--checkpoint_path":
        rc, expect = cli("train", "--params", params, "--model_dir", d, "--checkpoint_path", fifo), f"{fifo}: not a regular file"
    elif what == "inspect":
        rc, expect = cli("inspect", fifo), f"{fifo}: not a regular file"
    else:
        d.mkdir()
        (d / "metrics.jsonl").symlink_to(fifo)
        rc, expect = cli("train", "--params", params, "--model_dir", d), "metrics.jsonl: cannot write metrics (not a regular file"
    assert rc == 2
    assert expect in error_line(capsys)


def test_eval_without_a_checkpoint_creates_no_model_dir(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "nothing"
    assert cli("eval", "--params", write_params(tiny_params()), "--model_dir", d) == 2
    assert "no checkpoint to evaluate" in error_line(capsys, only=True)
    assert not d.exists()


def test_an_empty_model_dir_argument_is_refused(tmp_path, tiny_params, write_params, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("train", "--params", write_params(tiny_params()), "--model_dir", "")
    assert exit_.value.code == 2
    assert "--model_dir/-o: an empty path; give a directory" in capsys.readouterr().err


def test_a_key_given_twice_in_a_params_file_is_named(tmp_path, tiny_params, capsys):
    text = yaml.safe_dump(tiny_params()) + "runconfig:\n  max_steps: 2\n"
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    from sparsetrain.training.metrics import setup_logging

    setup_logging(None)  # the console handler on this test's stderr
    assert load_params(path).runconfig.max_steps == 2  # YAML's rule: the last one
    assert "key 'runconfig' given twice in one mapping; the last one is used" in capsys.readouterr().err
