"""``sparsetrain bench train``: dense vs sparse training steps (and a plain-loop reference), one process.

Everything is measured in one invocation, so the ratios are one measurement on one machine state:

1. the plain PyTorch reference loop of :mod:`sparsetrain.bench.reference_loop` (nanoGPT's settings);
2. our dense training step: :func:`sparsetrain.training.train_step` on a run built by
   :func:`sparsetrain.training.setup`, i.e. the normal training path with its real data pipeline;
3. the same with a ``sparsity:`` block (default heuristic, ``topk``) at ``--sparsity``.

Step times come from CUDA events around ``--steps`` steps after ``--warmup`` steps (which absorb
``torch.compile``); MFU counts the FLOPs the GPU executes against the device's peak bf16 rate.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparsetrain import data
from sparsetrain import training as tr
from sparsetrain.bench import reference_loop as ref
from sparsetrain.bench.timing import peak_memory, reset_memory, time_steps
from sparsetrain.config import PRESETS, apply_overrides, params_from_dict, parse_sparsity
from sparsetrain.sparsity.block_linear import packed_layers, state_dict_names
from sparsetrain.sparsity.select import select_for_model
from sparsetrain.training.build import compile_enabled
from sparsetrain.training.loop import peak_flops

BENCH_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does, for both sides
# The weights the sparse run selects (the default heuristic, whatever the level): in the dense run
# too, so that their optimizer state is compared like for like.
SPARSE_RUN_SELECTION = parse_sparsity({"sparsity": 0.5})


def _params(preset: str, batch_size: int, seq_len: int, sparsity: float | None, compile_: str | bool, device: str,
            overrides: tuple[str, ...] = (), structure: str = "unstructured", block_size: int = 128) -> Any:
    model = {"preset": preset, "use_bias": False, "vocab_size": BENCH_VOCAB,
             "max_position_embeddings": max(seq_len, PRESETS[preset]["max_position_embeddings"])}
    if preset == "gpt2-tiny":
        model["vocab_size"] = 256
    inp = {"source": "stdlib", "tokenizer": "byte", "batch_size": batch_size, "max_sequence_length": seq_len}
    raw = {
        "train_input": inp, "eval_input": inp, "model": model,
        "optimizer": {"optimizer_type": "AdamW", "learning_rate": 6e-4, "weight_decay_rate": 0.1, "beta2": 0.95},
        "runconfig": {"max_steps": 10**9, "progress": False, "compile": compile_, "device": device},
    }
    if sparsity is not None:
        raw["sparsity"] = {"sparsity": sparsity, "init_method": "topk", "structure": structure}
        if structure == "block":
            raw["sparsity"]["block_size"] = block_size
    return params_from_dict(apply_overrides(raw, overrides))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: set[int] | None = None) -> int:
    """Bytes of the optimizer's state tensors (of the parameters whose ids are in ``params``, or all)."""
    total = 0
    for p, state in optimizer.state.items():
        if params is not None and id(p) not in params:
            continue
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def run_ours(preset, batch_size, seq_len, sparsity, steps, warmup, compile_, device, overrides=(),
             structure="unstructured", block_size=128) -> dict[str, Any]:
    """Our training step through the normal path (setup + train_step)."""
    params = _params(preset, batch_size, seq_len, sparsity, compile_, device, tuple(overrides), structure, block_size)
    with tempfile.TemporaryDirectory() as tmp:
        run = tr.setup(params, Path(tmp), train=True, evaluate=False, write_metrics=False)
        reset_memory(run.device)
        ms, loss = time_steps(lambda: tr.train_step(run), steps, warmup, run.device)
        result = {"ms_per_step": ms, "loss": loss, "peak_memory_bytes": peak_memory(run.device)}
        result["optimizer_state_bytes"] = optimizer_state_bytes(run.optimizer)
        result["sparse_weights_state_bytes"] = _sparsified_state_bytes(run)
        result["flops_per_token"] = run.flops
        result["block_kernel_layers"] = len(run.block_kernel_layers)
        result["executed_flops_per_token"] = run.executed_flops
        result["device"] = str(run.device)
    return result


def _sparsified_state_bytes(run) -> int:
    """Optimizer state of the weights the default heuristic sparsifies (the same weights in the
    dense and the sparse run): what packing saves. A packed optimizer's bitmasks and tile offsets
    count too; layers storing live blocks only (block kernels) hold state of their blocks' size."""
    selected = set(run.sparsifier.masks) if run.sparsifier else select_for_model(run.model, SPARSE_RUN_SELECTION)
    ids = {i for i, name in state_dict_names(run.model).items() if name in selected}
    packed = getattr(run.optimizer, "state_bytes", None)
    if packed is None:
        return optimizer_state_bytes(run.optimizer, ids)
    blocks = {id(m.weight_blocks) for m in packed_layers(run.model).values()}
    return packed()["masked"] + optimizer_state_bytes(run.optimizer, ids & blocks)


def _batches(preset: str, batch_size: int, seq_len: int, device: torch.device):
    """The reference reads the same batches as our step, through the same host-to-device path."""
    params = _params(preset, batch_size, seq_len, None, False, str(device))
    tokenizer = data.load_tokenizer(params.train_input, None)
    stream = data.load_tokens(params.train_input, tokenizer, None)
    step = 0
    while True:
        x, y = data.get_batch(stream, batch_size, seq_len, seed=0, step=step, shuffle=True)
        if device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        step += 1


