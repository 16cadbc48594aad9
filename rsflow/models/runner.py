"""Load a LLaVA-family checkpoint once and answer prompts about image chips in batches.

``ModelRunner`` is the Ray Data actor class of the infer stage (``pipeline.py`` wires it up with
``map_batches(ModelRunner, fn_constructor_kwargs={"spec": ..., "tasks": [...]}, ...)``), but it
is plain Python: tests call it directly on a dict of numpy arrays.

Batch contract of ``ModelRunner.__call__``:

Input columns (all of length B):
    ``tile_id`` (str), ``image`` (uint8 ``[B, H, W, 3]``, or an object array of ``H x W x 3`` uint8
    arrays when sizes differ), ``status`` (``"ok"``, ``"skipped"`` or ``"failed"``), ``error``
    (str or None; optional), plus any other columns.
Output columns (B x P rows, P = number of (task, prompt) pairs; row order: input row, then task,
then prompt):
    every input column except ``image``, repeated per prompt (``status`` and ``error`` updated),
    ``task`` (str), ``prompt`` (the user question, not the full template), ``text`` (the answer, or
    None), ``status`` (``"ok"`` or the input's non-ok status, or ``"failed"`` when this stage
    failed), ``error`` (None, the input's error, or ``"ExceptionType: message"``), ``model_id`` (str).
Strings are numpy object arrays. A failure on one row never raises and never drops a row.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rsflow.errors import ModelError, RequestError
from rsflow.models.imaging import background_from_processor, expand2square
from rsflow.models.prompts import build_prompt, task_prompts
from rsflow.models.spec import (
    ModelSpec,
    model_id,
    model_input_size,
    resolve_adapter,
    resolve_model_dir,
    resolve_prompt_format,
)

logger = logging.getLogger(__name__)

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


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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
                "(pip install 'rsflow[gpu]'); use sdpa or auto",
            )
        if dtype not in (torch.float16, torch.bfloat16):
            raise RequestError("--attn-implementation", "flash_attention_2 needs --dtype bfloat16 or float16")
    return spec.attn_implementation


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
    dtype = _resolve_dtype(spec, dev)
    attn = _resolve_attn(spec, dev, dtype)

    logger.info("loading %s (%s, %s, %s) on %s", model_dir, dtype, attn, prompt_format, dev)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per loaded model in the job log, not a bar per actor
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
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                # peft 0.21 still asks transformers 5 for the deprecated `is_gradient_checkpointing`.
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
                peft_model = PeftModel.from_pretrained(model, adapter)
        except Exception as exc:
            raise ModelError(f"cannot load --adapter {adapter!r}: {type(exc).__name__}: {exc}") from exc
        # Merge W + (alpha/r)·B·A into the base Linear layers, as LLaVA's builder does: inference
        # never trains the adapter, a merged layer costs no extra matmuls per token, and the result is
        # a plain LlavaForConditionalGeneration that generate() treats like any other checkpoint.
        model = peft_model.merge_and_unload()
    model.eval()  # type: ignore[no-untyped-call]

    try:
        # The PIL backend reproduces LLaVA's own preprocessing (PIL bicubic resize; reference
        # models.md 1.3) and needs no torchvision.
        processor = AutoProcessor.from_pretrained(model_dir, backend="pil")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ModelError(f"cannot load the processor of {model_dir!r}: {type(exc).__name__}: {exc}") from exc
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        raise ModelError(f"the tokenizer of {model_dir!r} has no pad token; batched generation needs one")

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
    )


@dataclass(frozen=True)
class _Work:
    """One prompt to generate: output row index, square image, full template prompt."""

    out_index: int
    image: np.ndarray
    prompt: str


def _column(values: Any) -> np.ndarray:
    """A batch column as a numpy array (lists become object arrays element by element)."""
    if isinstance(values, np.ndarray):
        return values
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def _objects(values: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ModelRunner:
    """Ray Data actor: loads the model once in ``__init__``, answers one batch per ``__call__``.

    Args:
        spec: which model to load and how to decode.
        tasks: task names (keys of ``prompts.TASK_PROMPTS``); each contributes its prompts for the
            checkpoint's prompt format.

    Raises:
        RequestError: no tasks, an unknown task, or a bad spec (see ``load_model``).
        ModelError: the model cannot be loaded.
    """

    def __init__(self, spec: ModelSpec, tasks: list[str]) -> None:
        if not tasks:
            raise RequestError("--tasks", "give at least one task")
        self.spec = spec
        # Check the tasks against the prompt table before paying for the weights.
        prompt_format = resolve_prompt_format(spec)
        self.queries: list[tuple[str, str]] = [
            (task, question) for task in tasks for question in task_prompts(task, prompt_format)
        ]
        self.loaded = load_model(spec)
        self._background = background_from_processor(self.loaded.processor.image_processor)
        size = self.loaded.image_size
        self._image_kwargs: dict[str, Any] = {
            "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size},
        }
        logger.info("model %s ready: %d prompt(s) per tile", self.loaded.model_id, len(self.queries))

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Answer every (task, prompt) for every row of ``batch``; see the module docstring for columns."""
        for name in ("tile_id", "image", "status"):
            if name not in batch:
                raise ValueError(f"ModelRunner batch lacks the {name!r} column (has {sorted(batch)})")
        n_rows = len(batch["tile_id"])
        n_queries = len(self.queries)
        n_out = n_rows * n_queries
        in_status = _column(batch["status"])
        in_error = _column(batch["error"]) if "error" in batch else _objects([None] * n_rows)
        images = batch["image"]

        texts: list[str | None] = [None] * n_out
        statuses: list[str] = [""] * n_out
        errors: list[str | None] = [None] * n_out
        ran = np.zeros(n_out, dtype=bool)  # rows this stage worked on (their stage becomes "infer")
        work: list[_Work] = []
        for row in range(n_rows):
            first = row * n_queries
            status = str(in_status[row])
            if status != "ok":
                for k in range(first, first + n_queries):
                    statuses[k], errors[k] = status, in_error[row]
                continue
            try:
                square = expand2square(np.asarray(images[row]), self._background)
            except Exception as exc:
                for k in range(first, first + n_queries):
                    statuses[k], errors[k] = "failed", _error_text(exc)
                ran[first : first + n_queries] = True
                continue
            ran[first : first + n_queries] = True
            for q, (_, question) in enumerate(self.queries):
                statuses[first + q] = "ok"
                work.append(_Work(first + q, square, build_prompt(self.loaded.prompt_format, question)))

        started = time.perf_counter()
        step = self.spec.batch_size
        for start in range(0, len(work), step):
            for item, answer, failure in self._generate_with_fallback(work[start : start + step]):
                if failure is None:
                    texts[item.out_index] = answer
                else:
                    statuses[item.out_index], errors[item.out_index] = "failed", _error_text(failure)

        row_index = np.repeat(np.arange(n_rows), n_queries)
        out: dict[str, np.ndarray] = {}
        for name, values in batch.items():
            if name == "image":
                continue
            out[name] = _column(values)[row_index]
        out["task"] = _objects([task for _ in range(n_rows) for task, _ in self.queries])
        out["prompt"] = _objects([question for _ in range(n_rows) for _, question in self.queries])
        out["text"] = _objects(texts)
        out["status"] = _objects(statuses)
        out["error"] = _objects(errors)
        out["model_id"] = _objects([self.loaded.model_id] * n_out)
        in_stage = out["stage"] if "stage" in out else _objects([None] * n_out)
        out["stage"] = _objects(["infer" if r else st for r, st in zip(ran, in_stage, strict=True)])
        # Wall time of this batch's generation, shared equally by the prompts it answered.
        seconds = (time.perf_counter() - started) / max(1, len(work))
        out["infer_seconds"] = np.where(ran, seconds, 0.0)
        n_failed = sum(1 for s in statuses if s == "failed")
        logger.debug("answered %d prompt(s) for %d row(s); %d failed", len(work), n_rows, n_failed)
        return out

    def _generate_with_fallback(
        self, items: list[_Work]
    ) -> list[tuple[_Work, str | None, BaseException | None]]:
        """Generate a sub-batch; if it raises, retry item by item so one bad item fails alone."""
        try:
            answers = self._generate(items)
            return [(item, answer, None) for item, answer in zip(items, answers, strict=True)]
        except Exception as exc:
            if len(items) == 1:
                logger.warning("generation failed: %s", _error_text(exc))
                return [(items[0], None, exc)]
            logger.warning(
                "batched generation of %d prompts failed (%s); retrying one by one",
                len(items),
                _error_text(exc),
            )
        self._release_memory()
        results: list[tuple[_Work, str | None, BaseException | None]] = []
        for item in items:
            try:
                results.append((item, self._generate([item])[0], None))
            except Exception as exc:
                logger.warning("generation failed for one prompt: %s", _error_text(exc))
                results.append((item, None, exc))
                self._release_memory()
        return results

    def _release_memory(self) -> None:
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate(self, items: list[_Work]) -> list[str]:
        """Greedy answers for a list of prompts, decoded from the new tokens only."""
        loaded = self.loaded
        inputs = loaded.processor(
            images=[item.image for item in items],
            text=[item.prompt for item in items],
            return_tensors="pt",
            padding=True,
            input_data_format="channels_last",
            **self._image_kwargs,
        )
        inputs = inputs.to(loaded.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        with torch.inference_mode():
            output = loaded.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=self.spec.max_new_tokens,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
        # Left padding: every prompt ends at the same column, so the new tokens start there.
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        decoded = loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [_clean_answer(text) for text in decoded]


def _clean_answer(text: str) -> str:
    """Strip whitespace and a trailing ``</s>`` (LLaVA's stop string ``sep2``)."""
    text = text.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")].strip()
    return text
