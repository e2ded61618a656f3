"""torchrun on 2 GPUs (NCCL): bf16, torch.compile and the block-sparse kernels under DDP and FSDP2
match one GPU, and a 2-GPU checkpoint resumes on one. Needs two CUDA devices; skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import checkpoint_model, launch, records

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

# Width 256 in 64x64 blocks: 4x4 blocks per attention weight, so the kernels take every
# sparsified layer (``plan`` would mark them), and 75% leaves a few live blocks per block-row.
GPU_MODEL = {"hidden_size": 256, "num_hidden_layers": 2, "num_heads": 4, "max_position_embeddings": 256}
KERNEL_LOG = "linear layer(s) run on the block-sparse kernels"


@pytest.fixture(scope="module")
def baselines() -> dict:
    return {}  # one-GPU runs, shared by the DDP and FSDP tests of the same settings


@pytest.fixture
def gpu_params(tiny_params, write_params):
    return write_params(
        tiny_params(
            train_input={"batch_size": 8, "max_sequence_length": 128},
            eval_input={"batch_size": 8, "max_sequence_length": 128},
            model=GPU_MODEL,
            optimizer={"grad_accum_steps": 2},
            runconfig={"max_steps": 6, "checkpoint_steps": 6, "device": "cuda", "precision": "bf16"},
            sparsity={"sparsity": 0.75, "structure": "block", "block_size": 64},
        )
    )


def _one_gpu(baselines: dict, key: str, params, root, *sets: str):
    if key not in baselines:
        out = root / f"one-{key}"
        r = launch(1, params, out, *sets, timeout=600)
        assert r.returncode == 0, r.stderr
        assert KERNEL_LOG in r.stderr
        baselines[key] = out
    return baselines[key]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_block_kernels_on_two_gpus_match_one(tmp_path_factory, baselines, gpu_params, mode, compiled):
    sets = (f"runconfig.compile={str(compiled).lower()}",)
    root = tmp_path_factory.mktemp("gpu")
    one = _one_gpu(baselines, f"compile={compiled}", gpu_params, root, *sets)
    two = root / f"two-{mode}"
    r = launch(2, gpu_params, two, f"runconfig.distributed={mode}", *sets, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{mode.upper()} x2" in r.stderr and KERNEL_LOG in r.stderr
    la = [x["loss"] for x in records(one, "train")]
    lb = [x["loss"] for x in records(two, "train")]
    assert len(la) == len(lb) == 6
    torch.testing.assert_close(la, lb, rtol=2e-2, atol=2e-2)  # bf16, and autotune may pick other tiles per rank
    ma, mb = checkpoint_model(one / "checkpoint_6.mdl"), checkpoint_model(two / "checkpoint_6.mdl")
    assert any(torch.isnan(v).any() for v in mb.values())
    for k in ma:
        assert torch.equal(torch.isnan(ma[k]), torch.isnan(mb[k])), k  # the same block masks, NaN format


def test_two_gpu_checkpoint_resumes_on_one(tmp_path_factory, baselines, gpu_params):
    """FSDP on 2 GPUs for 3 steps, then the same model_dir on 1 GPU to step 6: the losses of
    steps 4-6 follow the straight one-GPU run."""
    root = tmp_path_factory.mktemp("resume")
    straight = _one_gpu(baselines, "compile=False", gpu_params, root, "runconfig.compile=false")
    d = root / "two-then-one"
    r = launch(2, gpu_params, d, "runconfig.distributed=fsdp", "runconfig.compile=false",
                "runconfig.max_steps=3", "runconfig.checkpoint_steps=3", timeout=600)
    assert r.returncode == 0, r.stderr
    r = launch(1, gpu_params, d, "runconfig.compile=false", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "(step 3)" in r.stderr
    resumed = [x["loss"] for x in records(d, "train") if x["step"] > 3]
    reference = [x["loss"] for x in records(straight, "train") if x["step"] > 3]
    assert len(resumed) == len(reference) == 3
    torch.testing.assert_close(resumed, reference, rtol=2e-2, atol=2e-2)
