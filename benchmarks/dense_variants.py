"""Time our dense (and optionally sparse) step under several settings, beside the reference, in one process.

    python benchmarks/dense_variants.py --preset gpt2-small --batch_size 16 --seq_len 1024 \\
        --variant "" --variant "runconfig.attention=cudnn" [--sparse 0.75]

Each ``--variant`` is a comma-separated list of ``section.key=value`` overrides ("" = defaults).
Prints one line per variant: ms/step, tokens/s, MFU and the ratio to the reference loop.
"""

from __future__ import annotations

import argparse
import json

from sparsetrain.bench.train import add_rates, run_ours, run_reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--sparse", type=float, default=None, help="also time each variant at this sparsity")
    args = p.parse_args()
    ref = run_reference(args.preset, args.batch_size, args.seq_len, args.steps, args.warmup, "cuda", "auto")
    rows = []
    for variant in args.variant or [""]:
        overrides = tuple(o for o in variant.split(",") if o)
        for sparsity in [None] if args.sparse is None else [None, args.sparse]:
            res = {"reference": ref, "dense": run_ours(args.preset, args.batch_size, args.seq_len, sparsity, args.steps,
                                                      args.warmup, "auto", "cuda", overrides)}
            res["sparse"] = res["dense"]
            add_rates(res, args.batch_size * args.seq_len, "cuda")
            d = res["dense"]
            rows.append((variant or "default", sparsity, d["ms_per_step"], d["tokens_per_s"], d["mfu"],
                         d["tokens_per_s"] / ref["tokens_per_s"], d["peak_memory_bytes"]))
            print(json.dumps({"variant": variant, "sparsity": sparsity, **{k: v for k, v in d.items() if k != "flops_per_token"}}), flush=True)
    print(f"reference: {ref['ms_per_step']:.2f} ms/step, {ref['tokens_per_s']:,.0f} tokens/s, mfu {ref['mfu']:.1%}")
    for v, s, ms, tps, mfu, ratio, mem in rows:
        print(f"{v:<50} sparsity {s!s:<5} {ms:8.2f} ms {tps:>10,.0f} tok/s  mfu {mfu:.1%}  x{ratio:.3f} of ref  peak {mem / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
