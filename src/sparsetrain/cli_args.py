"""The command line's arguments: :func:`build_parser` declares every subcommand of ``sparsetrain``
(their functions are in :mod:`sparsetrain.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsetrain import __version__
from sparsetrain.config import PRESETS

MODES = ("train", "eval", "train_and_eval", "eval_all")


# -- arguments -------------------------------------------------------------------------------------


EXAMPLES = {'train': 'sparsetrain train --params configs/gpt2_tiny_sparse.yaml --model_dir runs/demo', 'eval': 'sparsetrain eval --params configs/gpt2_tiny_sparse.yaml --model_dir runs/demo', 'train_and_eval': 'sparsetrain train_and_eval --params configs/gpt2_tiny_sparse.yaml --model_dir runs/demo --set runconfig.eval_frequency=200', 'eval_all': 'sparsetrain eval_all --params configs/gpt2_tiny_sparse.yaml --model_dir runs/demo'}


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default (where it has one worth saying) and the example (epilog)
    as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unsaid = default is None or default is False or default == argparse.SUPPRESS or default in ("", [])
        if unsaid or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


def _command(sub, name: str, text: str, example: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help shows the defaults and one example."""
    return sub.add_parser(name, help=text, description=kwargs.pop("description", text[:1].upper() + text[1:] + "."),
                          epilog=f"example:\n  {example}", formatter_class=_Help, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsetrain", description="Weight-sparse pre-training of GPT-style models, and dense fine-tuning.")
    parser.add_argument("--version", action="version", version=f"sparsetrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mode, text in zip(MODES, ("train (resumes from model_dir)", "evaluate the latest checkpoint", "train, evaluating as it goes",
                                  "evaluate every checkpoint in model_dir, oldest first")):
        _add_run_args(_command(sub, mode, text, EXAMPLES[mode]))

    g = _command(sub, "generate", "sample text from a trained model", 'sparsetrain generate --model_dir runs/demo --prompt "def main(" --temperature 0')
    g.add_argument("--model_dir", "-o", required=True, type=_dir_path)
    g.add_argument("--checkpoint_path", type=Path, help="default: the newest checkpoint in model_dir")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max_new_tokens", type=_positive_int, default=200, help="tokens to add to the prompt")
    g.add_argument("--temperature", type=_temperature, default=0.8, help="0: greedy (the likeliest token each step)")
    g.add_argument("--top_k", type=_positive_int, default=50, help="sample from the k likeliest tokens (k >= 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    _add_debug(g)

    pr = _command(sub, "prepare", "tokenize a text source into memory-mapped token shards", "sparsetrain prepare --params configs/gpt2_tiny.yaml --output data/stdlib_shards")
    pr.add_argument("--params", "-p", required=True, type=Path, help="its train_input names the source and tokenizer")
    pr.add_argument("--output", required=True, type=Path, help="directory for the shards and meta.json")
    pr.add_argument("--format", choices=("shards", "zoo-hdf5"), default="shards",
                    help="shards (ours, memory-mapped) | zoo-hdf5 (the zoo's .h5 sample form, for GptHDF5MapDataProcessor)")
    pr.add_argument("--seq_len", type=int, help="zoo-hdf5: tokens per sample (default: train_input.max_sequence_length)")
    _add_overrides(pr)
    _add_debug(pr)

    cp = _command(sub, "convert-params", "write a params file (the zoo's, any layout) in our layout", "sparsetrain convert-params params_gpt3_125m_rigl75.yaml -o ours.yaml")
    cp.add_argument("params", type=Path, help="YAML params file")
    cp.add_argument("-o", "--output", type=Path, help="where to write (default: print)")
    _add_overrides(cp)
    _add_debug(cp)

    pl = _command(sub, "plan", "dry run: which weights a params file sparsifies, and the FLOPs", "sparsetrain plan --params configs/gpt2_tiny_sparse.yaml")
    pl.add_argument("--params", "-p", required=True, type=Path)
    _add_overrides(pl)
    pl.add_argument("--json", action="store_true", help="machine-readable output (stable shape)")
    _add_debug(pl)

    ins = _command(sub, "inspect", "per-tensor NaN (pruned) counts and sparsity of a checkpoint", "sparsetrain inspect runs/demo/checkpoint_1000.mdl")
    ins.add_argument("checkpoint", type=Path)
    ins.add_argument("--json", action="store_true", help="machine-readable output (stable shape)")
    _add_debug(ins)

    fin = _command(sub, "finalize", "NaN -> 0: a dense checkpoint for other tools", "sparsetrain finalize -i runs/demo/checkpoint_1000.mdl -o runs/demo/dense.safetensors")
    fin.add_argument("-i", "--input", required=True, type=Path, help="sparse checkpoint")
    fin.add_argument("-o", "--output", required=True, type=Path, help=".mdl (same layout) or .safetensors (weights)")
    fin.add_argument("--overwrite", action="store_true", help="replace an existing output file (never a directory or device)")
    _add_debug(fin)

    ex = _command(sub, "export", "a checkpoint as a Hugging Face GPT-2 directory (from_pretrained loads it)",
                  "sparsetrain export --format hf -i runs/demo/checkpoint_1000.mdl -o runs/demo/hf")
    ex.add_argument("--format", choices=("hf",), default="hf", help="hf: transformers' GPT2LMHeadModel and its tokenizer")
    ex.add_argument("-i", "--input", required=True, type=Path, help="checkpoint (sparse or dense)")
    ex.add_argument("-o", "--output", required=True, type=Path, help="directory to write")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    _add_debug(ex)

    cmp = _command(sub, "compare", "runs side by side: a table, and loss against steps, tokens, FLOPs or time",
                   "sparsetrain compare runs/dense runs/sparse --x flops --out loss.png")
    cmp.add_argument("runs", nargs="+", type=_dir_path, metavar="RUN_DIR", help="model_dirs (their metrics.jsonl)")
    cmp.add_argument("--x", choices=("steps", "tokens", "flops", "time"), default="flops",
                     help="the picture's x axis: flops are the run's training FLOPs with sparsity counted")
    cmp.add_argument("--out", type=Path, help="write the picture here (.png; needs matplotlib: the [plot] extra)")
    cmp.add_argument("--json", action="store_true", help="machine-readable table (stable shape)")
    _add_debug(cmp)

    cf = _command(sub, "configs", "the params files shipped with sparsetrain: list, show or copy them",
                  "sparsetrain configs gpt2_tiny_sparse --copy my_configs")
    cf.add_argument("names", nargs="*", metavar="NAME", help="configs to show (or copy); none: list them all")
    cf.add_argument("--copy", type=_dir_path, metavar="DIR", help="write the named configs (all, if none named) into DIR")
    cf.add_argument("--overwrite", action="store_true", help="with --copy, replace files already in DIR")
    _add_debug(cf)

    bench = _command(sub, "bench", "measure training speed and memory (dense vs sparse vs reference)", "sparsetrain bench train --preset gpt2-small --batch_size 16 --seq_len 1024 --sparsity 0.75")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    _bench_train_arguments(_command(bsub, "train", "training step: plain-loop reference, our dense, our sparse; one process", "sparsetrain bench train --preset gpt2-small --sparsity 0.75 --structure block"))
    bl = _command(
        bsub, "layer", "one linear layer: block-sparse kernels vs cuBLAS, torch BSR and 2:4 (CUDA + Triton)",
        "sparsetrain bench layer --sparsity 0.75", description="Time forward and backward of one block-sparse "
        "linear layer against dense on this GPU.",
    )
    _bench_layer_arguments(bl)
    _add_debug(bl)
    return parser


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", "-p", required=True, type=Path, help="YAML params file")
    p.add_argument("--model_dir", "-o", type=_dir_path,
                   help="checkpoints, params, logs and metrics go here (default: runconfig.model_dir)")
    p.add_argument("--checkpoint_path", type=Path, help="load this checkpoint (outside model_dir: weights only, a warm start)")
    _add_overrides(p)
    _add_debug(p)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a params key (repeatable), e.g. --set runconfig.max_steps=100")
    p.add_argument("--unset", action="append", default=[], metavar="SECTION.KEY",
                   help="delete a key of the params file (repeatable): it takes its default")


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _bench_train_arguments(bt: argparse.ArgumentParser) -> None:
    bt.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    bt.add_argument("--batch_size", type=int, default=16)
    bt.add_argument("--seq_len", type=int, default=1024)
    bt.add_argument("--sparsity", type=float, default=0.75)
    bt.add_argument("--structure", default="unstructured", help='unstructured | block | "N:M" (e.g. 2:4)')
    bt.add_argument("--block_size", type=int, default=128, help="with --structure block: square block side")
    bt.add_argument("--steps", type=int, default=20, help="timed steps")
    bt.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    bt.add_argument("--compile", default="auto", type=_bool_or_auto, help="auto | true | false")
    bt.add_argument("--device", default="auto")
    bt.add_argument("--no_reference", action="store_true", help="skip the plain-loop reference")
    bt.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="params override for our dense and sparse runs, e.g. runconfig.attention=cudnn")
    bt.add_argument("--json", action="store_true")
    _add_debug(bt)


def _bench_layer_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shapes", default="8192x2048,2048x8192", help="weight shapes, out x in, comma separated")
    ap.add_argument("--sparsity", default="0,0.75,0.9", help="block sparsities, comma separated")
    ap.add_argument("--block_size", "--block", type=int, default=128, help="square block side")
    ap.add_argument("--tokens", type=int, default=16384, help="rows of input (batch x context)")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--show", metavar="JSON", help="print the table of a saved --json file and exit (no GPU needed)")


def _dir_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a directory (use . for this one)")
    return Path(text)


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not valid: give a number >= 0 (0: greedy)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid: give 1 or more")
    return value


def _bool_or_auto(text: str) -> str | bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "auto":
        return "auto"
    raise argparse.ArgumentTypeError("expected auto, true or false")
