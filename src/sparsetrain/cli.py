"""Command line: ``sparsetrain <command>`` (``python run.py``, the zoo's form, is in ``zoo_cli``).

Each subcommand is a short function in :data:`COMMANDS`; :func:`build_parser` declares its
arguments. User errors (bad params, data, checkpoints) print one line, ``error: ...``, and exit
with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sparsetrain.config import PRESETS
from sparsetrain.errors import UserError

log = logging.getLogger("sparsetrain")
MODES = ("train", "eval", "train_and_eval", "eval_all")


# -- the subcommands -------------------------------------------------------------------------------


def run_mode(args: argparse.Namespace) -> int:
    """``train`` | ``eval`` | ``train_and_eval``: one run on ``--model_dir`` (resumes there)."""
    from sparsetrain import distributed, training
    from sparsetrain.config import dump_params, load_params
    from sparsetrain.training.loop import format_summary
    from sparsetrain.training.metrics import setup_logging

    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK; rank 0 talks and writes
    params = load_params(args.params, args.overrides, args.unset)
    model_dir = _prepare_model_dir(_model_dir(args, params))
    setup_logging(model_dir if main_rank else None, verbose=main_rank)
    _log_no_effect(params)
    if args.command == "eval_all":
        return _eval_all(params, model_dir, args, main_rank)
    run = training.setup(params, model_dir, checkpoint_path=args.checkpoint_path, train=args.command != "eval")
    try:
        if main_rank:
            _write_text(model_dir / "params.yaml", dump_params(params, args.overrides, args.unset))
        _log_start(run)
        history = _evaluate_only(run) if args.command == "eval" else _train(run, args.command, main_rank)
        if run.sparsifier is not None:  # every rank: with FSDP the statistics gather shards
            history["sparsity_groups"] = run.sparsifier.group_stats()
    finally:
        run.metrics.close()
        # Drop the DDP wrapper (its reducer holds the process group) before the group goes:
        # destroying it afterwards can hang at exit.
        run.forward, run.ddp = run.model, None
        distributed.shutdown(run.dist)
    if main_rank:
        print(format_summary(run, history))
    return 0


def _eval_all(params, model_dir: Path, args: argparse.Namespace, main_rank: bool) -> int:
    """The zoo's ``eval_all``: every checkpoint of ``model_dir`` evaluated, oldest first."""
    import copy

    from sparsetrain import checkpoint as ckpt
    from sparsetrain import distributed, training

    found = ckpt.list_checkpoints(model_dir)
    if args.checkpoint_path is not None or not found:
        raise UserError(f"--mode eval_all: evaluates the checkpoints in {model_dir}; there are none" if not found
                        else "--mode eval_all: evaluates every checkpoint in model_dir; drop --checkpoint_path")
    results = []
    for step, path in found:
        run = training.setup(copy.deepcopy(params), model_dir, checkpoint_path=path, train=False)
        try:
            results.append({"step": step, "checkpoint": str(path), **training.evaluate(run)})
        finally:
            run.metrics.close()
            distributed.shutdown(run.dist)
    if main_rank:
        for r in results:
            print(json.dumps(r))
    return 0


def generate(args: argparse.Namespace) -> int:
    """Sample text from the newest (or a given) checkpoint of a model_dir."""
    import torch

    from sparsetrain import training
    from sparsetrain.config import load_params
    from sparsetrain.training.metrics import setup_logging

    setup_logging(None, verbose=False)
    params_file = args.model_dir / "params.yaml"
    if not params_file.exists():
        raise UserError(f"--model_dir {args.model_dir}: no params.yaml there; is it a sparsetrain model_dir?")
    params = load_params(params_file)
    params.runconfig.compile = False
    run = training.setup(params, args.model_dir, checkpoint_path=args.checkpoint_path, train=False, evaluate=False,
                         write_metrics=False)
    if run.loaded_from is None:
        raise UserError(f"--model_dir {args.model_dir}: no checkpoint to sample from; train first")
    ids = run.tokenizer.encode(args.prompt) or [run.tokenizer.eos_id]
    gen = torch.Generator(device=run.device).manual_seed(args.seed)
    idx = torch.tensor([ids], device=run.device)
    run.model.eval()
    with run.autocast():
        out = run.model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator=gen)
    print(run.tokenizer.decode(out[0].tolist()))
    return 0


