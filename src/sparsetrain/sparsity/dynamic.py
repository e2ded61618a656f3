"""Dynamic sparsity during training (the zoo's 2.x GMP, SET, RigL): which steps change masks,
the new masks, and the record of each update.

    dynamic = DynamicSparsity(sparsifier)                  # groups with ``dynamic`` settings
    names = dynamic.dense_grads_for(step + 1)              # RigL: gradients to keep dense this step
    ... forward, backward, optimizer.step(); step += 1 ...
    if dynamic.is_update(step): records = dynamic.update(step, dense_grads)

After the t-th optimizer step, a group whose update rule says t is an update step gets new masks
at its level ``sparsity(t)`` (:mod:`sparsetrain.config.dynamic`): GMP prunes further by |w|; SET
drops the kept units of smallest |w| and regrows as many at random; RigL regrows where the dense
gradient of step t is largest (:mod:`sparsetrain.sparsity.mask_updates`). The new masks go to
:meth:`Sparsifier.set_masks`, which zeroes dropped weights and their optimizer state (regrown
entries were pruned, so they are 0 already, state included), repacks a packed optimizer's state
and moves the block kernels' stored blocks.

Every rank computes the same masks with no mask communication: the weights are the same on
every rank (DDP) or gathered whole (FSDP2, at update steps only), RigL's gradients are the
all-reduced ones, and SET's random scores are a pure function of (seed, name, step). Under
torchrun a checksum of the masks is compared across ranks after every update (one all-reduce).
A resumed run needs nothing but the step and the count of updates done per group (checkpointed);
SET keeps no RNG state.

``distribution: erk`` groups spread their level over their tensors by the Erdos-Renyi kernel at
every update (:mod:`sparsetrain.sparsity.erk`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from sparsetrain.config.sparsity import GroupSettings
from sparsetrain.distributed import is_dtensor
from sparsetrain.sparsity import block_linear
from sparsetrain.sparsity.mask_updates import (
    MaskChange,
    drop_and_regrow,
    prune_further,
    regrow_noise,
    stored_block_units,
    unit_scores,
)
from sparsetrain.sparsity.masks import settings_block
from sparsetrain.sparsity.select import erk_pool, erk_shares

log = logging.getLogger(__name__)

STATE_VERSION = 1


class DynamicSparsity:
    """The update steps of a sparsifier's dynamic groups (see the module docstring)."""

    def __init__(self, sparsifier) -> None:
        self.sparsifier = sparsifier
        self.groups: dict[str, list[str]] = {}  # group name -> its tensors, in model order
        self.settings: dict[str, GroupSettings] = {}  # group name -> settings (its first tensor's)
        for name, g in sparsifier.settings.items():
            if g.dynamic is not None:
                self.groups.setdefault(g.group, []).append(name)
                self.settings.setdefault(g.group, g)
        self.updates_done = dict.fromkeys(self.groups, 0)
        self.last_update: int | None = None
        self.last_records: list[dict[str, Any]] = []
        self.dense_grad_steps = 0  # RigL steps that formed dense gradients (for FLOPs)

    def warn_idle(self, max_steps: int) -> None:
        """One warning per group whose rule takes no step in 1..max_steps: its masks never change."""
        for group, settings in self.settings.items():
            if not settings.dynamic.update.updates_before(max_steps + 1):
                start = "its masks dense (the rule starts after step 0)" if not settings.dynamic.starts_sparse else "its initial masks"
                log.warning("sparsity: %s (%s): no update step in 1..%d (update: %s); it trains with %s",
                            group, settings.dynamic.algorithm, max_steps, settings.dynamic.update.describe(), start)

    def __bool__(self) -> bool:
        return bool(self.groups)

    # -- when ------------------------------------------------------------------------------------

    def updating(self, step: int) -> list[str]:
        """The groups whose masks change after optimizer step ``step``."""
        return [g for g, s in self.settings.items() if s.dynamic.update.is_update(step)]

    def is_update(self, step: int) -> bool:
        return step > 0 and bool(self.updating(step))

    def dense_grads_for(self, step: int) -> list[str]:
        """Tensors of RigL groups that update after step ``step``: their gradients of that step
        must be formed dense (regrow scores)."""
        if step <= 0:
            return []
        return [n for g in self.updating(step) if self.settings[g].dynamic.algorithm == "rigl" for n in self.groups[g]]

    # -- how -------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, step: int, dense_grads: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """New masks for the groups updating after step ``step``; returns one record per group:
        group, algorithm, level, drop_fraction, sparsity (of entries, after), dropped, regrown,
        churn (units kept now that were not at the last update, over those kept)."""
        dense_grads = dense_grads or {}
        records, new_masks = [], {}
        self._layouts: dict[str, torch.Tensor] = {}
        self._packed = block_linear.packed_layers(self.sparsifier.model)  # once: it walks every module
        self._params = dict(self.sparsifier.model.named_parameters())
        for group in self.updating(step):
            settings = self.settings[group]
            dyn = settings.dynamic
            done = self.updates_done[group]
            level, drop = dyn.level(step, done), dyn.drop(step, done)
            levels = self._levels(group, level)
            changes: dict[str, MaskChange] = {}
            for name in self.groups[group]:
                changes[name] = self._change(name, step, levels[name], drop, dense_grads)
                new_masks[name] = changes[name].mask
                if changes[name].layout is not None:
                    self._layouts[name] = changes[name].layout
            self.updates_done[group] = done + 1
            records.append(_record(group, dyn.algorithm, step, level, drop, changes))
        if new_masks:
            self.sparsifier.set_masks(new_masks, layouts=self._layouts)
            self.last_update = step
            self.last_records = records
        return records

    def _levels(self, group: str, level: float) -> dict[str, float]:
        names = self.groups[group]
        settings = self.settings[group]
        if settings.distribution != "erk":
            return dict.fromkeys(names, level)
        pool = erk_pool(settings)  # the globs of one list share one spread
        pooled = [n for n, g in self.sparsifier.settings.items() if g.distribution == "erk" and erk_pool(g) == pool]
        shares = erk_shares({n: tuple(self.sparsifier.masks[n].shape) for n in pooled}, level, self.sparsifier.settings)
        return {n: shares[n] for n in names}

    def _change(self, name: str, step: int, level: float, drop: float, dense_grads) -> MaskChange:
        settings = self.sparsifier.settings[name]
        mask = self.sparsifier.masks[name]
        block = settings_block(settings) if settings.structure == "block" else None
        packed = self._packed.get(name) if block is not None else None
        kept = None
        if packed is not None and tuple(packed.block) == tuple(block):  # from the stored blocks, no unpacking
            drop_score, kept = (t.to(mask.device) for t in stored_block_units(packed.weight_blocks, packed.layout()))
        else:
            drop_score = unit_scores(self._whole_weight(name).to(mask.device), block)
        algorithm = settings.dynamic.algorithm
        if algorithm == "gmp":
            return prune_further(mask, drop_score, level, block, kept)
        if algorithm == "set":
            grow = regrow_noise(name, settings.seed, step, drop_score.numel(), drop_score.device)
        else:
            grad = dense_grads.get(name)
            if grad is None:
                raise RuntimeError(f"RigL update at step {step}: no dense gradient of {name} was formed")
            grow = unit_scores(grad.to(mask.device), block)
        return drop_and_regrow(mask, drop_score, grow, level, drop, block, kept)

    def _whole_weight(self, name: str) -> torch.Tensor:
        """The whole weight, zeros where pruned: unpacked from live blocks, gathered from FSDP2
        shards (every rank calls this at the same update)."""
        if name in self._packed:
            return self._packed[name].dense_weight()
        p = self._params[name]
        return p.full_tensor() if is_dtensor(p) else p.detach()

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "updates_done": dict(self.updates_done), "last_update": self.last_update,
                "dense_grad_steps": self.dense_grad_steps}

    def load_state_dict(self, state: Mapping[str, Any] | None, step: int) -> None:
        """Take a checkpoint's state; without one (a zoo checkpoint, or one written before), the
        count of updates done is that of the update rule up to ``step``."""
        state = state or {}
        done = state.get("updates_done", {})
        for group, settings in self.settings.items():
            rule = settings.dynamic.update
            self.updates_done[group] = int(done.get(group, rule.updates_before(step + 1)))
        self.last_update = state.get("last_update")
        self.dense_grad_steps = int(state.get("dense_grad_steps", 0))


def _record(group: str, algorithm: str, step: int, level: float, drop: float, changes: Mapping[str, MaskChange]) -> dict[str, Any]:
    numel = sum(c.mask.numel() for c in changes.values())
    kept_entries = sum(c.kept_entries for c in changes.values())
    kept = sum(c.kept for c in changes.values())
    return {
        "group": group, "algorithm": algorithm, "step": step, "level": level, "drop_fraction": drop,
        "sparsity": 1.0 - kept_entries / max(numel, 1), "tensors": len(changes),
        "dropped": sum(c.dropped for c in changes.values()), "regrown": sum(c.regrown for c in changes.values()),
        "churn": sum(c.new for c in changes.values()) / max(kept, 1),
        "units": "blocks" if any(c.units != c.mask.numel() for c in changes.values()) else "entries",
    }
