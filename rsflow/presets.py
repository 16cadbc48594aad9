"""Class-list presets for ``--classes``: the scene classes of UC Merced Land Use (21), AID (30) and
NWPU-RESISC45 (45).

Class names are the datasets' display names (words separated by spaces, each capitalised), in the
datasets' own (alphabetical) order. The datasets ship one folder per class, named without spaces:
UC Merced in lower case (``denseresidential``), AID in CamelCase (``DenseResidential``). GeoChat's scene
scoring (geochat/eval/batch_geochat_scene.py, ``reference/models.md`` 6.1) compares
``answer.replace(" ", "").lower().replace(".", "")`` with the lower-cased folder name, so each display name
here normalises to its folder name under that rule (``scene_normal_form``; checked in tests/test_presets.py):
"Dense Residential" -> "denseresidential". Sources: the UC Merced class folders (as listed in the dataset's
Hugging Face mirrors) and AID's class folders and paper list (Xia et al., 2017).
"""

from __future__ import annotations

import logging
from typing import Final

from rsflow.errors import RequestError

logger = logging.getLogger(__name__)

UCMERCED_CLASSES: Final[tuple[str, ...]] = (
    "Agricultural",
    "Airplane",
    "Baseball Diamond",
    "Beach",
    "Buildings",
    "Chaparral",
    "Dense Residential",
    "Forest",
    "Freeway",
    "Golf Course",
    "Harbor",
    "Intersection",
    "Medium Residential",
    "Mobile Home Park",
    "Overpass",
    "Parking Lot",
    "River",
    "Runway",
    "Sparse Residential",
    "Storage Tanks",
    "Tennis Court",
)
"""UC Merced Land Use, 21 classes (folders ``agricultural`` ... ``tenniscourt``)."""

AID_CLASSES: Final[tuple[str, ...]] = (
    "Airport",
    "Bare Land",
    "Baseball Field",
    "Beach",
    "Bridge",
    "Center",
    "Church",
    "Commercial",
    "Dense Residential",
    "Desert",
    "Farmland",
    "Forest",
    "Industrial",
    "Meadow",
    "Medium Residential",
    "Mountain",
    "Park",
    "Parking",
    "Playground",
    "Pond",
    "Port",
    "Railway Station",
    "Resort",
    "River",
    "School",
    "Sparse Residential",
    "Square",
    "Stadium",
    "Storage Tanks",
    "Viaduct",
)
"""AID (Aerial Image Dataset), 30 classes (folders ``Airport``, ``BareLand`` ... ``Viaduct``)."""

RESISC45_CLASSES: Final[tuple[str, ...]] = (
    "Airplane",
    "Airport",
    "Baseball Diamond",
    "Basketball Court",
    "Beach",
    "Bridge",
    "Chaparral",
    "Church",
    "Circular Farmland",
    "Cloud",
    "Commercial Area",
    "Dense Residential",
    "Desert",
    "Forest",
    "Freeway",
    "Golf Course",
    "Ground Track Field",
    "Harbor",
    "Industrial Area",
    "Intersection",
    "Island",
    "Lake",
    "Meadow",
    "Medium Residential",
    "Mobile Home Park",
    "Mountain",
    "Overpass",
    "Palace",
    "Parking Lot",
    "Railway",
    "Railway Station",
    "Rectangular Farmland",
    "River",
    "Roundabout",
    "Runway",
    "Sea Ice",
    "Ship",
    "Snowberg",
    "Sparse Residential",
    "Stadium",
    "Storage Tank",
    "Tennis Court",
    "Terrace",
    "Thermal Power Station",
    "Wetland",
)
"""NWPU-RESISC45, 45 classes (snake_case folders ``airplane``, ``baseball_diamond`` ... ``wetland``;
the display name is the folder name with spaces for underscores, title-cased). The list is the one
torchgeo's and torchrs's RESISC45 loaders carry; ``reference/benchmarks.md`` 3.3 did not capture it,
so a folder outside it is refused with the list (``rsflow.evaluate.scenes``)."""

CLASS_PRESETS: Final[dict[str, tuple[str, ...]]] = {
    "ucmerced": UCMERCED_CLASSES,
    "aid": AID_CLASSES,
    "resisc45": RESISC45_CLASSES,
}
"""Preset name (as typed after ``--classes``) -> display class names (tuples, so nobody edits them)."""


def scene_normal_form(text: str) -> str:
    """GeoChat's scene-scoring normal form: spaces removed, lower-cased, dots removed (in that order).

    Applied to a display class name it gives the dataset's folder name in lower case; applied to a model
    answer it is GeoChat's prediction string (batch_geochat_scene.py ``evaluation_metrics``).

    >>> scene_normal_form("Dense Residential.")
    'denseresidential'
    """
    return text.replace(" ", "").lower().replace(".", "")


def folder_form(name: str) -> str:
    """A class folder's name in GeoChat's normal form, its underscores read as spaces: RESISC45's
    ``baseball_diamond`` is the class "Baseball Diamond" (UC Merced's and AID's folders have none).

    >>> folder_form("baseball_diamond")
    'baseballdiamond'
    """
    return scene_normal_form(name.replace("_", " "))


def resolve_classes(value: str) -> list[str]:
    """The class list of ``--classes``: a preset name (case-insensitive) or a comma-separated list.

    Args:
        value: ``"ucmerced"``, ``"aid"``, or e.g. ``"Church, Beach, Dense Residential"`` (items are stripped;
            empty items between commas are dropped).

    Returns:
        The class names, in the order given (a new list).

    Raises:
        RequestError: empty value, a single name that is not a preset (a classifier needs two classes or
            more; this also catches misspelt presets), or two names that GeoChat's scoring cannot tell apart
            (equal after removing spaces and dots and lower-casing) (``--classes``).
    """
    text = value.strip()
    if text.lower() in CLASS_PRESETS:
        return list(CLASS_PRESETS[text.lower()])
    names = [part.strip() for part in text.split(",") if part.strip()]
    presets = ", ".join(sorted(CLASS_PRESETS))
    if not names:
        raise RequestError("--classes", f"give a preset ({presets}) or a comma-separated list of classes")
    if len(names) == 1:
        raise RequestError(
            "--classes",
            f"{names[0]!r} is neither a preset ({presets}) nor a comma-separated list of two or more classes",
        )
    seen: dict[str, str] = {}
    for name in names:
        norm = scene_normal_form(name)
        if norm in seen:
            raise RequestError(
                "--classes",
                f"{seen[norm]!r} and {name!r} are the same class once spaces/dots/case are ignored",
            )
        seen[norm] = name
    return names
