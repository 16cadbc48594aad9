"""GeoChat-Bench's referring/grounding and region-captioning files (hub dataset ``MBZUAI/GeoChat-Bench``).

Layout (``reference/benchmarks.md`` 4)::

    DATA/referring.jsonl              one JSON object a line: question_id, image_id, question,
                                      ground_truth, type ("ref" | "grounding"), dataset, obj_ids, size_group
    DATA/region_captioning.jsonl      image_id, question (a box string), ground_truth (a phrase), ...
    DATA/<image_id>.png               GeoChat_Instruct's images (or under images/, final_images_llava/,
                                      share/softwares/kartik/GeoChat_finetuning/final_images_llava/)
    DATA/UCmerced.jsonl, aid.jsonl    scene classification: question_id (``<class>/<file>``), image (a path
                                      under the dataset's image root), text (the prompt, classes included),
                                      ground_truth; images: UCMerced_LandUse/Images/..., AID/... (--images)
    lrben.jsonl, hrben.jsonl          VQA: question_id (the RSVQA question id), image (``<img_id>.tif``), text
                                      (the question and GeoChat's instruction), category; no answer: joined
                                      with the RSVQA folder's (``--data``; the file itself: ``--questions``)

Referring ground truth is one 4-point polygon ``[[x, y], ...]`` per object, in pixels of the image
(a flat list of 8 numbers is accepted too). Prompts (``reference/models.md`` 3.4, 7 item 16):
``[refer] Give me the location of <p> {question} </p>`` for ``type == "ref"``, ``[grounding]{question}``
otherwise, ``[identify] What is the object present at {question}`` for region captioning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Final

from rsflow.errors import RequestError
from rsflow.evaluate.rsvqa import RSVQA_IMAGE_DIRS, keep_question_types, load_rsvqa
from rsflow.evaluate.samples import Sample, polygon_json
from rsflow.models.prompts import IDENTIFY_PREFIX, IMAGE_TOKEN, REFER_PREFIX, REFER_SUFFIX
from rsflow.presets import scene_normal_form

logger = logging.getLogger(__name__)

GROUNDING_PREFIX: Final[str] = "[grounding]"
"""GeoChat's grounding task token; the query follows with no space (batch_geochat_grounding.py)."""

