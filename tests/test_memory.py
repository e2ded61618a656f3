"""``memory.py``: the training-state bytes ``plan`` reports equal what a run really holds after a
step (CPU, tiny model), and the formula behind them."""

from __future__ import annotations

import pytest
import torch

from sparsetrain import tools
from sparsetrain import training as tr
from sparsetrain.config import params_from_dict
from sparsetrain.memory import packed_mask_bytes, training_state_bytes
from sparsetrain.training import build


def _held_bytes(run) -> int:
    """fp32 weights, gradients and optimizer state tensors (scalars left out, as in the estimate),
    plus the packed optimizer's mask layouts."""
    params = list({id(p): p for p in run.model.parameters()}.values())
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for state in run.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.ndim)
    total += sum(pack.nbytes for pack in getattr(run.optimizer, "_packs", {}).values())
    return total


def _run(tmp_path, tiny_params, **sections):
    params = params_from_dict(tiny_params(**sections))
    run = tr.setup(params, tmp_path, evaluate=False, write_metrics=False)
    tr.train_step(run)
    return params, run


@pytest.mark.parametrize(
    "sections",
    [
        {"sparsity": None},
        {"sparsity": {"sparsity": 0.75}},
        {"sparsity": {"sparsity": 0.75}, "optimizer": {"packed_state": False}},
        {"sparsity": {"sparsity": 0.5}, "optimizer": {"optimizer_type": "SGD", "momentum": 0.9}},
        {"sparsity": {"sparsity": 0.5, "structure": "block", "block_size": 16}},
    ],
    ids=["dense", "adamw-packed", "adamw-dense-state", "sgd-momentum", "block-masked-dense"],
)
def test_plan_matches_what_a_cpu_run_holds(tmp_path, tiny_params, sections):
    params, run = _run(tmp_path, tiny_params, **sections)
    memory = tools.plan(params)["training_state_bytes"]
    expected = memory["dense"] if params.sparsity is None else memory["masked_dense"]
    assert _held_bytes(run) == expected
    if params.sparsity is not None:
        assert memory["masked_dense"] < memory["dense"] or not params.optimizer.packed_state


def test_plan_matches_a_run_storing_live_blocks(tmp_path, tiny_params, monkeypatch):
    monkeypatch.setattr(build, "block_kernels_apply", lambda run: True)  # what CUDA + bf16 decide
    params, run = _run(tmp_path, tiny_params, sparsity={"sparsity": 0.75, "structure": "block", "block_size": 16})
    memory = tools.plan(params)["training_state_bytes"]
    assert memory["block_kernels"] is not None
    assert _held_bytes(run) == memory["block_kernels"] < memory["masked_dense"] < memory["dense"]


def test_state_bytes_formula():
    rows = [{"numel": 4096, "kept": 1024, "gpu_kernels": True}, {"numel": 1000, "kept": 500, "gpu_kernels": False}]
    assert packed_mask_bytes(1000) == 1024 // 8 + 4 and packed_mask_bytes(4096) == 4096 // 8 + 16
    # AdamW, packed state: kernel layer (8 + 8) x kept; the other 8 x numel + 8 x kept + mask; 10 dense entries
    assert training_state_bytes(rows, 10, state_per_entry=8, packed_state=True, kernels=True) == (
        16 * 1024 + (8 * 1000 + 8 * 500 + 132) + 16 * 10
    )
    assert training_state_bytes(rows, 0, state_per_entry=0, packed_state=False, kernels=False) == 8 * 5096


def test_plan_prints_the_training_state(tiny_params, write_params, capsys):
    from sparsetrain.cli import main

    path = write_params(tiny_params(sparsity={"sparsity": 0.75}))
    assert main(["plan", "--params", str(path)]) == 0
    assert "training state (fp32 weights, gradients, optimizer; not activations): dense" in capsys.readouterr().out
