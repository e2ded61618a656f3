"""torchrun with 2 CPU processes (gloo): DDP sparse training matches one process exactly enough."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _launch(nproc: int, params: Path, model_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    sets = [x for o in overrides for x in ("--set", o)]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "run.py")]
    else:
        # --standalone: a private rendezvous on a free port, so parallel or stale jobs never meet.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "run.py")]
    cmd += ["--mode", "train", "--params", str(params), "--model_dir", str(model_dir), *sets]
    # A session of its own, so that a hung job's worker processes can be killed with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _records(model_dir: Path, kind: str) -> list[dict]:
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def _model(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _assert_same_run(a: Path, b: Path, step: int) -> None:
    la = [(r["step"], r["loss"]) for r in _records(a, "train")]
    lb = [(r["step"], r["loss"]) for r in _records(b, "train")]
    assert [s for s, _ in la] == [s for s, _ in lb]
    torch.testing.assert_close([x for _, x in la], [x for _, x in lb], rtol=1e-4, atol=1e-5)
    ma, mb = _model(a / f"checkpoint_{step}.mdl"), _model(b / f"checkpoint_{step}.mdl")
    for k in ma:
        assert torch.equal(torch.isnan(ma[k]), torch.isnan(mb[k])), k  # the same masks
        torch.testing.assert_close(ma[k].nan_to_num(0.0), mb[k].nan_to_num(0.0), rtol=1e-4, atol=1e-5)


@pytest.fixture
def params(tiny_params, write_params):
    return write_params(tiny_params(
        optimizer={"grad_accum_steps": 2},
        runconfig={"max_steps": 6, "checkpoint_steps": 3},
        sparsity={"sparsity": 0.5, "param_name_patterns": {"mlp": {"init_method": "topk"}, "attn": {"init_method": "random"}}},
    ))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, params, mode):
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _launch(1, params, one), _launch(2, params, two, f"runconfig.distributed={mode}")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert f"{mode.upper()} x2" in r2.stderr and r2.stdout.count("sparsetrain summary") == 1  # rank 0 speaks
    _assert_same_run(one, two, 6)
    e1, e2 = _records(one, "eval")[-1], _records(two, "eval")[-1]
    assert e1["eval_tokens"] == e2["eval_tokens"]
    assert e1["eval_loss"] == pytest.approx(e2["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoints_move_between_process_counts(tmp_path, params, mode):
    straight = tmp_path / "straight"
    assert _launch(1, params, straight).returncode == 0
    for first, second in ((2, 1), (1, 2)):
        d = tmp_path / f"{first}then{second}"
        r = _launch(first, params, d, "runconfig.max_steps=3", f"runconfig.distributed={mode}")
        assert r.returncode == 0, r.stderr
        r = _launch(second, params, d, f"runconfig.distributed={mode}")
        assert r.returncode == 0, r.stderr
        assert "resuming at step 3" in r.stderr
        _assert_same_run(straight, d, 6)


def test_batch_not_divisible_by_processes(tmp_path, tiny_params, write_params):
    bad = write_params(tiny_params(train_input={"batch_size": 3}), "bad.yaml")
    r = _launch(2, bad, tmp_path / "bad")
    assert r.returncode != 0
    assert "train_input.batch_size: 3 is not divisible by the 2 processes" in r.stderr
    assert "Traceback" not in "".join(line for line in r.stderr.splitlines(True) if line.startswith("error"))
