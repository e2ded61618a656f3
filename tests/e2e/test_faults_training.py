"""Failure behaviour of training runs (issue #7): signals and non-finite steps.

1. SIGINT / SIGTERM: the run finishes the current step, writes ``checkpoint_<step>.mdl``, says
   ``interrupted at step N; checkpoint written to PATH`` on stderr and exits 0; a second signal
   exits at once (128 + signal) without damaging any checkpoint.
2. Non-finite loss or gradients: ``runconfig.nonfinite: stop`` (default) exits 2 naming the
   first bad step (the 1-based step number of metrics.jsonl) and writes no checkpoint from it on;
   ``skip`` leaves the weights and the optimizer state untouched, logs a warning naming the step
   and goes on, up to ``runconfig.max_skipped_steps``; no checkpoint is ever poisoned.
3. A regression found by fuzzing: a block larger than any weight is no crash.

``inspect``'s NaN-versus-poison report is in ``tests/test_tools.py``; the other regressions found
by fuzzing are next to their modules (``tests/config/test_sparsity_values.py``,
``tests/test_tools.py``, ``tests/test_errors.py``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain.model import GPT
from tests.e2e.helpers import TEMP_RE, error_line
from tests.helpers import ROOT, cli

RUN_PY = ROOT / "run.py"


def checkpoints(model_dir: Path) -> dict[int, dict]:
    """Every checkpoint, loaded; nothing else in model_dir carries a checkpoint's name."""
    found = {}
    for p in model_dir.glob("checkpoint_*"):
        m = ckpt.CHECKPOINT_RE.match(p.name)
        assert m, f"{p.name} looks like a checkpoint but is not one"
        found[int(m.group(1))] = ckpt.load_checkpoint(p)
    return dict(sorted(found.items()))


def tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors(v)]
    return []


def assert_not_poisoned(state: dict, where) -> None:
    """A dense run: no NaN or inf anywhere in the weights or the optimizer state."""
    for t in tensors(state["model"]) + tensors(state.get("optimizer") or {}):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{where}: a poisoned checkpoint"


