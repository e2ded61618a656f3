"""The whole training step on the block-sparse kernels with and without CUDA graphs (issue 19's
eager-path target: the step within 5% of the graphed step), one process per invocation.

    PYTHONPATH=src python benchmarks/eager_step.py --preset gpt2-small --batch_size 16 --seq_len 1024 \\
        [--modes graphed,compiled,eager,eager_triton_launch,dense] [--json OUT.json]

Each mode is our normal training step (``sparsetrain.bench.train.run_ours``: setup + train_step,
75% sparsity in 128x128 blocks by default) timed with CUDA events after warm-up:

- ``graphed``: ``torch.compile`` with ``reduce-overhead`` (CUDA graphs; ``compile_mode: auto``);
- ``compiled``: ``torch.compile`` default mode, no graphs (what a DDP run takes);
- ``eager``: no ``torch.compile`` (a library user's own loop);
- ``eager_triton_launch``: eager with every kernel call through Triton's own launch path
  (``SPARSETRAIN_TRITON_LAUNCH=triton``), i.e. without ``kernels.launch``'s cache;
- ``dense``: the dense step, default compile mode (the anchor of the speedups);
- ``dense_eager``: the dense step without ``torch.compile`` (the anchor of the eager speedup).

Prints ms/step per mode, each mode's time over the graphed step, and the speedups over dense:
the sparse modes that compile against ``dense``, the eager ones against ``dense_eager``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from eager_overhead import python_profile  # a sibling script (run as python benchmarks/eager_step.py)

from sparsetrain import training as tr
from sparsetrain.bench.train import _params, run_ours

MODES = {  # mode: (compile, compile_mode, sparse, environment)
    "graphed": (True, "reduce-overhead", True, {}),
    "compiled": (True, "default", True, {}),
    "eager": (False, "default", True, {}),
    "eager_triton_launch": (False, "default", True, {"SPARSETRAIN_TRITON_LAUNCH": "triton"}),
    "dense": (True, "default", False, {}),
    "dense_eager": (False, "default", False, {}),
}


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The run's shape and sparsity (also ``mode_losses.py``'s)."""
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--block_size", type=int, default=128)


def run_settings(a, mode: str) -> dict:
    """The keyword arguments of ``bench.train._params`` / ``run_ours`` for ``mode``'s run."""
    compile_, compile_mode, sparse, _ = MODES[mode]
    return dict(preset=a.preset, batch_size=a.batch_size, seq_len=a.seq_len, sparsity=a.sparsity if sparse else None,
                compile_=compile_, device="cuda", overrides=(f"runconfig.compile_mode={compile_mode}",),
                structure="block" if sparse else "unstructured", block_size=a.block_size)


@contextmanager
def mode_env(mode: str):
    """``mode``'s environment variables set, and removed afterwards."""
    env = MODES[mode][3]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            del os.environ[key]


@contextmanager
def mode_run(a, mode: str):
    """The bench's training run of ``mode`` (its params, its environment), set up in a temporary
    model_dir."""
    with mode_env(mode), tempfile.TemporaryDirectory() as tmp:
        yield tr.setup(_params(**run_settings(a, mode)), Path(tmp), train=True, evaluate=False, write_metrics=False)


def host_profile(a, mode: str, steps: int = 5, top: int = 35) -> str:
    """cProfile of ``steps`` training steps of ``mode`` (after warm-up), by own time and by
    cumulative time (which shows the share of the compiled graphs' code and of our ops' calls)."""
    with mode_run(a, mode) as run:
        report = python_profile(lambda: tr.train_step(run), calls=steps, top=top, warmup=a.warmup,
                                sorts=("tottime", "cumulative"))
    return f"{mode}, {steps} steps:\n" + report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("--cprofile", metavar="MODE", help="also: where one MODE step's host time goes (cProfile, 5 steps)")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    out = {"preset": a.preset, "batch_size": a.batch_size, "seq_len": a.seq_len, "sparsity": a.sparsity,
           "block_size": a.block_size, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "modes": {}}
    for mode in a.modes.split(","):
        with mode_env(mode):
            r = run_ours(steps=a.steps, warmup=a.warmup, **run_settings(a, mode))
        out["modes"][mode] = {"ms_per_step": r["ms_per_step"], "loss": r["loss"],
                              "block_kernel_layers": r["block_kernel_layers"]}
        print(f"{a.preset} {mode:<20} {r['ms_per_step']:8.2f} ms/step  ({r['block_kernel_layers']} layers on the "
              f"kernels)", flush=True)
    if a.cprofile:
        out["cprofile"] = host_profile(a, a.cprofile)
        print(out["cprofile"])
    modes = out["modes"]
    if "graphed" in modes:
        for mode, r in modes.items():
            r["over_graphed"] = r["ms_per_step"] / modes["graphed"]["ms_per_step"]
            print(f"{mode:<20} / graphed {r['over_graphed']:.3f}")
    for mode, r in modes.items():
        anchor = "dense_eager" if mode.startswith("eager") else "dense"
        if anchor in modes and mode != anchor:
            r["speedup_over_" + anchor] = modes[anchor]["ms_per_step"] / r["ms_per_step"]
            print(f"{anchor} / {mode:<20} {r['speedup_over_' + anchor]:.3f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
