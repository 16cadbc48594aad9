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
whole-dataset tables, joined the same two ways. A field of the wrong kind (a null id, ``answers_ids`` that
is not a list, a blank question) is refused as ``--data`` naming the file and the record. GeoChat's LRBEN is the LR ``test`` split, its HRBEN the HR ``test_phili`` split
(test set 2, Philadelphia); the question types GeoChat reports are presence, comparison and rural/urban
(LR) and presence and comparison (HR); every type present is scored here, each on its own.

Prompt: the question, a newline, ``Answer the question using a single word or phrase.``
(``prompts.vqa_prompt``, GeoChat's wording).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
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


def _read_list(path: Path, key: str, *, active: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """The records of ``{key: [...]}`` with their positions in the list (RSVQA's record ids), the
    ``active`` ones only if asked."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RequestError("--data", f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise RequestError("--data", f"{path} is not an RSVQA file: expected a JSON object {{{key!r}: [...]}}")
    return [(k, r) for k, r in enumerate(doc[key]) if isinstance(r, dict) and (not active or r.get("active") is True)]


def _whole(value: Any, where: str) -> int:
    """An id field as an int (RSVQA writes ints; digit strings pass too).

    Raises:
        RequestError: (``--data``) None, a bool, a fraction or text that is not a number, named by
            ``where`` (file and record): a bare ``int()`` would end the run in a TypeError traceback.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise RequestError("--data", f"{where} is {value!r}, not a whole number")


def _by_id(records: list[tuple[int, dict[str, Any]]], path: Path, key: str) -> dict[int, dict[str, Any]]:
    """Records by ``id`` (those without one are left out)."""
    return {_whole(r["id"], f"{path.name}: the id of {key}[{k}]"): r for k, r in records if "id" in r}


def _text(value: Any) -> str | None:
    """A question, type or answer field as text; None where it is not text (null, a list, ...) or blank
    (``str()`` would make a null answer the reference "None", and a blank question an empty prompt)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a count answer written as a number ("7" is what RSVQA writes)
    return value if isinstance(value, str) and value.strip() else None


def _by_question(answers: dict[int, dict[str, Any]], path: Path) -> dict[int, dict[str, Any]]:
    """Answer records by ``question_id`` (the join's fallback when ``answers_ids`` is absent)."""
    return {_whole(a["question_id"], f"{path.name}: the question_id of answer {aid}"): a
            for aid, a in answers.items() if "question_id" in a}


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
        RequestError: (``--data``) a split file is missing or not RSVQA's shape, a record's id, img_id,
            answers_ids, question, type or answer is of the wrong kind, a question has no answer;
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
    active = _read_list(q_path, "questions", active=True)
    for k, q in active:
        if "id" not in q:
            raise RequestError("--data", f"{q_path.name}: questions[{k}] is active and has no id")
    questions = _by_id(active, q_path, "questions")
    if len(questions) < len(active):  # keyed by id: a question twice would be asked once
        counts = Counter(_whole(q["id"], "") for _, q in active)
        twice = next(i for i, n in counts.items() if n > 1)
        raise RequestError("--data", f"{q_path.name}: question id {twice} occurs twice among the active records")
    answers = _by_id(_read_list(a_path, "answers", active=True), a_path, "answers")
    answers_by_question = _by_question(answers, a_path)
    images_path = data / f"{name}_images.json"
    active_images = (
        set(_by_id(_read_list(images_path, "images", active=True), images_path, "images"))
        if images_path.is_file()
        else None
    )
    q_table: dict[int, dict[str, Any]] | None = None
    a_tables: tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]] | None = None
    a_file = data / layout["tables"][1]
    if any("question" not in q or "type" not in q or "img_id" not in q for q in questions.values()):
        q_file = data / layout["tables"][0]
        if not q_file.is_file():
            raise RequestError("--data", f"{q_path.name} holds questions without text and {q_file.name} is missing")
        q_table = _by_id(_read_list(q_file, "questions"), q_file, "questions")

    samples: list[Sample] = []
    for qid in sorted(questions):
        q = questions[qid]
        where = f"question {qid} of {q_path.name}"
        full = {**(q_table.get(qid, {}) if q_table is not None else {}), **q}
        if "question" not in full or "img_id" not in full or "type" not in full:
            raise RequestError("--data", f"{where} has no question/img_id/type")
        text, qtype = _text(full["question"]), _text(full["type"])
        if text is None or qtype is None:  # vqa_prompt would blame a --question flag rsflow eval does not have
            field, value = ("question", full["question"]) if text is None else ("type", full["type"])
            raise RequestError("--data", f"{where} has {field} {value!r}: expected non-empty text")
        img_id = _whole(full["img_id"], f"the img_id of {where}")
        ids = full.get("answers_ids")
        ids = [] if ids is None else ids
        if not isinstance(ids, list):
            raise RequestError("--data", f"{where} has answers_ids {ids!r}: expected a list of answer ids")
        first = _whole(ids[0], f"answers_ids[0] of {where}") if ids else None
        # answers_ids[0], else the answer whose question_id is this question's (reference/benchmarks.md 1.4)
        answer = answers.get(first) if first is not None else None
        if answer is None or "answer" not in answer:
            answer = answers_by_question.get(qid, answer)
        if answer is None or "answer" not in answer:  # a split record without text: the whole-dataset table
            if a_tables is None:
                table = _by_id(_read_list(a_file, "answers"), a_file, "answers") if a_file.is_file() else {}
                a_tables = (table, _by_question(table, a_file))
            answer = a_tables[0].get(first) if first is not None else None
            if answer is None or "answer" not in answer:
                answer = a_tables[1].get(qid)
        if answer is None or "answer" not in answer:
            raise RequestError("--data", f"{where} has no answer in {a_path.name}"
                                         + (f" or {a_file.name}" if a_file.is_file() else ""))
        reference = _text(answer["answer"])
        if reference is None:
            raise RequestError("--data", f"the answer of {where} is {answer['answer']!r}: expected non-empty text")
        if active_images is not None and img_id not in active_images:
            logger.warning("question %d refers to image %d, which is not active in %s", qid, img_id, images_path.name)
        samples.append(
            Sample(
                sample_id=str(qid),
                image_path=str((image_dir / f"{img_id}.tif").resolve()),
                task="vqa",
                prompt=vqa_prompt(text),
                references=(reference,),
                group=qtype,
            )
        )
    samples = keep_question_types(samples, question_types, "this split")
    if not samples:
        raise RequestError("--data", f"{q_path} has no active question")
    return samples
