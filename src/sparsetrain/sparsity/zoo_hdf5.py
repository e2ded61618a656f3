"""The Cerebras HDF5 checkpoint container (``cstorch.save``, the zoo's 2.x), read into the
``torch.save`` layout where h5py can; anything else is one line saying to convert on the zoo side."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch

from sparsetrain.checkpoint import is_hdf5
from sparsetrain.errors import CheckpointError


class _Mismatch(ValueError):
    """Why a container does not map (one line)."""


def read_cstorch_hdf5(path: Path | str) -> dict[str, Any]:
    """A ``cstorch.save`` HDF5 checkpoint as a dict in the ``torch.save`` layout (needs h5py).

    The container's exact layout is not public here; read is what Cerebras' documentation and
    published saver code show: the state dict flattened to dotted key paths (``model.<key>``,
    ``optimizer.state.<i>.<key>``, ``optimizer.param_groups.<g>.<key>[.<j>]``, ``global_step``), a
    dataset each (URL-quoted names at the root, or nested groups) typed by ``__H5_TYPE__`` (tensor,
    array, scalar, string, None; bf16 as 16-bit integers marked ``is_bfloat16``) or the older
    ``is_scalar`` / ``is_none`` / ``is_string``; other non-dunder attributes are scalars. The pickled
    ``__spec__`` is never unpickled. Pickled objects, tensors in external files and whatever else
    does not map raise one :class:`CheckpointError` that says to convert on the zoo side.
    """
    if not is_hdf5(path):
        raise CheckpointError(f"{path}: not an HDF5 file")
    try:
        import h5py
    except ImportError:
        raise CheckpointError(
            f"{path}: a Cerebras HDF5 checkpoint (cstorch.save); reading it needs h5py: pip install h5py"
        ) from None
    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401  (where installed: the LZ4 filter cstorch compresses with)
    try:
        with h5py.File(path, "r") as f:
            return _unflatten(_read_flat(f, h5py))
    except (_Mismatch, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(
            f"{path}: a Cerebras HDF5 checkpoint (cstorch.save) whose layout is not readable here ({why}); "
            "convert it on the zoo side with cstorch.load + torch.save"
        ) from None


# -- the HDF5 container ------------------------------------------------------------------------


def _read_flat(f: Any, h5py: Any) -> dict[str, Any]:
    """Every dataset and non-dunder attribute of an open HDF5 file, by dotted key path."""
    flat: dict[str, Any] = {}

    def attrs(obj: Any, prefix: str) -> None:
        flat.update({prefix + unquote(k): _value(v) for k, v in obj.attrs.items() if not k.startswith("__")})

    def visit(name: str, obj: Any) -> None:
        key = ".".join(unquote(p) for p in name.split("/"))
        if isinstance(obj, h5py.Group):
            attrs(obj, key + ".")
        else:
            flat[key] = _dataset(obj, key)

    attrs(f, "")
    f.visititems(visit)
    return flat


def _value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if getattr(v, "ndim", None) == 0:
        return v.item()
    return torch.from_numpy(v.copy()) if getattr(getattr(v, "dtype", None), "kind", "") in tuple("biuf") else v


def _dataset(d: Any, key: str) -> Any:
    kind = d.attrs.get("__H5_TYPE__")
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "NoneH5Type" or (kind is None and d.attrs.get("is_none", False)):
        return None
    if kind == "StringH5Type" or (kind is None and d.attrs.get("is_string", False)):
        return _value(d.attrs.get("string_value", d.attrs.get("string_val")))
    if kind not in (None, "TorchTensorH5Type", "NumpyArrayH5Type", "ScalarH5Type"):
        raise _Mismatch(f"{key!r} is a {kind}")
    if d.external or d.attrs.get("filepath") is not None or d.attrs.get("is_constructible", False):
        raise _Mismatch(f"{key!r} is stored outside the file or as a constant")
    data = d[...]
    if data.dtype.kind not in "biuf":
        raise _Mismatch(f"{key!r} holds data of type {data.dtype}")
    if kind == "ScalarH5Type" or (kind is None and d.attrs.get("is_scalar", False)):
        return data.item()
    tensor = torch.from_numpy(data.copy())
    return tensor.view(torch.bfloat16) if d.attrs.get("is_bfloat16", False) else tensor


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted key paths -> the ``torch.save`` layout: nested dicts, integer keys where the path has
    digits, lists for the param groups and their ``params``; ``model`` keys and the parameter names
    of ``optimizer.sparsity.state`` stay whole."""
    state: dict[Any, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        if parts[0] == "model":
            parts = ["model", ".".join(parts[1:])]
        elif parts[:3] == ["optimizer", "sparsity", "state"] and len(parts) > 4:
            parts = [*parts[:3], ".".join(parts[3:-1]), parts[-1]]
        node = state
        for part in parts[:-1]:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value
    model = state.get("model")
    if not isinstance(model, dict) or not model or not all(torch.is_tensor(v) for v in model.values()):
        raise _Mismatch("no 'model' entry of tensors")
    opt = state.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("param_groups"), dict):
        opt["param_groups"] = [
            {"params": [], **{k: [v[i] for i in sorted(v)] if isinstance(v, dict) else v for k, v in group.items()}}
            for _, group in sorted(opt["param_groups"].items())
        ]
    return state