# ---------------------------------------------------------------------------------------------
# 1. SIGINT / SIGTERM
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def endless_run(tmp_path, tiny_params, write_params):
    """A training subprocess that would run for a long time, and helpers to watch it."""
    procs = []

    def start(**runconfig):
        p = tiny_params(model={"vocab_size": 4096},
                        runconfig={"max_steps": 100_000, "log_steps": 1, "eval_steps": 1, **runconfig})
        d = tmp_path / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("PYTHONPATH", None)
        log = open(tmp_path / "run.log", "wb")  # closed at teardown
        proc = subprocess.Popen(
            [sys.executable, str(RUN_PY), "--mode", "train", "--params", str(write_params(p)), "--model_dir", str(d)],
            stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT,
        )
        procs.append((proc, log))
        return proc, d

    def wait_for(proc, d: Path, *, step: int, temp: bool = False, timeout: float = 120.0) -> None:
        start = time.monotonic()
        while True:
            assert proc.poll() is None, f"the run ended early: {stderr()}"
            assert time.monotonic() - start < timeout, f"step {step} not reached in {timeout} s: {stderr()}"
            metrics = d / "metrics.jsonl"
            steps = re.findall(r'"kind": "train", "step": (\d+)', metrics.read_text()) if metrics.exists() else []
            if steps and int(steps[-1]) >= step:
                if not temp or any(TEMP_RE.match(n) for n in os.listdir(d)):
                    return
            time.sleep(0.0005)

    def stderr() -> str:
        return (tmp_path / "run.log").read_text(errors="replace")[-3000:]

    yield start, wait_for, stderr
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_checkpoints_and_exits_0(sig, endless_run):
    start, wait_for, stderr = endless_run
    proc, d = start()
    wait_for(proc, d, step=3)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0, stderr()
    m = re.search(r"interrupted at step (\d+); checkpoint written to (\S+)", stderr())
    assert m, stderr()
    step, path = int(m.group(1)), Path(m.group(2))
    if not path.is_absolute():
        path = ROOT / path
    assert path == d / f"checkpoint_{step}.mdl" and step >= 3
    found = checkpoints(d)
    assert list(found) == [step] and found[step]["global_step"] == step  # checkpoint_steps 0: only this one
    logged = [r["step"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert logged[-1] == step, "the step in progress was finished and logged, and nothing after it"
    assert not [n for n in os.listdir(d) if TEMP_RE.match(n)]


def test_second_signal_exits_at_once_and_damages_nothing(endless_run):
    start, wait_for, stderr = endless_run
    proc, d = start(checkpoint_steps=2)
    wait_for(proc, d, step=5, temp=True)  # checkpoints 2 and 4 exist, and a save is under way
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    assert rc in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT), (rc, stderr())
    found = checkpoints(d)  # every one loads
    assert {2, 4} <= set(found), found.keys()
    for step, state in found.items():
        assert state["global_step"] == step
    assert "Traceback" not in stderr()


# ---------------------------------------------------------------------------------------------
# 2. non-finite loss or gradients
# ---------------------------------------------------------------------------------------------


def inject_nan(monkeypatch, at_steps: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Make the loss (and so every gradient) NaN at the given 1-based training steps.

    Returns the weights each training step started from, by step: a snapshot taken at every
    training forward pass (grad_accum_steps 1: one pass per step)."""
    real = GPT.forward
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, idx, targets=None):
        loss = real(self, idx, targets)
        if self.training and targets is not None:
            step = len(snapshots) + 1
            snapshots[step] = {k: v.detach().clone() for k, v in self.state_dict().items()}
            if step in at_steps:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(GPT, "forward", forward)
    return snapshots


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_stop_names_the_first_bad_step_and_writes_no_checkpoint_after_it(
    tmp_path, tiny_params, write_params, capsys, monkeypatch, one_thread
):
    # the check rides on log steps and saves: step 3 goes bad, it is noticed at the save of step 4
    params = write_params(tiny_params(runconfig={"max_steps": 8, "log_steps": 4, "checkpoint_steps": 2}))
    inject_nan(monkeypatch, {3})
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 2
    line = error_line(capsys)
    assert re.search(r"non-finite loss.*\bat step 3\b", line), line
    found = checkpoints(d)
    assert list(found) == [2]
    assert_not_poisoned(found[2], "checkpoint_2")


def test_nonfinite_stop_on_a_real_divergence(tmp_path, tiny_params, write_params, capsys, one_thread):
    """learning_rate 1e30: step 1 throws the weights to ~1e30, the next forward pass overflows."""
    params = write_params(tiny_params(runconfig={"max_steps": 6, "log_steps": 1, "checkpoint_steps": 1}))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d, "--set", "optimizer.learning_rate=1e30") == 2
    line = error_line(capsys)
    m = re.search(r"non-finite loss.*\bat step (\d+)\b", line)
    assert m, line
    bad = int(m.group(1))
    found = checkpoints(d)
    assert list(found) == list(range(1, bad)), (bad, list(found))
    for step, state in found.items():
        assert_not_poisoned(state, f"checkpoint_{step}")


def test_nonfinite_skip_drops_the_update_and_continues(tmp_path, tiny_params, write_params, monkeypatch, one_thread):
    params = write_params(tiny_params(runconfig={"max_steps": 8, "log_steps": 1, "nonfinite": "skip"}))
    starts = inject_nan(monkeypatch, {3, 5})
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    assert sorted(starts) == list(range(1, 9))
    # steps 3 and 5 changed nothing; steps 2 and 4 did
    assert same(starts[4], starts[3]) and same(starts[6], starts[5])
    assert not same(starts[3], starts[2]) and not same(starts[5], starts[4])
    final = checkpoints(d)[8]
    assert_not_poisoned(final, "checkpoint_8")
    # the optimizer state never saw the skipped steps: 8 steps, 6 updates
    counts = {float(s["step"]) for s in final["optimizer"]["state"].values()}
    assert counts == {6.0}, counts
    warnings = [line for line in (d / "train.log").read_text().splitlines() if "WARNING" in line]
    for step in (3, 5):
        assert any(re.search(rf"\bstep {step}\b", w) for w in warnings), warnings


def test_nonfinite_skip_stops_past_max_skipped_steps(tmp_path, tiny_params, write_params, capsys, one_thread):
    params = write_params(tiny_params(runconfig={
        "max_steps": 12, "log_steps": 1, "checkpoint_steps": 1, "nonfinite": "skip", "max_skipped_steps": 2,
    }))
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d, "--set", "optimizer.learning_rate=1e30") == 2
    line = error_line(capsys)
    assert "runconfig.max_skipped_steps" in line and re.search(r"\b2\b", line), line
    for step, state in checkpoints(d).items():
        assert_not_poisoned(state, f"checkpoint_{step}")


# ---------------------------------------------------------------------------------------------
# 3. found by fuzzing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_method", ["topk", "random"])
def test_block_size_larger_than_any_weight_is_not_a_crash(tmp_path, tiny_params, write_params, capsys, init_method, one_thread):
    # masks.py: a block_size of 10**30 overflows torch (ValueError / RuntimeError) when masks are drawn;
    # a block larger than the weight could be clamped to the weight (one block), or refused with exit 2
    block = {"sparsity": 0.5, "structure": "block", "block_size": 10**30, "init_method": init_method}
    params = write_params(tiny_params(sparsity=block, runconfig={"max_steps": 1}))
    rc = cli("train", "--params", params, "--model_dir", tmp_path / "run")
    if rc == 2:
        assert "sparsity.block_size" in error_line(capsys)
    else:
        assert rc == 0


