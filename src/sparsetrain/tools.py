"""``plan``, ``inspect`` and ``finalize``: look at a config or a checkpoint without training.

The ``--json`` shapes are stable, for scripts:

plan:    {"parameters": [{"name", "shape", "numel", "group", "sparsity", "init_method", "pruned", "kept",
                          "structure"}],
          "dense": [names], "flops_per_token": {"dense", "sparse", "ratio"},
          "training_state_bytes": {"dense", "masked_dense", "block_kernels"},
          "sequence_length": {"value", "from"},
          "schedules": [{"group", "algorithm", "rule", "start_sparsity", "updates", "max_steps",
                         "folds": [{"first", "last", "updates", "sparsity", "drop_fraction_first",
                                    "drop_fraction_last"}]}]}
         "schedules" lists dynamic groups (gmp, set, rigl): their update steps up to max_steps
         folded into runs of one level ([] for static sparsity). "sparsity" of a parameter row is
         its level at step 0 (0.0 for a dynamic group that starts dense).
         "structure" is "unstructured", "block" or "N:M" (e.g. "2:4"); N:M rows add "input_dim",
         the dimension the groups run along (the last for our model's weights). Block rows add
         "block_size": [rows, cols], "blocks" (partial edge blocks included), "pruned_blocks"
         (exactly round(sparsity * blocks)) and "pruned_exact": "pruned" is exact except for
         topk blocks on a shape with partial edge blocks (it depends on which blocks the weights
         pick): then it is an estimate that prunes the smallest (edge) blocks first, as topk does
         on freshly initialised weights, and "pruned_exact" is false. "gpu_kernels" (block rows)
         says whether the weight runs on the block-sparse GPU kernels (an nn.Linear weight of
         whole blocks with sides 16..256, powers of two; see sparsetrain.sparsity.block_linear).
         "training_state_bytes": fp32 weights, gradients and optimizer state (sparsetrain.memory):
         all dense, this plan masked dense, and this plan on a GPU with the block kernels (null
         when no weight runs on them).
inspect: {"global_step", "tensors": [{"name", "shape", "numel", "nan", "zero", "sparsity", "nonfinite"}],
          "total": {"numel", "nan", "sparsity"}}
         plus "dynamic_sparsity": {"updates_done": {group: n}, "last_update"} for a dynamic run's checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain.config import GroupSettings, Params
from sparsetrain.config.params import as_written
from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.flops import flops_report
from sparsetrain.memory import plan_memory
from sparsetrain.sparsity import nan_format, plans
from sparsetrain.sparsity.select import select_for_model


def _vocab_size(params: Params) -> int:
    """The model's vocabulary without training a tokenizer: a dry run must be instant."""
    if params.model.vocab_size is not None:
        return params.model.vocab_size
    inp = params.train_input
    if inp.source == "shards":
        from sparsetrain.data import read_shard_meta

        if not inp.data_path:
            raise ConfigError(f"{inp.section}.data_path: required with source: shards (the shard directory)")
        return int(read_shard_meta(Path(inp.data_path), inp.section)["vocab_size"])
    if inp.tokenizer == "byte":
        return 256
    if inp.tokenizer == "bpe":
        return inp.bpe_vocab_size  # an upper bound: the trained BPE may come out smaller
    from sparsetrain.data import load_tokenizer

    return load_tokenizer(inp, None).vocab_size


def plan(params: Params) -> dict[str, Any]:
    """Every sparsified parameter with its settings and counts, the dense ones, FLOPs per token."""
    from sparsetrain.model import GPT

    cfg = dataclasses.replace(params.model, vocab_size=_vocab_size(params))
    with torch.device("meta"):  # shapes only: no memory, even for gpt3-xl
        model = GPT(cfg)
    config = params.sparsity
    with as_written(params):  # errors name the params file and the key as it wrote it
        settings = select_for_model(model, config) if config is not None else {}
    selection = plans.plan_for(model, settings)
    rows = [entry.to_dict() for entry in selection.entries]
    dense, dense_numel = list(selection.dense), selection.dense_numel
    fractions = {entry.name: entry.pruned / entry.numel for entry in selection.entries}
    seq_len, seq_from = sequence_length(params)
    flops = flops_report(cfg, seq_len, fractions)
    memory = plan_memory(rows, dense_numel, params.optimizer, sparse=config is not None)
    return {"parameters": rows, "dense": dense, "flops_per_token": flops, "training_state_bytes": memory,
            "sequence_length": {"value": seq_len, "from": seq_from},
            "schedules": dynamic_schedules(settings, params.runconfig.max_steps)}


