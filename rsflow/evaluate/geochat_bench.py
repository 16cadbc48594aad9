"""GeoChat-Bench's referring/grounding and region-captioning files (hub dataset ``MBZUAI/GeoChat-Bench``).

Layout (``reference/benchmarks.md`` 4)::

    DATA/referring.jsonl              one JSON object a line: question_id, image_id, question,
                                      ground_truth, type ("ref" | "grounding"), dataset, obj_ids, size_group
    DATA/region_captioning.jsonl      image_id, question (a box string), ground_truth (a phrase), ...
    DATA/<image_id>.png               GeoChat_Instruct's images (or under images/, final_images_llava/,
                                      share/softwares/kartik/GeoChat_finetuning/final_images_llava/)

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
from rsflow.evaluate.samples import Sample, polygon_json
from rsflow.models.prompts import IDENTIFY_PREFIX, REFER_PREFIX, REFER_SUFFIX

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


def _polygon(value: Any) -> list[tuple[float, float]]:
    """One ground-truth object: 4 ``[x, y]`` corners, or 8 numbers."""
    if isinstance(value, list) and len(value) == 8 and all(isinstance(v, int | float) for v in value):
        return [(float(value[i]), float(value[i + 1])) for i in range(0, 8, 2)]
    if isinstance(value, list) and len(value) == 4 and all(isinstance(p, list) and len(p) == 2 for p in value):
        return [(float(x), float(y)) for x, y in value]
    raise ValueError(f"expected 4 [x, y] corners, got {value!r}")


def _require(path: Path, number: int, row: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise RequestError("--data", f"{path.name} line {number} lacks {', '.join(missing)}")


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

    The sample id is ``question_id`` where the line has one, else ``<image_id>:<line number>``.

    Raises:
        RequestError: (``--data``) the file is missing or malformed, or no image folder holds the images.
    """
    path = data / "region_captioning.jsonl"
    rows = _read_jsonl(path)
    for number, row in rows:
        _require(path, number, row, ("image_id", "question", "ground_truth"))
    folder = _image_dir(data, images, str(rows[0][1]["image_id"]))
    samples = []
    for number, row in rows:
        sid = str(row["question_id"]) if "question_id" in row else f"{row['image_id']}:{number}"
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
