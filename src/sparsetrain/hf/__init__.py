"""Hugging Face GPT-2 interop: our checkpoints as ``GPT2LMHeadModel`` directories, and such
directories (ours or any GPT-2's) as the start of a run (``model.init_from: hf:DIR``).

    from sparsetrain.hf import export_hf
    export_hf(Path("run/checkpoint_1000.mdl"), Path("gpt2_sparse"))   # from_pretrained("gpt2_sparse")

:mod:`~sparsetrain.hf.names` maps state dicts both ways (pure functions),
:mod:`~sparsetrain.hf.tokenizer` writes the tokenizer files, :mod:`~sparsetrain.hf.export` the
directory, :mod:`~sparsetrain.hf.load` reads one back as a checkpoint (the model keys it sets are
parsed with the params, in :mod:`sparsetrain.config.hf_model`). A room on floor 5: it imports
config, model, data, sparsity, checkpoint and errors; training and the command line import it.
Nothing here imports transformers.
"""

from sparsetrain.hf.export import export_hf, hf_config
from sparsetrain.hf.load import read_hf_dir
from sparsetrain.hf.names import from_hf, masks_from_hf, masks_to_hf, to_hf

__all__ = ["export_hf", "from_hf", "hf_config", "masks_from_hf", "masks_to_hf", "read_hf_dir", "to_hf"]
