"""``bench/layer.py``: ``sparsetrain bench layer`` -- the sweep's order and saves, a saved table shown,
errors in one line, and a run on a GPU (``cuda`` marker)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT


def test_sweep_measures_every_shape_and_sparsity_and_saves_after_each(tmp_path, monkeypatch):
    from sparsetrain.bench import layer as bench_layer

    monkeypatch.setattr(bench_layer.torch.cuda, "get_device_name", lambda: "test GPU")
    monkeypatch.setattr(bench_layer, "triton", SimpleNamespace(__version__="0"))
    path = tmp_path / "sweep.json"
    shown, saved = [], []

    def measure(n, k, sp):
        saved.append(len(json.loads(path.read_text())["results"]) if path.exists() else 0)
        return {"shape": f"{n}x{k}", "sparsity": sp}

    out = bench_layer.sweep("8x4,2x2", "0,0.5", measure, shown.append, str(path))
    order = [("8x4", 0.0), ("8x4", 0.5), ("2x2", 0.0), ("2x2", 0.5)]
    assert [(r["shape"], r["sparsity"]) for r in out] == order
    assert shown == out and saved == [0, 1, 2, 3]  # the file held every earlier result
    doc = json.loads(path.read_text())
    assert doc["results"] == out and doc["gpu"] == "test GPU"


SAVED_LAYER_BENCHES = ROOT / "benchmarks" / "results" / "bench_layer.jsonl"


def test_bench_layer_show_prints_a_saved_table(tmp_path, capsys):
    from sparsetrain.cli import main

    runs = {r["label"]: r for r in map(json.loads, SAVED_LAYER_BENCHES.read_text().splitlines())}
    saved = tmp_path / "b128.json"  # the --json file that run wrote, as recorded
    saved.write_text(json.dumps(runs["b128"]["result"]))
    assert main(["bench", "layer", "--show", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "8192x2048" in out and "2.66x" in out and "cuSPARSELt" in out


def test_bench_layer_errors_are_one_line(tmp_path, capsys):
    from sparsetrain.cli import main

    (tmp_path / "x.json").write_text("[1, 2]")
    assert main(["bench", "layer", "--show", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    if not torch.cuda.is_available():
        assert main(["bench", "layer"]) == 2
        assert "needs a CUDA GPU and Triton" in capsys.readouterr().err


@pytest.mark.cuda
def test_bench_layer_runs_on_the_gpu(tmp_path, capsys):
    from sparsetrain.cli import main

    out = tmp_path / "layer.json"
    args = ["bench", "layer", "--shapes", "256x512", "--sparsity", "0,0.5", "--block_size", "64", "--tokens", "1024"]
    assert main([*args, "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [r["sparsity"] for r in saved["rows"]] == [0.0, 0.5]
    assert all(r["rel_err"] < 2e-2 and r["fwd_ours_ms"] > 0 for r in saved["rows"])
    assert main(["bench", "layer", "--shapes", "100x128", "--block_size", "64"]) == 2  # not a multiple
