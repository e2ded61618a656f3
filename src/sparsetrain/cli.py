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

from sparsetrain.cli_args import MODES, build_parser
from sparsetrain.errors import UserError

log = logging.getLogger("sparsetrain")


# -- the subcommands -------------------------------------------------------------------------------


def run_mode(args: argparse.Namespace) -> int:
    """``train`` | ``eval`` | ``train_and_eval``: one run on ``--model_dir`` (resumes there)."""
    from sparsetrain import training
    from sparsetrain.config.run_params import load_with_checkpoint_dir
    from sparsetrain.training.metrics import setup_logging
    from sparsetrain.training.model_dir import ModelDirLock, command_line

    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK; rank 0 talks and writes
    # a Hugging Face directory as --checkpoint_path is model.init_from
    params, args.checkpoint_path = load_with_checkpoint_dir(args.params, args.overrides, args.unset, args.checkpoint_path)
    model_dir = _model_dir(args, params)
    nothing = args.command == "eval_all" or params.model.init_from is None
    if args.command in ("eval", "eval_all") and args.checkpoint_path is None and nothing and not _has_checkpoints(model_dir):
        raise UserError(f"--model_dir {model_dir}: no checkpoint to evaluate; train first or pass --checkpoint_path")
    created = not model_dir.exists()
    _prepare_model_dir(model_dir, args.command)
    lock = ModelDirLock(model_dir)
    try:
        if main_rank:  # one writer per model_dir; torchrun's ranks are one run
            lock.acquire(command_line())
        setup_logging(model_dir if main_rank else None, verbose=main_rank)
        _log_no_effect(params)
        if args.command == "eval_all":
            return _eval_all(params, model_dir, args, main_rank)
        try:
            run = training.setup(params, model_dir, checkpoint_path=args.checkpoint_path, train=args.command != "eval")
        except (UserError, KeyboardInterrupt):
            if created and main_rank:  # nothing happened: leave no model_dir behind
                setup_logging(None, verbose=main_rank)
                _remove_new_model_dir(model_dir, lock)
            raise
        return _run(run, args, params, model_dir, main_rank)
    finally:
        lock.release()


def _run(run, args: argparse.Namespace, params, model_dir: Path, main_rank: bool) -> int:
    """The set-up run's training or evaluation, its summary, and the processes' end."""
    from sparsetrain import distributed
    from sparsetrain.config import dump_params
    from sparsetrain.training.loop import format_summary

    try:
        if main_rank and args.command != "eval" and run.step < params.runconfig.max_steps:
            _write_params_record(model_dir / "params.yaml", Path(args.params), dump_params(params, args.overrides, args.unset))
        _log_start(run, args.command)
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
        if args.command != "eval":
            from sparsetrain.compare import write_loss_png  # never fails the run

            write_loss_png(model_dir)
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

    result = tools.finalize(args.input, args.output, overwrite=args.overwrite)
    print(f"wrote dense checkpoint {result['output']} (step {result['global_step']}, NaN -> 0)")
    return 0


def export(args: argparse.Namespace) -> int:
    from sparsetrain.hf import export_hf

    result = export_hf(args.input, args.output, overwrite=args.overwrite)
    print(f"wrote Hugging Face GPT-2 directory {result['output']} (step {result['global_step']}, "
          f"{result['sparsified_tensors']} sparse tensors, pruned weights exact zeros, masks in sparsity_masks.safetensors)")
    return 0


def compare(args: argparse.Namespace) -> int:
    from sparsetrain.compare import compare_runs

    return compare_runs(args.runs, x=args.x, out=args.out, as_json=args.json)


def configs(args: argparse.Namespace) -> int:
    from sparsetrain.config.builtin import configs_command

    return configs_command(args.names, copy_to=args.copy, overwrite=args.overwrite)


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
    "export": export,
    "compare": compare,
    "configs": configs,
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


def _log_start(run, command: str) -> None:
    from sparsetrain.sparsity.block_linear import dense_numel

    if command == "eval":
        what = f"evaluating {run.loaded_from} (step {run.step})" if run.loaded_from else "evaluating"
    else:
        what = f"resuming at step {run.step}" if run.step else "starting at step 0"
    log.info(
        "model: %s parameters on %s (%s%s%s); %s",
        f"{dense_numel(run.model):,}", run.device, run.precision, ", compiled" if run.compiled else "",
        f", {run.dist.mode.upper()} x{run.dist.world_size}" if run.dist.active else "", what,
    )


def _evaluate_only(run) -> dict:
    from sparsetrain import training

    if run.loaded_from is None:
        raise UserError(f"{run.model_dir}: no checkpoint to evaluate; train first or pass --checkpoint_path")
    return {"eval": training.evaluate(run), "steps_run": 0, "start_step": run.step, "evaluated": run.loaded_from}


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


def _has_checkpoints(model_dir: Path) -> bool:
    from sparsetrain import checkpoint as ckpt

    return bool(ckpt.list_checkpoints(model_dir))


def _prepare_model_dir(model_dir: Path, command: str) -> Path:
    """Create ``model_dir`` if needed and check it is a directory this process can write (its lock,
    train.log and metrics go there, for an evaluation too)."""
    if model_dir.is_symlink() and not model_dir.exists():
        raise UserError(f"--model_dir {model_dir}: a symbolic link to {os.readlink(model_dir)}, which does not exist")
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"--model_dir {model_dir}: is a file, not a directory; give a directory (it is created if missing)")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        probe = model_dir / f".write_test.{os.getpid()}"  # per process: torchrun ranks probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        hint = ""
        if command.startswith("eval") and model_dir.is_dir():
            hint = ("; an evaluation writes its records there: to evaluate a checkpoint of it, pass that as "
                    "--checkpoint_path with a --model_dir you can write")
        raise UserError(f"--model_dir {model_dir}: cannot write there ({e.strerror or e}){hint}") from None
    return model_dir


def _remove_new_model_dir(model_dir: Path, lock) -> None:
    """Undo the model_dir a failed setup created: its log and lock, and the folder if then empty."""
    from sparsetrain.training.model_dir import LOCK_NAME

    lock.release()
    for name in ("train.log", LOCK_NAME):
        (model_dir / name).unlink(missing_ok=True)
    try:
        model_dir.rmdir()
    except OSError:
        pass  # something else is there now: not ours to remove


PARAMS_RECORD_HEADER = "# resolved params written by sparsetrain"


def _write_params_record(path: Path, given: Path, text: str) -> None:
    """model_dir/params.yaml records the params a training ran with (written only when it trains:
    eval and a run with nothing left to train leave it). A params file of the user's own at that
    path (not one we wrote) is never replaced."""
    try:
        ours = path.read_text(encoding="utf-8").startswith(PARAMS_RECORD_HEADER)
    except FileNotFoundError:
        ours = True
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        same = given.exists() and path.exists() and given.resolve() == path.resolve()
        log.warning("%s: %s, not a record sparsetrain wrote: left as it is (the resolved params are in each "
                    "checkpoint)", path, "the params file given" if same else "a file of yours")
        return
    _write_text(path, text)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


# -- entry points ----------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (whose own handler checkpoints first): unwinds like Ctrl-C,
    so setup's clean-up runs and the command ends with one line."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    command = f"bench {args.bench_command}" if args.command == "bench" else args.command
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return COMMANDS[command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside the training loop (setup, evaluation)
        if args.debug:
            raise
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: stopped before finishing; checkpoints already written are intact "
              "(a training stopped in its loop writes one first)", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
