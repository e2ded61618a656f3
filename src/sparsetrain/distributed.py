"""Multi-process training through torch.distributed (launched with ``torchrun``).

    torchrun --nproc_per_node 2 run.py --mode train --params P --model_dir D

``runconfig.distributed``: ``auto`` (the default: DDP when launched with more than one process,
plain single-process training otherwise) | ``none`` | ``ddp``. The backend is NCCL on CUDA and
gloo on the CPU. Rank r uses ``cuda:LOCAL_RANK``.

Every rank draws the same global batch (a pure function of seed and step) and trains on its own
contiguous slice of it, so ranks never overlap and N processes see exactly the batch one process
would: losses match a single-process run with the same ``batch_size``. Masks are drawn on every
rank from identical weights (``topk``) or from a name hash (``random``), with no communication,
and checked to agree once at start. Only rank 0 writes metrics, logs and checkpoints; a checkpoint
is the same single file as in single-process training and resumes on any number of processes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsetrain.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(setting: str, device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (if any) and return this process's place in it."""
    world = launched_world_size()
    if world == 1:
        if setting in ("ddp",):
            return DistInfo(mode="none")  # one process: DDP would only add overhead
        return DistInfo()
    if setting == "none":
        raise ConfigError(
            f"runconfig.distributed: 'none' but launched with {world} processes; use auto or ddp, or launch one process"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, mode="ddp")


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    if device.type == "cuda" and info.active:
        return torch.device("cuda", info.local_rank)
    return device


def rank_slice(batch_size: int, info: DistInfo, section: str = "train_input") -> slice:
    """This rank's rows of the global batch."""
    if batch_size % info.world_size:
        raise ConfigError(
            f"{section}.batch_size: {batch_size} is not divisible by the {info.world_size} processes"
        )
    per = batch_size // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All-reduced mean of a scalar tensor (a no-op on one process)."""
    if not info.active:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


def total(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """All-reduced sums of a few floats."""
    if not info.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def check_masks_agree(masks: dict[str, torch.Tensor], info: DistInfo, device: torch.device) -> None:
    """Fail loudly if any rank drew a different mask (one small all-reduce at start)."""
    if not info.active or not masks:
        return
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].cpu().numpy().tobytes())
    mine = int.from_bytes(h.digest()[:6], "little")
    t = torch.tensor([mine, -mine], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != mine or int(-t[1]) != mine:
        raise RuntimeError("sparsity masks differ between ranks; this is a bug, please report it")


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()
