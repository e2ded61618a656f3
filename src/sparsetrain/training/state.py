"""What a training or evaluation run holds (:class:`Run`), and its state as a checkpoint dict.

:func:`checkpoint_state` is the dict a checkpoint stores (the zoo's keys ``model``, ``optimizer``,
``lr_scheduler``, ``global_step``, plus ``rng`` and the resolved ``params``), NaN-encoded where
weights are pruned; :func:`load_training_state` restores optimizer, schedule and RNG from one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain import distributed as dist
from sparsetrain.config import Params
from sparsetrain.errors import CheckpointError, UserError
from sparsetrain.model import GPT
from sparsetrain.sparsity import nan_format
from sparsetrain.sparsity.sparsifier import Sparsifier
from sparsetrain.training.metrics import MetricsWriter


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
    dynamic: Any = None  # sparsity.dynamic.DynamicSparsity, when masks change during training
    flops_done: float = 0.0  # training FLOPs so far (the sparse count; changes with dynamic densities)
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
    compiled: bool = False  # forward runs through torch.compile
    cuda_graphs: bool = False  # the compiled forward/backward replay CUDA graphs (reduce-overhead, max-autotune)
    run_id: str | None = None  # the lineage: made at a fresh or warm start, kept by resumes (training.model_dir)
    warm_start_from: dict[str, Any] | None = None  # {path, step} of the checkpoint a warm start began from
    branch_from: dict[str, Any] | None = None  # {path, step} of the checkpoint a rollback restarted the history at
    data_fingerprint: dict[str, Any] | None = None  # of the training tokens (data.fingerprint): a resume compares

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


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
        "rng": rng_state(run.device),
        "params": run.params.to_dict(),
        "flops_done": run.flops_done,
        **({"dynamic_sparsity": run.dynamic.state_dict()} if run.dynamic else {}),
        "run_id": run.run_id,
        **({"warm_start_from": run.warm_start_from} if run.warm_start_from else {}),
        **({"branch_from": run.branch_from} if run.branch_from else {}),
        **({"data_fingerprint": run.data_fingerprint} if run.data_fingerprint else {}),
        "writer": ckpt.WRITER,
    }


def load_training_state(run: Run, state: dict, path: Path) -> None:
    """A full resume: optimizer (NaN -> 0), schedule and RNG state from checkpoint ``state``."""
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
    set_rng_state(state.get("rng", {}), run.device)
