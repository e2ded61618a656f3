"""Training and evaluation: setup / train_step / evaluate / fit.

Determinism: the model is initialised from ``runconfig.seed``; every batch is a pure function of
(seed, step), and the torch RNG state (dropout) travels in the checkpoint, so on CPU a resumed
run reproduces the uninterrupted one exactly.

Which checkpoint is loaded:
- none given and ``model_dir`` has checkpoints: the newest one, as a full resume (weights,
  optimizer, schedule, step, RNG, sparsity masks);
- ``--checkpoint_path`` inside ``model_dir``: a full resume from that one;
- ``--checkpoint_path`` elsewhere: a warm start -- weights only, step 0, a fresh optimizer. This is
  the SPDF fine-tuning flow: point a new run at a sparse pre-training checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain import data
from sparsetrain import distributed as dist
from sparsetrain.errors import CheckpointError, ConfigError, UserError
from sparsetrain.flops import flops_report
from sparsetrain.metrics import MetricsWriter
from sparsetrain.model import GPT
from sparsetrain.params import OptimizerParams, Params
from sparsetrain.sparsity import nan_format
from sparsetrain.sparsity.block_linear import use_block_kernels
from sparsetrain.sparsity.sparsifier import Sparsifier, sparsify

log = logging.getLogger("sparsetrain")

# Peak dense bf16 tensor-core FLOP/s by device name, for MFU (vendor datasheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def _sdp_order() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


SDP_ORDER = _sdp_order()


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became non-finite)."""


@dataclass
class Run:
    """Everything a training or evaluation run holds."""

    params: Params
    model_dir: Path
    device: torch.device
    model: GPT
    forward: Callable[..., Any]
    tokenizer: Any
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    sparsifier: Sparsifier | None = None
    train_tokens: Any = None
    eval_tokens: Any = None
    step: int = 0
    loaded_from: Path | None = None
    metrics: MetricsWriter | None = None
    flops: dict[str, float] = field(default_factory=dict)
    executed_flops: float = 0.0  # per token, what the hardware runs: dense but for block-kernel layers
    block_kernel_layers: list[str] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)
    dist: dist.DistInfo = field(default_factory=dist.DistInfo)
    first_bad: torch.Tensor | None = None  # first step with a non-finite loss/gradient (-1: none), on the device
    skipped: int = 0
    ddp: Any = None  # the DistributedDataParallel wrapper, when there is one
    cuda_graphs: bool = False  # the compiled forward/backward replay CUDA graphs (reduce-overhead, max-autotune)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where asked for, with the preferred attention kernel first in line."""
        stack = contextlib.ExitStack()
        if self.precision == "bf16":
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        backend = self.params.runconfig.attention
        if backend != "auto":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
            order = [first, *(b for b in SDP_ORDER if b != first)]
            stack.enter_context(sdpa_kernel(order, set_priority=True))
        return stack

    @property
    def precision(self) -> str:
        p = self.params.runconfig.precision
        return ("bf16" if self.device.type == "cuda" else "fp32") if p == "auto" else p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runconfig.device: {name!r} asked for, but CUDA is not available here; use auto or cpu")
    return torch.device(name)


