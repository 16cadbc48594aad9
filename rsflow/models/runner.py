"""Load a LLaVA-family checkpoint once and answer prompts about image chips in batches.

``ModelRunner`` is the Ray Data actor class of the infer stage (``pipeline.py`` wires it up with
``map_batches(ModelRunner, fn_constructor_kwargs={"spec": ..., "prompts": [...]}, ...)``), but it
is plain Python: tests call it directly on a dict of numpy arrays.

Batch contract of ``ModelRunner.__call__``:

Input columns (all of length B):
    ``tile_id`` (str), ``image`` (uint8 ``[B, H, W, 3]``, or an object array of ``H x W x 3`` uint8
    arrays when sizes differ), ``status`` (``"ok"``, ``"skipped"`` or ``"failed"``), ``error``
    (str or None; optional), ``region_boxes`` (optional: per row a list of
    ``[region_id, x1, y1, x2, y2]``, or of mappings with those five keys, the box in integers on
    the tile's 0-100 grid; an empty list or None means no region; a geochat-family model only),
    ``row_prompts`` (optional, with ``ModelRunner(..., row_prompts=True)``: per row a list of
    mappings ``{"task", "prompt", "key"}``, prompts asked of that row only, e.g. a benchmark's
    questions about one image, ``key`` naming the sample), plus any other columns.
Output columns (one row per (input row, prompt); row order: input row, then the constructor's
prompts in order, then that row's own prompts in order, then its regions in order; a row with no
prompt at all, which only a region-caption-only job can have (or a row with an empty
``row_prompts``), still gives one row, with ``task``, ``prompt``, ``prompt_key``,
``region_id`` and ``text`` None and its status passed through):
    every input column except ``image``, repeated per prompt (``status`` and ``error`` updated),
    ``task`` (str), ``prompt`` (the user text, not the full template; None for a region whose box
    is malformed), ``prompt_key`` (``TaskPrompt.key``: the question, class list, category,
    expression or region id; ``""`` for caption), ``region_id`` (str for region-caption rows, else
    None), ``text`` (the answer, or None), ``status`` (``"ok"`` or the input's non-ok status, or
    ``"failed"`` when this stage failed), ``error`` (None, the input's error, or
    ``"ExceptionType: message"``), ``model_id`` (str), ``stage`` (``"infer"`` for rows this stage
    worked on, else the input's ``stage`` or None) and ``infer_seconds`` (float: this row's share of
    the wall time spent encoding its tile and generating its answer; 0.0 for rows passed through).
Strings are numpy object arrays. A failure on one row never raises and never drops a row (a
missing column, or region boxes sent to a model that cannot caption regions, is a wiring bug and
raises).

How a batch is answered: each ok tile is padded to a square and encoded ONCE (vision tower +
projector, ``get_image_features``); every prompt asked of that tile reuses the features, spliced
into the prompt's input embeddings at its ``<image>`` token positions. Prompts are then sorted by
token length, so each ``generate`` call of ``batch_size`` prompts pads little, and their
answers are put back in output order. ``batch_size`` is ``spec.batch_size``, or when that is None
what :func:`auto_batch_size` finds room for on the replica's device once the weights are loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rsflow.errors import ModelError, RequestError
from rsflow.models.formats import llava_chunked_ids, unspeakable_ids
from rsflow.models.imaging import background_from_processor
from rsflow.models.prompts import IMAGE_TOKEN, TaskPrompt, build_prompt
from rsflow.models.slots import (
    ROW_PROMPTS_WHO,
    NoopRunner,
    _error_text,
    _static_prompts,
    batch_slots,
    check_adapter_names,
    prepare_rows,
    promptless,
    slot_columns,
)
from rsflow.models.spec import (
    NOOP_MODEL,
    ModelSpec,
    adapter_model_id,
    describe_original_checkpoint,
    gpu_auto_dtype,
    image_aspect,
    model_id,
    model_input_size,
    resolve_adapter,
    resolve_adapters,
    resolve_model_dir,
    resolve_prompt_format,
)

logger = logging.getLogger(__name__)

_PROMPT_CACHE_SIZE = 4096  # token-id lists kept per actor (static prompts plus recent region boxes)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint loaded for inference, with everything needed to feed it."""

    model: Any
    """``LlavaForConditionalGeneration`` in eval mode on ``device`` (adapter, if any, merged in)."""

    processor: Any
    """The checkpoint's ``LlavaProcessor`` (CLIP image processor on the PIL backend + tokenizer)."""

    tokenizer: Any
    """``processor.tokenizer``, set to pad on the left (decoder-only batched generation)."""

    device: torch.device
    """Where the weights live and inputs are sent."""

    dtype: torch.dtype
    """Parameter and compute dtype; pixel values are cast to it."""

    attn_implementation: str
    """Attention kernel in use: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``."""

    prompt_format: str
    """Conversation template: ``"llava"``, ``"rsllava"`` or ``"geochat"``."""

    image_size: int
    """Square model input side in pixels (after padding to square and resizing)."""

    model_id: str
    """Stable human-readable identity of the weights (see ``spec.model_id``)."""

    adapter_names: tuple[str, ...] = ()
    """Named peft adapters loaded side by side (``ModelSpec.adapters``); empty for a plain model."""


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(spec: ModelSpec, device: torch.device, model_dir: str) -> torch.dtype:
    if spec.dtype == "auto":
        return _DTYPES[gpu_auto_dtype(model_dir)] if device.type == "cuda" else torch.float32
    return _DTYPES[spec.dtype]


