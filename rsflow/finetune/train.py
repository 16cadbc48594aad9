"""Fine-tune a transformers LLaVA on Ray Train: stage 1 (projector) or stage 2 (LoRA), resumable.

Read top to bottom, in nanoGPT's order: the learning-rate schedule (``get_lr``), the batch
(``_collate``), the model (``_build_model``: freeze per stage), the optimizer, checkpoints, then
``train_loop`` (what each Ray Train worker runs) and ``run_finetune`` (the driver: launch, then the
outputs of a finished run).

Exactly-once, across worker failures and relaunches:

- Rank 0 checkpoints every ``checkpoint_every`` optimizer steps: the trainable weights, the AdamW
  and scheduler states, ``step`` and the data position (``samples`` consumed), with the config.
- The rows reach the workers in the same order and the same split on every (re)start: the dataset
  must produce the same rows in the same order each time it runs (shuffle the records with a seed
  before preparing them, as ``training/finetune.py`` does), and Ray Data runs with
  ``preserve_order`` (its ``streaming_split`` then deals blocks deterministically, ``equal=True``).
  From the second epoch on each worker mixes its rows in a local shuffle buffer seeded by ``(seed,
  epoch, rank)`` (``epoch_shuffle_steps``), which is deterministic too.
  A worker's micro-batch ``i`` of an epoch is therefore always the same rows, and a resumed run
  skips the ``(step % steps_per_epoch) * grad_accum`` micro-batches each worker had already
  consumed in that epoch (they are read and dropped, not trained on).
- Dropout is reseeded from ``(seed, step, rank)`` before every step, so a replayed step is the
  same step: a run killed and resumed ends with the same weights as one never interrupted.
- Only a checkpoint that Ray Train has registered counts: its controller polls the workers every
  ~2 s, and a checkpoint reported in the last poll interval before a failure is not registered (its
  folder stays on disk); the run then resumes from the one before.
- ``steps.csv`` (rank 0) gets one line per optimizer step; a resume first drops the lines past the
  checkpoint, so the file lists every step exactly once. Its ``rows_digest`` column (the sum over
  the step's rows, all workers, of a CRC-32 of each row's ``input_ids``; see ``row_digest``)
  lets a test prove that the rows of an epoch were each consumed once.
- ``_done.json`` is written last; relaunching a run that has it does nothing and says so.

Outputs of a finished run, under ``<output>/<name>/``: ``export/adapter/`` (peft
``save_pretrained``; stage instruct), ``export/projector.safetensors`` (the projector, transformers
names), ``export/llava_repo/`` (the same in the LLaVA repository's format), ``MODEL_CARD.md``,
``steps.csv``, ``loss.csv``, ``loss.png`` (when matplotlib is installed), ``failed_rows.json`` (rows
the data stage could not build, per reason), ``param_checksums.json`` (CRC-32 of every parameter before
training, as the base stores it, and after: what changed is exactly what trained) and ``_done.json``;
Ray Train's ``checkpoint_*`` folders sit beside them. The run-folder state files are written atomically
(temporary file + ``os.replace``), and one that cannot be read is a one-line error naming it.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from rsflow.errors import RequestError
from rsflow.finetune.config import FinetuneConfig, check_config, lora_target_regex

if TYPE_CHECKING:
    import ray.data
    import torch

logger = logging.getLogger(__name__)

DONE_MARKER: Final[str] = "_done.json"
"""Written last in the run folder; its presence makes a relaunch a no-op."""

STEPS_CSV: Final[str] = "steps.csv"
STEPS_COLUMNS: Final[tuple[str, ...]] = (
    "step",  # optimizer steps done, 1-based
    "epoch",  # 0-based pass over the data this step belongs to
    "samples",  # samples consumed by all workers so far (global_batch * step)
    "loss",  # mean token loss of the step's micro-batches, averaged over workers
    "lr",  # learning rate of the step (LoRA, or the projector in stage align)
    "projector_lr",  # learning rate of the projector group (empty when it is frozen)
    "rows_digest",  # sum of row_digest over the step's rows, all workers
    "failed_rows",  # rows with ok == False in the step (no loss from them)
    "failed_reasons",  # their reason codes, "code:count;..." (empty when none failed)
    "truncated_rows",  # rows max_length cut in the step (trained on what is left)
    "attempt",  # 1 for the first launch, +1 for every restart or relaunch
    "seconds",  # wall time of the step on rank 0
)
"""Columns of ``steps.csv``, one line per optimizer step."""

PROJECTOR_KEY: Final[str] = "multi_modal_projector"
"""Name part of the LLaVA projector's parameters (transformers ``LlavaForConditionalGeneration``)."""

FAILED_ROWS_FILE: Final[str] = "failed_rows.json"
"""Per-reason totals of the rows the data stage could not build (``ok`` False), written by ``_finish``."""

DATA_ACTOR_CPUS: Final[float] = 1.0
"""Ray logical CPUs of each data-preparation actor (``prepare_dataset``), beside the workers'."""

_OTHER_REASON = "other"
"""Code of a failed row whose reason names no ``rsflow.finetune.data.ROW_REASONS`` code."""

_STATE_FILE = "state.pt"
_META_FILE = "run_meta.json"
_CHECKSUMS_FILE = "param_checksums.json"


@dataclass(frozen=True)
class FinetuneResult:
    """What a finished (or already finished) run produced."""

    run_dir: str
    """``<output>/<name>``, absolute."""

    stage: str
    """``align`` or ``instruct``."""

    steps: int
    """Optimizer steps done in all."""

    samples: int
    """Samples consumed in all (``steps * global_batch``)."""

    final_loss: float | None
    """Loss of the last step (``steps.csv``)."""

    export_dir: str
    """``<run_dir>/export``: adapter, projector and the LLaVA-repository export."""

    checkpoint: str | None
    """The last Ray Train checkpoint folder."""

    attempts: int
    """Launches that ran steps: 1 when nothing failed."""

    duration_seconds: float
    """Wall time of this call (0 for a relaunch of a finished run)."""

    already_done: bool = False
    """True when the run had finished before this call and nothing was done."""

    failed_rows: dict[str, int] = field(default_factory=dict)
    """Rows the data stage could not build (``ok`` False, not trained on), per reason code, over all
    steps (a row read in several epochs counts in each); empty when every row trained."""


# ----------------------------------------------------------------------------------------------
# learning-rate schedule


