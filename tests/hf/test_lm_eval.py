"""An exported directory in EleutherAI's lm-evaluation-harness: ``HFLM`` loads it from disk (no
hub, no downloads) and its ``loglikelihood`` of two requests is the log-probability our own model
gives the continuations, token for token."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.data.tokenizers import ByteTokenizer
from sparsetrain.hf import export_hf
from tests.hf.helpers import our_model

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
Instance = pytest.importorskip("lm_eval.api.instance").Instance

pytestmark = pytest.mark.usefixtures("one_thread")

REQUESTS = [("def main(", "):\n    return 0"), ("import os\nprint(", "os.getcwd())")]


def our_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation | context) under our model, and whether greedy decoding would
    produce the continuation (lm_eval's second value)."""
    tok = ByteTokenizer()
    ctx, cont = tok.encode(context), tok.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0, len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool(torch.equal(logp.argmax(-1), target))


def test_hflm_loglikelihood_is_ours(make_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = make_checkpoint(sparsity=0.5)
    export_hf(path, tmp_path / "hf")
    lm = lm_eval_hf.HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1, dtype="float32")
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(REQUESTS)]
    theirs = lm.loglikelihood(requests)
    ours = our_model(path)
    for (ll, greedy), pair in zip(theirs, REQUESTS):
        expected, expected_greedy = our_loglikelihood(ours, *pair)
        assert ll == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert greedy == expected_greedy