def dynamic_schedules(settings: dict[str, GroupSettings], max_steps: int) -> list[dict[str, Any]]:
    """Per dynamic group: its rule, the density at the start, and its update steps up to
    ``max_steps`` folded into runs of one level (cycling and drop fractions at both ends)."""
    out, seen = [], set()
    for g in settings.values():
        if g.dynamic is None or g.group in seen:
            continue
        seen.add(g.group)
        d = g.dynamic
        steps = d.update.steps_until(max_steps)
        folds: list[dict[str, Any]] = []
        reached = g.target
        for j, step in enumerate(steps):
            level, drop = d.level(step, j), d.drop(step, j)
            if d.algorithm == "gmp":  # GMP never regrows: its masks keep the highest level so far
                level = reached = max(reached, level)
            if folds and abs(folds[-1]["sparsity"] - level) < 5e-5:
                folds[-1].update(last=step, updates=folds[-1]["updates"] + 1, drop_fraction_last=drop)
            else:
                folds.append({"first": step, "last": step, "updates": 1, "sparsity": level,
                              "drop_fraction_first": drop, "drop_fraction_last": drop})
        out.append({"group": g.group, "algorithm": d.algorithm, "rule": d.describe(), "start_sparsity": g.target,
                    "updates": len(steps), "max_steps": max_steps, "folds": folds})
    return out


def sequence_length(params: Params) -> tuple[int, str]:
    """The training context length and where it comes from: the params, else (the zoo's GPT-3
    files) the HDF5 data's samples, else, when that data is not here, max_position_embeddings."""
    inp = params.train_input
    if inp.max_sequence_length is not None:
        return inp.max_sequence_length, "train_input.max_sequence_length"
    from sparsetrain.data import hdf5_stream
    from sparsetrain.errors import UserError

    try:
        return hdf5_stream(inp).seq_len, "the train_input data"
    except UserError as e:
        return params.model.max_position_embeddings, f"model.max_position_embeddings (the data is not readable here: {e})"


