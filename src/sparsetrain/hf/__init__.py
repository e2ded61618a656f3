"""Hugging Face GPT-2 interop: our checkpoints as ``GPT2LMHeadModel`` directories.

    from sparsetrain.hf import export_hf
    export_hf(Path("run/checkpoint_1000.mdl"), Path("gpt2_sparse"))   # from_pretrained("gpt2_sparse")

:mod:`~sparsetrain.hf.names` maps state dicts both ways (pure functions),
:mod:`~sparsetrain.hf.tokenizer` writes the tokenizer files, :mod:`~sparsetrain.hf.export` the
directory. A room on floor 6: it imports config, model, data, sparsity, checkpoint and errors;
only the command line imports it.
"""

from sparsetrain.hf.export import export_hf, hf_config
from sparsetrain.hf.names import from_hf, masks_to_hf, to_hf

__all__ = ["export_hf", "from_hf", "hf_config", "masks_to_hf", "to_hf"]
