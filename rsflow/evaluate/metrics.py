"""Benchmark metrics: answer normal forms, accuracy by group, confusion matrices, rotated-box accuracy.

Pure functions of answers and references (no model, no Ray, no files). Caption metrics, which run the
COCO caption toolkit, are in :mod:`rsflow.evaluate.caption_metrics`.

Answer normalisation follows the reference scorers (``reference/models.md`` 6.1, 7 item 18):

- scenes and RSVQA (GeoChat's ``evaluation_metrics`` and the community RSVQA scorer of GeoChat issue #32):
  the prediction with every space removed, lower-cased, every ``.`` removed, compared for equality with
  the reference in the same form. The reference scorers lower-case the ground truth only; removing its
  spaces and dots too changes nothing for one-word answers (``yes``, ``rural``, ``7``, a class folder) and
  keeps multi-word answers (``1250 m2``, a display class name) comparable (``reference/benchmarks.md`` 1.7);
- the rsflow demo set: the answer stripped of surrounding spaces and one final full stop, compared
  case-sensitively (what ``rsflow.finetune.demo.evaluate_demo`` recorded for the demo model).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from shapely.geometry import Polygon

from rsflow.merge import rotated_iou
from rsflow.presets import scene_normal_form

logger = logging.getLogger(__name__)

IOU_THRESHOLD: Final[float] = 0.5
"""A ground-truth object is found when a predicted box has IoU above this with it (GeoChat's acc@0.5).

Strictly above, as TEOChat's scorer (``get_single_image_results``: ``iou > iou_thr``), which
benchmarks.md 4.4 follows ("IoU > 0.5"); models.md 6.1 says ">= 0.5". GeoChat published no scorer.
They differ only at an IoU of exactly 0.5, which boxes on GeoChat's 0-100 grid can reach (a box and
one of its halves)."""

NO_CLASS: Final[str] = "(no class)"
"""Confusion-matrix column of answers that name none of the classes."""


def geochat_normal_form(text: str | None) -> str:
    """GeoChat's answer normal form: spaces removed, lower-cased, dots removed (in that order).

    >>> geochat_normal_form("Dense Residential.")
    'denseresidential'
    >>> geochat_normal_form(" Yes.")
    'yes'
    """
    return scene_normal_form(text or "")


def demo_normal_form(text: str | None) -> str:
    """The demo set's answer form: surrounding spaces and one final full stop removed, case kept.

    >>> demo_normal_form(" About 20%. ")
    'About 20%'
    """
    return str(text or "").strip().rstrip(".").strip()


@dataclass(frozen=True)
class Accuracy:
    """Correct answers among ``n``."""

    correct: int
    """Answers equal to the reference."""
    n: int
    """Answers scored."""

    @property
    def accuracy(self) -> float:
        """``correct / n`` (0-1); 0.0 when ``n`` is 0."""
        return self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "n": self.n}


def accuracy_by_group(outcomes: Iterable[tuple[str, bool]]) -> tuple[Accuracy, dict[str, Accuracy]]:
    """Overall and per-group accuracy of ``(group, correct)`` outcomes.

    Returns:
        ``(overall, {group: accuracy})``, groups in order of first appearance.
    """
    counts: dict[str, list[int]] = {}
    for group, ok in outcomes:
        c = counts.setdefault(group, [0, 0])
        c[0] += int(bool(ok))
        c[1] += 1
    per = {g: Accuracy(c, n) for g, (c, n) in counts.items()}
    return Accuracy(sum(a.correct for a in per.values()), sum(a.n for a in per.values())), per


def vqa_metrics(
    outcomes: Sequence[tuple[str, bool]], *, reported_types: Sequence[str] = ()
) -> dict[str, Any]:
    """RSVQA-style metrics: overall accuracy (OA), average accuracy over types (AA), per type.

    Args:
        outcomes: ``(question type, correct)`` per question.
        reported_types: the types a paper reports (GeoChat: LR presence/comp/rural_urban, HR
            presence/comp); when given, OA and AA over just those types are added, as the papers'
            headline numbers are.

    Returns:
        ``accuracy`` (OA), ``average_accuracy`` (AA), ``correct``, ``n``, ``per_type`` {type: {accuracy,
        correct, n}} and, with ``reported_types``, ``reported_types``, ``missing_reported_types`` (those
        with no scored question), ``correct_reported_types``, ``n_reported_types`` (over the types
        present), ``accuracy_reported_types`` and ``average_accuracy_reported_types``. The last two are
        None unless every reported type has a scored question: a paper's figure averages all of them, and
        the same name over a subset (``--question-types presence``; a ``--limit`` draw without the rare
        rural_urban) would sit beside it as if comparable.
    """
    overall, per = accuracy_by_group(outcomes)
    out: dict[str, Any] = {
        "accuracy": overall.accuracy,
        "average_accuracy": sum(a.accuracy for a in per.values()) / len(per) if per else 0.0,
        "correct": overall.correct,
        "n": overall.n,
        "per_type": {t: a.to_json() for t, a in sorted(per.items())},
    }
    if reported_types:
        sub = [per[t] for t in reported_types if t in per]
        missing = [t for t in reported_types if t not in per]
        c, n = sum(a.correct for a in sub), sum(a.n for a in sub)
        out.update(
            reported_types=list(reported_types),
            missing_reported_types=missing,
            correct_reported_types=c,
            n_reported_types=n,
            accuracy_reported_types=c / n if n and not missing else None,
            average_accuracy_reported_types=sum(a.accuracy for a in sub) / len(sub) if sub and not missing else None,
        )
    return out


def match_scene_class(text: str | None, classes: Sequence[str]) -> str | None:
    """The class whose GeoChat normal form equals the answer's, else None (no fuzzy matching)."""
    norm = geochat_normal_form(text)
    for name in classes:
        if geochat_normal_form(name) == norm:
            return name
    return None


