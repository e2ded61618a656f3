"""Build a :class:`~sparsetrain.training.state.Run` from params: device and processes, tokenizer,
model, checkpoint, sparsity, data, optimizer, and the compile decision.

Determinism: the model is initialised from ``runconfig.seed``; every batch is a pure function of
(seed, step), and the torch RNG state (dropout) travels in the checkpoint, so on CPU a resumed
run reproduces the uninterrupted one exactly.

Which checkpoint is loaded (:mod:`sparsetrain.training.model_dir` has the whole rule):
- none given and ``model_dir`` has checkpoints: the newest one, as a full resume (weights,
  optimizer, schedule, step, RNG, sparsity masks);
- ``--checkpoint_path`` naming one of ``model_dir``'s checkpoints: a full resume from that one (a
  rollback when it is not the newest: the later files are moved aside when training starts);
- any other ``--checkpoint_path``: a warm start -- weights only, step 0, a fresh optimizer -- into
  a model_dir without another run's checkpoints. This is the SPDF fine-tuning flow: point a new run
  at a sparse pre-training checkpoint. Evaluation loads the checkpoint given, or the newest.

A full resume continues the run; what the params change mid-run is applied and named in a warning,
what cannot carry over is refused (:mod:`sparsetrain.training.resume_checks`).

The ``sparsity:`` block is resolved against the model (which weights, with which settings) once,
right after the model is built: before a checkpoint or any data is read, so a pattern that
selects nothing fails at once; its errors name the params file.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain import data
from sparsetrain import distributed as dist
from sparsetrain.config import GroupSettings, InputParams, ModelParams, Params
from sparsetrain.config.hf_model import is_hf_dir, source_dir
from sparsetrain.config.params import as_written
from sparsetrain.errors import ConfigError
from sparsetrain.flops import flops_report
from sparsetrain.hf.load import read_hf_dir
from sparsetrain.model import GPT
from sparsetrain.optim import build_optimizer, lr_scheduler
from sparsetrain.sparsity import nan_format
from sparsetrain.sparsity.block_linear import use_block_kernels
from sparsetrain.sparsity.dynamic import DynamicSparsity
from sparsetrain.sparsity.legacy_names import from_legacy, is_legacy
from sparsetrain.sparsity.select import select_for_model
from sparsetrain.sparsity.sparsifier import sparsify
from sparsetrain.sparsity.zoo_checkpoints import (
    from_zoo_checkpoint,
    is_zoo_checkpoint,
    map_zoo_optimizer,
    read_any_checkpoint,
)
from sparsetrain.training import model_dir as run_dir
from sparsetrain.training import resume_checks
from sparsetrain.training.metrics import MetricsWriter
from sparsetrain.training.state import Run, load_training_state

log = logging.getLogger("sparsetrain")


def setup(
    params: Params, model_dir: Path, *, checkpoint_path: Path | None = None,
    train: bool = True, evaluate: bool = True, write_metrics: bool = True,
) -> Run:
    """Build tokenizer, model, sparsity, data and optimizer; load a checkpoint if there is one."""
    rc = params.runconfig
    device, info = _device_and_processes(params, train)
    if train:
        with as_written(params):
            data.check_batch_fits(params.train_input)  # before a tokenizer is trained or data read
    torch.manual_seed(rc.seed)  # the same on every rank: identical initial weights
    with as_written(params):
        tokenizer = data.load_tokenizer(params.train_input, model_dir)
        # HDF5 data is token ids already: the data's ids are checked against the model instead.
        _fit_vocab(params.model, tokenizer.vocab_size, strict=params.train_input.source != "hdf5")
    model = GPT(params.model).to(device)
    with as_written(params):
        selection = select_for_model(model, params.sparsity) if params.sparsity is not None else {}
    init_from = source_dir(params.model.init_from) if params.model.init_from else None
    start = choose_checkpoint(model_dir, checkpoint_path, train, init_from)
    path, full_resume = start.path, start.full_resume
    if start.note:
        (log.warning if start.kind == "rollback" else log.info)("%s", start.note)
    run = Run(params=params, model_dir=Path(model_dir), device=device, model=model, forward=model,
              tokenizer=tokenizer, loaded_from=path, dist=info)
    state, masks = _load_weights(run, path, full_resume)
    if state is not None and full_resume and train:
        resume_checks.check_resumable(state, path)
        run_dir.check_step_name(path, int(state["global_step"]))
        resume_checks.check_sparsity_kept(params, masks, path)
    _lineage(run, state, start)
    with as_written(params):
        _sparsify(run, masks_to_keep(params, masks, path), selection)
    with as_written(params):
        if train:
            run.train_tokens = _tokens(params.train_input, tokenizer, model_dir, params.model)
            run.data_fingerprint = data.fingerprint(run.train_tokens)
        if evaluate:
            run.eval_tokens = _tokens(params.eval_input, tokenizer, model_dir, params.model)
    if train:
        _build_optimizer(run, state if full_resume else None, path)
    if state is not None and (full_resume or not train):  # an evaluation reports the checkpoint's step
        run.step = int(state["global_step"])
    if train and state is not None and full_resume:
        _say_resume_changes(run, state, path)
    if train and run.sparsifier is not None and run.sparsifier.config is not None and run.sparsifier.config.is_dynamic:
        run.dynamic = DynamicSparsity(run.sparsifier)
        run.dynamic.load_state_dict(state.get("dynamic_sparsity") if state is not None and full_resume else None, run.step)
        run.dynamic.warn_idle(params.runconfig.max_steps)
    if state is not None and full_resume and isinstance(state.get("params"), dict) and run.sparsifier is not None:
        before = state["params"].get("sparsity")
        if before is not None and before != params.sparsity.to_params():
            log.info("%s: written with another sparsity block; this run follows the params' block (stored masks "
                     "are kept where they fit it, dynamic update counts carry on)", path)
    if info.active:
        _join_processes(run)
    count_flops(run)
    tokens_per_step = params.train_input.batch_size * (params.train_input.max_sequence_length or 0)
    done = state.get("flops_done") if state is not None and full_resume else None
    run.flops_done = float(done) if done is not None else run.flops["sparse"] * tokens_per_step * run.step
    _compile(run)
    if train and write_metrics and info.is_main and run.step < params.runconfig.max_steps:
        run_dir.settle(model_dir, run.step)  # one history: what lies after this step moves aside
    run.metrics = MetricsWriter(model_dir, enabled=write_metrics and info.is_main,
                                purge_step=run.step if train else None, run_id=run.run_id,
                                loggers=rc.loggers, run_config=params.to_dict())
    return run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runconfig.device: {name!r} asked for, but CUDA is not available here; use auto or cpu")
    return torch.device(name)


def choose_checkpoint(model_dir: Path, explicit: Path | None, train: bool = True,
                      init_from: Path | None = None) -> run_dir.Start:
    """The checkpoint to load and what loading it means: for training, the rule of
    :func:`~sparsetrain.training.model_dir.choose_start`; an evaluation reads the checkpoint given
    (or the newest, or ``init_from``'s weights) and changes nothing in model_dir."""
    if train:
        return run_dir.choose_start(model_dir, explicit, init_from)
    if explicit is not None:
        return run_dir.Start(Path(explicit), run_dir.inside(explicit, model_dir), "evaluate")
    latest = ckpt.latest_checkpoint(model_dir)
    if latest is None and init_from is not None:
        return run_dir.Start(Path(init_from), False, "evaluate")
    return run_dir.Start(latest, True, "evaluate")


def compile_enabled(setting: str | bool, device: torch.device) -> bool:
    """``runconfig.compile`` resolved: ``auto`` compiles on CUDA only."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_mode(setting: str, block_kernels: bool, distributed: bool) -> str:
    """``runconfig.compile_mode`` resolved. ``auto``: CUDA graphs (``reduce-overhead``) when layers
    run on the block-sparse kernels in a single process, because those kernels are launched from
    Python and graphs replay them without that host cost; ``default`` otherwise (dense gains
    little from graphs and pays their memory), and under DDP/FSDP, whose communication hooks run
    outside graphs."""
    if setting != "auto":
        return setting
    return "reduce-overhead" if block_kernels and not distributed else "default"


def block_kernels_apply(run: Run) -> bool:
    """Whether ``structure: block`` weights go to the block-sparse kernels: CUDA, bf16 and
    ``runconfig.sparse_kernels: auto`` (fp32 keeps them masked dense, with a warning)."""
    rc = run.params.runconfig
    if rc.sparse_kernels != "auto" or run.device.type != "cuda":
        return False
    if run.precision != "bf16":
        if any(s.structure == "block" for s in run.sparsifier.settings.values()):
            log.warning(
                "sparsity: the block-sparse kernels run in bf16; with runconfig.precision: %s the "
                "block-sparse weights train masked dense (no speedup)", rc.precision,
            )
        return False
    return True


def masks_to_keep(params: Params, masks: dict, path: Path | None) -> dict:
    """Masks recovered from the checkpoint's NaNs; none (dense fine-tuning) without a block.

    With a block, :func:`~sparsetrain.sparsity.sparsifier.sparsify` keeps each stored mask whose
    pruned count the block still asks for, makes it dense at ``sparsity: 0.0``, and draws a new
    one otherwise.
    """
    if masks and params.sparsity is None:
        pruned = sum(int((~m).sum()) for m in masks.values())
        log.info(
            "%s is sparse (%d pruned weights in %d tensors) and the params have no sparsity block: "
            "dense fine-tuning, pruned weights start at 0 and all weights train", path, pruned, len(masks),
        )
        return {}
    return masks


# -- the steps of setup ----------------------------------------------------------------------------


def _lineage(run: Run, state: dict[str, Any] | None, start: run_dir.Start) -> None:
    """The run's id, the warm start it descends from and the checkpoint a rollback branched its
    history at: a full resume carries them on (a rollback records its branch point), a fresh or
    warm start makes a new id (and records its source). Re-running an interrupted warm start or
    rollback finds them in the newest checkpoint and resumes it (``model_dir.choose_start``)."""
    if state is not None and (start.full_resume or start.kind == "evaluate"):  # eval records: that run's id
        run.run_id = str(state.get("run_id") or run_dir.new_run_id())
        run.warm_start_from = state.get("warm_start_from")
        run.branch_from = state.get("branch_from")
        if start.kind == "rollback":
            run.branch_from = {"path": str(Path(start.path).resolve()), "step": int(state["global_step"])}
        return
    run.run_id = run_dir.new_run_id()
    if state is not None:
        run.warm_start_from = {"path": str(Path(start.path).resolve()), "step": int(state["global_step"])}


def _say_resume_changes(run: Run, state: dict[str, Any], path: Path) -> None:
    """Warn about each setting of this resume that differs from the checkpoint's run."""
    saved = state.get("params") if isinstance(state.get("params"), dict) else None
    before = state.get("data_fingerprint")
    change = data.fingerprint_changes(before, run.data_fingerprint) if isinstance(before, dict) else None
    for note in resume_checks.resume_changes(saved, run.params, run.step, change, data_known=isinstance(before, dict)):
        log.warning("%s: resuming with %s", path, note)


def _device_and_processes(params: Params, train: bool) -> tuple[torch.device, dist.DistInfo]:
    """This process's device and place among the processes torchrun started."""
    device = resolve_device(params.runconfig.device)
    info = dist.init(params.runconfig.distributed, device)
    device = dist.local_device(device, info)
    if train:
        per_rank = dist.rank_slice(params.train_input.batch_size, info)
        if (per_rank.stop - per_rank.start) % params.optimizer.grad_accum_steps:
            raise ConfigError(
                f"optimizer.grad_accum_steps: {params.optimizer.grad_accum_steps} does not divide the "
                f"{per_rank.stop - per_rank.start} sequences each of {info.world_size} processes gets"
            )
    return device, info


def _fit_vocab(cfg: ModelParams, tokenizer_vocab: int, strict: bool = True) -> None:
    """``model.vocab_size``: the tokenizer's when unset, never smaller than it (``strict``)."""
    if cfg.vocab_size is None:
        cfg.vocab_size = tokenizer_vocab
    elif strict and cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})"
        )


