"""The rows of the infer stage, shared by every engine: which prompts each input row gets (its
*slots*), the output columns built from them, and the no-op model's runner.

No torch here: the no-op model's actors (``--model noop``, read-path and load checks) import this
module only, so they start in a fraction of a second instead of loading torch. The batch contract
is :mod:`rsflow.models.runner`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from rsflow.errors import RequestError
from rsflow.models.imaging import expand2square
from rsflow.models.prompts import TaskPrompt, check_tasks, region_prompt, task_prompts
from rsflow.models.spec import NOOP_MODEL, ModelSpec, resolve_prompt_format

logger = logging.getLogger(__name__)

REGION_BOXES_COLUMN: Final[str] = "region_boxes"
"""Optional input column: per row a list of ``[region_id, x1, y1, x2, y2]`` (0-100 grid integers),
or of mappings with those five keys (the form an Arrow list-of-struct column arrives in)."""

_REGION_KEYS: Final[tuple[str, ...]] = ("region_id", "x1", "y1", "x2", "y2")

ROW_PROMPTS_COLUMN: Final[str] = "row_prompts"
"""Optional input column (``ModelRunner(..., row_prompts=True)``): per row a list of mappings with
``task``, ``prompt`` (the user text) and ``key`` (copied to ``prompt_key``), asked of that row only."""

_ROW_PROMPT_KEYS: Final[tuple[str, ...]] = ("task", "prompt", "key")

REGION_TASK: Final[str] = "region-caption"
"""Task name of the per-row region prompts (``prompts.region_prompt``)."""

@dataclass(frozen=True)
class _Slot:
    """One output row: a prompt asked of one input row."""

    row: int
    """Index of the input row."""

    task: str | None
    """``TaskPrompt.task``; None for the placeholder row of an input row that has no prompt at all."""

    prompt: str | None
    """User text (``TaskPrompt.prompt``); None when a region box could not be turned into a prompt."""

    key: str | None
    """``TaskPrompt.key``; None for a placeholder row."""

    region_id: str | None
    """Region id for region-caption rows, else None."""

    problem: str | None = None
    """``"ExceptionType: message"`` when the prompt could not be built (a malformed region box)."""

    adapter: str | None = None
    """Named adapter that answers it (None: the model as loaded)."""


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


def _grid_int(value: Any) -> int:
    """An integer box coordinate; integral floats (``10.0``) are accepted, anything else is refused."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"box coordinate must be an integer on the 0-100 grid, got {value!r}")
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"box coordinate must be an integer on the 0-100 grid, got {value!r}")
    return int(number)


def _region_slots(row: int, value: Any) -> list[_Slot]:
    """The region-caption slots of one row from its ``region_boxes`` value (None, NaN or empty: none).

    A malformed entry gives a slot whose ``problem`` says why, so the region still gets its output row.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        problem = f"TypeError: region_boxes must be a list of [region_id, x1, y1, x2, y2], got {value!r}"
        return [_Slot(row, REGION_TASK, None, "", None, problem)]
    slots: list[_Slot] = []
    for entry in value:
        parts: list[Any] = []
        region_id: str | None = None
        if isinstance(entry, Mapping):
            if all(key in entry for key in _REGION_KEYS):
                parts = [entry[key] for key in _REGION_KEYS]
            region_id = str(entry["region_id"]) if "region_id" in entry else None
        elif isinstance(entry, Sequence | np.ndarray) and not isinstance(entry, str | bytes):
            parts = list(entry)
            region_id = str(parts[0]) if parts else None
        try:
            if len(parts) != 5:
                raise ValueError(
                    "a region must be [region_id, x1, y1, x2, y2] or a mapping with those keys, "
                    f"got {entry!r}"
                )
            box = (_grid_int(parts[1]), _grid_int(parts[2]), _grid_int(parts[3]), _grid_int(parts[4]))
            text = region_prompt(box)
        except (ValueError, TypeError) as exc:
            slots.append(_Slot(row, REGION_TASK, None, region_id or "", region_id, _error_text(exc)))
            continue
        rid = str(parts[0])
        slots.append(_Slot(row, REGION_TASK, text, rid, rid))
    return slots


def _row_prompt_slots(row: int, value: Any) -> list[_Slot]:
    """The slots of one row's own prompts (``row_prompts``; None, NaN or empty: none).

    A malformed entry gives a slot whose ``problem`` says why, so it still gets its output row.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    slots: list[_Slot] = []
    for entry in value:
        if not isinstance(entry, Mapping) or not all(k in entry for k in _ROW_PROMPT_KEYS):
            problem = f"ValueError: a row prompt must be a mapping with task, prompt and key, got {entry!r}"
            key = str(entry["key"]) if isinstance(entry, Mapping) and "key" in entry else ""
            task = str(entry["task"]) if isinstance(entry, Mapping) and "task" in entry else ""
            slots.append(_Slot(row, task, None, key, None, problem))
            continue
        text = entry["prompt"]
        if not isinstance(text, str) or not text.strip():
            slots.append(_Slot(row, str(entry["task"]), None, str(entry["key"]), None, "ValueError: no prompt text"))
            continue
        slots.append(_Slot(row, str(entry["task"]), text, str(entry["key"]), None))
    return slots


