"""PackedOptimizer: optimizer state of sparsified weights for kept entries only.

Against torch's own AdamW / Adam / SGD with the generic sparsifier: the same losses, weights and
state dicts over 50 steps, the SPEC §3 invariant after every step, torch's state-dict layout (so
NaN checkpoints are the same and move both ways), and the memory it saves. CUDA tests compare the
Triton kernel with the plain-torch reference.
"""

from __future__ import annotations

import io
import zlib

import pytest
import torch

from sparsetrain.config import ModelParams
from sparsetrain.model import GPT
from sparsetrain.optim.packed import PackedOptimizer
from sparsetrain.optim.packed_state import BLOCK, PackedMask, adam_reference, sgd_reference
from sparsetrain.sparsity import nan_format
from sparsetrain.sparsity.sparsifier import sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CONTEXT, BATCH = 61, 16, 4
KINDS = ("adamw", "adam", "sgd")
TORCH = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
ARGS = {
    "adamw": {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8},
    "adam": {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8},
    "sgd": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
}
WEIGHT_DECAY = 0.1
# Three sparsities (0.5, 0.75, 0.9); the biases, norms and (tied) embeddings stay dense.
SPARSITY = {
    "sparsity": 0.75,
    "init_method": "random",
    "seed": 1,
    "param_name_patterns": {"mlp.fc": {"sparsity": 0.9}, "attn.qkv": {"sparsity": 0.5}, "proj": {}},
}
UNIFORM_75 = {"sparsity": 0.75, "init_method": "random", "seed": 2}


def _model(device: str = "cpu") -> GPT:
    torch.manual_seed(0)
    cfg = ModelParams(
        hidden_size=32, num_hidden_layers=2, num_heads=2, max_position_embeddings=CONTEXT, vocab_size=VOCAB
    )
    return GPT(cfg).to(device)