def _load_weights(run: Run, path: Path | None, full_resume: bool) -> tuple[dict[str, Any] | None, dict]:
    """Load checkpoint ``path``'s weights into the model (NaN -> 0); returns the checkpoint and
    the masks its NaNs carry."""
    if path is None:
        return None, {}
    # A Hugging Face directory reads in our names already (sparsetrain.hf.load).
    state = read_hf_dir(path, run.model.state_dict()) if is_hf_dir(path) else _as_ours(read_any_checkpoint(path), run, path)
    ckpt.check_model_state(state["model"], run.model.state_dict(), path)
    clean, masks = nan_format.decode_state_dict(state["model"])
    run.model.load_state_dict(clean)
    log.info("loaded %s (step %d)%s", path, state["global_step"], "" if full_resume else " as a warm start at step 0")
    return state, masks


def _as_ours(state: dict[str, Any], run: Run, path: Path) -> dict[str, Any]:
    """A checkpoint of the zoo's or of our older names in our names and NaN form."""
    if is_zoo_checkpoint(state):
        # The zoo's forms (names, aliases, mask buffers, optimizer masks) as our NaN form; its
        # optimizer state waits for our optimizer, its scheduler state is not ours to load.
        zoo = from_zoo_checkpoint(state, run.model.state_dict(), path)
        for note in zoo.notes:
            if "no optimizer to map it onto yet" not in note:
                log.info("%s: %s", path, note)
        return {"model": zoo.model, "global_step": zoo.global_step, "zoo_optimizer": zoo.zoo_optimizer}
    if is_legacy(state["model"]):
        log.info("%s: written with the parameter names of before the zoo's; renamed (qkv split into q, k, v), "
                 "the optimizer state is not converted: a fresh optimizer", path)
        return {"model": from_legacy(state["model"]), "global_step": state["global_step"], "zoo_optimizer": None,
                "rng": state.get("rng", {})}
    return state


