"""Fixtures of the Hugging Face tests: checkpoints of tiny GPTs in our format, made directly
(every model variant in a fraction of a second). Plain helpers are in :mod:`tests.hf.helpers`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain.config import params_from_dict
from sparsetrain.model import GPT
from sparsetrain.sparsity.nan_format import encode_state_dict
from tests.helpers import BLOCK_MATRICES
from tests.hf.helpers import WIDE_INIT


@pytest.fixture
def make_checkpoint(tmp_path: Path, tiny_params):
    """A factory: make_checkpoint(sparsity=0.5, seed=0, **model_keys) -> the path of a
    checkpoint in our format (NaN at the pruned positions of the 12 block matrices, random masks)
    of the tiny model (byte vocabulary), in a model_dir of its own."""
    count = 0

    def make(sparsity: float = 0.5, seed: int = 0, **model) -> Path:
        nonlocal count
        count += 1
        params = params_from_dict(tiny_params(model={"vocab_size": 256, **WIDE_INIT, **model}))
        torch.manual_seed(seed)
        state = GPT(params.model).state_dict()
        masks = {n: torch.rand(state[n].shape) >= sparsity for n in BLOCK_MATRICES} if sparsity else {}
        path = ckpt.checkpoint_path(tmp_path / f"run{count}", 7)
        path.parent.mkdir()
        raw = {"model": encode_state_dict(state, masks), "global_step": 7, "params": params.to_dict(), "writer": ckpt.WRITER}
        ckpt.save_checkpoint(raw, path)
        return path

    return make