def get_lr(step: int, config: FinetuneConfig, total_steps: int | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to 0, as the
    Hugging Face Trainer that LLaVA and GeoChat trained with sets it (``lr_scheduler_type cosine``:
    ``get_cosine_schedule_with_warmup``, stepped after each optimizer step).

    ``warmup = ceil(warmup_ratio * total)``; ``lr * step / warmup`` for ``step < warmup`` (so the first
    step of a warmup runs at 0, as theirs did), else
    ``lr * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``, which is ``lr`` right after
    warmup and stays above 0 up to the last step ``total - 1``.

    Args:
        step: optimizer steps already done.
        config: gives ``lr``, ``warmup_ratio`` and ``schedule``.
        total_steps: all optimizer steps of the run; default ``config.max_steps``.

    Returns:
        The learning rate of the LoRA group (the projector group scales it by ``projector_lr / lr``).
    """
    total = total_steps if total_steps is not None else config.max_steps
    if total < 1:
        raise ValueError("total_steps must be >= 1 (give it, or set config.max_steps)")
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return config.lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# batches


def row_digest(input_ids: Any) -> int:
    """CRC-32 of a row's ``input_ids`` as little-endian int64 bytes (``steps.csv`` ``rows_digest``)."""
    return zlib.crc32(np.ascontiguousarray(input_ids, dtype="<i8").tobytes())


def _rows(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A Ray Data numpy batch (dict of columns; ragged columns are object arrays) -> rows."""
    n = len(batch["input_ids"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _collate(
    rows: Sequence[Mapping[str, Any]], pad_id: int, *, image_token_id: int, image_tokens: int
) -> dict[str, torch.Tensor]:
    """Rows (``input_ids``, ``labels``, ``pixel_values``, ``ok``, ``has_image``) -> padded model inputs
    (:func:`rsflow.finetune.data.collate`: right padding, LLaVA's collator; ``pixel_values`` only for
    the rows with an image, absent when every row is text-only).

    A row with ``ok`` False (the data stage could not build it) is replaced by a filler row (one pad
    token + the image placeholders, every label -100, a black image), so every worker still runs the
    same number of forward passes and the row adds no loss.

    Args:
        rows: rows of the data stage.
        pad_id: the tokenizer's pad id.
        image_token_id: the model's ``image_token_index``.
        image_tokens: image placeholders per image (``image_seq_length``), for the filler row.
    """
    from rsflow.finetune.data import collate

    shape = np.asarray(rows[0]["pixel_values"]).shape
    filled = [
        row if bool(row.get("ok", True)) else {
            "input_ids": np.array([pad_id] + [image_token_id] * image_tokens, dtype=np.int64),
            "labels": np.full(1 + image_tokens, -100, dtype=np.int64),
            "pixel_values": np.zeros(shape, dtype=np.float32),
            "has_image": True,
        }
        for row in rows
    ]
    return collate(filled, pad_id)


# ----------------------------------------------------------------------------------------------
# model: load, freeze per stage


def _build_model(config: FinetuneConfig, checksums: dict[str, str] | None = None) -> Any:
    """Load the base LLaVA and leave trainable exactly what the stage trains.

    The vision tower is always frozen. ``align``: only the projector. ``instruct``: peft LoRA on
    ``lora_targets`` inside the language model (+ the projector when ``train_projector``). Trainable
    weights are float32; with ``bf16`` the frozen ones are bfloat16, else float32.

    The base is read in its own dtype (float16 for the published models) and only then cast to the
    training dtype, so that ``checksums`` (filled when given: ``_param_checksums`` of every parameter as
    the base stores it, LoRA factors as initialised) is comparable with the base's files: casting
    float16 to bfloat16 rounds, and a checksum of the cast copy says nothing about the base.
    """
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(config.base, dtype="auto")
    model.config.use_cache = False  # no KV cache in training (and none with gradient checkpointing)
    model.config.text_config.use_cache = False
    model.requires_grad_(False)
    if config.stage == "instruct":
        import warnings

        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft types it int; floats work
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_regex(config.lora_targets),
            bias="none",
            # A projector trained in stage 2 travels inside the adapter (peft saves a trainable copy and
            # puts it in place on load), so `--adapter` alone reproduces the tuned model.
            modules_to_save=[PROJECTOR_KEY] if config.train_projector else None,
        )
        with warnings.catch_warnings():
            # peft 0.21 still asks transformers 5 for the deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            model = get_peft_model(model, lora)  # freezes everything but the LoRA factors
    if config.stage == "align":
        for name, param in model.named_parameters():
            if PROJECTOR_KEY in name:
                param.requires_grad_(True)
    if checksums is not None:
        checksums.update(_param_checksums(model))
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
        elif not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)  # what from_pretrained(dtype=...) would have done
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _llava_config(model: Any) -> Any:
    """The ``LlavaConfig`` of a LLaVA, peft-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def _param_groups(model: Any, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups: (LoRA | projector) x (decayed | not). Biases and 1-D weights are not decayed."""
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_projector = PROJECTOR_KEY in name
            decayed = param.ndim >= 2
            groups.setdefault((is_projector, decayed), []).append(param)
    projector_lr = config.projector_lr if config.projector_lr is not None else config.lr
    out = []
    for (is_projector, decayed), params in sorted(groups.items()):
        lr = projector_lr if (is_projector and config.stage == "instruct") else config.lr
        out.append(
            {
                "params": params,
                "lr": lr,
                "weight_decay": config.weight_decay if decayed else 0.0,
                "name": ("projector" if is_projector else "lora") + ("" if decayed else "_no_decay"),
            }
        )
    if not out:
        raise RuntimeError("nothing to train: no parameter requires a gradient")
    return out


def _param_checksums(model: Any) -> dict[str, str]:
    """CRC-32 (hex) of every parameter's bytes, by name: the fingerprint of what changed."""
    import torch

    out = {}
    for name, param in model.named_parameters():
        data = param.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
        out[name] = f"{zlib.crc32(data.tobytes()):08x}"
    return out


def _checksums_after(
    before: Mapping[str, str], loaded: Mapping[str, str], now: Mapping[str, str]
) -> dict[str, str]:
    """``param_checksums.json``'s ``after``: a weight whose training copy is bit for bit what was loaded
    (``loaded``: checksums of the copy in the training dtype, taken at the start of this launch) gets
    its ``before`` (the base's tensor, in the base's dtype), so that "what changed is exactly what
    trained" holds against the base's files; any other gets the checksum of its trained value."""
    return {name: before.get(name, value) if loaded.get(name) == value else value for name, value in now.items()}


def _wrap(model: Any, config: FinetuneConfig) -> Any:
    """DDP or FSDP through ``ray.train.torch.prepare_model`` (moves the model to the device)."""
    import ray.train.torch

    kwargs: dict[str, Any] = {}
    if config.strategy == "fsdp":
        # Untested here (ray's FSDP needs GPUs). use_orig_params: frozen and trainable weights mix
        # in one wrapped unit; each decoder / encoder layer is its own unit.
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer_types = {
            type(inner.model.language_model.layers[0]),
            type(inner.model.vision_tower.encoder.layers[0]),
        }
        kwargs = {
            "use_orig_params": True,
            "auto_wrap_policy": functools.partial(
                transformer_auto_wrap_policy, transformer_layer_cls=layer_types
            ),
        }
    return ray.train.torch.prepare_model(
        model, parallel_strategy=config.strategy, parallel_strategy_kwargs=kwargs
    )


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------------
# checkpoints


def _state_dicts(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (unsharded) trainable weights and optimizer state keyed by parameter name, on CPU.

    A collective under FSDP: every rank calls it; rank 0 gets the tensors.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_state_dict(model, optimizer, options=options)


def _save_checkpoint(directory: Path, state: dict[str, Any], config: FinetuneConfig) -> None:
    import torch

    torch.save(state, directory / _STATE_FILE)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def _load_checkpoint(directory: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler from a checkpoint folder; return its counters."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(directory / _STATE_FILE, map_location="cpu", weights_only=False)
    trainable = {n for n, p in _unwrap(model).named_parameters() if p.requires_grad}
    missing = trainable - set(state["model"])
    if missing:
        raise RuntimeError(f"checkpoint {directory} lacks trainable weights {sorted(missing)[:5]}")
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    scheduler.load_state_dict(state["scheduler"])
    return state


# ----------------------------------------------------------------------------------------------
# run-folder files written by rank 0


def _write_pid(run_dir: Path, rank: int) -> None:
    """``workers/rank{r}.pid``: which process is which worker (for operators, and the failure test)."""
    folder = run_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file in the same folder and ``os.replace`` (as ``steps.csv``):
    a crash mid-write leaves the previous file (or none), never a truncated one that every later
    relaunch would trip over (DESIGN: no half-written file that a later run would trust)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_state(path: Path, parse: Any = json.loads) -> Any:
    """A run-folder state file (``_done.json``, ``run_meta.json``, ``param_checksums.json``,
    ``attempts.txt``) parsed with ``parse``; one that cannot be parsed (written by a version that did not
    write atomically and crashed mid-write, or edited by hand) is a ``RequestError`` naming the file."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise RequestError(str(path), (
            f"cannot be read ({type(exc).__name__}: {reason}); it was probably cut short while being written: "
            "delete it and relaunch (the run resumes from its last checkpoint)")) from None


def _parse_attempts(text: str) -> int:
    return int(text.strip() or 0)


def _next_attempt(run_dir: Path) -> int:
    path = run_dir / "attempts.txt"
    attempt = _read_state(path, _parse_attempts) + 1 if path.is_file() else 1
    _write_atomic(path, f"{attempt}\n")
    return attempt


def _reset_steps_csv(run_dir: Path, keep_through: int) -> None:
    """Keep the header and the lines of steps ``<= keep_through`` (the checkpoint resumed from)."""
    path = run_dir / STEPS_CSV
    kept: list[dict[str, str]] = []
    if path.is_file() and keep_through > 0:
        with path.open(newline="") as f:
            kept = [row for row in csv.DictReader(f) if int(row["step"]) <= keep_through]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STEPS_COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)


def _append_step(run_dir: Path, row: Mapping[str, Any]) -> None:
    with (run_dir / STEPS_CSV).open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=STEPS_COLUMNS).writerow(row)


def read_steps(run_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a run's ``steps.csv`` (strings, as written)."""
    path = Path(run_dir) / STEPS_CSV
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# the loop each Ray Train worker runs


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the model, resume or start, train, checkpoint, export (rank 0).

    Args:
        loop_config: ``{"config": FinetuneConfig.to_dict(), "steps_per_epoch", "total_steps",
            "run_dir"}`` from ``run_finetune``.
    """
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.optim.lr_scheduler import LambdaLR

    # -- who am I -------------------------------------------------------------------------------
    config = FinetuneConfig.from_dict(loop_config["config"])
    steps_per_epoch = int(loop_config["steps_per_epoch"])
    total_steps = int(loop_config["total_steps"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    master = rank == 0  # only rank 0 logs steps, saves and exports: the ranks hold the same weights
    device = ray.train.torch.get_device()
    _write_pid(run_dir, rank)

    # -- model and optimizer ----------------------------------------------------------------------
    torch.manual_seed(config.seed)  # the same LoRA init on every rank (DDP also broadcasts rank 0's)
    checksums_before: dict[str, str] = {}  # the base's tensors as stored (rank 0)
    model = _build_model(config, checksums_before if master else None)
    llava = _llava_config(model)
    pad_id = llava.text_config.pad_token_id
    pad_id = int(pad_id) if pad_id is not None else 0
    image_token_id, image_tokens = int(llava.image_token_index), int(llava.image_seq_length)
    checksums_loaded = _param_checksums(model) if master else {}  # the training copy, before any step
    model = _wrap(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    projector = [p for n, p in model.named_parameters() if p.requires_grad and PROJECTOR_KEY in n]
    optimizer = torch.optim.AdamW(_param_groups(_unwrap(model), config), betas=(0.9, 0.999), eps=1e-8)
    # LambdaLR multiplies each group's peak lr by the same factor, so the projector keeps its ratio.
    scheduler = LambdaLR(optimizer, lambda s: get_lr(s, config, total_steps) / config.lr)

    # -- scratch or resume --------------------------------------------------------------------------
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        step = 0
        if master:
            _reset_steps_csv(run_dir, keep_through=0)
            _write_atomic(run_dir / _CHECKSUMS_FILE, json.dumps({"before": checksums_before}, sort_keys=True))
            logger.info("starting %s from scratch: %d steps of %d samples", config.name, total_steps,
                        config.global_batch)
    else:
        with checkpoint.as_directory() as ckpt_dir:
            state = _load_checkpoint(Path(ckpt_dir), model, optimizer, scheduler)
        step = int(state["step"])
        if state["global_batch"] != config.global_batch or state["world_size"] != world:
            raise RuntimeError(
                f"checkpoint at step {step} was made with {state['world_size']} workers x global batch "
                f"{state['global_batch']}; resuming with {world} x {config.global_batch} would change "
                "which rows each worker skips"
            )
        if master:
            _reset_steps_csv(run_dir, keep_through=step)
            logger.info("resuming %s at step %d/%d (%d samples consumed)", config.name, step, total_steps,
                        int(state["samples"]))
    attempt = _next_attempt(run_dir) if master else 0

    # -- train ------------------------------------------------------------------------------------
    shard = ray.train.get_dataset_shard("train")
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                                 enabled=config.bf16)
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP: no all-reduce while accumulating
    pixel_dtype = _vision_dtype(model)
    micro_per_epoch = steps_per_epoch * config.grad_accum
    reasons = _reason_codes()
    n_sums = 5 + len(reasons)  # loss, supervised micro-batches, rows digest, failed rows, cut rows, per reason
    model.train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        skip = done_in_epoch * config.grad_accum  # this worker's micro-batches consumed before a restart
        sums = torch.zeros(n_sums, dtype=torch.float64)
        micro = 0
        started = time.perf_counter()
        # Epochs after the first mix each worker's rows anew, seeded: a replayed epoch is the same epoch.
        shuffle_rows = config.epoch_shuffle_steps * config.per_worker_batch * config.grad_accum if epoch else 0
        batches = shard.iter_batches(
            batch_size=config.per_worker_batch, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=shuffle_rows or None,
            local_shuffle_seed=(config.seed + 7919 * epoch + 104_729 * rank) if shuffle_rows else None,
        )
        for index, batch in enumerate(batches):
            if index < skip or index >= micro_per_epoch:
                continue  # trained on before the restart / a tail too short for a step: drain the stream
            if step >= total_steps:
                break  # max_steps reached in the middle of an epoch
            if micro == 0:
                # dropout reseeded per (step, rank): a step replayed after a restart drops the same units
                torch.manual_seed(config.seed + 1_000_003 * (step + 1) + rank)
            rows = _rows(batch)
            inputs = _collate(rows, pad_id, image_token_id=image_token_id, image_tokens=image_tokens)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            supervised = bool((inputs["labels"] != -100).any())
            last_micro = micro + 1 == config.grad_accum
            pixels = inputs.get("pixel_values")
            with contextlib.nullcontext() if last_micro else no_sync(), autocast():
                out = model(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    pixel_values=pixels.to(pixel_dtype) if pixels is not None else None,
                    labels=inputs["labels"] if supervised else None,
                )
                # a batch of failed rows only: a zero loss through the same graph keeps DDP in step
                loss = out.loss if supervised else out.logits.sum() * 0.0
                if pixels is None and projector:  # text-only rows: the projector in the graph, zero
                    loss = loss + 0.0 * sum(p.sum() for p in projector)  # gradients (DDP waits for all)
                (loss / config.grad_accum).backward()
            digest = sum(row_digest(r["input_ids"]) for r in rows)
            failed = sum(not bool(r.get("ok", True)) for r in rows)
            cut = sum(bool(r.get("truncated", False)) for r in rows)
            sums += torch.tensor([float(loss.detach()), float(supervised), float(digest), float(failed), float(cut),
                                  *_reason_counts(rows, reasons)], dtype=torch.float64)
            micro += 1
            if not last_micro:
                continue

            # one optimizer step
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            micro = 0
            if world > 1:
                dist.all_reduce(sums)  # float64 holds the digest sums exactly (< 2**53)
            loss_value = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
            if sums[1] > 0 and not math.isfinite(loss_value):  # every worker sees the same reduced sums
                raise FloatingPointError(
                    f"the loss of step {step} is {loss_value}: training diverged (lower lr, or check the data); "
                    "the weights of this step are not exported"
                )
            if int(sums[3]) == config.global_batch and step == 1:
                raise RuntimeError(
                    f"all {config.global_batch} rows of the first step failed in the data stage "
                    "(ok == False): "
                    "check base, data and image_root (absolute paths: workers have their own working "
                    "directory) and the data stage's reasons"
                )
            samples = step * config.global_batch
            if master:
                row = _step_row(step, epoch, samples, loss_value, lrs, sums, attempt, started, reasons)
                _append_step(run_dir, row)
                logger.info("step %d/%d epoch %d samples %d loss %.4f lr %s", step, total_steps, epoch,
                            samples, loss_value, row["lr"])
            sums.zero_()
            started = time.perf_counter()

            if step % config.checkpoint_every == 0 or step == total_steps:
                metrics = {"step": step, "epoch": epoch, "samples": samples, "loss": loss_value}
                model_state, optim_state = _state_dicts(model, optimizer)  # every rank (FSDP gathers)
                if master:
                    state = {
                        "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                        "step": step, "epoch": epoch, "samples": samples, "world_size": world,
                        "global_batch": config.global_batch, "steps_per_epoch": steps_per_epoch,
                        "total_steps": total_steps,
                    }
                    with tempfile.TemporaryDirectory(prefix="rsflow-ckpt-") as tmp:
                        _save_checkpoint(Path(tmp), state, config)
                        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                else:
                    ray.train.report(metrics)  # every rank reports, the checkpoint comes from rank 0
        if step < total_steps and step % steps_per_epoch != 0:
            raise RuntimeError(
                f"epoch {epoch} ended after step {step}, expected {steps_per_epoch} steps per epoch: "
                "the dataset has fewer rows than counted"
            )

    # -- export (rank 0) ----------------------------------------------------------------------------
    model_state, _ = _state_dicts(model, optimizer)
    if master:
        _export_weights(run_dir / "export", _unwrap(model), model_state, config)
        checksums_path = run_dir / _CHECKSUMS_FILE
        checksums = _read_state(checksums_path) if checksums_path.is_file() else {}
        checksums.setdefault("before", checksums_before)
        checksums["after"] = _checksums_after(checksums["before"], checksums_loaded, _param_checksums(_unwrap(model)))
        _write_atomic(checksums_path, json.dumps(checksums, sort_keys=True))
        logger.info("finished %s at step %d", config.name, step)


def _reason_codes() -> tuple[str, ...]:
    """The per-reason slots of a step's sums: every ``PrepareBatch`` code, then ``_OTHER_REASON``."""
    from rsflow.finetune.data import ROW_REASONS

    return (*ROW_REASONS, _OTHER_REASON)


def _reason_counts(rows: Sequence[Mapping[str, Any]], codes: Sequence[str]) -> list[float]:
    """Failed rows (``ok`` False) of a micro-batch per code of ``codes`` (a missing or unknown reason
    counts as the last, ``_OTHER_REASON``). Counted as numbers beside the step's other sums, so one
    all-reduce totals them over the workers."""
    from rsflow.finetune.data import reason_code

    counts = [0.0] * len(codes)
    for row in rows:
        if not bool(row.get("ok", True)):
            code = reason_code(row.get("reason"))
            counts[codes.index(code) if code in codes else len(codes) - 1] += 1.0
    return counts


def _format_reasons(counts: Mapping[str, int]) -> str:
    """``{"tokenization_mismatch": 2}`` -> ``"tokenization_mismatch:2"`` (``steps.csv`` ``failed_reasons``)."""
    return ";".join(f"{code}:{n}" for code, n in counts.items() if n)


def _parse_reasons(text: str | None) -> dict[str, int]:
    """Inverse of ``_format_reasons`` (empty or missing: none)."""
    out: dict[str, int] = {}
    for item in (text or "").split(";"):
        code, sep, n = item.rpartition(":")
        if sep and code:
            out[code] = out.get(code, 0) + int(n)
    return out


def _step_row(
    step: int, epoch: int, samples: int, loss: float, lrs: Mapping[str, float], sums: Any, attempt: int,
    started: float, reasons: Sequence[str] = (),
) -> dict[str, Any]:
    """One ``steps.csv`` line (``STEPS_COLUMNS``)."""
    lr = lrs["lora"] if "lora" in lrs else lrs["projector"]
    return {
        "step": step,
        "epoch": epoch,
        "samples": samples,
        "loss": f"{loss:.6f}",
        "lr": f"{lr:.6g}",
        "projector_lr": f"{lrs['projector']:.6g}" if "projector" in lrs else "",
        "rows_digest": int(sums[2]),
        "failed_rows": int(sums[3]),
        "failed_reasons": _format_reasons({code: int(sums[5 + k]) for k, code in enumerate(reasons)}),
        "truncated_rows": int(sums[4]),
        "attempt": attempt,
        "seconds": f"{time.perf_counter() - started:.3f}",
    }


def _vision_dtype(model: Any) -> Any:
    """dtype of the vision tower's weights (the dtype pixel values must have)."""
    inner = _unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return next(inner.model.vision_tower.parameters()).dtype


def _export_weights(
    export_dir: Path, model: Any, trainable_state: Mapping[str, Any], config: FinetuneConfig
) -> None:
    """``adapter/`` (peft ``save_pretrained``, stage instruct) and ``projector.safetensors``."""
    from safetensors.torch import save_file

    export_dir.mkdir(parents=True, exist_ok=True)
    if config.stage == "instruct":
        adapter_dir = export_dir / "adapter"
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        model.save_pretrained(adapter_dir, state_dict=dict(trainable_state), safe_serialization=True)
    projector = {
        _projector_name(name): param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if PROJECTOR_KEY in name and _ORIGINAL_MODULE not in name  # peft's frozen copy of a trained module
    }
    for name, tensor in trainable_state.items():  # the trained values (full, also under FSDP)
        if PROJECTOR_KEY in name:
            projector[_projector_name(name)] = tensor.detach().to("cpu").contiguous()
    save_file(projector, str(export_dir / "projector.safetensors"))
    if config.stage == "align":
        _export_model(export_dir / "model", projector, config)


def _export_model(model_dir: Path, projector: Mapping[str, Any], config: FinetuneConfig) -> None:
    """Stage 1's result as a complete transformers LLaVA folder (the base with the aligned projector):
    the ``base`` of stage 2, and what ``--model`` loads in the region job (stage 2's adapter then goes
    on top with ``--adapter``). Processor, tokenizer and ``rsflow.json`` come from the base.

    Every weight but the projector is the base's own tensor, bit for bit and in the base's dtype: the
    base is read again (on CPU, in its stored dtype) rather than saving the training copy, whose frozen
    weights are bfloat16 with ``bf16`` (float16 rounded: LLaVA's stage 1 saves only the projector and
    stage 2 starts from the original float16 language model). The projector (``projector``: transformers
    names, as in ``projector.safetensors``) is stored as trained, float32; loaders cast it with the rest.
    """
    from transformers import LlavaForConditionalGeneration

    from rsflow.models.formats import save_llava_hf

    if model_dir.exists():
        shutil.rmtree(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(config.base, dtype="auto")
    params = dict(model.named_parameters())
    missing = sorted(set(projector) - set(params))
    if missing:
        raise RuntimeError(f"the base {config.base} has no parameter {missing[0]} (projector names changed?)")
    for name, tensor in projector.items():
        params[name].data = tensor.detach().to("cpu").clone()
    model.config.use_cache = True
    model.config.text_config.use_cache = True
    save_llava_hf(model, model_dir)  # the published checkpoints' tensor names: --engine vllm loads it too
    base = Path(config.base)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, model_dir / name)
    card = json.loads((base / "rsflow.json").read_text()) if (base / "rsflow.json").is_file() else {}
    card.update(stage="align", trained_from=str(base), run=config.name)
    (model_dir / "rsflow.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


_ORIGINAL_MODULE = ".original_module."
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+")


def _projector_name(name: str) -> str:
    """peft / wrapper name -> ``model.multi_modal_projector.linear_1.weight`` (transformers 5 names);
    peft's ``modules_to_save.<adapter>`` level (a projector trained in stage 2) is dropped."""
    return "model." + _MODULES_TO_SAVE.sub("", name[name.index(PROJECTOR_KEY):])


# ----------------------------------------------------------------------------------------------
# the driver


def prepare_dataset(config: FinetuneConfig, data_actors: int = 1) -> tuple[ray.data.Dataset, int]:
    """The training rows of ``config.data`` as a Ray Data dataset, and how many there are.

    ``config.data`` is LLaVA conversation JSON (images under ``config.image_root``, default: the JSON's
    folder) or Parquet with image bytes (a ``.parquet`` file or a folder of them). Records that cannot
    be used are counted by reason and logged (``RecordReport``); the rest are shuffled once, seeded
    (every restart must see the same order, see ``run_finetune``), and turned into model-ready rows by
    ``PrepareBatch`` on ``data_actors`` Ray Data actors: decoding, padding to square and tokenising run
    there, not in the training loop.

    Raises:
        RequestError: (``data``) no usable record.
    """
    import numpy as np
    import ray.data

    from rsflow.finetune.data import PrepareBatch, load_llava_json, load_parquet_records, records_to_rows

    template = "plain" if config.stage == "align" else "v1"
    data = Path(config.data).expanduser()
    if data.suffix == ".parquet" or data.is_dir():
        records, report = load_parquet_records(data, template=template)
    else:
        records, report = load_llava_json(data, config.image_root or str(data.parent), template=template)
    if report.n_skipped:
        logger.warning("%s: %d records skipped: %s", data, report.n_skipped, json.dumps(report.to_dict()))
    if not records:
        raise RequestError("data", f"{data} has no usable record")
    text_only = sum(not r.has_image for r in records)
    if 0 < text_only < len(records) and config.strategy == "fsdp" and config.workers > 1:
        # a rank whose micro-batch has no image would skip the vision tower's all-gathers that the other
        # ranks run: a hang (all text, or one worker, cannot diverge)
        raise RequestError("strategy", (
            f"{data} holds {text_only} text-only records, which fsdp cannot mix with image records here (a "
            "micro-batch without an image skips the vision tower's collectives on one rank); use ddp or "
            "leave them out"))
    items = records_to_rows(records)
    if all(item.get("image_bytes") is None for item in items):
        # A column of None reaches the UDF as NaN (float32 under Ray Data); leave it out entirely.
        items = [{k: v for k, v in item.items() if k != "image_bytes"} for item in items]
    if config.shuffle:
        items = [items[i] for i in np.random.default_rng(config.seed).permutation(len(items))]
    dataset = ray.data.from_items(items).map_batches(
        PrepareBatch,
        fn_constructor_kwargs={"model_dir": config.base, "template": template, "max_length": config.max_length,
                               "truncation": config.truncation},
        compute=ray.data.ActorPoolStrategy(size=data_actors),
        num_cpus=DATA_ACTOR_CPUS,  # what check_cluster_fits counts
        batch_size=max(1, config.per_worker_batch),
    )
    return dataset, len(items)


def run_finetune(
    config: FinetuneConfig, dataset: ray.data.Dataset, *, num_rows: int | None = None, data_actors: int = 1
) -> FinetuneResult:
    """Fine-tune on Ray Train; resume a run that stopped; do nothing for a run that finished.

    Args:
        config: the run (``check_config`` is run again here, before any worker starts).
        dataset: rows with ``input_ids``, ``labels`` (int64, -100 masked), ``pixel_values`` (float32
            [3, S, S]) and ``ok``, e.g. from ``rsflow.finetune.data.PrepareBatch``. It must give the
            same rows in the same order every time it runs (it is run again after a failure):
            shuffle the records, seeded, before preparing them; no unseeded shuffle here.
        num_rows: rows in ``dataset`` when known (else ``dataset.count()`` runs the dataset once).
        data_actors: Ray Data actors preparing the rows (``prepare_dataset``), each holding
            ``DATA_ACTOR_CPUS`` beside the workers (``check_cluster_fits``).

    Returns:
        What the run produced (``already_done`` when it had finished before).

    Raises:
        RequestError: bad config, too few rows for one step, a relaunch with a different batch layout
            or training setting, a run-folder state file that cannot be read.
        ray.train.TrainingFailedError: the run failed more than ``max_failures`` times.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    check_config(config)
    run_dir = config.run_dir
    done_path = run_dir / DONE_MARKER
    if done_path.is_file():
        done = _read_state(done_path)
        differs = sorted(k for k, v in config.to_dict().items() if done.get("config", {}).get(k) != v)
        logger.warning("run %s already finished (%s): nothing to do%s", config.name, done_path,
                       f"; the config given differs in {', '.join(differs)}" if differs else "")
        return FinetuneResult(**{**done["result"], "duration_seconds": 0.0, "already_done": True})

    check_cluster_fits(config, data_actors)
    rows = int(num_rows) if num_rows is not None else dataset.count()
    steps_per_epoch = rows // config.workers // config.per_worker_batch // config.grad_accum
    if steps_per_epoch < 1:
        raise RequestError(
            "global_batch", f"{rows} rows make no whole step of {config.global_batch} samples; lower it"
        )
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    meta = {"rows": rows, "workers": config.workers, "global_batch": config.global_batch,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "seed": config.seed,
            "shuffle": config.shuffle, "epoch_shuffle_steps": config.epoch_shuffle_steps,
            "settings": {k: config.to_dict()[k] for k in RELAUNCH_SETTINGS}}
    _check_relaunch(run_dir / _META_FILE, meta)
    for name in (_CHECKSUMS_FILE, "attempts.txt"):  # read by the workers: refuse a broken one here, in one line
        if (run_dir / name).is_file():
            _read_state(run_dir / name, _parse_attempts if name.endswith(".txt") else json.loads)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / _META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    # Ray Train's default ingest options (the driver's DataContext) + preserve_order: the same rows
    # reach the same worker in the same order on every start. (Copied rather than rebuilt with
    # DataConfig.default_ingest_options(), which trips Ray's own exclude_resources deprecation.)
    ingest = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    ingest.preserve_order = True
    resources: dict[str, float] = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "steps_per_epoch": steps_per_epoch,
                           "total_steps": total_steps, "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest, enable_shard_locality=False),
    )
    logger.info("launching %s: %d workers, %d rows, %d steps (%d per epoch) of %d samples", config.name,
                config.workers, rows, total_steps, steps_per_epoch, config.global_batch)
    result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return _finish(config, checkpoint, time.perf_counter() - started, meta)


def check_cluster_fits(config: FinetuneConfig, data_actors: int = 1) -> None:
    """The training workers' and the data-preparation actors' resources against the Ray this run uses,
    before any worker starts.

    On a Ray this process runs on its own (no ``RAY_ADDRESS`` and no ``ray start`` cluster on the
    machine, or ``RAY_ADDRESS=local``) nothing can join later, and Ray Train would wait for ever for a
    worker that cannot be placed (``use_gpu: true`` without a GPU, ``cpus_per_worker: 64`` on 2 CPUs):
    that is refused. So is a layout whose workers fit but leave no whole CPU for the ``data_actors``
    actors of ``prepare_dataset`` (``DATA_ACTOR_CPUS`` each; ``workers: 2, cpus_per_worker: 1`` on 2
    CPUs): the workers start, Ray Data waits for a CPU that never frees, and the run hangs with no error.
    On a cluster (``ray job submit`` sets ``RAY_ADDRESS``; a ``ray start``/``ray up`` head) an autoscaler
    may add the nodes, so a shortfall is only logged.

    Raises:
        RequestError: ``use_gpu`` or ``cpus_per_worker`` (or ``workers``) that the local Ray cannot place.
    """
    import ray

    if not ray.is_initialized():
        ray.init()  # what Ray Data and Ray Train would start on first use (RAY_ADDRESS when set)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = 1.0 if config.use_gpu else 0.0
    fits = [min(int(node.get("CPU", 0.0) // config.cpus_per_worker),
                int(node.get("GPU", 0.0) // gpus) if gpus else config.workers) for node in nodes]
    placeable = sum(fits)
    # the workers' placement group is made first; the actors then take whole CPUs from what is left
    left, actor_room = config.workers, 0
    for node, fit in zip(nodes, fits, strict=True):
        taken = min(fit, left)
        left -= taken
        actor_room += int((node.get("CPU", 0.0) - taken * config.cpus_per_worker + 1e-9) // DATA_ACTOR_CPUS)
    if placeable >= config.workers and actor_room >= data_actors:
        return
    from rsflow.pipeline import starts_local_ray

    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    all_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    have = f"{len(nodes)} node(s), {cpus:g} CPUs, {all_gpus:g} GPUs"
    if placeable >= config.workers:
        key = "cpus_per_worker"
        spare = (cpus - data_actors * DATA_ACTOR_CPUS) / config.workers
        reason = (f"{config.workers} worker(s) of {config.cpus_per_worker:g} CPUs leave {actor_room} whole CPU(s) "
                  f"of this Ray ({have}) for the {data_actors} data-preparation actor(s) that need "
                  f"{DATA_ACTOR_CPUS:g} CPU each (--data-actors), and Ray Data would wait for ever: lower "
                  "cpus_per_worker" + (f" (e.g. {math.floor(spare * 10) / 10:g})" if spare >= 0.1 else "")
                  + " or workers")
    elif gpus and all_gpus < config.workers:
        key = "use_gpu"
        reason = (f"asks one GPU for each of {config.workers} worker(s), and this Ray has room for {placeable} "
                  f"({have}): set use_gpu: false or run on a cluster with GPUs")
    else:
        key = "cpus_per_worker"
        reason = (f"{config.workers} worker(s) of {config.cpus_per_worker:g} CPUs do not fit this Ray ({have}; "
                  f"room for {placeable}): lower cpus_per_worker or workers")

    if not starts_local_ray():  # a cluster: an autoscaler may add the nodes
        logger.warning("%s: %s; waiting for the cluster to add nodes", key, reason)
        return
    raise RequestError(key, reason)


RELAUNCH_SETTINGS: Final[tuple[str, ...]] = (
    "stage", "base", "data", "lr", "projector_lr", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm",
    "max_length", "truncation", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "train_projector", "bf16",
)
"""Config keys a relaunch must keep (``run_meta.json`` ``settings``): a resumed run restores the
optimizer's and the scheduler's state (each group's peak ``lr`` included) and the trainable weights from
its checkpoint, so a new value would not be used while the model card, the checkpoints' ``config.json``
and ``_done.json`` claimed it (``lr``), would move the schedule mid-run (``max_steps``/``epochs``, checked
as ``total_steps``), or would put the weights on another model or other rows (``base``, ``data``,
``lora_*``, ``max_length``). Keys that change neither the rows nor the arithmetic may change:
``checkpoint_every``, ``keep_checkpoints``, ``max_failures``, ``cpus_per_worker``, ``use_gpu``,
``gradient_checkpointing``, ``strategy``, ``image_root`` (the same images, elsewhere)."""


def _check_relaunch(meta_path: Path, meta: Mapping[str, Any]) -> None:
    """A resumed run must split and order its rows as before, or rows would be skipped or repeated, and
    keep every ``RELAUNCH_SETTINGS`` key (a ``run_meta.json`` written before they were recorded has no
    ``settings``: only the batch layout is checked then)."""
    if not meta_path.is_file():
        return
    before = _read_state(meta_path)
    # a run recorded before epochs were reshuffled replayed the first epoch's order (epoch_shuffle_steps 0)
    before = {"epoch_shuffle_steps": 0, **before}
    order_keys = ("rows", "workers", "global_batch", "steps_per_epoch", "seed", "shuffle")
    if int(meta["total_steps"]) > int(meta["steps_per_epoch"]):  # it orders the epochs after the first only
        order_keys += ("epoch_shuffle_steps",)
    for key in order_keys:
        if before.get(key) != meta[key]:
            raise RequestError(
                "global_batch" if key in ("workers", "global_batch", "steps_per_epoch") else key,
                f"run {meta_path.parent} was started with {key} {before.get(key)}, now {meta[key]}; "
                "resuming would change which rows are skipped: keep it, or use a new name",
            )
    if "total_steps" in before and before["total_steps"] != meta["total_steps"]:
        raise RequestError("max_steps", (
            f"run {meta_path.parent} was started for {before['total_steps']} steps, now {meta['total_steps']} "
            "(max_steps, or epochs x steps per epoch); resuming would jump the learning-rate schedule mid-run: "
            "keep it, or use a new name"))
    settings = before.get("settings")
    for key in RELAUNCH_SETTINGS if isinstance(settings, dict) else ():
        if key in settings and settings[key] != meta["settings"][key]:
            raise RequestError(key, (
                f"run {meta_path.parent} was started with {key} {settings[key]!r}, now {meta['settings'][key]!r}; "
                "resuming continues from its checkpoint (weights, optimizer and schedule state), so the new "
                "value would not be what trained: keep it, or use a new name"))


# ----------------------------------------------------------------------------------------------
# outputs of a finished run (driver)


def _finish(
    config: FinetuneConfig, checkpoint: str | None, seconds: float, meta: Mapping[str, Any]
) -> FinetuneResult:
    run_dir = config.run_dir
    export_dir = run_dir / "export"
    steps = read_steps(run_dir)
    _write_loss_files(run_dir, steps)
    failed = _report_failed_rows(config, steps)
    exported = _export_llava_repo(config, export_dir)
    result = FinetuneResult(
        run_dir=str(run_dir),
        stage=config.stage,
        steps=int(steps[-1]["step"]) if steps else 0,
        samples=int(steps[-1]["samples"]) if steps else 0,
        final_loss=float(steps[-1]["loss"]) if steps else None,
        export_dir=str(export_dir),
        checkpoint=checkpoint,
        attempts=len({row["attempt"] for row in steps}),
        duration_seconds=round(seconds, 3),
        failed_rows=failed,
    )
    _write_model_card(run_dir / "MODEL_CARD.md", config, result, steps, meta, exported)
    done = {"config": config.to_dict(), "result": asdict(result), "finished_at": time.time()}
    _write_atomic(run_dir / DONE_MARKER, json.dumps(done, indent=2, sort_keys=True) + "\n")
    logger.info("run %s done: %d steps, final loss %s, outputs in %s", config.name, result.steps,
                result.final_loss, export_dir)
    return result


def _report_failed_rows(config: FinetuneConfig, steps: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """Rows the data stage could not build, per reason, from ``steps.csv`` (which holds every step once,
    across restarts): logged at WARNING and written to ``failed_rows.json`` in the run folder, as the
    records a loader skips are (``RecordReport``), because inside the Ray Data actors the reasons are only
    logged at DEBUG and a tokenizer whose round arithmetic is off would otherwise drop every multi-turn
    sample of a run that still "succeeds"."""
    by_reason: dict[str, int] = {}
    for row in steps:
        for code, n in _parse_reasons(row.get("failed_reasons")).items():
            by_reason[code] = by_reason.get(code, 0) + n
    n_failed = sum(int(row.get("failed_rows") or 0) for row in steps)
    if n_failed > sum(by_reason.values()):  # lines written before the reasons were counted
        by_reason[_OTHER_REASON] = by_reason.get(_OTHER_REASON, 0) + n_failed - sum(by_reason.values())
    by_reason = dict(sorted(by_reason.items()))
    rows_read = int(steps[-1]["samples"]) if steps else 0
    report = {"source": f"{config.data or '(dataset given in code)'}: the data stage (PrepareBatch)",
              "rows_read": rows_read, "n_failed": n_failed, "failed": by_reason,
              "note": "rows with ok == False, not trained on; a row read in several epochs counts in each; "
                      "per step in steps.csv (failed_rows, failed_reasons)"}
    _write_atomic(config.run_dir / FAILED_ROWS_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if n_failed:
        logger.warning("%s: %d of %d rows read failed in the data stage and were not trained on (%s); see %s",
                       config.name, n_failed, rows_read, ", ".join(f"{k}: {v}" for k, v in by_reason.items()),
                       config.run_dir / FAILED_ROWS_FILE)
    return by_reason


def _write_loss_files(run_dir: Path, steps: Sequence[Mapping[str, str]]) -> None:
    with (run_dir / "loss.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "samples", "loss", "lr"])
        writer.writerows([row["step"], row["samples"], row["loss"], row["lr"]] for row in steps)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: loss.png not written (loss.csv has the numbers; "
                       "`pip install matplotlib` to get the plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in steps], [float(r["loss"]) for r in steps])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)


def _export_llava_repo(config: FinetuneConfig, export_dir: Path) -> list[str]:
    """``export/llava_repo/``: the LLaVA repository's LoRA layout (instruct), or ``mm_projector.bin``
    (align, LLaVA stage 1's output)."""
    import torch
    from safetensors.torch import load_file

    from rsflow.models.formats import export_llava_repo_lora, hf_to_llava_repo

    dst = export_dir / "llava_repo"
    if dst.exists():
        shutil.rmtree(dst)
    projector = load_file(str(export_dir / "projector.safetensors"))
    # transformers linear_1 / linear_2 = LLaVA mm_projector.0 / .2 (models.md 5.1)
    llava_names = {k: hf_to_llava_repo(k) for k in projector}
    if config.stage == "align":
        dst.mkdir(parents=True)
        torch.save({llava_names[k]: v for k, v in projector.items()}, dst / "mm_projector.bin")
        return [str(dst / "mm_projector.bin")]

    # A projector trained in stage 2 is in the adapter (modules_to_save) and lands in non_lora_trainables.bin.
    summary = export_llava_repo_lora(export_dir / "adapter", config.base, dst)
    return sorted(str(p) for p in dst.iterdir()) if summary else []


def _write_model_card(
    path: Path,
    config: FinetuneConfig,
    result: FinetuneResult,
    steps: Sequence[Mapping[str, str]],
    meta: Mapping[str, Any],
    exported: Iterable[str],
) -> None:
    what = (
        "the multimodal projector only (LLaVA stage 1)"
        if config.stage == "align"
        else f"LoRA r {config.lora_r} alpha {config.lora_alpha:g} on {', '.join(config.lora_targets)} of the "
        "language model" + (", and the projector" if config.train_projector else "; projector frozen")
    )
    first = float(steps[0]["loss"]) if steps else float("nan")
    last = result.final_loss if result.final_loss is not None else float("nan")
    lines = [
        f"# {config.name}",
        "",
        f"Fine-tuned from `{config.base}` with `rsflow.finetune` (stage `{config.stage}`).",
        "",
        "## Training",
        f"- Trained: {what}; the vision tower and every other weight are frozen "
        "(`param_checksums.json` lists what changed).",
        f"- Data: `{config.data or '(dataset given in code)'}`, images under `{config.image_root or '-'}`; "
        f"{meta['rows']} rows, {meta['steps_per_epoch']} steps per epoch.",
        f"- Batch: {config.global_batch} samples per step = {config.per_worker_batch} per worker x "
        f"{config.workers} workers x {config.grad_accum} accumulated.",
        f"- Optimiser: AdamW, lr {config.lr:g}"
        + (f", projector lr {config.projector_lr:g}" if config.projector_lr is not None else "")
        + f", weight decay {config.weight_decay:g}, warmup {config.warmup_ratio:g} of the steps then "
        f"{config.schedule}, gradient clipping {config.max_grad_norm:g}.",
        f"- Steps: {result.steps} ({result.samples} samples) in {result.attempts} attempt(s); "
        f"loss {first:.4f} at step 1, {last:.4f} "
        "at the end (`loss.csv`, `steps.csv`).",
        "- Rows the data stage could not build (not trained on): "
        + (", ".join(f"{k}: {v}" for k, v in result.failed_rows.items()) if result.failed_rows else "none")
        + f" (`{FAILED_ROWS_FILE}`).",
        f"- Wall time of the last launch: {result.duration_seconds:.1f} s.",
        "",
        "## Files",
        (
            "- `export/adapter/`: peft adapter (`PeftModel.from_pretrained(base, ...)`)"
            if config.stage == "instruct"
            else "- (no adapter: stage align trains no LoRA)"
        ),
        "- `export/projector.safetensors`: projector weights, transformers names "
        "(`load_state_dict(..., strict=False)` on a `LlavaForConditionalGeneration`)",
        *[f"- `{Path(p).relative_to(path.parent)}`" for p in exported],
        "",
        "## Config",
        "```json",
        json.dumps(config.to_dict(), indent=2, sort_keys=True),
        "```",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


__all__ = ["DONE_MARKER", "STEPS_COLUMNS", "FinetuneResult", "get_lr", "read_steps", "row_digest",
           "run_finetune", "train_loop"]
