"""``ModelSpec``: which checkpoint, adapter, prompt format and decoding settings a run uses.

A spec is a plain frozen value: building one checks only the values themselves (so it can be
created on a driver and shipped to Ray actors on other machines). Everything that looks at the
file system or the hub is in the functions below it, which read small JSON files only, never
weights:

- ``resolve_model_dir(spec)``: ``"smoke"`` -> the cached tiny checkpoint; a local folder ->
  checked to hold ``config.json``; anything else -> passed through as a hub id.
- ``resolve_adapter(spec)``: the same rule for ``adapter`` (a local folder must hold ``adapter_config.json``).
- ``model_input_size(spec)``: the image side the vision tower expects, in pixels.
- ``model_card(spec)`` / ``resolve_prompt_format(spec)``: the ``rsflow.json`` beside a checkpoint.
- ``model_id(spec)``: a stable human-readable name recorded with every answer.

Telling a local folder from a hub id: a string that exists on disk is a folder. A string that does
not exist is a hub id only if it has the hub's shape (``name`` or ``owner/name`` with letters,
digits, ``-``, ``_``, ``.``), does not start like a path (``/``, ``./``, ``../``, ``~``) and its first
component is not an existing local folder; otherwise it is reported as a missing folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from rsflow.errors import ModelError, RequestError
from rsflow.models.prompts import PROMPT_FORMATS, PromptFormat

logger = logging.getLogger(__name__)

SMOKE_MODEL: Final[str] = "smoke"
"""The ``model`` value that selects the built-in tiny random-weight checkpoint."""
DEMO_MODEL: Final[str] = "demo"
"""The packaged demo model (``rsflow.finetune.demo``): trained on one sample scene; the job's default."""
NOOP_MODEL: Final[str] = "noop"
"""No model at all: every prompt is answered with empty text at once. The whole pipeline (search, plan,
read, the model stage's slots and columns, interpret, write) runs, so this measures and tests
everything but inference: read throughput, load tests, a check that a catalog's imagery reads."""
NOOP_INPUT_SIZE: Final[int] = 336
"""Tile side the no-op model asks for when ``--image-size``/``--tile-size`` do not say (LLaVA-1.5's)."""
_NOOP_CARD: Final[dict[str, Any]] = {
    "name": NOOP_MODEL,
    "kind": "noop",
    "prompt_format": "geochat",  # every task can be asked (GeoChat's family does them all)
    "note": "no model: every answer is empty text (for benchmarks and load tests)",
}

DType = Literal["auto", "float32", "bfloat16", "float16"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]

DTYPES: Final[tuple[str, ...]] = get_args(DType)
ATTN_IMPLEMENTATIONS: Final[tuple[str, ...]] = get_args(AttnImplementation)

DEFAULT_MAX_NEW_TOKENS: Final[int] = 256
"""Default ``max_new_tokens``: GeoChat's evaluation scripts'. Generation ends at the end-of-sequence
token; the limit only cuts long answers: a LLaMA tokenizer spells every digit apart, so one GeoChat
box ``{<16><55><24><63>|<11>}`` is about 20 tokens, and the earlier default of 64 held three boxes."""

MAX_NEW_TOKENS_LIMIT: Final[int] = 8192
"""Upper bound for ``max_new_tokens`` (LLaVA-family models have 2048-4096 positions)."""

MAX_IMAGE_SIZE: Final[int] = 4096
"""Upper bound for ``image_size`` in pixels (GeoChat uses 504)."""

