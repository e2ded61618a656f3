"""The zoo's command line, ``python run.py [CPU|GPU] --mode MODE --params X.yaml --model_dir D``,
forwarded to :func:`sparsetrain.cli.main`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sparsetrain.cli import MODES, main

DEVICE_WORDS = {"CPU": "cpu", "GPU": "cuda"}


def run_py(argv: Sequence[str] | None = None) -> int:
    """``python run.py [CPU|GPU] --mode train --params X.yaml --model_dir D``: the zoo's command line.

    The zoo's device word is optional (``CPU``, ``GPU``; ``CSX`` is refused), ``--mode`` takes the
    zoo's ``eval_all`` too, ``--validate_only`` is a dry run (``plan``) and ``--compile_only``
    is refused (there is no separate compile step on a GPU).
    """
    p = _OneLineParser(prog="run.py", description="Train or evaluate a (sparse) GPT model.")
    p.add_argument("device", nargs="?", type=str.upper, metavar="{CPU,GPU}", help="the zoo's device word (optional)")
    p.add_argument("--mode", "-m", choices=MODES)
    p.add_argument("--params", "-p", required=True)
    p.add_argument("--model_dir", "-o")
    p.add_argument("--checkpoint_path")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--unset", action="append", default=[])
    p.add_argument("--validate_only", action="store_true", help="check the params and show the plan; no training")
    p.add_argument("--compile_only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max_steps", type=int, help="the zoo's flag: runconfig.max_steps")
    p.add_argument("--eval_steps", type=int, help="the zoo's flag: runconfig.eval_steps")
    p.add_argument("--debug", action="store_true")
    try:
        a, unknown = p.parse_known_args(argv)
    except SystemExit as e:  # --help, or the one-line error above
        return int(e.code or 0)
    if unknown:
        flag = unknown[0].split("=")[0]
        why = ("not a flag built here (the zoo's Cerebras-system flags have no effect on a GPU; settings go in "
               "the params file or --set SECTION.KEY=VALUE)") if flag.startswith("-") else "unexpected argument"
        print(f"error: {flag}: {why}", file=sys.stderr)
        return 2
    for key in ("max_steps", "eval_steps"):
        if getattr(a, key) is not None:
            a.overrides.append(f"runconfig.{key}={getattr(a, key)}")
    problem = _run_py_problem(a)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    extra = [x for o in a.overrides for x in ("--set", o)] + [x for u in a.unset for x in ("--unset", u)]
    if a.device in DEVICE_WORDS:
        extra += ["--set", f"runconfig.device={DEVICE_WORDS[a.device]}"]
    extra += ["--debug"] if a.debug else []
    if a.validate_only:
        return main(["plan", "--params", a.params, *extra])
    forwarded = [a.mode, "--params", a.params]
    forwarded += ["--model_dir", a.model_dir] if a.model_dir else []
    forwarded += ["--checkpoint_path", a.checkpoint_path] if a.checkpoint_path else []
    return main(forwarded + extra)


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line, ``error: ...``, exit status 2 (argparse prints its usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _run_py_problem(a: argparse.Namespace) -> str | None:
    if a.device == "CSX":
        return "CSX: the Cerebras wafer-scale system is not a target here; use GPU or CPU (or leave the word out)"
    if a.device is not None and a.device not in DEVICE_WORDS:
        return f"{a.device}: not a device word; use GPU or CPU (or leave it out)"
    if a.compile_only:
        return "--compile_only: there is no separate compile step on a GPU (torch.compile runs in the first steps); use --validate_only for a dry run"
    if a.mode is None and not a.validate_only:
        return f"--mode: required, one of {', '.join(MODES)}"
    return None
