"""Where the time of one dynamic-sparsity mask update goes: a model of a preset's shapes with
block-sparse layers stored as live blocks (as ``train`` does on a GPU), AdamW state (packed, as
``train`` keeps it; ``--torch_adamw`` for torch's), random dense gradients; cProfile of ``DynamicSparsity.update`` (synchronised), sorted by own time.

    python benchmarks/profile_dynamic_update.py --preset gpt3-xl --sparsity 0.75 --block_size 128
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from sparsetrain.config import PRESETS, params_from_dict
from sparsetrain.config.sparsity import parse_sparsity
from sparsetrain.model import GPT
from sparsetrain.sparsity.block_linear import use_block_kernels
from sparsetrain.sparsity.dynamic import DynamicSparsity
from sparsetrain.sparsity.sparsifier import sparsify


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt3-xl")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--structure", default="block")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--torch_adamw", action="store_true", help="torch.optim.AdamW instead of the packed optimizer")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inp = {"source": "stdlib", "batch_size": 1, "max_sequence_length": 64}
    cfg = params_from_dict({"model": {"preset": args.preset, "vocab_size": 256}, "train_input": inp, "eval_input": inp}).model
    model = GPT(cfg).to(device)
    block = {"algorithm": "rigl", "sparsity": args.sparsity, "structure": args.structure, "update": {"freq": 100},
             "init_method": "random"}
    if args.structure == "block":
        block["block_size"] = args.block_size
    sp = sparsify(model, parse_sparsity(block))
    if args.structure == "block":
        use_block_kernels(model, sp, packed=True)
    if args.torch_adamw:
        opt = torch.optim.AdamW(model.parameters(), fused=device.type == "cuda")
    else:  # what train builds with a sparsity block (optimizer.packed_state: true)
        from sparsetrain.optim.packed import PackedOptimizer

        opt = PackedOptimizer(model.parameters(), kind="adamw")
    sp.attach(opt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    dyn = DynamicSparsity(sp)
    grads = {n: torch.randn(m.shape, device=device) for n, m in sp.masks.items()}
    dyn.update(100, grads)  # warm
    torch.cuda.synchronize() if device.type == "cuda" else None
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    dyn.update(200, grads)
    torch.cuda.synchronize() if device.type == "cuda" else None
    prof.disable()
    print(f"update: {(time.perf_counter() - t0) * 1000:.1f} ms for {len(sp.masks)} tensors on {device}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    PRESETS  # noqa: B018 (the presets the --preset names)
    main()