MIN_IMAGE_SIZE: Final[int] = 8
"""Lower bound for ``image_size`` in pixels: the smallest tile side (``--tile-size`` defaults to it)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_CARD_FILENAME = "rsflow.json"
_FINGERPRINT_FULL_BYTES = 4 << 20  # files up to 4 MiB are hashed whole
_FINGERPRINT_EDGE_BYTES = 1 << 20  # larger ones: size + first and last MiB


@dataclass(frozen=True)
class ModelSpec:
    """A vision-language checkpoint and how to run it. Values are checked on construction."""

    model: str = field(metadata={"help": "checkpoint folder, hub id, or 'smoke' for the built-in tiny model"})
    """Local checkpoint folder (transformers layout, with ``config.json``), a hub id such as
    ``llava-hf/llava-1.5-7b-hf``, or ``"smoke"`` for the built-in tiny random-weight model."""

    adapter: str | None = field(default=None, metadata={"help": "PEFT LoRA adapter folder or hub id"})
    """PEFT adapter folder (with ``adapter_config.json``) or hub id, merged into the weights at load;
    None: no adapter."""

    adapters: tuple[tuple[str, str], ...] = field(
        default=(), metadata={"help": "named PEFT adapters kept unmerged on one base: (name, folder or hub id)"}
    )
    """Named PEFT adapters loaded side by side on the base (peft named adapters, not merged), so one
    actor serves several finetunes without reloading the base; each prompt picks one by name
    (``TaskPrompt.adapter``), None meaning the bare base. Exclusive with ``adapter``."""

    vision_tower: str | None = field(
        default=None,
        metadata={"help": "local CLIP folder for original LLaVA-repository checkpoints (their mm_vision_tower)"},
    )
    """Folder of the stock CLIP (``openai/clip-vit-large-patch14-336``) that original LLaVA-repository
    checkpoints name in ``mm_vision_tower`` but do not contain; None: that key when it is a local path."""

    image_aspect: Literal["pad", "crop"] | None = field(
        default=None, metadata={"help": "pad tiles to square with the mean colour, or centre-crop"}
    )
    """``"pad"``: pad to square with the image processor's mean colour (LLaVA-1.5 ``image_aspect_ratio``
    pad); ``"crop"``: the processor's shortest-edge resize and centre crop; None: as the checkpoint's
    ``image_aspect_ratio`` (``rsflow.json``, or an original checkpoint's config) makes LLaVA's builder
    do, pad only for ``"pad"``; pad where the checkpoint has neither (a transformers-format folder)."""

    prompt_format: PromptFormat | None = field(
        default=None,
        metadata={"help": "conversation template; default: the checkpoint's rsflow.json, else llava"},
    )
    """``"llava"``, ``"rsllava"`` or ``"geochat"``; None: ``prompt_format`` of the checkpoint's
    ``rsflow.json`` if present, else ``"llava"``."""

    image_size: int | None = field(
        default=None, metadata={"help": "model input side in pixels; default: from the checkpoint"}
    )
    """Square input side in pixels fed to the vision tower; None: from the checkpoint's processor
    (crop size, then size) or, failing that, its vision config. Must equal the vision tower's size."""

    dtype: DType = field(
        default="auto",
        metadata={"help": "weight/compute dtype (auto: on CUDA the checkpoint's float16 or bfloat16, else "
                          "float16; fp32 on CPU)"},
    )
    """Parameter and compute dtype; ``"auto"``: on CUDA the checkpoint's own half precision (:func:`gpu_auto_dtype`),
    float32 on CPU."""

    attn_implementation: AttnImplementation = field(
        default="auto",
        metadata={"help": "attention kernel (auto: flash_attention_2 on CUDA if installed, else sdpa)"},
    )
    """Attention kernel; ``"auto"``: ``flash_attention_2`` on CUDA when ``flash_attn`` imports,
    else ``sdpa``."""

    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "most tokens generated per answer"})
    """Generation budget per answer, in tokens (greedy decoding stops earlier at ``</s>``)."""

    batch_size: int | None = field(
        default=None, metadata={"help": "prompts per generate call (default: from the memory free for the model)"}
    )
    """Prompts (image + question pairs) per ``generate`` call on one model replica; None: chosen by the
    replica after loading, from the memory left on its device (``runner.auto_batch_size``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise RequestError("--model", "give a checkpoint folder, a hub id, 'demo', 'smoke' or 'noop'")
        if self.model == NOOP_MODEL and (self.adapter is not None or self.adapters):
            raise RequestError("--adapter", "the no-op model takes no adapter")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter.strip()):
            raise RequestError("--adapter", "give an adapter folder or hub id, or leave it out")
        names = [name for name, _ in self.adapters] if isinstance(self.adapters, tuple) else None
        if names is None or not all(isinstance(a, tuple) and len(a) == 2 for a in self.adapters):
            raise RequestError("adapters", "give (name, path) pairs")
        if self.adapters and self.adapter is not None:
            raise RequestError("--adapter", "give either --adapter (merged) or named adapters, not both")
        for name, ref in self.adapters:
            if not isinstance(name, str) or not name.strip() or not isinstance(ref, str) or not ref.strip():
                raise RequestError("adapters", f"adapter name and path must be non-empty, got {(name, ref)!r}")
        if len(set(names)) != len(names):
            raise RequestError("adapters", f"adapter names must be unique, got {names}")
        if self.image_aspect not in (None, "pad", "crop"):
            raise RequestError("--image-aspect", f"is 'pad' or 'crop', got {self.image_aspect!r}")
        if self.vision_tower is not None and not Path(self.vision_tower).expanduser().is_dir():
            raise RequestError("--vision-tower", f"no such folder {self.vision_tower!r} (a local CLIP checkpoint)")
        if self.prompt_format is not None and self.prompt_format not in PROMPT_FORMATS:
            raise RequestError(
                "--prompt-format", f"{self.prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}"
            )
        if self.image_size is not None and not _int_in(self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE):
            raise RequestError(
                "--image-size",
                f"must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {self.image_size!r}",
            )
        if self.dtype not in DTYPES:
            raise RequestError("--dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise RequestError(
                "--attn-implementation",
                f"{self.attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}",
            )
        if not _int_in(self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT):
            raise RequestError(
                "--max-new-tokens",
                f"must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens!r}",
            )
        if self.batch_size is not None and not _int_in(self.batch_size, 1, None):
            raise RequestError("--batch-size", f"must be a positive integer, got {self.batch_size!r}")


def _int_in(value: object, low: int, high: int | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return value >= low and (high is None or value <= high)


def _looks_like_hub_id(ref: str) -> bool:
    if ref.startswith(("/", "./", "../", "~", ".\\")) or "\\" in ref or not _HUB_ID.match(ref):
        return False
    owner = ref.split("/", 1)[0]
    # "models/foo" where ./models exists is a mistyped local path, not a hub repository.
    return "/" not in ref or not Path(owner).is_dir()


def _resolve_ref(ref: str, flag: str, marker: str) -> str:
    """Local folder (checked to hold ``marker``) or hub id (passed through)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RequestError(flag, f"{ref!r} is a file; give the checkpoint folder that holds {marker}")
        if not (path / marker).is_file():
            raise RequestError(
                flag,
                f"{ref!r} has no {marker}; give a transformers LLaVA or PEFT folder, or an original "
                "LLaVA-repository checkpoint",
            )
        return str(path.resolve())
    if _looks_like_hub_id(ref):
        return ref
    raise RequestError(flag, f"no such folder {ref!r}")


