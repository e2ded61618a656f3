"""``sparsetrain compare`` and model_dir/loss.png, on two real tiny runs (dense and 50% sparse)."""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from sparsetrain import compare
from sparsetrain.errors import UserError
from tests.conftest import TINY
from tests.helpers import ROOT, cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two trainings of 6 steps (train_and_eval, an eval every 3 steps), loss.png on."""
    root = tmp_path_factory.mktemp("compare")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, path in enumerate(sorted((ROOT / "src" / "sparsetrain").rglob("*.py"))[:30]):
        (corpus / f"doc_{i:03d}.txt").write_text(path.read_text())
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSETRAIN_LOSS_PNG", "1")
        for name, sparsity in (("dense", None), ("sparse", {"sparsity": 0.5})):
            raw = copy.deepcopy(TINY)
            for inp in ("train_input", "eval_input"):
                raw[inp]["data_path"] = str(corpus)
            raw["runconfig"].update(max_steps=6, eval_frequency=3)
            if sparsity:
                raw["sparsity"] = sparsity
            params = root / f"{name}.yaml"
            params.write_text(yaml.safe_dump(raw))
            assert cli("train_and_eval", "--params", params, "--model_dir", root / name) == 0
            out[name] = root / name
    return out


def test_the_table_names_every_run_with_its_figures(runs, capsys):
    assert compare.compare_runs([str(runs["dense"]), str(runs["sparse"])], x="steps") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "steps", "tokens", "train", "loss", "eval", "loss", "FLOPs", "sparse", "FLOPs",
                                "dense", "tokens/s", "time", "s", "sparsity", "structure"]
    dense, sparse = lines[1].split(), lines[2].split()
    assert dense[0] == str(runs["dense"]) and sparse[0] == str(runs["sparse"])
    assert dense[1:3] == ["6", "768"] and sparse[1:3] == ["6", "768"]  # 6 steps of 4 x 32 tokens
    assert dense[-2:] == ["0.0%", "dense"] and sparse[-2:] == ["50.0%", "unstructured"]
    assert lines[0].index("tokens/s") + len("tokens/s") == lines[1].index(dense[7]) + len(dense[7])  # right-aligned


def test_json_holds_the_same_figures(runs, capsys):
    compare.compare_runs([str(runs["dense"]), str(runs["sparse"])], as_json=True)
    data = json.loads(capsys.readouterr().out)
    assert data["x"] == "flops" and [r["run"] for r in data["runs"]] == [str(runs["dense"]), str(runs["sparse"])]
    dense, sparse = data["runs"]
    last = [json.loads(line) for line in (runs["sparse"] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in last if r["kind"] == "train"]
    evals = [r for r in last if r["kind"] == "eval"]
    assert sparse["train_loss"] == train[-1]["loss"] and sparse["eval_loss"] == evals[-1]["eval_loss"]
    assert sparse["flops_sparse"] == train[-1]["flops_total"] and sparse["flops_dense"] == train[-1]["flops_total_dense"]
    assert sparse["flops_sparse"] < sparse["flops_dense"] and dense["flops_sparse"] == dense["flops_dense"]
    assert sparse["sparsity"] == pytest.approx(0.5) and dense["sparsity"] == 0.0
    median = statistics.median(r["tokens_per_s"] for r in train[1:])  # the first interval (compilation) counts at it
    assert sparse["time_s"] == pytest.approx(768 / 6 / median + sum(768 / 6 / r["tokens_per_s"] for r in train[1:]))


@pytest.mark.parametrize("axis", ["steps", "tokens", "flops", "time"])
def test_every_axis_draws_a_png(axis, runs, tmp_path, capsys):
    out = tmp_path / f"{axis}.png"
    assert compare.compare_runs([str(runs["dense"]), str(runs["sparse"])], x=axis, out=out) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    height, width = matplotlib.image.imread(out).shape[:2]
    assert (width, height) == (640, 400)
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out} (loss against {axis})"


def test_axes_are_monotonic_and_evals_sit_on_the_curve(runs):
    run = compare.read_run(runs["sparse"])
    for axis in compare.AXES:
        xs = run.x(axis)
        assert xs == sorted(xs) and xs[-1] > xs[0]
    steps = [r["step"] for r in run.train]
    assert [e["step"] for e in run.eval] == [3, 6]
    assert run.eval_x("flops")[1] == run.x("flops")[steps.index(6)]


def test_each_training_leaves_loss_png(runs):
    for path in runs.values():
        assert (path / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_the_last_record_of_a_step_wins_and_torn_lines_are_skipped(tmp_path, caplog):
    records = [{"kind": "train", "step": 1, "loss": 3.0, "tokens": 10, "tokens_per_s": 10.0},
               {"kind": "train", "step": 2, "loss": 2.0, "tokens": 20, "tokens_per_s": 5.0},
               {"kind": "eval", "step": 2, "eval_loss": 2.5}, {"kind": "eval", "step": 2, "eval_loss": 2.4}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"kind": "tra')
    run = compare.read_run(tmp_path)
    assert [e["eval_loss"] for e in run.eval] == [2.4] and len(run.train) == 2
    assert run.x("time") == [2.0, 4.0]  # the first interval (compilation) at the others' rate, 5 tokens/s
    assert f"{tmp_path / 'metrics.jsonl'}:5: not a metrics record; skipped" in caplog.text
    assert run.structure == "dense"


def test_structure_comes_from_the_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"sparsity": {"sparsity": 0.75, "structure": "block", "block_size": 16,
                                                 "algorithm": "rigl", "update": {"freq": 10}}}))
    assert compare.describe_structure(path, sparse=True) == "block 16x16 + rigl"
    path.write_text(yaml.safe_dump({"sparsity": {"structure": "2:4"}}))
    assert compare.describe_structure(path, sparse=True) == "2:4"
    path.write_text("sparsity: {sparsity: 7}")
    assert compare.describe_structure(path, sparse=True) == "?"


def test_bad_runs_are_one_line(tmp_path, capsys):
    assert cli("compare", tmp_path / "missing") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'missing'}: does not exist; give the model_dir of a run (it holds metrics.jsonl)"
    with pytest.raises(UserError, match=r"holds no metrics\.jsonl; is it the model_dir of a training run\?"):
        compare.read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 0, "eval_loss": 1.0}) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl: no train records \(kind 'train'\); compare needs a run that trained"):
        compare.read_run(tmp_path)


def test_out_errors_are_one_line_after_the_table(runs, tmp_path, monkeypatch, capsys, logs):
    monkeypatch.setenv("SPARSETRAIN_LOSS_PNG", "1")
    assert compare.write_loss_png(tmp_path / "missing") is None  # no run there: a log line, no error
    assert "loss.png not drawn:" in logs.text
    monkeypatch.setenv("SPARSETRAIN_LOSS_PNG", "0")
    with pytest.raises(UserError, match=r"--out .*nowhere/x\.png: the directory .*nowhere does not exist"):
        compare.compare_runs([str(runs["dense"])], out=tmp_path / "nowhere" / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    capsys.readouterr()
    assert cli("compare", runs["dense"], "--out", tmp_path / "x.png") == 2
    out, err = capsys.readouterr()
    assert err == "error: --out: drawing needs matplotlib: pip install 'sparsetrain[plot]'\n"
    assert out.splitlines()[1].split()[0] == str(runs["dense"])  # the table stands without the picture
    assert not (tmp_path / "x.png").exists()
    assert compare.write_loss_png(runs["dense"]) is None  # the suite's environment turns it off
    monkeypatch.setenv("SPARSETRAIN_LOSS_PNG", "1")
    assert compare.write_loss_png(runs["dense"]) is None  # matplotlib missing: no picture, no error
    assert "loss.png not drawn: matplotlib is not installed (pip install 'sparsetrain[plot]')" in logs.text


def test_drawing_leaves_pyplot_and_its_backend_alone(runs, tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    assert compare.compare_runs([str(runs["sparse"])], x="time", out=tmp_path / "t.png") == 0
    assert matplotlib.get_backend() == backend
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()


def test_training_time_counts_each_attempts_first_interval_at_the_median_rate():
    """An attempt's first interval holds torch.compile (tens of seconds): counted as logged, a run
    compiled cold starts its curve that much later than one compiled warm in the same process.
    The run's first record and every ``warmup`` one (a resume's first) count at the median rate
    of the others; any other interval, however slow (a dense RigL step, a busy GPU), as logged."""
    train = [{"step": s, "tokens": 1000 * s, "tokens_per_s": rate, **extra}
             for s, rate, extra in ((1, 10.0, {}), (2, 1000.0, {}), (3, 100.0, {}), (4, 5.0, {"warmup": True}),
                                    (5, 1000.0, {}), (6, 1000.0, {}))]
    # the median of 1000, 100, 1000, 1000 is 1000: steps 1 and 4 at it, step 3 at its own 100
    assert compare.training_time(train) == pytest.approx([1.0, 2.0, 12.0, 13.0, 14.0, 15.0])
    assert compare.training_time(train[:1]) == pytest.approx([100.0])  # nothing else to go by: as logged
    assert compare.training_time([]) == []
