"""``training/loop.py``: the logged training record (MFU per GPU under torchrun)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparsetrain.distributed import DistInfo
from sparsetrain.training import loop


def test_mfu_is_per_gpu():
    """tokens/s counts every rank's tokens: MFU divides by the GPUs' total peak."""
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    flops = {"sparse": 1e9, "dense": 2e9, "ratio": 2.0}
    one = SimpleNamespace(flops=flops, executed_flops=2e9, scheduler=scheduler, step=10, dist=DistInfo(), flops_done=1e13)
    two = SimpleNamespace(**{**vars(one), "dist": DistInfo(rank=0, world_size=2, mode="ddp")})
    r1 = loop.train_record(one, 1.0, 1e5, 1024, 1e15)
    r2 = loop.train_record(two, 1.0, 2e5, 1024, 1e15)  # twice the tokens on twice the GPUs
    assert r1["mfu"] == pytest.approx(0.2)
    assert r2["mfu"] == pytest.approx(r1["mfu"])