def run_reference(preset, batch_size, seq_len, steps, warmup, device, compile_) -> dict[str, Any] | None:
    """The plain-loop reference of :mod:`sparsetrain.bench.reference_loop`."""
    p = PRESETS[preset]
    vocab = 256 if preset == "gpt2-tiny" else BENCH_VOCAB
    cfg = ref.RefConfig(n_layer=p["num_hidden_layers"], n_head=p["num_heads"], n_embd=p["hidden_size"],
                        block_size=max(seq_len, p["max_position_embeddings"]), vocab_size=vocab)
    dev = torch.device(device)
    torch.manual_seed(0)
    step, model = ref.make_step(cfg, dev, compile=compile_enabled(compile_, dev))
    batches = _batches(preset, batch_size, seq_len, dev)
    reset_memory(dev)
    ms, loss = time_steps(lambda: step(*next(batches)), steps, warmup, dev)
    result = {"ms_per_step": ms, "loss": loss, "peak_memory_bytes": peak_memory(dev)}
    return result


def bench_train(
    preset: str, batch_size: int, seq_len: int, sparsity: float, *, steps: int = 20, warmup: int = 10,
    reference: bool = True, compile_: str | bool = "auto", device: str = "auto", structure: str = "unstructured",
    block_size: int = 128, overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run reference, dense and sparse; return their figures and ratios.

    ``structure``: ``unstructured`` (masked dense: the target is no extra cost), ``block`` (with
    ``block_size``: the block-skipping kernels, the target is a speedup) or ``"N:M"``.
    """
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, Any] = {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "sparsity": sparsity,
                               "structure": structure if structure != "block" else f"block {block_size}x{block_size}"}
    if dev.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    if dev == "cpu" and preset != "gpt2-tiny":
        _say(f"no GPU here: timing {preset} on the CPU is slow (minutes per step); --preset gpt2-tiny is quick")
    if reference:
        _say(f"reference: {warmup} warm-up + {steps} timed steps")
        results["reference"] = run_reference(preset, batch_size, seq_len, steps, warmup, dev, compile_)
    _say(f"ours, dense: {warmup} warm-up + {steps} timed steps")
    results["dense"] = run_ours(preset, batch_size, seq_len, None, steps, warmup, compile_, dev, overrides)
    _say(f"ours, sparse {sparsity:g} ({results['structure']}): {warmup} warm-up + {steps} timed steps")
    results["sparse"] = run_ours(preset, batch_size, seq_len, sparsity, steps, warmup, compile_, dev, overrides,
                                 structure, block_size)
    add_rates(results, batch_size * seq_len, dev)
    return results


def _say(text: str) -> None:
    """Progress on stderr (stdout carries the table or the JSON)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def add_rates(results: dict[str, Any], tokens_per_step: int, device: str) -> None:
    peak = peak_flops(torch.device(device))
    dense_flops = results["dense"]["flops_per_token"]["dense"]
    for key in ("reference", "dense", "sparse"):
        r = results.get(key)
        if not r:
            continue
        r["tokens_per_s"] = tokens_per_step / (r["ms_per_step"] / 1000.0)
        # MFU counts the FLOPs the GPU executes: a masked-dense step does the dense work; with
        # the block-sparse kernels the sparsified layers do only their live blocks' work.
        executed = r.get("executed_flops_per_token", dense_flops)
        r["mfu"] = executed * r["tokens_per_s"] / peak if peak else None
    d, s, ref = results["dense"], results["sparse"], results.get("reference")
    results["ratios"] = {
        "sparse_step_time_over_dense": s["ms_per_step"] / d["ms_per_step"],
        "sparse_tokens_per_s_over_dense": s["tokens_per_s"] / d["tokens_per_s"],
        "dense_tokens_per_s_over_reference": d["tokens_per_s"] / ref["tokens_per_s"] if ref else None,
        "sparse_weight_state_bytes_over_dense": (
            s["sparse_weights_state_bytes"] / d["sparse_weights_state_bytes"]
            if d["sparse_weights_state_bytes"] else None
        ),
        "sparse_peak_memory_over_dense": (
            s["peak_memory_bytes"] / d["peak_memory_bytes"] if s["peak_memory_bytes"] and d["peak_memory_bytes"] else None
        ),
        "flops_ratio_dense_over_sparse": s["flops_per_token"]["ratio"],
    }


def format_results(r: dict[str, Any]) -> str:
    gib = 1024**3
    lines = [f"{r['preset']}  batch {r['batch_size']}  seq {r['seq_len']}  sparsity {r['sparsity']} "
             f"({r.get('structure', 'unstructured')})  "
             f"{r.get('gpu', 'cpu')}  torch {r['torch']}",
             f"{'':<10} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'peak mem':>10} {'opt state':>10}"]
    for key in ("reference", "dense", "sparse"):
        x = r.get(key)
        if not x:
            continue
        mfu = f"{x['mfu']:.1%}" if x.get("mfu") else "-"
        mem = f"{x['peak_memory_bytes'] / gib:.2f}G" if x.get("peak_memory_bytes") else "-"
        st = f"{x['optimizer_state_bytes'] / gib:.2f}G" if x.get("optimizer_state_bytes") else "-"
        lines.append(f"{key:<10} {x['ms_per_step']:>9.2f} {x['tokens_per_s']:>11,.0f} {mfu:>7} {mem:>10} {st:>10}")
    for k, v in r["ratios"].items():
        lines.append(f"{k:<40} {v:.3f}" if v is not None else f"{k:<40} -")
    return "\n".join(lines)


def main_bench(args: Any) -> int:
    res = bench_train(args.preset, args.batch_size, args.seq_len, args.sparsity, steps=args.steps, warmup=args.warmup,
                      reference=not args.no_reference, compile_=args.compile, device=args.device, structure=args.structure,
                      block_size=args.block_size, overrides=tuple(args.overrides))
    print(json.dumps(res, indent=2) if args.json else format_results(res))
    return 0