def spec_from_flags(args: Any, **overrides: Any) -> ModelSpec:
    """The :class:`ModelSpec` of the model flags an ``argparse`` namespace holds (``--model``,
    ``--adapter``, ``--prompt-format``, ...); ``overrides`` replace single values (e.g. a benchmark's
    own ``max_new_tokens``)."""
    values = {
        "model": args.model,
        "adapter": args.adapter,
        "prompt_format": args.prompt_format,
        "vision_tower": args.vision_tower,
        "image_size": args.image_size,
        "image_aspect": args.image_aspect,
        "dtype": args.dtype,
        "attn_implementation": args.attn_implementation,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
    }
    values.update(overrides)
    return ModelSpec(**values)


def resolve_model_dir(spec: ModelSpec) -> str:
    """Where to load ``spec.model`` from.

    Args:
        spec: the model spec.

    Returns:
        An absolute local folder (for ``"smoke"`` the cached tiny checkpoint, built on first use; for
        ``"demo"`` the packaged demo model) or a hub id.

    Raises:
        RequestError: (``--model``) a local path that does not exist, is a file, or lacks ``config.json``.
    """
    if spec.model == NOOP_MODEL:
        return NOOP_MODEL
    if spec.model == SMOKE_MODEL:
        from rsflow.models.tiny import ensure_smoke_model

        return str(ensure_smoke_model())
    if spec.model == DEMO_MODEL:
        from rsflow.finetune.demo import demo_model_dir

        return str(demo_model_dir())
    return _resolve_ref(spec.model, "--model", "config.json")


def gpu_auto_dtype(model_dir: str) -> str:
    """What ``--dtype auto`` runs a checkpoint in on a GPU: ``"bfloat16"`` where its ``config.json`` says
    the weights are bfloat16, else ``"float16"`` (rsflow's stage-1 export keeps its base's dtype).

    The published LLaVA-1.5, GeoChat and RS-LLaVA weights are float16, and their evaluations ran in float16
    (reference models.md 5.5.6): bfloat16 keeps 3 fewer mantissa bits, so it re-rounds every weight, and a
    LoRA merged into bfloat16 weights kept about 40 % of a typical adapter's change (a rank-64 change of
    0.2 % of the weight: relative error 0.62 merged in bfloat16, 0.10 in float16).
    """
    config = _read_json(model_dir, "config.json") or {}
    for section in (config, config.get("text_config") or {}):
        saved = section.get("dtype") or section.get("torch_dtype") if isinstance(section, dict) else None
        if saved == "bfloat16":
            return "bfloat16"
        if saved is not None:
            return "float16"
    return "float16"


def resolve_adapters(spec: ModelSpec) -> tuple[tuple[str, str], ...]:
    """The named adapters with their folders checked (hub ids passed through).

    Raises:
        RequestError: (``adapters``) a local path that does not exist or lacks ``adapter_config.json``.
    """
    return tuple((name, _resolve_ref(ref, f"adapters: {name}", "adapter_config.json")) for name, ref in spec.adapters)


