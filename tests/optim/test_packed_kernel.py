"""``optim/packed_kernel.py`` on a GPU (``cuda`` marker): the PackedOptimizer's Triton path against
its plain-torch path and torch's fused optimizer over 50 steps, and its checkpoint resumed by
torch's fused optimizer."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import triton_module
from tests.optim.helpers import KINDS, Run, assert_state_close, nan_checkpoint, resume_from, violations

pytestmark = pytest.mark.usefixtures("one_thread")

cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_fifty_steps_kernel_matches_reference(kind):
    triton_module("packed_step")
    kernel = Run(kind, packed=True, device="cuda", impl="triton")
    reference = Run(kind, packed=True, device="cuda", impl="torch")
    torch_run = Run(kind, packed=False, device="cuda", fused=True)
    for step in range(50):
        loss = kernel.step(step)
        torch.testing.assert_close(loss, reference.step(step), msg=f"loss at step {step}")
        torch.testing.assert_close(loss, torch_run.step(step), rtol=1e-4, atol=1e-5, msg=f"torch loss at step {step}")
        assert violations(kernel) == [], f"step {step}"
    # Rounding differences (fused multiply-adds) grow over 50 Adam steps where gradients are near 0.
    for (name, a), b in zip(reference.model.named_parameters(), kernel.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)
    assert_state_close(kernel.named_state(), reference.named_state(), rtol=1e-3, atol=1e-4)
    assert_state_close(kernel.named_state(), torch_run.named_state(), rtol=1e-3, atol=1e-4)
    # The kernel's checkpoint loads into torch's fused optimizer and continues alike.
    resumed = resume_from(kind, False, nan_checkpoint(kernel), load_first=True, device="cuda", fused=True)
    for step in range(50, 55):
        torch.testing.assert_close(resumed.step(step), kernel.step(step), rtol=1e-4, atol=1e-5)
