"""sparsetrain: weight-sparse pre-training of GPT-style language models, then dense fine-tuning.

    import sparsetrain
    print(sparsetrain.plan(model, {"sparsity": 0.75}))            # what would be sparsified, any nn.Module
    sparsifier = sparsetrain.sparsify(model, {"sparsity": 0.75}, optimizer)

``plan``, ``sparsify``, the NaN checkpoint functions and ``PackedOptimizer`` are imported lazily
so that ``import sparsetrain`` stays cheap for the command line.
"""

__version__ = "0.1.0"

_LAZY = {
    "plan": "sparsetrain.sparsity.plans",
    "Plan": "sparsetrain.sparsity.plans",
    "sparsify": "sparsetrain.sparsity.sparsifier",
    "Sparsifier": "sparsetrain.sparsity.sparsifier",
    "save_sparse_checkpoint": "sparsetrain.sparsity.checkpoints",
    "load_sparse_checkpoint": "sparsetrain.sparsity.checkpoints",
    "use_block_kernels": "sparsetrain.sparsity.block_linear",
    "use_dense_kernels": "sparsetrain.sparsity.block_linear",
    "PackedOptimizer": "sparsetrain.optim.packed",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")
