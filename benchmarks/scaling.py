"""Multi-GPU scaling of the normal training path: tokens/s with 1 and N processes (torchrun).

    python benchmarks/scaling.py --params configs/gpt2_small_sparse_default.yaml \\
        --set model.preset=gpt2-medium --nproc 1,2 --steps 80

Weak scaling: every process keeps the params file's ``batch_size`` (so N processes train on a
global batch N times larger: ``train_input.batch_size`` is set to N x that). Each run is
``torchrun --standalone --nproc_per_node N run.py --mode train`` on a fresh model_dir, run one
after another in this invocation; tokens/s is the median of the logged training rates after the
first ``--skip`` log records (compilation and warm-up). By default the byte tokenizer and a
50304-token model vocabulary stand in for the config's BPE (no tokenizer training per run, the
LM head of GPT-2's size). ``runconfig.distributed`` stays ``auto`` (DDP) unless ``--set``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def one_run(params: Path, nproc: int, steps: int, log_steps: int, overrides: list[str], model_dir: Path) -> list[dict]:
    raw = yaml.safe_load(params.read_text())
    per_rank = int(raw.get("train_input", {}).get("batch_size", 16))
    sets = [
        f"runconfig.max_steps={steps}", f"runconfig.log_steps={log_steps}", "runconfig.progress=false",
        "runconfig.checkpoint_steps=0", f"train_input.batch_size={per_rank * nproc}", *overrides,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "run.py"), "--mode", "train", "--params", str(params), "--model_dir", str(model_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed (exit {proc.returncode}):\n" + "\n".join(proc.stdout.splitlines()[-25:]))
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "configs" / "gpt2_small_sparse_default.yaml")
    ap.add_argument("--nproc", default="1,2", help="process counts, comma separated (the first is the baseline)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--log_steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=2, help="log records left out of the median (warm-up)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--no_byte_tokenizer", action="store_true", help="keep the config's tokenizer and vocabulary")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    overrides = list(args.overrides)
    if not args.no_byte_tokenizer:
        overrides = ["train_input.tokenizer=byte", "model.vocab_size=50304", *overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.nproc.split(",")):
            train = one_run(args.params, n, args.steps, args.log_steps, overrides, Path(tmp) / f"n{n}")
            rates = [r["tokens_per_s"] for r in train[args.skip:]] or [r["tokens_per_s"] for r in train]
            rows.append({"nproc": n, "tokens_per_s": statistics.median(rates), "rates": rates,
                         "final_loss": train[-1]["loss"], "mfu": train[-1].get("mfu")})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["tokens_per_s"] / rows[0]["nproc"]
    print(f"\n{args.params.name}  {' '.join(overrides)}  steps {args.steps}")
    print(f"{'processes':>9} {'tokens/s':>12} {'scaling':>8} {'efficiency':>10}")
    for r in rows:
        r["scaling"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        r["efficiency"] = r["tokens_per_s"] / (base * r["nproc"])
        print(f"{r['nproc']:>9} {r['tokens_per_s']:>12,.0f} {r['scaling']:>7.2f}x {r['efficiency']:>9.1%}")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "overrides": overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
