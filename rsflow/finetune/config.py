"""``FinetuneConfig``: every setting of one LLaVA fine-tuning run, as plain values (nanoGPT style).

A config is a frozen value whose construction checks only the values themselves (so it travels to
Ray Train workers as a plain dict, ``asdict``). What looks at the file system is separate:

- ``load_config(path, overrides)``: a YAML file plus ``key=value`` overrides -> a checked config;
- ``check_config(config)``: the paths exist, and every LoRA target names a module of the base's
  language model (read on the meta device: no weights are loaded). Both run on the driver, before
  any worker starts, so a typo costs one line, not a cluster start.

Batch arithmetic (LLaVA / Hugging Face ``Trainer`` meaning): one optimizer step consumes
``global_batch = per_worker_batch * workers * grad_accum`` samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal, get_args

import yaml

from rsflow.errors import RequestError
from rsflow.yamlio import load_yaml

logger = logging.getLogger(__name__)

Stage = Literal["align", "instruct"]
Strategy = Literal["ddp", "fsdp"]
Schedule = Literal["cosine"]
Truncation = Literal["expanded", "text"]

LLAMA_PROJECTIONS: Final[tuple[str, ...]] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""The seven linear projections of a LLaMA/Mistral block (LLaVA's ``find_all_linear_names``)."""

