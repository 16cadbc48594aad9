"""rsflow.presets: the UC Merced / AID class lists and --classes parsing."""

from __future__ import annotations

import pytest

from rsflow.errors import RequestError
from rsflow.presets import (
    AID_CLASSES,
    CLASS_PRESETS,
    RESISC45_CLASSES,
    UCMERCED_CLASSES,
    folder_form,
    resolve_classes,
    scene_normal_form,
)

# Class folder names as the datasets ship them (UC Merced: lower case; AID: CamelCase).
UCMERCED_FOLDERS = [
    "agricultural",
    "airplane",
    "baseballdiamond",
    "beach",
    "buildings",
    "chaparral",
    "denseresidential",
    "forest",
    "freeway",
    "golfcourse",
    "harbor",
    "intersection",
    "mediumresidential",
    "mobilehomepark",
    "overpass",
    "parkinglot",
    "river",
    "runway",
    "sparseresidential",
    "storagetanks",
    "tenniscourt",
]
AID_FOLDERS = [
    "Airport",
    "BareLand",
    "BaseballField",
    "Beach",
    "Bridge",
    "Center",
    "Church",
    "Commercial",
    "DenseResidential",
    "Desert",
    "Farmland",
    "Forest",
    "Industrial",
    "Meadow",
    "MediumResidential",
    "Mountain",
    "Park",
    "Parking",
    "Playground",
    "Pond",
    "Port",
    "RailwayStation",
    "Resort",
    "River",
    "School",
    "SparseResidential",
    "Square",
    "Stadium",
    "StorageTanks",
    "Viaduct",
]


def test_counts() -> None:
    assert len(UCMERCED_CLASSES) == len(set(UCMERCED_CLASSES)) == 21
    assert len(AID_CLASSES) == len(set(AID_CLASSES)) == 30
    assert len(RESISC45_CLASSES) == len(set(RESISC45_CLASSES)) == 45
    assert CLASS_PRESETS == {"ucmerced": UCMERCED_CLASSES, "aid": AID_CLASSES, "resisc45": RESISC45_CLASSES}


def test_display_names_normalise_to_folder_names() -> None:
    assert [scene_normal_form(c) for c in UCMERCED_CLASSES] == UCMERCED_FOLDERS
    assert [scene_normal_form(c) for c in AID_CLASSES] == [f.lower() for f in AID_FOLDERS]
    # display form: words split at the folder"s capitals (AID) and capitalised
    assert [c.replace(" ", "") for c in AID_CLASSES] == AID_FOLDERS


def test_resisc45_display_names_are_its_snake_case_folders() -> None:
    folders = ["airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
               "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
               "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake",
               "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
               "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice",
               "ship", "snowberg", "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
               "thermal_power_station", "wetland"]
    assert [c.lower().replace(" ", "_") for c in RESISC45_CLASSES] == folders
    assert [folder_form(f) for f in folders] == [scene_normal_form(c) for c in RESISC45_CLASSES]


def test_scene_normal_form_is_geochats_rule() -> None:
    assert scene_normal_form("Dense Residential.") == "denseresidential"
    assert scene_normal_form(" Golf  Course ") == "golfcourse"
    assert scene_normal_form("a.b") == "ab"


def test_resolve_presets() -> None:
    assert resolve_classes("ucmerced") == list(UCMERCED_CLASSES)
    assert resolve_classes(" AID ") == list(AID_CLASSES)
    out = resolve_classes("aid")
    out.append("x")  # a copy: the preset is untouched
    assert len(AID_CLASSES) == 30


def test_resolve_comma_list() -> None:
    assert resolve_classes("Church, Beach,Dense Residential , ,Storage Tanks") == [
        "Church",
        "Beach",
        "Dense Residential",
        "Storage Tanks",
    ]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("", r"--classes: give a preset"),
        (" , ,", r"--classes: give a preset"),
        ("ucmerce", r"--classes: 'ucmerce' is neither a preset \(aid, resisc45, ucmerced\)"),
        (
            "Dense Residential, denseresidential.",
            r"--classes: 'Dense Residential' and 'denseresidential.' are the same",
        ),
    ],
)
def test_resolve_errors(value: str, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        resolve_classes(value)
