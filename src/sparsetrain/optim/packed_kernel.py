"""The Triton path of :class:`~sparsetrain.optim.packed.PackedOptimizer`: which masked parameters
take it, and their launches (one per parameter group, dtype, device and step count).

:mod:`sparsetrain.kernels.packed_step` (which imports Triton) is imported on the first launch.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsetrain.kernels import has_triton
from sparsetrain.optim.packed_state import PackedMask

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelPath:
    """``impl`` (``auto`` | ``triton`` | ``torch``) and the kernels' fixed tables per launch
    (cached until :meth:`clear`, which the optimizer calls whenever a mask changes)."""

    def __init__(self, impl: str, block: int) -> None:
        self.impl = impl
        self.block = block
        self._launches: dict[tuple, Any] = {}

    def clear(self) -> None:
        self._launches.clear()

    def fits(self, p: torch.Tensor, grad: torch.Tensor, pack: PackedMask) -> bool:
        """Whether this parameter (``p`` and ``grad`` local, for a DTensor) takes the Triton path."""
        if self.impl == "torch" or not p.is_cuda:
            return False
        if not has_triton():
            if self.impl == "triton":
                raise RuntimeError("PackedOptimizer: impl='triton' but Triton is not installed")
            return False
        fits = (
            p.dtype in _KERNEL_DTYPES
            and grad.dtype == p.dtype
            and grad.device == p.device
            and p.is_contiguous()
            and grad.is_contiguous()
            and pack.block == self.block
            and 0 < pack.numel <= 2**31 - 1 - 2 * self.block  # the kernels index in int32
        )
        if not fits and self.impl == "triton" and pack.numel:
            raise RuntimeError(
                f"PackedOptimizer: impl='triton' needs a contiguous float32 / bfloat16 / float16 parameter "
                f"and gradient of one dtype, got {p.dtype} / {grad.dtype}"
            )
        return fits

    def adam(self, index: int, members: list, *, step: float, **options: Any) -> None:
        """One Adam(W) launch for ``members``: (parameter, pack, (weight, grad, exp_avg, exp_avg_sq))."""
        from sparsetrain.kernels import packed_step

        rows = [row for _, _, row in members]
        packed_step.adam_launch(self._launch_for(index, members), rows, step=step, check=False, **options)

    def sgd(self, index: int, members: list, *, first: bool, **options: Any) -> None:
        """One SGD launch for ``members``: (parameter, pack, (weight, grad, momentum_buffer))."""
        from sparsetrain.kernels import packed_step

        rows = [row for _, _, row in members]
        packed_step.sgd_launch(self._launch_for(index, members), rows, first=first, check=False, **options)

    def _launch_for(self, index: int, members: list) -> Any:
        """The kernel's fixed tables for these parameters (cached until the masks change)."""
        key = (index, tuple(id(p) for p, _, _ in members))
        launch = self._launches.get(key)
        if launch is None:
            from sparsetrain.kernels import packed_step

            if len(self._launches) > 64:
                self._launches.clear()
            packs = [pack for _, pack, _ in members]
            launch = packed_step.Launch(
                [pack.numel for pack in packs], [pack.bits for pack in packs], [pack.offsets for pack in packs], self.block
            )
            self._launches[key] = launch
        return launch
