"""torchrun with 2 CPU processes (gloo): DDP and FSDP sparse training match one process exactly
enough, with packed optimizer state (the default with a sparsity block) or torch's dense state;
checkpoints move between process counts; a BPE tokenizer is trained by rank 0 alone; block layers
(forced on the CPU) train as on one process. ``tests/test_distributed.py`` has the probe of
``distributed.py``'s own functions on uneven FSDP shards."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from sparsetrain import data
from sparsetrain.training import build
from tests.conftest import make_corpus
from tests.helpers import (
    ROOT,
    checkpoint_model,
    finish,
    launch,
    launch_here,
    rank_reports,
    records,
    start_launch,
    start_torchrun,
    torchrun,
)


def _assert_same_run(a: Path, b: Path, step: int, weight_atol: float = 5e-5) -> None:
    """The same losses and masks, and weights to ``weight_atol``: DDP averages two half-batch
    gradients where one process sums the whole batch, so a gradient that is a small difference of
    large terms differs by up to ~2e-4 relative (measured: Adam's exp_avg of one entry, -3.0309e-5
    vs -3.0302e-5), and Adam's normalised step carries that into the weight (1.9e-5 after 6 steps
    at lr 3e-3 for 1 of 4096 entries). Which entry that hits moves with any change to the float
    order, so the bound is 5e-5, well under one step (lr = 3e-3)."""
    la = [(r["step"], r["loss"]) for r in records(a, "train")]
    lb = [(r["step"], r["loss"]) for r in records(b, "train")]
    assert [s for s, _ in la] == [s for s, _ in lb]
    torch.testing.assert_close([x for _, x in la], [x for _, x in lb], rtol=1e-4, atol=1e-5)
    ma, mb = checkpoint_model(a / f"checkpoint_{step}.mdl"), checkpoint_model(b / f"checkpoint_{step}.mdl")
    for k in ma:
        assert torch.equal(torch.isnan(ma[k]), torch.isnan(mb[k])), k  # the same masks
        torch.testing.assert_close(ma[k].nan_to_num(0.0), mb[k].nan_to_num(0.0), rtol=1e-4, atol=weight_atol)


@pytest.fixture(scope="module")
def module_corpus(tmp_path_factory) -> Path:
    """One corpus for the module, so that tests with the same params share one-process runs."""
    return make_corpus(tmp_path_factory.mktemp("distributed") / "corpus")


@pytest.fixture
def params(tiny_params, write_params, module_corpus):
    p = tiny_params(
        optimizer={"grad_accum_steps": 2},
        runconfig={"max_steps": 6, "checkpoint_steps": 3},
        sparsity={
            "sparsity": 0.5,
            "param_name_patterns": {"ffn": {"init_method": "topk"}, "self_attn": {"init_method": "random"}},
        },
    )
    for inp in ("train_input", "eval_input"):
        p[inp]["data_path"] = str(module_corpus)
    return write_params(p)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One-process reference runs, shared by the tests that compare against the same one (the
    distributed mode means nothing to one process): keyed by the params file's text, the
    overrides and ``block_layers``; the tests only read them. Returns (model_dir, the finished
    run). In this process (``launch_here``: the same losses and weights, bit for bit, as
    ``launch(1, ...)``, without a fresh interpreter's imports); ``block_layers``: with the block
    layers forced, as ``FORCE_BLOCK_LAYERS`` below does."""
    runs: dict[tuple, tuple[Path, object]] = {}

    def run(params: Path, *sets: str, block_layers: bool = False):
        key = (Path(params).read_text(), sets, block_layers)
        if key not in runs:
            model_dir = tmp_path_factory.mktemp("one_process") / "run"
            with pytest.MonkeyPatch.context() as m:
                if block_layers:
                    m.setattr(build, "block_kernels_apply", lambda run: True)
                result = launch_here(params, model_dir, *sets, compiled="runconfig.compile=true" in sets)
            assert result.returncode == 0, result.stderr
            runs[key] = (model_dir, result)
        return runs[key]

    return run


# (distributed mode, optimizer.packed_state): packed is the default with a sparsity block.
MODES = [("ddp", True), ("fsdp", True), ("fsdp", False)]
MODE_IDS = ["ddp", "fsdp-packed", "fsdp-dense"]


