"""The sections of a params file as dataclasses: ``train_input`` / ``eval_input``
(:class:`InputParams`), ``model`` (:class:`ModelParams`, with its named :data:`PRESETS`),
``optimizer`` (:class:`OptimizerParams`) and ``runconfig`` (:class:`RunConfig`). Each field carries
its documentation, valid choices and range (see :mod:`sparsetrain.config.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparsetrain.config.fields import setting
from sparsetrain.errors import ConfigError

# Upper bounds on model sizes, far above any real model (GPT-3 175B: width 12288, 96 layers):
# larger values overflow torch's size arithmetic or take minutes just to build the module tree.
MAX_WIDTH = 1 << 16
MAX_LAYERS = 1024
MAX_FILTER = 1 << 20
MAX_POSITIONS = 1 << 20
MAX_VOCAB = 1 << 24


@dataclass(kw_only=True)
class InputParams:
    """Where training or evaluation tokens come from, and how they are batched."""

    source: str = setting(
        "stdlib",
        "stdlib (the running Python's standard library sources) | text | jsonl | shards | hdf5 (the zoo's .h5 files)",
        choices=("stdlib", "text", "jsonl", "shards", "hdf5"),
    )
    data_path: str | None = setting(None, "file, directory or glob (text, jsonl); directory (shards)")
    data_dir: str | list | None = setting(
        None, "hdf5: a directory of .h5 files or one .h5 file, or a list of them (the zoo's data_dir)"
    )
    mixture: list | None = setting(
        None, "hdf5: datasets drawn by weight, [{data_dir, weight, data_subset}] (instead of data_dir)"
    )
    data_subset: str | None = setting(
        None, "hdf5: the part of the samples used, as fraction ranges, e.g. '0.0-0.5,0.7-1.0'"
    )
    shuffle_seed: int | None = setting(None, "seed of the batch order (default: runconfig.seed)", min=0, max=2**63 - 1)
    text_field: str = setting("text", "field of each JSON Lines record that holds the document")
    prompt_field: str | None = setting(
        None, "jsonl: the field of the prompt; given, each record is one sample, prompt then completion, "
        "and the loss counts the completion's tokens only (fine-tuning data)"
    )
    completion_field: str = setting("completion", "jsonl with prompt_field: the field of the completion")
    tokenizer: str = setting(
        "byte", "byte | bpe (trained locally, saved in model_dir) | path to tokenizer.json; "
        "eval_input: always train_input's (evaluation encodes with the model's tokenizer)",
    )
    bpe_vocab_size: int = setting(
        4096, "vocabulary size of a locally trained BPE; eval_input: always train_input's", min=257, max=MAX_VOCAB
    )
    split: str | None = setting(
        None, "train | eval | all; default: train for train_input, eval for eval_input",
        choices=("train", "eval", "all"),
    )
    eval_fraction: float = setting(0.05, "share of files (or documents) in the eval split", min=0.0, max=1.0)
    batch_size: int = setting(16, "sequences per optimizer step (all micro-batches together)", min=1)
    max_sequence_length: int | None = setting(
        128, "tokens per sequence (context length); null: the length of the hdf5 data's samples", min=1
    )
    shuffle: bool = setting(True, "random windows (true) or consecutive windows (false)")
    section: str = field(default="train_input", repr=False, metadata={"internal": True})
    # The params file's directory: a relative data path missing from the working directory is
    # looked up there (sparsetrain.data.paths). Set by load_params; never written out.
    params_dir: str | None = field(default=None, repr=False, compare=False, metadata={"internal": True})


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, max_position_embeddings=256),
    "gpt2-small": dict(hidden_size=768, num_hidden_layers=12, num_heads=12, max_position_embeddings=1024, vocab_size=50257),
    "gpt2-medium": dict(hidden_size=1024, num_hidden_layers=24, num_heads=16, max_position_embeddings=1024, vocab_size=50257),
    "gpt2-large": dict(hidden_size=1280, num_hidden_layers=36, num_heads=20, max_position_embeddings=1024, vocab_size=50257),
    "gpt2-xl": dict(hidden_size=1600, num_hidden_layers=48, num_heads=25, max_position_embeddings=1024, vocab_size=50257),
    "gpt3-xl": dict(hidden_size=2048, num_hidden_layers=24, num_heads=16, max_position_embeddings=2048, vocab_size=50257),
}


# The zoo's initializer names built here, and the keys each may carry.
INITIALIZERS: dict[str, tuple[str, ...]] = {
    "normal": ("mean", "std"),
    "truncated_normal": ("mean", "std", "a", "b"),
    "uniform": ("a", "b"),
    "constant": ("val",),
    "zeros": (),
    "ones": (),
    "xavier_uniform": ("gain",),
    "xavier_normal": ("gain",),
}


@dataclass(kw_only=True)
class ModelParams:
    """A GPT-2 / GPT-3 style decoder. Keys given beside ``preset`` override the preset."""

    preset: str | None = setting(None, "named model size", choices=tuple(PRESETS))
    init_from: str | None = setting(
        None, "hf:DIR: start from a Hugging Face GPT-2 directory on disk (its config sets the model's "
        "shape; keys given here must agree); a sparsity block takes topk masks from its weights"
    )
    hidden_size: int = setting(128, "width d", min=1, max=MAX_WIDTH)
    num_hidden_layers: int = setting(4, "number of transformer blocks", min=1, max=MAX_LAYERS)
    num_heads: int = setting(4, "attention heads; must divide hidden_size", min=1, max=MAX_WIDTH)
    filter_size: int | None = setting(None, "MLP inner width; default 4 * hidden_size", min=1, max=MAX_FILTER)
    max_position_embeddings: int = setting(256, "longest sequence the model accepts", min=1, max=MAX_POSITIONS)
    vocab_size: int | None = setting(None, "default: the tokenizer's vocabulary size", min=1, max=MAX_VOCAB)
    dropout_rate: float = setting(0.0, "dropout after embeddings, attention and MLP", min=0.0, max=1.0)
    share_embedding_weights: bool = setting(True, "tie the LM head to the token embedding")
    use_bias: bool = setting(True, "biases in linear layers and layer norms (the four keys below override it per layer)")
    use_projection_bias_in_attention: bool | None = setting(None, "biases of the q, k, v projections (default: use_bias)")
    use_ffn_bias_in_attention: bool | None = setting(None, "bias of the attention output projection (default: use_bias)")
    use_ffn_bias: bool | None = setting(None, "biases of the feed-forward layers (default: use_bias)")
    use_bias_in_output: bool = setting(False, "bias of the LM head")
    layer_norm_epsilon: float = setting(1e-5, "layer norm epsilon", min=0.0)
    nonlinearity: str = setting(
        "gelu_new", "feed-forward activation: gelu (exact, the zoo's) | gelu_new (tanh approximation, GPT-2's) | relu | silu",
        choices=("gelu", "gelu_new", "relu", "silu"),
    )
    attention_type: str = setting(
        "scaled_dot_product", "scaled_dot_product (scores / sqrt(head size)) | dot_product (unscaled)",
        choices=("scaled_dot_product", "dot_product"),
    )
    attention_dropout_rate: float | None = setting(None, "dropout on attention weights (default: dropout_rate)", min=0.0, max=1.0)
    position_embedding_type: str = setting("learned", "learned absolute position embeddings", choices=("learned",))
    initializer_range: float = setting(0.02, "std of the normal weight initialisation", min=0.0)
    initializer: str | dict | None = setting(
        None, "q/k/v and first feed-forward weights, a zoo initializer {name, mean, std, a, b} "
        "(default: normal with std initializer_range)",
    )
    output_layer_initializer: str | dict | None = setting(
        None, "attention output and second feed-forward weights (default: initializer if given, "
        "else normal with std initializer_range / sqrt(2 num_hidden_layers))",
    )
    embedding_initializer: str | dict | None = setting(
        None, "word and position embeddings (default: normal with std initializer_range)"
    )
    loss_scaling: str = setting(
        "num_tokens", "num_tokens (loss = mean over counted tokens) | batch_size (sum / sequences * loss_weight)",
        choices=("num_tokens", "batch_size"),
    )
    loss_weight: float = setting(1.0, "with loss_scaling batch_size, the factor on the summed loss", min=0.0)


@dataclass(kw_only=True)
class OptimizerParams:
    """Optimizer, learning-rate schedule, clipping and gradient accumulation."""

    optimizer_type: str = setting("AdamW", "AdamW | Adam | SGD", choices=("AdamW", "Adam", "SGD"))
    learning_rate: float | list = setting(
        1e-3,
        "a constant, or a list of schedule phases run one after another, each "
        "{scheduler: Linear | CosineDecay | Constant, initial_learning_rate, end_learning_rate, total_iters}",
    )
    weight_decay_rate: float = setting(0.0, "decoupled (AdamW) or L2 weight decay; not on norms, biases, embeddings", min=0.0)
    max_gradient_norm: float | None = setting(None, "clip the global gradient norm to this value", min=0.0)
    beta1: float = setting(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = setting(0.999, "Adam beta2", min=0.0, max=1.0)
    eps: float = setting(1e-8, "Adam epsilon", min=0.0)
    momentum: float = setting(0.0, "SGD momentum", min=0.0)
    nesterov: bool = setting(False, "SGD Nesterov momentum")
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step; must divide batch_size", min=1)
    decay_embeddings: bool = setting(
        False, "weight decay on embeddings (and a tied LM head) too: the zoo's rule, every weight but biases and norms"
    )
    packed_state: bool = setting(
        True, "with a sparsity block: keep the optimizer state of sparsified weights for kept entries only"
    )


SCHEDULERS = ("Linear", "CosineDecay", "Constant")


@dataclass(kw_only=True)
class RunConfig:
    """How long to train, how often to log, evaluate and checkpoint, and on what device."""

    max_steps: int = setting(1000, "optimizer steps to train for", min=0)
    checkpoint_steps: int = setting(0, "write a checkpoint every N steps (0: only at max_steps)", min=0)
    log_steps: int = setting(10, "log metrics every N steps", min=1)
    eval_steps: int | None = setting(None, "batches per evaluation (default: the whole eval split)", min=1)
    eval_frequency: int = setting(0, "in train_and_eval mode, evaluate every N steps (0: only at the end)", min=0)
    seed: int = setting(0, "seeds initialisation, dropout and batch sampling", min=0, max=2**63 - 1)
    keep_checkpoints: int | None = setting(None, "keep only the newest N checkpoints (default: all)", min=1)
    device: str = setting("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16", choices=("auto", "fp32", "bf16"))
    compile: str | bool = setting("auto", "torch.compile the model: auto (on CUDA only) | true | false")
    compile_mode: str = setting(
        "auto",
        "torch.compile mode: auto (reduce-overhead when layers run on the block-sparse kernels in a single "
        "process, else default) | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs",
        choices=("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    nonfinite: str = setting(
        "stop", "on a non-finite loss or gradient: stop (no checkpoint after it) | skip (drop that step's update)",
        choices=("stop", "skip"),
    )
    max_skipped_steps: int = setting(10, "with nonfinite: skip, stop after more skipped steps than this", min=0)
    distributed: str = setting(
        "auto", "under torchrun: auto (DDP when more than one process) | none | ddp | fsdp (FSDP2 fully_shard)",
        choices=("auto", "none", "ddp", "fsdp"),
    )
    attention: str = setting(
        "auto", "scaled-dot-product attention kernel to prefer: auto (PyTorch's choice) | flash | cudnn | efficient | math",
        choices=("auto", "flash", "cudnn", "efficient", "math"),
    )
    sparse_kernels: str = setting(
        "auto",
        "block-sparse weights: auto (skip dead blocks with the Triton kernels on CUDA in bf16/fp16) | off (masked dense)",
        choices=("auto", "off"),
    )
    progress: bool = setting(True, "show a progress bar on the terminal")
    model_dir: str | None = setting(None, "the model_dir when the command line gives none (the zoo's runconfig.model_dir)")
    save_initial_checkpoint: bool = setting(False, "write a checkpoint of the initial weights (step 0) before training")
    loggers: list = setting(
        ["jsonl", "tensorboard"], "where metrics go, a list of: jsonl (model_dir/metrics.jsonl, always written: "
        "resume, compare and loss.png read it) | tensorboard | wandb (offline unless WANDB_MODE says otherwise) | "
        "mlflow (MLFLOW_TRACKING_URI, default model_dir/mlruns); a name given twice counts once",
    )

    def __post_init__(self) -> None:
        self.loggers = check_loggers(self.loggers)


LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")


def check_loggers(names: list) -> list:
    """``runconfig.loggers`` with each name once, in the order given: a repeated name is harmless
    (one writer each), so it is collapsed rather than refused. metrics.jsonl is written whether
    or not ``jsonl`` is listed, since the run's own tools need it."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"runconfig.loggers: {name!r} is not valid; choose any of {', '.join(LOGGERS)}")
    return list(dict.fromkeys(names))