def lr_at(lr: float | list, step: int, max_steps: int) -> float:
    """The learning rate at ``step``: a constant, or phases run one after another (zoo style)."""
    if not isinstance(lr, list):
        return float(lr)
    start = 0
    for i, phase in enumerate(lr):
        total = phase.get("total_iters") or max(max_steps - start, 1)
        lo, hi = phase["initial_learning_rate"], phase.get("end_learning_rate", phase["initial_learning_rate"])
        t = step - start
        if t < total or i == len(lr) - 1:
            frac = min(max(t, 0) / total, 1.0)
            if phase["scheduler"] == "Constant":
                return lo
            if phase["scheduler"] == "Linear":
                return lo + (hi - lo) * frac
            return hi + (lo - hi) * 0.5 * (1.0 + math.cos(math.pi * frac))
        start += total
    raise AssertionError("unreachable")


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerParams, device: torch.device, packed: bool = False
) -> torch.optim.Optimizer:
    """Weight decay on matrices only: not on norms, biases or embeddings (tied head included).

    ``packed``: a :class:`~sparsetrain.sparsity.packed_optim.PackedOptimizer` of the same kind,
    whose state for sparsified weights (masks handed over by the sparsifier) holds kept entries
    only; its checkpoints have the torch optimizer's layout. Block weights stored as live blocks
    (``weight_blocks``, 3-D) are matrices here too: decayed, and stepped as dense parameters.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay_rate},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = {"fused": True} if device.type == "cuda" else {}
    # The schedule sets absolute values through LambdaLR, so the base lr is 1.0.
    if packed:
        from sparsetrain.sparsity.packed_optim import PackedOptimizer

        kind = cfg.optimizer_type.lower()
        if kind == "sgd":
            return PackedOptimizer(groups, kind="sgd", lr=1.0, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused)
        return PackedOptimizer(groups, kind=kind, lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    if cfg.optimizer_type == "AdamW":
        return torch.optim.AdamW(groups, lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    if cfg.optimizer_type == "Adam":
        return torch.optim.Adam(groups, lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    return torch.optim.SGD(groups, lr=1.0, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _choose_checkpoint(model_dir: Path, explicit: Path | None) -> tuple[Path | None, bool]:
    """The checkpoint to load, and whether it is a full resume (True) or a warm start."""
    if explicit is not None:
        inside = Path(explicit).resolve().parent == Path(model_dir).resolve()
        return Path(explicit), inside
    return ckpt.latest_checkpoint(model_dir), True


def setup(
    params: Params, model_dir: Path, *, checkpoint_path: Path | None = None,
    train: bool = True, evaluate: bool = True, write_metrics: bool = True,
) -> Run:
    """Build tokenizer, data, model, optimizer and sparsity; load a checkpoint if there is one."""
    rc = params.runconfig
    device = resolve_device(rc.device)
    info = dist.init(rc.distributed, device)
    device = dist.local_device(device, info)
    if train:
        per_rank = dist.rank_slice(params.train_input.batch_size, info)
        if (per_rank.stop - per_rank.start) % params.optimizer.grad_accum_steps:
            raise ConfigError(
                f"optimizer.grad_accum_steps: {params.optimizer.grad_accum_steps} does not divide the "
                f"{per_rank.stop - per_rank.start} sequences each of {info.world_size} processes gets"
            )
    torch.manual_seed(rc.seed)  # the same on every rank: identical initial weights
    tokenizer = data.load_tokenizer(params.train_input, model_dir)
    cfg = params.model
    if cfg.vocab_size is None:
        cfg.vocab_size = tokenizer.vocab_size
    elif cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    train_tokens = eval_tokens = None
    if train:
        train_tokens = data.load_tokens(params.train_input, tokenizer, model_dir)
        data.check_vocab(train_tokens, cfg.vocab_size, "train_input")
        data.check_length(train_tokens, params.train_input.max_sequence_length, "train_input")
    if evaluate:
        eval_tokens = data.load_tokens(params.eval_input, tokenizer, model_dir)
        data.check_vocab(eval_tokens, cfg.vocab_size, "eval_input")
        data.check_length(eval_tokens, params.eval_input.max_sequence_length, "eval_input")

    model = GPT(cfg).to(device)
    path, full_resume = _choose_checkpoint(model_dir, checkpoint_path)
    state = ckpt.load_checkpoint(path) if path is not None else None
    masks: dict[str, torch.Tensor] = {}
    if state is not None:
        ckpt.check_model_state(state["model"], model.state_dict(), path)
        clean, masks = nan_format.decode_state_dict(state["model"])
        model.load_state_dict(clean)
        log.info("loaded %s (step %d)%s", path, state["global_step"], "" if full_resume else " as a warm start at step 0")
    masks = _masks_to_keep(params, masks, path)

    run = Run(
        params=params, model_dir=Path(model_dir), device=device, model=model, forward=model,
        tokenizer=tokenizer, train_tokens=train_tokens, eval_tokens=eval_tokens, loaded_from=path, dist=info,
    )
    masks = {k: v.to(device) for k, v in masks.items()}
    if info.mode == "fsdp":
        # Masks come from the full weights (identical on every rank), then the model is sharded
        # and the sparsifier binds each rank's slice of them.
        if params.sparsity is not None:
            pre = sparsify(model, params.sparsity, masks=masks)
            masks = dict(pre.masks)
            pre.detach()
        dist.shard(model)
    if params.sparsity is not None:
        run.sparsifier = sparsify(model, params.sparsity, masks=masks)
        if _block_kernels_apply(run):
            # Before the optimizer: layers that store live blocks only give it weight_blocks.
            # Under FSDP they keep dense storage (see sparsity.block_linear).
            run.block_kernel_layers = use_block_kernels(model, run.sparsifier, packed=info.mode != "fsdp")
    if train:
        # Under FSDP too: the sparsifier hands each rank's PackedOptimizer the masks of its shards.
        packed = params.sparsity is not None and params.optimizer.packed_state
        run.optimizer = build_optimizer(model, params.optimizer, device, packed=packed)
        if run.sparsifier is not None:
            run.sparsifier.attach(run.optimizer)
        schedule = params.optimizer.learning_rate
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(
            run.optimizer, lambda s: lr_at(schedule, s, rc.max_steps)
        )
        if state is not None and full_resume:
            _load_training_state(run, state, path)
            if run.sparsifier is not None:
                run.sparsifier.apply()  # loaded state of a weight whose mask was redrawn: 0 where pruned now
    if state is not None and full_resume:
        run.step = int(state["global_step"])
    if info.active:
        if run.sparsifier is not None:
            dist.check_masks_agree(run.sparsifier.masks, info, device)
        if info.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            run.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            run.forward = run.ddp
        if info.rank:  # each rank its own dropout stream; rank 0 keeps the checkpointed one
            torch.manual_seed((rc.seed * 1_000_003 + info.rank * 7_919 + run.step) % 2**63)
    seq = params.train_input.max_sequence_length
    fractions = run.sparsifier.pruned_fractions() if run.sparsifier else {}
    run.flops = flops_report(cfg, seq, fractions or None)
    # Masked-dense layers execute their dense FLOPs on a GPU; block-kernel layers skip dead blocks.
    on_kernels = {name: f for name, f in fractions.items() if name in run.block_kernel_layers}
    run.executed_flops = flops_report(cfg, seq, on_kernels or None)["sparse"]
    if _use_compile(rc.compile, device):
        mode = compile_mode(rc.compile_mode, bool(run.block_kernel_layers), info.active)
        why = ", for the block-sparse kernels" if mode != rc.compile_mode and mode == "reduce-overhead" else ""
        log.info("torch.compile: on (mode %s%s); the first steps compile", mode, why)
        run.forward = torch.compile(run.forward, mode=None if mode == "default" else mode)
        run.cuda_graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    run.metrics = MetricsWriter(model_dir, enabled=write_metrics and info.is_main)
    return run


def _block_kernels_apply(run: Run) -> bool:
    """Whether ``structure: block`` weights go to the block-sparse kernels: CUDA, bf16 and
    ``runconfig.sparse_kernels: auto`` (fp32 keeps them masked dense, with a warning)."""
    rc = run.params.runconfig
    if rc.sparse_kernels != "auto" or run.device.type != "cuda":
        return False
    if run.precision != "bf16":
        if any(s.structure == "block" for s in run.sparsifier.settings.values()):
            log.warning(
                "sparsity: the block-sparse kernels run in bf16; with runconfig.precision: %s the "
                "block-sparse weights train masked dense (no speedup)", rc.precision,
            )
        return False
    return True


def _masks_to_keep(params: Params, masks: dict, path: Path | None) -> dict:
    """Masks recovered from the checkpoint's NaNs; none (dense fine-tuning) without a block.

    With a block, :func:`~sparsetrain.sparsity.sparsifier.sparsify` keeps each stored mask whose
    pruned count the block still asks for, makes it dense at ``sparsity: 0.0``, and draws a new
    one otherwise.
    """
    if masks and params.sparsity is None:
        pruned = sum(int((~m).sum()) for m in masks.values())
        log.info(
            "%s is sparse (%d pruned weights in %d tensors) and the params have no sparsity block: "
            "dense fine-tuning, pruned weights start at 0 and all weights train", path, pruned, len(masks),
        )
        return {}
    return masks


def _load_training_state(run: Run, state: dict, path: Path) -> None:
    try:
        if state.get("optimizer"):
            opt_sd = nan_format.decode_optimizer_state(state["optimizer"])
            if run.dist.mode == "fsdp":
                dist.load_optimizer_state(run.model, run.optimizer, opt_sd)
            else:
                run.optimizer.load_state_dict(opt_sd)
        if state.get("lr_scheduler"):
            run.scheduler.load_state_dict(state["lr_scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit this run ({str(e).splitlines()[0]})") from None
    _set_rng_state(state.get("rng", {}), run.device)


def compile_mode(setting: str, block_kernels: bool, distributed: bool) -> str:
    """``runconfig.compile_mode`` resolved. ``auto``: CUDA graphs (``reduce-overhead``) when layers
    run on the block-sparse kernels in a single process, because those kernels are launched from
    Python (about 1.3 ms of host time per layer and step on the H200 machine, more than the GPU
    work at GPT-2 widths) and graphs replay them without it; ``default`` otherwise (dense gains
    under 1% from graphs and pays 1.5 GiB on GPT-2 small), and under DDP/FSDP, whose
    communication hooks run outside graphs."""
    if setting != "auto":
        return setting
    return "reduce-overhead" if block_kernels and not distributed else "default"


def _use_compile(setting: str | bool, device: torch.device) -> bool:
    return device.type == "cuda" if setting == "auto" else bool(setting)


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint dict; pruned positions become NaN (weights and same-shape optimizer state).

    Under FSDP every rank must call this (it gathers the shards); only rank 0's result is whole.
    """
    if run.dist.mode == "fsdp":
        model_sd, opt_sd = dist.full_state(run.model, run.optimizer)
        if not run.dist.is_main:
            return {}
    else:
        model_sd = run.model.state_dict()
        opt_sd = run.optimizer.state_dict() if run.optimizer else {}
    if run.sparsifier is not None:
        model_sd = nan_format.encode_state_dict(model_sd, run.sparsifier.masks)
        if opt_sd:
            opt_sd = nan_format.encode_optimizer_state(opt_sd, run.optimizer, run.model, run.sparsifier.masks)
    return {
        "model": model_sd,
        "optimizer": opt_sd,
        "lr_scheduler": run.scheduler.state_dict() if run.scheduler else {},
        "global_step": run.step,
        "rng": _rng_state(run.device),
        "params": run.params.to_dict(),
    }


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
            ckpt.prune_checkpoints(run.model_dir, run.params.runconfig.keep_checkpoints)
        except UserError as e:
            failure = e
    # Every rank learns whether rank 0's write worked, so none waits for a rank that gave up.
    if dist.total([1.0 if failure else 0.0], run.dist, run.device)[0] > 0:
        raise failure or TrainingError(f"{path}: rank 0 could not write this checkpoint; see its error")
    run.history["last_checkpoint"] = path
    return path


