"""``kernels/wgrad_slices.py``: how the weight-gradient kernel slices the token axis, against the
measured H200 sweep."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("m", "nnz", "slices"),
    [
        # the H200 sweep (132 SMs, 16384 tokens): measured best 1 at 102-1024 live blocks, 3 at 36,
        # 6-9 at 14 (benchmarks/kernel_configs.py; docs/block_kernels.md)
        (16384, 1024, 1), (16384, 256, 1), (16384, 102, 1), (16384, 36, 3), (16384, 14, 9),
        (16384, 144, 3),  # 144 blocks: 12 would wait for a second full-length wave
        (512, 1, 1), (2048, 1, 2),  # slices of at least 1024 rows
        (16384, 0, 16),
    ],
)
def test_wgrad_slices_follow_the_measured_sweep(m, nnz, slices):
    from sparsetrain.kernels.wgrad_slices import wgrad_slices

    assert wgrad_slices(m, nnz, sms=132) == slices