def classification_metrics(
    references: Sequence[str], predictions: Sequence[str | None], classes: Sequence[str]
) -> dict[str, Any]:
    """Scene-classification accuracy (GeoChat's rule), per-class accuracy and the confusion matrix.

    Args:
        references: the true class (display name) per image.
        predictions: the class each answer names (:func:`match_scene_class`), None for none.
        classes: every class of the dataset, in order (rows and columns of the matrix).

    Returns:
        ``accuracy``, ``correct``, ``n``, ``no_class`` (answers naming no class), ``per_class``
        {class: {accuracy, correct, n}} for the classes present, and ``confusion_matrix``: ``labels``
        (rows: true class), ``predicted`` (columns: the classes then :data:`NO_CLASS`) and ``counts``.
    """
    index = {c: i for i, c in enumerate(classes)}
    columns = [*classes, NO_CLASS]
    counts = [[0] * len(columns) for _ in classes]
    for ref, pred in zip(references, predictions, strict=True):
        counts[index[ref]][index[pred] if pred is not None else len(classes)] += 1
    overall, per = accuracy_by_group((ref, pred == ref) for ref, pred in zip(references, predictions, strict=True))
    return {
        "accuracy": overall.accuracy,
        "correct": overall.correct,
        "n": overall.n,
        "no_class": sum(p is None for p in predictions),
        "per_class": {c: per[c].to_json() for c in classes if c in per},
        "confusion_matrix": {"labels": list(classes), "predicted": columns, "counts": counts},
    }


def valid_polygon(points: Sequence[Sequence[float]]) -> Polygon:
    """A polygon from corner points; a self-intersecting corner order is repaired by taking the convex
    hull (boxes are convex, so the hull is the box itself)."""
    poly = Polygon([(float(x), float(y)) for x, y in points])
    if not poly.is_valid:
        hull = poly.convex_hull
        poly = hull if isinstance(hull, Polygon) else Polygon()
    return poly


def objects_found(
    predicted: Sequence[Polygon], truth: Sequence[Polygon], *, threshold: float = IOU_THRESHOLD
) -> int:
    """How many ground-truth objects a set of predicted boxes finds, one prediction per object.

    Pairs with IoU > ``threshold`` (true polygon IoU of the rotated boxes, ``merge.rotated_iou``) are
    matched greedily by descending IoU, each prediction and each object used once (TEOChat's
    reproduction of GeoChat's acc@0.5; GeoChat published no scorer).
    """
    pairs = []
    for i, p in enumerate(predicted):
        for j, g in enumerate(truth):
            iou = rotated_iou(p, g)
            if iou > threshold:
                pairs.append((iou, i, j))
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    used_p: set[int] = set()
    used_g: set[int] = set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
    return len(used_g)


@dataclass(frozen=True)
class BoxOutcome:
    """One referring/grounding question scored."""

    group: str
    """GeoChat-Bench ``type`` (``ref`` / ``grounding``)."""
    size_group: str
    """``small`` / ``medium`` / ``large``, or empty."""
    objects: int
    """Ground-truth objects of the question."""
    found: int
    """Of those, found by a predicted box (:func:`objects_found`)."""
    predicted: int
    """Boxes the answer gave."""


def _object_accuracy(items: Iterable[BoxOutcome]) -> dict[str, Any]:
    items = list(items)
    objects = sum(o.objects for o in items)
    found = sum(o.found for o in items)
    return {"accuracy": found / objects if objects else 0.0, "found": found, "objects": objects,
            "questions": len(items)}


def box_metrics(outcomes: Sequence[BoxOutcome], *, threshold: float = IOU_THRESHOLD) -> dict[str, Any]:
    """acc@IoU over ground-truth objects (found / all objects), overall and by size, type and object count.

    Returns:
        ``accuracy`` (objects found / objects), ``found``, ``objects``, ``questions``, ``iou_threshold``,
        ``no_box`` (answers without a readable box), ``by_size`` {size_group}, ``by_type`` {type} and
        ``by_count`` {``single``, ``multiple``} (questions with one vs several target objects), each
        {accuracy, found, objects, questions}.
    """
    out = _object_accuracy(outcomes)
    out["iou_threshold"] = threshold
    out["no_box"] = sum(o.predicted == 0 for o in outcomes)
    sizes = sorted({o.size_group for o in outcomes if o.size_group})
    out["by_size"] = {s: _object_accuracy(o for o in outcomes if o.size_group == s) for s in sizes}
    types = sorted({o.group for o in outcomes if o.group})
    out["by_type"] = {t: _object_accuracy(o for o in outcomes if o.group == t) for t in types}
    out["by_count"] = {
        "single": _object_accuracy(o for o in outcomes if o.objects == 1),
        "multiple": _object_accuracy(o for o in outcomes if o.objects > 1),
    }
    return out


def round_floats(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded (metrics JSON stays readable and stable across runs)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, Mapping):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [round_floats(v, digits) for v in value]
    return value
