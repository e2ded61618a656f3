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
  pruned model; it ignores the sparsity setting (and the structure: the zeros are taken as found).
- ``checkerboard`` (the reference zoo's, for stress and performance tests) spreads the kept
  entries as evenly as possible over the flattened tensor: of n entries keeping k, index i is
  kept iff ``(i + 1) * k // n > i * k // n`` (integer arithmetic). Exactly k are kept (the sum
  telescopes), the last entry is always kept when k > 0, and consecutive kept indices are at most
  ``ceil(n / k)`` apart. It depends only on (shape, sparsity), not on the weights, seed or name.
  Unlike the zoo's version, the count is exact.

Structured masks (``settings.structure``, see :mod:`sparsetrain.config.sparsity`):

- ``block``: the weight is viewed as a matrix ``(shape[0], numel / shape[0])`` (a 1-D tensor as
  one row) and cut into ``(rows, cols)`` blocks from the top-left corner (``settings_block``: the
  group's size, swapped for a weight stored inputs first, e.g. a Hugging Face ``Conv1D``); the last block row and
  column are partial when a dimension is not a multiple of the block size. Exactly
  ``round(s * number_of_blocks)`` whole blocks are pruned; blocks are numbered row-major over the
  block grid. ``topk`` keeps the blocks of largest Frobenius norm (summed in float64; a block
  holding a NaN counts as the smallest; ties keep the lower block index); ``random`` prunes the
  first blocks of one permutation of the block indices seeded like ``random`` (so again a higher
  sparsity prunes a superset). With partial edge blocks the pruned entry count depends on which
  blocks are pruned, so the entry-level sparsity can differ slightly from ``s``.
- ``N:M``: along the weight's input dimension (``dim``: the last by default, the one selection
  found for the weight's module, ``GroupSettings.input_dim``), each run of M consecutive entries
  keeps exactly N; that dimension must be a multiple of M (else a ConfigError naming the
  parameter and its shape). ``topk`` keeps the N largest ``|w|`` of each group (ties: lower index; NaN smallest);
  ``random`` keeps N of each group from a generator seeded like ``random``.

``checkerboard`` applies its rule to the unit of the structure: to the row-major block grid for
``block`` (whole blocks, exactly ``round(s * number_of_blocks)`` pruned), and to each run of M for
``N:M`` (n = M, k = N, the same N positions in every run).

The block geometry (grid, ``block_layout`` of a mask, ``layout_to_mask``, ``is_block_structured``)
is :mod:`sparsetrain.kernels.blocks`, shared with the kernels. ``is_nm_structured`` checks a mask
(e.g. one recovered from a NaN checkpoint), and ``mask_fits`` says whether a given mask is one the
settings could have drawn (structure and exact counts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from sparsetrain.config.sparsity import GroupSettings
from sparsetrain.config.sparsity_values import DEFAULT_BLOCK_SIZE
from sparsetrain.errors import ConfigError
from sparsetrain.kernels.blocks import (
    BlockSize,
    as_block,
    block_grid,
    block_layout,
    blocked,
    is_block_structured,
    layout_to_mask,
    matrix_shape,
)


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


def even_keep(n: int, kept: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[n]`` keeping ``kept`` evenly spread indices: i iff ``(i+1)*kept // n > i*kept // n``."""
    if not 0 <= kept <= n:
        raise ValueError(f"cannot keep {kept} of {n} entries")
    if n * kept >= 2**63:  # (i + 1) * kept reaches n * kept
        raise ValueError(f"{n} entries keeping {kept} overflow the int64 index arithmetic")
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    i = torch.arange(n, dtype=torch.int64, device=device)
    return (i + 1) * kept // n > i * kept // n


def checkerboard_mask(
    shape: torch.Size | Sequence[int], sparsity: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Exactly ``round(sparsity * numel)`` pruned entries, the kept ones evenly spread over the
    flattened tensor (``even_keep``)."""
    shape = torch.Size(shape)
    n = shape.numel()
    return even_keep(n, n - num_pruned(n, sparsity), device).view(shape)


def mask_from_nan(tensor: torch.Tensor) -> torch.Tensor:
    """The mask a NaN-encoded checkpoint tensor carries: kept where not NaN."""
    return ~torch.isnan(tensor.detach())


# -- block structure -------------------------------------------------------------------------------


def num_pruned_blocks(shape: torch.Size | Sequence[int], sparsity: float, block: BlockSize) -> int:
    """Exact number of pruned blocks: ``round(sparsity * number_of_blocks)``, half to even."""
    grid_rows, grid_cols = block_grid(shape, block)
    return num_pruned(grid_rows * grid_cols, sparsity)


def block_norms(weight: torch.Tensor, block: BlockSize) -> torch.Tensor:
    """Frobenius norm of each block, float64 ``(block_rows, block_cols)``; NaN where a block holds a NaN."""
    blocks = blocked(weight.detach().to(torch.float64), as_block(block), 0.0)
    return blocks.square().sum(dim=(1, 3)).sqrt()


def _layout_keeping(order: torch.Tensor, kept: int, grid: tuple[int, int], device) -> torch.Tensor:
    layout = torch.zeros(grid[0] * grid[1], dtype=torch.bool, device=device)
    layout[order[:kept]] = True
    return layout.view(grid)


def block_topk_layout(weight: torch.Tensor, sparsity: float, block: BlockSize) -> torch.Tensor:
    """Live blocks of ``block_topk_mask``: the largest-norm blocks, lower index first among ties."""
    norms = block_norms(weight, block)
    grid = tuple(norms.shape)
    flat = norms.reshape(-1)
    flat = flat.masked_fill(torch.isnan(flat), -1.0)
    order = torch.sort(flat, descending=True, stable=True).indices
    kept = flat.numel() - num_pruned(flat.numel(), sparsity)
    return _layout_keeping(order, kept, grid, weight.device)


def block_topk_mask(weight: torch.Tensor, sparsity: float, block: BlockSize) -> torch.Tensor:
    """Keep the blocks of largest Frobenius norm; exactly ``round(s * blocks)`` blocks pruned."""
    return layout_to_mask(block_topk_layout(weight, sparsity, block), block, weight.shape)


def block_random_layout(
    name: str, shape: torch.Size | Sequence[int], sparsity: float, seed: int, block: BlockSize
) -> torch.Tensor:
    """Live blocks of ``block_random_mask`` (on the CPU): depends on (seed, name, grid, sparsity)."""
    grid = block_grid(shape, block)
    n = grid[0] * grid[1]
    generator = torch.Generator(device="cpu")
    generator.manual_seed(name_seed(name, seed))
    pruned = torch.randperm(n, generator=generator)[: num_pruned(n, sparsity)]
    layout = torch.ones(n, dtype=torch.bool)
    layout[pruned] = False
    return layout.view(grid)


def block_random_mask(
    name: str,
    shape: torch.Size | Sequence[int],
    sparsity: float,
    seed: int,
    block: BlockSize,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Whole random blocks, exactly ``round(s * blocks)`` pruned, from the stable name hash."""
    shape = torch.Size(shape)
    return layout_to_mask(block_random_layout(name, shape, sparsity, seed, block), block, shape).to(device)


def block_checkerboard_layout(
    shape: torch.Size | Sequence[int],
    sparsity: float,
    block: BlockSize,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Live blocks of ``block_checkerboard_mask``: ``even_keep`` over the row-major block grid."""
    grid = block_grid(shape, block)
    n = grid[0] * grid[1]
    return even_keep(n, n - num_pruned(n, sparsity), device).view(grid)


def block_checkerboard_mask(
    shape: torch.Size | Sequence[int],
    sparsity: float,
    block: BlockSize,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Whole blocks, exactly ``round(s * blocks)`` pruned, the live ones evenly spread over the grid."""
    shape = torch.Size(shape)
    return layout_to_mask(block_checkerboard_layout(shape, sparsity, block, device), block, shape)


# -- N:M structure ---------------------------------------------------------------------------------
# ``dim`` is the dimension the groups run along (the weight's input dimension; default the last):
# the math runs on the tensor with ``dim`` moved last, and the mask is moved back.


def _moved(shape: torch.Size | Sequence[int], dim: int) -> torch.Size:
    """``shape`` with dimension ``dim`` moved last."""
    shape = list(shape)
    return torch.Size([*shape[:dim], *shape[dim + 1 :], shape[dim]] if dim not in (-1, len(shape) - 1) else shape)


def check_nm_shape(name: str, shape: torch.Size | Sequence[int], n: int, m: int, dim: int = -1) -> None:
    """ConfigError unless dimension ``dim`` (the input dimension) of ``shape`` is a multiple of M."""
    shape = tuple(shape)
    if not shape or shape[dim] % m:
        size = shape[dim] if shape else None
        where = "last (input) dimension" if dim in (-1, len(shape) - 1) else f"input dimension {dim}"
        raise ConfigError(
            f"sparsity.structure {n}:{m}: parameter {name!r} of shape {shape} has {where} of size {size}, "
            f"not a multiple of {m}; N:M groups run along the input dimension. Keep it dense (sparsity.exclude), "
            f"or give it structure: block or unstructured in its own group"
        )


def _magnitude(weight: torch.Tensor) -> torch.Tensor:
    """``|w|`` for ranking: float64 weights stay float64, others become float32; NaN -> -1."""
    magnitude = weight.detach().abs()
    magnitude = magnitude.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return magnitude.masked_fill(torch.isnan(magnitude), -1.0)


def _nm_keep(order: torch.Tensor, n: int, moved: torch.Size, dim: int) -> torch.Tensor:
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order[:, :n], True)
    return mask.view(moved).movedim(-1, dim).contiguous()


def _check_nm(n: int, m: int, shape: torch.Size, dim: int) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if not shape or shape[dim] % m:
        raise ValueError(f"N:M {n}:{m}: dimension {dim} of {tuple(shape)} is not a multiple of {m}")


def nm_topk_mask(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """In each run of M consecutive entries along ``dim`` keep the N largest ``|w|``."""
    _check_nm(n, m, weight.shape, dim)
    magnitude = _magnitude(weight).movedim(dim, -1)
    order = torch.sort(magnitude.reshape(-1, m), dim=1, descending=True, stable=True).indices
    return _nm_keep(order, n, magnitude.shape, dim)


def nm_random_mask(
    name: str,
    shape: torch.Size | Sequence[int],
    n: int,
    m: int,
    seed: int,
    device: torch.device | str | None = None,
    dim: int = -1,
) -> torch.Tensor:
    """N random entries kept in each run of M along ``dim``, from the stable name hash."""
    shape = torch.Size(shape)
    _check_nm(n, m, shape, dim)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(name_seed(name, seed))
    keys = torch.rand(shape.numel() // m, m, generator=generator)
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    return _nm_keep(order, n, _moved(shape, dim), dim).to(device)


def nm_checkerboard_mask(
    shape: torch.Size | Sequence[int], n: int, m: int, device: torch.device | str | None = None, dim: int = -1
) -> torch.Tensor:
    """The same N evenly spread positions kept in each run of M along ``dim``."""
    shape = torch.Size(shape)
    _check_nm(n, m, shape, dim)
    moved = even_keep(m, n, device).repeat(shape.numel() // m).view(_moved(shape, dim))
    return moved.movedim(-1, dim).contiguous()


def is_nm_structured(mask: torch.Tensor, n: int, m: int, exact: bool = True, dim: int = -1) -> bool:
    """Whether each run of M along ``dim`` keeps exactly N (``exact``) or at most N."""
    if not mask.ndim or mask.shape[dim] % m:
        return False
    kept = mask.detach().to(torch.int32).movedim(dim, -1).reshape(-1, m).sum(dim=1)
    return bool((kept == n).all() if exact else (kept <= n).all())


# -- dispatch --------------------------------------------------------------------------------------


def settings_block(settings: GroupSettings) -> tuple[int, int]:
    """The block size of a ``block`` group (the default when the settings carry none) in the
    weight's stored layout: ``[outputs, inputs]``, so swapped for a weight stored inputs first."""
    rows, cols = settings.block_size if settings.block_size is not None else (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)
    return (cols, rows) if settings.input_dim == 0 else (rows, cols)


def nm_dim(settings: GroupSettings) -> int:
    """The dimension N:M groups run along: the weight's input dimension (default the last)."""
    return -1 if settings.input_dim is None else settings.input_dim


def check_structure(name: str, shape: torch.Size | Sequence[int], settings: GroupSettings) -> None:
    """ConfigError when the parameter's shape cannot take the group's structure (N:M only)."""
    nm = settings.nm
    if nm is not None and settings.init_method != "from_zeros":
        check_nm_shape(name, shape, *nm, nm_dim(settings))


def make_mask(name: str, weight: torch.Tensor, settings: GroupSettings) -> torch.Tensor:
    """The mask of one parameter under its group's settings, on the weight's device."""
    if settings.init_method == "from_zeros":
        return from_zeros_mask(weight)
    if settings.init_method == "checkerboard":
        return _checkerboard_for(name, weight.shape, settings, weight.device)
    if settings.init_method not in ("topk", "random"):
        raise ValueError(f"unknown init_method {settings.init_method!r}")
    topk = settings.init_method == "topk"
    if settings.structure == "unstructured":
        if topk:
            return topk_mask(weight, settings.sparsity)
        return random_mask(name, weight.shape, settings.sparsity, settings.seed, weight.device)
    if settings.structure == "block":
        block = settings_block(settings)
        if topk:
            return block_topk_mask(weight, settings.sparsity, block)
        return block_random_mask(name, weight.shape, settings.sparsity, settings.seed, block, weight.device)
    nm = settings.nm
    if nm is None:
        raise ValueError(f"unknown structure {settings.structure!r}")
    dim = nm_dim(settings)
    check_nm_shape(name, weight.shape, *nm, dim)
    if topk:
        return nm_topk_mask(weight, *nm, dim)
    return nm_random_mask(name, weight.shape, *nm, settings.seed, weight.device, dim)


def _checkerboard_for(
    name: str, shape: torch.Size, settings: GroupSettings, device: torch.device | str | None
) -> torch.Tensor:
    if settings.structure == "unstructured":
        return checkerboard_mask(shape, settings.sparsity, device)
    if settings.structure == "block":
        return block_checkerboard_mask(shape, settings.sparsity, settings_block(settings), device)
    nm = settings.nm
    if nm is None:
        raise ValueError(f"unknown structure {settings.structure!r}")
    check_nm_shape(name, shape, *nm, nm_dim(settings))
    return nm_checkerboard_mask(shape, *nm, device, nm_dim(settings))


def mask_fits(mask: torch.Tensor, settings: GroupSettings) -> bool:
    """Whether ``mask`` is one these settings could have drawn: the right structure and exactly
    the right count (pruned entries, pruned blocks, or N kept of each M). ``from_zeros`` takes
    any mask. For resuming from a NaN checkpoint: a mask that fits is kept as it is."""
    if settings.init_method == "from_zeros":
        return True
    mask = mask.to(torch.bool)
    if settings.structure == "unstructured":
        return mask.numel() - int(mask.sum()) == num_pruned(mask.numel(), settings.sparsity)
    if settings.structure == "block":
        block = settings_block(settings)
        if not is_block_structured(mask, block):
            return False
        layout = block_layout(mask, block)
        return layout.numel() - int(layout.sum()) == num_pruned(layout.numel(), settings.sparsity)
    nm = settings.nm
    return nm is not None and is_nm_structured(mask, *nm, dim=nm_dim(settings))


def expected_pruned(name: str, shape: torch.Size | Sequence[int], settings: GroupSettings) -> tuple[int, bool]:
    """``(pruned entries, exact)`` the settings give a parameter of ``shape`` before any weight
    is seen. Exact except for ``topk`` blocks with partial edge blocks, where the count depends
    on which blocks the weights pick: then the estimate prunes the smallest blocks first (what
    ``topk`` does on freshly initialised weights, whose block norms grow with the block's area
    far faster than they vary at random). For ``from_zeros`` it is the stated target."""
    shape = torch.Size(shape)
    numel = shape.numel()
    if settings.structure != "block" or settings.init_method == "from_zeros":
        return num_pruned(numel, settings.sparsity), True
    block = settings_block(settings)
    grid = block_grid(shape, block)
    rows, cols = matrix_shape(shape)
    blocks = grid[0] * grid[1]
    pruned_blocks = num_pruned(blocks, settings.sparsity)
    if rows % block[0] == 0 and cols % block[1] == 0:
        return pruned_blocks * block[0] * block[1], True
    if settings.init_method == "random":
        layout = block_random_layout(name, shape, settings.sparsity, settings.seed, block)
    elif settings.init_method == "checkerboard":
        layout = block_checkerboard_layout(shape, settings.sparsity, block)
    else:  # topk: the weights pick the blocks
        heights = [min(block[0], rows - i * block[0]) for i in range(grid[0])]
        widths = [min(block[1], cols - j * block[1]) for j in range(grid[1])]
        areas = sorted(h * w for h in heights for w in widths)
        return sum(areas[:pruned_blocks]), False
    return numel - int(layout_to_mask(layout, block, (rows, cols)).sum()), True
