"""Run block-sparse ``nn.Linear`` layers on the block-skipping GPU kernels.

    names = use_block_kernels(model, sparsifier)

For every ``nn.Linear`` whose weight the sparsifier masks with ``structure: block`` (a mask made
of whole blocks, of a shape the kernels take), the module's class becomes
:class:`BlockSparseLinear`: the same parameters, the same state_dict and checkpoint, a forward
that computes over the live blocks only (:func:`sparsetrain.kernels.block_sparse_op.block_sparse_linear`)
and falls back to ``F.linear`` wherever the kernels do not apply (CPU, fp32). The model's own
code is untouched; ``use_dense_kernels`` turns them back.

The block tables are non-persistent buffers of the module (they follow ``.to()`` and
``torch.compile`` sees them as tensors); call ``use_block_kernels`` again after the masks change
(the sparsifier does so itself on ``load_state_dict``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sparsetrain.kernels.block_layout import BlockLayout, kernel_block_ok
from sparsetrain.kernels.block_sparse_op import TABLES, _triton_ok, block_sparse_linear, layout_of
from sparsetrain.sparsity.masks import block_layout, is_block_structured

log = logging.getLogger(__name__)

__all__ = ["BlockSparseLinear", "use_block_kernels", "use_dense_kernels"]


class BlockSparseLinear(nn.Linear):
    """An ``nn.Linear`` whose forward reads only the live blocks of its weight."""

    block: tuple[int, int]

    def set_layout(self, layout: torch.Tensor, block: tuple[int, int]) -> None:
        _triton_ok()  # decided here, outside any compiled region
        tables = BlockLayout.build(layout.to(self.weight.device), block)
        self.block = block
        for name in TABLES:
            self.register_buffer(f"_bs_{name}", getattr(tables, name), persistent=False)

    def tables(self) -> list[torch.Tensor]:
        return [getattr(self, f"_bs_{name}") for name in TABLES]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.weight, self.bias, self.tables(), self.block)

    def extra_repr(self) -> str:
        live = layout_of(self.weight.shape, self.tables(), self.block).density()
        return f"{super().extra_repr()}, block={self.block}, live={live:.3f}"


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def use_block_kernels(model: nn.Module, sparsifier) -> list[str]:
    """Switch each eligible block-sparse linear layer of ``model`` to the kernels; returns the
    weight names switched (others keep ``F.linear`` on the masked weight)."""
    linears = _linears(model)
    switched, skipped = [], []
    for name, mask in sparsifier.masks.items():
        group = sparsifier.settings[name]
        module = linears.get(name)
        if module is None or group.structure != "block":
            continue
        block = group.block_size
        if not kernel_block_ok(tuple(mask.shape), block) or not is_block_structured(mask, block):
            skipped.append(name)
            continue
        module.__class__ = BlockSparseLinear
        module.set_layout(block_layout(mask, block), block)
        switched.append(name)
    sparsifier.block_kernels = True
    if skipped:
        log.warning(
            "sparsity: %d block-sparse weight(s) stay on dense kernels (the kernels take whole blocks "
            "with sides in 16..256, powers of two): %s", len(skipped), ", ".join(skipped[:8]),
        )
    if switched:
        log.info("sparsity: %d linear layer(s) run on the block-sparse kernels where the GPU allows", len(switched))
    return switched


def use_dense_kernels(model: nn.Module) -> None:
    """Turn every :class:`BlockSparseLinear` of ``model`` back into a plain ``nn.Linear``."""
    for module in model.modules():
        if isinstance(module, BlockSparseLinear):
            for name in TABLES:
                delattr(module, f"_bs_{name}")
            module.__class__ = nn.Linear
