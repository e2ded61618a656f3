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
    sys.modules[spec.name] = module  # dataclasses look their module up there
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


def test_spdf_study_holds_the_downstream_packages_out_of_pre_training(tmp_path):
    study = _script("spdf_study")
    root = tmp_path / "lib"
    for rel in ("os.py", "email/message.py", "email/mime/text.py", "json/decoder.py", "http/client.py",
                "xml/dom/minidom.py", "asyncio/events.py", "test/test_os.py", "asyncio/test_x.py", "README.txt",
                "site-packages/pkg/mod.py", "jsonrpc.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    pre, down = study.split_stdlib(tmp_path / "data", root)

    def listed(d):
        return sorted(p.relative_to(d).as_posix() for p in d.rglob("*.py"))

    assert listed(down) == ["email/message.py", "email/mime/text.py", "http/client.py", "json/decoder.py",
                            "xml/dom/minidom.py"]
    assert listed(pre) == ["asyncio/events.py", "jsonrpc.py", "os.py"]  # a top-level module named like one stays
    assert (pre / "os.py").resolve() == (root / "os.py").resolve()
    study.split_stdlib(tmp_path / "data", root)  # a second call (a rerun into the same --out) changes nothing
    assert listed(pre) == ["asyncio/events.py", "jsonrpc.py", "os.py"]


def test_spdf_study_scales_steps_to_equal_flops_and_equal_time():
    study = _script("spdf_study")
    assert study.arm_steps("steps", 1500) == 1500
    assert study.arm_steps("flops", 1500, flops_ratio=2.2) == 3300
    assert study.arm_steps("time", 1500, rate=650_000.0, dense_rate=500_000.0) == 1950  # 1.3x the tokens/s
    assert study.arm_steps("time", 1500, rate=400_000.0, dense_rate=500_000.0) == 1200
    dense = study.Result(768, 0, "dense", 1500, 60.0, 1e15, 5e5, 1.0, 0.93, 0.98, 0.82, [0.81, 0.805])
    block = study.Result(768, 0, "block_time", 1950, 60.0, 6e14, 6.5e5, 1.7, 0.95, 0.99, 0.84, [])
    table = study.format_table([dense, block]).splitlines()
    assert table[2] == "| 768 | 0 | dense | 1500 | 60.0 | 1e+15 | 0.9300 | 0.9800 | 0.8200 | +0.0000 | 0.8050-0.8100 |"
    assert table[3].endswith("| 0.9500 | 0.9900 | 0.8400 | +0.0200 | - |")


def test_spdf_study_default_arms_by_width():
    """By default the widest width runs every arm of the product, narrower widths the arms whose
    speed depends on the width (dense, blocks, 2:4), and the plain loop only when asked for;
    --arms names the arms of every width."""
    study = _script("spdf_study")
    assert study.width_arms(None, 1024, [768, 1024]) == list(study.WIDEST_ARMS)
    assert study.width_arms(None, 768, [768, 1024]) == ["dense", "block", "block_time", "nm", "nm_time"]
    assert "nanogpt_loop" not in study.WIDEST_ARMS and "unstructured_flops" in study.WIDEST_ARMS
    assert study.width_arms(None, 768, [768]) == list(study.WIDEST_ARMS)  # the only width is the widest
    assert study.width_arms(["dense", "nanogpt_loop"], 768, [768, 1024]) == ["dense", "nanogpt_loop"]


def test_spdf_study_repeats_at_later_seeds_only_the_close_arms():
    study = _script("spdf_study")

    def r(arm, after):
        return study.Result(1024, 0, arm, 300, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, after, [])

    first = [r("dense", 1.327), r("block", 1.546), r("nm", 1.314), r("unstructured", 1.638),
             r("block_time", 1.268), r("nm_time", 1.323), r("unstructured_flops", 1.048), r("nanogpt_loop", 1.315)]
    arms = [x.arm for x in first]
    # block is 0.22 from dense but block_time (0.059) is scaled from its tokens/s: it comes along
    assert study.repeat_arms(arms, first, 0.1) == ["dense", "block", "nm", "block_time", "nm_time", "nanogpt_loop"]
    assert study.repeat_arms(arms, first, 0.02) == ["dense", "nm", "nm_time", "nanogpt_loop"]
    assert study.repeat_arms(arms, first, 0.0) == ["dense"]
    assert study.repeat_arms(arms, first, 1.0) == arms
    assert study.repeat_arms(["block"], [r("block", 1.5)], 0.1) == ["block"]  # no dense to compare with: repeat


def test_spdf_study_resumes_from_its_results_file_with_the_same_settings(tmp_path):
    import json

    study = _script("spdf_study")
    done = study.Result(768, 1, "nm", 300, 10.0, 1e15, 5e5, 1.9, 1.3, 1.5, 1.4, [], {"pretrain": 12.0})
    same = {"steps": 300, "ft_steps": 100, "sets": []}
    lines = [{**done.__dict__, "settings": same},
             {**done.__dict__, "arm": "dense", "settings": {**same, "steps": 200}},  # another study's
             {**done.__dict__, "arm": "block"}]  # written before settings were kept: not trusted
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    assert study.kept_results(path, same) == {(768, 1, "nm"): done}
    assert study.kept_results(path, {**same, "sets": ["model.preset=gpt2-tiny"]}) == {}
    assert study.kept_results(tmp_path / "absent.jsonl", same) == {}
    with open(path, "a") as f:
        f.write('{"width": 768, "se')  # torn: the study was killed while writing
    study.append_result(path, done, same)  # a line of its own after the torn one
    assert study.kept_results(path, same) == {(768, 1, "nm"): done}
    assert path.read_text().splitlines()[-2:] == ['{"width": 768, "se', json.dumps({**done.__dict__, "settings": same})]


def test_spdf_study_keeps_a_study_of_other_settings_out_of_its_out(tmp_path):
    """Finished runs under OUT are read back as done: a study of other settings must not get them."""
    import argparse

    study = _script("spdf_study")
    a = argparse.Namespace(steps=300, ft_steps=100, sets=[], both_estimators=False)
    settings = study.study_settings(a, "NVIDIA H200")
    assert settings == {"steps": 300, "ft_steps": 100, "sets": [], "both_estimators": False, "device": "NVIDIA H200",
                        "format": study.RESULTS_FORMAT}
    study.claim_out(tmp_path / "out", settings)
    study.claim_out(tmp_path / "out", settings)  # the same study again: resumes
    tiny = study.study_settings(argparse.Namespace(**{**vars(a), "sets": ["model.preset=gpt2-tiny"]}), "NVIDIA H200")
    with pytest.raises(SystemExit, match=r"out holds runs of other settings \(sets: \[\] -> \['model.preset=gpt2-tiny'\]\); "
                                         r"give another --out"):
        study.claim_out(tmp_path / "out", tiny)


def test_spdf_study_scores_the_plain_loop_with_our_estimator(tmp_path):
    """The plain loop's models are scored by ``whole_split_loss``, which must be our evaluation
    (every window once, the mean over tokens): run on our own model it gives our eval_loss."""
    import torch.nn.functional as F

    from sparsetrain import data
    from sparsetrain import training as tr
    from sparsetrain.config.params import load_params

    study = _script("spdf_study")
    pre, _ = study.split_stdlib(tmp_path / "data")
    sets = ["model.preset=gpt2-tiny", "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_heads=2",
            "train_input.batch_size=4", "eval_input.batch_size=4", "train_input.max_sequence_length=32",
            "eval_input.max_sequence_length=32", "model.max_position_embeddings=32", f"train_input.data_path={pre}",
            f"eval_input.data_path={pre}", "runconfig.max_steps=2", "eval_input.eval_fraction=0.01",
            "train_input.eval_fraction=0.01"]
    params = load_params(study.CONFIG, sets)
    run = tr.setup(params, tmp_path / "run", train=False, evaluate=True, write_metrics=False)
    ours = tr.evaluate(run)["eval_loss"]

    def loss_of(x, y):
        return float(F.cross_entropy(run.model(x).flatten(0, 1), y.flatten()))

    assert study.whole_split_loss(loss_of, run.eval_tokens, params.eval_input) == pytest.approx(ours, rel=1e-5)
    draws = study.random_batches_loss(loss_of, run.eval_tokens, params.eval_input, batches=3, draws=2)
    assert len(draws) == 2 and draws[0] != draws[1]  # draws differ in their windows
    x, _ = data.get_batch(run.eval_tokens, 4, 32, seed=0, step=0, shuffle=True, section="eval_input")
    assert x.shape == (4, 32)


def test_spdf_study_takes_an_interrupted_run_for_unfinished(tmp_path):
    """A run stopped by SIGTERM exits 0 with an earlier checkpoint: the study must not read it as
    done (nor, on a rerun, skip it)."""
    study = _script("spdf_study")
    (tmp_path / "checkpoint_40.mdl").write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 40}\n')
    assert not study._trained(tmp_path, 100)
    with pytest.raises(SystemExit, match=r"stopped before step 100 \(interrupted\?\).*run the same command again"):
        study._check_trained(tmp_path, 100, tmp_path / "x.log")
    (tmp_path / "checkpoint_100.mdl").write_bytes(b"")
    assert not study._trained(tmp_path, 100)  # no eval after it yet
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 100, "eval_loss": 1.0}\n')
    assert study._trained(tmp_path, 100)
