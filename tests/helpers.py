"""Helpers shared by the tests: plain functions and classes (the fixtures are in ``conftest.py``).

- ``ROOT``, ``SRC``: the repository and its ``src/``;
- ``tiny_config`` / ``tiny_gpt``: the real :class:`~sparsetrain.model.GPT`, small;
- ``ToyBlock`` / ``ToyGPT`` / ``toy_gpt``: GPT's parameter names around no real attention, for the
  sparsity library on any ``nn.Module``;
- ``TOY_SPARSITY``: a sparsity block of three groups for the toy;
- ``BLOCK_KINDS`` (``QKV_KINDS`` its first three), ``layer_names``, ``BLOCK_MATRICES``: the 6 block
  matrices of a decoder layer (q, k, v, attention output, the two feed-forward layers), their
  full names, and the 12 of a 2-layer GPT (what the default heuristic takes);
- ``cli``, ``records``: the command line in process, and what a run logged to metrics.jsonl;
- ``FailingFile``: a file that fails like a full disk after some bytes;
- ``triton_module``: a Triton kernel module, or a skip where Triton is missing; ``rel_err``;
- ``block_kernel_run``: a CPU run whose block layers are switched as on a CUDA bf16 run;
- ``torchrun`` / ``launch``, ``rank_reports``, ``checkpoint_model``: runs of 1 or N processes;
  ``start_torchrun`` / ``start_launch`` and ``finish``: the same, started and waited for apart;
  ``launch_here``: ``launch(1, ...)`` in this process.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsetrain.cli import main
from sparsetrain.config import ModelParams, params_from_dict
from sparsetrain.model import GPT

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# -- models ------------------------------------------------------------------------------------

TINY_GPT = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=97, max_position_embeddings=32)


def tiny_config(**overrides) -> ModelParams:
    """``ModelParams`` of a tiny GPT: 2 layers, width 64, 2 heads, vocab 97, context 32 unless overridden."""
    return ModelParams(**{**TINY_GPT, **overrides})


def tiny_gpt(*, seed: int | None = 0, device: str = "cpu", **overrides) -> GPT:
    """A tiny :class:`GPT` (:func:`tiny_config` with ``overrides``) on ``device``, its weights drawn
    after ``torch.manual_seed(seed)`` (``seed=None``: from the global generator as it stands)."""
    if seed is not None:
        torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).to(device)


class ToyLinear(nn.Module):
    """The model zoo's feed-forward layer: an ``nn.Linear`` under ``linear_layer``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear_layer = nn.Linear(n_in, n_out)