def _groups(model: torch.nn.Module) -> list[dict]:
    """As optim.build_optimizer: decay on matrices, not on norms, biases, embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(kind: str, model: torch.nn.Module, packed: bool, **extra) -> torch.optim.Optimizer:
    args = {**ARGS[kind], **extra}
    if packed:
        return PackedOptimizer(_groups(model), kind=kind, **args)
    return TORCH[kind](_groups(model), **args)


class Run:
    """A model, an optimizer with a warm-up schedule, and its sparsifier."""

    def __init__(self, kind: str, packed: bool, *, block=SPARSITY, device="cpu", sparsify_now=True, **extra) -> None:
        self.device = device
        self.model = _model(device)
        self.optimizer = _optimizer(kind, self.model, packed, **extra)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 10))
        self.sparsifier = sparsify(self.model, block, self.optimizer) if sparsify_now else None

    def step(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=generator).to(self.device)
        loss = self.model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def named_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer's state_dict() state, keyed by parameter name."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        return {order[i]: entry for i, entry in self.optimizer.state_dict()["state"].items()}


def _violations(run: Run) -> list[str]:
    """Every pruned entry that is not exactly zero: weight, gradient, state (torch's layout)."""
    params = dict(run.model.named_parameters())
    state = run.named_state()
    found = []
    for name, mask in run.sparsifier.masks.items():
        tensors = {"weight": params[name].detach(), "grad": params[name].grad}
        tensors.update({k: v for k, v in state.get(name, {}).items() if torch.is_tensor(v) and v.shape == mask.shape})
        for key, value in tensors.items():
            if value is not None and bool((value[~mask] != 0).any()):
                found.append(f"{name}:{key}")
    return found


def _assert_state_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            x, y = a[name][key], b[name][key]
            if torch.is_tensor(x):
                torch.testing.assert_close(x.float().cpu(), y.float().cpu(), msg=f"{name} {key}", **tol)
            else:
                assert x == y, (name, key)


# -- CPU: the reference path against torch ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fifty_steps_match_torch(kind):
    dense, packed = Run(kind, packed=False), Run(kind, packed=True)
    for step in range(50):
        torch.testing.assert_close(packed.step(step), dense.step(step), msg=f"loss at step {step}")
        assert _violations(packed) == [], f"step {step}"
    for (name, a), b in zip(dense.model.named_parameters(), packed.model.parameters()):
        torch.testing.assert_close(b, a, msg=name)
    _assert_state_close(packed.named_state(), dense.named_state())
    sd_packed, sd_dense = packed.optimizer.state_dict(), dense.optimizer.state_dict()
    assert sd_packed["param_groups"] == sd_dense["param_groups"]  # torch's keys and values
    # In memory, the masked weights' state is packed: 1-D, one entry per kept weight.
    params = dict(packed.model.named_parameters())
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    for name, mask in packed.sparsifier.masks.items():
        assert packed.optimizer.state[params[name]][key].shape == (int(mask.sum()),)
    # Unmasked parameters keep torch's dense state.
    assert packed.optimizer.state[params["norm_f.weight"]][key].shape == params["norm_f.weight"].shape


@pytest.mark.parametrize("kind", KINDS)
def test_state_bytes_at_75_percent(kind):
    packed = Run(kind, packed=True, block=UNIFORM_75)
    dense = Run(kind, packed=False, block=UNIFORM_75)
    for step in range(2):
        packed.step(step), dense.step(step)
    used, equivalent = packed.optimizer.state_bytes(), packed.optimizer.dense_equivalent_bytes()
    assert used["masked"] <= 0.3 * equivalent["masked"], (used, equivalent)
    assert used["dense"] == equivalent["dense"] > 0
    assert used["total"] == used["masked"] + used["dense"]
    # The dense equivalent is what torch's optimizer holds for the same parameters.
    torch_bytes = sum(
        v.numel() * v.element_size() for s in dense.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    assert equivalent["total"] == torch_bytes


def _checkpoint(run: Run) -> dict:
    """The NaN-encoded states, through torch.save / torch.load (no tensor shared with ``run``)."""
    masks = run.sparsifier.masks
    state = {
        "model": nan_format.encode_state_dict(run.model.state_dict(), masks),
        "optimizer": nan_format.encode_optimizer_state(run.optimizer.state_dict(), run.optimizer, run.model, masks),
        "scheduler": run.scheduler.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resume(kind: str, packed: bool, checkpoint: dict, load_first: bool, device: str = "cpu", **extra) -> Run:
    """As train.setup: weights, masks from the NaNs, optimizer state before or after sparsify."""
    run = Run(kind, packed, sparsify_now=False, device=device, **extra)
    weights, masks = nan_format.decode_state_dict(checkpoint["model"])
    run.model.load_state_dict(weights)
    optimizer_state = nan_format.decode_optimizer_state(checkpoint["optimizer"])
    if load_first:
        run.optimizer.load_state_dict(optimizer_state)
    run.sparsifier = sparsify(run.model, SPARSITY, run.optimizer, masks=masks)
    if not load_first:
        run.optimizer.load_state_dict(optimizer_state)
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    return run


@pytest.mark.parametrize("load_first", [True, False], ids=["load-then-sparsify", "sparsify-then-load"])
@pytest.mark.parametrize("direction", ["torch-to-packed", "packed-to-torch"])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_cross_load(kind, direction, load_first):
    source_packed = direction == "packed-to-torch"
    source = Run(kind, packed=source_packed)
    for step in range(10):
        source.step(step)
    resumed = _resume(kind, not source_packed, _checkpoint(source), load_first)
    assert _violations(resumed) == []
    if not source_packed:
        p = resumed.model.get_parameter("layers.0.mlp.fc.weight")
        key = "momentum_buffer" if kind == "sgd" else "exp_avg"
        assert resumed.optimizer.state[p][key].ndim == 1  # packed on load or on set_masks
    for step in range(10, 20):
        torch.testing.assert_close(resumed.step(step), source.step(step), msg=f"loss at step {step}")
        assert _violations(resumed) == []
    _assert_state_close(resumed.named_state(), source.named_state())


@pytest.mark.parametrize("kind", KINDS)
def test_nan_checkpoint_is_the_same_as_torchs(kind):
    dense, packed = Run(kind, packed=False), Run(kind, packed=True)
    for step in range(5):
        dense.step(step), packed.step(step)
    a = _checkpoint(dense)["optimizer"]
    b = _checkpoint(packed)["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    nans = 0
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        for key, value in a["state"][index].items():
            torch.testing.assert_close(b["state"][index][key], value, equal_nan=True)
            nans += int(torch.isnan(value).sum()) if value.is_floating_point() else 0
    assert nans > 0


def test_optimizer_state_loaded_before_masks_is_packed_by_set_masks():
    source = Run("adamw", packed=False)
    for step in range(3):
        source.step(step)
    run = Run("adamw", packed=True, sparsify_now=False)
    run.model.load_state_dict(source.model.state_dict())
    run.optimizer.load_state_dict(source.optimizer.state_dict())
    p = run.model.get_parameter("layers.1.mlp.proj.weight")
    assert run.optimizer.state[p]["exp_avg"].shape == p.shape  # no masks yet: dense
    run.sparsifier = sparsify(run.model, SPARSITY, run.optimizer, masks=dict(source.sparsifier.masks))
    assert run.optimizer.state[p]["exp_avg"].ndim == 1
    _assert_state_close(run.named_state(), source.named_state())


def test_new_masks_repack_and_detach_returns_to_dense_state():
    run = Run("adamw", packed=True)
    for step in range(3):
        run.step(step)
    name = "layers.0.attn.proj.weight"
    p = run.model.get_parameter(name)
    old = run.sparsifier.masks[name]
    before = run.named_state()[name]["exp_avg"].clone()
    state = run.sparsifier.state_dict()
    new = torch.roll(old, 1, dims=1)  # as many pruned, other places
    state["masks"] = {**state["masks"], name: new}
    run.sparsifier.load_state_dict(state)
    assert run.optimizer.state[p]["exp_avg"].shape == (int(new.sum()),)
    after = run.named_state()[name]["exp_avg"]
    torch.testing.assert_close(after, before * (old & new))  # kept where both keep, else 0
    assert _violations(run) == []
    run.step(3)
    assert _violations(run) == []
    run.sparsifier.detach()
    assert run.optimizer.state[p]["exp_avg"].shape == p.shape
    run.step(4)
    assert bool((p.detach()[~new] != 0).any())  # trains dense now


def test_sgd_without_momentum_keeps_no_state_like_torch():
    run = Run("sgd", packed=True, momentum=0.0, nesterov=False)
    dense = Run("sgd", packed=False, momentum=0.0, nesterov=False)
    for step in range(3):
        torch.testing.assert_close(run.step(step), dense.step(step))
    assert run.optimizer.state_dict()["state"] == {} == dense.optimizer.state_dict()["state"]


def test_packed_mask_layout():
    mask = torch.zeros(3, 700, dtype=torch.bool)
    mask[0, 5] = mask[1, 3] = mask[2, 699] = True
    mask[1, 400:500] = True
    pack = PackedMask(mask, block=512)
    flat = mask.reshape(-1)
    assert pack.kept == int(flat.sum()) and pack.numel == flat.numel()
    assert pack.bits.dtype == torch.uint8 and pack.bits.numel() == 5 * 512 // 8
    bits = ((pack.bits[:, None].to(torch.int32) >> torch.arange(8)) & 1).reshape(-1).bool()
    assert torch.equal(bits[: flat.numel()], flat) and not bits[flat.numel() :].any()
    counts = torch.nn.functional.pad(flat, (0, 5 * 512 - flat.numel())).view(5, 512).sum(1)
    assert pack.offsets.tolist() == (counts.cumsum(0) - counts).tolist()
    dense = torch.randn(3, 700)
    torch.testing.assert_close(pack.unpack(pack.pack(dense)), dense * mask)


def test_rejections():
    model = _model()
    with pytest.raises(ValueError, match="kind"):
        PackedOptimizer(model.parameters(), kind="lion")
    with pytest.raises(ValueError, match="Nesterov"):
        PackedOptimizer(model.parameters(), kind="sgd", nesterov=True)
    adamw = PackedOptimizer(model.parameters(), kind="adamw")
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="another kind"):
        adamw.load_state_dict(sgd_state)
    amsgrad = PackedOptimizer(model.parameters(), kind="adam")
    amsgrad.param_groups[0]["amsgrad"] = True
    sparsify(model, UNIFORM_75, amsgrad)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    with pytest.raises(NotImplementedError, match="amsgrad"):
        amsgrad.step()


def test_other_optimizers_keep_the_generic_path():
    """An optimizer without set_masks: dense state, zeroed by the sparsifier's post-step pass."""
    model = _model()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.1)
    sparsifier = sparsify(model, SPARSITY, optimizer)
    for step in range(3):
        tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()).backward()
        optimizer.step()
    for name, mask in sparsifier.masks.items():
        p = model.get_parameter(name)
        assert optimizer.state[p]["square_avg"].shape == p.shape
        assert not optimizer.state[p]["square_avg"][~mask].any() and not p[~mask].any()


# -- CUDA: the Triton kernel against the reference --------------------------------------------------

cuda = pytest.mark.cuda


def _cuda_mask(shape: tuple[int, ...], sparsity: float, seed: int) -> torch.Tensor:
    """A random mask with, when there is room, an all-pruned first tile and an all-kept second."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.rand(int(torch.tensor(shape).prod()), generator=generator) >= sparsity
    if flat.numel() >= 3 * BLOCK:
        flat[:BLOCK] = False
        flat[BLOCK : 2 * BLOCK] = True
    return flat.view(shape).cuda()


def _kernel_module():
    from sparsetrain.kernels import has_triton

    if not has_triton():
        pytest.skip("needs Triton")
    from sparsetrain.kernels import packed_step

    return packed_step


def _step_both(variant: str, step: int, reference: list, kernel: list, mask, pack, grad) -> None:
    """One step of ``variant`` on (weight, state, state) by the reference and by the kernel."""
    packed_step = _kernel_module()
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
    packed_step = _kernel_module()
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


@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_fifty_steps_kernel_matches_reference(kind):
    _kernel_module()
    kernel = Run(kind, packed=True, device="cuda", impl="triton")
    reference = Run(kind, packed=True, device="cuda", impl="torch")
    torch_run = Run(kind, packed=False, device="cuda", fused=True)
    for step in range(50):
        loss = kernel.step(step)
        torch.testing.assert_close(loss, reference.step(step), msg=f"loss at step {step}")
        torch.testing.assert_close(loss, torch_run.step(step), rtol=1e-4, atol=1e-5, msg=f"torch loss at step {step}")
        assert _violations(kernel) == [], f"step {step}"
    # Rounding differences (fused multiply-adds) grow over 50 Adam steps where gradients are near 0.
    for (name, a), b in zip(reference.model.named_parameters(), kernel.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)
    _assert_state_close(kernel.named_state(), reference.named_state(), rtol=1e-3, atol=1e-4)
    _assert_state_close(kernel.named_state(), torch_run.named_state(), rtol=1e-3, atol=1e-4)
    # The kernel's checkpoint loads into torch's fused optimizer and continues alike.
    resumed = _resume(kind, False, _checkpoint(kernel), load_first=True, device="cuda", fused=True)
    for step in range(50, 55):
        torch.testing.assert_close(resumed.step(step), kernel.step(step), rtol=1e-4, atol=1e-5)
