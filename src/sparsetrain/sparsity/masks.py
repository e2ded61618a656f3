"""Masks: pure functions from a tensor and settings to a boolean mask (True = kept).

Counts are exact: a tensor of n entries at sparsity s has exactly ``round(s * n)`` pruned entries
(Python ``round``, half to even), never a Bernoulli approximation.

- ``topk`` keeps the largest ``|w|``. Among equal ``|w|`` the lower flat index is kept; NaN counts
  as the smallest magnitude (pruned first). Same weights give the same mask on any device.
- ``random`` depends only on (seed, parameter name, numel, sparsity): the generator is seeded with
  a blake2b hash of ``"{seed}:{name}"`` (never Python's salted ``hash``) and runs on the CPU, so
  the mask is the same on CPU or GPU, on 1 or N processes, in any parameter order. The pruned
  positions are the first ``round(s * n)`` entries of one permutation, so for a given name and
  seed a higher sparsity prunes a superset of a lower one.
- ``from_zeros`` keeps the entries that are neither exactly zero nor NaN, for importing an already
  pruned model; it ignores the sparsity setting.
"""

from __future__ import annotations

import hashlib

import torch

from sparsetrain.sparsity.config import GroupSettings


def num_pruned(numel: int, sparsity: float) -> int:
    """Exact number of pruned entries: ``round(sparsity * numel)``, half to even."""
    return min(max(round(sparsity * numel), 0), numel)


def topk_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest ``|w|``; ties keep the lower flat index; NaN is pruned first."""
    n = weight.numel()
    kept = n - num_pruned(n, sparsity)
    magnitude = weight.detach().reshape(-1).abs().float()
    magnitude = magnitude.masked_fill(torch.isnan(magnitude), -1.0)
    # A stable descending sort keeps equal magnitudes in index order: lower index first.
    order = torch.sort(magnitude, descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
    mask[order[:kept]] = True
    return mask.view(weight.shape)


def name_seed(name: str, seed: int) -> int:
    """A 64-bit generator seed from the parameter name and the config seed, stable everywhere."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def random_mask(
    name: str,
    shape: torch.Size | tuple[int, ...],
    sparsity: float,
    seed: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly random mask with exactly ``round(sparsity * numel)`` pruned entries."""
    shape = torch.Size(shape)
    n = shape.numel()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(name_seed(name, seed))
    pruned = torch.randperm(n, generator=generator)[: num_pruned(n, sparsity)]
    mask = torch.ones(n, dtype=torch.bool)
    mask[pruned] = False
    return mask.view(shape).to(device)


def from_zeros_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep every entry that is neither exactly zero nor NaN."""
    weight = weight.detach()
    return (weight != 0) & ~torch.isnan(weight)


def mask_from_nan(tensor: torch.Tensor) -> torch.Tensor:
    """The mask a NaN-encoded checkpoint tensor carries: kept where not NaN."""
    return ~torch.isnan(tensor.detach())


def make_mask(name: str, weight: torch.Tensor, settings: GroupSettings) -> torch.Tensor:
    """The mask of one parameter under its group's settings, on the weight's device."""
    if settings.init_method == "topk":
        return topk_mask(weight, settings.sparsity)
    if settings.init_method == "random":
        return random_mask(name, weight.shape, settings.sparsity, settings.seed, weight.device)
    if settings.init_method == "from_zeros":
        return from_zeros_mask(weight)
    raise ValueError(f"unknown init_method {settings.init_method!r}")