@pytest.mark.parametrize(("mode", "packed"), MODES, ids=MODE_IDS)
def test_two_processes_match_one(tmp_path, params, one_process, mode, packed):
    two = tmp_path / "two"
    state = f"optimizer.packed_state={str(packed).lower()}"
    one, _ = one_process(params, state)
    r2 = launch(2, params, two, f"runconfig.distributed={mode}", state)
    assert r2.returncode == 0, r2.stderr
    assert f"{mode.upper()} x2" in r2.stderr and r2.stdout.count("sparsetrain summary") == 1  # rank 0 speaks
    _assert_same_run(one, two, 6)
    e1, e2 = records(one, "eval")[-1], records(two, "eval")[-1]
    assert e1["eval_tokens"] == e2["eval_tokens"]
    assert e1["eval_loss"] == pytest.approx(e2["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_block_structure_in_bf16_matches_one_process(tmp_path, params, one_process, mode):
    """16x16 block masks and bf16 autocast: the masks agree across ranks (the run checks them at
    start) and come out the same as one process's; losses match to bf16 tolerance."""
    two = tmp_path / "two"
    sets = ("sparsity.structure=block", "sparsity.block_size=16", "runconfig.precision=bf16")
    one, _ = one_process(params, *sets)
    r2 = launch(2, params, two, f"runconfig.distributed={mode}", *sets)
    assert r2.returncode == 0, r2.stderr
    la = [r["loss"] for r in records(one, "train")]
    lb = [r["loss"] for r in records(two, "train")]
    torch.testing.assert_close(la, lb, rtol=2e-2, atol=2e-2)
    ma, mb = checkpoint_model(one / "checkpoint_6.mdl"), checkpoint_model(two / "checkpoint_6.mdl")
    pruned = 0
    for k in ma:
        assert torch.equal(torch.isnan(ma[k]), torch.isnan(mb[k])), k  # the same block masks
        pruned += int(torch.isnan(ma[k]).sum())
        if torch.isnan(ma[k]).any():  # whole 16x16 blocks
            blocks = torch.isnan(ma[k]).view(ma[k].shape[0] // 16, 16, -1, 16)
            assert torch.equal(blocks.all(3).all(1), blocks.any(3).any(1)), k
    assert pruned > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_compiled_model_matches_one_process(tmp_path, params, one_process, mode):
    """runconfig.compile: true under DDP and FSDP (inductor's CPU backend here)."""
    two = tmp_path / "two"
    sets = ("runconfig.compile=true", "runconfig.max_steps=4", "runconfig.checkpoint_steps=4")
    one, r1 = one_process(params, *sets)
    r2 = launch(2, params, two, f"runconfig.distributed={mode}", *sets, timeout=480)
    assert r2.returncode == 0, r2.stderr
    assert "torch.compile: on" in r1.stderr and "torch.compile: on" in r2.stderr
    la = [r["loss"] for r in records(one, "train")]
    lb = [r["loss"] for r in records(two, "train")]
    assert len(la) == len(lb) == 4
    torch.testing.assert_close(la, lb, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("mode", "packed"), MODES, ids=MODE_IDS)
def test_checkpoints_move_between_process_counts(tmp_path, params, one_process, mode, packed):
    state = f"optimizer.packed_state={str(packed).lower()}"
    straight, _ = one_process(params, state)
    # 2 -> 1 and 1 -> 2: the one-process halves in this process (the run launch(1, ...) makes),
    # the two 2-process halves at once (they share nothing).
    two_then_one, one_then_two = tmp_path / "2then1", tmp_path / "1then2"
    r = launch_here(params, one_then_two, "runconfig.max_steps=3", f"runconfig.distributed={mode}", state)
    assert r.returncode == 0, r.stderr
    first = start_launch(2, params, two_then_one, "runconfig.max_steps=3", f"runconfig.distributed={mode}", state)
    second = start_launch(2, params, one_then_two, f"runconfig.distributed={mode}", state)
    first, second = finish(first), finish(second)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "resuming at step 3" in second.stderr
    _assert_same_run(straight, one_then_two, 6)
    r = launch_here(params, two_then_one, f"runconfig.distributed={mode}", state)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 3" in r.stderr
    _assert_same_run(straight, two_then_one, 6)


# --- FSDP with packed optimizer state: each rank packs the state of its own shards ----------------

FSDP_PROBE = """
import json, sys
import torch
from sparsetrain import distributed, training as train
from sparsetrain.config import load_params
from sparsetrain.optim.packed import PackedOptimizer

run = train.setup(load_params(sys.argv[1], ["runconfig.distributed=fsdp"]), sys.argv[2], evaluate=False, write_metrics=False)
for _ in range(3):
    train.train_step(run)
opt, names = run.optimizer, {id(p): n for n, p in run.model.named_parameters()}
report = {"rank": run.dist.rank, "packed": isinstance(opt, PackedOptimizer), "weights": {}}
for p, local_mask in run.sparsifier._bound:
    full_mask = run.sparsifier.masks[names[id(p)]]
    full = p.full_tensor()  # every rank takes part in the gather
    state = opt.state.get(p, {})
    report["weights"][names[id(p)]] = {
        "dtensor": hasattr(p, "to_local"),
        "local_shape": list(p.to_local().shape), "full_shape": list(p.shape),
        "mask_shape": list(local_mask.shape), "local_kept": int(local_mask.sum()),
        "local_pruned_zero": bool((p.to_local()[~local_mask] == 0).all()),
        "full_pruned_zero": bool((full[~full_mask] == 0).all()), "full_kept_nonzero": int((full[full_mask] != 0).sum()),
        "state_shapes": {k: list(v.shape) for k, v in state.items() if torch.is_tensor(v) and v.ndim},
    }
if report["packed"]:
    report["enforced"] = len(opt.masks())
    report["state_bytes"] = opt.state_bytes()["masked"]
    report["dense_bytes"] = opt.dense_equivalent_bytes()["masked"]
with open(f"{sys.argv[3]}/rank{run.dist.rank}.json", "w") as f:  # long lines: one file per rank, not stdout
    json.dump(report, f)
distributed.shutdown(run.dist)
"""


def test_fsdp_packed_state_per_rank(tmp_path, params):
    """Each FSDP rank runs a PackedOptimizer whose state holds the kept entries of its own shard of
    every sparsified weight (so fewer bytes than torch's dense state), and pruned weights are
    exactly 0 in every shard after steps."""
    script = tmp_path / "probe.py"
    script.write_text(FSDP_PROBE)
    r = torchrun(2, [str(script), str(params), str(tmp_path / "run"), str(tmp_path)])
    assert r.returncode == 0, r.stderr
    ranks = rank_reports(tmp_path)
    assert [x["rank"] for x in ranks] == [0, 1]
    for rank in ranks:
        assert rank["packed"], rank  # not torch's optimizer with dense state
        weights = rank["weights"]
        assert len(weights) == rank["enforced"] == 12  # 2 blocks x (q, k, v, attn output, ffn 0, ffn 1)
        for name, w in weights.items():
            assert w["dtensor"] and w["local_shape"][0] * 2 == w["full_shape"][0], name  # a shard
            assert w["mask_shape"] == w["local_shape"], name  # the local mask slice
            assert w["local_pruned_zero"] and w["full_pruned_zero"], name
            assert w["full_kept_nonzero"] > 0, name  # the weights did train
            shapes = w["state_shapes"]
            assert shapes == {"exp_avg": [w["local_kept"]], "exp_avg_sq": [w["local_kept"]]}, name
        # 50% sparsity: about half of the dense bytes of this rank's shards (plus the bitmasks).
        assert rank["state_bytes"] < 0.6 * rank["dense_bytes"], rank
    for name in ranks[0]["weights"]:  # the two shards split the weight's kept entries
        kept = [rank["weights"][name]["local_kept"] for rank in ranks]
        numel = ranks[0]["weights"][name]["full_shape"][0] * ranks[0]["weights"][name]["full_shape"][1]
        assert sum(kept) == numel // 2, name


def test_batch_not_divisible_by_processes(tmp_path, tiny_params, write_params):
    bad = write_params(tiny_params(train_input={"batch_size": 3}), "bad.yaml")
    r = launch(2, bad, tmp_path / "bad")
    assert r.returncode != 0
    assert "train_input.batch_size: 3 is not divisible by the 2 processes" in r.stderr
    assert "Traceback" not in "".join(line for line in r.stderr.splitlines(True) if line.startswith("error"))


# --- a BPE tokenizer trained at start: rank 0 trains and writes it, the others get a copy ----------

BPE = {"tokenizer": "bpe", "bpe_vocab_size": 300}


def test_bpe_tokenizer_two_processes_match_one(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params(train_input=BPE, runconfig={"max_steps": 4, "checkpoint_steps": 4}), "bpe.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = launch_here(params, one), launch(2, params, two)  # one process: here, as launch(1, ...)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert "trained a byte-level BPE tokenizer" in r2.stderr and "DDP x2" in r2.stderr
    assert sorted(p.name for p in two.iterdir() if "tokenizer" in p.name) == ["tokenizer.json"]  # no temp file left
    tok = data.HFTokenizer.load(two / "tokenizer.json", "train_input.tokenizer")
    assert 257 <= tok.vocab_size <= 300
    assert (two / "tokenizer.json").read_text() == (one / "tokenizer.json").read_text()
    # The same token ids on both ranks, and those of one process. Dense AdamW at this config's
    # learning rate turns the all-reduce's other summation order into weight differences up to
    # 2e-5 after 4 steps (measured: 1.9e-5 on 1 of 4096 entries); the losses agree to 1e-4.
    _assert_same_run(one, two, 4, weight_atol=5e-5)


PROBE = """
import json, sys
import torch
from sparsetrain import data, distributed
from sparsetrain.config import load_params

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
    r = torchrun(2, [str(script), str(params), str(tmp_path / "run")])
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
    r = launch(2, params, model_dir, timeout=120)  # without the failure broadcast rank 1 would wait
    assert r.returncode != 0
    # One line from each rank, the same; two ranks writing at once may share a terminal line.
    errors = [e.strip() for e in re.findall(r"error: .*?(?=error: |$)", r.stderr, flags=re.MULTILINE)]
    assert len(errors) == 2 and errors[0] == errors[1], r.stderr
    assert errors[0].startswith(expected), r.stderr
    assert f'File "{ROOT / "src"}' not in r.stderr, r.stderr  # no traceback from our code (torchrun prints its own)
    assert not list(model_dir.glob(".tokenizer.json.tmp"))


# --- Block-kernel layers (forced on the CPU: the fallback computes, the storage is the GPU's) -----

FORCE_BLOCK_LAYERS = """
import sys
from sparsetrain.training import build
# What CUDA + bf16 decide on a GPU, forced here: block layers become BlockSparseLinear and, except
# under FSDP, store their live blocks only. The CPU fallback computes the same function.
build.block_kernels_apply = lambda run: True
from sparsetrain.zoo_cli import run_py  # as run.py
sys.exit(run_py())
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_block_layers_on_two_processes_match_one_and_resume(tmp_path, params, one_process, mode):
    """Layers switched to the block kernels' class (live blocks stored under DDP) train like one
    process, write the usual NaN checkpoint, and a 2-process checkpoint resumes on 1 process.
    The one-process runs are in this process, with the same switch (``one_process``'s
    ``block_layers``): the reference is shared by both modes."""
    script = tmp_path / "forced_run.py"
    script.write_text(FORCE_BLOCK_LAYERS)
    block = ("sparsity.structure=block", "sparsity.block_size=16")
    sets = [x for o in block for x in ("--set", o)]
    on_kernels = "linear layer(s) run on the block-sparse kernels"

    def start(model_dir, *more):
        extra = [x for o in more for x in ("--set", o)]
        args = [str(script), "--mode", "train", "--params", str(params), "--model_dir", str(model_dir), *sets, *extra]
        return start_torchrun(2, args)

    two, halves = tmp_path / "two", tmp_path / "halves"
    one, r1 = one_process(params, *block, block_layers=True)
    assert on_kernels in r1.stderr
    # The whole 2-process run and the first half of the resumed one at once (they share nothing).
    runs = (
        start(two, f"runconfig.distributed={mode}"),
        start(halves, f"runconfig.distributed={mode}", "runconfig.max_steps=3"),
    )
    for r in [finish(run) for run in runs]:
        assert r.returncode == 0, r.stderr
        assert on_kernels in r.stderr
    _assert_same_run(one, two, 6)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(build, "block_kernels_apply", lambda run: True)
        r = launch_here(params, halves, *block)
    assert r.returncode == 0, r.stderr
    assert on_kernels in r.stderr and "resuming at step 3" in r.stderr
    _assert_same_run(one, halves, 6)