def _static_prompts(
    prompts: Sequence[TaskPrompt] | Sequence[str], prompt_format: str, *, row_prompts: bool = False
) -> tuple[TaskPrompt, ...]:
    """The constructor's prompts as TaskPrompts, checked against ``prompt_format``.

    An empty list is allowed only for a model of the geochat family: a region-caption-only job,
    whose prompts all come per row from ``region_boxes``.

    Raises:
        RequestError: no prompt (and no region-caption ability), an unknown task, or a task the
            model family cannot do (``--tasks``).
        TypeError: a list mixing task names and TaskPrompts, or holding anything else.
    """
    items = list(prompts)
    if not items and row_prompts:  # every prompt comes per row (benchmark evaluation)
        return ()
    if not items:
        try:  # no prompt for every tile: a region-caption-only job, where prompts come per row
            check_tasks([REGION_TASK], prompt_format)
        except RequestError:
            raise RequestError("--tasks", "give at least one task") from None
        return ()
    if all(isinstance(p, str) for p in items):
        names = [str(p) for p in items]
        return tuple(
            TaskPrompt(task, question, key="")
            for task in check_tasks(names, prompt_format)
            for question in task_prompts(task, prompt_format)
        )
    if not all(isinstance(p, TaskPrompt) for p in items):
        kinds = sorted({type(p).__name__ for p in items})
        raise TypeError(f"prompts must be all task names (str) or all TaskPrompt, got {', '.join(kinds)}")
    typed = [p for p in items if isinstance(p, TaskPrompt)]
    check_tasks([p.task for p in typed], prompt_format)
    for p in typed:
        if not isinstance(p.prompt, str) or not p.prompt.strip():
            raise RequestError("--tasks", f"a {p.task!r} prompt has no text (key {p.key!r})")
    return tuple(typed)


def batch_slots(
    batch: dict[str, Any],
    prompts: Sequence[TaskPrompt],
    prompt_format: str,
    *,
    row_prompts: bool,
    region_adapter: str | None,
    who: str,
) -> tuple[list[_Slot], list[range], np.ndarray, np.ndarray]:
    """The output slots of an infer-stage batch, in output order: per row the static ``prompts``,
    then the row's own prompts (``row_prompts``), then its regions; a row with nothing to ask keeps
    one placeholder slot. Shared by every engine, so their rows line up.

    Returns:
        ``(slots, row_slots, in_status, in_error)``: ``row_slots[row]`` is the range of that row's
        slots; the input status and error columns as arrays.

    Raises:
        ValueError: a required column is missing, or ``row_prompts`` arrive unasked (``who`` says
            how to ask for them) — wiring bugs, not row failures.
        RequestError: a row has region boxes but the model family cannot caption regions.
    """
    for name in ("tile_id", "image", "status"):
        if name not in batch:
            raise ValueError(f"the infer stage's batch lacks the {name!r} column (has {sorted(batch)})")
    n_rows = len(batch["tile_id"])
    in_status = _column(batch["status"])
    in_error = _column(batch["error"]) if "error" in batch else _objects([None] * n_rows)
    regions = _column(batch[REGION_BOXES_COLUMN]) if REGION_BOXES_COLUMN in batch else None
    if ROW_PROMPTS_COLUMN in batch and not row_prompts:
        raise ValueError(f"a {ROW_PROMPTS_COLUMN!r} column needs {who}")
    own = _column(batch[ROW_PROMPTS_COLUMN]) if ROW_PROMPTS_COLUMN in batch else None
    slots: list[_Slot] = []
    row_slots: list[range] = []
    for row in range(n_rows):
        first = len(slots)
        slots += [_Slot(row, p.task, p.prompt, p.key, p.region_id, adapter=p.adapter) for p in prompts]
        if own is not None:
            row_own = _row_prompt_slots(row, own[row])
            tasks = sorted({slot.task for slot in row_own if slot.task and slot.prompt is not None})
            if tasks:  # a task the family cannot do is a wiring bug here: callers check before inference
                check_tasks(tasks, prompt_format)
            slots += row_own
        row_regions = _region_slots(row, regions[row]) if regions is not None else []
        if region_adapter is not None:
            row_regions = [dataclasses.replace(r, adapter=region_adapter) for r in row_regions]
        if row_regions:
            check_tasks([REGION_TASK], prompt_format)  # raises for llava/rsllava models
        slots += row_regions
        if len(slots) == first:  # nothing to ask (region-only job, no region here): keep the row
            slots.append(_Slot(row, None, None, None, None))
        row_slots.append(range(first, len(slots)))
    return slots, row_slots, in_status, in_error


