"""Shared fixtures, for every test under ``tests/``: a tiny params file (2 layers, width 32) on a
small text corpus, ``write_params``, ``one_thread``, ``logs``, and the ``cuda`` marker's skip.

Plain helpers (paths, the tiny GPT, the toy modules, ``cli``) are in :mod:`tests.helpers`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import ROOT

TINY = {
    "train_input": {"source": "text", "batch_size": 4, "max_sequence_length": 32},
    "eval_input": {"source": "text", "batch_size": 4, "max_sequence_length": 32},
    "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "max_position_embeddings": 64},
    "optimizer": {"optimizer_type": "AdamW", "learning_rate": 0.003, "weight_decay_rate": 0.1, "max_gradient_norm": 1.0},
    "runconfig": {"max_steps": 4, "log_steps": 1, "eval_steps": 2, "seed": 3, "progress": False},
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_loss_png(monkeypatch):
    """Trainings draw no model_dir/loss.png (a fifth of a second each, hundreds of trainings
    here); tests/test_compare.py turns it back on where it is the subject."""
    monkeypatch.setenv("SPARSETRAIN_LOSS_PNG", "0")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A directory of small text files, enough for train and eval splits."""
    return make_corpus(tmp_path / "corpus")


def make_corpus(d: Path) -> Path:
    """``d``: 40 small text files (the package's own sources), the ``corpus`` fixture's content."""
    d.mkdir()
    src = sorted((ROOT / "src" / "sparsetrain").rglob("*.py"))
    for i in range(40):
        text = src[i % len(src)].read_text()
        (d / f"doc_{i:03d}.txt").write_text(f"# document {i}\n" + text)
    return d


@pytest.fixture
def tiny_params(corpus: Path):
    """A factory: tiny_params(**section_overrides) -> params dict using the small corpus."""
    return params_factory(corpus)


def params_factory(corpus: Path):
    """``tiny_params``' factory on ``corpus``, for a module-scoped fixture (on a ``make_corpus``)."""

    def make(**sections) -> dict:
        p = copy.deepcopy(TINY)
        for inp in ("train_input", "eval_input"):
            p[inp]["data_path"] = str(corpus)
        for name, values in sections.items():
            if values is None:
                p.pop(name, None)
            elif isinstance(values, dict) and isinstance(p.get(name), dict):
                p[name].update(values)
            else:
                p[name] = values
        return p

    return make


@pytest.fixture
def write_params(tmp_path: Path):
    def write(params: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a small, shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def logs(caplog):
    """``caplog`` that also sees ``sparsetrain`` records (the CLI's logging setup stops propagation)."""
    import logging

    logger = logging.getLogger("sparsetrain")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="sparsetrain")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(autouse=True)
def no_stale_log_handlers():
    """An earlier in-process CLI run leaves a handler on a stream pytest has closed since: drop it."""
    import logging

    logger = logging.getLogger("sparsetrain")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    yield
