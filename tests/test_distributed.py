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

from sparsetrain import data

ROOT = Path(__file__).resolve().parents[1]


def _launch(
    nproc: int, params: Path, model_dir: Path, *overrides: str, timeout: float = 240
) -> subprocess.CompletedProcess:
    sets = [x for o in overrides for x in ("--set", o)]
    args = [str(ROOT / "run.py"), "--mode", "train", "--params", str(params), "--model_dir", str(model_dir), *sets]
    return _run(nproc, args, timeout)


def _run(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``python ARGS`` in one process, or under torchrun in ``nproc``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        # --standalone: a private rendezvous on a free port, so parallel or stale jobs never meet.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    # A session of its own, so that a hung job's worker processes can be killed with it.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{err[-3000:]}")
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
    return write_params(
        tiny_params(
            optimizer={"grad_accum_steps": 2},
            runconfig={"max_steps": 6, "checkpoint_steps": 3},
            sparsity={
                "sparsity": 0.5,
                "param_name_patterns": {"mlp": {"init_method": "topk"}, "attn": {"init_method": "random"}},
            },
        )
    )


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


# --- a BPE tokenizer trained at start: rank 0 trains and writes it, the others get a copy ----------

BPE = {"tokenizer": "bpe", "bpe_vocab_size": 300}


def test_bpe_tokenizer_two_processes_match_one(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params(train_input=BPE, runconfig={"max_steps": 4, "checkpoint_steps": 4}), "bpe.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _launch(1, params, one), _launch(2, params, two)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert "trained a byte-level BPE tokenizer" in r2.stderr and "DDP x2" in r2.stderr
    assert sorted(p.name for p in two.iterdir() if "tokenizer" in p.name) == ["tokenizer.json"]  # no temp file left
    tok = data.HFTokenizer.load(two / "tokenizer.json", "train_input.tokenizer")
    assert 257 <= tok.vocab_size <= 300
    assert (two / "tokenizer.json").read_text() == (one / "tokenizer.json").read_text()
    _assert_same_run(one, two, 4)  # the same token ids on both ranks, and those of one process


PROBE = """
import json, sys
import torch
from sparsetrain import data, distributed
from sparsetrain.params import load_params

trained = []
train_bpe = data.HFTokenizer.train_bpe.__func__
data.HFTokenizer.train_bpe = classmethod(lambda cls, *a: trained.append(1) or train_bpe(cls, *a))
info = distributed.init("auto", torch.device("cpu"))
tok = data.load_tokenizer(load_params(sys.argv[1]).train_input, sys.argv[2])
print(json.dumps({"rank": info.rank, "trained": len(trained), "ids": tok.encode("def f(x):\\n    return x")}))
distributed.shutdown(info)
"""


def test_bpe_tokenizer_trained_by_rank_0_alone(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params(train_input=BPE), "bpe.yaml")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    r = _run(2, [str(script), str(params), str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr
    ranks = sorted((json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")), key=lambda x: x["rank"])
    assert [x["rank"] for x in ranks] == [0, 1]
    assert [x["trained"] for x in ranks] == [1, 0]  # rank 1 waited for rank 0's tokenizer
    assert ranks[0]["ids"] == ranks[1]["ids"]
    saved = data.HFTokenizer.load(tmp_path / "run" / "tokenizer.json", "train_input.tokenizer")
    assert saved.encode("def f(x):\n    return x") == ranks[0]["ids"]


@pytest.mark.parametrize("fault", ["empty corpus", "unwritable tokenizer.json"])
def test_bpe_tokenizer_failure_reaches_every_rank(tmp_path, tiny_params, write_params, fault):
    model_dir = tmp_path / "run"
    if fault == "empty corpus":
        blank = tmp_path / "blank"
        blank.mkdir()
        for name in ("a.txt", "b.txt"):
            (blank / name).write_text("")
        inputs = {"train_input": {**BPE, "data_path": str(blank)}, "eval_input": {"data_path": str(blank)}}
        expected = f"error: train_input.data_path: the train split of '{blank}' holds no text"
    else:
        (model_dir / "tokenizer.json").mkdir(parents=True)  # rank 0 cannot replace it with a file
        inputs = {"train_input": BPE}
        expected = f"error: {model_dir / 'tokenizer.json'}: cannot write"
    params = write_params(tiny_params(**inputs), "bad.yaml")
    r = _launch(2, params, model_dir, timeout=120)  # without the failure broadcast rank 1 would wait
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 2 and errors[0] == errors[1], r.stderr  # one line from each rank, the same
    assert errors[0].startswith(expected), r.stderr
    assert f'File "{ROOT}' not in r.stderr, r.stderr  # no traceback from a rank (torchrun prints its own)
    assert not list(model_dir.glob(".tokenizer.json.tmp"))
