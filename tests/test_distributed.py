"""``distributed.py`` under torchrun with 2 CPU processes (gloo): ``shard``, ``full_state`` and
``load_optimizer_state`` with the PackedOptimizer on uneven FSDP2 shards. Whole training runs
under torchrun are in ``e2e/test_distributed.py``."""

from __future__ import annotations

from tests.helpers import rank_reports, torchrun

SHARD_PROBE = """
import copy, json, sys
import torch
from torch import nn
from sparsetrain import distributed
from sparsetrain.optim.packed import PackedOptimizer
from sparsetrain.sparsity.sparsifier import sparsify

info = distributed.init("fsdp", torch.device("cpu"))
BLOCK = {"sparsity": 0.5, "init_method": "random", "param_name_patterns": "weight"}
OPTIONS = {"adamw": dict(lr=0.05, weight_decay=0.1), "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.1)}
torch.manual_seed(0)
inputs = [torch.randn(4, 6) for _ in range(4)]  # the same on every rank: FSDP's mean gradient is this one


def make():
    torch.manual_seed(1)  # weights of 5 and 1 rows: shards of 3 and 2, and of 1 and 0 rows
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1, bias=False))


def step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def full(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def close(a, b):
    return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


report = {"rank": info.rank}
for kind, options in OPTIONS.items():
    ref = make()
    masks = dict(sparsify(ref, BLOCK).masks)
    torch_opt = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind](ref.parameters(), **options)
    sparsify(ref, BLOCK, torch_opt, masks=masks)
    model = copy.deepcopy(ref)
    distributed.shard(model, [])
    opt = PackedOptimizer(model.parameters(), kind=kind, **options)
    sparsify(model, BLOCK, opt, masks=masks)
    for x in inputs[:3]:
        step(ref, torch_opt, x)
        step(model, opt, x)
    _, gathered = distributed.full_state(model, opt)
    expected = torch_opt.state_dict()["state"]
    report[kind + "_weights"] = close(full(model), full(ref))
    report[kind + "_pruned_zero"] = all(bool((p.to_local()[~m] == 0).all()) for p, m in opt.masks().items())
    report[kind + "_packed"] = all(v.ndim == 1 for s in opt.state.values() for k, v in s.items() if k != "step")
    if info.rank == 0:  # the consolidated state: torch's dense layout, the full weights' shapes
        report[kind + "_gathered"] = all(
            set(gathered["state"][i]) == set(expected[i]) and close(gathered["state"][i], expected[i]) for i in expected
        )
    # Load the consolidated state into a fresh sharded model (before the masks for AdamW, as
    # training's resume does; after them for SGD), then one more step on both.
    again = copy.deepcopy(ref)
    distributed.shard(again, [])
    opt2 = PackedOptimizer(again.parameters(), kind=kind, **options)
    saved = copy.deepcopy(torch_opt.state_dict())  # as read from a file: no tensor shared with torch_opt
    if kind == "adamw":
        distributed.load_optimizer_state(again, opt2, saved)
        sparsify(again, BLOCK, opt2, masks=masks)
    else:
        sparsify(again, BLOCK, opt2, masks=masks)
        distributed.load_optimizer_state(again, opt2, saved)
    step(ref, torch_opt, inputs[3])
    step(again, opt2, inputs[3])
    report[kind + "_resumed"] = close(full(again), full(ref))
with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as f:
    json.dump(report, f)
distributed.shutdown(info)
"""


def test_packed_optimizer_on_uneven_fsdp_shards(tmp_path):
    """PackedOptimizer on FSDP2 shards of 3/2 and 1/0 rows steps as torch's optimizer on the full
    weights; its state gathers into torch's consolidated layout and loads back into shards."""
    script = tmp_path / "shards.py"
    script.write_text(SHARD_PROBE)
    r = torchrun(2, [str(script), str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stderr
    ranks = rank_reports(tmp_path)
    assert [x["rank"] for x in ranks] == [0, 1]
    for kind in ("adamw", "sgd"):
        for key in ("weights", "pruned_zero", "packed", "resumed"):
            assert all(rank[f"{kind}_{key}"] for rank in ranks), (kind, key, ranks)
        assert ranks[0][f"{kind}_gathered"], ranks[0]
