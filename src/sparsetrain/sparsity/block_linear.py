"""Run block-sparse ``nn.Linear`` layers on the block-skipping GPU kernels, storing their live
blocks only.

    names = use_block_kernels(model, sparsifier, packed=True)   # before the optimizer is built

For every ``nn.Linear`` whose weight the sparsifier masks with ``structure: block`` (a mask made
of whole blocks, of a shape the kernels take), the module's class becomes
:class:`BlockSparseLinear`: a forward that computes over the live blocks only
(:func:`sparsetrain.kernels.block_sparse_op.block_sparse_linear`) and falls back to ``F.linear``
wherever the kernels do not apply (CPU, fp32, no Triton). The model's own code is untouched;
``use_dense_kernels`` turns them back.

**Storage.** With ``packed=False`` the layer keeps its parameter ``weight``, dense fp32 ``(N, K)``
with zeros at pruned blocks, and a dense gradient; the sparsifier keeps the zeros. With
``packed=True`` (what ``sparsetrain train`` does wherever the kernels are on, one process or DDP)
the layer stores only its live blocks: the parameter becomes ``weight_blocks``, fp32
``(nnz, br, bc)`` in the layout's block order (:class:`~sparsetrain.kernels.blocks.BlockLayout`),
and its gradient has the same shape (the kernels compute it on live blocks only, no dense tensor
is made). Weight and gradient take 8 bytes per live entry instead of 8 per entry (at 75% sparsity,
a quarter), and the optimizer, which sees a small dense parameter, keeps state of that size with
no mask. Pruned weights are not stored, so they stay zero by construction: the sparsifier enforces
nothing for these layers but keeps their masks, keyed by the dense name ``...weight``, for
statistics, FLOPs and checkpoints. Nothing outside sees the difference:

- ``model.state_dict()`` holds the dense ``<prefix>weight`` (zeros at pruned blocks, so NaN in a
  sparse checkpoint) and ``load_state_dict`` takes it and packs it: checkpoints are those of a
  masked-dense run and load both ways;
- an optimizer the sparsifier is attached to gives its state for ``weight_blocks`` in the dense
  layout in ``state_dict()`` and packs it again in ``load_state_dict``
  (:func:`optimizer_state_to_dense` / :func:`optimizer_state_to_blocks`, registered as its hooks);
- the fallback unpacks the blocks to dense, differentiably, and calls ``F.linear``, so CPU runs
  compute exactly what masked dense computes.

Pack before the optimizer is built: it must hold ``weight_blocks`` (packing a weight an attached
optimizer holds is an error). ``use_dense_kernels`` gives packed layers a dense ``weight`` again,
a new parameter: build the optimizer again and attach the sparsifier to it. When the masks change
(``sparsifier.load_state_dict``, a dynamic-sparsity update), the blocks and the optimizer state of
their shape move to the new layout: blocks that stay keep their values, blocks that become live
start at 0 (weights and state), blocks that die are dropped, and the gradient is dropped
(``None``: it belongs to the old layout). The parameter object stays. With the live block count
unchanged (SET and RigL keep it exactly) everything moves in place: the blocks' storage, every
optimizer-state tensor of their shape and the table buffers keep their tensors and addresses,
because ``torch.compile`` with CUDA graphs (``reduce-overhead``) takes parameters and buffers as
static inputs at fixed addresses and a new tensor would force a new recording. When the count
changes (GMP pruning further) they become new tensors of the new size: do that before wrapping the
model in DDP.

Under FSDP2 (``runconfig.distributed: fsdp``) ``sparsetrain train`` keeps dense storage:
``fully_shard`` splits every parameter along dim 0 into DTensor shards and gathers full model and
optimizer state dicts by parameter name and shape; the dense <-> blocks conversion above would
have to run on shards of the block list (blocks of unrelated rows on each rank, padded when nnz
does not divide by the ranks), which is neither written nor tested here.

The block tables are non-persistent buffers of the module (they follow ``.to()`` and
``torch.compile`` sees them as tensors); call ``use_block_kernels`` again after the masks change
(the sparsifier does so itself on ``load_state_dict``): tables of unchanged shapes, the layer's
``_bs_*`` and a fused stack's ``_bsf_*``, are refreshed in place.

:mod:`sparsetrain.sparsity.dense_grad` gives the dense gradient of a packed layer's weight on
demand (RigL's regrowth criterion): the layer applies its probe in ``forward`` and
``fused_forward`` while one is set, and costs one attribute check otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from sparsetrain.kernels.block_sparse_op import TABLES, block_sparse_linear, layout_of, triton_ready
from sparsetrain.kernels.blocks import (
    BlockLayout,
    block_layout,
    is_block_structured,
    kernel_block_ok,
    pack_blocks,
    unpack_blocks,
)
from sparsetrain.sparsity.block_storage import block_mover, drop_tables, rename_parameter, replace_into, set_tables

log = logging.getLogger(__name__)

__all__ = [
    "BLOCKS",
    "BlockSparseLinear",
    "optimizer_state_to_blocks",
    "optimizer_state_to_dense",
    "packed_layers",
    "state_dict_names",
    "use_block_kernels",
    "use_dense_kernels",
]

BLOCKS = "weight_blocks"  # the parameter of a layer that stores its live blocks only
FUSED = "_bsf_"  # buffers of the first layer of a fused stack: the stack's tables


class BlockSparseLinear(nn.Linear):
    """An ``nn.Linear`` whose forward reads only the live blocks of its weight, stored dense
    (``weight``) or as those blocks (``weight_blocks``, see the module docstring)."""

    block: tuple[int, int]
    # Set on the instance by ``dense_grad.collect_dense_grads`` while it runs: ``probe(y, x)``
    # returns ``y`` and adds the dense weight gradient in the backward. A class attribute None
    # otherwise, so the check costs one attribute read (a constant to torch.compile).
    _dense_grad_probe: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def packed(self) -> bool:
        """Whether the weight is stored as its live blocks only."""
        return BLOCKS in self._parameters

    def stored_weight(self) -> torch.Tensor:
        """The weight parameter: ``weight_blocks`` (packed) or ``weight``."""
        return self._parameters[BLOCKS if self.packed else "weight"]

    def set_layout(self, layout: torch.Tensor, block: tuple[int, int], optimizers: Iterable = ()) -> None:
        """Take the live blocks ``layout`` (bool, one entry per block); stored blocks, and the
        state ``optimizers`` hold for them, move to the new layout (0 where a block is new). With
        as many live blocks as before, blocks, state and tables are updated in place (same
        tensors, same addresses: what CUDA graphs need; see the module docstring)."""
        triton_ready()  # decided here, outside any compiled region
        tables = BlockLayout.build(layout.to(self.stored_weight().device), block)
        if self.packed:
            self._repack(tables, optimizers)  # reads the old tables: before they change
        self.block = block
        set_tables(self, "_bs_", tables)

    def tables(self) -> list[torch.Tensor]:
        return [getattr(self, f"_bs_{name}") for name in TABLES]

    def layout(self) -> BlockLayout:
        return layout_of((self.out_features, self.in_features), self.tables(), self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = block_sparse_linear(x, self.stored_weight(), self.bias, self.tables(), self.block)
        if self._dense_grad_probe is not None:
            y = self._dense_grad_probe(y, x)
        return y

    @staticmethod
    def fused_forward(x: torch.Tensor, layers: tuple[BlockSparseLinear, ...]) -> torch.Tensor:
        """``layers`` (a module's ``fused_linears``, e.g. attention's q, k, v) as ONE product over
        their weights stacked along the outputs, on the tables :func:`use_block_kernels` built for
        the stack; each layer on its own where it built none, or while one has a dense-gradient
        probe (:mod:`~sparsetrain.sparsity.dense_grad`: each layer's output is probed). One product
        is what the dense model does for plain ``nn.Linear`` layers: the same arithmetic, and one
        launch per kernel."""
        first = layers[0]
        probed = any(m._dense_grad_probe is not None for m in layers)
        if probed or not hasattr(first, f"{FUSED}{TABLES[0]}"):
            return torch.cat([m(x) for m in layers], dim=-1)
        weight = torch.cat([m.stored_weight() for m in layers])
        bias = torch.cat([m.bias for m in layers]) if first.bias is not None else None
        return block_sparse_linear(x, weight, bias, [getattr(first, f"{FUSED}{n}") for n in TABLES], first.block)

    def extra_repr(self) -> str:
        stored = ", stored=live blocks" if self.packed else ""
        return f"{super().extra_repr()}, block={self.block}, live={self.layout().density():.3f}{stored}"

    # -- storage -------------------------------------------------------------------------------

    @torch.no_grad()
    def pack(self) -> None:
        """Store the live blocks only: ``weight`` becomes ``weight_blocks`` (a new parameter)."""
        weight = self._parameters["weight"]
        blocks = nn.Parameter(pack_blocks(weight, self.layout()), requires_grad=weight.requires_grad)
        rename_parameter(self, "weight", BLOCKS, blocks)

    @torch.no_grad()
    def unpack(self) -> None:
        """Store the dense weight again: ``weight_blocks`` becomes ``weight`` (a new parameter)."""
        blocks = self._parameters[BLOCKS]
        weight = nn.Parameter(unpack_blocks(blocks, self.layout()), requires_grad=blocks.requires_grad)
        rename_parameter(self, BLOCKS, "weight", weight)

    def dense_weight(self) -> torch.Tensor:
        """The ``(N, K)`` weight with zeros at pruned blocks: the parameter itself when stored
        dense, else a new tensor (no gradient) unpacked from the blocks."""
        if not self.packed:
            return self.weight
        return unpack_blocks(self.weight_blocks.detach(), self.layout())

    def _to_storage(self, value: Any, dense: bool) -> Any:
        """A tensor of the stored blocks' shape as dense ``(N, K)`` (``dense``), or a dense one as
        blocks; anything else as it is (Adam's ``step``, non-float state)."""
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        if dense and value.shape == self.weight_blocks.shape:
            return unpack_blocks(value, self.layout())
        if not dense and tuple(value.shape) == (self.out_features, self.in_features):
            return pack_blocks(value, self.layout().to(value.device))
        return value

    @torch.no_grad()
    def _repack(self, tables: BlockLayout, optimizers: Iterable) -> None:
        """Move the stored blocks, and optimizer state of their shape, from the current layout to
        ``tables``: in place (``copy_``) where the shape stays, else as new tensors."""
        old = self.layout()
        same = old.nnz == tables.nnz and torch.equal(old.blk_rows, tables.blk_rows)
        if same and torch.equal(old.row_cols, tables.row_cols):
            return
        move = block_mover(old, tables)
        p = self.weight_blocks
        for optimizer in optimizers:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape:
                    state[key] = replace_into(value, move(value))
        moved = move(p)
        if moved.shape == p.shape:
            p.copy_(moved)  # the same storage: CUDA graphs keep reading it
        else:
            p.data = moved  # the same parameter object: the optimizer keeps holding it
        p.grad = None  # of the old layout

    # -- state dict: always the dense weight ----------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.packed:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        own: dict[str, Any] = {}
        super()._save_to_state_dict(own, prefix, keep_vars)
        for key, value in own.items():  # in order: the weight stays where nn.Linear puts it
            if key == prefix + BLOCKS:
                key, value = prefix + "weight", self.dense_weight()
            destination[key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        if self.packed and prefix + "weight" in state_dict:
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}  # never the caller's
            state_dict[prefix + BLOCKS] = self._blocks_from(state_dict.pop(prefix + "weight"), prefix, errors)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)
        if self.packed:  # the name a checkpoint has
            missing_keys[:] = [prefix + "weight" if k == prefix + BLOCKS else k for k in missing_keys]

    @torch.no_grad()
    def _blocks_from(self, dense: torch.Tensor, prefix: str, error_msgs: list[str]) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if tuple(dense.shape) != shape:
            error_msgs.append(
                f"size mismatch for {prefix}weight: copying a param with shape {tuple(dense.shape)} from "
                f"checkpoint, the shape in current model is {torch.Size(shape)}."
            )
            return self.weight_blocks.detach()
        return pack_blocks(dense, self.layout().to(dense.device))


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def packed_layers(model: nn.Module) -> dict[str, BlockSparseLinear]:
    """The layers of ``model`` that store live blocks only, by their dense weight's name (the
    sparsifier's mask key and the checkpoint's)."""
    return {name: m for name, m in _linears(model).items() if isinstance(m, BlockSparseLinear) and m.packed}


def dense_numel(model: nn.Module) -> int:
    """``model``'s parameter count as a dense model (layers storing live blocks at their full
    size): the model's size, whatever its storage."""
    total = sum(p.numel() for p in model.parameters())
    return total + sum(m.out_features * m.in_features - m.weight_blocks.numel() for m in packed_layers(model).values())


def state_dict_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> the name its values have in ``model.state_dict()``: the first name
    under ``named_parameters``, the dense weight's name for ``weight_blocks``."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    for name, module in packed_layers(model).items():
        names[id(module.weight_blocks)] = name
    return names


def use_block_kernels(
    model: nn.Module, sparsifier, *, packed: bool = False, layouts: Mapping[str, torch.Tensor] | None = None,
    only: Iterable[str] | None = None,
) -> list[str]:
    """Switch each eligible block-sparse linear layer of ``model`` to the kernels; returns the
    weight names switched (others keep ``F.linear`` on the masked weight). ``packed``: store their
    live blocks only (see the module docstring; before the optimizer is built). Layers already
    packed stay packed, on the sparsifier's current masks. ``layouts``: the live-block grids of
    masks known to be whole blocks (dynamic sparsity's new masks: not read off the masks again);
    ``only``: the layers whose masks changed (the others are left as they are)."""
    linears = _linears(model)
    optimizers = sparsifier.optimizers
    layouts = layouts or {}
    only = None if only is None else set(only)
    switched, skipped = [], []
    for name, mask in sparsifier.masks.items():
        group = sparsifier.settings[name]
        module = linears.get(name)
        if module is None or group.structure != "block":
            continue
        if only is not None and name not in only:
            if isinstance(module, BlockSparseLinear):
                switched.append(name)
            continue
        block = group.block_size
        layout = layouts.get(name)
        if not kernel_block_ok(tuple(mask.shape), block) or (layout is None and not is_block_structured(mask, block)):
            skipped.append(name)
            if isinstance(module, BlockSparseLinear):  # its mask changed under it
                _to_linear(module, name)
            continue
        module.__class__ = BlockSparseLinear
        module.set_layout(block_layout(mask, block) if layout is None else layout, block, optimizers)
        if packed and not module.packed:
            if any(module.weight is p for opt in optimizers for g in opt.param_groups for p in g["params"]):
                raise ValueError(
                    f"use_block_kernels(packed=True): an optimizer attached to the sparsifier holds {name}; "
                    "pack the block weights before building the optimizer (it must hold weight_blocks)"
                )
            module.pack()
        switched.append(name)
    _fuse_stacks(model)
    sparsifier.block_kernels = True
    sparsifier.rebind()  # packed weights leave the sparsifier's enforcement: nothing pruned is stored
    if skipped:
        log.warning(
            "sparsity: %d block-sparse weight(s) stay on dense kernels (the kernels take whole blocks "
            "with sides in 16..256, powers of two): %s", len(skipped), ", ".join(skipped[:8]),
        )
    if switched:
        log.info(
            "sparsity: %d linear layer(s) run on the block-sparse kernels where the GPU allows%s",
            len(switched), ", live blocks stored only" if packed else "",
        )
    return switched


def _fuse_stacks(model: nn.Module) -> None:
    """Tables for each module's ``fused_linears`` (layers that run as one product, stacked along
    their outputs) whose layers are all on the kernels with the same block and storage, on the
    first layer; built again, from the layers' current layouts, on every call (in place where
    their shapes stay); dropped from the others and from stacks that no longer fuse."""
    for module in model.modules():
        layers = [getattr(module, n) for n in getattr(module, "fused_linears", ())]
        tables = _stack_tables(layers)
        for i, m in enumerate(layers):
            if i == 0 and tables is not None:
                set_tables(m, FUSED, tables)
            else:
                drop_tables(m, FUSED)


def _stack_tables(layers: list[nn.Module]) -> BlockLayout | None:
    """The tables of ``layers`` stacked along their outputs, or None where they cannot fuse."""
    if not layers or not all(isinstance(m, BlockSparseLinear) for m in layers):
        return None
    first = layers[0]
    if any(m.block != first.block or m.packed != first.packed or m.in_features != first.in_features for m in layers):
        return None
    return BlockLayout.build(torch.cat([_grid(m.layout()) for m in layers]), first.block)


def _grid(layout: BlockLayout) -> torch.Tensor:
    """The live-block grid (bool, one entry per block) of a layout."""
    rows = -(-layout.shape[0] // layout.block[0])
    cols = -(-layout.shape[1] // layout.block[1])
    grid = torch.zeros(rows, cols, dtype=torch.bool, device=layout.row_cols.device)
    grid[layout.blk_rows.long(), layout.row_cols.long()] = True
    return grid


def use_dense_kernels(model: nn.Module) -> None:
    """Turn every :class:`BlockSparseLinear` of ``model`` back into a plain ``nn.Linear``. A packed
    layer gets a dense ``weight`` parameter again (a new one: build the optimizer again and
    ``sparsifier.attach`` it, which binds the masks to the new weights)."""
    for name, module in _linears(model).items():
        if isinstance(module, BlockSparseLinear):
            if module.packed:
                module.unpack()
            _to_linear(module, name)


def _to_linear(module: BlockSparseLinear, name: str) -> None:
    if module.packed:
        raise ValueError(
            f"sparsity: {name} stores its live blocks only and its mask is no longer one of whole "
            f"{module.block} blocks; use_dense_kernels(model) first"
        )
    drop_tables(module, "_bs_")
    drop_tables(module, FUSED)
    module.__class__ = nn.Linear


# -- optimizer state: the dense layout in state dicts --------------------------------------------


def optimizer_state_to_dense(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping) -> dict | None:
    """``optimizer.state_dict()`` with the state of every ``weight_blocks`` in the dense weight's
    layout (zeros at pruned blocks), as for a masked-dense run; a state-dict post-hook (the
    sparsifier registers it on ``attach``). Returns a new dict, or None when nothing is packed."""
    return _convert_state(model, optimizer, state_dict, dense=True)


def optimizer_state_to_blocks(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping) -> dict | None:
    """The reverse, a load-state-dict pre-hook: dense-layout state of a ``weight_blocks`` is
    packed (state already of the blocks' shape is taken as it is)."""
    return _convert_state(model, optimizer, state_dict, dense=False)


def _convert_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping, dense: bool) -> dict | None:
    layers = {id(m.weight_blocks): m for m in packed_layers(model).values()}
    if not layers or "state" not in state_dict:
        return None
    state = dict(state_dict["state"])
    # Saved indices map to parameters group by group, in order (as Optimizer.load_state_dict does).
    for saved, group in zip(state_dict.get("param_groups", []), optimizer.param_groups, strict=False):
        for index, p in zip(saved["params"], group["params"], strict=False):
            module = layers.get(id(p))
            if module is not None and index in state:
                state[index] = {key: module._to_storage(value, dense) for key, value in state[index].items()}
    return {**state_dict, "state": state}