def slot_columns(
    batch: dict[str, Any],
    slots: Sequence[_Slot],
    *,
    texts: Sequence[str | None],
    statuses: Sequence[str],
    errors: Sequence[str | None],
    model_ids: Sequence[str],
    ran: np.ndarray,
    seconds: np.ndarray,
    cut: Sequence[bool] | None = None,
) -> dict[str, np.ndarray]:
    """The infer stage's output columns (see the module docstring), one row per slot: the input
    columns repeated per slot (but the image and the prompt inputs, consumed here), the slot's
    prompt, its answer and status, ``answer_cut`` (the answer reached ``max_new_tokens`` without
    ending: it may be cut short) and ``stage`` ``"infer"`` for slots the engine worked on."""
    n_out = len(slots)
    row_index = np.fromiter((slot.row for slot in slots), dtype=np.int64, count=n_out)
    out: dict[str, np.ndarray] = {}
    for name, values in batch.items():
        if name in ("image", REGION_BOXES_COLUMN, ROW_PROMPTS_COLUMN):  # consumed here, not needed later
            continue
        out[name] = _column(values)[row_index]
    out["task"] = _objects([slot.task for slot in slots])
    out["prompt"] = _objects([slot.prompt for slot in slots])
    out["prompt_key"] = _objects([slot.key for slot in slots])
    out["region_id"] = _objects([slot.region_id for slot in slots])
    # Position of the prompt within its tile: exactly one row per tile has 0, which is how later
    # stages count tiles without collecting their ids.
    first = np.r_[0, np.flatnonzero(np.diff(row_index)) + 1] if n_out else np.zeros(0, dtype=np.int64)
    starts = np.repeat(first, np.diff(np.r_[first, n_out]))
    out["prompt_index"] = np.arange(n_out, dtype=np.int64) - starts
    out["text"] = _objects(list(texts))
    out["status"] = _objects(list(statuses))
    out["error"] = _objects(list(errors))
    out["model_id"] = _objects(list(model_ids))
    in_stage = out["stage"] if "stage" in out else _objects([None] * n_out)
    out["stage"] = _objects(["infer" if r else st for r, st in zip(ran, in_stage, strict=True)])
    out["infer_seconds"] = np.where(ran, seconds, 0.0)
    out[ANSWER_CUT_COLUMN] = np.zeros(n_out, dtype=bool) if cut is None else np.asarray(cut, dtype=bool)
    return out


ANSWER_CUT_COLUMN: Final[str] = "answer_cut"
"""Infer-stage column: True where generation stopped at ``max_new_tokens`` rather than at an
end-of-sequence token (the result row's ``parse_error`` says so)."""


@dataclass
class RowPrep:
    """What :func:`prepare_rows` found: per output slot its status, error, whether this stage works on
    it (``ran``: its stage becomes ``"infer"``) and seconds spent; per input row to answer, its image
    ready for the processor."""

    statuses: list[str]
    errors: list[str | None]
    ran: np.ndarray
    seconds: np.ndarray
    images: dict[int, np.ndarray]