def prepare(args: argparse.Namespace) -> int:
    """Tokenize the source of a params file's ``train_input`` into token shards."""
    import dataclasses

    from sparsetrain import data
    from sparsetrain.config import load_params
    from sparsetrain.training.metrics import setup_logging

    setup_logging(None)
    inp = load_params(args.params, args.overrides, args.unset).train_input
    inp = dataclasses.replace(inp, split=inp.split or "all")
    if args.format == "zoo-hdf5":
        seq_len = args.seq_len or inp.max_sequence_length
        if seq_len is None or seq_len < 1:
            raise UserError(f"--seq_len: {seq_len}: give a positive number of tokens per sample "
                            "(or train_input.max_sequence_length)")
        tokenizer = data.load_tokenizer(inp, None)
        files = data.prepare_zoo_hdf5(inp, tokenizer, args.output, seq_len)
        print(json.dumps({"format": "zoo-hdf5", "files": [str(f) for f in files], "max_sequence_length": seq_len}, indent=2))
        return 0
    meta = data.prepare_shards(inp, args.output, inp.tokenizer, inp.bpe_vocab_size)
    print(json.dumps(meta, indent=2))
    return 0


def convert_params(args: argparse.Namespace) -> int:
    """A params file (the zoo's, any layout) written in our layout: the same run, every key explicit."""
    from sparsetrain.config import dump_params, load_params

    params = load_params(args.params, args.overrides, args.unset)
    text = dump_params(params, args.overrides, args.unset)
    if args.output is None:
        print(text, end="")
    else:
        _write_text(args.output, text)
        print(f"wrote {args.output} ({params.layout} layout -> ours; {len(params.no_effect)} keys with no effect on GPUs)")
    return 0


def plan(args: argparse.Namespace) -> int:
    from sparsetrain import tools
    from sparsetrain.config import load_params

    params = load_params(args.params, args.overrides, args.unset)
    report = tools.plan(params)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(tools.format_plan(report))
        if params.no_effect:
            print(no_effect_line(params))
    return 0


def inspect(args: argparse.Namespace) -> int:
    from sparsetrain import tools

    report = tools.inspect(args.checkpoint)
    print(json.dumps(report, indent=2) if args.json else tools.format_inspect(report))
    return 0


def finalize(args: argparse.Namespace) -> int:
    from sparsetrain import tools

    result = tools.finalize(args.input, args.output)
    print(f"wrote dense checkpoint {result['output']} (step {result['global_step']}, NaN -> 0)")
    return 0


def bench_train(args: argparse.Namespace) -> int:
    from sparsetrain.bench.train import main_bench

    return main_bench(args)


def bench_layer(args: argparse.Namespace) -> int:
    from sparsetrain.bench.layer import main_bench_layer

    return main_bench_layer(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    **dict.fromkeys(MODES, run_mode),
    "generate": generate,
    "prepare": prepare,
    "convert-params": convert_params,
    "plan": plan,
    "inspect": inspect,
    "finalize": finalize,
    "bench train": bench_train,
    "bench layer": bench_layer,
}


# -- helpers of run_mode ---------------------------------------------------------------------------


def no_effect_line(params) -> str:
    return f"zoo keys with no effect on GPUs (accepted, ignored): {', '.join(params.no_effect)}"


def _log_no_effect(params) -> None:
    if params.no_effect:
        log.info("%s", no_effect_line(params))


def _model_dir(args: argparse.Namespace, params) -> Path:
    """``--model_dir``, else the params' ``runconfig.model_dir`` (the zoo's way)."""
    if args.model_dir is not None:
        return args.model_dir
    if params.runconfig.model_dir:
        return Path(params.runconfig.model_dir)
    raise UserError("--model_dir: required (or runconfig.model_dir in the params file)")


def _log_start(run) -> None:
    from sparsetrain.sparsity.block_linear import dense_numel

    log.info(
        "model: %s parameters on %s (%s%s%s); %s",
        f"{dense_numel(run.model):,}", run.device, run.precision, ", compiled" if run.compiled else "",
        f", {run.dist.mode.upper()} x{run.dist.world_size}" if run.dist.active else "",
        f"resuming at step {run.step}" if run.step else "starting at step 0",
    )


def _evaluate_only(run) -> dict:
    from sparsetrain import training

    if run.loaded_from is None:
        raise UserError(f"{run.model_dir}: no checkpoint to evaluate; train first or pass --checkpoint_path")
    return {"eval": training.evaluate(run), "steps_run": 0, "start_step": run.step}


