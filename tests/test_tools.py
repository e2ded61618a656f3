"""plan / inspect / finalize, and the library API outside the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.cli import main
from sparsetrain.config import load_params
from sparsetrain.sparsity.masks import num_pruned

SPARSE = {"sparsity": 0.75, "init_method": "topk"}


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_plan_json_shape_and_counts(tiny_params, write_params, capsys):
    path = write_params(tiny_params(sparsity={"sparsity": 0.5, "param_name_patterns": {"mlp.*weight": {"sparsity": 0.75}, "attn.qkv": {}}}))
    assert cli("plan", "--params", path, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"parameters", "dense", "flops_per_token", "training_state_bytes"}
    assert set(report["training_state_bytes"]) == {"dense", "masked_dense", "block_kernels"}
    names = [r["name"] for r in report["parameters"]]
    assert names == [f"layers.{i}.{k}" for i in range(2) for k in ("attn.qkv.weight", "mlp.fc.weight", "mlp.proj.weight")]
    for r in report["parameters"]:
        assert set(r) >= {"name", "shape", "numel", "group", "sparsity", "init_method", "pruned"}
        assert r["pruned"] == num_pruned(r["numel"], r["sparsity"])
        assert r["sparsity"] == (0.75 if "mlp" in r["name"] else 0.5)
    assert "layers.0.attn.proj.weight" in report["dense"] and "embed_tokens.weight" in report["dense"]
    f = report["flops_per_token"]
    assert f["ratio"] == pytest.approx(f["dense"] / f["sparse"]) and f["ratio"] > 1


def test_plan_text_needs_no_data_or_memory(tmp_path, capsys):
    # gpt3-xl shapes on the meta device; the data path is never read by a dry run.
    assert cli("plan", "--params", "configs/gpt3_xl.yaml", "--set", "sparsity.sparsity=0.75",
               "--set", "model.vocab_size=50257") == 0
    out = capsys.readouterr().out
    assert "96 sparsified tensors" in out and "ratio 2.49x" in out


def test_plan_bad_pattern_lists_names(tiny_params, write_params, capsys):
    path = write_params(tiny_params(sparsity={"sparsity": 0.5, "param_name_patterns": "fc_layers.*weight"}))
    assert cli("plan", "--params", path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fc_layers.*weight" in err and "mlp.fc.weight" in err


@pytest.fixture
def sparse_run(tmp_path, tiny_params, write_params):
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params(sparsity=SPARSE)), "--model_dir", d) == 0
    return d / "checkpoint_4.mdl"


def test_inspect_counts_nan(sparse_run, capsys):
    capsys.readouterr()
    assert cli("inspect", sparse_run, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["global_step"] == 4
    by_name = {t["name"]: t for t in report["tensors"]}
    qkv = by_name["layers.0.attn.qkv.weight"]
    assert qkv["nan"] == num_pruned(96 * 32, 0.75) and qkv["sparsity"] == pytest.approx(qkv["nan"] / qkv["numel"])
    assert by_name["embed_tokens.weight"]["nan"] == 0
    assert "lm_head.weight" not in by_name  # tied to embed_tokens: listed once
    assert report["total"]["nan"] == sum(t["nan"] for t in report["tensors"])
    assert cli("inspect", sparse_run) == 0
    assert "NaN (pruned)" in capsys.readouterr().out


def test_finalize_mdl_and_safetensors(sparse_run, tmp_path):
    out = tmp_path / "dense.mdl"
    assert cli("finalize", "-i", sparse_run, "-o", out) == 0
    dense = torch.load(out, weights_only=True)
    assert not any(torch.isnan(t).any() for t in dense["model"].values())
    sparse = torch.load(sparse_run, weights_only=True)["model"]["layers.1.mlp.fc.weight"]
    torch.testing.assert_close(dense["model"]["layers.1.mlp.fc.weight"], sparse.nan_to_num(0.0))
    from safetensors.torch import load_file

    st = tmp_path / "dense.safetensors"
    assert cli("finalize", "-i", sparse_run, "-o", st) == 0
    weights = load_file(str(st))
    assert not any(torch.isnan(t).any() for t in weights.values())
    assert cli("finalize", "-i", sparse_run, "-o", sparse_run) == 2  # never overwrite the input


class HFStyleGPT(nn.Module):
    """Names as in Hugging Face GPT-2 (wte, wpe, h.N.attn.c_attn, ln_f): no 'embed' in the names."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.wpe = nn.Embedding(8, 16)
        self.h = nn.ModuleList(nn.ModuleDict({"c_attn": nn.Linear(16, 48), "c_fc": nn.Linear(16, 64), "ln_1": nn.LayerNorm(16)}) for _ in range(2))
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.h:
            x = x + blk["c_attn"](blk["ln_1"](x))[..., :16] + blk["c_fc"](x)[..., :16]
        return self.lm_head(x)


def test_library_api_outside_cli(tmp_path):
    torch.manual_seed(0)
    model = HFStyleGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp = sparsetrain.sparsify(model, {"sparsity": 0.5}, opt)
    assert sorted(sp.masks) == [f"h.{i}.{k}.weight" for i in range(2) for k in ("c_attn", "c_fc")]
    for _ in range(5):
        opt.zero_grad()
        model(torch.randint(0, 50, (2, 8))).logsumexp(-1).mean().backward()
        opt.step()
    for name, mask in sp.masks.items():
        p = dict(model.named_parameters())[name]
        assert (p[~mask] == 0).all() and (opt.state[p]["exp_avg"][~mask] == 0).all()
    path = tmp_path / "hf.mdl"
    sparsetrain.save_sparse_checkpoint(path, model, sp, opt, global_step=5)
    fresh = HFStyleGPT()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    sp2 = sparsetrain.load_sparse_checkpoint(path, fresh, fresh_opt, block={"sparsity": 0.5})
    for name, mask in sp.masks.items():
        assert torch.equal(sp2.masks[name], mask)
    dense = HFStyleGPT()
    assert sparsetrain.load_sparse_checkpoint(path, dense) is None  # no block: dense fine-tuning
    assert not any(torch.isnan(p).any() for p in dense.parameters())


def test_plan_of_every_sparse_config():
    from sparsetrain.tools import plan

    for name in ("default", "regex", "list", "groups"):
        report = plan(load_params(f"configs/gpt2_small_sparse_{name}.yaml"))
        assert report["parameters"], name
