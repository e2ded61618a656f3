"""Helpers of the PackedOptimizer tests: a tiny GPT with a warm-up schedule and its sparsifier
(:class:`Run`), built on torch's AdamW / Adam / SGD or on the PackedOptimizer, the SPEC §3
invariant check, and NaN checkpoints through ``torch.save`` / ``torch.load``."""

from __future__ import annotations

import io

import torch

from sparsetrain.model import GPT
from sparsetrain.optim.packed import PackedOptimizer
from sparsetrain.sparsity import nan_format
from sparsetrain.sparsity.sparsifier import sparsify
from tests.helpers import tiny_gpt

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
    "param_name_patterns": {
        "ffn.ffn.0": {"sparsity": 0.9},
        "proj_[qkv]_dense_layer": {"sparsity": 0.5},
        "proj_output_dense_layer|ffn.ffn.1": {},
    },
}

UNIFORM_75 = {"sparsity": 0.75, "init_method": "random", "seed": 2}


def small_gpt(device: str = "cpu") -> GPT:
    """The model of these tests: width 32, context 16, vocab 61 (2 layers, 2 heads), seed 0."""
    return tiny_gpt(device=device, hidden_size=32, max_position_embeddings=CONTEXT, vocab_size=VOCAB)


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """As optim.build_optimizer: decay on matrices, not on norms, biases, embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(kind: str, model: torch.nn.Module, packed: bool, **extra) -> torch.optim.Optimizer:
    args = {**ARGS[kind], **extra}
    if packed:
        return PackedOptimizer(decay_groups(model), kind=kind, **args)
    return TORCH[kind](decay_groups(model), **args)


class Run:
    """A model, an optimizer with a warm-up schedule, and its sparsifier."""

    def __init__(self, kind: str, packed: bool, *, block=SPARSITY, device="cpu", sparsify_now=True, **extra) -> None:
        self.device = device
        self.model = small_gpt(device)
        self.optimizer = make_optimizer(kind, self.model, packed, **extra)
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


def violations(run: Run) -> list[str]:
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


def assert_state_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            x, y = a[name][key], b[name][key]
            if torch.is_tensor(x):
                torch.testing.assert_close(x.float().cpu(), y.float().cpu(), msg=f"{name} {key}", **tol)
            else:
                assert x == y, (name, key)


def nan_checkpoint(run: Run) -> dict:
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


def resume_from(kind: str, packed: bool, checkpoint: dict, load_first: bool, device: str = "cpu", **extra) -> Run:
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
