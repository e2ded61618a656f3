"""The params file: its sections, the typed ``sparsity:`` block, loading and validation.

    params = load_params("configs/gpt2_tiny_sparse.yaml", ["runconfig.max_steps=100"])
    params.model.hidden_size, params.sparsity.groups   # typed; the file is read and parsed once

See :mod:`~sparsetrain.config.sections` for the keys of each section,
:mod:`~sparsetrain.config.sparsity` for the ``sparsity:`` block and
:mod:`~sparsetrain.config.params` for reading and writing a params file and
:mod:`~sparsetrain.config.overrides` for ``--set`` / ``--unset``.
"""

from sparsetrain.config.overrides import apply_overrides, parse_override
from sparsetrain.config.params import SECTIONS, Params, dump_params, load_params, params_from_dict, read_yaml
from sparsetrain.config.sections import PRESETS, InputParams, ModelParams, OptimizerParams, RunConfig
from sparsetrain.config.sparsity import GroupSettings, SparsityConfig, parse_sparsity

__all__ = [
    "PRESETS",
    "SECTIONS",
    "GroupSettings",
    "InputParams",
    "ModelParams",
    "OptimizerParams",
    "Params",
    "RunConfig",
    "SparsityConfig",
    "apply_overrides",
    "dump_params",
    "load_params",
    "params_from_dict",
    "parse_override",
    "parse_sparsity",
    "read_yaml",
]