def resolve_adapter(spec: ModelSpec) -> str | None:
    """Where to load ``spec.adapter`` from: a checked local folder, a hub id, or None.

    Raises:
        RequestError: (``--adapter``) a local path that does not exist or lacks ``adapter_config.json``.
    """
    if spec.adapter is None:
        return None
    return _resolve_ref(spec.adapter, "--adapter", "adapter_config.json")


def _read_json(ref: str, filename: str) -> dict[str, Any] | None:
    """A JSON file of a local folder or hub repository; None when the repository has no such file."""
    local = Path(ref)
    if local.is_dir():
        path: str | None = str(local / filename) if (local / filename).is_file() else None
    else:
        from transformers.utils.hub import cached_file

        try:
            path = cached_file(
                ref,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {filename} of {ref!r}: {exc}") from exc
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {filename} of {ref!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{filename} of {ref!r} is not a JSON object")
    return data


def _side(value: Any, *keys: str) -> int | None:
    """A square side from an int or a size dict (first key present)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        for key in keys:
            if isinstance(value.get(key), int):
                return int(value[key])
    return None


def model_input_size(spec: ModelSpec) -> int:
    """The square image side, in pixels, that the model's vision tower is fed.

    Reads only JSON (no weights): ``spec.image_size`` if given; else the processor's
    ``crop_size`` (when it center-crops), then its ``size`` (``shortest_edge`` or ``height``), from
    ``preprocessor_config.json`` or the ``image_processor`` part of ``processor_config.json``; else
    ``vision_config.image_size`` of ``config.json``.

    Raises:
        RequestError: the model reference is bad (see ``resolve_model_dir``).
        ModelError: none of those files gives a size.
    """
    if spec.image_size is not None:
        check_image_size(spec)
        return spec.image_size
    if spec.model == NOOP_MODEL:
        return NOOP_INPUT_SIZE
    original = describe_original_checkpoint(spec)
    if original is not None:
        return int(original["image_size"])
    ref = resolve_model_dir(spec)
    pre = _read_json(ref, "preprocessor_config.json")
    if pre is None:
        proc = _read_json(ref, "processor_config.json") or {}
        pre = proc.get("image_processor") if isinstance(proc.get("image_processor"), dict) else None
    if pre is not None:
        crop = _side(pre.get("crop_size"), "height", "shortest_edge")
        if crop is not None and pre.get("do_center_crop", True):
            return crop
        size = _side(pre.get("size"), "shortest_edge", "height")
        if size is not None:
            return size
    config = _read_json(ref, "config.json") or {}
    vision = config.get("vision_config")
    if isinstance(vision, dict) and isinstance(vision.get("image_size"), int):
        return int(vision["image_size"])
    if not Path(ref).is_dir() and (config.get("mm_vision_tower") or config.get("mm_projector_type")):
        raise ModelError(
            f"{ref!r} is a LLaVA-repository checkpoint (model_type {config.get('model_type')!r}), which rsflow "
            "reads from a local folder with its CLIP beside it: download both (e.g. `hf download "
            f"{ref} --local-dir DIR` and `hf download {config.get('mm_vision_tower') or 'openai/clip-vit-large-patch14-336'}"
            " --local-dir CLIP_DIR`) and pass --model DIR --vision-tower CLIP_DIR, or `rsflow convert` it once"
        )
    if not Path(ref).is_dir() and not config and pre is None:
        raise ModelError(
            f"{ref!r} is no local folder, and no config.json could be read for it from the Hugging Face hub "
            "(no such repository, or no network: download it and give its folder)"
        )
    raise ModelError(f"cannot tell the input image size of {ref!r}; pass --image-size")


def check_image_size(spec: ModelSpec) -> None:
    """``--image-size``, where given, against the vision tower of a transformers-format checkpoint
    (``vision_config.image_size`` of its ``config.json``; JSON only): the model actor refuses a mismatch
    too, but only once Ray has started and tiles have been read. Nothing to check for the no-op model, an
    original LLaVA-repository checkpoint (its tower is described from its own files) or a config that
    cannot be read here.

    Raises:
        RequestError: (``--image-size``) the size is not the tower's.
    """
    if spec.image_size is None or spec.model == NOOP_MODEL or describe_original_checkpoint(spec) is not None:
        return
    vision = (_read_json(resolve_model_dir(spec), "config.json") or {}).get("vision_config")
    tower = vision.get("image_size") if isinstance(vision, dict) else None
    if isinstance(tower, int) and tower != spec.image_size:
        raise RequestError(
            "--image-size",
            f"{spec.image_size} px does not match the vision tower's {tower} px; convert the checkpoint for that "
            "size (e.g. GeoChat's interpolated position table) or leave --image-size out",
        )


def describe_original_checkpoint(spec: ModelSpec) -> dict[str, Any] | None:
    """For an original LLaVA-repository checkpoint (``--model`` full model, or ``--model BASE
    --adapter LORA``): its format, image size, prompt format and aspect handling, from its JSON
    files; None for transformers-format checkpoints and hub ids."""
    model_dir = resolve_model_dir(spec)
    if spec.model in (SMOKE_MODEL, NOOP_MODEL) or not Path(model_dir).is_dir():
        return None
    from rsflow.models.formats import describe_original

    return describe_original(model_dir, resolve_adapter(spec), vision_tower=spec.vision_tower)


def model_card(spec: ModelSpec) -> dict[str, Any]:
    """Contents of ``rsflow.json`` beside the checkpoint; for an original LLaVA-repository
    checkpoint, which has none, what its own files say (``describe_original_checkpoint``); else ``{}``."""
    if spec.model == NOOP_MODEL:
        return dict(_NOOP_CARD)
    card = _read_json(resolve_model_dir(spec), _CARD_FILENAME)
    if card is not None:
        return card
    return describe_original_checkpoint(spec) or {}



def image_aspect(spec: ModelSpec) -> Literal["pad", "crop"]:
    """How tiles reach the image processor: ``--image-aspect``; else as the checkpoint's
    ``image_aspect_ratio`` makes LLaVA's builder do (pad to a square only for ``"pad"``, any other value
    centre-crops); pad where the checkpoint says nothing (a transformers-format folder)."""
    if spec.image_aspect is not None:
        return spec.image_aspect
    return "pad" if model_card(spec).get("image_aspect_ratio", "pad") == "pad" else "crop"


def resolve_prompt_format(spec: ModelSpec) -> str:
    """``spec.prompt_format``, else the card's ``prompt_format``, else ``"llava"``.

    Raises:
        ModelError: the card names a prompt format rsflow does not know.
    """
    if spec.prompt_format is not None:
        return spec.prompt_format
    fmt = model_card(spec).get("prompt_format", "llava")
    if fmt not in PROMPT_FORMATS:
        raise ModelError(f"rsflow.json of {spec.model!r} names unknown prompt_format {fmt!r}")
    return str(fmt)


def _fingerprint(folder: Path) -> str:
    """8 hex digits identifying a checkpoint folder's files.

    Small files are hashed whole; files over 4 MiB contribute their size and first and last MiB, so
    a 14 GB checkpoint is fingerprinted in milliseconds. This is an identity tag, not an integrity check.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            if size <= _FINGERPRINT_FULL_BYTES:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_FINGERPRINT_EDGE_BYTES))
                fh.seek(size - _FINGERPRINT_EDGE_BYTES)
                digest.update(fh.read(_FINGERPRINT_EDGE_BYTES))
    return digest.hexdigest()[:8]


