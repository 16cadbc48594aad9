"""RSVQA-LR and RSVQA-HR (Lobry et al., 2020) as their Zenodo records distribute them.

Layout (``reference/benchmarks.md`` 1.2-1.4)::

    DATA/LR_split_test_questions.json   {"questions": [...]}   (HR: USGS_split_test_phili_*.json, ...)
    DATA/LR_split_test_answers.json     {"answers": [...]}
    DATA/LR_split_test_images.json      {"images": [...]}      (optional here)
    DATA/all_questions.json, all_answers.json                  (LR; HR: USGSquestions.json, USGSanswers.json)
    DATA/Images_LR/<img_id>.tif                                (HR: Data/<img_id>.tif)

Each split file keeps list position == record id and fills the ids of other splits with placeholders
``{"id": N, "active": false}``: only ``active`` records are used. A question's answer is the answer record
whose ``id`` is ``answers_ids[0]`` (else the one whose ``question_id`` is the question's id). If an
active split record lacks its text (a form some LR releases are said to have), the text is taken from the
whole-dataset tables. GeoChat's LRBEN is the LR ``test`` split, its HRBEN the HR ``test_phili`` split
(test set 2, Philadelphia); the question types GeoChat reports are presence, comparison and rural/urban
(LR) and presence and comparison (HR); every type present is scored here, each on its own.

Prompt: the question, a newline, ``Answer the question using a single word or phrase.``
(``prompts.vqa_prompt``, GeoChat's wording).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from rsflow.errors import RequestError
from rsflow.evaluate.samples import Sample
from rsflow.models.prompts import vqa_prompt

logger = logging.getLogger(__name__)

LR_TYPES: Final[tuple[str, ...]] = ("presence", "comp", "count", "rural_urban")
"""Question ``type`` values of RSVQA-LR."""
HR_TYPES: Final[tuple[str, ...]] = ("presence", "comp", "count", "area")
"""Question ``type`` values of RSVQA-HR."""
REPORTED_TYPES: Final[dict[str, tuple[str, ...]]] = {
    "LR": ("presence", "comp", "rural_urban"),
    "USGS": ("presence", "comp"),
}
"""The types GeoChat reports for LRBEN and HRBEN (``reference/models.md`` 6.1)."""

_LAYOUT: Final[dict[str, dict[str, Any]]] = {
    "LR": {
        "images": "Images_LR",
        "tables": ("all_questions.json", "all_answers.json"),
        "splits": ("test", "val", "train"),
    },
    "USGS": {
        "images": "Data",
        "tables": ("USGSquestions.json", "USGSanswers.json"),
        "splits": ("test_phili", "test", "val", "train"),
    },
}


RSVQA_IMAGE_DIRS: Final[dict[str, str]] = {prefix: layout["images"] for prefix, layout in _LAYOUT.items()}
"""Image folder under an RSVQA folder, by file prefix (``Images_LR``, ``Data``)."""


def keep_question_types(samples: list[Sample], question_types: Sequence[str] | None, where: str) -> list[Sample]:
    """The samples of ``question_types`` (all when none are given).

    Raises:
        RequestError: (``--question-types``) a type no sample of ``where`` has.
    """
    if not question_types:
        return samples
    present = sorted({s.group for s in samples})
    unknown = [t for t in question_types if t not in present]
    if unknown:
        raise RequestError("--question-types", f"{', '.join(unknown)} not in {where} (it has {', '.join(present)})")
    return [s for s in samples if s.group in question_types]


def _read_list(path: Path, key: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RequestError("--data", f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise RequestError("--data", f"{path} is not an RSVQA file: expected a JSON object {{{key!r}: [...]}}")
    return [r for r in doc[key] if isinstance(r, dict)]


def _by_id(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(r["id"]): r for r in records if "id" in r}


def load_rsvqa(
    data: Path,
    *,
    prefix: str,
    split: str | None = None,
    question_types: Sequence[str] | None = None,
    images: Path | None = None,
) -> list[Sample]:
    """Read one RSVQA split into samples (one per active question), in question-id order.

    Args:
        data: the folder holding the split files and the image folder.
        prefix: ``"LR"`` (RSVQA-LR) or ``"USGS"`` (RSVQA-HR).
        split: ``test``/``val``/``train`` (HR also ``test_phili``); default LR ``test``, HR ``test_phili``.
        question_types: keep only these ``type`` values (default: all).
        images: the image folder, when it is not ``Images_LR/`` (LR) or ``Data/`` (HR) under ``data``.

    Returns:
        Samples with ``group`` = the question type and one reference answer each.

    Raises:
        RequestError: (``--data``) a split file is missing or not RSVQA's shape, a question has no answer;
            (``--split``) an unknown split; (``--question-types``) a type not in the split.
    """
    layout = _LAYOUT[prefix]
    split = split or layout["splits"][0]
    if split not in layout["splits"]:
        raise RequestError("--split", f"RSVQA-{'LR' if prefix == 'LR' else 'HR'} has splits {', '.join(layout['splits'])}; got {split!r}")
    name = f"{prefix}_split_{split}"
    q_path, a_path = data / f"{name}_questions.json", data / f"{name}_answers.json"
    image_dir = images if images is not None else data / layout["images"]
    for path in (q_path, a_path):
        if not path.is_file():
            raise RequestError(
                "--data",
                f"{data} is not an RSVQA folder for this benchmark: {path.name} is missing (expected "
                f"{name}_questions.json, {name}_answers.json and {layout['images']}/ as in the Zenodo release)",
            )
    if not image_dir.is_dir():
        raise RequestError(
            "--data", f"{data} has no {layout['images']}/ image folder (RSVQA's <img_id>.tif files); or give --images"
        )
    questions = [q for q in _read_list(q_path, "questions") if q.get("active") is True]
    answers = _by_id([a for a in _read_list(a_path, "answers") if a.get("active") is True])
    answers_by_question = {int(a["question_id"]): a for a in answers.values() if "question_id" in a}
    images_path = data / f"{name}_images.json"
    active_images = (
        {int(i["id"]) for i in _read_list(images_path, "images") if i.get("active") is True}
        if images_path.is_file()
        else None
    )
    q_table: dict[int, dict[str, Any]] | None = None
    a_table: dict[int, dict[str, Any]] | None = None
    if any("question" not in q or "type" not in q or "img_id" not in q for q in questions):
        q_file = data / layout["tables"][0]
        if not q_file.is_file():
            raise RequestError("--data", f"{q_path.name} holds questions without text and {q_file.name} is missing")
        q_table = _by_id(_read_list(q_file, "questions"))

    samples: list[Sample] = []
    for q in sorted(questions, key=lambda r: int(r["id"])):
        qid = int(q["id"])
        full = {**(q_table.get(qid, {}) if q_table is not None else {}), **q}
        if "question" not in full or "img_id" not in full or "type" not in full:
            raise RequestError("--data", f"question {qid} of {q_path.name} has no question/img_id/type")
        answer = None
        ids = full.get("answers_ids") or []
        if ids:
            answer = answers.get(int(ids[0]))
        if answer is None:
            answer = answers_by_question.get(qid)
        if answer is None or "answer" not in answer:
            if a_table is None:
                a_file = data / layout["tables"][1]
                a_table = _by_id(_read_list(a_file, "answers")) if a_file.is_file() else {}
            answer = a_table.get(int(ids[0])) if ids else None
        if answer is None or "answer" not in answer:
            raise RequestError("--data", f"question {qid} of {q_path.name} has no answer in {a_path.name}")
        img_id = int(full["img_id"])
        if active_images is not None and img_id not in active_images:
            logger.warning("question %d refers to image %d, which is not active in %s", qid, img_id, images_path.name)
        samples.append(
            Sample(
                sample_id=str(qid),
                image_path=str((image_dir / f"{img_id}.tif").resolve()),
                task="vqa",
                prompt=vqa_prompt(str(full["question"])),
                references=(str(answer["answer"]),),
                group=str(full["type"]),
            )
        )
    samples = keep_question_types(samples, question_types, "this split")
    if not samples:
        raise RequestError("--data", f"{q_path} has no active question")
    return samples
