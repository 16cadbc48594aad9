"""UCM-captions, Sydney-captions and RSICD: Karpathy-style caption JSON plus an image folder.

Layout (``reference/benchmarks.md`` 2)::

    DATA/dataset.json                 UCM-captions, Sydney-captions (RSICD: dataset_rsicd.json,
                                      also under annotations_rsicd/)
    DATA/imgs/<filename>              (or images/, RSICD_images/)

``{"images": [{"filename", "imgid", "split", "sentids", "sentences": [{"raw", "tokens", "imgid",
"sentid"}, ...]}, ...]}``: one sample per image of the split (``test`` by default), every ``raw``
sentence a reference (five each; duplicates kept, as the papers scored them; an image with another
number of ``raw`` sentences is scored against those it has, and one warning counts such images). The
image path is the image folder joined with ``filename``, never rebuilt from ids.

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
REFERENCES_PER_IMAGE: Final[int] = 5
"""Reference sentences per image in all three datasets (``reference/benchmarks.md`` 2.3, checklist 8)."""


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
            ``filename`` (or one that is not a file name) or ``sentences``, no image folder; (``--split``)
            an unknown split.
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
    indexed = [(k, r) for k, r in enumerate(doc["images"]) if isinstance(r, dict) and r.get("split") == split]
    if not indexed:
        raise RequestError("--data", f"{path} has no image with split {split!r}")
    for k, r in indexed:
        if "filename" not in r or not isinstance(r.get("sentences"), list) or not r["sentences"]:
            raise RequestError("--data", f"{path}: images[{k}] (split {split!r}) lacks filename or sentences")
        name = r["filename"]
        if not isinstance(name, str) or not name.strip() or Path(name).name in ("", ".", ".."):
            # str(None) would make a sample 'None' whose image is then "missing", far from the cause
            raise RequestError("--data", f"{path}: images[{k}] (split {split!r}) has filename {name!r}: "
                                         "expected the image's file name")
    records = [r for _, r in indexed]
    folder = images.resolve() if images is not None else _image_dir(data, records)
    prompt = task_prompts("caption", prompt_format)[0]
    samples = []
    not_five = 0
    for r in records:
        refs = tuple(s["raw"] for s in r["sentences"] if isinstance(s, dict) and _reference(s.get("raw")))
        if not refs:
            raise RequestError("--data", f"{path}: image {r['filename']!r} has no sentence with 'raw' text")
        not_five += len(refs) != REFERENCES_PER_IMAGE
        samples.append(
            Sample(
                sample_id=r["filename"],
                image_path=str(folder / r["filename"]),
                task="caption",
                prompt=prompt,
                references=refs,
            )
        )
    if not_five:
        # Scored anyway (the papers' files have five everywhere), but BLEU's closest reference length,
        # CIDEr's document frequencies and METEOR all move with the number of references.
        logger.warning(
            "%s: %d of %d images of split %r do not have exactly %d reference sentences with 'raw' text "
            "(the datasets have %d each); their captions are scored against the ones they have",
            path, not_five, len(samples), split, REFERENCES_PER_IMAGE, REFERENCES_PER_IMAGE,
        )
    return samples


def _reference(raw: Any) -> bool:
    """Whether a sentence's ``raw`` is a reference (text; ``str(None)`` would make "None" one)."""
    return isinstance(raw, str) and bool(raw.strip())
