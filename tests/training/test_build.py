"""``training/build.py``: what ``setup`` decides -- block-sparse layers on the kernels or masked dense
(and the FLOPs each executes), the compile mode (CUDA graphs for the block kernels) and its log
line, fp32 runs kept masked dense with a warning; on a GPU (``cuda`` marker), training on the
kernels matches masked dense."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.sparsity.block_linear import BlockSparseLinear


def test_cpu_runs_count_dense_executed_flops(tmp_path, tiny_params):
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16}, model={"hidden_size": 64})
    run = tr.setup(params_from_dict(p), tmp_path, evaluate=False, write_metrics=False)
    assert run.block_kernel_layers == []  # no GPU: masked dense, which executes the dense FLOPs
    assert run.executed_flops == run.flops["dense"] > run.flops["sparse"]


@pytest.mark.parametrize(
    ("setting", "kernels", "distributed", "mode"),
    [("auto", True, False, "reduce-overhead"), ("auto", False, False, "default"), ("auto", True, True, "default"),
     ("default", True, False, "default"), ("max-autotune", False, False, "max-autotune")],
)
def test_compile_mode_auto_takes_cuda_graphs_for_the_block_kernels(setting, kernels, distributed, mode):
    from sparsetrain.training.build import compile_mode

    assert compile_mode(setting, kernels, distributed) == mode


@pytest.mark.parametrize("forced", [True, False], ids=["kernel-layers", "masked-dense"])
def test_setup_logs_the_compile_mode_it_chose(tmp_path, tiny_params, monkeypatch, caplog, forced):
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict
    from sparsetrain.training import build

    monkeypatch.setattr(build, "block_kernels_apply", lambda run: forced)  # what CUDA + bf16 decide
    p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16},
                    model={"hidden_size": 64}, runconfig={"compile": True})
    with caplog.at_level("INFO", logger="sparsetrain"):
        tr.setup(params_from_dict(p), tmp_path, evaluate=False, write_metrics=False)
    expected = "mode reduce-overhead, for the block-sparse kernels" if forced else "mode default)"
    assert any(expected in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.cuda
def test_training_with_block_kernels_matches_masked_dense(tmp_path, tiny_params):
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    losses = {}
    for kernels in ("auto", "off"):
        p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16}, model={"hidden_size": 64})
        p["runconfig"].update({"device": "cuda", "max_steps": 20, "compile": False, "sparse_kernels": kernels})
        run = tr.setup(params_from_dict(p), tmp_path / kernels, evaluate=False, write_metrics=False)
        switched = sum(isinstance(m, BlockSparseLinear) for m in run.model.modules())
        assert switched == (12 if kernels == "auto" else 0) == len(run.block_kernel_layers)
        # MFU counts executed FLOPs: the live blocks on the kernels, dense work when masked dense
        expected = run.flops["sparse"] if kernels == "auto" else run.flops["dense"]
        assert run.executed_flops == pytest.approx(expected) and run.flops["sparse"] < run.flops["dense"]
        losses[kernels] = [float(tr.train_step(run)) for _ in range(20)]
        for p_, mask in run.sparsifier._bound:
            assert (p_[~mask] == 0).all()  # the invariant holds on the kernel path too
    torch.testing.assert_close(losses["auto"], losses["off"], rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_fp32_runs_keep_block_weights_masked_dense_with_a_warning(tmp_path, tiny_params, caplog):
    from sparsetrain import training as tr
    from sparsetrain.config import params_from_dict

    p = tiny_params(sparsity={"sparsity": 0.5, "structure": "block", "block_size": 16}, model={"hidden_size": 64})
    p["runconfig"].update({"device": "cuda", "compile": False, "precision": "fp32"})
    with caplog.at_level("WARNING"):
        run = tr.setup(params_from_dict(p), tmp_path, evaluate=False, write_metrics=False)
    assert run.block_kernel_layers == [] and not any(isinstance(m, BlockSparseLinear) for m in run.model.modules())
    assert "block-sparse kernels run in bf16" in caplog.text


def test_fsdp_shards_every_transformer_block(tmp_path, monkeypatch):
    """FSDP2 wraps each decoder layer, then the model: one block's weights gathered at a time."""
    from sparsetrain import distributed
    from sparsetrain.config import params_from_dict
    from sparsetrain.training import build
    from sparsetrain.training.state import Run
    from tests.helpers import tiny_gpt

    model = tiny_gpt()
    wrapped = []
    monkeypatch.setattr(build.dist, "shard", lambda m, blocks: wrapped.extend([*blocks, m]))
    run = Run(params=params_from_dict({}), model_dir=tmp_path, device=torch.device("cpu"), model=model,
              forward=model, tokenizer=None, dist=distributed.DistInfo(world_size=2, mode="fsdp"))
    build._sparsify(run, {}, {})
    assert wrapped == [*model.transformer_decoder.layers, model] and len(wrapped) == 3
