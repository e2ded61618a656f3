"""AdamW / Adam / SGD whose state for a sparsified weight holds its kept entries only: a drop-in
for the torch optimizer in your own loop (``sparsetrain.PackedOptimizer``), nothing else changes::

    opt = sparsetrain.PackedOptimizer(model.parameters(), kind="adamw", lr=3e-4, weight_decay=0.1)
    sp = sparsetrain.sparsify(model, {"sparsity": 0.75}, opt)   # hands it the masks
    for x, y in batches:
        loss_fn(model(x), y).backward()
        opt.step()                      # pruned weights stay exactly 0, state holds kept entries
        opt.zero_grad()

Parameter groups, learning-rate schedulers and gradient clipping work as with the torch
optimizer; without masks (no ``sparsify``) it is that torch optimizer. For each parameter whose
mask it was given (:meth:`PackedOptimizer.set_masks`, called by the sparsifier's ``attach``) it
keeps the state of the kept entries only (:mod:`sparsetrain.optim.packed_state`) and enforces
the mask itself: pruned weights are written exactly 0 by every step, so the sparsifier skips its
post-step pass for them (it still masks gradients, so clipping sees the sparse norm).

- The math equals torch's ``AdamW`` / ``Adam`` (L2 decay added to the gradient) / ``SGD``
  (momentum buffer = first gradient, dampening, Nesterov) to float rounding; parameters without a
  mask are stepped by the torch optimizer itself (``fused=True`` on CUDA unless the group says
  ``fused: False``), with the usual dense state.
- On CUDA, with Triton, one kernel launch per parameter group and step for all its masked
  parameters (:mod:`sparsetrain.optim.packed_kernel`); elsewhere, and with ``impl="torch"``, the
  plain-torch reference steps (one host sync per tensor on CUDA) that are also the kernel's oracle.
- ``state_dict()`` has exactly the layout of the torch optimizer of that kind (dense-shaped state,
  0 at pruned positions), so NaN checkpoints (:mod:`sparsetrain.sparsity.nan_format`) are the same
  and checkpoints move both ways between ``torch.optim.AdamW`` and ``PackedOptimizer``.
  ``load_state_dict`` takes that layout and packs it with the masks; given before the masks, the
  state stays dense until :meth:`set_masks` packs it.
- FSDP2 (``fully_shard``) parameters are DTensors: each process is handed the mask of its own
  shard, steps ``p.to_local()`` with ``p.grad.to_local()`` and keeps packed state for the kept
  entries of that shard only. ``state_dict()`` exports each dense-shaped state tensor as a DTensor
  of the parameter's mesh and placements, as torch's optimizer holds it under FSDP2, so
  ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (``full_state_dict=True``) gather
  and scatter it as for ``torch.optim.AdamW`` (:mod:`sparsetrain.distributed`).
- A block-sparse weight stored as its live blocks (``weight_blocks``,
  :mod:`sparsetrain.sparsity.block_linear`) is already packed: it gets no mask and is an unmasked
  parameter here, whose state is as small as the blocks.

Limits: see :class:`PackedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sparsetrain.distributed import is_dtensor, local_part
from sparsetrain.kernels import has_triton
from sparsetrain.optim.packed_kernel import KernelPath
from sparsetrain.optim.packed_state import (
    BLOCK,
    PACKED_KEYS,
    PackedMask,
    adam_reference,
    pack_state,
    scalar_dtype,
    sgd_reference,
    unpack_state,
)

KINDS = ("adamw", "adam", "sgd")
_TORCH = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
_HYPER = {
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
    "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
}
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")


class PackedOptimizer(torch.optim.Optimizer):
    """AdamW / Adam / SGD with packed state for masked parameters (see the module docstring): less
    optimizer memory than ``torch.optim.AdamW``, whose moments are full-size. Limits: kinds ``adamw``, ``adam``, ``sgd``; on masked parameters no ``amsgrad``,
    ``maximize``, ``capturable``, ``differentiable`` or sparse gradients (unmasked ones get what
    torch supports); masks change through :meth:`set_masks` only (the sparsifier calls it); the
    fast step needs CUDA and Triton (elsewhere a plain-torch step per tensor).

    Arguments mirror the torch optimizer of ``kind``: ``lr``, ``betas``, ``eps``, ``weight_decay``
    (default 1e-2 for AdamW, 0 otherwise) for Adam(W); ``lr``, ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov`` for SGD; ``foreach`` and ``fused`` apply to unmasked
    parameters (``fused=None``: fused on CUDA). The parameter groups hold exactly the torch
    optimizer's keys. ``impl`` picks the masked step: ``"auto"`` (Triton kernel for CUDA
    parameters when Triton is there, else the reference), ``"triton"`` (the kernel; an error
    without Triton), ``"torch"`` (the reference). ``block`` is the kernel's tile size.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        kind: str = "adamw",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        impl: str = "auto",
        block: int = BLOCK,
    ) -> None:
        kind = str(kind).lower()
        if kind not in KINDS:
            raise ValueError(f"PackedOptimizer: kind {kind!r} is not one of {', '.join(KINDS)}")
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"PackedOptimizer: impl {impl!r} is not one of auto, triton, torch")
        if impl == "triton" and not has_triton():
            raise RuntimeError("PackedOptimizer: impl='triton' but Triton is not installed")
        if block % 8 or block & (block - 1):
            raise ValueError(f"PackedOptimizer: block {block} is not a power of two >= 8")
        self.kind = kind
        self.impl = impl
        self.block = block
        self._packs: dict[torch.Tensor, PackedMask] = {}
        self._inner: torch.optim.Optimizer | None = None
        self._inner_pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._kernel = KernelPath(impl, block)
        super().__init__(params, self._torch_defaults(lr, betas, eps, weight_decay, momentum, dampening, nesterov, foreach, fused))

    def _torch_defaults(self, lr, betas, eps, weight_decay, momentum, dampening, nesterov, foreach, fused) -> dict:
        """The torch optimizer's own defaults (validated by it): groups get exactly its keys."""
        options: dict[str, Any] = {"lr": lr, "foreach": foreach, "fused": fused}
        if self.kind == "sgd":
            options.update(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay or 0.0)
        else:
            options.update(betas=tuple(betas), eps=eps, weight_decay=(1e-2 if self.kind == "adamw" else 0.0) if weight_decay is None else weight_decay)
        probe = _TORCH[self.kind]([torch.zeros(1, requires_grad=True)], **options)
        return dict(probe.defaults)

    # -- masks ---------------------------------------------------------------------------------

    @torch.no_grad()
    def set_masks(self, masks: Mapping[torch.Tensor, torch.Tensor | None]) -> list[torch.Tensor]:
        """Take over the masks (True = kept) of the given parameters; ``None`` drops a mask.

        Existing state is repacked (entries the new mask prunes are dropped, newly kept ones start
        from the dense state, i.e. 0 where the old mask pruned), pruned weights are zeroed now.
        Parameters this optimizer does not hold are ignored. Returns the parameters whose mask
        this optimizer now enforces (pruned weights and state kept at zero by every step). The
        mask tensor is referenced, not copied: change a mask by passing a new tensor (as the
        sparsifier does), never in place. For a DTensor parameter (FSDP2) the mask is that of this
        process's shard, of ``p.to_local()``'s shape."""
        held = {id(p) for group in self.param_groups for p in group["params"]}
        enforced = []
        for p, mask in masks.items():
            if id(p) not in held:
                continue
            old = self._packs.get(p)
            local = local_part(p)
            if mask is not None:
                if tuple(mask.shape) != tuple(local.shape):
                    what = "the local shard of shape" if is_dtensor(p) else "a parameter of shape"
                    raise ValueError(f"PackedOptimizer.set_masks: mask of shape {tuple(mask.shape)} for {what} {tuple(local.shape)}")
                mask = mask.to(device=local.device, dtype=torch.bool)
                if old is not None and old.mask is mask and old.block == self.block:
                    enforced.append(p)
                    continue
            state = self.state.get(p)
            if old is not None:
                del self._packs[p]
                if state:
                    self.state[p] = self._unpacked(p, state, old)
            self._inner = None
            self._kernel.clear()
            if mask is None:
                continue
            pack = PackedMask(mask, self.block)
            self._packs[p] = pack
            local.masked_fill_(~mask, 0)
            if self.state.get(p):
                self._pack_state(p, self.state[p], pack)
            enforced.append(p)
        return enforced

    def masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """Parameter -> the mask this optimizer enforces."""
        return {p: pack.mask for p, pack in self._packs.items()}

    def _pack_state(self, p: torch.Tensor, state: dict[str, Any], pack: PackedMask) -> None:
        pack_state(p, state, pack, PACKED_KEYS[self.kind])

    def _unpacked(self, p: torch.Tensor, state: Mapping[str, Any], pack: PackedMask) -> dict[str, Any]:
        return unpack_state(p, state, pack, PACKED_KEYS[self.kind])

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._packs:
            for index, group in enumerate(self.param_groups):
                self._step_group(index, group)
        inner = self._dense_optimizer()
        if inner is not None:
            for group, inner_group in self._inner_pairs:
                for key in _HYPER[self.kind]:
                    if key in group:
                        inner_group[key] = group[key]
            inner.step()
        return loss

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        """Step the masked parameters of one group: the kernel in one launch per (dtype, device,
        step count) where it applies, the reference for the rest."""
        fast, checked = [], False
        for p in group["params"]:
            pack = self._packs.get(p)
            grad = p.grad
            if pack is None or grad is None:
                continue
            if not checked:
                _check_supported(group)
                checked = True
            if grad.is_sparse:
                raise RuntimeError("PackedOptimizer does not support sparse gradients")
            local, grad = local_part(p), local_part(grad)  # FSDP2: this process's shard and its gradient
            if self._kernel.fits(local, grad, pack):
                fast.append((p, pack))
            else:
                self._step_reference(p, local, grad, group, pack)
        if fast:
            self._step_kernel(index, group, fast)

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "sgd":
            return dict(
                lr=float(group["lr"]), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
            )
        beta1, beta2 = group["betas"]
        return dict(
            lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decoupled=self.kind == "adamw",
        )

    def _adam_state(self, p: torch.Tensor, pack: PackedMask) -> dict[str, Any]:
        """The state of ``p`` (a DTensor's is that of its local shard), created on first use."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
            state["exp_avg"] = torch.zeros(pack.kept, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(pack.kept, dtype=p.dtype, device=p.device)
        return state

    def _momentum_buffer(self, p: torch.Tensor, pack: PackedMask, momentum: float) -> tuple[torch.Tensor | None, bool]:
        """(buffer, first): as torch, no state at all without momentum; a new buffer is filled
        by the step (``first``)."""
        if momentum == 0:
            return None, False
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is not None:
            return buf, False
        buf = torch.empty(pack.kept, dtype=p.dtype, device=p.device)
        state["momentum_buffer"] = buf
        return buf, True

    def _step_reference(
        self, p: torch.Tensor, local: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], pack: PackedMask
    ) -> None:
        """Step ``local`` (``p`` itself, or its shard) with ``grad`` (local too); state keyed by ``p``."""
        if torch.is_complex(local):
            raise NotImplementedError("PackedOptimizer: complex masked parameters are not supported")
        options = self._options(group)
        if self.kind == "sgd":
            buf, first = self._momentum_buffer(p, pack, options["momentum"])
            sgd_reference(local, grad, buf, pack.mask, first=first, **options)
            return
        state = self._adam_state(p, pack)
        state["step"] += 1
        adam_reference(
            local, grad, state["exp_avg"], state["exp_avg_sq"], pack.mask, step=float(state["step"].item()), **options
        )

    def _step_kernel(self, index: int, group: dict[str, Any], items: list[tuple[torch.Tensor, PackedMask]]) -> None:
        options = self._options(group)
        buckets: dict[tuple, list] = {}
        if self.kind == "sgd":
            for p, pack in items:
                buf, first = self._momentum_buffer(p, pack, options["momentum"])
                row = (local_part(p), local_part(p.grad), buf)
                buckets.setdefault((first, p.dtype, p.device), []).append((p, pack, row))
            for (first, _, _), members in buckets.items():
                self._kernel.sgd(index, members, first=first, **options)
            return
        states = [self._adam_state(p, pack) for p, pack in items]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        counts = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
        for (p, pack), state, count in zip(items, states, counts, strict=True):
            row = (local_part(p), local_part(p.grad), state["exp_avg"], state["exp_avg_sq"])
            buckets.setdefault((float(count), p.dtype, p.device), []).append((p, pack, row))
        for (count, _, _), members in buckets.items():
            self._kernel.adam(index, members, step=count, **options)

    def _dense_optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer of the unmasked parameters, sharing this optimizer's state."""
        if self._inner is not None:
            return self._inner
        groups, pairs, auto = [], [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p not in self._packs]
            if not params:
                continue
            inner_group = {key: value for key, value in group.items() if key != "params"}
            inner_group["params"] = params
            if group.get("fused") is None and not group.get("foreach") and _fused_ok(params):
                inner_group["fused"] = True
                auto.append(inner_group)
            groups.append(inner_group)
            pairs.append(group)
        if not groups:
            self._inner_pairs = []
            return None
        try:
            inner = _TORCH[self.kind](groups)
        except (RuntimeError, ValueError, TypeError):
            if not auto:
                raise
            for inner_group in auto:  # a torch without this fused step: its default instead
                inner_group["fused"] = None
            inner = _TORCH[self.kind](groups)
        inner.state = self.state
        self._inner_pairs = list(zip(pairs, inner.param_groups, strict=True))
        for inner_group in inner.param_groups:
            on_device = inner_group.get("fused") or inner_group.get("capturable")
            for p in inner_group["params"]:
                step = self.state[p].get("step") if p in self.state else None
                if isinstance(step, torch.Tensor):
                    if on_device and step.device != p.device:
                        self.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
                    elif not on_device and step.device.type != "cpu":
                        self.state[p]["step"] = torch.tensor(float(step), dtype=scalar_dtype())
        self._inner = inner
        return inner

    # -- groups and state dicts ----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._inner = None

    def state_dict(self) -> dict[str, Any]:
        """torch's layout for this kind: masked parameters' state unpacked to the weight's shape
        (0 at pruned positions), on the parameter's device; for a DTensor parameter (FSDP2) a
        DTensor like the parameter, as torch's optimizer would hold (see the module docstring)."""
        state_dict = super().state_dict()
        if self._packs:
            index = self._param_index()
            for p, pack in self._packs.items():
                i = index.get(id(p))
                if i is not None and i in state_dict["state"]:
                    state_dict["state"][i] = self._unpacked(p, state_dict["state"][i], pack)
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load torch's layout for this kind (NaN already turned to 0): state of masked
        parameters is packed with their masks; before :meth:`set_masks`, it stays dense. State of
        a DTensor parameter (FSDP2) is a DTensor like the parameter (as ``set_optimizer_state_dict``
        hands it over); its local part is packed with the shard's mask."""
        required = {"sgd": ("momentum", "nesterov"), "adamw": ("betas", "eps"), "adam": ("betas", "eps")}[self.kind]
        for group in state_dict.get("param_groups", []):
            missing = [key for key in required if key not in group]
            if missing:
                raise ValueError(
                    f"PackedOptimizer({self.kind!r}).load_state_dict: a parameter group lacks "
                    f"{', '.join(missing)}; is it the state of another kind of optimizer?"
                )
        super().load_state_dict(state_dict)
        self._inner = None
        for p, pack in self._packs.items():
            state = self.state.get(p)
            if state:
                self._pack_state(p, state, pack)

    def _param_index(self) -> dict[int, int]:
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        return index

    # -- memory --------------------------------------------------------------------------------

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state now: ``masked`` (packed state, bitmasks and offsets of masked
        parameters), ``dense`` (state of the other parameters) and ``total``. Under FSDP2, the
        bytes this process holds: its shards' state."""
        masked = dense = 0
        for p in self._params():
            size = _tensor_bytes(self.state.get(p, {}))
            pack = self._packs.get(p)
            if pack is not None:
                masked += size + pack.nbytes
            else:
                dense += size
        return {"masked": masked, "dense": dense, "total": masked + dense}

    def dense_equivalent_bytes(self) -> dict[str, int]:
        """What torch's optimizer would hold for the same state (same keys as :meth:`state_bytes`):
        each packed tensor at the weight's full size (under FSDP2: its local shard's), no bitmask."""
        masked = dense = 0
        keys = PACKED_KEYS[self.kind]
        for p in self._params():
            state = self.state.get(p, {})
            pack = self._packs.get(p)
            if pack is None:
                dense += _tensor_bytes(state)
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    numel = local_part(p).numel() if key in keys else local_part(value).numel()
                    masked += numel * value.element_size()
        return {"masked": masked, "dense": dense, "total": masked + dense}

    def _params(self) -> list[torch.Tensor]:
        seen, out = set(), []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

def _check_supported(group: Mapping[str, Any]) -> None:
    unsupported = [key for key in _UNSUPPORTED if group.get(key)]
    if unsupported:
        raise NotImplementedError(f"PackedOptimizer: {', '.join(unsupported)} not supported on masked parameters")


def _tensor_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors in ``state``; of a DTensor, those of this process's shard."""
    return sum(local_part(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused step applies to all of ``params`` (CUDA floating tensors)."""
    return bool(params) and all(
        p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for p in params
    )
