"""The params of a run command: ``--checkpoint_path`` may name a Hugging Face directory instead of
a checkpoint file, which is ``--set model.init_from=hf:DIR`` (see :mod:`sparsetrain.config.hf_model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsetrain.config.hf_model import PREFIX, WHERE, is_hf_dir
from sparsetrain.config.overrides import FlagError
from sparsetrain.config.params import load_params
from sparsetrain.errors import ConfigError


def load_with_checkpoint_dir(params_path: Any, overrides: list[str], unset: list[str], checkpoint_path: Any):
    """``load_params`` for a command line whose ``--checkpoint_path`` may name a Hugging Face
    directory: that is ``--set model.init_from=hf:DIR``, and its errors name ``--checkpoint_path``.
    Returns the params and the checkpoint path left to load (None for such a directory)."""
    if checkpoint_path is None or not Path(checkpoint_path).is_dir():
        return load_params(params_path, overrides, unset), checkpoint_path
    if not is_hf_dir(checkpoint_path):
        raise ConfigError(f"--checkpoint_path {checkpoint_path}: is a directory without a config.json; give a checkpoint "
                          "file (checkpoint_<step>.mdl) or a Hugging Face GPT-2 directory (save_pretrained, sparsetrain export)")
    flag = f"--set {WHERE}"
    try:
        return load_params(params_path, [*overrides, f"{WHERE}={PREFIX}{checkpoint_path}"], unset), None
    except FlagError as e:
        text = str(e)
        if text.startswith(flag):
            raise FlagError(f"--checkpoint_path{text[len(flag):]}") from None
        raise
