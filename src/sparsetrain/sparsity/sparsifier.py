"""Bind sparsity masks to a model and its optimizers, and keep pruned weights at zero.

    sparsifier = sparsify(model, params["sparsity"], optimizer)

The invariant (after creation and after EVERY ``optimizer.step()``, for any torch optimizer,
with or without weight decay): pruned weights are exactly zero, their gradients are zero, and
every optimizer-state tensor of the weight's shape (Adam's moments, momentum buffers, Adagrad's
sums, ...) is zero at pruned positions, so neither momentum nor decay can revive a pruned weight.
It is enforced by hooks, with no call to forget:

- a post-accumulate-grad hook on each sparsified parameter zeroes pruned gradients as soon as
  backward writes them, so gradient clipping sees the sparse gradient norm;
- an optimizer step pre-hook zeroes any gradient written since (a DDP reducer copying reduced
  gradients back, a user assigning ``.grad``), so nothing pruned leaks into the step;
- an optimizer step post-hook zeroes pruned weights and same-shape state tensors.

An optimizer with a ``set_masks`` method (``sparsetrain.optim.packed.PackedOptimizer``)
is handed the masks on ``attach`` (and again whenever they change): it keeps state for kept
entries only and writes pruned weights as zeros itself, so the post-step pass skips the
parameters it enforces; gradients are still masked as above.

Pruned weights are physically zero in memory: the model runs unmodified (no forward hooks, so
``torch.compile`` sees a plain model), and a checkpoint written after any step is sparse.

Block-sparse layers that store their live blocks only (``sparsity.block_linear``,
``use_block_kernels(..., packed=True)``) have no pruned entries in memory: the hooks skip them (the
invariant holds by construction) and an optimizer with ``set_masks`` gets no mask for them. Their
masks stay in ``masks`` under the dense weight's name (statistics, FLOPs, checkpoints), and
``attach`` registers the optimizer's state-dict hooks that give their state the dense layout in
``optimizer.state_dict()`` and pack it again on ``load_state_dict``.

Call ``sparsify`` after the model is on its device and after wrapping it (DDP); masks are bound to
the parameter objects when they are drawn and rebound by name at ``attach``. Masks are the same
on every DDP rank (``topk`` of identical weights, ``random`` from a name hash). FSDP2
(``fully_shard``) parameters are DTensors: draw the masks on the full weights first, shard, then
``sparsify(model, block, optimizer, masks=those)``; each rank then enforces its slice of every
mask on its local shard, with no communication, and an optimizer with ``set_masks`` is handed
those local slices (of ``p.to_local()``'s shape), so a ``PackedOptimizer`` packs the state of
its own shards only. Optimizers that evaluate a closure several times per step
(LBFGS) see pruned weights only at zero when each step ends.

Unstructured sparsity on a GPU buys no speed: the masked model costs a dense model's FLOPs. It buys
fidelity to the reference results and smaller checkpoints (see ``sparsetrain.sparsity.nan_format``).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsetrain.config.sparsity import GroupSettings, SparsityConfig, parse_sparsity
from sparsetrain.distributed import is_dtensor, local_part
from sparsetrain.errors import CheckpointError
from sparsetrain.sparsity import block_linear, mask_stats
from sparsetrain.sparsity.initial_masks import check_given, mask_for, warn_from_zeros
from sparsetrain.sparsity.select import select_for_model

log = logging.getLogger(__name__)

STATE_VERSION = 1


def sparsify(
    model: nn.Module,
    block: Mapping[str, Any] | SparsityConfig | None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    settings: Mapping[str, GroupSettings] | None = None,
) -> Sparsifier:
    """Draw (or take) the masks of ``model``'s selected parameters, zero pruned weights, and
    attach to ``optimizer`` if given.

    ``masks`` supplies existing masks, e.g. recovered from a NaN checkpoint: a selected parameter
    found there keeps that mask (resuming never re-draws or compounds it), unless its group asks
    for ``sparsity: 0.0`` (the weight becomes dense) or for a different number of pruned entries
    (a new mask is drawn from the current weights, with a warning). No block gives a sparsifier
    with no masks: dense training. ``settings``: the block's selection on this model, when the
    caller resolved it already (:func:`~sparsetrain.sparsity.select.select_for_model`).
    """
    config = block if isinstance(block, SparsityConfig) or block is None else parse_sparsity(block)
    if config is None and masks:
        log.info("sparsity: no sparsity block; the %d sparse tensors given train dense (dense fine-tuning)", len(masks))
        masks = None
    if config is None:
        settings = {}
    elif settings is None:
        settings = select_for_model(model, config)
    settings = dict(settings)
    params = dict(model.named_parameters())
    given = check_given(masks or {}, params, settings)
    chosen: dict[str, torch.Tensor] = {}
    for name, group in settings.items():
        chosen[name] = mask_for(name, params[name], group, given.get(name))
    sparsifier = Sparsifier(model, chosen, settings, config)
    if chosen:
        log.info("sparsity: %s", sparsifier.summary())
        warn_from_zeros(chosen, settings)
    if optimizer is not None:
        sparsifier.attach(optimizer)
    return sparsifier


class Sparsifier:
    """Masks of a model's sparsified parameters (True = kept) and the hooks that enforce them."""

    def __init__(
        self,
        model: nn.Module,
        masks: dict[str, torch.Tensor],
        settings: dict[str, GroupSettings],
        config: SparsityConfig | None = None,
    ) -> None:
        self.model = model
        self.masks = masks
        self.settings = settings
        self.config = config
        self._optimizers: list[torch.optim.Optimizer] = []
        self._step_handles: list[Any] = []
        self._state_handles: list[Any] = []  # optimizer state-dict hooks (weights stored as blocks)
        self._grad_handles: list[Any] = []
        self._bound: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its local mask)
        self._local_masks: dict[tuple[str, int, int], torch.Tensor] = {}
        self._cast: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._hooked = False
        self._masked_grads: dict[int, tuple[weakref.ref, int]] = {}
        self._enforced: dict[int, set[int]] = {}  # id(optimizer) -> indices of _bound it enforces
        self._bound_names: list[str] = []  # the name of each entry of _bound
        self._hold: set[str] = set()  # names whose next gradients stay dense until captured (RigL)
        self._dense_grads: dict[str, torch.Tensor] = {}
        self.block_kernels = False  # set by sparsity.block_linear.use_block_kernels
        self._bind()
        self.apply()

    # -- hooks ---------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Enforce the masks at every step of ``optimizer`` and clear its existing state now."""
        self._bind()
        if any(opt is optimizer for opt in self._optimizers):
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if self._bound and not any(id(p) in in_optimizer for p, _ in self._bound):
            log.warning(
                "sparsity: the optimizer holds none of the %d sparsified parameters; was the "
                "model wrapped or moved after sparsify()?",
                len(self._bound),
            )
        self._optimizers.append(optimizer)
        self._step_handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._step_handles.append(optimizer.register_step_post_hook(self._after_step))
        # State of weights stored as live blocks: the dense layout in state dicts (checkpoints).
        to_dense = functools.partial(block_linear.optimizer_state_to_dense, self.model)
        to_blocks = functools.partial(block_linear.optimizer_state_to_blocks, self.model)
        self._state_handles.append(optimizer.register_state_dict_post_hook(to_dense))
        self._state_handles.append(optimizer.register_load_state_dict_pre_hook(to_blocks))
        self._hand_masks(optimizer)
        self.apply()

    def detach(self) -> None:
        """Remove every hook; the masks stay, the weights are no longer kept at zero."""
        for handle in self._step_handles + self._state_handles + self._grad_handles:
            handle.remove()
        for optimizer in self._optimizers:
            if id(optimizer) in self._enforced:
                optimizer.set_masks({p: None for p, _ in self._bound})
        self._enforced.clear()
        self._step_handles.clear()
        self._state_handles.clear()
        self._grad_handles.clear()
        self._optimizers.clear()
        self._hooked = False

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The optimizers attached."""
        return tuple(self._optimizers)

    def rebind(self) -> None:
        """Bind the masks again to the model's current parameters (after a layer's storage changed:
        ``sparsity.block_linear``)."""
        self._bind()

    def _hand_masks(self, optimizer: torch.optim.Optimizer) -> None:
        """Give an optimizer that enforces masks itself (``set_masks``) the current masks."""
        set_masks = getattr(optimizer, "set_masks", None)
        if not callable(set_masks):
            return
        taken = {id(p) for p in set_masks({p: mask for p, mask in self._bound}) or ()}
        self._enforced[id(optimizer)] = {i for i, (p, _) in enumerate(self._bound) if id(p) in taken}

    @torch.no_grad()
    def apply(self) -> None:
        """Zero pruned weights, gradients and same-shape optimizer state (NaN included)."""
        for p, mask in self._bound:
            pruned = ~mask
            local_part(p).masked_fill_(pruned, 0)
            if p.grad is not None and not p.grad.is_sparse:
                local_part(p.grad).masked_fill_(pruned, 0)
            for state in self._states(p):
                state.masked_fill_(pruned.to(state.device), 0)

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._hold:
            self._capture_dense_grads()
        grads, masks = [], []
        for i, (p, _) in enumerate(self._bound):
            grad = p.grad
            if grad is None or grad.is_sparse:
                continue
            grad = local_part(grad)
            if self._still_masked(i, grad):
                continue
            grads.append(grad)
            masks.append(self._mask_like(i, grad))
        if grads:
            with torch.no_grad():
                torch._foreach_mul_(grads, masks)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        tensors, masks = [], []
        enforced = self._enforced.get(id(optimizer), ())
        for i, (p, _) in enumerate(self._bound):
            if i in enforced:
                continue
            tensors.append(local_part(p))
            masks.append(self._mask_like(i, tensors[-1]))
            state = optimizer.state.get(p)
            if state:
                for value in state.values():
                    if _same_shape_float(value, p):
                        tensors.append(local_part(value))
                        masks.append(self._mask_like(i, tensors[-1]))
        if tensors:
            with torch.no_grad():
                torch._foreach_mul_(tensors, masks)

    def _grad_hook(self, index: int):
        @torch.no_grad()
        def hook(p: torch.Tensor) -> None:
            grad = p.grad
            if self._hold and self._bound_names[index] in self._hold:
                return  # RigL's update step: the gradient stays dense until captured before the step
            if grad is not None and not grad.is_sparse:
                grad = local_part(grad)
                mask = self._bound[index][1]
                # The bool mask itself (1 byte per entry): no float copy of it is kept for this.
                grad.mul_(mask if mask.device == grad.device else self._mask_like(index, grad))
                self._masked_grads[index] = (weakref.ref(grad), grad._version)

        return hook

    def _still_masked(self, index: int, grad: torch.Tensor) -> bool:
        """Whether ``grad`` is the tensor the grad hook masked, unchanged since (saves a pass)."""
        seen = self._masked_grads.get(index)
        return seen is not None and seen[0]() is grad and seen[1] == grad._version

    def _mask_like(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Mask ``index`` as 0/1 in ``tensor``'s dtype and device, cast once and cached."""
        key = (index, tensor.dtype, tensor.device)
        cast = self._cast.get(key)
        if cast is None:
            cast = self._bound[index][1].to(device=tensor.device, dtype=tensor.dtype)
            self._cast[key] = cast
        return cast

    def _states(self, p: nn.Parameter) -> list[torch.Tensor]:
        found = []
        for optimizer in self._optimizers:
            state = optimizer.state.get(p)
            if state:
                found += [local_part(v) for v in state.values() if _same_shape_float(v, p)]
        return found

    def _local_mask(self, name: str, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The part of ``mask`` that this process's shard of ``p`` holds (FSDP2 DTensors)."""
        if not is_dtensor(p):
            return mask
        key = (name, id(p), id(mask))
        local = self._local_masks.get(key)
        if local is None:
            from torch.distributed.tensor import distribute_tensor

            # src_data_rank=None: every rank slices its own copy of the full mask, no communication.
            local = distribute_tensor(mask, p.device_mesh, p.placements, src_data_rank=None).to_local()
            self._local_masks = {key: local, **{k: v for k, v in self._local_masks.items() if k[0] != name}}
        return local

    def _bind(self) -> None:
        """(Re)bind each mask to the model's current parameter object of that name; weights stored
        as live blocks have nothing to bind."""
        params = dict(self.model.named_parameters())
        packed = block_linear.packed_layers(self.model)
        bound, bound_names = [], []
        for name, mask in self.masks.items():
            if name in packed:
                if mask.device != packed[name].weight_blocks.device:
                    self.masks[name] = mask.to(packed[name].weight_blocks.device)
                continue
            p = params.get(name)
            if p is None:
                raise ValueError(f"sparsity: parameter {name!r} is no longer in the model")
            if p.shape != mask.shape:
                raise ValueError(
                    f"sparsity: parameter {name!r} has shape {tuple(p.shape)}, its mask "
                    f"{tuple(mask.shape)}; was the model sharded after sparsify()?"
                )
            if mask.device != p.device or mask.dtype != torch.bool:
                mask = mask.to(device=p.device, dtype=torch.bool)
                self.masks[name] = mask
            bound.append((p, self._local_mask(name, p, mask)))
            bound_names.append(name)
        self._bound_names = bound_names
        same_params = len(bound) == len(self._bound) and all(
            p is q for (p, _), (q, _) in zip(bound, self._bound, strict=True)
        )
        if same_params and self._hooked and all(m is n for (_, m), (_, n) in zip(bound, self._bound, strict=True)):
            return
        self._bound = bound
        self._cast.clear()
        self._masked_grads.clear()
        # New masks on the same parameters (dynamic sparsity) keep the hooks: they read the masks
        # at call time.
        if not (same_params and self._hooked):
            for handle in self._grad_handles:
                handle.remove()
            self._grad_handles = [
                p.register_post_accumulate_grad_hook(self._grad_hook(i))
                for i, (p, _) in enumerate(bound)
                if p.requires_grad
            ]
            self._hooked = True
        for optimizer in self._optimizers:
            self._hand_masks(optimizer)

    # -- state and statistics -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks (on the CPU) and the resolved sparsity block."""
        return {
            "version": STATE_VERSION,
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            "config": None if self.config is None else self.config.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the masks of ``state`` (same parameter names and shapes) and apply them."""
        masks = state.get("masks")
        if not isinstance(masks, Mapping):
            raise CheckpointError("sparsity state: no 'masks' mapping; not a sparsifier state")
        missing = sorted(set(self.masks) - set(masks))
        extra = sorted(set(masks) - set(self.masks))
        if missing or extra:
            raise CheckpointError(
                f"sparsity state: masks do not match the sparsified parameters "
                f"(missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'})"
            )
        for name, mask in masks.items():
            if tuple(mask.shape) != tuple(self.masks[name].shape):
                raise CheckpointError(
                    f"sparsity state: mask of {name!r} has shape {tuple(mask.shape)}, the "
                    f"parameter {tuple(self.masks[name].shape)}"
                )
        self.set_masks(masks)

    # -- masks that change (dynamic sparsity) ---------------------------------------------------

    def set_masks(self, masks: Mapping[str, torch.Tensor], layouts: Mapping[str, torch.Tensor] | None = None) -> None:
        """Replace the masks of the given (already sparsified) parameters: weights and same-shape
        optimizer state become 0 where the new masks prune (entries that become kept are 0
        already: pruned entries always are), an optimizer with ``set_masks`` repacks its state,
        and layers on the block kernels move their stored blocks and tables (in place when the
        live-block count is unchanged). ``layouts``: the new masks' live-block grids, where the
        caller has them (they are then not read off the masks again)."""
        for name, mask in masks.items():
            if name not in self.masks:
                raise ValueError(f"sparsity: {name!r} is not a sparsified parameter")
            self.masks[name] = mask.to(device=self.masks[name].device, dtype=torch.bool)
        self._bind()
        self._cast.clear()
        self.apply()
        if self.block_kernels:  # the kernels' block tables (and stored blocks) follow the new masks
            block_linear.use_block_kernels(self.model, self, layouts=layouts, only=masks)

    def hold_dense_grads(self, names) -> None:
        """Leave the next gradients of ``names`` dense (unmasked) through backward, however many
        micro-batches accumulate, and capture them just before the optimizer step (after DDP's
        all-reduce; gathered under FSDP2), then mask them as always: RigL's regrow scores.
        Costs one fp32 copy of each such gradient until :meth:`take_dense_grads`."""
        self._hold = set(names) & set(self._bound_names)

    def take_dense_grads(self) -> dict[str, torch.Tensor]:
        grads, self._dense_grads = self._dense_grads, {}
        return grads

    @torch.no_grad()
    def _capture_dense_grads(self) -> None:
        for name, (p, _) in zip(self._bound_names, self._bound, strict=True):
            if name in self._hold and p.grad is not None and not p.grad.is_sparse:
                g = p.grad
                self._dense_grads[name] = (g.full_tensor() if is_dtensor(g) else g).detach().float().clone()
        self._hold = set()

    def stats(self) -> list[dict[str, Any]]:
        """Per sparsified parameter: name, group, target, mask and actual sparsity, numel, kept
        (:func:`sparsetrain.sparsity.mask_stats.tensor_stats`)."""
        return mask_stats.tensor_stats(self)

    def group_stats(self, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """:meth:`stats` summed per group (:func:`sparsetrain.sparsity.mask_stats.group_stats`)."""
        return mask_stats.group_stats(self, rows)

    def pruned_fractions(self) -> dict[str, float]:
        """Parameter name -> fraction of its entries the mask prunes (for FLOP accounting)."""
        return {name: 1.0 - int(mask.sum().item()) / max(mask.numel(), 1) for name, mask in self.masks.items()}

    def mask_gradients(self) -> None:
        """Zero pruned gradients now. Backward and the step already do; a no-op unless a
        gradient was written outside backward since."""
        self._before_step(None, (), {})

    def summary(self) -> str:
        """One line: tensors, parameters covered, and the fraction pruned among them."""
        return mask_stats.summary(self)


def _same_shape_float(value: Any, p: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == p.shape and value.is_floating_point()
