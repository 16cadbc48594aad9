"""UCM-captions, Sydney-captions and RSICD: Karpathy-style caption JSON plus an image folder.

Layout (``reference/benchmarks.md`` 2)::

    DATA/dataset.json                 UCM-captions, Sydney-captions (RSICD: dataset_rsicd.json,
                                      also under annotations_rsicd/)
    DATA/imgs/<filename>              (or images/, RSICD_images/)

``{"images": [{"filename", "imgid", "split", "sentids", "sentences": [{"raw", "tokens", "imgid",
"sentid"}, ...]}, ...]}``: one sample per image of the split (``test`` by default), every ``raw``
sentence a reference (five each; duplicates kept, as the papers scored them). The image path is the
image folder joined with ``filename``, never rebuilt from ids.

Prompt: the model family's caption instruction (``prompts.TASK_PROMPTS["caption"]``: RS-LLaVA's
"Provide a description of the image.", otherwise "Describe the image in detail.").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Final

from rsflow.errors import RequestError
from rsflow.evaluate.samples import Sample
from rsflow.models.prompts import task_prompts

logger = logging.getLogger(__name__)

SPLITS: Final[tuple[str, ...]] = ("test", "val", "train")
"""Values of the ``split`` field; ``test`` is what the papers report."""

_ANNOTATIONS: Final[dict[str, tuple[str, ...]]] = {
    "rsicd": ("dataset_rsicd.json", "annotations_rsicd/dataset_rsicd.json", "dataset.json"),
    "ucm": ("dataset.json",),
    "sydney": ("dataset.json",),
}
_IMAGE_DIRS: Final[tuple[str, ...]] = ("imgs", "images", "RSICD_images", ".")


def _annotation_file(data: Path, flavour: str) -> Path:
    for name in _ANNOTATIONS[flavour]:
        if (data / name).is_file():
            return data / name
    raise RequestError(
        "--data",
        f"{data} is not a caption dataset folder: none of {', '.join(_ANNOTATIONS[flavour])} found "
        "(the Karpathy-style JSON the dataset ships)",
    )


def _image_dir(data: Path, images: list[dict[str, Any]]) -> Path:
    first = str(images[0]["filename"])
    for name in _IMAGE_DIRS:
        if (data / name / first).is_file():
            return (data / name).resolve()
    raise RequestError(
        "--data",
        f"{data} has no image folder holding {first!r} (looked in {', '.join(_IMAGE_DIRS)}); "
        "give the folder with --images",
    )


def load_captions(data: Path, *, flavour: str, prompt_format: str, split: str | None = None,
                  images: Path | None = None) -> list[Sample]:
    """Read one split of a Karpathy-style caption dataset into samples, in file order.

    Args:
        data: the folder holding the annotation JSON (and, unless ``images`` is given, the images).
        flavour: ``"ucm"``, ``"sydney"`` or ``"rsicd"`` (which annotation file names to look for).
        prompt_format: the model family (decides the caption instruction).
        split: ``test`` (default), ``val`` or ``train``.
        images: the image folder, when it is not one of ``imgs``, ``images``, ``RSICD_images``.

    Raises:
        RequestError: (``--data``) no annotation file, not the Karpathy shape, an image without
            ``filename`` or ``sentences``, no image folder; (``--split``) an unknown split.
    """
    split = split or SPLITS[0]
    if split not in SPLITS:
        raise RequestError("--split", f"caption datasets have splits {', '.join(SPLITS)}; got {split!r}")
    path = _annotation_file(data, flavour)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RequestError("--data", f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise RequestError("--data", f"{path} is not a Karpathy-style caption file: expected {{\"images\": [...]}}")
    records = [r for r in doc["images"] if isinstance(r, dict) and r.get("split") == split]
    if not records:
        raise RequestError("--data", f"{path} has no image with split {split!r}")
    for i, r in enumerate(records):
        if "filename" not in r or not isinstance(r.get("sentences"), list) or not r["sentences"]:
            raise RequestError("--data", f"{path}: image {i} of split {split!r} lacks filename or sentences")
    folder = images.resolve() if images is not None else _image_dir(data, records)
    prompt = task_prompts("caption", prompt_format)[0]
    samples = []
    for r in records:
        refs = tuple(str(s["raw"]) for s in r["sentences"] if isinstance(s, dict) and "raw" in s)
        if not refs:
            raise RequestError("--data", f"{path}: image {r['filename']!r} has no sentence with 'raw' text")
        samples.append(
            Sample(
                sample_id=str(r["filename"]),
                image_path=str(folder / str(r["filename"])),
                task="caption",
                prompt=prompt,
                references=refs,
            )
        )
    return samples
