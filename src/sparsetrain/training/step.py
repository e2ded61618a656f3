"""One optimizer step (:func:`train_step`), and what happens when a step goes non-finite.

``runconfig.nonfinite: stop`` remembers the first bad step on the device, with no host sync, and
:func:`check_finite` stops the run at the next log step or save; ``skip`` drops that step's update.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain import data
from sparsetrain import distributed as dist
from sparsetrain.training.state import Run, TrainingError

log = logging.getLogger("sparsetrain")

def train_step(run: Run) -> torch.Tensor:
    """One optimizer step at ``run.step``; returns the mean loss as a (device) tensor."""
    p, rc = run.params, run.params.runconfig
    accum = p.optimizer.grad_accum_steps
    inp = p.train_input
    # The global batch, the same on every rank; each rank trains on its own rows of it.
    x, y = data.get_batch(
        run.train_tokens, inp.batch_size, inp.max_sequence_length,
        seed=rc.seed if inp.shuffle_seed is None else inp.shuffle_seed, step=run.step, shuffle=inp.shuffle,
    )
    if run.dist.active:
        rows = dist.rank_slice(inp.batch_size, run.dist)
        x, y = x[rows], y[rows]
    if run.device.type == "cuda":
        # Pinned host memory makes the copy truly asynchronous: the CPU keeps queueing work
        # instead of waiting for the previous step to drain before the copy can start.
        x, y = x.pin_memory(), y.pin_memory()
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=run.device)
    for i, (xs, ys) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
        xs, ys = xs.to(run.device, non_blocking=True), ys.to(run.device, non_blocking=True)
        # DDP all-reduces gradients on the last micro-batch only.
        sync = run.ddp.no_sync() if run.ddp is not None and i < accum - 1 else contextlib.nullcontext()
        with sync:
            with run.autocast():
                loss = run.forward(xs, ys)
            (loss / accum).backward()
        total += loss.detach()
        if run.cuda_graphs and i < accum - 1:
            _own_gradients(run.model)
    if run.sparsifier is not None:
        run.sparsifier.mask_gradients()  # before clipping, so pruned entries do not count in the norm
    finite = torch.isfinite(total)
    if p.optimizer.max_gradient_norm:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), p.optimizer.max_gradient_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        finite &= torch.isfinite(norm)
    if rc.nonfinite == "skip":
        if float(dist.mean(finite.float(), run.dist)) < 1.0:  # one host sync per step, in this mode only
            _skip_step(run)
            return total / accum
    else:
        # No host sync: remember the first bad step on the device; checked before logs and saves.
        if run.first_bad is None:
            run.first_bad = torch.full((), -1, dtype=torch.long, device=run.device)
        run.first_bad = torch.where(~finite & (run.first_bad < 0), run.step + 1, run.first_bad)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return total / accum


def _own_gradients(model: torch.nn.Module) -> None:
    """Copy the gradients out of the CUDA graphs' memory pool between micro-batches. Under CUDA
    graphs the first micro-batch's gradients are outputs of the backward graph, and the next
    micro-batch's replay reuses that memory before it adds its own gradients to them (torch stops
    with "accessing tensor output of CUDAGraphs that has been overwritten"). One copy of the
    gradients per extra micro-batch."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()


def _skip_step(run: Run) -> None:
    """Drop this step's update (weights and optimizer state untouched); the batch is consumed."""
    rc = run.params.runconfig
    run.optimizer.zero_grad(set_to_none=True)
    run.skipped += 1
    run.step += 1
    run.scheduler.step()
    log.warning("non-finite loss or gradients at step %d: update skipped (%d of at most %d)",
                run.step, run.skipped, rc.max_skipped_steps)
    if run.skipped > rc.max_skipped_steps:
        raise TrainingError(
            f"runconfig.max_skipped_steps: {run.skipped} steps with non-finite loss or gradients, the limit is "
            f"{rc.max_skipped_steps} (last at step {run.step}); lower the learning rate or check the data"
        )


def check_finite(run: Run) -> None:
    """Stop (``nonfinite: stop``) if any step so far had a non-finite loss or gradient."""
    if run.first_bad is None:
        return
    bad = run.first_bad.clone()
    if run.dist.active:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if int(bad) >= 0:
        last = ckpt.latest_checkpoint(run.model_dir)
        raise TrainingError(
            f"non-finite loss or gradients at step {int(bad)}; stopped without writing a checkpoint after it "
            f"(last checkpoint: {last or 'none'}); lower the learning rate, or set runconfig.nonfinite: skip"
        )
