"""``training/step.py``: one optimizer step over micro-batches -- with CUDA graphs each micro-batch's
gradients are copied out of the graph pool before the next (forced on the CPU, and on a GPU under
``cuda``), and compiled steps with CUDA graphs match eager ones."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.config import params_from_dict
from sparsetrain.training import setup, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradients_copied_out_between_micro_batches_under_cuda_graphs(tmp_path, tiny_params, monkeypatch):
    """With CUDA graphs the step copies each micro-batch's gradients out of the graph pool before
    the next one (training.step._own_gradients). On the CPU no graph exists, so the copy path is forced
    here: it must run once per extra micro-batch and train exactly as the plain accumulation."""
    from sparsetrain.training import step as tr

    calls = []
    real = tr._own_gradients
    monkeypatch.setattr(tr, "_own_gradients", lambda model: (calls.append(1), real(model)))
    losses, weights = {}, {}
    for forced in (False, True):
        params = params_from_dict(
            tiny_params(
                sparsity={"sparsity": 0.75},
                runconfig={"device": "cpu", "progress": False, "eval_steps": 1, "max_steps": 3},
                optimizer={"grad_accum_steps": 2},
            )
        )
        run = setup(params, tmp_path / str(forced), evaluate=False, write_metrics=False)
        run.cuda_graphs = forced
        losses[forced] = [float(train_step(run)) for _ in range(3)]
        weights[forced] = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    assert len(calls) == 3  # 2 micro-batches per step: one copy per step, forced run only
    assert losses[True] == losses[False]
    for n in weights[False]:
        assert torch.equal(weights[True][n], weights[False][n]), n


@pytest.mark.cuda
@pytest.mark.parametrize("accum", [1, 2])
def test_compiled_training_on_the_kernels_takes_cuda_graphs_and_matches(tmp_path, tiny_params, caplog, accum):
    """The default compile_mode (auto) with layers on the kernels: CUDA graphs (reduce-overhead)
    over the custom op and live-block storage, against eager masked dense; with 2 micro-batches
    the first one's gradients must survive the second replay."""
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    losses = {}
    for kernels, compiled in (("auto", True), ("off", False)):
        p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16}, model={"hidden_size": 64})
        p["runconfig"].update({"device": "cuda", "compile": compiled, "sparse_kernels": kernels})
        p["optimizer"]["grad_accum_steps"] = accum
        with caplog.at_level("INFO", logger="sparsetrain"):
            run = tr.setup(params_from_dict(p), tmp_path / kernels, evaluate=False, write_metrics=False)
        losses[kernels] = [float(tr.train_step(run)) for _ in range(20)]
    assert "mode reduce-overhead, for the block-sparse kernels" in caplog.text
    torch.testing.assert_close(losses["auto"], losses["off"], rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_dense_cuda_graphs_with_micro_batches_match_eager(tmp_path, tiny_params):
    """compile_mode reduce-overhead with gradient accumulation, no sparsity: same losses as eager."""
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    losses = {}
    for compiled in (True, False):
        p = tiny_params(model={"hidden_size": 64})
        p.pop("sparsity", None)
        p["runconfig"].update({"device": "cuda", "compile": compiled, "compile_mode": "reduce-overhead"})
        p["optimizer"]["grad_accum_steps"] = 2
        run = tr.setup(params_from_dict(p), tmp_path / str(compiled), evaluate=False, write_metrics=False)
        assert run.cuda_graphs == compiled
        losses[compiled] = [float(tr.train_step(run)) for _ in range(10)]
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=2e-2)