class ToyBlock(nn.Module):
    """A decoder layer's parameter names (``self_attn.proj_{q,k,v}_dense_layer``,
    ``self_attn.proj_output_dense_layer``, ``norm1``, ``norm3``, ``ffn.ffn.{0,1}.linear_layer``)
    with no real attention: the output projection reads q, k and v side by side (``3 d``) unless
    ``proj_in`` says otherwise."""

    def __init__(self, d: int, proj_in: int | None = None) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.proj_q_dense_layer = nn.Linear(d, d)
        self.self_attn.proj_k_dense_layer = nn.Linear(d, d)
        self.self_attn.proj_v_dense_layer = nn.Linear(d, d)
        self.self_attn.proj_output_dense_layer = nn.Linear(3 * d if proj_in is None else proj_in, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.ffn = nn.Module()
        self.ffn.ffn = nn.ModuleList([ToyLinear(d, 4 * d), ToyLinear(4 * d, d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, h = self.self_attn, self.norm1(x)
        qkv = torch.cat([attn.proj_q_dense_layer(h), attn.proj_k_dense_layer(h), attn.proj_v_dense_layer(h)], dim=-1)
        x = x + attn.proj_output_dense_layer(torch.tanh(qkv))
        fc, proj = (layer.linear_layer for layer in self.ffn.ffn)
        return x + proj(torch.relu(fc(self.norm3(x))))


TOY_VOCAB, TOY_WIDTH, TOY_CONTEXT = 13, 8, 6


class ToyGPT(nn.Module):
    """GPT-shaped enough for sparsity: the same parameter names (the ``ln_f`` alias of the final
    norm too), no real attention."""

    def __init__(
        self,
        tied: bool = False,
        n_layer: int = 2,
        *,
        d: int = TOY_WIDTH,
        vocab: int = TOY_VOCAB,
        context: int = TOY_CONTEXT,
        proj_in: int | None = None,
    ) -> None:
        super().__init__()
        self.embedding_layer = nn.Module()
        self.embedding_layer.word_embeddings = nn.Embedding(vocab, d)
        self.embedding_layer.position_embeddings = nn.Embedding(context, d)
        self.transformer_decoder = nn.Module()
        self.transformer_decoder.layers = nn.ModuleList(ToyBlock(d, proj_in) for _ in range(n_layer))
        self.transformer_decoder.norm = nn.LayerNorm(d)
        self.ln_f = self.transformer_decoder.norm
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embedding_layer.word_embeddings.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        emb = self.embedding_layer
        x = emb.word_embeddings(idx) + emb.position_embeddings(torch.arange(idx.shape[1]))
        for layer in self.transformer_decoder.layers:
            x = layer(x)
        return self.lm_head(self.transformer_decoder.norm(x))


def toy_gpt(seed: int = 0, **kwargs) -> ToyGPT:
    """A :class:`ToyGPT` drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return ToyGPT(**kwargs)


# A sparsity block for the toy: three groups with settings of their own (``ffn`` random at 0.75,
# ``self_attn`` topk at the top-level 0.5, the head at 0.3), seed 3.
TOY_SPARSITY = {
    "sparsity": 0.5,
    "seed": 3,
    "param_name_patterns": {
        "ffn": {"sparsity": 0.75, "init_method": "random"},
        "self_attn": {},
        "lm_head": {"sparsity": 0.3},
    },
}

# The block matrices of one decoder layer, in the order of ``named_parameters()``.
BLOCK_KINDS = (
    "self_attn.proj_q_dense_layer.weight",
    "self_attn.proj_k_dense_layer.weight",
    "self_attn.proj_v_dense_layer.weight",
    "self_attn.proj_output_dense_layer.weight",
    "ffn.ffn.0.linear_layer.weight",
    "ffn.ffn.1.linear_layer.weight",
)
QKV_KINDS = BLOCK_KINDS[:3]


def layer_names(*kinds: str, n_layer: int = 2) -> list[str]:
    """``transformer_decoder.layers.{i}.{kind}`` for every layer ``i``, then every kind."""
    return [f"transformer_decoder.layers.{i}.{k}" for i in range(n_layer) for k in kinds]


BLOCK_MATRICES = layer_names(*BLOCK_KINDS)

# -- the command line --------------------------------------------------------------------------


def cli(*args) -> int:
    """``sparsetrain ARGS`` in this process (paths and numbers as strings); the exit code."""
    return main([str(a) for a in args])


def records(model_dir: Path, kind: str = "train") -> list[dict]:
    """The records of one ``kind`` a run wrote to ``model_dir/metrics.jsonl``."""
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


# -- faults ------------------------------------------------------------------------------------


class FailingFile:
    """Wraps the temporary checkpoint file: writes part of the data, then fails like a full disk."""

    def __init__(self, f, exc: BaseException, after: int = 4096):
        self.f, self.exc, self.left = f, exc, after

    def write(self, data):
        if self.left <= 0:
            raise self.exc
        n = self.f.write(bytes(data)[: self.left])
        self.left -= n
        return len(data) if self.left > 0 else n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


# -- kernels -----------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float64 (Frobenius norms)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def triton_module(name: str):
    """``sparsetrain.kernels.<name>`` (which imports Triton), or skip the test where Triton is missing."""
    from sparsetrain.kernels import has_triton

    if not has_triton():
        pytest.skip("needs Triton")
    return importlib.import_module(f"sparsetrain.kernels.{name}")


# -- runs whose block layers are on the block-sparse kernels' class ------------------------------

BLOCK16_75 = {"sparsity": 0.75, "structure": "block", "block_size": 16, "init_method": "topk"}


def block_kernel_run(model_dir, tiny_params, monkeypatch, *, packed: bool, max_steps: int, **optimizer):
    """A CPU run; ``packed`` stands in for a CUDA bf16 run, whose block layers go to the kernels
    with live blocks stored only (on the CPU the fallback computes the same function)."""
    from sparsetrain import training as tr
    from sparsetrain.sparsity.block_linear import packed_layers
    from sparsetrain.training import build

    monkeypatch.setattr(build, "block_kernels_apply", lambda run: packed)
    p = tiny_params(sparsity=BLOCK16_75, model={"hidden_size": 64})
    p["optimizer"].update(optimizer)
    p["runconfig"].update({"max_steps": max_steps, "device": "cpu", "compile": False})
    model_dir.mkdir(exist_ok=True)
    run = tr.setup(params_from_dict(p), model_dir, evaluate=False, write_metrics=False)
    assert len(packed_layers(run.model)) == (12 if packed else 0) == len(run.block_kernel_layers)
    return run


# -- runs of one process, or of several under torchrun -------------------------------------------


def launch(nproc: int, params: Path, model_dir: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``run.py --mode train`` with ``--set`` ``overrides``, in one process or ``nproc``."""
    return finish(start_launch(nproc, params, model_dir, *overrides), timeout)


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``python ARGS`` in one process, or under torchrun in ``nproc``."""
    return finish(start_torchrun(nproc, args), timeout)


def start_launch(nproc: int, params: Path, model_dir: Path, *overrides: str) -> subprocess.Popen:
    """``launch`` started, not waited for: ``finish`` it. Two independent launches of a test may
    run at once (a launch leaves part of two cores idle: torchrun's own start, the teardown)."""
    sets = [x for o in overrides for x in ("--set", o)]
    args = [str(ROOT / "run.py"), "--mode", "train", "--params", str(params), "--model_dir", str(model_dir), *sets]
    return start_torchrun(nproc, args)


def start_torchrun(nproc: int, args: list[str]) -> subprocess.Popen:
    """``torchrun`` started, not waited for: ``finish`` it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        # --standalone: a private rendezvous on a free port, so parallel or stale jobs never meet.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    # A session of its own, so that a hung job's worker processes can be killed with it.
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    """Wait for a ``start_torchrun`` / ``start_launch`` process (killed, with its workers, and the
    test failed after ``timeout`` seconds)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launch_here(params: Path, model_dir: Path, *overrides: str, compiled: bool = False) -> subprocess.CompletedProcess:
    """``launch(1, params, model_dir, *overrides)`` in this process: ``zoo_cli.run_py``, the function
    ``run.py`` calls, on one intra-op thread as ``launch`` gives its process (OMP_NUM_THREADS=1),
    its stdout and stderr (the log) captured into the result. The same run without the ~5 s of
    imports a fresh interpreter pays (torch, TorchDynamo, DTensor), for one-process references
    and the one-process halves of resumes. ``compiled``: TorchDynamo is reset before and after,
    so that the run compiles for itself (no code-object cache an earlier test filled, no recompile
    limit reached) and leaves nothing behind."""
    from sparsetrain.zoo_cli import run_py

    sets = [x for o in overrides for x in ("--set", o)]
    argv = ["--mode", "train", "--params", str(params), "--model_dir", str(model_dir), *sets]
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    if compiled:
        torch._dynamo.reset()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = run_py(argv)
    finally:
        torch.set_num_threads(threads)
        if compiled:
            torch._dynamo.reset()
        logger = logging.getLogger("sparsetrain")  # the run's console handler (on ``err``) and train.log
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
    return subprocess.CompletedProcess(["run.py", *argv], rc, out.getvalue(), err.getvalue())


def rank_reports(directory: Path) -> list[dict]:
    """The JSON reports a 2-process probe wrote, one file per rank."""
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def checkpoint_model(path: Path) -> dict:
    """The model state of a checkpoint file, on the CPU (a GPU run's too)."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]
