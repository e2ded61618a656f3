"""``training/loop.py``: the logged training record (MFU per GPU under torchrun)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparsetrain.distributed import DistInfo
from sparsetrain.training import loop


def test_mfu_is_per_gpu():
    """tokens/s counts every rank's tokens: MFU divides by the GPUs' total peak."""
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    flops = {"sparse": 1e9, "dense": 2e9, "ratio": 2.0}
    one = SimpleNamespace(flops=flops, executed_flops=2e9, scheduler=scheduler, step=10, dist=DistInfo(), flops_done=1e13)
    two = SimpleNamespace(**{**vars(one), "dist": DistInfo(rank=0, world_size=2, mode="ddp")})
    r1 = loop.train_record(one, 1.0, 1e5, 1024, 1e15)
    r2 = loop.train_record(two, 1.0, 2e5, 1024, 1e15)  # twice the tokens on twice the GPUs
    assert r1["mfu"] == pytest.approx(0.2)
    assert r2["mfu"] == pytest.approx(r1["mfu"])


def test_evaluation_scores_every_window_of_the_split_the_tail_too(tmp_path):
    """``eval_steps`` unset means the whole eval split: the windows after the last full batch
    count too (padded to the batch's shape with rows that count nowhere), and padding does not
    turn plain text into "completion" tokens."""
    import torch.nn.functional as F

    from sparsetrain import training as tr
    from sparsetrain.config.params import load_params

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 21)  # 945 bytes: 29 windows of 32 + 1
    yaml = tmp_path / "params.yaml"
    yaml.write_text("model: {preset: gpt2-tiny, hidden_size: 32, num_hidden_layers: 1, num_heads: 2, vocab_size: 256,"
                    " max_position_embeddings: 32}\n"
                    f"train_input: {{source: text, tokenizer: byte, data_path: {corpus}, split: all, max_sequence_length: 32}}\n"
                    f"eval_input: {{source: text, data_path: {corpus}, split: all, batch_size: 4, max_sequence_length: 32}}\n"
                    "runconfig: {compile: false}\n")
    params = load_params(yaml, [])
    run = tr.setup(params, tmp_path / "run", train=False, evaluate=True, write_metrics=False)
    windows = run.eval_tokens.num_windows(32)
    assert windows % 4 != 0  # a split that is not a whole number of batches
    xs, ys = zip(*(run.eval_tokens.rows([i], 32) for i in range(windows)))
    with torch.no_grad():
        logits = run.model(torch.as_tensor(np.concatenate(xs)))
        want = float(F.cross_entropy(logits.flatten(0, 1), torch.as_tensor(np.concatenate(ys)).flatten()))
    grad_modes = []
    run.model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    record = tr.evaluate(run)
    assert grad_modes and not any(grad_modes)  # evaluation keeps no activations for a backward
    assert record["eval_tokens"] == windows * 32
    assert record["eval_loss_tokens"] == "all"
    assert record["eval_loss"] == pytest.approx(want, rel=1e-5)


def test_train_records_mark_each_attempts_first_interval_and_leave_saves_and_evals_out(
        tiny_params, write_params, tmp_path, monkeypatch):
    """Every attempt's first ``train`` record says ``warmup`` (its interval holds the compilation;
    ``compare.training_time`` counts it at the median rate), and a checkpoint or evaluation
    between steps does not slow the next interval's tokens/s (here each takes 0.5 s)."""
    import json
    import time

    from sparsetrain import training as tr
    from sparsetrain.config.params import load_params

    save, evaluate = loop.save, loop.evaluate
    monkeypatch.setattr(loop, "save", lambda run: (time.sleep(0.5), save(run))[1])
    monkeypatch.setattr(loop, "evaluate", lambda run: (time.sleep(0.5), evaluate(run))[1])
    model_dir = tmp_path / "run"

    def attempt(max_steps):
        params = load_params(write_params(tiny_params(runconfig={"max_steps": max_steps, "log_steps": 1,
                                                                 "checkpoint_steps": 1, "eval_steps": 1})), [])
        run = tr.setup(params, model_dir, train=True, evaluate=True)
        loop.fit(run, do_eval=True, eval_frequency=1)
        run.metrics.close()

    attempt(3)
    attempt(5)  # a resume from step 3
    train = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r.get("warmup", False) for r in train] == [True, False, False, True, False]
    tokens_per_step = train[0]["tokens"]
    for r in train:
        if not r.get("warmup"):
            assert tokens_per_step / r["tokens_per_s"] < 0.4, r  # a step of this model takes milliseconds
