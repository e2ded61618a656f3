"""``sparsetrain bench train`` on the CPU (tiny preset), the bench's optimizer-state bytes for
layers storing live blocks, and MFU per GPU under torchrun."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from sparsetrain import training as tr
from sparsetrain.bench import train as bench
from sparsetrain.cli import main
from sparsetrain.config import params_from_dict
from sparsetrain.distributed import DistInfo
from sparsetrain.sparsity.block_linear import packed_layers
from sparsetrain.training import build, loop

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


def test_mfu_is_per_gpu():
    """tokens/s counts every rank's tokens: MFU divides by the GPUs' total peak."""
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    flops = {"sparse": 1e9, "dense": 2e9, "ratio": 2.0}
    one = SimpleNamespace(flops=flops, executed_flops=2e9, scheduler=scheduler, step=10, dist=DistInfo())
    two = SimpleNamespace(**{**vars(one), "dist": DistInfo(rank=0, world_size=2, mode="ddp")})
    r1 = loop.train_record(one, 1.0, 1e5, 1024, 1e15)
    r2 = loop.train_record(two, 1.0, 2e5, 1024, 1e15)  # twice the tokens on twice the GPUs
    assert r1["mfu"] == pytest.approx(0.2)
    assert r2["mfu"] == pytest.approx(r1["mfu"])


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("kernel", "group"),
    [
        ("_forward_kernel", "block-sparse forward"),
        ("_wgrad_kernel", "block-sparse weight grad"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM (cuBLAS)"),
        ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", "GEMM (cuBLAS)"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("triton_per_fused__to_copy_add_native_layer_norm_0", "Triton fused (inductor)"),
        ("void at::native::elementwise_kernel<128, 2>", "other"),
    ],
)
def test_profile_step_groups_kernels_by_their_names(kernel, group):
    assert _script("profile_step").group_of(kernel) == group


@pytest.mark.parametrize("name", ["profile_step", "one_product", "kernel_configs", "kernel_variants"])
def test_gpu_scripts_say_what_they_need_in_one_line(name, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the message is for machines without a GPU")
    assert _script(name).main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    ("regs", "shared", "warps", "per_sm"),
    [(154, 65556, 4, 3), (90, 65556, 8, 2), (90, 131092, 8, 1), (163, 98328, 4, 2), (90, 49172, 4, 4)],
)
def test_kernel_resources_programs_per_sm_is_the_tightest_limit(regs, shared, warps, per_sm):
    # the figures of the fifth session's offline compile, as Nsight Compute reported them on the H200
    assert _script("kernel_resources").programs_per_sm(regs, shared, warps) == per_sm


def test_kernel_resources_without_triton_says_so_in_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    assert _script("kernel_resources").main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


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