def prepare_rows(
    slots: Sequence[_Slot], row_slots: Sequence[range], in_status: np.ndarray, in_error: np.ndarray, images: Any,
    *, aspect: str, background: tuple[int, int, int],
) -> RowPrep:
    """The step every engine takes first: a row that is not ok passes its status and error to its
    slots; an ok row with prompts has its chip padded to a square with ``background`` (LLaVA-1.5's
    ``aspect="pad"``; ``"crop"`` leaves it for the processor's shortest-edge resize and centre crop,
    as GeoChat's eval scripts do) and checked to be ``H x W x 3`` uint8; an unusable chip fails the
    row's slots with the reason. Each slot gets its share of the time spent."""
    n_out = len(slots)
    prep = RowPrep(statuses=[""] * n_out, errors=[None] * n_out, ran=np.zeros(n_out, dtype=bool),
                   seconds=np.zeros(n_out, dtype=np.float64), images={})
    for row, span in enumerate(row_slots):
        status = str(in_status[row])
        if status != "ok":
            for k in span:
                prep.statuses[k], prep.errors[k] = status, in_error[row]
            continue
        for k in span:
            prep.statuses[k] = "ok"
        if slots[span.start].task is None:  # the placeholder row: nothing to answer
            continue
        prep.ran[span.start : span.stop] = True
        t0 = time.perf_counter()
        try:
            image = np.asarray(images[row])
            ready = expand2square(image, background) if aspect == "pad" else image
            if ready.ndim != 3 or ready.shape[2] != 3 or ready.dtype != np.uint8:
                raise ValueError(f"image must be an HxWx3 uint8 array, got shape {ready.shape} dtype {ready.dtype}")
        except Exception as exc:  # noqa: BLE001 - failures are data
            for k in span:
                prep.statuses[k], prep.errors[k] = "failed", _error_text(exc)
        else:
            prep.images[row] = ready
        prep.seconds[span.start : span.stop] += (time.perf_counter() - t0) / len(span)
    return prep


def promptless(slot: _Slot) -> str:
    """The failure of a slot whose prompt could not be built (a malformed region or row prompt)."""
    return slot.problem or "ValueError: no prompt"


def check_adapter_names(spec: ModelSpec, prompts: Sequence[TaskPrompt], region_adapter: str | None) -> None:
    """Every adapter the prompts (and region-caption) name is one of ``spec``'s named adapters.

    Raises:
        RequestError: one is not.
    """
    known = {name for name, _ in spec.adapters}
    for wanted in {p.adapter for p in prompts} | {region_adapter}:
        if wanted is not None and wanted not in known:
            raise RequestError(
                "task_adapters", f"no adapter named {wanted!r}; named adapters: {sorted(known) or 'none'}"
            )


ROW_PROMPTS_WHO: Final[str] = "ModelRunner(..., row_prompts=True)"
"""How to ask for per-row prompts (the message of a ``row_prompts`` column that arrives unasked)."""


class NoopRunner:
    """The infer stage of ``--model noop``: every row and prompt shaped as :class:`ModelRunner`
    shapes them (slots, statuses, failures of malformed images and prompts), empty answers, no
    weights and no torch. ``ModelRunner(spec)`` of the no-op model delegates here too.

    Arguments as :class:`rsflow.models.runner.ModelRunner`'s.
    """

    def __init__(
        self,
        spec: ModelSpec,
        prompts: Sequence[TaskPrompt] | Sequence[str],
        *,
        region_adapter: str | None = None,
        row_prompts: bool = False,
    ) -> None:
        if spec.model != NOOP_MODEL:
            raise ValueError(f"NoopRunner runs the {NOOP_MODEL!r} model, not {spec.model!r}")
        self.spec = spec
        self._prompt_format = resolve_prompt_format(spec)
        self.prompts: tuple[TaskPrompt, ...] = _static_prompts(prompts, self._prompt_format, row_prompts=row_prompts)
        check_adapter_names(spec, self.prompts, region_adapter)
        self._row_prompts = row_prompts
        self._aspect = spec.image_aspect or "pad"
        logger.info("no-op model ready: %d prompt(s) per tile", len(self.prompts))

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        slots, row_slots, in_status, in_error = batch_slots(
            batch, self.prompts, self._prompt_format, row_prompts=self._row_prompts, region_adapter=None,
            who=ROW_PROMPTS_WHO,
        )
        prep = prepare_rows(slots, row_slots, in_status, in_error, batch["image"], aspect=self._aspect,
                            background=(0, 0, 0))
        texts: list[str | None] = [None] * len(slots)
        for row in prep.images:
            for k in row_slots[row]:
                if slots[k].prompt is None:
                    prep.statuses[k], prep.errors[k] = "failed", promptless(slots[k])
                else:
                    texts[k] = ""
        return slot_columns(batch, slots, texts=texts, statuses=prep.statuses, errors=prep.errors, ran=prep.ran,
                            seconds=prep.seconds, model_ids=[NOOP_MODEL] * len(slots))