def _resolve_attn(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> str:
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if spec.attn_implementation == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    if spec.attn_implementation == "flash_attention_2":
        if device.type != "cuda" or not has_flash:
            raise RequestError(
                "--attn-implementation",
                "flash_attention_2 needs a CUDA device and the flash-attn package "
                "(pip install -e '.[gpu]' in the rsflow checkout); use sdpa or auto",
            )
        if dtype not in (torch.float16, torch.bfloat16):
            raise RequestError("--attn-implementation", "flash_attention_2 needs --dtype bfloat16 or float16")
    return spec.attn_implementation


def _suppress_unspeakable(model: Any, tokenizer: Any) -> None:
    """Keep greedy decoding off ids no answer can hold: ``<image>``, ``<pad>`` and the rows past the
    tokenizer's vocabulary (llava-hf's conversions pad the embeddings to 32,064 rows with random draws
    around the mean, rows LLaVA never had: reference models.md 5.3). Added to the checkpoint's own
    ``suppress_tokens`` (``rsflow convert`` writes the same list); end-of-sequence ids are never
    suppressed, even where the pad token is one."""
    config = model.generation_config
    vocab = int(model.get_output_embeddings().weight.shape[0])
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list | tuple) else [eos]) - {None}
    image_id = getattr(model.config, "image_token_index", None) or getattr(model.config, "image_token_id", None)
    config.suppress_tokens = unspeakable_ids(len(tokenizer), vocab, image_id, tokenizer.pad_token_id,
                                             *(config.suppress_tokens or []), keep=eos_ids) or None


def _load_named_adapters(model: Any, named: tuple[tuple[str, str], ...]) -> Any:
    """Wrap ``model`` in a PeftModel holding every named adapter, unmerged: switching is
    ``set_adapter(name)``, the bare base is ``disable_adapter()``, and the base weights exist once."""
    first_name, first_ref = named[0]
    peft_model = _peft_from_pretrained(model, first_ref, f"adapter {first_name!r}", adapter_name=first_name)
    for name, ref in named[1:]:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
                result = peft_model.load_adapter(ref, adapter_name=name)
        except Exception as exc:
            raise ModelError(f"cannot load adapter {name!r} ({ref!r}): {type(exc).__name__}: {exc}") from exc
        missing = list(getattr(result, "missing_keys", []) or [])
        if missing:
            _refuse_missing_adapter_keys(f"{len(missing)} of them, e.g. {missing[0]}", f"adapter {name!r}", ref)
    return peft_model