def _ref_name(ref: str, *, use_card: bool) -> str:
    local = Path(ref)
    if not local.is_dir():
        return ref  # hub id: the id is the name (no hub access needed)
    card = (_read_json(ref, _CARD_FILENAME) or {}) if use_card else {}
    name = card.get("name") if isinstance(card.get("name"), str) else None
    return f"{name or local.name}@{_fingerprint(local)}"


def model_id(spec: ModelSpec) -> str:
    """A stable human-readable identity of the weights a spec loads.

    Examples: ``"smoke-tiny-llava@1a2b3c4d"`` (local folder: card name or folder name, then a
    fingerprint of its files), ``"llava-hf/llava-1.5-7b-hf"`` (hub id as given), with
    ``"+adapter=<name>"`` appended when an adapter is merged; ``"noop"`` for the no-op model.
    """
    if spec.model == NOOP_MODEL:
        return NOOP_MODEL
    name = _ref_name(resolve_model_dir(spec), use_card=True)
    adapter = resolve_adapter(spec)
    if adapter is not None:
        name += f"+adapter={_ref_name(adapter, use_card=False)}"
    return name


def adapter_model_id(spec: ModelSpec, adapter_name: str | None) -> str:
    """``model_id`` of the base with one of ``spec.adapters`` active (or the bare base for None)."""
    base = model_id(spec)
    for name, ref in resolve_adapters(spec):
        if name == adapter_name:
            return f"{base}+adapter={name}:{_ref_name(ref, use_card=False)}"
    return base
