"""``kernels/packed_step.py`` on a GPU (``cuda`` marker): the Triton AdamW / Adam / SGD step over the
kept entries of a masked weight against the plain-torch reference of ``optim/packed_state.py``
(fp32 and half precision, sizes that are not a multiple of the tile, one launch over several
tensors)."""

from __future__ import annotations

import zlib

import pytest
import torch

from sparsetrain.optim.packed_state import BLOCK, PackedMask, adam_reference, sgd_reference
from tests.helpers import triton_module

cuda = pytest.mark.cuda


def _cuda_mask(shape: tuple[int, ...], sparsity: float, seed: int) -> torch.Tensor:
    """A random mask with, when there is room, an all-pruned first tile and an all-kept second."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.rand(int(torch.tensor(shape).prod()), generator=generator) >= sparsity
    if flat.numel() >= 3 * BLOCK:
        flat[:BLOCK] = False
        flat[BLOCK : 2 * BLOCK] = True
    return flat.view(shape).cuda()


def _step_both(variant: str, step: int, reference: list, kernel: list, mask, pack, grad) -> None:
    """One step of ``variant`` on (weight, state, state) by the reference and by the kernel."""
    packed_step = triton_module("packed_step")
    if variant.startswith("adam"):
        options = dict(
            step=float(step),
            lr=1e-2,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.0 if variant == "adam_no_decay" else 0.1,
            decoupled=variant == "adamw",
        )
        adam_reference(reference[0], grad.to(reference[0].dtype), reference[1], reference[2], mask, **options)
        packed_step.adam_step(
            kernel[0], grad, kernel[1], kernel[2], pack.bits, pack.offsets, block=pack.block, **options
        )
        return
    momentum = 0.0 if variant == "sgd_plain" else 0.9
    options = dict(
        lr=0.1,
        momentum=momentum,
        dampening=0.3 if variant == "sgd_dampening" else 0.0,
        weight_decay=0.1,
        nesterov=variant == "sgd_nesterov",
        first=step == 1,
    )
    ref_buf, kernel_buf = (reference[1], kernel[1]) if momentum else (None, None)
    sgd_reference(reference[0], grad.to(reference[0].dtype), ref_buf, mask, **options)
    packed_step.sgd_step(kernel[0], grad, kernel_buf, pack.bits, pack.offsets, block=pack.block, **options)


VARIANTS = ["adamw", "adam", "adam_no_decay", "sgd", "sgd_nesterov", "sgd_dampening", "sgd_plain"]


@cuda
@pytest.mark.parametrize("shape", [(37, 1001), (3, 1024), (5,), (4099,)])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_matches_reference(variant, sparsity, shape):
    """fp32, three steps (state carried), sizes not a multiple of the tile, an all-pruned and an
    all-kept tile; the kernel writes every pruned weight as 0 (they start poisoned)."""
    seed = zlib.crc32(repr((variant, sparsity, shape)).encode())
    mask = _cuda_mask(shape, sparsity, seed)
    pack = PackedMask(mask)
    torch.manual_seed(seed)
    reference = [torch.randn(shape, device="cuda") * mask] + [torch.zeros(pack.kept, device="cuda") for _ in range(2)]
    kernel = [t.clone() for t in reference]
    kernel[0][~mask] = 3.0
    for step in range(1, 4):
        _step_both(variant, step, reference, kernel, mask, pack, torch.randn(shape, device="cuda"))
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(kernel, reference)):
            torch.testing.assert_close(a, b, msg=f"tensor {i}, step {step}")
        assert not kernel[0][~mask].any()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_half_precision_rounds_once(variant, dtype):
    """bf16 / fp16 tensors: the kernel computes in fp32 and rounds once, so each step equals the
    fp32 reference on the upcast tensors, rounded (torch rounds after every operation instead)."""
    shape = (29, 301)
    mask = _cuda_mask(shape, 0.75, 7)
    pack = PackedMask(mask)
    torch.manual_seed(7)
    kernel = [(torch.randn(shape, device="cuda") * mask).to(dtype)] + [
        torch.zeros(pack.kept, device="cuda", dtype=dtype) for _ in range(2)
    ]
    for step in range(1, 4):
        reference = [t.float() for t in kernel]
        grad = torch.randn(shape, device="cuda").to(dtype)
        _step_both(variant, step, reference, kernel, mask, pack, grad)
        for i, (a, b) in enumerate(zip(kernel, reference)):
            torch.testing.assert_close(
                a.float(), b.to(dtype).float(), rtol=8e-3, atol=1e-5, msg=f"tensor {i}, step {step}"
            )


@cuda
@pytest.mark.parametrize("variant", ["adamw", "sgd_nesterov"])
def test_one_launch_for_several_tensors(variant):
    """A launch over tensors of several sizes (tiles mapped to tensors by table)."""
    packed_step = triton_module("packed_step")
    shapes = [(37, 1001), (5,), (3, 1024), (2, 2049), (1,)]
    masks = [_cuda_mask(shape, s, i) for i, (shape, s) in enumerate(zip(shapes, [0.5, 0.75, 0.9, 0.75, 0.0]))]
    packs = [PackedMask(m) for m in masks]
    launch = packed_step.Launch([p.numel for p in packs], [p.bits for p in packs], [p.offsets for p in packs], BLOCK)
    assert launch.tiles == sum(-(-p.numel // BLOCK) for p in packs)
    torch.manual_seed(0)
    weights = [torch.randn(m.shape, device="cuda") * m for m in masks]
    states = [[torch.zeros(p.kept, device="cuda") for _ in range(2)] for p in packs]
    ref_weights = [w.clone() for w in weights]
    ref_states = [[t.clone() for t in s] for s in states]
    for step in range(1, 4):
        grads = [torch.randn(m.shape, device="cuda") for m in masks]
        if variant == "adamw":
            options = dict(step=float(step), lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, decoupled=True)
            packed_step.adam_launch(launch, [(w, g, *s) for w, g, s in zip(weights, grads, states)], **options)
            for w, g, s, m in zip(ref_weights, grads, ref_states, masks):
                adam_reference(w, g, *s, m, **options)
        else:
            options = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, first=step == 1)
            packed_step.sgd_launch(launch, [(w, g, s[0]) for w, g, s in zip(weights, grads, states)], **options)
            for w, g, s, m in zip(ref_weights, grads, ref_states, masks):
                sgd_reference(w, g, s[0], m, **options)
        for a, b in zip(weights + [t for s in states for t in s], ref_weights + [t for s in ref_states for t in s]):
            torch.testing.assert_close(a, b, msg=f"step {step}")
