"""Our GPT's state dict <-> Hugging Face ``GPT2LMHeadModel``'s: names and layouts. Pure functions.

Ours (see :mod:`sparsetrain.model`) holds separate q, k, v ``nn.Linear`` weights of shape
(out, in); GPT-2's ``Conv1D`` stores (in, out), and its ``c_attn`` is q, k, v side by side along
the output::

    embedding_layer.word_embeddings.weight            transformer.wte.weight
    embedding_layer.position_embeddings.weight        transformer.wpe.weight
    transformer_decoder.layers.{i}.norm1.*            transformer.h.{i}.ln_1.*
    ...self_attn.proj_{q,k,v}_dense_layer.weight      transformer.h.{i}.attn.c_attn.weight = cat(q, k, v).T
    ...self_attn.proj_output_dense_layer.weight       transformer.h.{i}.attn.c_proj.weight (transposed)
    transformer_decoder.layers.{i}.norm3.*            transformer.h.{i}.ln_2.*
    ...ffn.ffn.0.linear_layer.weight                  transformer.h.{i}.mlp.c_fc.weight (transposed)
    ...ffn.ffn.1.linear_layer.weight                  transformer.h.{i}.mlp.c_proj.weight (transposed)
    transformer_decoder.norm.* (alias ln_f.*)         transformer.ln_f.*
    lm_head.weight                                    lm_head.weight

GPT-2 has every bias, we may have none (``use_bias: false``): :func:`to_hf` gives a missing
bias as zeros, the same function (a layer norm or linear layer without bias computes exactly
what it computes with a zero bias). GPT-2 has no LM head bias: ``lm_head.bias`` is refused.
:func:`from_hf` is the inverse; given the names our model expects it drops the zero biases again,
so ``from_hf(to_hf(sd), sd.keys())`` is ``sd`` exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

_LAYER = "transformer_decoder.layers.{i}."
_HF_LAYER = "transformer.h.{i}."
_QKV = tuple(f"self_attn.proj_{x}_dense_layer" for x in "qkv")
_LAYER_RE = re.compile(r"^(?:transformer_decoder\.layers|transformer\.h)\.(\d+)\.")
# Buffers of older transformers versions (the causal mask), not weights: ignored on import.
_HF_BUFFERS = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


@dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor and the tensors of ours it is made of (``conv1d``: transposed;
    several sources: concatenated along the output first)."""

    hf: str
    ours: tuple[str, ...]
    conv1d: bool = False


def entries(n_layer: int) -> list[Entry]:
    """Every tensor of a GPT2LMHeadModel of ``n_layer`` blocks, in its state dict's order."""
    out = [
        Entry("transformer.wte.weight", ("embedding_layer.word_embeddings.weight",)),
        Entry("transformer.wpe.weight", ("embedding_layer.position_embeddings.weight",)),
    ]
    layer = [
        ("ln_1", ("norm1",), False),
        ("attn.c_attn", _QKV, True),
        ("attn.c_proj", ("self_attn.proj_output_dense_layer",), True),
        ("ln_2", ("norm3",), False),
        ("mlp.c_fc", ("ffn.ffn.0.linear_layer",), True),
        ("mlp.c_proj", ("ffn.ffn.1.linear_layer",), True),
    ]
    for i in range(n_layer):
        ours, hf = _LAYER.format(i=i), _HF_LAYER.format(i=i)
        for hf_name, our_names, conv1d in layer:
            for p in ("weight", "bias"):
                out.append(Entry(f"{hf}{hf_name}.{p}", tuple(f"{ours}{n}.{p}" for n in our_names), conv1d and p == "weight"))
    out += [
        Entry("transformer.ln_f.weight", ("transformer_decoder.norm.weight",)),
        Entry("transformer.ln_f.bias", ("transformer_decoder.norm.bias",)),
        Entry("lm_head.weight", ("lm_head.weight",)),
    ]
    return out


def layer_count(names: Iterable[str]) -> int:
    """Decoder layers in a state dict, ours or Hugging Face's (1 + the highest layer index)."""
    found = [int(m.group(1)) for n in names if (m := _LAYER_RE.match(n))]
    return max(found) + 1 if found else 0


def hf_name(ours: str) -> str:
    """The Hugging Face tensor that holds (part of) our tensor ``ours`` (the ``ln_f`` alias too)."""
    ours = _canonical(ours)
    for e in entries(layer_count([ours])):
        if ours in e.ours:
            return e.hf
    raise KeyError(f"{ours!r} has no place in a Hugging Face GPT-2 state dict")


def _canonical(name: str) -> str:
    return "transformer_decoder.norm." + name[len("ln_f."):] if name.startswith("ln_f.") else name