def train_step(run: Run) -> torch.Tensor:
    """One optimizer step at ``run.step``; returns the mean loss as a (device) tensor."""
    p, rc = run.params, run.params.runconfig
    accum = p.optimizer.grad_accum_steps
    inp = p.train_input
    # The global batch, the same on every rank; each rank trains on its own rows of it.
    x, y = data.get_batch(
        run.train_tokens, inp.batch_size, inp.max_sequence_length,
        seed=rc.seed, step=run.step, shuffle=inp.shuffle,
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


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Mean token loss and perplexity over ``eval_steps`` batches of the eval split."""
    inp = run.params.eval_input
    run.model.eval()
    loss_sum, tokens = 0.0, 0
    # Every rank walks the same global batches and scores its own rows: N processes evaluate
    # exactly the tokens one process would.
    rows = dist.rank_slice(inp.batch_size, run.dist, "eval_input") if run.dist.active else slice(None)
    for x, y in data.eval_batches(run.eval_tokens, inp.batch_size, inp.max_sequence_length, run.params.runconfig.eval_steps):
        x, y = x[rows].to(run.device), y[rows].to(run.device)
        if y.numel() == 0:  # a short final batch may leave this rank no rows
            continue
        with run.autocast():
            loss = run.model(x, y)
        loss_sum += float(loss) * y.numel()
        tokens += y.numel()
    loss_sum, tokens = dist.total([loss_sum, float(tokens)], run.dist, run.device)
    tokens = int(tokens)
    mean = loss_sum / max(tokens, 1)
    record = {"kind": "eval", "step": run.step, "eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval_tokens": tokens}
    run.metrics.write(record)
    run.history["eval"] = record
    return record


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
    if run.sparsifier is not None:
        _log_sparsity(run)
    t_start = t_log = time.perf_counter()
    step_log = run.step
    bar = progress(initial=run.step, total=rc.max_steps) if progress else None
    loss = None
    with _Interrupt() as interrupt:
        while run.step < rc.max_steps:
            loss_t = train_step(run)
            logged = run.step % rc.log_steps == 0 or run.step == rc.max_steps
            if logged:
                check_finite(run)
                loss = _log_step(run, loss_t, tokens_per_step, peak, bar, t_log, step_log)
                t_log, step_log = time.perf_counter(), run.step
            if bar is not None:
                bar.update(1)
            # Under torchrun every rank must stop at the same step: they agree at log steps.
            if interrupt.requested(run, logged):
                return _interrupted(run, bar, start_step, t_start, loss, tokens_per_step)
            if rc.checkpoint_steps and run.step % rc.checkpoint_steps == 0 and run.step != rc.max_steps:
                save(run)
            if do_eval and eval_frequency and run.step % eval_frequency == 0 and run.step != rc.max_steps:
                evaluate(run)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    if run.step > start_step or ckpt.latest_checkpoint(run.model_dir) is None:
        save(run)
    if do_eval:
        evaluate(run)
    return _finish(run, start_step, elapsed, loss, tokens_per_step)


def _finish(run: Run, start_step: int, elapsed: float, loss, tokens_per_step: int, **extra: Any) -> dict[str, Any]:
    run.history.update(
        steps_run=run.step - start_step, start_step=start_step, elapsed_s=elapsed, final_loss=loss,
        tokens_per_s=(run.step - start_step) * tokens_per_step / max(elapsed, 1e-9), **extra,
    )
    return run.history


def _log_step(run: Run, loss_t: torch.Tensor, tokens_per_step: int, peak, bar, t_log: float, step_log: int) -> float:
    rc = run.params.runconfig
    loss = float(dist.mean(loss_t, run.dist))
    now = time.perf_counter()
    tps = (run.step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
    record = _train_record(run, loss, tps, tokens_per_step, peak)
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
    log.warning("interrupted at step %d; checkpoint written to %s", run.step, path)
    return _finish(run, start_step, elapsed, loss, tokens_per_step, interrupted=True)


class _Interrupt:
    """SIGINT / SIGTERM: finish the step, checkpoint, exit 0. A second signal exits at once
    (128 + signal number); the atomic checkpoint writes leave earlier files intact either way."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            # Exit now, from anywhere (an exception raised here can be swallowed inside torch.save);
            # checkpoint writes are atomic, and the next save removes a half-written temp file.
            sys.stderr.write(f"{signal.Signals(signum).name} received again: exiting without a checkpoint\n")
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: finishing this step, then writing a checkpoint (send it again to quit now)",
                    signal.Signals(signum).name)

    def requested(self, run: Run, logged: bool) -> bool:
        if not run.dist.active:
            return self.signum is not None
        if not logged:
            return False
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=run.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _train_record(run: Run, loss: float, tps: float, tokens_per_step: int, peak: float | None) -> dict[str, Any]:
    f = run.flops
    record = {
        "kind": "train", "step": run.step, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
        "tokens": run.step * tokens_per_step, "tokens_per_s": tps,
        "flops_per_step": f["sparse"] * tokens_per_step, "flops_per_step_dense": f["dense"] * tokens_per_step,
        "flops_total": f["sparse"] * tokens_per_step * run.step,
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
