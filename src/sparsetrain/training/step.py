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
from sparsetrain.flops import dense_grad_extra_per_token
from sparsetrain.sparsity import block_linear
from sparsetrain.sparsity.dense_grad import collect_dense_grads
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
    dense = run.dynamic.dense_grads_for(run.step + 1) if run.dynamic else []
    forward, probe = run.forward, contextlib.nullcontext({})
    if dense:  # RigL's update step: this step's gradients are formed dense (regrow scores)
        run.sparsifier.hold_dense_grads(dense)
        packed = [n for n in dense if n in block_linear.packed_layers(run.model)]
        if packed:  # live-block layers compute live-block gradients only: a probe adds the dense ones
            probe = collect_dense_grads(run.model, packed)
            forward = run.ddp or run.model  # eager: the probe is Python-side
    with probe as probed:
        for i, (xs, ys) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            xs, ys = xs.to(run.device, non_blocking=True), ys.to(run.device, non_blocking=True)
            # DDP all-reduces gradients on the last micro-batch only.
            sync = run.ddp.no_sync() if run.ddp is not None and i < accum - 1 else contextlib.nullcontext()
            with sync:
                with run.autocast():
                    loss = forward(xs, ys)
                (loss / accum).backward()
            total += loss.detach()
            if run.cuda_graphs and forward is run.forward and i < accum - 1:
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
    run.flops_done += run.flops["sparse"] * inp.batch_size * inp.max_sequence_length
    if run.dynamic and run.dynamic.is_update(run.step):
        grads = run.sparsifier.take_dense_grads()
        grads.update(_averaged(dict(probed), run))
        _update_masks(run, grads, bool(dense))
    return total / accum


def _averaged(grads: dict[str, torch.Tensor], run: Run) -> dict[str, torch.Tensor]:
    """Probed dense gradients are per rank; DDP averages the gradients it reduces: so do these."""
    if run.dist.active and grads:
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g.div_(run.dist.world_size)
    return grads


def _update_masks(run: Run, grads: dict[str, torch.Tensor], dense_step: bool) -> None:
    """Dynamic sparsity's update after this step: new masks, FLOPs from them, one record per group."""
    from sparsetrain.training.build import count_flops

    if dense_step:  # the dense weight-gradient products this step ran (the paper's accounting)
        fractions = {n: f for n, f in run.sparsifier.pruned_fractions().items() if n in grads}
        inp = run.params.train_input
        run.flops_done += dense_grad_extra_per_token(run.params.model, fractions) * inp.batch_size * inp.max_sequence_length
        run.dynamic.dense_grad_steps += 1
    records = run.dynamic.update(run.step, grads)
    if run.dist.active:
        dist.check_masks_agree(run.sparsifier.masks, run.dist, run.device)
    count_flops(run)
    if run.metrics is not None:
        for r in records:
            run.metrics.write({"kind": "sparsity_update", **r})
            for key in ("sparsity", "dropped", "regrown", "churn", "level", "drop_fraction"):
                run.metrics.scalar(f"sparsity/{r['group']}/{key}", r[key], run.step)
    for r in records:
        drop = "" if r["algorithm"] == "gmp" else f", drop fraction {r['drop_fraction']:.4f}"
        log.info("sparsity update at step %d, %s (%s): level %.4f%s: sparsity %.4f, dropped %d, regrown %d %s, churn %.3f",
                 run.step, r["group"], r["algorithm"], r["level"], drop, r["sparsity"], r["dropped"], r["regrown"],
                 r["units"], r["churn"])


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
    if run.dynamic and run.dynamic.is_update(run.step):
        run.sparsifier.take_dense_grads()  # RigL's scores of the dropped step: not used
        log.warning("step %d was a sparsity update step: the masks stay as they are (the zoo skips it too)", run.step)
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