def format_plan(report: dict[str, Any]) -> str:
    rows = report["parameters"]
    lines = [*plans.plan_table(rows), plans.totals_line(rows)]
    if any(r.get("gpu_kernels") for r in rows):
        lines.append("* runs on the block-sparse GPU kernels (CUDA, bf16/fp16 autocast, runconfig.sparse_kernels: auto)")
    if any(r.get("structure") == "block" and not r.get("gpu_kernels") for r in rows):
        lines.append("block weights without * train masked dense (no speedup): the kernels need whole blocks "
                     "with sides 16..256, powers of two")
    if any(r.get("pruned_exact") is False for r in rows):
        lines.append("~ topk blocks with partial edge blocks: the entry count depends on which blocks are kept (estimate)")
    lines.append(f"left dense ({len(report['dense'])}): {', '.join(report['dense'])}")
    seq = report["sequence_length"]
    lines.append(f"sequence length: {seq['value']} (from {seq['from']})")
    f = report["flops_per_token"]
    lines.append(f"training FLOPs per token: dense {f['dense']:.4g}, sparse {f['sparse']:.4g}, ratio {f['ratio']:.2f}x")
    shown: dict[str, list[str]] = {}  # groups with the same schedule are listed once
    for sch in report.get("schedules", []):
        key = json.dumps({k: v for k, v in sch.items() if k != "group"}, sort_keys=True)
        shown.setdefault(key, []).append(sch["group"])
    for key, groups in shown.items():
        sch = json.loads(key)
        names = ", ".join(repr(g) for g in groups)
        lines.append(f"dynamic {names}: {sch['rule']}; {sch['updates']} updates in {sch['max_steps']} steps")
        lines.append(f"  step 0: sparsity {sch['start_sparsity']:.4f}")
        for f_ in sch["folds"][:12]:
            span = f"step {f_['first']}" if f_["updates"] == 1 else f"steps {f_['first']}..{f_['last']} ({f_['updates']} updates)"
            text = f"  {span}: sparsity {f_['sparsity']:.4f}"
            if sch["algorithm"] != "gmp":
                a, b = f_["drop_fraction_first"], f_["drop_fraction_last"]
                text += f", drop_fraction {a:.4f}" + ("" if f_["updates"] == 1 else f" -> {b:.4f}")
            lines.append(text)
        if len(sch["folds"]) > 12:
            lines.append(f"  ... {len(sch['folds']) - 12} more runs of levels")
    m = report["training_state_bytes"]
    text = f"training state (fp32 weights, gradients, optimizer; not activations): dense {_gib(m['dense'])}"
    text += f", this plan {_gib(m['masked_dense'])}"
    if m["block_kernels"] is not None:
        text += f" (masked dense), {_gib(m['block_kernels'])} on a GPU with the block kernels"
    lines.append(text)
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def _sparsified_names(state: dict[str, Any]) -> set[str] | None:
    """Names the checkpoint's own ``sparsity:`` block sparsifies (None: no usable params)."""
    raw = state.get("params")
    if not isinstance(raw, dict):
        return None
    if not raw.get("sparsity"):
        return set()
    from sparsetrain.config import params_from_dict
    from sparsetrain.errors import UserError

    try:
        return {r["name"] for r in plan(params_from_dict(copy.deepcopy(raw)))["parameters"]}
    except (UserError, KeyError, TypeError):
        return None


def inspect(path: Path) -> dict[str, Any]:
    """Per-tensor NaN (pruned) and zero counts of a checkpoint's model state (ours, or the zoo's
    ``.mdl`` in any sparsity form, or its ``cstorch.save`` HDF5 container where h5py reads it).

    ``nonfinite`` counts values that are not pruning: every inf, and NaN in a tensor the
    checkpoint's own ``sparsity:`` block does not sparsify (without params: in 1-D tensors).
    """
    from sparsetrain.sparsity.zoo_checkpoints import is_zoo_checkpoint, masked_model_view, read_any_checkpoint

    state = read_any_checkpoint(path)
    sparsified = _sparsified_names(state)
    # A zoo checkpoint's masks (2.0-2.1 optimizer state, 2.2+ buffers) count as NaN, as ours.
    model = masked_model_view(state) if is_zoo_checkpoint(state) else state["model"]
    tensors, seen = [], set()
    total_numel = total_nan = 0
    for name, t in model.items():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # a tied weight stored under two names: count it once
            continue
        seen.add(key)
        floating = t.is_floating_point()
        nan = int(torch.isnan(t).sum()) if floating else 0
        inf = int(torch.isinf(t).sum()) if floating else 0
        pruning = name in sparsified if sparsified is not None else t.dim() > 1
        tensors.append({
            "name": name, "shape": list(t.shape), "numel": t.numel(), "nan": nan,
            "zero": int((t == 0).sum()), "sparsity": nan / t.numel() if t.numel() else 0.0,
            "nonfinite": inf + (0 if pruning else nan),
        })
        total_numel += t.numel()
        total_nan += nan
    total = {"numel": total_numel, "nan": total_nan, "sparsity": total_nan / max(total_numel, 1)}
    report = {"global_step": state["global_step"], "tensors": tensors, "total": total}
    if isinstance(state.get("dynamic_sparsity"), dict):  # a dynamic run: where its schedule stands
        dyn = state["dynamic_sparsity"]
        report["dynamic_sparsity"] = {"updates_done": dyn.get("updates_done", {}), "last_update": dyn.get("last_update")}
    return report