def _sparsify(run: Run, masks: dict[str, torch.Tensor], selection: dict[str, GroupSettings]) -> None:
    """Masks (kept from the checkpoint or drawn) of the ``selection``, FSDP sharding, and the
    block-sparse kernels."""
    params, model = run.params, run.model
    masks = {k: v.to(run.device) for k, v in masks.items()}
    if run.dist.mode == "fsdp":
        # Masks come from the full weights (identical on every rank), then the model is sharded
        # and the sparsifier binds each rank's slice of them.
        if params.sparsity is not None:
            pre = sparsify(model, params.sparsity, masks=masks, settings=selection)
            masks = dict(pre.masks)
            pre.detach()
        dist.shard(model, model.transformer_decoder.layers)
    if params.sparsity is None:
        return
    run.sparsifier = sparsify(model, params.sparsity, masks=masks, settings=selection)
    if block_kernels_apply(run):
        # Before the optimizer: layers that store live blocks only give it weight_blocks.
        # Under FSDP they keep dense storage (see sparsity.block_linear).
        run.block_kernel_layers = use_block_kernels(model, run.sparsifier, packed=run.dist.mode != "fsdp")


def _tokens(section: InputParams, tokenizer: data.Tokenizer, model_dir: Path, model: ModelParams) -> data.TokenStream:
    """A data section's token stream, checked against the model's vocabulary and context; a
    sequence length left to the data (None) is set from it."""
    vocab_size, max_positions = model.vocab_size, model.max_position_embeddings
    stream = data.load_tokens(section, tokenizer, model_dir)
    if section.max_sequence_length is None:  # the zoo's GPT-3 files: the HDF5 samples' length
        section.max_sequence_length = stream.seq_len
        log.info("%s.max_sequence_length: %d, the length of the data's samples", section.section, stream.seq_len)
    if section.max_sequence_length > max_positions:
        raise ConfigError(
            f"{section.section}.max_sequence_length: the data's samples hold {section.max_sequence_length} tokens, "
            f"more than model.max_position_embeddings {max_positions}"
        )
    data.check_vocab(stream, vocab_size, section.section)
    data.check_length(stream, section.max_sequence_length, section.section)
    return stream


