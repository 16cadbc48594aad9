"""UCMerced_LandUse, AID and NWPU-RESISC45: one folder per class, as the archives unpack.

Layouts (``reference/benchmarks.md`` 3)::

    UCMerced_LandUse/Images/<class>/<class>NN.tif      21 lower-case folders (agricultural ... tenniscourt)
    AID/<ClassFolder>/<lowerclass>_<n>.jpg             30 CamelCase folders (Airport ... Viaduct)
    NWPU-RESISC45/<class>/<class>_NNN.jpg              45 snake_case folders (airplane ... wetland)

``--data`` may be the archive root or the folder that holds the class folders. Every sub-folder must be
one of the dataset's classes (its name, underscores read as spaces, equals a class under GeoChat's normal
form, spaces and dots removed and lower-cased); a subset of the classes is accepted (quick runs), but the prompt always lists every class
of the dataset, as the classifier's choice is the full list. The sample id is ``<folder>/<file>``,
GeoChat-Bench's ``question_id`` form, whose first part is the label its scorer uses.

Prompt: ``prompts.classify_prompt`` over the dataset's display class names (rsflow's classify task:
GeoChat's demo wording with the class list, then GeoChat's eval instruction).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from rsflow.errors import RequestError
from rsflow.evaluate.samples import Sample
from rsflow.models.prompts import classify_prompt
from rsflow.presets import folder_form, scene_normal_form

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: Final[tuple[str, ...]] = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
"""Files read as images inside a class folder (others are ignored)."""

_ROOTS: Final[tuple[str, ...]] = (".", "Images", "UCMerced_LandUse/Images", "AID", "NWPU-RESISC45")


def _class_root(data: Path, by_norm: dict[str, str]) -> Path:
    for rel in _ROOTS:
        root = data / rel
        if root.is_dir() and any(d.is_dir() and folder_form(d.name) in by_norm for d in root.iterdir()):
            return root
    raise RequestError(
        "--data",
        f"{data} holds no class folder of this dataset (looked in {', '.join(_ROOTS)}; "
        f"expected folders such as {', '.join(sorted(by_norm)[:3])} ...)",
    )


def load_scene_folders(data: Path, *, classes: Sequence[str], dataset: str) -> list[Sample]:
    """Read a class-folder dataset into samples, sorted by ``<folder>/<file>``.

    Args:
        data: the archive root or the folder of class folders.
        classes: the dataset's display class names (``presets.UCMERCED_CLASSES``, ``AID_CLASSES``,
            ``RESISC45_CLASSES``).
        dataset: its name, for messages.

    Returns:
        One sample per image; the reference is the class's display name.

    Raises:
        RequestError: (``--data``) no class folder, a folder that is not a class of ``dataset``, or a
            class folder without images.
    """
    by_norm = {scene_normal_form(c): c for c in classes}
    root = _class_root(data, by_norm)
    prompt = classify_prompt(list(classes))
    samples: list[Sample] = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        label = by_norm.get(folder_form(folder.name))
        if label is None:
            raise RequestError(
                "--data", f"{folder} is not a class folder of {dataset} (classes: {', '.join(sorted(by_norm))})"
            )
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RequestError("--data", f"class folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        samples += [
            Sample(
                sample_id=f"{folder.name}/{f.name}",
                image_path=str(f.resolve()),
                task="classify",
                prompt=prompt,
                references=(label,),
            )
            for f in files
        ]
    return samples