def format_inspect(report: dict[str, Any]) -> str:
    lines = [f"global step {report['global_step']}", f"{'tensor':<34} {'shape':<14} {'numel':>12} {'nan':>12} {'zero':>10} {'sparsity':>8}"]
    for t in report["tensors"]:
        shape = "x".join(map(str, t["shape"]))
        bad = f"  {t['nonfinite']:,} non-finite values that are not pruning" if t.get("nonfinite") else ""
        lines.append(f"{t['name']:<34} {shape:<14} {t['numel']:>12,} {t['nan']:>12,} {t['zero']:>10,} {t['sparsity']:>8.3f}{bad}")
    tot = report["total"]
    lines.append(f"total: {tot['numel']:,} entries, {tot['nan']:,} NaN (pruned), sparsity {tot['sparsity']:.3f}")
    if "dynamic_sparsity" in report:
        dyn = report["dynamic_sparsity"]
        done = ", ".join(f"{g} {n}" for g, n in dyn["updates_done"].items())
        lines.append(f"dynamic sparsity: updates done per group: {done}; last update at step {dyn['last_update']}")
    return "\n".join(lines)


def finalize(src: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """NaN -> 0 everywhere: a dense checkpoint for other tools (``.safetensors``: weights only).

    The output is written atomically (a reader never sees half a file) and only where nothing is
    lost: see :func:`check_output`."""
    out = Path(out)
    check_output(out, Path(src), overwrite)
    state = ckpt.load_checkpoint(src)
    dense = nan_format.densify(state)
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        weights = {k: v.contiguous().clone() for k, v in dense["model"].items() if isinstance(v, torch.Tensor)}
        meta = {"global_step": str(state["global_step"]), "format": ckpt.SAFETENSORS_FORMAT}
        if "params" in state:
            meta["params"] = json.dumps(state["params"])
        blob = save(weights, metadata=meta)
        ckpt.write_atomically(out, lambda f: f.write(blob))
    else:
        ckpt.save_checkpoint(dense, out)
    return {"input": str(src), "output": str(out), "global_step": state["global_step"]}


def check_output(out: Path, src: Path, overwrite: bool) -> None:
    """Refuse, in one line, an output path where writing would lose something or mislead:

    - its directory is missing, or the path is a directory;
    - something other than a regular file is there (a FIFO, a device such as ``/dev/full``, a
      socket): never replaced, even with ``overwrite``;
    - a file is there and ``overwrite`` is not given (``--overwrite``), or it is the input;
    - the name is ``checkpoint_<step>.mdl`` in a model_dir (a directory holding checkpoints or a
      params.yaml): the next resume would load the dense copy as the run's newest checkpoint.
    """
    if out.is_dir():
        raise CheckpointError(f"-o {out}: is a directory; give a file path, e.g. {out / 'dense.mdl'}")
    if out.suffix not in (".mdl", ".safetensors"):
        raise CheckpointError(f"-o {out}: choose a name ending in .mdl (same layout) or .safetensors (weights only)")
    if not out.parent.is_dir():
        raise CheckpointError(f"-o {out}: the directory {out.parent} does not exist; create it first")
    if os.path.lexists(out):
        if out.is_symlink() and not out.exists():
            raise CheckpointError(f"-o {out}: a symbolic link to {os.readlink(out)}, which does not exist; remove it or "
                                  "choose another -o path")
        if not out.is_file():
            raise CheckpointError(f"-o {out}: is not a regular file (a FIFO, device or socket); finalize never replaces one")
        if out.resolve() == src.resolve():
            raise CheckpointError(f"-o {out}: finalize would overwrite its input; choose another -o path")
        if not overwrite:
            raise CheckpointError(f"-o {out}: already exists; pass --overwrite to replace it, or choose another -o path")
    m = ckpt.CHECKPOINT_RE.match(out.name)
    if m and (ckpt.list_checkpoints(out.parent) or (out.parent / "params.yaml").exists()):
        raise CheckpointError(
            f"-o {out}: a checkpoint name in a model_dir, which the next resume would load as the run's "
            f"checkpoint; choose another name, e.g. {out.parent / f'dense_{m.group(1)}.mdl'}"
        )
