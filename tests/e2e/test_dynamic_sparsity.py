"""Dynamic sparsity end to end on the tiny model (2 layers, width 32): GMP, SET and RigL change the
masks at update steps only, with exact counts; regrown weights and their optimizer state start at
0; RigL's dense gradient is right with gradient accumulation; a run killed across an update step
resumes exactly; records reach metrics.jsonl; two processes (DDP, FSDP) agree."""

from __future__ import annotations

import pytest
import torch
import yaml

from sparsetrain.config import params_from_dict
from sparsetrain.kernels.blocks import block_layout, is_block_structured
from sparsetrain.sparsity.masks import num_pruned
from sparsetrain.training import setup, train_step
from tests.conftest import make_corpus, params_factory
from tests.helpers import checkpoint_model, cli, launch, launch_here, records

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR = ("proj_q_dense_layer", "proj_k_dense_layer", "proj_v_dense_layer", "proj_output_dense_layer", "linear_layer")


def _params(tiny_params, sparsity, *, max_steps=8, **sections):
    rc = {"device": "cpu", "progress": False, "eval_steps": 1, "max_steps": max_steps, **sections.pop("runconfig", {})}
    return tiny_params(sparsity=sparsity, runconfig=rc, **sections)


def _run(tmp_path, tiny_params, sparsity, name="run", **sections):
    params = params_from_dict(_params(tiny_params, sparsity, **sections))
    return setup(params, tmp_path / name, evaluate=False, write_metrics=False)


def _state_tensors(run, name):
    p = dict(run.model.named_parameters())[name]
    state = run.optimizer.state_dict()["state"]
    index = [id(q) for g in run.optimizer.param_groups for q in g["params"]].index(id(p))
    return {k: v for k, v in state.get(index, {}).items() if isinstance(v, torch.Tensor) and v.shape == p.shape}


SET = {"algorithm": "set", "sparsity": 0.75, "update": {"freq": 3}, "drop_fraction": 0.3}
RIGL = {**SET, "algorithm": "rigl", "drop_fraction": {"type": "cosine", "init": 0.5, "half_period": 10}}
GMP = {"algorithm": "gmp", "sparsity": {"type": "linear", "init": 0.3, "slope": 0.05}, "update": {"freq": 3}}


