"""Multi-process training through torch.distributed (launched with ``torchrun``).

    torchrun --nproc_per_node 2 run.py --mode train --params P --model_dir D

``runconfig.distributed``: ``auto`` (the default: DDP when launched with more than one process,
plain single-process training otherwise) | ``none`` | ``ddp`` | ``fsdp`` (FSDP2 ``fully_shard``).
The backend is NCCL on CUDA and gloo on the CPU. Rank r uses ``cuda:LOCAL_RANK``.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from sparsetrain.errors import ConfigError, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

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
        return DistInfo()  # one process: DDP or FSDP would only add overhead
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
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, mode="fsdp" if setting == "fsdp" else "ddp")


def shard(model: torch.nn.Module, blocks: Iterable[torch.nn.Module]) -> None:
    """FSDP2: shard each of ``blocks`` (the transformer blocks, so that one block's weights are
    gathered at a time), then the rest (embeddings, final norm, tied head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in blocks:
        fully_shard(layer)
    fully_shard(model)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """Gather FSDP2's sharded model and optimizer state into full CPU tensors (on rank 0; the
    others get empty dicts). Every rank must call this. The optimizer state comes back in torch's
    own index-keyed layout, so the checkpoint is the one single-process training writes.

    A :class:`~sparsetrain.optim.packed.PackedOptimizer` needs nothing special here: it
    holds packed state for the kept entries of its own shards, but its ``state_dict()`` exports
    each dense-shaped state tensor as a DTensor like its parameter (0 at pruned positions), i.e.
    what torch's optimizer holds under FSDP2, and ``get_optimizer_state_dict`` gathers those into
    full tensors. Only that export is dense (this rank's shards' state, for the time of the save);
    the state kept between steps stays packed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for tied in names.values():  # one tensor under every name of a tied weight, as state_dict() does
        for name in tied[1:]:
            if tied[0] in model_sd and name in model_sd:
                model_sd[name] = model_sd[tied[0]]
    if optimizer is None:
        return model_sd, {}
    opt_sd = get_optimizer_state_dict(model, optimizer, options=options)
    return model_sd, _names_to_indices(opt_sd, model, optimizer) if opt_sd else {}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, index-keyed optimizer state (from a checkpoint every rank read) into FSDP2.

    ``set_optimizer_state_dict`` slices each full tensor into a DTensor like the optimizer's own
    (dense-shaped) state and calls ``optimizer.load_state_dict``; a ``PackedOptimizer`` packs the
    local part of each with its shard's mask, or keeps it dense until the sparsifier hands over
    the masks (training loads the state first, then sparsifies)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model,
        optimizer,
        optim_state_dict=_indices_to_names(state, model, optimizer),
        options=StateDictOptions(full_state_dict=True),
    )


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _names_to_indices(opt_sd: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[n]: v for n, v in opt_sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in opt_sd["param_groups"]],
    }


def _indices_to_names(opt_sd: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    names = _param_names(model, optimizer)
    return {
        "state": {names[int(i)]: v for i, v in opt_sd["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in opt_sd["param_groups"]],
    }


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    if device.type == "cuda" and info.active:
        return torch.device("cuda", info.local_rank)
    return device


def rank_slice(batch_size: int, info: DistInfo, section: str = "train_input") -> slice:
    """This rank's rows of the global batch."""
    if batch_size % info.world_size:
        raise ConfigError(f"{section}.batch_size: {batch_size} is not divisible by the {info.world_size} processes")
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


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, its gradient or optimizer state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or this process's shard of a DTensor (FSDP2), to read or modify in place."""
    return t.to_local() if is_dtensor(t) else t


def from_main(make: Callable[[], T]) -> T:
    """``make()`` run by rank 0 alone, its (picklable) result handed to every rank.

    For work that one process must do for all, such as training and writing a tokenizer: the
    other ranks wait in one broadcast from rank 0 instead. If ``make`` fails on rank 0, every
    other rank raises the same error (a ``UserError`` keeps its type and one-line message), so
    none waits for a rank that gave up. Without a process group (one process) it is ``make()``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return make()
    if dist.get_rank() != 0:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if ok:
            return value
        kind, message = value
        raise kind(message)
    try:
        result = make()
    except Exception as e:
        if isinstance(e, UserError):
            failure = (type(e), str(e))
        else:  # a bug: rank 0 keeps its traceback, the others say where to look
            failure = (RuntimeError, f"rank 0 failed: {type(e).__name__}: {e}")
        dist.broadcast_object_list([(False, failure)], src=0)
        raise
    dist.broadcast_object_list([(True, result)], src=0)
    return result


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        import gc

        gc.collect()  # collect what still holds the group (DDP reducers, compiled graphs) first
        dist.barrier()
        dist.destroy_process_group()
