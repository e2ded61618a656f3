"""One of our checkpoints as a Hugging Face GPT-2 directory.

``export_hf(checkpoint, out_dir)`` writes what ``transformers.GPT2LMHeadModel.from_pretrained``
and ``transformers.AutoTokenizer.from_pretrained`` load, with our logits:

    config.json                  GPT2Config
    model.safetensors            the weights, in GPT-2's names and Conv1D layout (in, out); pruned
                                 positions (NaN in our checkpoints) are exact 0.0
    sparsity_masks.safetensors   the masks of the sparsified weights (bool, True = kept), in the
                                 same names and layout, so an import can recover them
    sparsetrain.json             the source checkpoint, its step, the sparsity of each tensor
    tokenizer.json, tokenizer_config.json, special_tokens_map.json

How our settings read in GPT-2's: ``attention_type: dot_product`` (unscaled scores) has the
``1 / sqrt(head size)`` that GPT-2 divides by folded into the query weights and biases (times
``sqrt(head size)``; exact zeros stay zeros; ``sparsetrain.json`` records the factor as
``query_scale``), so the directory is a standard, scaled GPT-2. Not ``scale_attn_weights: false``:
transformers' SDPA and FlashAttention paths ignored that flag before 2026 (huggingface/transformers
PR 44397; 4.44 with its default SDPA gives other logits), and readers of GPT-2 other than
transformers need not know it.
The activation keeps its name (gelu, gelu_new, relu, silu are Hugging Face names for the
same functions); an untied head is ``tie_word_embeddings: false``. Biases a model lacks
(``use_bias: false`` and the per-layer keys) are written as zeros: a layer norm or linear layer
with a zero bias computes exactly what it computes without one, so the exported model is the same
function. Training-only keys (``loss_scaling``, ``loss_weight``, the initializers) have no part
in it. What GPT-2 cannot express is refused in one line naming the key: an LM head bias
(``model.use_bias_in_output: true``).

The directory appears whole or not at all: everything is written into a hidden directory beside
it, flushed, and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain.config import ModelParams
from sparsetrain.config.fields import build_section
from sparsetrain.config.hf_model import EXPORT_FORMAT, FUNCTION_KEYS
from sparsetrain.errors import CheckpointError, UserError
from sparsetrain.hf.names import masks_to_hf, scale_queries, to_hf
from sparsetrain.hf.tokenizer import TokenizerSource, find_tokenizer, write_tokenizer
from sparsetrain.model import GPT
from sparsetrain.sparsity.nan_format import decode_state_dict

MASKS_FILE = "sparsity_masks.safetensors"


def export_hf(checkpoint: Path, out_dir: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write ``checkpoint`` (one of ours) as a Hugging Face GPT-2 directory ``out_dir`` (see the
    module docstring). ``out_dir`` may be missing or empty; a non-empty one is replaced only with
    ``overwrite``, and never when it holds checkpoints or the checkpoint itself. Problems are one
    :class:`~sparsetrain.errors.UserError` line; nothing is left behind by a failed export.
    Returns a summary: input, output, global step, tokenizer, sparsity."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_out_dir(out_dir, checkpoint, overwrite)
    state = ckpt.load_checkpoint(checkpoint)
    cfg = model_params(state, checkpoint)
    refuse_inexpressible(cfg, checkpoint)
    model_dir = checkpoint.resolve().parent
    tokenizer = find_tokenizer(state["params"], model_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
            f"{cfg.vocab_size}"
        )
    weights, masks = hf_weights(state["model"], cfg, checkpoint)
    sparsity = {name: round(1.0 - float(m.float().mean()), 6) for name, m in masks.items()}
    info = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "source_checkpoint": str(checkpoint.resolve()),
        "global_step": int(state["global_step"]),
        "run_id": state.get("run_id"),
        "tokenizer": tokenizer.spec,
        "masks_file": MASKS_FILE,
        "sparsity": sparsity,
        "sparsity_config": state["params"].get("sparsity"),
        "query_scale": query_scale(cfg),  # c_attn's queries are ours times this (attention_type)
        "model": {k: getattr(cfg, k) for k in FUNCTION_KEYS},  # what an import builds (config.hf_model)
    }
    _write_dir(out_dir, overwrite, lambda tmp: _write_files(tmp, cfg, tokenizer, weights, masks, info))
    pruned = sum(int((~m).sum()) for m in masks.values())
    return {
        "input": str(checkpoint),
        "output": str(out_dir),
        "global_step": info["global_step"],
        "tokenizer": tokenizer.spec,
        "sparsified_tensors": len(masks),
        "sparsity": pruned / max(sum(m.numel() for m in masks.values()), 1),
    }


def model_params(state: dict[str, Any], path: Path) -> ModelParams:
    """The model settings a checkpoint was trained with (its resolved ``params.model``)."""
    params = state.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
        raise CheckpointError(f"{path}: holds no params.model (the run's model settings); the export needs them")
    try:
        cfg = build_section(ModelParams, params["model"], "model")
    except UserError as e:
        raise CheckpointError(f"{path}: its params: {e}") from None
    if cfg.vocab_size is None:
        raise CheckpointError(f"{path}: its params.model.vocab_size is not resolved")
    return cfg


def refuse_inexpressible(cfg: ModelParams, path: Path) -> None:
    """One line naming the first setting GPT-2's format cannot express."""
    if cfg.use_bias_in_output:
        raise CheckpointError(
            f"{path}: model.use_bias_in_output: true: GPT-2 has no LM head bias, so the Hugging Face "
            "GPT-2 format cannot hold this model"
        )