def _train(run, command: str, main_rank: bool) -> dict:
    from sparsetrain import training

    rc = run.params.runconfig
    return training.fit(run, do_eval=True, eval_frequency=rc.eval_frequency if command == "train_and_eval" else 0,
                        progress=_progress_factory(rc.progress and main_rank))


def _progress_factory(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return lambda initial, total: tqdm(initial=initial, total=total, desc="train", unit="step", dynamic_ncols=True)


def _prepare_model_dir(model_dir: Path) -> Path:
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        probe = model_dir / f".write_test.{os.getpid()}"  # per process: torchrun ranks probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--model_dir {model_dir}: cannot write there ({e.strerror or e})") from None
    return model_dir


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


# -- arguments -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsetrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mode, text in zip(MODES, ("train (resumes from model_dir)", "evaluate the latest checkpoint", "train, evaluating as it goes",
                                  "evaluate every checkpoint in model_dir, oldest first")):
        _add_run_args(sub.add_parser(mode, help=text))

    g = sub.add_parser("generate", help="sample text from a trained model")
    g.add_argument("--model_dir", "-o", required=True, type=Path)
    g.add_argument("--checkpoint_path", type=Path, help="default: the newest checkpoint in model_dir")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max_new_tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top_k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    _add_debug(g)

    pr = sub.add_parser("prepare", help="tokenize a text source into memory-mapped token shards")
    pr.add_argument("--params", "-p", required=True, type=Path, help="its train_input names the source and tokenizer")
    pr.add_argument("--output", required=True, type=Path, help="directory for the shards and meta.json")
    pr.add_argument("--format", choices=("shards", "zoo-hdf5"), default="shards",
                    help="shards (ours, memory-mapped) | zoo-hdf5 (the zoo's .h5 sample form, for GptHDF5MapDataProcessor)")
    pr.add_argument("--seq_len", type=int, help="zoo-hdf5: tokens per sample (default: train_input.max_sequence_length)")
    _add_overrides(pr)
    _add_debug(pr)

    cp = sub.add_parser("convert-params", help="write a params file (the zoo's, any layout) in our layout")
    cp.add_argument("params", type=Path, help="YAML params file")
    cp.add_argument("-o", "--output", type=Path, help="where to write (default: print)")
    _add_overrides(cp)
    _add_debug(cp)

    pl = sub.add_parser("plan", help="dry run: which weights a params file sparsifies, and the FLOPs")
    pl.add_argument("--params", "-p", required=True, type=Path)
    _add_overrides(pl)
    pl.add_argument("--json", action="store_true", help="machine-readable output (stable shape)")
    _add_debug(pl)

    ins = sub.add_parser("inspect", help="per-tensor NaN (pruned) counts and sparsity of a checkpoint")
    ins.add_argument("checkpoint", type=Path)
    ins.add_argument("--json", action="store_true", help="machine-readable output (stable shape)")
    _add_debug(ins)

    fin = sub.add_parser("finalize", help="NaN -> 0: a dense checkpoint for other tools")
    fin.add_argument("-i", "--input", required=True, type=Path, help="sparse checkpoint")
    fin.add_argument("-o", "--output", required=True, type=Path, help=".mdl (same layout) or .safetensors (weights)")
    _add_debug(fin)

    bench = sub.add_parser("bench", help="measure training speed and memory (dense vs sparse vs reference)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    _bench_train_arguments(bsub.add_parser("train", help="training step: plain-loop reference, our dense, our sparse; one process"))
    bl = bsub.add_parser(
        "layer", help="one linear layer: block-sparse kernels vs cuBLAS, torch BSR and 2:4 (CUDA + Triton)",
        description="Time forward and backward of one block-sparse linear layer against dense on this GPU.",
    )
    _bench_layer_arguments(bl)
    _add_debug(bl)
    return parser


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", "-p", required=True, type=Path, help="YAML params file")
    p.add_argument("--model_dir", "-o", type=Path,
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


def _bool_or_auto(text: str) -> str | bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "auto":
        return "auto"
    raise argparse.ArgumentTypeError("expected auto, true or false")


# -- entry points ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = f"bench {args.bench_command}" if args.command == "bench" else args.command
    try:
        return COMMANDS[command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