SMOKE_BASE: Final[str] = "smoke"
"""``base`` value naming the built-in tiny random-weight LLaVA (demo and wiring checks)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run of a transformers LLaVA (stage 1 ``align`` or stage 2 ``instruct``)."""

    # -- what ------------------------------------------------------------------------------------
    stage: Stage = field(
        default="instruct",
        metadata={"help": "'align': train the projector only (LLaVA stage 1); 'instruct': LoRA (stage 2)"},
    )
    """``align``: only the multimodal projector trains (LLaVA stage 1, feature alignment);
    ``instruct``: peft LoRA on the language model (+ the projector when ``train_projector``)."""

    base: str = field(default="", metadata={"help": "transformers LLaVA folder to start from"})
    """Folder of a ``LlavaForConditionalGeneration`` checkpoint (``config.json`` + weights)."""

    data: str = field(default="", metadata={"help": "training records, LLaVA conversation JSON"})
    """LLaVA-format JSON list (``id``, ``image``, ``conversations``) read by ``rsflow.finetune.data``."""

    image_root: str = field(default="", metadata={"help": "folder the records' image paths are relative to"})
    """LLaVA's ``--image_folder``; empty: paths are relative to the folder of ``data``."""


    output: str = field(default="runs", metadata={"help": "storage folder of runs (Ray Train storage_path)"})
    """Ray Train ``storage_path``; the run lives in ``<output>/<name>/``. Must be shared by all nodes."""

    name: str = field(default="finetune", metadata={"help": "run name; relaunching the same name resumes it"})
    """Ray Train run name. Relaunching with the same ``output`` and ``name`` resumes (or, when
    finished, does nothing)."""

    # -- workers and batch -----------------------------------------------------------------------
    workers: int = field(default=1, metadata={"help": "Ray Train workers (one per GPU)"})
    """Number of data-parallel workers."""

    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (NCCL); else CPU (gloo)"})
    """True: each worker gets one GPU and NCCL; False: CPU workers with gloo."""

    cpus_per_worker: float = field(default=1.0, metadata={"help": "logical CPUs reserved per worker"})
    """Ray logical CPUs per worker. Leave some CPUs free on small machines: Ray Data needs them."""

    per_worker_batch: int = field(default=1, metadata={"help": "samples per worker per forward pass"})
    """Micro-batch size per worker, in samples (HF ``per_device_train_batch_size``)."""

    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    """Gradient accumulation steps (HF ``gradient_accumulation_steps``)."""

    global_batch: int = field(default=1, metadata={"help": "samples per optimizer step, all workers"})
    """Samples per optimizer step; must equal ``per_worker_batch * workers * grad_accum``."""

    # -- optimisation ----------------------------------------------------------------------------
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (LoRA, or projector in align)"})
    """Peak AdamW learning rate of the LoRA weights (stage ``instruct``) or of the projector (``align``)."""

    projector_lr: float | None = field(
        default=None, metadata={"help": "peak learning rate of the projector (None: same as lr)"}
    )
    """LLaVA's ``mm_projector_lr``: the projector's own peak rate when it trains in stage ``instruct``."""

    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases/norms)"})
    """Decoupled weight decay; biases and 1-D weights get none (HF ``Trainer`` rule)."""

    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of all steps warming up linearly"})
    """Linear warmup length as a fraction of the total optimizer steps (rounded up)."""

    schedule: Schedule = field(default="cosine", metadata={"help": "learning-rate schedule after warmup"})
    """Decay after warmup: ``cosine`` to 0 at the last step (HF ``lr_scheduler_type cosine``)."""

    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    """Passes over the data; ignored when ``max_steps`` > 0."""

    max_steps: int = field(default=0, metadata={"help": "optimizer steps in all (0: from epochs)"})
    """Total optimizer steps; 0 means ``epochs`` full passes."""

    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0: off)"})
    """Gradient clipping threshold (HF default 1.0); 0 turns clipping off."""

    max_length: int = field(default=2048, metadata={"help": "longest training sequence, tokens (data stage)"})
    """Truncation length of a tokenized sample (LLaVA ``model_max_length``), applied by the data stage
    (``PrepareBatch(max_length=...)``), not by the training loop."""

    truncation: Truncation = field(
        default="expanded", metadata={"help": "where max_length counts: expanded (final LLaVA) or text (GeoChat)"}
    )
    """``"expanded"``: ``max_length`` counts the image features too (final LLaVA's second cut after
    splicing); ``"text"``: it counts the text with the image as one position (GeoChat's copy of LLaVA,
    whose sequences reach ``max_length - 1 + 1296``). See ``rsflow.finetune.data.Truncation``."""

    shuffle: bool = field(
        default=True, metadata={"help": "shuffle the records once, seeded, before preparing them"}
    )
    """Shuffle the records once with ``seed`` before they are prepared (``training/finetune.py``), so
    every restart sees the same order."""

    epoch_shuffle_steps: int = field(
        default=4, metadata={"help": "epochs after the first: reshuffle each worker's rows, seeded, in a buffer of "
                                     "this many steps' rows (0: every epoch in the first's order)"}
    )
    """From the second epoch on, each worker's rows pass through Ray Data's local shuffle buffer
    (``iter_batches(local_shuffle_buffer_size=...)``) of ``epoch_shuffle_steps x per_worker_batch x
    grad_accum`` rows, seeded by ``(seed, epoch, rank)``: the micro-batches of each epoch are made of other
    rows than the last's, and a restart replays the same ones. The buffer holds prepared rows, pixels
    included (about 1.35 MB a row at 336 px, 3 MB at GeoChat's 504; Ray keeps up to 1.5 times the buffer):
    ``training/configs/geochat.yaml``'s 144 rows are about 0.65 GB a worker. 0 keeps every epoch in the first
    epoch's order (``training/configs/demo.yaml``, as its packaged model was made)."""

    # -- what trains -----------------------------------------------------------------------------
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    """LoRA rank ``r`` (stage ``instruct``)."""

    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha/r)"})
    """LoRA ``alpha``; the update is scaled by ``alpha / r``."""

    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    """Dropout probability on the LoRA branch input."""

    lora_targets: tuple[str, ...] = field(
        default=LLAMA_PROJECTIONS, metadata={"help": "language-model linear layers given LoRA (leaf names)"}
    )
    """Leaf module names inside the language model (e.g. ``q_proj``); CLIP's own ``q_proj`` is never
    matched (the pattern is anchored on ``language_model``)."""

    train_projector: bool = field(
        default=False, metadata={"help": "stage instruct: also train the projector"}
    )
    """Stage ``instruct``: train the projector too (LLaVA-1.5 LoRA recipe); GeoChat keeps it frozen.
    Stage ``align`` always trains it."""

    # -- checkpoints and failures ----------------------------------------------------------------
    checkpoint_every: int = field(default=100, metadata={"help": "optimizer steps between checkpoints"})
    """Steps between checkpoints; the last step is always checkpointed."""

    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (newest)"})
    """Ray Train ``CheckpointConfig(num_to_keep=...)``."""

    max_failures: int = field(default=1, metadata={"help": "worker failures recovered from (-1: always)"})
    """Ray Train ``FailureConfig(max_failures=...)``: restarts from the last checkpoint."""

    seed: int = field(default=0, metadata={"help": "seed of LoRA init, dropout and the shuffle"})
    """Seeds torch (LoRA init, dropout) and the row shuffle."""

    # -- precision and memory --------------------------------------------------------------------
    bf16: bool = field(default=False, metadata={"help": "bfloat16 frozen weights + autocast (GPU)"})
    """Frozen weights in bfloat16 and bfloat16 autocast; trainable weights stay float32. GPU only."""

    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (memory)"})
    """Activation checkpointing in the language model (less memory, ~30 % more compute)."""

    strategy: Strategy = field(
        default="ddp", metadata={"help": "'ddp' or 'fsdp' (ray.train.torch.prepare_model)"}
    )
    """Data-parallel wrapper from ``ray.train.torch.prepare_model``: ``ddp`` (tested) or ``fsdp``
    (untested here)."""

    def __post_init__(self) -> None:
        _check_choice("stage", self.stage, get_args(Stage))
        _check_choice("strategy", self.strategy, get_args(Strategy))
        _check_choice("schedule", self.schedule, get_args(Schedule))
        _check_choice("truncation", self.truncation, get_args(Truncation))
        for name in ("workers", "per_worker_batch", "grad_accum", "global_batch", "checkpoint_every",
                     "keep_checkpoints", "max_length"):
            if getattr(self, name) < 1:
                raise RequestError(name, f"must be >= 1, got {getattr(self, name)}")
        expected = self.per_worker_batch * self.workers * self.grad_accum
        if self.global_batch != expected:
            raise RequestError(
                "global_batch",
                f"{self.global_batch} != per_worker_batch {self.per_worker_batch} x workers {self.workers}"
                f" x grad_accum {self.grad_accum} = {expected}; change one of them",
            )
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs < 1):
            raise RequestError("max_steps", "give max_steps >= 1, or max_steps 0 and epochs >= 1")
        for name in ("lr", "projector_lr", "weight_decay", "max_grad_norm", "warmup_ratio", "lora_alpha",
                     "lora_dropout", "cpus_per_worker"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise RequestError(name, f"must be a finite number, got {value!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RequestError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            raise RequestError("lr", f"must be > 0, got {self.lr}")
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise RequestError("projector_lr", f"must be > 0 or null (same as lr), got {self.projector_lr}")
        if isinstance(self.epoch_shuffle_steps, bool) or not isinstance(self.epoch_shuffle_steps, int) \
                or self.epoch_shuffle_steps < 0:
            raise RequestError("epoch_shuffle_steps", f"must be a whole number >= 0, got {self.epoch_shuffle_steps!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise RequestError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0:  # Ray Train refuses an empty bundle, after the cluster started
            raise RequestError("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise RequestError("max_failures", f"must be >= -1, got {self.max_failures}")
        if self.stage == "instruct":
            if self.lora_r < 1 or self.lora_alpha <= 0:
                raise RequestError("lora_r", f"lora_r must be >= 1 and lora_alpha > 0, got {self.lora_r}, "
                                   f"{self.lora_alpha}")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise RequestError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
            if not self.lora_targets:
                raise RequestError("lora_targets", "stage instruct needs at least one LoRA target")
            for target in self.lora_targets:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", target):
                    raise RequestError("lora_targets", f"{target!r} is not a module leaf name like 'q_proj'")
        if self.strategy == "fsdp" and not self.use_gpu:
            raise RequestError("strategy", "fsdp needs use_gpu: true (Ray Train's FSDP is GPU-only)")
        if self.bf16 and not self.use_gpu:
            raise RequestError("bf16", "needs use_gpu: true (bfloat16 training on CPU is slow and untested)")
        if not self.name or "/" in self.name:
            raise RequestError("name", f"must be a non-empty folder name, got {self.name!r}")

    @property
    def run_dir(self) -> Path:
        """``<output>/<name>``: Ray Train's run folder, which also holds this run's logs and exports."""
        return Path(self.output).expanduser().resolve() / self.name

    @property
    def trains_projector(self) -> bool:
        """Whether the projector's weights change in this run."""
        return self.stage == "align" or self.train_projector

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists), for Ray, checkpoints and the model card."""
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Inverse of ``to_dict``; unknown keys raise ``RequestError`` naming them."""
        return cls(**_coerce_all(values))


_PATH_KEYS: Final[tuple[str, ...]] = ("base", "data", "image_root", "output")


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise RequestError(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


_FIELDS: Final[dict[str, Any]] = {f.name: f for f in fields(FinetuneConfig)}
_TYPES: Final[dict[str, Any]] = typing.get_type_hints(FinetuneConfig)


def _coerce(name: str, value: Any) -> Any:
    """One YAML/override value -> the field's type (YAML 1.1 reads ``2e-4`` as a string)."""
    hint = _TYPES[name]
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.strip().lower() in ("true", "yes", "1")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if origin is Literal or hint is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise RequestError(name, f"expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _coerce_all(values: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown config key (known: {', '.join(sorted(_FIELDS))})")
    return {k: _coerce(k, v) for k, v in values.items()}


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "workers=2"]`` -> ``{"lr": "1e-4", "workers": 2}`` (YAML scalars; types come later)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not key:
            raise RequestError(item, "overrides are key=value, e.g. lr=1e-4")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:  # "base=..." (a YAML document end), "targets=[q_proj"
            reason = " ".join(str(exc).split())
            raise RequestError(key, f"the override value {text!r} is not a YAML scalar or list ({reason})") from None
    return out


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    defaults: dict[str, Any] | None = None,
    check: bool = True,
) -> FinetuneConfig:
    """Read a YAML config, apply ``key=value`` overrides, check values, paths and LoRA targets.

    Relative paths in the file (``base``, ``data``, ``image_root``, ``output``) are
    relative to the current directory, as on the command line. ``base: smoke`` is the built-in tiny
    random-weight LLaVA (``rsflow.models.tiny.ensure_smoke_model``), for wiring checks.

    Args:
        path: YAML mapping of ``FinetuneConfig`` fields.
        overrides: ``key=value`` strings applied after the file (values parsed as YAML scalars).
        defaults: values used where neither the file nor an override sets the key.
        check: also run ``check_config`` (files exist, LoRA targets match the base).

    Returns:
        The checked config.

    Raises:
        RequestError: unreadable file, unknown key, bad value, missing file, LoRA target matching
            nothing; the message names the key.
    """
    config_path = Path(path).expanduser()
    if not config_path.is_file():
        raise RequestError("--config", f"{config_path} does not exist")
    try:
        values = load_yaml(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RequestError("--config", f"{config_path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise RequestError("--config", f"{config_path} must hold a mapping of config keys")
    values = {**(defaults or {}), **values, **parse_overrides(list(overrides or []))}
    if values.get("base") == SMOKE_BASE:
        from rsflow.models.tiny import ensure_smoke_model

        values["base"] = str(ensure_smoke_model())
    output = values.get("output", "runs")
    if not isinstance(output, str) or not output.strip():
        raise RequestError("output", "give the folder runs are stored in (shared by every node of the cluster)")
    if "://" in output:  # Path() would make s3://b/runs the local folder <cwd>/s3:/b/runs
        raise RequestError("output", f"{output!r} is a URL: runs are stored in a folder of a filesystem every node "
                                     "mounts (NFS, a Filestore/EFS volume), e.g. /shared/runs")
    for key in _PATH_KEYS:  # Ray workers and actors do not share the driver's working directory
        if isinstance(values.get(key), str) and values[key]:
            values[key] = str(Path(values[key]).expanduser().resolve())
    config = FinetuneConfig.from_dict(values)
    if check:
        if not config.data:
            raise RequestError("data", "is required: the training records (LLaVA conversation JSON)")
        check_config(config)
    return config


def check_config(config: FinetuneConfig) -> None:
    """Checks that need the file system, done on the driver before any worker starts.

    Raises:
        RequestError: ``base`` is not a transformers LLaVA folder; ``data``/``image_root``
            set but missing; a LoRA target matching no language-model module of ``base``.
    """
    if not config.base:
        raise RequestError("base", "is required: a transformers LLaVA folder (config.json + weights)")
    base = Path(config.base).expanduser()
    if not (base / "config.json").is_file():
        raise RequestError("base", f"{base} is not a transformers model folder (no config.json)")
    _check_base_format(base)
    if config.data and not Path(config.data).expanduser().exists():
        raise RequestError("data", f"{Path(config.data).expanduser()} does not exist (a JSON file, or Parquet)")
    if config.image_root and not Path(config.image_root).expanduser().is_dir():
        raise RequestError("image_root", f"{Path(config.image_root).expanduser()} does not exist (a folder)")
    output = Path(config.output).expanduser()
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir():
        raise RequestError("output", f"cannot store runs in {output}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise RequestError("output", f"cannot store runs in {output}: {existing} is not writable")
    _check_max_length(config, base)
    if config.stage == "instruct":
        names = language_model_linear_names(base)
        for target in config.lora_targets:
            if not any(n.rsplit(".", 1)[-1] == target for n in names):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
                raise RequestError(
                    "lora_targets",
                    f"{target!r} matches no linear layer of the language model in {base} "
                    f"(it has: {', '.join(leaves)})",
                )


def _check_base_format(base: Path) -> None:
    """A base in a format ``rsflow convert`` turns into a transformers LLaVA is named as such: reading it
    with transformers fails with "does not recognize this architecture ... upgrade transformers"
    (``model_type: llava_llama``, the format of every published LLaVA/GeoChat checkpoint), which sends
    the user the wrong way. Other folders are left to the checks that follow."""
    from rsflow.models.formats import _has_mm_keys, _is_llava_repo_config, detect_format

    try:
        fmt = detect_format(base, flag="base")
    except RequestError:  # e.g. a LLaVA-repo config whose weights are missing: still say what it is
        try:
            raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # the transformers read below says what is wrong
        if not isinstance(raw, dict) or raw.get("model_type") == "llava" or not (
                _is_llava_repo_config(raw) or _has_mm_keys(raw)):
            return
        fmt = "llava-repo"
    if fmt == "hf-llava":
        return
    how = {
        "llava-repo": "a model in the original LLaVA repository's format",
        "llava-repo-lora": "a LoRA adapter in the original LLaVA repository's format",
        "peft": "a peft adapter, not a model",
        "bare-lm": "a language model without a vision tower",
    }.get(fmt, f"a {fmt!r} folder")
    if fmt == "peft":
        raise RequestError("base", f"{base} is {how}: give the transformers LLaVA it was trained on as base")
    raise RequestError("base", (
        f"{base} is {how}, not a transformers LLaVA: convert it first with `rsflow convert {base} DST` "
        "(GeoChat's stage-2 base, LLaVA-v1.5-7B at 504 px with LLaVA's stage-1 projector: add "
        "`--image-size 504 --projector mm_projector.bin`, see training/configs/geochat.yaml) and set base to DST"))


def _check_max_length(config: FinetuneConfig, base: Path) -> None:
    """``max_length`` must hold the shortest sample the stage's template can make: the template's own
    tokens, the image span (counted when ``truncation`` is ``expanded``: ``(image_size / patch_size)^2``
    features per image, 576 at 336 px, 1296 for GeoChat's 504 px) and one supervised token. Below that
    every row of the run becomes ``no_supervised_tokens`` inside the Ray Data actors and the run starts a
    cluster to fail there (GeoChat's 1296 image tokens with ``max_length: 1024`` and ``expanded``)."""
    from transformers import AutoConfig, AutoTokenizer

    from rsflow.finetune.data import IGNORE_INDEX, _layout, tokenize_with_labels

    try:
        hf_config = AutoConfig.from_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
        layout = _layout(hf_config, tokenizer, None)
        template = "plain" if config.stage == "align" else "v1"
        shortest = [{"from": "human", "value": "<image>\nA"}, {"from": "gpt", "value": "A"}]
        sample = tokenize_with_labels(shortest, tokenizer, template=template, max_length=1 << 30,
                                      image_token_id=layout.image_token_id, n_image_tokens=layout.n_image_tokens,
                                      truncation=config.truncation)
    except Exception as exc:  # noqa: BLE001 - no tokenizer or an odd config: the other checks and the data stage say
        logger.debug("max_length not checked against %s: %s", base, exc)
        return
    first = next(k for k, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    image = layout.n_image_tokens if config.truncation == "expanded" else 1
    need = first + 1 - (layout.n_image_tokens - 1 if config.truncation == "text" else 0)
    if config.max_length < need:
        raise RequestError("max_length", (
            f"{config.max_length} cannot hold even a one-word sample of stage {config.stage}: with truncation "
            f"{config.truncation!r} it counts {image} image position(s) of {base} "
            f"({layout.n_image_tokens} image tokens at {layout.image_size} px) and the template's tokens, "
            f"{need} up to and with the first supervised one; every row would fail in the data stage "
            "(no_supervised_tokens): raise max_length"
            + (" (or use truncation: text, GeoChat's)" if config.truncation == "expanded" else "")))


def language_model_linear_names(base: str | Path) -> list[str]:
    """Names of the language model's ``nn.Linear`` modules of a LLaVA folder, built on the meta device.

    Only ``config.json`` is read; no weight is loaded or allocated.
    """
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    try:
        hf_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise RequestError("base", f"{base}: cannot read its config.json: {exc}".replace("\n", " ")) from None
    if getattr(hf_config, "model_type", None) != "llava":
        raise RequestError(
            "base", f"{base} is a {hf_config.model_type!r} model, expected a transformers LLaVA"
        )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config)
    anywhere_in_lm = lora_target_regex(("[A-Za-z0-9_]+",), escape=False)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and re.fullmatch(anywhere_in_lm, name)
    ]


def lora_target_regex(targets: tuple[str, ...] | list[str], *, escape: bool = True) -> str:
    """peft ``target_modules`` pattern for ``targets`` inside the language model only.

    peft full-matches a string pattern against module names, so ``q_proj`` of CLIP's attention (under
    ``vision_tower``) stays out and ``lm_head`` (not under ``language_model``) too.
    """
    leaves = [re.escape(t) for t in targets] if escape else list(targets)
    return r"(.*\.)?language_model\..*\.(" + "|".join(leaves) + r")"


__all__ = [
    "LLAMA_PROJECTIONS",
    "SMOKE_BASE",
    "FinetuneConfig",
    "check_config",
    "language_model_linear_names",
    "load_config",
    "lora_target_regex",
    "parse_overrides",
]