def hf_config(cfg: ModelParams, eos_id: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` of a GPT2LMHeadModel that computes what our ``GPT(cfg)`` computes (its
    queries scaled by :func:`query_scale`)."""
    dropout = cfg.dropout_rate
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_position_embeddings,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_hidden_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.filter_size or 4 * cfg.hidden_size,
        "activation_function": cfg.nonlinearity,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout if cfg.attention_dropout_rate is None else cfg.attention_dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": cfg.initializer_range,
        "scale_attn_weights": True,  # dot_product: see query_scale
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": bool(cfg.share_embedding_weights),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def query_scale(cfg: ModelParams) -> float:
    """What our query weights are multiplied by in the export: ``sqrt(head size)`` for unscaled
    (``dot_product``) attention, which GPT-2's division by ``sqrt(head size)`` cancels; else 1."""
    return math.sqrt(cfg.hidden_size // cfg.num_heads) if cfg.attention_type == "dot_product" else 1.0


def hf_weights(
    model: dict[str, torch.Tensor], cfg: ModelParams, path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights (NaN -> 0.0) and masks of a checkpoint's model state in Hugging Face names
    and layout, the queries scaled by :func:`query_scale`; the tied head left out, as
    ``save_pretrained`` does."""
    plain = dataclasses.replace(cfg, initializer=None, output_layer_initializer=None, embedding_initializer=None)
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation to speak of
        expected = GPT(plain).state_dict()
    ckpt.check_model_state(model, expected, path)
    for name, t in model.items():
        if t.is_floating_point() and t.dim() < 2 and torch.isnan(t).any():
            raise CheckpointError(f"{path}: {name} holds NaN, and it is no sparsified weight (a diverged run?)")
    clean, masks = decode_state_dict(model)
    tied = cfg.share_embedding_weights
    if tied and not torch.equal(clean["lm_head.weight"], clean["embedding_layer.word_embeddings.weight"]):
        raise CheckpointError(
            f"{path}: model.share_embedding_weights is true, but lm_head.weight differs from the word embeddings"
        )
    try:
        weights = to_hf(clean)
        hf_masks = masks_to_hf(masks, clean)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if query_scale(cfg) != 1.0:
        weights = scale_queries(weights, query_scale(cfg))
    if tied:
        weights.pop("lm_head.weight")
        hf_masks.pop("lm_head.weight", None)
    return weights, hf_masks


def _write_files(
    tmp: Path, cfg: ModelParams, tokenizer: TokenizerSource, weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor], info: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    dtype = weights["transformer.wte.weight"].dtype
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer.eos_id, dtype), indent=2) + "\n")
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    save_file(masks, str(tmp / MASKS_FILE), metadata={"format": "pt", "kept": "True"})
    write_tokenizer(tokenizer, tmp, cfg.max_position_embeddings)
    (tmp / "sparsetrain.json").write_text(json.dumps(info, indent=2) + "\n")


def check_out_dir(out_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse, in one line, an output directory where writing would lose something: a file, a
    non-empty directory without ``overwrite``, a directory holding the checkpoint or any of a
    run's checkpoints (even with ``overwrite``), a missing parent directory."""
    if out_dir.is_symlink():
        raise CheckpointError(f"-o {out_dir}: is a symbolic link; give a directory path")
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise CheckpointError(f"-o {out_dir}: is a file; the Hugging Face export is a directory")
    parent = out_dir.absolute().parent
    if not parent.is_dir():
        raise CheckpointError(f"-o {out_dir}: the directory {parent} does not exist; create it first")
    try:
        if not out_dir.is_dir() or not any(out_dir.iterdir()):
            return
    except OSError as e:
        raise CheckpointError(f"-o {out_dir}: cannot read it ({e.strerror or e})") from None
    source = checkpoint.resolve()
    if source.is_relative_to(out_dir.resolve()) or ckpt.list_checkpoints(out_dir) or (out_dir / "params.yaml").exists():
        raise CheckpointError(f"-o {out_dir}: holds a run's checkpoints or params; the export never replaces it")
    if not overwrite:
        raise CheckpointError(f"-o {out_dir}: is not empty; choose another directory or pass --overwrite")


def _write_dir(out_dir: Path, overwrite: bool, write: Any) -> None:
    """Have ``write(tmp)`` fill a hidden directory beside ``out_dir``, flush it, rename it into
    place (replacing an empty ``out_dir``, or with ``overwrite`` a full one); on any failure the
    hidden directory goes and ``out_dir`` stays as it was."""
    parent = out_dir.absolute().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise CheckpointError(f"-o {out_dir}: cannot write ({e.strerror or e})") from None
    old = None
    try:
        os.chmod(tmp, 0o777 & ~ckpt.current_umask())  # mkdtemp makes 0700; the export is as readable as other outputs
        write(tmp)
        for f in tmp.iterdir():
            ckpt.fsync_path(f)
        ckpt.fsync_path(tmp)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            if not overwrite:  # filled since the check
                raise CheckpointError(f"-o {out_dir}: is not empty; choose another directory or pass --overwrite")
            old = parent / f"{tmp.name}.old"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)
        raise CheckpointError(f"-o {out_dir}: cannot write ({e.strerror or e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    ckpt.fsync_path(parent)


