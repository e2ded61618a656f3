"""The packed optimizer state of one masked weight: its mask layout (:class:`PackedMask`), state
tensors packed and unpacked with it, and one AdamW / Adam / SGD step over the kept entries in
plain torch (:func:`adam_reference`, :func:`sgd_reference`: the oracle of the Triton step in
:mod:`sparsetrain.kernels.packed_step`).

The state of a masked weight holds its kept entries only, as 1-D tensors in the flat order of the
weight, beside a bitmask (n/8 bytes) and one int32 offset per tile of ``block`` entries (the
kernel's layout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sparsetrain.distributed import is_dtensor, local_part

BLOCK = 1024
# The state tensors of each kind that have the weight's shape, and are packed.
PACKED_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def scalar_dtype() -> torch.dtype:
    """torch's dtype for a CPU ``step`` tensor (``optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class PackedMask:
    """A boolean mask (True = kept) and its GPU layout: a bitmask and per-tile packed offsets.

    ``mask`` is the caller's tensor (referenced, not copied: the sparsifier holds it anyway);
    ``bits`` (uint8, bit j of byte i = flat entry 8 i + j kept, padded with 0 to whole tiles) and
    ``offsets`` (int32, kept entries before each tile of ``block`` entries) are what the kernel reads.
    """

    def __init__(self, mask: torch.Tensor, block: int = BLOCK) -> None:
        if mask.dtype != torch.bool:
            raise ValueError(f"PackedMask: mask must be bool, got {mask.dtype}")
        if block % 8 or block & (block - 1):
            raise ValueError(f"PackedMask: block {block} is not a power of two >= 8")
        self.mask = mask
        self.block = block
        self.numel = mask.numel()
        tiles = -(-self.numel // block)
        padded = torch.zeros(tiles * block, dtype=torch.bool, device=mask.device)
        padded[: self.numel] = mask.reshape(-1)
        counts = padded.view(tiles, block).sum(1)
        offsets = counts.cumsum(0) - counts
        self.kept = int(counts.sum().item()) if tiles else 0
        self.offsets = offsets.to(torch.int32 if self.kept < 2**31 else torch.int64)
        weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=mask.device)
        self.bits = (padded.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)

    @property
    def nbytes(self) -> int:
        """Bytes of the optimizer's own mask layout (bits + offsets; the bool mask is shared)."""
        return self.bits.numel() * self.bits.element_size() + self.offsets.numel() * self.offsets.element_size()

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        """The kept entries of ``dense`` (the weight's shape), 1-D, in flat order."""
        return dense.masked_select(self.mask.to(dense.device))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """A dense tensor of the mask's shape: ``packed`` at kept positions, 0 elsewhere."""
        out = torch.zeros(self.mask.shape, dtype=packed.dtype, device=packed.device)
        return out.masked_scatter_(self.mask.to(packed.device), packed)


def pack_state(p: torch.Tensor, state: dict[str, Any], pack: PackedMask, keys: Sequence[str]) -> None:
    """Pack the dense-shaped ``keys`` of ``p``'s state in place; a DTensor (FSDP2) gives its local part."""
    local = local_part(p)
    for key in keys:
        value = state.get(key)
        if value is None:
            continue
        if is_dtensor(value):
            if not is_dtensor(p):
                raise ValueError(f"PackedOptimizer: state {key!r} is a DTensor, its parameter is not")
            if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
                value = value.redistribute(p.device_mesh, p.placements)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"PackedOptimizer: state {key!r} of shape {tuple(value.shape)} for a parameter of shape {tuple(p.shape)}"
                )
            value = value.to_local()
        elif is_dtensor(p) and isinstance(value, torch.Tensor):
            raise ValueError(
                f"PackedOptimizer: state {key!r} of a DTensor (FSDP2) parameter must be a DTensor of its "
                f"placements, got a plain tensor of shape {tuple(value.shape)}"
            )
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(local.shape):
            raise ValueError(
                f"PackedOptimizer: state {key!r} of shape {tuple(getattr(value, 'shape', ()))} "
                f"for a parameter of shape {tuple(local.shape)}"
            )
        state[key] = pack.pack(value.to(device=local.device, dtype=local.dtype)).contiguous()
    step = state.get("step")
    if isinstance(step, torch.Tensor) and (step.device.type != "cpu" or step.dtype != scalar_dtype()):
        state["step"] = torch.tensor(float(step), dtype=scalar_dtype())


def unpack_state(p: torch.Tensor, state: Mapping[str, Any], pack: PackedMask, keys: Sequence[str]) -> dict[str, Any]:
    """``state`` with its packed ``keys`` made dense-shaped: the parameter's shape, or for a
    DTensor parameter (FSDP2) a DTensor of its mesh, placements and global shape, as torch's
    optimizer holds it."""
    return {
        key: dense_like(p, pack.unpack(value)) if key in keys and isinstance(value, torch.Tensor) else value
        for key, value in state.items()
    }


def dense_like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as ``p`` holds it: itself, or for a DTensor ``p`` a DTensor of ``p``'s layout."""
    if not is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


# -- reference steps (plain torch; the oracle of the kernels) --------------------------------------


@torch.no_grad()
def adam_reference(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    """One AdamW (``decoupled``) / Adam step of the kept entries of ``p`` with packed moments, in
    place, operation by operation as torch's single-tensor Adam; pruned entries of ``p`` become 0.
    ``step`` is the step count after this step (1 on the first)."""
    param = p.masked_select(mask)
    g = grad.masked_select(mask)
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    p.zero_().masked_scatter_(mask, param)


@torch.no_grad()
def sgd_reference(
    p: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first: bool,
) -> None:
    """One SGD step of the kept entries of ``p`` with a packed momentum buffer, in place, as torch's
    single-tensor SGD (``first``: the buffer becomes the gradient); pruned entries become 0."""
    param = p.masked_select(mask)
    g = grad.masked_select(mask)
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("packed SGD step: momentum needs a momentum buffer")
        if first:
            momentum_buffer.copy_(g)
        else:
            momentum_buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(g, alpha=-lr)
    p.zero_().masked_scatter_(mask, param)