def _build_optimizer(run: Run, resume: dict[str, Any] | None, path: Path | None) -> None:
    """Optimizer and schedule; with ``resume`` (a full resume's checkpoint) their state too."""
    params = run.params
    # Under FSDP too: the sparsifier hands each rank's PackedOptimizer the masks of its shards.
    packed = params.sparsity is not None and params.optimizer.packed_state
    run.optimizer = build_optimizer(run.model, params.optimizer, run.device, packed=packed)
    if run.sparsifier is not None:
        run.sparsifier.attach(run.optimizer)
    run.scheduler = lr_scheduler(run.optimizer, params.optimizer.learning_rate, params.runconfig.max_steps)
    if resume is not None and "zoo_optimizer" in resume:
        resume = _zoo_resume(run, resume, path)
    if resume is not None:
        saved = resume.get("params") if isinstance(resume.get("params"), dict) else None
        resume_checks.check_optimizer_kind(saved, params, path)
        template = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
        load_training_state(run, resume, path)
        resume_checks.apply_optimizer_settings(run.optimizer, template)
        if run.sparsifier is not None:
            run.sparsifier.apply()  # loaded state of a weight whose mask was redrawn: 0 where pruned now


def _zoo_resume(run: Run, resume: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """A full resume from a zoo checkpoint: its optimizer state mapped from the zoo's parameter
    order onto ours (or a fresh optimizer, said in the log), and the schedule at its step."""
    names = {id(p): n.removesuffix("_blocks") for n, p in run.model.named_parameters()}
    order = [names[id(p)] for group in run.optimizer.param_groups for p in group["params"]]
    shapes = {k: v.shape for k, v in run.model.state_dict().items()}
    notes: list[str] = []
    mapped = None
    if resume["zoo_optimizer"] is not None:
        template = run.optimizer.state_dict()["param_groups"]
        mapped = map_zoo_optimizer(resume["zoo_optimizer"], order, template, shapes, notes=notes)
        log.info("%s: optimizer state %s", path, "mapped from the zoo's parameter order" if mapped
                 else f"not loaded, a fresh optimizer ({'; '.join(notes)})")
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(int(resume["global_step"])):
            run.scheduler.step()  # LambdaLR: the learning rate is a function of the step
    return {"optimizer": mapped, "global_step": resume["global_step"], "rng": resume.get("rng", {})}


def _join_processes(run: Run) -> None:
    """Masks checked equal on every rank, the DDP wrapper, and each rank's dropout stream."""
    info, rc = run.dist, run.params.runconfig
    if run.sparsifier is not None:
        dist.check_masks_agree(run.sparsifier.masks, info, run.device)
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [run.device.index] if run.device.type == "cuda" else None
        run.ddp = DistributedDataParallel(run.model, device_ids=device_ids)
        run.forward = run.ddp
    if info.rank:  # each rank its own dropout stream; rank 0 keeps the checkpointed one
        torch.manual_seed((rc.seed * 1_000_003 + info.rank * 7_919 + run.step) % 2**63)


def count_flops(run: Run) -> None:
    """FLOPs per token from the current masks (again after every dynamic update)."""
    cfg, p = run.params.model, run.params
    seq = p.train_input.max_sequence_length or p.eval_input.max_sequence_length or cfg.max_position_embeddings
    fractions = run.sparsifier.pruned_fractions() if run.sparsifier else {}
    run.flops = flops_report(cfg, seq, fractions or None)
    # Masked-dense layers execute their dense FLOPs on a GPU; block-kernel layers skip dead blocks.
    on_kernels = {name: f for name, f in fractions.items() if name in run.block_kernel_layers}
    run.executed_flops = flops_report(cfg, seq, on_kernels or None)["sparse"]


def _compile(run: Run) -> None:
    rc = run.params.runconfig
    if not compile_enabled(rc.compile, run.device):
        return
    mode = compile_mode(rc.compile_mode, bool(run.block_kernel_layers), run.dist.active)
    why = ", for the block-sparse kernels" if mode != rc.compile_mode and mode == "reduce-overhead" else ""
    log.info("torch.compile: on (mode %s%s); the first steps compile", mode, why)
    run.forward = torch.compile(run.forward, mode=None if mode == "default" else mode)
    run.compiled = True
    run.cuda_graphs = run.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