def _peft_from_pretrained(model: Any, ref: str, what: str, **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained(model, ref)``, refusing an adapter whose weights did not all load.

    peft loads an adapter whose tensor names fit no layer of the model (e.g. an RS-LLaVA adapter in the
    original LLaVA repository's key layout without the ``config.json`` that identifies it) with one
    ``UserWarning`` and the LoRA factors left at their initial values: the merge then changed nothing (or
    merged random factors), and the run still named the adapter in every row's model id.
    """
    from peft import PeftModel

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # peft 0.21 still asks transformers 5 for the deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, ref, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load {what} {ref!r}: {type(exc).__name__}: {exc}") from exc
    for w in caught:
        text = str(w.message)
        if "missing adapter keys" in text:  # "Found missing adapter keys while loading the checkpoint: [...]"
            _refuse_missing_adapter_keys(text.split(":", 1)[-1].strip()[:200], what, ref)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return peft_model


def _refuse_missing_adapter_keys(missing: str, what: str, ref: str) -> None:
    raise ModelError(
        f"{what} {ref!r}: its LoRA weights do not fit the model's layers (missing: {missing}); an adapter in the "
        "original LLaVA repository's layout needs the config.json and non_lora_trainables.bin it was released "
        "with beside it (or convert it with `rsflow convert`)"
    )


def load_model(spec: ModelSpec, device: str | torch.device | None = None) -> LoadedModel:
    """Load the checkpoint (and merge the adapter) that ``spec`` names, ready for ``generate``.

    Args:
        spec: the model spec.
        device: target device; None: ``cuda`` when available, else ``cpu``.

    Returns:
        The loaded model, its processor and the settings resolved from ``"auto"`` values.

    Raises:
        RequestError: a bad ``--model``/``--adapter`` path, an ``--image-size`` the vision tower
            cannot take, or an attention kernel this machine lacks.
        ModelError: the checkpoint or adapter exists but cannot be loaded.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = resolve_model_dir(spec)
    adapter = resolve_adapter(spec)
    prompt_format = resolve_prompt_format(spec)
    image_size = model_input_size(spec)
    dev = _resolve_device(device)
    dtype = _resolve_dtype(spec, dev, model_dir)
    attn = _resolve_attn(spec, dev, dtype)

    logger.info("loading %s (%s, %s, %s) on %s", model_dir, dtype, attn, prompt_format, dev)
    from transformers.utils import logging as hf_logging

    # One line per loaded model in the job log, not a bar per actor.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    original = describe_original_checkpoint(spec)
    processor: Any = None
    if original is not None:
        # GeoChat / LLaVA-repository models and RS-LLaVA-style LoRA adapters load straight from their
        # own files (meta-device build, shard by shard); the adapter, if any, is merged like LLaVA's builder.
        from rsflow.models.formats import load_original

        model, processor, _info = load_original(
            model_dir,
            adapter,
            vision_tower=spec.vision_tower,
            dtype=dtype,
            device=dev,
            image_size=spec.image_size,
            prompt_format=spec.prompt_format,
        )
        # load_original builds the model with transformers' default kernel: set the one resolved above
        # (on the vision tower and the language model alike), as from_pretrained does below.
        model.set_attn_implementation(attn)
        adapter = None  # merged above
    else:
        try:
            model = LlavaForConditionalGeneration.from_pretrained(
                model_dir, dtype=dtype, attn_implementation=attn, device_map=str(dev)
            )
        except Exception as exc:
            raise ModelError(f"cannot load --model {model_dir!r}: {type(exc).__name__}: {exc}") from exc

    vision_config: Any = model.config.vision_config
    tower_size = int(vision_config.image_size)
    if image_size != tower_size:
        raise RequestError(
            "--image-size",
            f"{image_size} px does not match the vision tower's {tower_size} px; convert the checkpoint "
            "for that size (e.g. GeoChat's interpolated position table) or leave --image-size out",
        )

    if adapter is not None:
        peft_model = _peft_from_pretrained(model, adapter, "--adapter")
        # Merge W + (alpha/r)·B·A into the base Linear layers, as LLaVA's builder does: inference
        # never trains the adapter, a merged layer costs no extra matmuls per token, and the result is
        # a plain LlavaForConditionalGeneration that generate() treats like any other checkpoint.
        model = peft_model.merge_and_unload()
    named = resolve_adapters(spec)
    if named:
        model = _load_named_adapters(model, named)
    model.eval()  # type: ignore[no-untyped-call]

    try:
        # The PIL backend reproduces LLaVA's own preprocessing (PIL bicubic resize; reference
        # models.md 1.3) and needs no torchvision.
        if processor is None:
            processor = AutoProcessor.from_pretrained(model_dir, backend="pil")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ModelError(f"cannot load the processor of {model_dir!r}: {type(exc).__name__}: {exc}") from exc
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        raise ModelError(f"the tokenizer of {model_dir!r} has no pad token; batched generation needs one")
    _suppress_unspeakable(model, tokenizer)

    return LoadedModel(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        device=dev,
        dtype=dtype,
        attn_implementation=attn,
        prompt_format=prompt_format,
        image_size=image_size,
        model_id=model_id(spec),
        adapter_names=tuple(name for name, _ in named),
    )


@dataclass(frozen=True)
class _Work:
    """One prompt to generate: output row index, prompt token ids, the tile's image features."""

    out_index: int
    """Index of the output row (``_Slot``) it answers."""

    ids: list[int]
    """Token ids of the full template prompt, ``<image>`` expanded to one id per image feature."""

    features: torch.Tensor
    """The tile's projected image features, ``[n_image_tokens, text_hidden]``, on the model device."""


@dataclass(frozen=True)
class _Encoded:
    """A tile after the vision tower: its features."""

    features: torch.Tensor
    """``[n_image_tokens, text_hidden]`` in the model dtype, on the model device."""


def _pooled_features(output: Any) -> list[torch.Tensor]:
    """Per-image ``[n_tokens, hidden]`` features from ``get_image_features``'s return value.

    transformers 5.24 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is a list of
    per-image tensors; a bare ``[n_images, n_tokens, hidden]`` tensor (what 4.x returned) is accepted too.
    """
    pooled = getattr(output, "pooler_output", output)
    if isinstance(pooled, torch.Tensor):
        return list(pooled.unbind(0)) if pooled.ndim == 3 else [pooled]
    return [torch.as_tensor(t) for t in pooled]


AUTO_BATCH_CAP_GPU = 64
"""Most prompts per ``generate`` call chosen automatically on a GPU (beyond that, decode steps of a
7B model are compute-bound and larger batches only add latency and padding)."""
AUTO_BATCH_CAP_CPU = 16
"""Most prompts per call chosen automatically on a CPU (matrix products saturate the cores earlier)."""
_AUTO_MEMORY_SHARE = {"cuda": 0.6, "cpu": 0.25}
"""Share of the free memory the automatic batch size may plan for: on a GPU what is free after the
weights loaded (the rest is the allocator's and the vision tower's headroom); on a CPU the available
RAM, shared with the read workers and the object store."""


def sequence_bytes(config: Any, dtype: torch.dtype, tokens: int) -> int:
    """Memory one sequence of ``tokens`` tokens needs while generating with a LLaVA ``config``: its
    key/value cache in every layer, its hidden states (a few live copies of ``tokens x hidden``) and
    one step's float32 logits."""
    text = config.text_config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    elem = torch.finfo(dtype).bits // 8
    kv = 2 * int(text.num_hidden_layers) * kv_heads * head_dim * tokens * elem
    hidden = 4 * tokens * int(text.hidden_size) * elem
    logits = 2 * int(text.vocab_size) * 4
    return kv + hidden + logits


def prompt_tokens(config: Any, image_size: int) -> int:
    """Tokens of a typical prompt: the image's features (one per vision patch) plus ~64 of text."""
    patch = int(config.vision_config.patch_size)
    return (image_size // patch) ** 2 + 64


def auto_batch_size(loaded: LoadedModel, max_new_tokens: int, *, free_bytes: int | None = None) -> int:
    """Prompts per ``generate`` call that fit the memory left on ``loaded``'s device.

    ``free_bytes`` (default: ``torch.cuda.mem_get_info`` on a GPU, psutil's available RAM on a CPU)
    times :data:`_AUTO_MEMORY_SHARE`, divided by :func:`sequence_bytes` of a full-length sequence,
    capped at :data:`AUTO_BATCH_CAP_GPU` / :data:`AUTO_BATCH_CAP_CPU`; at least 1. A batch that
    still runs out of memory is retried prompt by prompt (``_generate_with_fallback``).
    """
    device = loaded.device
    if free_bytes is None:
        if device.type == "cuda":
            free_bytes = int(torch.cuda.mem_get_info(device)[0])
        else:
            import psutil

            free_bytes = int(psutil.virtual_memory().available)
    config = loaded.model.config
    per_sequence = sequence_bytes(config, loaded.dtype, prompt_tokens(config, loaded.image_size) + max_new_tokens)
    share = _AUTO_MEMORY_SHARE.get(device.type, _AUTO_MEMORY_SHARE["cpu"])
    cap = AUTO_BATCH_CAP_GPU if device.type == "cuda" else AUTO_BATCH_CAP_CPU
    return max(1, min(cap, int(free_bytes * share // per_sequence)))


def default_kv_cache(device: torch.device) -> str:
    """The key/value cache ``generate`` uses on ``device``: ``"static"`` on a GPU (allocated once per
    ``generate`` call for the prompt plus ``max_new_tokens``), ``"dynamic"`` elsewhere (transformers'
    default, grown by concatenation every decode step, which copies the whole cache each step).

    In float32 both give the same greedy answers (tests/test_runner_cache.py); in bf16 on a GPU they
    attend through differently shaped kernels, so a near-tied argmax can flip (3 of 16 random-weight
    captions agreed), as it can between batch sizes. Measured with ``python -m bench
    --only gpu`` (H100, LLaVA-1.5-7B architecture, bf16, SDPA, 64 new tokens, batch 64): captioning
    25.5 tiles/s static against 15.8 dynamic, 4 tasks per tile 6.7 against 3.9, GPU busy 85 % against
    77 %; on a CPU (the smoke model, one thread) the static cache was 3-9 % slower, so it stays dynamic.
    A checkpoint whose model takes no cache objects ignores the choice (transformers logs it).
    """
    return "static" if device.type == "cuda" else "dynamic"


class ModelRunner:
    """Ray Data actor: loads the model once in ``__init__``, answers one batch per ``__call__``.

    Args:
        spec: which model to load and how to decode.
        prompts: the prompts asked of EVERY ok tile, as ``TaskPrompt`` values (from
            ``prompts.build_task_prompts``), in output order. For backward compatibility a list of
            task names is also accepted: each name contributes ``TaskPrompt(task, question, key="")``
            for every question of ``task_prompts(task, prompt_format)``. Region-caption prompts come
            per row from the ``region_boxes`` column instead (see the module docstring); an empty
            list (a region-caption-only job) is accepted for a geochat-family model.
        region_adapter: named adapter that answers region-caption prompts.
        row_prompts: rows may carry their own prompts in the ``row_prompts`` column (see the
            module docstring); ``prompts`` may then be empty.

    Raises:
        RequestError: no prompts (for a non-geochat model), an unknown task, a task the
            checkpoint's prompt format cannot run (all checked before the weights load), or a bad
            spec (see ``load_model``).
        TypeError: ``prompts`` mixes task names and TaskPrompts.
        ModelError: the model cannot be loaded.
    """

    def __init__(
        self,
        spec: ModelSpec,
        prompts: Sequence[TaskPrompt] | Sequence[str],
        *,
        region_adapter: str | None = None,
        row_prompts: bool = False,
    ) -> None:
        self.spec = spec
        # Check the prompts against the model family before paying for the weights.
        prompt_format = resolve_prompt_format(spec)
        self.prompts: tuple[TaskPrompt, ...] = _static_prompts(prompts, prompt_format, row_prompts=row_prompts)
        self._row_prompts = row_prompts
        check_adapter_names(spec, self.prompts, region_adapter)
        self._region_adapter = region_adapter
        self._prompt_format = prompt_format
        self._ids_cache: dict[tuple[str, str], list[int]] = {}
        self._noop: NoopRunner | None = None
        if spec.model == NOOP_MODEL:  # no weights: empty answers, everything else as for a model
            self._noop = NoopRunner(spec, prompts, region_adapter=region_adapter, row_prompts=row_prompts)
            self.loaded = None
            self.batch_size = spec.batch_size or AUTO_BATCH_CAP_CPU
            return
        self.loaded = load_model(spec)
        self._background = background_from_processor(self.loaded.processor.image_processor)
        self._aspect = image_aspect(spec)
        size = self.loaded.image_size
        self._image_kwargs: dict[str, Any] = {
            "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size},
        }
        config = self.loaded.model.config
        self._image_token_id = int(config.image_token_id)
        self._feature_layer = config.vision_feature_layer
        self._feature_strategy = config.vision_feature_select_strategy
        self._model_ids = {None: self.loaded.model_id}
        for name in self.loaded.adapter_names:
            self._model_ids[name] = adapter_model_id(spec, name)
        self.batch_size = spec.batch_size or auto_batch_size(self.loaded, spec.max_new_tokens)
        self.kv_cache = default_kv_cache(self.loaded.device)
        logger.info("model %s ready: %d prompt(s) per tile, %d prompts per generate call%s", self.loaded.model_id,
                    len(self.prompts), self.batch_size, "" if spec.batch_size else " (auto)")

    # ------------------------------------------------------------------------------------ batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Answer every prompt for every row of ``batch``; see the module docstring for columns.

        Raises:
            ValueError: a required column is missing (a wiring bug, not a row failure).
            RequestError: a row has region boxes but the model family cannot caption regions.
        """
        if self._noop is not None:
            return self._noop(batch)
        slots, row_slots, in_status, in_error = batch_slots(
            batch, self.prompts, self._prompt_format, row_prompts=self._row_prompts,
            region_adapter=self._region_adapter, who=ROW_PROMPTS_WHO,
        )
        n_rows = len(row_slots)
        n_out = len(slots)
        # 2. Pad each ok tile to a square (LLaVA-1.5's "pad" with the processor's mean colour; "crop"
        # leaves the processor's shortest-edge resize and centre crop); rows that are not ok pass through.
        prep = prepare_rows(slots, row_slots, in_status, in_error, batch["image"], aspect=self._aspect,
                            background=self._background)
        squares = prep.images
        texts: list[str | None] = [None] * n_out
        cut = [False] * n_out
        statuses, errors, seconds, ran = prep.statuses, prep.errors, prep.seconds, prep.ran

        def fail(k: int, message: str) -> None:
            statuses[k], errors[k] = "failed", message

        # 3-5. Per named adapter (one group for a model without them): encode each tile once, build
        # the token ids of its prompts sharing those features, generate in sub-batches of similar
        # length. Encoding per group keeps features right for adapters that also adapt the projector.
        encoded_rows: set[int] = set()
        n_work = 0
        groups = list(dict.fromkeys(slots[k].adapter for row in squares for k in row_slots[row]))
        for adapter in groups:
            group = {row: [k for k in row_slots[row] if slots[k].adapter == adapter] for row in squares}
            group = {row: ks for row, ks in group.items() if ks}
            with self._adapter(adapter):
                encoded: dict[int, _Encoded] = {}
                for row, result, spent in self._encode_with_fallback({row: squares[row] for row in group}):
                    for k in group[row]:
                        seconds[k] += spent / len(group[row])
                    if isinstance(result, BaseException):
                        for k in group[row]:
                            fail(k, _error_text(result))
                    else:
                        encoded[row] = result
                        encoded_rows.add(row)

                work: list[_Work] = []
                for row, enc in encoded.items():
                    for k in group[row]:
                        slot = slots[k]
                        if slot.prompt is None:
                            fail(k, promptless(slot))
                            continue
                        try:
                            ids = self._prompt_ids(slot.prompt, enc)
                        except Exception as exc:  # noqa: BLE001 - failures are data
                            fail(k, _error_text(exc))
                            continue
                        work.append(_Work(k, ids, enc.features))
                # Malformed regions of tiles that failed earlier keep that earlier failure.

                work.sort(key=lambda item: len(item.ids))  # stable: ties keep output order
                n_work += len(work)
                step = self.batch_size
                for start in range(0, len(work), step):
                    chunk = work[start : start + step]
                    t0 = time.perf_counter()
                    results = self._generate_with_fallback(chunk)
                    share = (time.perf_counter() - t0) / len(chunk)
                    for item, answer, failure in results:
                        seconds[item.out_index] += share
                        if failure is None:
                            texts[item.out_index], cut[item.out_index] = answer
                        else:
                            fail(item.out_index, _error_text(failure))

        # 6. Columns.
        out = slot_columns(
            batch, slots, texts=texts, statuses=statuses, errors=errors, ran=ran, seconds=seconds,
            model_ids=[self._model_ids.get(slot.adapter, self._model_ids[None]) for slot in slots], cut=cut,
        )
        n_failed = sum(1 for s in statuses if s == "failed")
        logger.debug(
            "answered %d prompt(s) on %d encoded tile(s) of %d row(s); %d failed",
            n_work,
            len(encoded_rows),
            n_rows,
            n_failed,
        )
        return out

    # ------------------------------------------------------------------------------------ images

    @contextlib.contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        """Answer with the named adapter active (None: the bare base, adapters disabled)."""
        if not self.loaded.adapter_names:
            yield
            return
        model = self.loaded.model
        if name is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(name)
            yield

    def _encode_with_fallback(
        self, squares: dict[int, np.ndarray]
    ) -> list[tuple[int, _Encoded | BaseException, float]]:
        """Encode tiles ``spec.batch_size`` at a time; a chunk that raises is retried tile by tile.

        Returns:
            ``(row, encoded tile or the exception, wall seconds attributed to it)`` per input tile.
        """
        rows = list(squares)
        results: list[tuple[int, _Encoded | BaseException, float]] = []
        step = self.batch_size
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            t0 = time.perf_counter()
            try:
                encoded = self._encode([squares[row] for row in chunk])
            except Exception as exc:  # noqa: BLE001 - failures are data
                if len(chunk) == 1:
                    logger.warning("image encoding failed: %s", _error_text(exc))
                    results.append((chunk[0], exc, time.perf_counter() - t0))
                    self._release_memory()
                    continue
                logger.warning(
                    "encoding %d tiles failed (%s); retrying one by one", len(chunk), _error_text(exc)
                )
                self._release_memory()
                for row in chunk:
                    t1 = time.perf_counter()
                    try:
                        results.append((row, self._encode([squares[row]])[0], time.perf_counter() - t1))
                    except Exception as one_exc:  # noqa: BLE001 - failures are data
                        logger.warning("image encoding failed for one tile: %s", _error_text(one_exc))
                        results.append((row, one_exc, time.perf_counter() - t1))
                        self._release_memory()
                continue
            spent = (time.perf_counter() - t0) / len(chunk)
            results += [(row, enc, spent) for row, enc in zip(chunk, encoded, strict=True)]
        return results

    def _encode(self, squares: list[np.ndarray]) -> list[_Encoded]:
        """Run the image processor, the vision tower and the projector once over ``squares``."""
        loaded = self.loaded
        processed = loaded.processor.image_processor(
            images=squares, return_tensors="pt", input_data_format="channels_last", **self._image_kwargs
        )
        pixel_values = processed["pixel_values"].to(loaded.device, loaded.dtype)
        with torch.inference_mode():
            output = loaded.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=self._feature_layer,
                vision_feature_select_strategy=self._feature_strategy,
            )
        features = _pooled_features(output)
        if len(features) != len(squares):
            raise RuntimeError(
                f"the vision tower gave {len(features)} feature sets for {len(squares)} images"
            )
        return [_Encoded(feats) for feats in features]

    # ------------------------------------------------------------------------------------ text

    def _prompt_ids(self, question: str, encoded: _Encoded) -> list[int]:
        """Token ids of the full prompt for ``question`` as LLaVA's ``tokenizer_image_token`` makes
        them: the text before and after ``<image>`` tokenised separately (each chunk gets its own
        SentencePiece dummy prefix), one BOS, and the placeholder expanded to one image-token id per
        image feature (what the model's splice fills). Cached per (question, feature count).

        Raises:
            ValueError: the question holds ``<image>`` itself.
        """
        n_features = int(encoded.features.shape[0])
        cache_key = (question, str(n_features))
        ids = self._ids_cache.get(cache_key)
        if ids is None:
            text = build_prompt(self.loaded.prompt_format, question)
            if text.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"a prompt must not contain {IMAGE_TOKEN!r} itself: {question!r}")
            ids = llava_chunked_ids(self.loaded.tokenizer, text, self._image_token_id, n_features)
            if len(self._ids_cache) >= _PROMPT_CACHE_SIZE:
                self._ids_cache.clear()
            self._ids_cache[cache_key] = ids
        return ids

    # ------------------------------------------------------------------------------------ generate

    def _generate_with_fallback(
        self, items: list[_Work]
    ) -> list[tuple[_Work, tuple[str, bool] | None, BaseException | None]]:
        """Generate a sub-batch; if it raises, retry item by item so one bad item fails alone."""
        try:
            answers = self._generate(items)
            return [(item, answer, None) for item, answer in zip(items, answers, strict=True)]
        except Exception as exc:  # noqa: BLE001 - failures are data
            if len(items) == 1:
                logger.warning("generation failed: %s", _error_text(exc))
                self._release_memory()
                return [(items[0], None, exc)]
            logger.warning(
                "batched generation of %d prompts failed (%s); retrying one by one",
                len(items),
                _error_text(exc),
            )
        self._release_memory()
        results: list[tuple[_Work, tuple[str, bool] | None, BaseException | None]] = []
        for item in items:
            try:
                results.append((item, self._generate([item])[0], None))
            except Exception as exc:  # noqa: BLE001 - failures are data
                logger.warning("generation failed for one prompt: %s", _error_text(exc))
                results.append((item, None, exc))
                self._release_memory()
        return results

    def _release_memory(self) -> None:
        if self.loaded is not None and self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate(self, items: list[_Work]) -> list[tuple[str, bool]]:
        """Greedy answers for prompts whose image features are already computed, each with whether it
        was cut: ``max_new_tokens`` generated and no end-of-sequence token among them.

        The prompts are left-padded with the pad token (as the processor pads), embedded with the
        language model's input embeddings, and each prompt's ``<image>`` positions are overwritten
        with its tile's features in order (``masked_scatter``, as ``LlavaModel.forward`` does). The
        ids go to ``generate`` beside the embeddings: the first forward uses the embeddings, and
        logits processors that read the ids (repetition penalty and the like from a checkpoint's
        generation config) see the same ids as with ``pixel_values``; the output then starts with
        them, so the answer is what follows column ``L``.
        """
        loaded = self.loaded
        model = loaded.model
        pad_id = int(loaded.tokenizer.pad_token_id)
        length = max(len(item.ids) for item in items)
        ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, item in enumerate(items):
            ids[i, length - len(item.ids) :] = torch.tensor(item.ids, dtype=torch.long)
            attention_mask[i, length - len(item.ids) :] = 1
        ids = ids.to(loaded.device)
        attention_mask = attention_mask.to(loaded.device)
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(ids)
            features = torch.cat([item.features for item in items], dim=0).to(embeds.device, embeds.dtype)
            image_positions = (ids == self._image_token_id).unsqueeze(-1)
            if int(image_positions.sum()) != int(features.shape[0]):
                raise RuntimeError(
                    f"{int(image_positions.sum())} image tokens for {int(features.shape[0])} image features"
                )
            embeds = embeds.masked_scatter(image_positions, features)
            output = model.generate(
                input_ids=ids,
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=self.spec.max_new_tokens,
                pad_token_id=pad_id,
                cache_implementation=None if self.kv_cache == "dynamic" else self.kv_cache,
            )
        new_tokens = output[:, length:]
        decoded = loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        eos = model.generation_config.eos_token_id
        eos = loaded.tokenizer.eos_token_id if eos is None else eos
        ended = torch.isin(new_tokens, torch.tensor(eos if isinstance(eos, list) else [eos], device=new_tokens.device))
        cut = (~ended.any(dim=1)) & (new_tokens.shape[1] >= self.spec.max_new_tokens)
        return [(_clean_answer(text), bool(c)) for text, c in zip(decoded, cut.tolist(), strict=True)]


MAX_ANSWER_CHARS = 16_384
"""Longest answer text kept (``max_new_tokens`` bounds tokens; a token can decode to many characters)."""


def _clean_answer(text: str) -> str:
    """Strip whitespace and a trailing ``</s>`` (LLaVA's stop string ``sep2``), and make the text safe
    to store: lone surrogates and control characters (other than newline and tab) become U+FFFD, and
    more than :data:`MAX_ANSWER_CHARS` characters are cut with a marker."""
    text = text.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")].strip()
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot go into Arrow
    text = "".join("\ufffd" if (ord(c) < 32 and c not in "\n\t") or c == "\x7f" else c for c in text)
    if len(text) > MAX_ANSWER_CHARS:
        text = text[:MAX_ANSWER_CHARS] + " [truncated]"
    return text