_IMAGE_DIRS: Final[tuple[str, ...]] = (
    ".",
    "images",
    "final_images_llava",
    "share/softwares/kartik/GeoChat_finetuning/final_images_llava",
)


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise RequestError("--data", f"{path.parent} is not a GeoChat-Bench folder: {path.name} is missing")
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise RequestError("--data", f"{path.name} line {number} is not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise RequestError("--data", f"{path.name} line {number} is not a JSON object")
            rows.append((number, row))
    if not rows:
        raise RequestError("--data", f"{path} is empty")
    return rows


def _image_dir(data: Path, images: Path | None, first_image_id: str) -> Path:
    if images is not None:
        return images.resolve()
    for rel in _IMAGE_DIRS:
        if (data / rel / f"{first_image_id}.png").is_file():
            return (data / rel).resolve()
    raise RequestError(
        "--data",
        f"no folder under {data} holds {first_image_id}.png (looked in {', '.join(_IMAGE_DIRS)}); "
        "give GeoChat_Instruct's image folder with --images",
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _polygon(value: Any) -> list[tuple[float, float]]:
    """One ground-truth object: 4 ``[x, y]`` corners, or 8 numbers.

    Raises:
        ValueError: another shape, or a coordinate that is not a number (``[null, 10]``: ``float(None)``
            would be a TypeError traceback, not one line naming the file and line).
    """
    if isinstance(value, list) and len(value) == 8 and all(_number(v) for v in value):
        return [(float(value[i]), float(value[i + 1])) for i in range(0, 8, 2)]
    if isinstance(value, list) and len(value) == 4 and all(isinstance(p, list) and len(p) == 2 for p in value):
        bad = next((p for p in value if not all(_number(v) for v in p)), None)
        if bad is not None:
            raise ValueError(f"corner {bad!r} is not two numbers")
        return [(float(x), float(y)) for x, y in value]
    raise ValueError(f"expected 4 [x, y] corners, got {value!r}")


def _require(path: Path, number: int, row: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise RequestError("--data", f"{path.name} line {number} lacks {', '.join(missing)}")
    null = [k for k in keys if row[k] is None]  # str(None) would make an image 'None.png' or a prompt 'None'
    if null:
        raise RequestError("--data", f"{path.name} line {number} has null {', '.join(null)}")


def load_referring(data: Path, *, images: Path | None = None) -> list[Sample]:
    """``referring.jsonl`` -> one box sample per line (``[refer]`` or ``[grounding]``), in file order.

    Raises:
        RequestError: (``--data``) the file is missing or malformed, a ground truth is not polygons,
            no image folder holds the images.
    """
    path = data / "referring.jsonl"
    rows = _read_jsonl(path)
    keys = ("question_id", "image_id", "question", "ground_truth")
    for number, row in rows:
        _require(path, number, row, keys)
    folder = _image_dir(data, images, str(rows[0][1]["image_id"]))
    samples = []
    for number, row in rows:
        truth = row["ground_truth"]
        if not isinstance(truth, list) or not truth:
            raise RequestError("--data", f"{path.name} line {number}: ground_truth must be a list of polygons")
        try:
            polygons = tuple(polygon_json(_polygon(obj)) for obj in truth)
        except ValueError as exc:
            raise RequestError("--data", f"{path.name} line {number}: ground_truth {exc}") from exc
        kind = str(row.get("type", "ref"))
        question = str(row["question"]).strip()
        prompt = f"{REFER_PREFIX}{question}{REFER_SUFFIX}" if kind == "ref" else f"{GROUNDING_PREFIX}{question}"
        samples.append(
            Sample(
                sample_id=str(row["question_id"]),
                image_path=str(folder / f"{row['image_id']}.png"),
                task="refer",
                prompt=prompt,
                references=polygons,
                group=kind,
                size_group=str(row.get("size_group") or ""),
            )
        )
    return samples


def load_region_captions(data: Path, *, images: Path | None = None) -> list[Sample]:
    """``region_captioning.jsonl`` -> one ``[identify]`` sample per line, in file order.

    The sample id is ``question_id`` where every line has one and no two share it (the file's per-line keys
    are unconfirmed), else ``<image_id>:<line number>`` for every line.

    Raises:
        RequestError: (``--data``) the file is missing or malformed, or no image folder holds the images.
    """
    path = data / "region_captioning.jsonl"
    rows = _read_jsonl(path)
    for number, row in rows:
        _require(path, number, row, ("image_id", "question", "ground_truth"))
    folder = _image_dir(data, images, str(rows[0][1]["image_id"]))
    ids = [str(row["question_id"]) for _, row in rows if "question_id" in row]
    by_question = len(ids) == len(rows) and len(set(ids)) == len(ids)
    if ids and not by_question:
        logger.warning("%s: question_id is missing or repeated; samples are named <image_id>:<line>", path.name)
    samples = []
    for number, row in rows:
        sid = str(row["question_id"]) if by_question else f"{row['image_id']}:{number}"
        samples.append(
            Sample(
                sample_id=sid,
                image_path=str(folder / f"{row['image_id']}.png"),
                task="region-caption",
                prompt=f"{IDENTIFY_PREFIX}{str(row['question']).strip()}",
                references=(str(row["ground_truth"]),),
                group=str(row.get("type") or ""),
                size_group=str(row.get("size_group") or ""),
            )
        )
    return samples


_SCENE_ROOTS: Final[tuple[str, ...]] = (".", "Images", "UCMerced_LandUse/Images", "AID", "images")


def load_scene_jsonl(
    data: Path, *, file: str, classes: tuple[str, ...], dataset: str, images: Path | None = None
) -> list[Sample]:
    """GeoChat-Bench's scene classification file (``UCmerced.jsonl``, ``aid.jsonl``) -> one classify sample
    per line, in file order, as ``batch_geochat_scene.py`` reads it (``reference/benchmarks.md`` 4.2):
    the prompt is the line's ``text`` (its class list and instruction included), the sample id its
    ``question_id``, and the label the class folder that ``question_id`` starts with (the official
    scorer's ``question_id.split('/')[0]``; ``aid.jsonl``'s ``ground_truth`` strings carry a stray
    ``gt``). Images are ``image`` under ``--images`` or the first folder of ``DATA`` that holds the first
    one; an ``image`` whose extension is not the file's (``aid.jsonl``; AID's files are ``.jpg``) is read
    as the ``.jpg`` beside it.

    Raises:
        RequestError: (``--data``) the file is missing or malformed, a line's class folder is not a class
            of ``dataset``, or no folder holds the first image.
    """
    path = data / file
    rows = _read_jsonl(path)
    by_norm = {scene_normal_form(c): c for c in classes}
    for number, row in rows:
        _require(path, number, row, ("question_id", "image", "text"))
    first = str(rows[0][1]["image"])
    if images is not None:
        root = images.resolve()
    else:
        found = [data / rel for rel in _SCENE_ROOTS if _scene_image(data / rel, first) is not None]
        if not found:
            raise RequestError(
                "--data",
                f"no folder under {data} holds {first} (looked in {', '.join(_SCENE_ROOTS)}); "
                f"give {dataset}'s image folder with --images",
            )
        root = found[0].resolve()
    samples = []
    for number, row in rows:
        question_id, image = str(row["question_id"]), str(row["image"])
        folder = question_id.split("/")[0] if "/" in question_id else image.split("/")[0]
        label = by_norm.get(scene_normal_form(folder))
        if label is None:
            raise RequestError(
                "--data", f"{path.name} line {number}: {folder!r} (question_id {question_id!r}) is not a class of "
                          f"{dataset} ({', '.join(classes)})",
            )
        samples.append(
            Sample(
                sample_id=question_id,
                image_path=str(_scene_image(root, image) or root / image),
                task="classify",
                prompt=str(row["text"]).strip(),
                references=(label,),
            )
        )
    return samples


def _scene_image(root: Path, image: str) -> Path | None:
    """``root/image``, else the ``.jpg`` of the same name (aid.jsonl names AID's .jpg files otherwise)."""
    path = root / image
    if path.is_file():
        return path
    jpg = path.with_suffix(".jpg")
    return jpg if jpg.is_file() else None


def load_vqa_jsonl(
    data: Path,
    *,
    file: str,
    prefix: str,
    questions: Path | None = None,
    images: Path | None = None,
    question_types: tuple[str, ...] = (),
) -> list[Sample]:
    """GeoChat-Bench's VQA file (``lrben.jsonl``, ``hrben.jsonl``) -> one VQA sample per line, in file order,
    as ``batch_geochat_vqa.py`` asks them (``reference/benchmarks.md`` 4.2): the prompt is the line's
    ``text`` (the question and GeoChat's instruction, not appended again), the image the line's ``image``
    in the RSVQA image folder. The file has no answers: each line's ``question_id`` is looked up among
    the active questions of the RSVQA split GeoChat used (LRBEN: LR ``test``; HRBEN: HR ``test_phili``)
    in ``data``, the RSVQA folder as distributed, which gives the answer and the question type (the group
    scored; ``--question-types`` keeps some). A line's ``category`` that names another type than RSVQA's
    is logged, not trusted.

    Args:
        data: the RSVQA folder (split files and ``Images_LR/`` or ``Data/``).
        file: ``lrben.jsonl`` or ``hrben.jsonl`` (read from ``data`` unless ``questions`` is given).
        prefix: ``"LR"`` or ``"USGS"`` (:func:`rsflow.evaluate.rsvqa.load_rsvqa`).
        questions: ``--questions``, the GeoChat-Bench file where it is not in ``data``.
        images: ``--images``, the image folder where it is not under ``data``.
        question_types: keep only these RSVQA types.

    Raises:
        RequestError: (``--questions``) the file is missing or malformed; (``--data``) not an RSVQA folder, a
            question id that is not an active question of the split, a line whose image is not the one
            RSVQA gives its question; (``--question-types``) a type no line has.
    """
    if questions is not None and not questions.is_file():
        raise RequestError("--questions", f"no such file {str(questions)!r} (GeoChat-Bench's {file})")
    path = questions if questions is not None else data / file
    if not path.is_file():
        raise RequestError(
            "--questions", f"{data} holds no {file}: give GeoChat-Bench's {file} with --questions, or put it in --data"
        )
    try:
        rows = _read_jsonl(path)
    except RequestError as exc:
        raise RequestError("--questions", exc.reason) from None
    for number, row in rows:
        missing = [k for k in ("question_id", "image", "text") if k not in row]
        if missing:
            raise RequestError("--questions", f"{path.name} line {number} lacks {', '.join(missing)}")
    known = {s.sample_id: s for s in load_rsvqa(data, prefix=prefix, images=images)}
    image_dir = (images if images is not None else data / RSVQA_IMAGE_DIRS[prefix]).resolve()
    samples = []
    disagree = 0
    for number, row in rows:
        qid = str(row["question_id"]).strip()
        found = known.get(qid)
        if found is None:
            raise RequestError(
                "--data", f"{path.name} line {number}: question {qid} is not an active question of {data}'s "
                          f"{'LR test' if prefix == 'LR' else 'HR test_phili'} split (is --data the right RSVQA folder?)",
            )
        image = image_dir / str(row["image"])
        if image.name != Path(found.image_path).name:
            raise RequestError(
                "--data", f"{path.name} line {number}: question {qid} is about image {row['image']!r} there and "
                          f"{Path(found.image_path).name!r} in RSVQA: not the same dataset",
            )
        category = row.get("category")
        disagree += category is not None and str(category) != found.group
        samples.append(
            Sample(
                sample_id=qid,
                image_path=str(image),
                task="vqa",
                prompt=str(row["text"]).replace(IMAGE_TOKEN, "").strip(),
                references=found.references,
                group=found.group,
            )
        )
    if disagree:
        logger.warning("%s: %d line(s) name another category than RSVQA's question type; RSVQA's type is scored",
                       path.name, disagree)
    return keep_question_types(samples, question_types, path.name)
