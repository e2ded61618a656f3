"""``bench/train.py``: ``sparsetrain bench train`` on the CPU (tiny preset: the plain-loop reference,
dense and sparse, their ratios), and the optimizer-state bytes it counts for layers storing live
blocks."""

from __future__ import annotations

import json

import pytest

from sparsetrain import training as tr
from sparsetrain.bench import train as bench
from sparsetrain.cli import main
from sparsetrain.config import params_from_dict
from sparsetrain.sparsity.block_linear import packed_layers
from sparsetrain.training import build

TINY_BENCH = ["--preset", "gpt2-tiny", "--batch_size", "2", "--seq_len", "32", "--steps", "2", "--warmup", "1",
              "--compile", "false", "--device", "cpu", "--json"]  # fmt: skip


def test_bench_train_reports_reference_dense_and_sparse(capsys):
    assert main(["bench", "train", *TINY_BENCH, "--sparsity", "0.75"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # progress goes to stderr, so stdout stays JSON
    assert "bench: ours, sparse 0.75 (unstructured)" in captured.err
    for key in ("reference", "dense", "sparse"):
        assert out[key]["ms_per_step"] > 0 and out[key]["tokens_per_s"] > 0
    r = out["ratios"]
    assert r["sparse_step_time_over_dense"] == pytest.approx(out["sparse"]["ms_per_step"] / out["dense"]["ms_per_step"])
    # Packed AdamW state at 75%: 2 x 4 bytes per kept entry, plus 1 bit and 4 bytes per 1024 entries.
    assert r["sparse_weight_state_bytes_over_dense"] == pytest.approx((2 * 4 * 0.25 + 1 / 8 + 4 / 1024) / 8, abs=2e-3)
    assert r["flops_ratio_dense_over_sparse"] > 1.0


def test_bench_counts_the_state_of_weights_stored_as_blocks(tmp_path, tiny_params, monkeypatch):
    """With the block kernels, sparsified layers store live blocks only: their AdamW state is
    2 x 4 bytes per live entry, and the bench must count it (it is not in the bitmask part)."""
    raw = tiny_params(sparsity={"sparsity": 0.75, "structure": "block", "block_size": 16})
    monkeypatch.setattr(build, "block_kernels_apply", lambda run: True)  # the CUDA + bf16 decision, forced
    run = tr.setup(params_from_dict(raw), tmp_path, evaluate=False, write_metrics=False)
    tr.train_step(run)
    layers = packed_layers(run.model)
    assert layers and set(layers) == set(run.sparsifier.masks)
    live = sum(m.weight_blocks.numel() for m in layers.values())
    assert live == pytest.approx(0.25 * sum(m.numel() for m in run.sparsifier.masks.values()), rel=0.05)
    steps = 4 * len(layers)  # AdamW's scalar step tensor per parameter
    assert bench._sparsified_state_bytes(run) == 2 * 4 * live + steps
