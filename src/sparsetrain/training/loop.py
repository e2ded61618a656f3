"""The training loop (:func:`fit`), evaluation, checkpoint saves and the logged records.

MFU (model FLOP utilisation) counts the FLOPs the hardware executes against the device's peak
dense bf16 rate (:data:`PEAK_BF16_FLOPS`, from vendor datasheets).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparsetrain import checkpoint as ckpt
from sparsetrain import data
from sparsetrain import distributed as dist
from sparsetrain.errors import UserError
from sparsetrain.training.signals import Interrupt
from sparsetrain.training.state import Run, TrainingError, checkpoint_state
from sparsetrain.training.step import check_finite, train_step

log = logging.getLogger("sparsetrain")

# Peak dense bf16 tensor-core FLOP/s by device name, for MFU (vendor datasheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def fit(run: Run, *, do_eval: bool, eval_frequency: int = 0, progress: Callable | None = None) -> dict[str, Any]:
    """Train from ``run.step`` to ``max_steps``, logging, evaluating and checkpointing."""
    rc, inp = run.params.runconfig, run.params.train_input
    tokens_per_step = inp.batch_size * inp.max_sequence_length
    peak = peak_flops(run.device)
    start_step = run.step
    if run.step >= rc.max_steps and ckpt.latest_checkpoint(run.model_dir) is not None:
        # A finished run run again: no second final evaluation (its records would repeat a step).
        log.info("already at step %d, max_steps is %d: nothing to train; raise runconfig.max_steps to train "
                 "further, or evaluate with --mode eval", run.step, rc.max_steps)
        return _finish(run, start_step, 0.0, None, tokens_per_step)
    if run.sparsifier is not None:
        _log_sparsity(run)
    t_start = t_log = time.perf_counter()
    step_log = run.step
    bar = progress(initial=run.step, total=rc.max_steps) if progress else None
    loss = None
    if rc.save_initial_checkpoint and run.step == 0 and ckpt.latest_checkpoint(run.model_dir) is None:
        save(run)  # the zoo's save_initial_checkpoint: the initial (masked) weights, step 0
    with Interrupt() as interrupt:
        while run.step < rc.max_steps:
            loss_t = train_step(run)
            logged = run.step % rc.log_steps == 0 or run.step == rc.max_steps
            if logged:
                check_finite(run)
                loss = _log_step(run, loss_t, tokens_per_step, peak, bar, t_log, step_log, step_log == start_step)
                t_log, step_log = time.perf_counter(), run.step
            if bar is not None:
                bar.update(1)
            # Under torchrun every rank must stop at the same step: they agree at log steps.
            if interrupt.requested(run, logged):
                return _interrupted(run, bar, start_step, t_start, loss, tokens_per_step)
            paused = time.perf_counter()  # a checkpoint or an evaluation is not training time
            if rc.checkpoint_steps and run.step % rc.checkpoint_steps == 0 and run.step != rc.max_steps:
                save(run)
            if do_eval and eval_frequency and run.step % eval_frequency == 0 and run.step != rc.max_steps:
                evaluate(run)
            t_log += time.perf_counter() - paused
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    if run.step > start_step or ckpt.latest_checkpoint(run.model_dir) is None:
        save(run)
    if do_eval:
        evaluate(run)
    return _finish(run, start_step, elapsed, loss, tokens_per_step)


def _pad_rows(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``, ``y`` and ``n`` rows more: copies of the first input row whose targets are all
    -100, so they count nowhere."""
    return torch.cat([x, x[:1].expand(n, -1)]), torch.cat([y, y.new_full((n, y.shape[1]), -100)])


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Mean token loss and perplexity over ``eval_steps`` batches of the eval split.

    The mean is over the counted targets: every token of plain text, the completion tokens of
    prompt/completion data, the positions an HDF5 sample's loss mask keeps. ``eval_loss_tokens``
    says which: ``all``, or ``completion`` where the data's loss mask left targets out.
    """
    inp = run.params.eval_input
    run.model.eval()
    loss_sum, tokens, left_out = 0.0, 0, 0
    # Every rank walks the same global batches and scores its own rows: N processes evaluate
    # exactly the tokens one process would.
    rows = dist.rank_slice(inp.batch_size, run.dist, "eval_input") if run.dist.active else slice(None)
    full = False  # a full batch came: a shorter one is the split's tail
    for x, y in data.eval_batches(run.eval_tokens, inp.batch_size, inp.max_sequence_length, run.params.runconfig.eval_steps):
        padding = inp.batch_size - len(x) if full else 0
        full = full or len(x) == inp.batch_size
        if padding:  # the tail padded to the batch's shape: no recompilation for it
            x, y = _pad_rows(x, y, padding)
        pad_mask = torch.arange(len(x)) >= len(x) - padding
        x, y = x[rows].to(run.device), y[rows].to(run.device)
        if y.numel() == 0:  # a short final batch may leave this rank no rows
            continue
        # The mean over counted tokens (targets -100 are the data's loss mask), whatever the
        # training loss's model.loss_scaling: eval_loss and perplexity are per token.
        with run.autocast():
            loss_sum += float(F.cross_entropy(run.model(x).flatten(0, 1), y.flatten(), reduction="sum"))
        counted = int((y != -100).sum())
        tokens += counted
        left_out += y.numel() - counted - int(pad_mask[rows].sum()) * y.shape[1]
    loss_sum, tokens, left_out = dist.total([loss_sum, float(tokens), float(left_out)], run.dist, run.device)
    tokens = int(tokens)
    mean = loss_sum / max(tokens, 1)
    counts = "completion" if left_out else "all"
    record = {"kind": "eval", "step": run.step, "eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)),
              "eval_tokens": tokens, "eval_loss_tokens": counts}
    run.metrics.write(record)
    run.history["eval"] = record
    what = "completion " if left_out else ""
    log.info("eval at step %d: %sloss %.4f, perplexity %.2f (%d %stokens)", run.step, what, mean, record["perplexity"], tokens, what)
    return record


def save(run: Run) -> Path:
    """Rank 0 writes the checkpoint: one file, whatever the number of processes.

    Never after a non-finite step (``nonfinite: stop``): the weights may be poisoned.
    """
    check_finite(run)
    path = ckpt.checkpoint_path(run.model_dir, run.step)
    state = checkpoint_state(run) if run.dist.is_main or run.dist.mode == "fsdp" else None
    failure: UserError | None = None
    if run.dist.is_main:
        try:
            ckpt.save_checkpoint(state, path)
            ckpt.prune_checkpoints(run.model_dir, run.params.runconfig.keep_checkpoints, newest=run.step)
        except UserError as e:
            failure = e
    # Every rank learns whether rank 0's write worked, so none waits for a rank that gave up.
    if dist.total([1.0 if failure else 0.0], run.dist, run.device)[0] > 0:
        raise failure or TrainingError(f"{path}: rank 0 could not write this checkpoint; see its error")
    run.history["last_checkpoint"] = path
    return path


def _finish(run: Run, start_step: int, elapsed: float, loss, tokens_per_step: int, **extra: Any) -> dict[str, Any]:
    run.history.update(
        steps_run=run.step - start_step, start_step=start_step, elapsed_s=elapsed, final_loss=loss,
        tokens_per_s=(run.step - start_step) * tokens_per_step / max(elapsed, 1e-9), **extra,
    )
    return run.history


def _log_step(run: Run, loss_t: torch.Tensor, tokens_per_step: int, peak, bar, t_log: float, step_log: int,
              warmup: bool) -> float:
    """One ``train`` record; ``warmup`` marks the first interval of this process's training (a
    fresh run's or a resume's), which holds torch.compile and the kernels' autotuning."""
    rc = run.params.runconfig
    loss = float(dist.mean(loss_t, run.dist))
    now = time.perf_counter()
    tps = (run.step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
    record = train_record(run, loss, tps, tokens_per_step, peak)
    if warmup:
        record["warmup"] = True
    run.metrics.write(record)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
    else:
        log.info("step %d/%d loss %.4f lr %.3g tokens/s %.0f", run.step, rc.max_steps, loss, record["lr"], tps)
    return loss


def _interrupted(run: Run, bar, start_step: int, t_start: float, loss, tokens_per_step: int) -> dict[str, Any]:
    if bar is not None:
        bar.close()
    path = save(run)
    elapsed = time.perf_counter() - t_start
    if run.dist.is_main:
        log.warning("interrupted at step %d; checkpoint written to %s", run.step, path)
    return _finish(run, start_step, elapsed, loss, tokens_per_step, interrupted=True)


def train_record(run: Run, loss: float, tps: float, tokens_per_step: int, peak: float | None) -> dict[str, Any]:
    f = run.flops
    record = {
        "kind": "train", "step": run.step, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
        "tokens": run.step * tokens_per_step, "tokens_per_s": tps,
        "flops_per_step": f["sparse"] * tokens_per_step, "flops_per_step_dense": f["dense"] * tokens_per_step,
        "flops_total": run.flops_done,  # summed step by step: dynamic densities and RigL's dense steps count
        "flops_total_dense": f["dense"] * tokens_per_step * run.step, "flops_ratio": f["ratio"],
    }
    if peak:
        # MFU counts the FLOPs the hardware executes: dense for masked-dense layers (a GPU skips no
        # zeros), live blocks only for layers on the block-sparse kernels. ``tps`` counts every
        # rank's tokens and ``peak`` is one GPU's: MFU is per GPU.
        record["mfu"] = run.executed_flops * tps / (peak * run.dist.world_size)
    return record


def _log_sparsity(run: Run) -> None:
    rows = run.sparsifier.stats()
    groups = run.sparsifier.group_stats(rows)
    for s in groups:
        run.metrics.scalar(f"sparsity/{s['group']}/target", s["target"], run.step)
    for s in rows:
        run.metrics.scalar(f"sparsity/{s['name']}/actual", s["actual"], run.step)
    run.metrics.write({"kind": "sparsity", "step": run.step, "groups": groups, "flops_per_token": run.flops})


def format_summary(run: Run, history: dict) -> str:
    """The end-of-run summary: one screen, plain text."""
    lines = ["", "=" * 64, f"sparsetrain summary  ({run.model_dir})", "-" * 64]
    rc = run.params.runconfig
    if history.get("steps_run"):
        lines.append(f"steps            {history['start_step']} -> {run.step} of {rc.max_steps}  ({history['elapsed_s']:.1f} s)")
        lines.append(f"throughput       {history['tokens_per_s']:,.0f} tokens/s")
        if history.get("final_loss") is not None:
            lines.append(f"final train loss {history['final_loss']:.4f}")
    elif history.get("evaluated"):
        lines.append(f"evaluated        {history['evaluated']} (step {run.step})")
    else:
        lines.append(f"step             {run.step} of {rc.max_steps} (nothing to train)")
    if "eval" in history:
        e = history["eval"]
        what = "completion " if e.get("eval_loss_tokens") == "completion" else ""
        lines.append(f"eval loss        {e['eval_loss']:.4f}  (perplexity {e['perplexity']:.2f}, {e['eval_tokens']:,} {what}tokens)")
    f = run.flops
    lines.append(f"train FLOPs/token dense {f['dense']:.3g}   sparse {f['sparse']:.3g}   ratio {f['ratio']:.2f}x")
    for g in history.get("sparsity_groups", []):
        text = f"sparsity         {g['group']}: target {g['target']:.3f}, actual {g['mask']:.3f} ({g['tensors']} tensors)"
        if g["actual"] - g["mask"] > 5e-4:  # kept weights that are exactly 0: regrown ones until they train
            text += f"; {g['actual']:.3f} of the weights are exactly 0"
        lines.append(text)
    if run.dynamic:
        for group, done in run.dynamic.updates_done.items():
            last = next((r for r in run.dynamic.last_records if r["group"] == group), None)
            text = f"dynamic          {group}: {run.dynamic.settings[group].dynamic.algorithm}, {done} updates"
            if last is not None:
                text += (f", the last at step {last['step']}: sparsity {last['sparsity']:.3f}, "
                         f"{last['dropped']:,} dropped / {last['regrown']:,} regrown {last['units']}, churn {last['churn']:.3f}")
            lines.append(text)
    if history.get("last_checkpoint"):
        lines.append(f"checkpoint       {history['last_checkpoint']}")
    if history.get("interrupted"):
        lines.append("interrupted      run the same command again to resume")
    lines.append("=" * 64)
    return "\n".join(lines)