def to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict as a GPT2LMHeadModel state dict (contiguous new tensors, ``lm_head.weight``
    included even when tied, as GPT2LMHeadModel's own ``state_dict()``). A missing bias becomes
    zeros of its weight's output width and dtype. Raises ``ValueError`` naming a tensor GPT-2 has
    no place for (``lm_head.bias``, a foreign name) or one that is missing."""
    state = _our_names(state)
    n_layer = layer_count(state)

    def missing(name: str) -> torch.Tensor:
        if name.endswith(".bias") and name[: -len("bias")] + "weight" in state:
            weight = state[name[: -len("bias")] + "weight"]
            return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        raise ValueError(f"{name!r} is missing from the state dict")

    return _convert(state, n_layer, missing)


def masks_to_hf(masks: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sparsity masks (True = kept, keyed by our names) in Hugging Face names and layout: one per
    Hugging Face tensor that holds a masked one of ours. A part without a mask of its own (say q
    and v are masked, k is not) is all True, of its tensor's shape in ``state``."""
    masks = _our_names(masks)
    if not masks:
        return {}
    state = _our_names(state)
    wanted = [e for e in entries(layer_count(state)) if any(n in masks for n in e.ours)]
    unplaced = set(masks) - {n for e in wanted for n in e.ours}
    if unplaced:
        raise ValueError(f"mask of {sorted(unplaced)[0]!r} has no place in a Hugging Face GPT-2 state dict")

    def kept(name: str) -> torch.Tensor:
        return torch.ones(state[name].shape, dtype=torch.bool)

    return {e.hf: _join(e, [masks[n].bool() if n in masks else kept(n) for n in e.ours]) for e in wanted}


def masks_from_hf(hf_masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`masks_to_hf`: masks in Hugging Face names and layout as ours, one per
    part of each (a fused ``c_attn`` mask gives q, k and v; a part all True was not sparsified and
    is left out). Raises ``ValueError`` for a name GPT2LMHeadModel has no tensor of."""
    table = {e.hf: e for e in entries(layer_count(hf_masks))}
    out: dict[str, torch.Tensor] = {}
    for name, mask in hf_masks.items():
        if name not in table:
            raise ValueError(f"{name!r} is not a tensor of GPT2LMHeadModel")
        e = table[name]
        t = mask.bool().t() if e.conv1d else mask.bool()
        for ours, part in zip(e.ours, t.chunk(len(e.ours), dim=0), strict=True):
            if not bool(part.all()):
                out[ours] = part.contiguous().clone()
    return out


def from_hf(hf: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf`: a GPT2LMHeadModel state dict in our names and layout, with the
    ``ln_f.*`` alias beside ``transformer_decoder.norm.*`` (both are in our model's state dict). A
    missing ``lm_head.weight`` is the tied word embedding (``save_pretrained`` leaves it out).

    ``keys``: the names our model expects (``GPT(cfg).state_dict().keys()``); tensors outside them
    are dropped where they are zero (the biases a ``use_bias: false`` model lacks), and a nonzero
    one, or an expected name not produced, raises ``ValueError``. Older transformers versions'
    causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are ignored."""
    hf = {k: v for k, v in hf.items() if not _HF_BUFFERS.match(k)}
    if "lm_head.weight" not in hf and "transformer.wte.weight" in hf:
        hf = {**hf, "lm_head.weight": hf["transformer.wte.weight"]}
    table = entries(layer_count(hf))
    unknown = set(hf) - {e.hf for e in table}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]!r} is not a tensor of GPT2LMHeadModel")
    out: dict[str, torch.Tensor] = {}
    for e in table:
        if e.hf not in hf:
            raise ValueError(f"{e.hf!r} is missing from the Hugging Face state dict")
        t = hf[e.hf].t() if e.conv1d else hf[e.hf]
        for name, part in zip(e.ours, t.chunk(len(e.ours), dim=0), strict=True):
            out[name] = part.contiguous().clone()
    for p in ("weight", "bias"):
        out[f"ln_f.{p}"] = out[f"transformer_decoder.norm.{p}"]
    if keys is None:
        return out
    keys = list(keys)
    for name in set(out) - set(keys):
        if out[name].count_nonzero():
            raise ValueError(f"{name!r}: nonzero in the Hugging Face state dict, and the model has no such tensor")
    lacking = [k for k in keys if k not in out]
    if lacking:
        raise ValueError(f"{lacking[0]!r}: the model has it, GPT-2 has no such tensor")
    return {k: out[k] for k in keys}


def scale_queries(hf: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel state dict with the query part of every ``c_attn`` (weight and bias)
    multiplied by ``factor``: the attention scores are then ``factor`` times as large. Zeros stay
    exact zeros; ``1 / factor`` undoes it (exactly where ``factor`` is a power of 2)."""
    out = dict(hf)
    for name, t in hf.items():
        if name.endswith(".attn.c_attn.weight") or name.endswith(".attn.c_attn.bias"):
            width = t.shape[-1] // 3
            scaled = t.clone()
            scaled[..., :width] *= factor
            out[name] = scaled
    return out


def _our_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the ``ln_f.*`` alias folded into ``transformer_decoder.norm.*`` (the alias
    alone is taken as the norm; both must then be equal)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        canonical = _canonical(name)
        if canonical in out and not _same(out[canonical], t):
            raise ValueError(f"{name!r} differs from {canonical!r}, its alias")
        out.setdefault(canonical, t)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other has NaN (a pruned position) included."""
    if a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    return bool(torch.equal(a, b))


def _join(e: Entry, parts: list[torch.Tensor]) -> torch.Tensor:
    t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return (t.t() if e.conv1d else t).contiguous().clone()


def _convert(
    state: Mapping[str, torch.Tensor], n_layer: int, missing: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    table = entries(n_layer)
    unknown = set(state) - {n for e in table for n in e.ours}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]!r} has no place in a Hugging Face GPT-2 state dict")
    return {e.hf: _join(e, [state[n] if n in state else missing(n) for n in e.ours]) for e in table}
