"""The SPDF study's two estimators on one fine-tuned model: our whole-split eval (with and
without the rows after the last full batch, which ``data.eval_batches`` left out before
2026-12-03) against nanoGPT's 40 random batches (five draws).

    python benchmarks/spdf_estimators.py --out OUT --checkpoint OUT/runs/w768_s0_dense_ft/checkpoint_100.mdl \\
        [--set model.preset=gpt2-tiny ...]

``OUT`` is a ``spdf_study.py --out`` directory (its ``data/downstream``); ``--set`` repeats the
study's overrides of the run that wrote the checkpoint (the width, the preset).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spdf_study import downstream_sets, random_batches_loss, scored_run, whole_split_loss  # a sibling script

from sparsetrain import data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = ap.parse_args(argv)
    with scored_run([*a.sets, *downstream_sets(a.out / "data" / "downstream")], a.checkpoint) as (run, loss_of):
        inp = run.params.eval_input
        batches = list(data.eval_batches(run.eval_tokens, inp.batch_size, inp.max_sequence_length))
        full = [b for b in batches if len(b[0]) == inp.batch_size]
        if not full:
            raise SystemExit(f"spdf_estimators: the eval split holds less than one batch of {inp.batch_size}: "
                             "nothing was left out before the fix")
        before_fix = sum(loss_of(x, y) for x, y in full) / len(full)
        whole = whole_split_loss(loss_of, run.eval_tokens, inp)
        draws = random_batches_loss(loss_of, run.eval_tokens, inp)
    mean = sum(draws) / len(draws)
    print(f"eval split: {sum(len(b[0]) for b in batches)} windows, {len(full)} full batches of {inp.batch_size}, "
          f"{sum(len(b[0]) for b in batches[len(full):])} rows after them")
    print(f"whole split, every window         {whole:.4f}")
    print(f"full batches only (before 12-03)  {before_fix:.4f}")
    print(f"40 random batches, 5 draws        mean {mean:.4f}, range {min(draws):.4f}-{max(draws):.4f}")
    print(f"random mean - whole split {mean - whole:+.4f}; random mean - full batches only {mean - before_fix:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
