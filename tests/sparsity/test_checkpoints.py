"""``sparsity/checkpoints.py`` and the library API outside the CLI: ``sparsetrain.sparsify`` on a
model with Hugging Face GPT-2 names, ``save_sparse_checkpoint`` / ``load_sparse_checkpoint`` with
the masks (or dense, for fine-tuning)."""

from __future__ import annotations

import torch
from torch import nn

import sparsetrain


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
