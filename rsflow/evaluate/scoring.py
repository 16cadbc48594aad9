"""Model text -> a benchmark's answer, and a whole run's answers -> its metrics.

:func:`read_answer` is applied to each prediction (the ``answer``, ``correct`` and ``score`` columns of
``predictions.parquet``); :func:`score` re-reads every prediction's raw text the same way and computes the
benchmark's metrics over the scored samples at once (corpus metrics such as CIDEr need the whole set).
A sample whose inference failed counts as answered wrongly (an empty caption, no box) and is counted in
``failed``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rsflow.evaluate.benchmarks import Benchmark
from rsflow.evaluate.caption_metrics import score_captions
from rsflow.evaluate.metrics import (
    BoxOutcome,
    box_metrics,
    classification_metrics,
    match_scene_class,
    objects_found,
    valid_polygon,
    vqa_metrics,
)
from rsflow.evaluate.samples import Sample
from rsflow.georef import box_to_pixels, rotated_rect_px
from rsflow.models.parse import parse_boxes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What one reply says, read for its benchmark."""

    answer: str | None
    """The parsed answer: the VQA normal form, the class named, the caption, or the predicted boxes
    as JSON pixel polygons; None when there is no reply."""
    correct: bool | None
    """Exact-match benchmarks: whether it equals the reference; boxes: every object found; captions: None."""
    score: float | None = None
    """Boxes: the share of the sample's ground-truth objects found (IoU > 0.5); else None."""


def seen_square(width_px: int, height_px: int, aspect: str = "pad") -> tuple[int, float, float]:
    """The square image the model saw, in the original image's pixels: ``(side, left, top)``, the 0-100 grid
    of its boxes spanning it. ``"pad"``: LLaVA's ``expand2square`` pastes the image at ``((side - w) // 2,
    (side - h) // 2)`` of a ``max(w, h)`` square, so the square starts left of and above the image;
    ``"crop"``: the image processor's centre crop, a ``min(w, h)`` square in the middle. A square image is
    ``(w, 0, 0)`` either way (the benchmarks' images nearly all are)."""
    if aspect == "crop":
        side = min(width_px, height_px)
        return side, (width_px - side) / 2, (height_px - side) / 2
    side = max(width_px, height_px)
    return side, -float((side - width_px) // 2), -float((side - height_px) // 2)


def predicted_polygons(text: str | None, width_px: int, height_px: int,
                       aspect: str = "pad") -> list[list[tuple[float, float]]]:
    """GeoChat boxes of a reply (0-100 grid of the square the model saw, :func:`seen_square`) as rotated
    rectangles in pixels of the ``width_px`` x ``height_px`` image (``georef.box_to_pixels`` then
    ``georef.rotated_rect_px``: geochat_demo's ``bbox_and_angle_to_polygon``)."""
    if not text or width_px <= 0 or height_px <= 0:
        return []
    side, left, top = seen_square(width_px, height_px, aspect)
    polys = []
    for box in parse_boxes(text).boxes:
        x1, y1, x2, y2, angle = box_to_pixels(box, side, side)
        poly = rotated_rect_px(x1 + left, y1 + top, x2 + left, y2 + top, angle)
        polys.append([(float(x), float(y)) for x, y in list(poly.exterior.coords)[:4]])
    return polys


def _box_outcome(sample: Sample, text: str | None, width_px: int, height_px: int, aspect: str = "pad") -> BoxOutcome:
    predicted = [valid_polygon(p) for p in predicted_polygons(text, width_px, height_px, aspect)]
    truth = [valid_polygon(json.loads(ref)) for ref in sample.references]
    return BoxOutcome(sample.group, sample.size_group, len(truth), objects_found(predicted, truth), len(predicted))


def read_answer(benchmark: Benchmark, sample: Sample, text: str | None, width_px: int = 0,
                height_px: int = 0, aspect: str = "pad") -> Answer:
    """Read one reply as ``benchmark`` scores it.

    Args:
        benchmark: the benchmark.
        sample: the sample asked.
        text: the model's reply (None when inference failed).
        width_px: the image's width in pixels (box benchmarks scale the 0-100 grid by it).
        height_px: the image's height in pixels.
        aspect: how the image reached the model (``pad`` or ``crop``, :func:`seen_square`).
    """
    if text is None:
        return Answer(None, None if benchmark.kind == "caption" else False, 0.0 if benchmark.kind == "boxes" else None)
    if benchmark.kind == "vqa":
        norm = benchmark.normal_form(text)
        return Answer(norm, norm == benchmark.normal_form(sample.references[0]))
    if benchmark.kind == "classify":
        label = match_scene_class(text, benchmark.classes)
        return Answer(label if label is not None else benchmark.normal_form(text), label == sample.references[0])
    if benchmark.kind == "boxes":
        outcome = _box_outcome(sample, text, width_px, height_px, aspect)
        polys = predicted_polygons(text, width_px, height_px, aspect)
        rounded = [[[round(x, 3), round(y, 3)] for x, y in poly] for poly in polys]
        return Answer(json.dumps(rounded), outcome.found == outcome.objects,
                      outcome.found / outcome.objects if outcome.objects else 0.0)
    return Answer(text.strip(), None)


def score(
    benchmark: Benchmark,
    samples: Sequence[Sample],
    predictions: Mapping[str, Mapping[str, Any]],
    *,
    caption_metrics: Sequence[str] = (),
    tokenizer: str = "ptb",
    aspect: str = "pad",
) -> dict[str, Any]:
    """The benchmark's metrics over ``samples``.

    Args:
        benchmark: the benchmark.
        samples: the scored samples.
        predictions: sample id -> its prediction row (``text``, ``status``, ``image_width``,
            ``image_height``); every sample must have one.
        caption_metrics: caption kinds: which metrics (default: the benchmark's).
        tokenizer: caption kinds: ``ptb`` or ``simple``.
        aspect: box kinds: how the images reached the model (``pad`` or ``crop``, :func:`seen_square`).

    Returns:
        The metrics (see :mod:`rsflow.evaluate.metrics`), plus ``samples`` and ``failed`` (predictions
        without text).
    """
    texts: dict[str, str | None] = {}
    for s in samples:
        row = predictions[s.sample_id]
        texts[s.sample_id] = row.get("text") if row.get("status") == "ok" else None
    failed = sum(t is None for t in texts.values())
    out: dict[str, Any]
    if benchmark.kind == "vqa":
        outcomes = [(s.group, bool(read_answer(benchmark, s, texts[s.sample_id]).correct)) for s in samples]
        out = vqa_metrics(outcomes, reported_types=benchmark.reported_types)
    elif benchmark.kind == "classify":
        preds = [match_scene_class(texts[s.sample_id], benchmark.classes) for s in samples]
        out = classification_metrics([s.references[0] for s in samples], preds, benchmark.classes)
    elif benchmark.kind == "boxes":
        out = box_metrics(
            [
                _box_outcome(s, texts[s.sample_id], int(predictions[s.sample_id].get("image_width") or 0),
                             int(predictions[s.sample_id].get("image_height") or 0), aspect)
                for s in samples
            ]
        )
    else:
        out = score_captions(
            {s.sample_id: texts[s.sample_id] or "" for s in samples},
            {s.sample_id: list(s.references) for s in samples},
            metrics=caption_metrics or benchmark.caption_metrics,
            tokenizer=tokenizer,
        )
    out["samples"] = len(samples)
    out["failed"] = failed
    return out
