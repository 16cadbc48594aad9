"""Writers of tiny benchmark folders in each format as its authors distribute it (``reference/benchmarks.md``).

Each writer puts ``n`` samples (20 by default) into a folder with the real file names, field names and
nesting, plus the traps the reference warns about (RSVQA's inactive placeholder records and list
position == id, images of another size in UCMerced, a 4-point ground truth per object), and returns
what a loader must find, so tests can compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image

from rsflow.presets import AID_CLASSES, UCMERCED_CLASSES


def _pixels(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_image(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    """An RGB image file (format from the suffix; ``size`` is width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed, size[1], size[0])).save(path)


def write_geotiff(path: Path, seed: int, size: int = 32) -> None:
    """A 3-band uint8 GeoTIFF, as RSVQA ships its images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.moveaxis(_pixels(seed, size, size), -1, 0)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:28992", transform=Affine(10.0, 0.0, 100000.0, 0.0, -10.0, 450000.0)) as dst:
        dst.write(data)


# --------------------------------------------------------------------------------------------- RSVQA

_LR_TYPES = ("presence", "comp", "rural_urban", "count")
_HR_TYPES = ("presence", "comp", "count", "area")


def _answer_for(qtype: str, i: int) -> str:
    return {
        "presence": ("yes", "no")[i % 2],
        "comp": ("no", "yes")[i % 2],
        "rural_urban": ("rural", "urban")[i % 2],
        "count": str(i % 5),
        "area": f"{(i % 3) * 250}m2",
    }[qtype]


def write_rsvqa(root: Path, *, hr: bool = False, n: int = 20, text_in_split: bool = True) -> dict[str, Any]:
    """An RSVQA split (LR ``test`` or HR ``test_phili``) with ``n`` active questions.

    Ids 0-5 belong to another split and appear as placeholders ``{"id", "active": false}`` (list
    position == id, as ``AutomaticDB/Splits.py`` writes them); questions 6.. are active, five per image.
    With ``text_in_split=False`` the split's active question records carry only ``id``, ``active`` and
    ``answers_ids``, and their text is in the whole-dataset table (``all_questions.json`` /
    ``USGSquestions.json``).

    Returns:
        ``{"questions": {id: (image id, type, question, answer)}, ...}``.
    """
    prefix, split, image_dir = ("USGS", "test_phili", "Data") if hr else ("LR", "test", "Images_LR")
    types = _HR_TYPES if hr else _LR_TYPES
    n_other, per_image = 6, 5
    n_images = (n + per_image - 1) // per_image
    first_img = 2  # images 0-1 belong to another split
    questions: list[dict[str, Any]] = [{"id": i, "active": False} for i in range(n_other)]
    answers: list[dict[str, Any]] = [{"id": i, "active": False} for i in range(n_other)]
    images: list[dict[str, Any]] = [{"id": i, "active": False} for i in range(first_img)]
    expected: dict[int, tuple[int, str, str, str]] = {}
    full_questions: list[dict[str, Any]] = [{"id": i, "active": False} for i in range(n_other)]
    for k in range(n_images):
        img_id = first_img + k
        ids = list(range(n_other + k * per_image, min(n_other + (k + 1) * per_image, n_other + n)))
        images.append({"id": img_id, "date_added": 1588000000.0, "original_name": f"tile_{img_id}",
                       "sensor": "Sentinel-2" if not hr else "USGS", "people_id": 0, "type": "auto",
                       "questions_ids": ids, "active": True})
        write_geotiff(root / image_dir / f"{img_id}.tif", seed=img_id, size=32 if not hr else 48)
        for j, qid in enumerate(ids):
            qtype = types[(qid + j) % len(types)]
            text = f"Is there a road number {qid} in the image?" if qtype != "count" else f"How many buildings {qid}?"
            answer = _answer_for(qtype, qid)
            record = {"id": qid, "date_added": 1588000000.0, "img_id": img_id, "people_id": 0, "type": qtype,
                      "question": text, "answers_ids": [qid], "active": True}
            full_questions.append(record)
            questions.append(record if text_in_split else {"id": qid, "answers_ids": [qid], "active": True})
            answers.append({"id": qid, "date_added": 1588000000.0, "question_id": qid, "people_id": 0,
                            "answer": answer, "active": True})
            expected[qid] = (img_id, qtype, text, answer)
    name = f"{prefix}_split_{split}"
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}_questions.json").write_text(json.dumps({"questions": questions}))
    (root / f"{name}_answers.json").write_text(json.dumps({"answers": answers}))
    (root / f"{name}_images.json").write_text(json.dumps({"images": images}))
    tables = ("USGSquestions.json", "USGSanswers.json") if hr else ("all_questions.json", "all_answers.json")
    (root / tables[0]).write_text(json.dumps({"questions": full_questions}))
    (root / tables[1]).write_text(json.dumps({"answers": answers}))
    return {"questions": expected, "image_dir": image_dir}


def write_geochat_vqa(root: Path, *, hr: bool = False, n: int = 20, file_in: Path | None = None) -> dict[str, Any]:
    """An RSVQA folder (:func:`write_rsvqa`) and GeoChat-Bench's ``lrben.jsonl`` / ``hrben.jsonl`` over it (in
    ``root``, or ``file_in``): every active question but the first, last first, each line's ``text`` the
    question and GeoChat's instruction, ``category`` its type (the first line's is wrong, ``"comparison"``).

    Returns:
        ``{"questions": (as write_rsvqa), "lines": the jsonl lines, "path": the jsonl file}``.
    """
    info = write_rsvqa(root, hr=hr, n=n)
    lines = []
    for qid in sorted(info["questions"])[1:][::-1]:
        img_id, qtype, text, _ = info["questions"][qid]
        lines.append({"question_id": qid, "image": f"{img_id}.tif", "category": qtype,
                      "text": f"{text}\nAnswer the question using a single word or phrase."})
    lines[0]["category"] = "comparison"
    path = (file_in or root) / ("hrben.jsonl" if hr else "lrben.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {**info, "lines": lines, "path": path}


# ------------------------------------------------------------------------------------------- captions


def write_karpathy(root: Path, *, flavour: str = "ucm", n: int = 20) -> dict[str, Any]:
    """A Karpathy-style caption dataset: ``n`` test images + 3 train images, five sentences each.

    ``ucm``: ``dataset.json`` + ``imgs/N.tif``; ``sydney``: ``dataset.json`` + ``images/N.tif``;
    ``rsicd``: ``annotations_rsicd/dataset_rsicd.json`` + ``RSICD_images/<class>_N.jpg``.
    """
    words = ["many", "green", "trees", "a", "river", "houses", "road", "planes", "are", "parked", "near"]
    records = []
    image_dir, ann = {"ucm": ("imgs", "dataset.json"), "sydney": ("images", "dataset.json"),
                      "rsicd": ("RSICD_images", "annotations_rsicd/dataset_rsicd.json")}[flavour]
    sentid = 0
    expected: dict[str, list[str]] = {}
    for imgid in range(n + 3):
        filename = f"{imgid + 1}.tif" if flavour != "rsicd" else f"{('airport', 'beach')[imgid % 2]}_{imgid + 1}.jpg"
        split = "test" if imgid < n else "train"
        sentences = []
        for s in range(5):
            toks = [words[(imgid + s + k) % len(words)] for k in range(4 + s % 3)]
            raw = " ".join(toks).capitalize() + (" ." if flavour == "ucm" else ".")
            sentences.append({"tokens": toks, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        records.append({"filename": filename, "imgid": imgid, "split": split,
                        "sentids": [x["sentid"] for x in sentences], "sentences": sentences})
        write_image(root / image_dir / filename, seed=100 + imgid)
        if split == "test":
            expected[filename] = [x["raw"] for x in sentences]
    (root / ann).parent.mkdir(parents=True, exist_ok=True)
    (root / ann).write_text(json.dumps({"images": records, "dataset": flavour}))
    return {"references": expected}


# ------------------------------------------------------------------------------------------- scenes


def write_ucmerced(root: Path, *, n_classes: int = 4, per_class: int = 5) -> dict[str, str]:
    """``UCMerced_LandUse/Images/<class>/<class>NN.tif``; one image is 247 x 256 (UCMerced has 44 such).

    Returns:
        ``{"<folder>/<file>": display class}``.
    """
    expected = {}
    for c, display in enumerate(UCMERCED_CLASSES[:n_classes]):
        folder = display.replace(" ", "").lower()
        for k in range(per_class):
            size = (247, 256) if (c, k) == (1, 2) else (64, 64)
            write_image(root / "UCMerced_LandUse" / "Images" / folder / f"{folder}{k:02d}.tif", seed=c * 10 + k,
                        size=size)
            expected[f"{folder}/{folder}{k:02d}.tif"] = display
    return expected


def write_aid(root: Path, *, n_classes: int = 4, per_class: int = 5) -> dict[str, str]:
    """``AID/<CamelClass>/<lowerclass>_<n>.jpg``. Returns ``{"<folder>/<file>": display class}``."""
    expected = {}
    for c, display in enumerate(AID_CLASSES[:n_classes]):
        folder = display.replace(" ", "")
        for k in range(1, per_class + 1):
            write_image(root / "AID" / folder / f"{folder.lower()}_{k}.jpg", seed=500 + c * 10 + k, size=(60, 60))
            expected[f"{folder}/{folder.lower()}_{k}.jpg"] = display
    return expected


def write_resisc45(root: Path, *, classes: tuple[str, ...] = ("Baseball Diamond", "Airplane", "Sea Ice", "Wetland"),
                   per_class: int = 3) -> dict[str, str]:
    """``NWPU-RESISC45/<snake_case class>/<class>_NNN.jpg``. Returns ``{"<folder>/<file>": display class}``."""
    expected = {}
    for c, display in enumerate(classes):
        folder = display.lower().replace(" ", "_")
        for k in range(1, per_class + 1):
            write_image(root / "NWPU-RESISC45" / folder / f"{folder}_{k:03d}.jpg", seed=900 + c * 10 + k, size=(64, 64))
            expected[f"{folder}/{folder}_{k:03d}.jpg"] = display
    return expected


# ------------------------------------------------------------------------------------------- GeoChat-Bench


def write_referring(root: Path, *, n: int = 20, size: int = 100) -> list[dict[str, Any]]:
    """``referring.jsonl`` with ``n`` lines and ``<image_id>.png`` images under ``final_images_llava/``.

    Ground truth: per object a 4-point polygon in pixels (every third question has two objects); types
    alternate ``ref`` / ``grounding``; size groups cycle small / medium / large.
    """
    lines = []
    for i in range(n):
        image_id = f"P{i // 2:04d}_0001"
        write_image(root / "final_images_llava" / f"{image_id}.png", seed=700 + i // 2, size=(size, size))
        x = 10 + 3 * i
        objects = [[[x, 10.0], [x + 30.0, 10.0], [x + 30.0, 40.0], [x, 40.0]]]
        if i % 3 == 0:
            objects.append([[5.0, 60.0], [45.0, 60.0], [45.0, 90.0], [5.0, 90.0]])
        lines.append({
            "question_id": str(1000 + i), "image_id": image_id, "question": f"the white car number {i}",
            "ground_truth": objects, "type": ("ref", "grounding")[i % 2], "dataset": "FAST",
            "obj_ids": list(range(len(objects))), "size_group": ("small", "medium", "large")[i % 3],
        })
    (root / "referring.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def write_region_captioning(root: Path, *, n: int = 20) -> list[dict[str, Any]]:
    """``region_captioning.jsonl`` with ``n`` lines and images under ``images/``."""
    lines = []
    for i in range(n):
        image_id = f"R{i // 4:04d}"
        write_image(root / "images" / f"{image_id}.png", seed=900 + i // 4, size=(80, 80))
        lines.append({"question_id": f"rc{i}", "image_id": image_id,
                      "question": f"{{<{10 + i}><20><{40 + i}><60>}}",
                      "ground_truth": ("a white car", "a small building", "a tennis court")[i % 3],
                      "type": "region", "dataset": "SOTA", "obj_ids": [i], "size_group": "small"})
    (root / "region_captioning.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def write_geochat_scenes(root: Path, *, dataset: str, n_classes: int = 4, per_class: int = 5) -> dict[str, Any]:
    """GeoChat-Bench's ``UCmerced.jsonl`` (``dataset="ucmerced"``) or ``aid.jsonl`` (``"aid"``) over images
    laid out as the archives unpack. Every other image of each class is listed (GeoChat-Bench's own list,
    not the whole dataset); the prompt is the line's ``text``. As in the published ``aid.jsonl``, its
    ``image`` names a ``.png`` where AID's file is a ``.jpg``, and ``ground_truth`` ends in ``gt``.

    Returns:
        ``{"references": {question_id: display class}, "prompts": {question_id: text}}``.
    """
    classes = UCMERCED_CLASSES if dataset == "ucmerced" else AID_CLASSES
    write = write_ucmerced if dataset == "ucmerced" else write_aid
    files = write(root, n_classes=n_classes, per_class=per_class)
    names = ", ".join(c.lower() for c in classes)
    lines, references, prompts = [], {}, {}
    for k, (rel, display) in enumerate(sorted(files.items())):
        if k % 2:
            continue
        image = rel if dataset == "ucmerced" else rel.rsplit(".", 1)[0] + ".png"
        text = f"Classify the image within one of the given classes: {names}.\nAnswer with one word or short phrase."
        truth = display.replace(" ", "").lower() if dataset == "ucmerced" else display.replace(" ", "") + "gt"
        lines.append({"question_id": rel, "image": image, "text": text, "ground_truth": truth})
        references[rel], prompts[rel] = display, text
    name = "UCmerced.jsonl" if dataset == "ucmerced" else "aid.jsonl"
    (root / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"references": references, "prompts": prompts}
