"""The scripts in ``benchmarks/`` without a GPU: kernel names grouped by ``profile_step``, the
occupancy arithmetic of ``kernel_resources``, and a one-line message where a script needs a GPU
or Triton."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import ROOT


def _script(name: str):
    import importlib.util

    path = ROOT / "benchmarks" / f"{name}.py"
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