@pytest.mark.parametrize("packed", [True, False], ids=["packed-state", "torch-state"])
@pytest.mark.parametrize("block", [SET, RIGL, GMP], ids=["set", "rigl", "gmp"])
def test_masks_change_at_update_steps_only_with_exact_counts(tmp_path, tiny_params, block, packed):
    run = _run(tmp_path, tiny_params, block, optimizer={"packed_state": packed})
    names = list(run.sparsifier.masks)
    params = dict(run.model.named_parameters())
    prev = {n: m.clone() for n, m in run.sparsifier.masks.items()}
    changed_at = []
    for step in range(1, 9):
        before = {n: params[n].detach().clone() for n in names}
        train_step(run)
        masks = run.sparsifier.masks
        changed = [n for n in names if not torch.equal(masks[n], prev[n])]
        if changed:
            changed_at.append(step)
        assert not changed or step % 3 == 0, f"masks changed at step {step}, not an update step"
        for n in names:
            m, w = masks[n], params[n].detach()
            level = run.sparsifier.settings[n].dynamic.level(step - step % 3, step // 3) if block is GMP else 0.75
            assert int((~m).sum()) == num_pruned(m.numel(), level), (n, step)  # exact, after every step
            assert (w[~m] == 0).all(), f"{n}: a pruned weight is not 0 at step {step}"
            for key, t in _state_tensors(run, n).items():
                assert (t[~m] == 0).all(), f"{n}: optimizer {key} not 0 where pruned at step {step}"
            if step % 3 == 0:
                regrown = m & ~prev[n]
                assert (w[regrown] == 0).all(), f"{n}: a regrown weight does not start at 0"
                assert not (before[n][regrown] != 0).any(), f"{n}: a weight was regrown that was not pruned"
                if block is GMP:
                    assert not regrown.any(), "GMP regrew"
        prev = {n: m.clone() for n, m in masks.items()}
    assert changed_at == [3, 6]


def test_regrown_entries_state_is_zero_for_packed_state(tmp_path, tiny_params):
    """After an update the packed optimizer's state (exported dense) is 0 at every regrown entry,
    and the next step moves regrown weights from 0 by the first Adam step alone."""
    run = _run(tmp_path, tiny_params, SET)
    for _ in range(3):
        train_step(run)
    name = next(iter(run.sparsifier.masks))
    m = run.sparsifier.masks[name]
    assert run.dynamic.last_update == 3
    state = _state_tensors(run, name)
    assert state and all((t[~m] == 0).all() for t in state.values())


def test_block_structure_drops_and_regrows_whole_blocks(tmp_path, tiny_params):
    block = {**RIGL, "structure": "block", "block_size": 16, "sparsity": 0.5}
    run = _run(tmp_path, tiny_params, block)
    start = {n: block_layout(m, (16, 16)) for n, m in run.sparsifier.masks.items()}
    for _ in range(3):
        train_step(run)
    moved = 0
    for n, m in run.sparsifier.masks.items():
        assert is_block_structured(m, (16, 16))
        layout = block_layout(m, (16, 16))
        assert int(layout.sum()) == layout.numel() - num_pruned(layout.numel(), 0.5)
        moved += int((layout & ~start[n]).sum())
    assert moved > 0


def test_rigl_dense_gradient_is_right_with_gradient_accumulation(tmp_path, tiny_params):
    """One batch as 1 or as 2 micro-batches: the same dense gradient, so the same new masks
    (the zoo's 2.0.2 could not combine dynamic sparsity with gradient accumulation)."""
    block = {**RIGL, "update": {"freq": 1}, "drop_fraction": 0.3}
    one = _run(tmp_path, tiny_params, block, "one", max_steps=1)
    two = _run(tmp_path, tiny_params, block, "two", max_steps=1, optimizer={"grad_accum_steps": 2})
    captured = {}
    for key, run in (("one", one), ("two", two)):
        original = run.dynamic.update

        def spy(step, grads, original=original, key=key):
            captured[key] = {n: g.clone() for n, g in grads.items()}
            return original(step, grads)

        run.dynamic.update = spy
        train_step(run)
    assert set(captured["one"]) == set(one.sparsifier.masks)
    for n in captured["one"]:
        g1, g2 = captured["one"][n], captured["two"][n]
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
        assert (g1 != 0).float().mean() > 0.9, "the captured gradient is masked, not dense"
        agree = (one.sparsifier.masks[n] == two.sparsifier.masks[n]).float().mean()
        assert agree > 0.99, n


def test_a_run_killed_across_an_update_step_resumes_exactly(tmp_path, tiny_params, write_params, capsys):
    """8 steps straight vs 4, stop, 4 more: updates at 3 and 6, SET's random regrowth included."""
    for algo in ("set", "rigl"):
        block = {**SET, "algorithm": algo}
        path = write_params(_params(tiny_params, block, runconfig={"checkpoint_steps": 4}))
        straight, resumed = tmp_path / f"{algo}-straight", tmp_path / f"{algo}-resumed"
        assert cli("train", "--params", path, "--model_dir", straight) == 0
        assert cli("train", "--params", path, "--model_dir", resumed, "--set", "runconfig.max_steps=4") == 0
        assert cli("train", "--params", path, "--model_dir", resumed) == 0
        a, b = checkpoint_model(straight / "checkpoint_8.mdl"), checkpoint_model(resumed / "checkpoint_8.mdl")
        for k in a:
            assert torch.equal(torch.isnan(a[k]), torch.isnan(b[k])), k
            torch.testing.assert_close(a[k].nan_to_num(0.0), b[k].nan_to_num(0.0), rtol=0, atol=0)
        steps = [r["step"] for r in records(resumed, "sparsity_update")]
        assert sorted(set(steps)) == [3, 6]
        saved = torch.load(resumed / "checkpoint_8.mdl", weights_only=True)
        assert saved["dynamic_sparsity"]["updates_done"] == {"default": 2}
    capsys.readouterr()
    assert cli("inspect", resumed / "checkpoint_8.mdl") == 0
    assert "dynamic sparsity: updates done per group: default 2; last update at step 6" in capsys.readouterr().out


def test_records_of_each_update(tmp_path, tiny_params, write_params):
    path = write_params(_params(tiny_params, RIGL, max_steps=6))
    assert cli("train", "--params", path, "--model_dir", tmp_path / "m") == 0
    updates = records(tmp_path / "m", "sparsity_update")
    assert [r["step"] for r in updates] == [3, 6]
    for r in updates:
        assert r["group"] == "default" and r["algorithm"] == "rigl" and r["units"] == "entries"
        assert r["dropped"] == r["regrown"] > 0 and 0 < r["churn"] <= r["regrown"] / 1
        assert r["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert updates[0]["drop_fraction"] > updates[1]["drop_fraction"]  # cosine from 0.5 down
    train = records(tmp_path / "m", "train")
    dense_step = train[2]["flops_total"] - train[1]["flops_total"]
    plain_step = train[1]["flops_total"] - train[0]["flops_total"]
    assert dense_step > plain_step  # RigL's update step formed the dense weight gradient


def test_gmp_starts_dense_when_updates_start_later(tmp_path, tiny_params):
    block = {"algorithm": "gmp", "sparsity": {"type": "linear", "init": 0.5, "slope": 0.0}, "update": {"freq": 2, "start": 2}}
    run = _run(tmp_path, tiny_params, block, max_steps=2)
    assert all(bool(m.all()) for m in run.sparsifier.masks.values())  # the zoo's rule: dense until the first update
    train_step(run)
    assert all(bool(m.all()) for m in run.sparsifier.masks.values())
    train_step(run)
    for m in run.sparsifier.masks.values():
        assert int((~m).sum()) == num_pruned(m.numel(), 0.5)


@pytest.fixture(scope="module")
def rigl_one_process(tmp_path_factory):
    """The params of ``test_two_processes_agree_on_every_update`` (RigL every 2 steps, 4 steps,
    gradient accumulation 2) on a module corpus, and their one-process run: the same for both
    modes, so run once, in this process (``launch_here``: the run ``launch(1, ...)`` makes)."""
    base = tmp_path_factory.mktemp("rigl")
    p = _params(params_factory(make_corpus(base / "corpus")), {**RIGL, "update": {"freq": 2}},
                max_steps=4, optimizer={"grad_accum_steps": 2})
    path = base / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SPARSETRAIN_LOSS_PNG", "0")  # conftest's no_loss_png comes after module fixtures
        r1 = launch_here(path, base / "one")
    assert r1.returncode == 0, r1.stderr
    return path, base / "one"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_agree_on_every_update(tmp_path, rigl_one_process, mode):
    """The run compares a checksum of the masks across ranks after every update (it would stop
    otherwise); the masks come out as one process's (SET: the same random draws, RigL: the
    all-reduced gradient)."""
    path, one = rigl_one_process
    two = tmp_path / "two"
    r2 = launch(2, path, two, f"runconfig.distributed={mode}")
    assert r2.returncode == 0, r2.stderr
    assert [r["step"] for r in records(two, "sparsity_update")] == [2, 4]
    a, b = checkpoint_model(one / "checkpoint_4.mdl"), checkpoint_model(two / "checkpoint_4.mdl")
    for k in a:
        if any(s in k for s in LINEAR):
            agree = (torch.isnan(a[k]) == torch.isnan(b[k])).float().mean()
            assert agree > 0.99, (k, float(agree))


def test_erk_spreads_the_level_with_an_exact_total(tmp_path, tiny_params):
    """distribution: erk: the small attention weights stay denser than the wide MLP weights; the
    group prunes exactly round(0.9 * total) entries, at the start and after each SET update."""
    run = _run(tmp_path, tiny_params, {**SET, "sparsity": 0.9, "distribution": "erk"}, max_steps=3)
    for _ in range(4):
        masks = run.sparsifier.masks
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == num_pruned(total, 0.9)
        q = next(m for n, m in masks.items() if "proj_q" in n)
        fc = next(m for n, m in masks.items() if "ffn.ffn.0" in n)
        assert (~q).float().mean() < (~fc).float().mean()
        if run.step < 3:
            train_step(run)
    groups = run.sparsifier.group_stats()
    assert groups[0]["target"] == pytest.approx(num_pruned(total, 0.9) / total)


def test_the_zoo_list_of_groups_trains_each_group_its_way(tmp_path, tiny_params):
    block = [
        {"algorithm": "rigl", "sparsity": 0.75, "update": {"freq": 2}, "param_filter": "*linear_layer.weight"},
        {"algorithm": "static", "sparsity": 0.5, "init_method": "checkerboard", "param_filter": "*dense_layer.weight"},
    ]
    run = _run(tmp_path, tiny_params, block, max_steps=4)
    static = {n: m.clone() for n, m in run.sparsifier.masks.items() if "dense_layer" in n}
    dynamic = {n: m.clone() for n, m in run.sparsifier.masks.items() if "linear_layer" in n}
    assert len(static) == 8 and len(dynamic) == 4
    for _ in range(4):
        train_step(run)
    assert all(torch.equal(run.sparsifier.masks[n], m) for n, m in static.items())
    assert all(not torch.equal(run.sparsifier.masks[n], m) for n, m in dynamic.items())
    assert run.dynamic.updates_done == {"*linear_layer.weight": 2}


def test_gmp_flops_follow_the_density(tmp_path, tiny_params, write_params):
    path = write_params(_params(tiny_params, {**GMP, "update": {"freq": 2}}, max_steps=6))
    assert cli("train", "--params", path, "--model_dir", tmp_path / "m") == 0
    train = records(tmp_path / "m", "train")
    per_step = [b["flops_total"] - a["flops_total"] for a, b in zip(train, train[1:])]
    assert per_step[0] > per_step[2] > per_step[4]  # sparser after each update at steps 2 and 4
    assert train[-1]["flops_per_step"] < train[0]["flops_per_step"]


def test_plan_folds_the_schedule(tiny_params, write_params, capsys):
    block = {"algorithm": "gmp", "sparsity": [0.5, 0.5, 0.7], "update": {"freq": 2}}
    path = write_params(_params(tiny_params, block, max_steps=10))
    assert cli("plan", "--params", path, "--json") == 0
    import json

    (schedule,) = json.loads(capsys.readouterr().out)["schedules"]
    assert schedule["updates"] == 5 and schedule["start_sparsity"] == 0.5
    # cycling: the first mask takes 0.5, updates at 2, 4, 6, 8, 10 ask for 0.5, 0.7, 0.5, 0.5, 0.7;
    # GMP never regrows, so its masks stay at 0.7 from step 4 on, and plan says so
    assert [(f["first"], f["last"], f["sparsity"]) for f in schedule["folds"]] == [(2, 2, 0.5), (4, 10, 0.7)]


def test_erk_in_blocks_and_over_a_list_of_globs_keeps_the_exact_total(tmp_path, tiny_params):
    for block in (
        {**RIGL, "distribution": "erk", "structure": "block", "block_size": 16, "update": {"freq": 2}},
        {**RIGL, "distribution": "erk", "update": {"freq": 2},
         "param_filter": ["*proj_[qkv]_dense_layer.weight", "*proj_output_dense_layer.weight", "*linear_layer.weight"]},
    ):
        run = _run(tmp_path, tiny_params, block, max_steps=2)
        for _ in range(3):
            masks = run.sparsifier.masks
            total = sum(m.numel() for m in masks.values())
            assert sum(int((~m).sum()) for m in masks.values()) == num_pruned(total, 0.75)
            assert len({round(float((~m).float().mean()), 3) for m in masks.values()}) > 1  # spread, not uniform
            if run.step < 2:
                train_step(run)


def test_idle_rules_and_shadowed_groups_warn(tmp_path, tiny_params, caplog):
    with caplog.at_level("WARNING"):
        _run(tmp_path, tiny_params, {**SET, "update": {"steps": [500]}}, "idle", max_steps=4)
        _run(tmp_path, tiny_params, [{**SET, "param_filter": "*ffn*weight"},
                                     {"sparsity": 0.5, "param_filter": "*ffn.ffn.0*weight"}], "shadow", max_steps=4)
    text = caplog.text
    assert "default (set): no update step in 1..4 (update: at steps 500); it trains with its masks dense (the rule starts after step 0)" in text
    assert "sparsity[1]: every parameter it selects is taken by an earlier group; it selects nothing" in text


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_gmp_blocks_on_the_gpu_compiled(tmp_path, tiny_params):
    """GMP changes the live-block count: stored blocks get new tensors (and the compiled step
    recompiles); training goes on with exact block counts."""
    block = {**GMP, "structure": "block", "block_size": 16, "update": {"freq": 2}}
    params = params_from_dict(_params(tiny_params, block, max_steps=6, runconfig={"device": "cuda", "compile": True}))
    run = setup(params, tmp_path / "gpu", evaluate=False, write_metrics=False)
    for _ in range(6):
        assert torch.isfinite(train_step(run))
    for n, m in run.sparsifier.masks.items():
        layout = block_layout(m, (16, 16))
        level = run.sparsifier.settings[n].dynamic.level(6, 2)
        assert int((~layout).sum()) == num_pruned(layout.numel(), level)


@pytest.mark.cuda
@pytest.mark.parametrize("structure", ["block", "unstructured"])
def test_rigl_on_the_gpu_compiled(tmp_path, tiny_params, structure):
    """bf16, torch.compile (CUDA graphs for the block kernels): RigL's updates keep exact counts,
    the stored live blocks stay the same tensors (moved in place), the loss stays finite."""
    block = {**RIGL, "update": {"freq": 2}, "structure": structure}
    if structure == "block":
        block.update(block_size=16, sparsity=0.5)
    params = params_from_dict(_params(tiny_params, block, runconfig={"device": "cuda", "compile": True}))
    run = setup(params, tmp_path / "gpu", evaluate=False, write_metrics=False)
    from sparsetrain.sparsity.block_linear import packed_layers

    packed = packed_layers(run.model)
    assert bool(packed) == (structure == "block")
    pointers = {n: m.weight_blocks.data_ptr() for n, m in packed.items()}
    start = {n: m.clone() for n, m in run.sparsifier.masks.items()}
    for _ in range(6):
        assert torch.isfinite(train_step(run))
    assert run.dynamic.dense_grad_steps == 3 and run.dynamic.updates_done == {"default": 3}
    moved = 0
    for n, m in run.sparsifier.masks.items():
        level = 0.5 if structure == "block" else 0.75
        if structure == "block":
            layout = block_layout(m, (16, 16))
            assert int((~layout).sum()) == num_pruned(layout.numel(), level)
        else:
            assert int((~m).sum()) == num_pruned(m.numel(), level)
        moved += int((m & ~start[n]).sum())
    assert moved > 0
    assert {n: m.weight_blocks.data_ptr() for n, m in packed.items()} == pointers


def test_new_masks_do_not_recompile_the_model(tmp_path, tiny_params):
    """Updates change masks, not the model: Dynamo compiles one graph for the whole run (the
    gradient hooks stay, reading the masks at call time). Backend ``eager``: guards only."""
    import torch._dynamo

    torch._dynamo.reset()
    run = _run(tmp_path, tiny_params, {**SET, "update": {"freq": 2}}, max_steps=6, runconfig={"compile": False})
    run.forward = torch.compile(run.model, backend="eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(6):
        train_step(run)
    assert run.dynamic.updates_done == {"default": 3}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()
