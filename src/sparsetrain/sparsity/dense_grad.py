"""Dense weight gradients ``dL/dW`` of chosen linear layers, on demand, also for layers that
store their live blocks only.

    with collect_dense_grads(model, names) as grads:   # dense weight names, '...linear_layer.weight'
        for x, y in micro_batches:
            model(x, y).backward()
    grads[name]   # fp32 (N, K): the sum over every backward pass run inside the block

**Why.** RigL regrows, at a mask update, the dead blocks whose dense gradient is largest. A packed
:class:`~sparsetrain.sparsity.block_linear.BlockSparseLinear` computes the gradient of its live
blocks only (``weight_blocks.grad``), which is its point on every other step; this module gives
the full ``(N, K)`` gradient, dead blocks included, for the steps that need it.

**How.** A probe on the layer's output: an autograd Function, the identity forward, whose backward
adds ``grad_out^T @ x`` (``F.linear``'s weight gradient, leading dimensions flattened) into the
layer's fp32 accumulator and passes ``grad_out`` on unchanged. The layer's own gradients (of
``weight_blocks``, bias and input) are untouched. ``BlockSparseLinear`` applies the probe in
``forward`` and in ``fused_forward`` (a fused q/k/v stack with a probed layer runs each layer on its
own while probed); any other ``nn.Linear`` gets a forward hook. Outside the context nothing is
probed: a ``BlockSparseLinear`` reads one attribute, a class attribute None (a constant to
torch.compile), and no hook remains.

**Layers that are not packed** (a plain ``nn.Linear``, a ``BlockSparseLinear`` on dense storage)
have a dense ``p.grad`` already (before the sparsifier masks it); the sparsifier will normally read
that instead. The probe works for them too, with one limit: a layer whose ``forward`` the model
bypasses is never probed (``model.Attention`` fuses plain ``nn.Linear`` q, k, v into one
``F.linear`` over their concatenated weights); on leaving the context a warning names every layer
no forward reached, since its gradient then reads 0.

**Cost**, inside the context only: one extra dense weight-gradient GEMM per probed layer per
backward (``2 M N K`` FLOPs for ``M`` tokens, as much as a dense layer's own weight gradient: for
a packed layer at density ``d``, ``1/d`` times its block one), the layer's input kept until the
backward (the layer keeps it, or a cast copy, anyway), attention's q, k, v as three products
instead of one, and an fp32 ``(N, K)`` accumulator per layer for as long as the caller holds
``grads``. On a GPU with half-precision gradients the GEMM runs in that dtype with fp32 output
(``torch.mm(..., out_dtype=torch.float32)``, where torch has it) so no fp32 copies of the
activations are made; elsewhere it runs in fp32.

**Limits.** Eager mode only (mask updates run eagerly): under torch.compile the probe raises.
Compiled runs outside the context are unaffected. The probed output is a view of the layer's
output made inside a custom Function, on which autograd forbids in-place ops (the model does none).
Under DDP the sum is this process's backward passes: all-reduce it for the global gradient.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sparsetrain.sparsity.block_linear import BlockSparseLinear

__all__ = ["DenseGradProbe", "collect_dense_grads"]

_HALF = (torch.bfloat16, torch.float16)
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(a, b, out_dtype) (torch 2.8+)


class DenseGradProbe:
    """One layer's probe: ``probe(y, x)`` returns ``y`` (a view), and every backward through it
    adds ``dL/dy^T @ x`` to ``grad``, fp32 ``(N, K)``. ``calls`` counts the forwards it saw."""

    def __init__(self, layer: nn.Linear) -> None:
        self.grad = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=_device(layer))
        self.calls = 0

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            raise RuntimeError("collect_dense_grads: the dense-gradient probe runs in eager mode only")
        self.calls += 1
        return _Probe.apply(y, x, self)


class _Probe(torch.autograd.Function):
    """Identity forward; the backward adds the weight gradient into the probe's accumulator."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, probe: DenseGradProbe) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.probe = probe
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        _add_weight_grad(ctx.probe.grad, grad_out, x)
        return grad_out, None, None


def _add_weight_grad(acc: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += grad_out^T @ x`` over all leading dimensions, in fp32 (or with fp32 output)."""
    dy = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    with torch.no_grad():  # also under create_graph: the accumulator is no part of any graph
        if dy.is_cuda and dy.dtype in _HALF and _MM_OUT_DTYPE:
            acc += torch.mm(dy.t(), x2.to(dy.dtype), out_dtype=torch.float32)
        else:
            acc.addmm_(dy.t().to(acc.dtype), x2.to(acc.dtype))


def _device(layer: nn.Linear) -> torch.device:
    stored = layer.stored_weight() if isinstance(layer, BlockSparseLinear) else layer.weight
    return stored.device


def _layer(model: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` whose dense weight is called ``name`` (``...weight``)."""
    prefix, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        module = None
    if leaf != "weight" or not isinstance(module, nn.Linear):
        raise ValueError(f"collect_dense_grads: {name!r} is not the weight of an nn.Linear of the model")
    return module


def _hook(probe: DenseGradProbe):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return probe(output, args[0])

    return hook


@contextlib.contextmanager
def collect_dense_grads(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Probe the linear layers whose dense weights are ``names`` while the block runs; yields
    ``{name: fp32 (N, K) gradient}``, zeros at entry, the sum over the backward passes run inside
    (see the module docstring). The layers' own gradients are what they would be without it."""
    layers = {name: _layer(model, name) for name in dict.fromkeys(names)}
    probes: dict[str, DenseGradProbe] = {}
    hooks = []
    try:
        for name, layer in layers.items():
            if isinstance(layer, BlockSparseLinear) and layer._dense_grad_probe is not None:
                raise ValueError(f"collect_dense_grads: {name} is probed already (nested contexts)")
            probes[name] = probe = DenseGradProbe(layer)
            if isinstance(layer, BlockSparseLinear):
                layer._dense_grad_probe = probe  # its forward and fused_forward look for it
            else:
                hooks.append(layer.register_forward_hook(_hook(probe)))
        yield {name: probe.grad for name, probe in probes.items()}
    finally:
        for name in probes:
            if isinstance(layers[name], BlockSparseLinear):
                del layers[name]._dense_grad_probe  # the class's None again
        for handle in hooks:
            handle.remove()
    missed = [name for name, probe in probes.items() if probe.calls == 0]
    if missed and any(probe.calls for probe in probes.values()):
        warnings.warn(
            f"collect_dense_grads: no forward went through {', '.join(missed[:8])}"
            f"{' ...' if len(missed) > 8 else ''} (a forward that bypasses the module, e.g. attention "
            "fusing plain nn.Linear q/k/v); their gradients read 0: read p.grad for layers not packed",
            stacklevel=3,
        )
