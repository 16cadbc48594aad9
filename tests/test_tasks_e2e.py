"""Every task end to end through the region job, and detections merged on the map.

The detection run uses a tiny LLaVA finetuned inside the test to answer GeoChat box strings
(tests/finetune_fixtures.py); the other runs use the untrained smoke model with the geochat template,
whose text is noise: it must still run end to end, keeping the text and saying why it does not parse.
"""

from __future__ import annotations

import json
import re

import geopandas as gpd
import numpy as np
import pytest
import shapely
from pyproj import Transformer
from rasterio.transform import Affine

from rsflow.cli import main
from tests.finetune_fixtures import SHIP_BOX, fixed_box_model_dir  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

S2_X0, S2_Y0 = 435730.0, 4179460.0


def _run(args: list[str]) -> int:
    return main(["--log-level", "WARNING", "region", *args])


def test_every_task_runs_with_the_untrained_model(ray_local, sample_catalog, tmp_path):
    regions = tmp_path / "regions.geojson"
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "field", "properties": {},
         "geometry": shapely.geometry.mapping(shapely.box(-75.6990, 37.6505, -75.6985, 37.6510))}]}))
    out = tmp_path / "all"
    code = _run([
        "--stac", str(sample_catalog), "--bbox", "-75.70,37.650,-75.695,37.652", "--prompt-format", "geochat",
        "--max-new-tokens", "10", "--output", str(out),
        "--tasks", "caption,vqa,classify,detect,refer,region-caption",
        "--question", "Is there water in the image?", "--question", "How many buildings are there?",
        "--classes", "ucmerced", "--detect", "ship,storage tank", "--refer", "the white building",
        "--regions", str(regions),
    ])
    assert code == 0
    gdf = gpd.read_parquet(out)
    assert gdf.crs.to_epsg() == 4326
    tiles = gdf[gdf["kind"] == "tile"]
    n_tiles = tiles["tile_id"].nunique()
    per_tile = tiles.groupby("tile_id")["task"].apply(list)
    # 1 caption + 2 vqa + 1 classify + 2 detect + 1 refer on every tile, + region-caption where the region is
    for tile_id, tasks in per_tile.items():
        base = ["caption", "vqa", "vqa", "classify", "detect", "detect", "refer"]
        assert sorted(t for t in tasks if t != "region-caption") == sorted(base), tile_id
    region_rows = tiles[tiles["task"] == "region-caption"]
    assert 1 <= len(region_rows) < n_tiles + 1
    assert (region_rows["region_id"] == "field").all()
    assert region_rows["prompt"].str.fullmatch(r"\[identify\] What is the object present at \{<\d+><\d+><\d+><\d+>\}").all()
    assert (tiles["status"] == "ok").all() and tiles["text"].notna().all()
    # noise does not parse: the text is kept and parse_error says why
    classify = tiles[tiles["task"] == "classify"]
    assert (classify["label"].isna() == classify["parse_error"].notna()).all()
    detect = tiles[tiles["task"] == "detect"]
    assert detect["object_count"].notna().all()
    no_boxes = detect[detect["object_count"] == 0]
    assert no_boxes["parse_error"].notna().all()
    assert set(detect["prompt_key"]) == {"ship", "storage tank"}
    assert (tiles[tiles["task"] == "vqa"]["answer"].notna() | tiles[tiles["task"] == "vqa"]["parse_error"].notna()).all()
    # the preview holds exactly the rows of the dataset
    html = (out / "_preview.html").read_text()
    ids = re.findall(r'"row_id": "([^"]+)"', html)
    assert len(ids) == len(gdf)
    assert {i.rsplit("#", 1)[0] for i in ids} == set(gdf["tile_id"])
    m = json.loads((out / "_manifest.json").read_text())
    assert m["prompt_format"] == "geochat"
    assert [p["task"] for p in m["prompts"]] == ["caption", "vqa", "vqa", "classify", "detect", "detect", "refer"]


def _tile_polygon_from_box(transform, box_0_100, size=64):
    """Independent: box (0-100 grid, no angle) -> pixel corners -> tile affine -> EPSG:4326."""
    x1, y1, x2, y2 = (v / 100 * size for v in box_0_100)
    aff = Affine(*transform[:6])
    to_ll = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    corners = [aff @ (x1, y1), aff @ (x2, y1), aff @ (x2, y2), aff @ (x1, y2)]
    return shapely.Polygon([to_ll.transform(x, y) for x, y in corners])


def test_detections_of_overlapping_tiles_merge_into_objects_no_larger_than_a_box(
    ray_local, sample_catalog, fixed_box_model_dir, tmp_path  # noqa: F811
):
    # Two small AOI patches far apart; tiles of 64 px with a stride of 8 px overlap heavily, so every
    # patch is seen by many tiles, each answering the same box in its own pixels: boxes 8 px apart on
    # the map, a chain across 56 px. Merging is greedy, largest box first: an object is one box and the
    # detections that overlap IT at --merge-iou, never a chain (properties checked independently here).
    aoi = shapely.MultiPolygon([
        shapely.box(-75.7000, 37.6500, -75.6999, 37.6501),
        shapely.box(-75.6600, 37.6650, -75.6599, 37.6651),
    ])
    common = ["--stac", str(sample_catalog), "--intersects", aoi.wkt, "--model", str(fixed_box_model_dir),
              "--tasks", "detect", "--detect", "ship", "--overlap", "56", "--max-new-tokens", "24"]
    merged, kept = tmp_path / "merged", tmp_path / "kept"
    assert _run([*common, "--output", str(merged)]) == 0
    assert _run([*common, "--merge", "none", "--output", str(kept)]) == 0

    all_objects = gpd.read_parquet(kept).query("kind == 'object'")
    tiles = gpd.read_parquet(kept).query("kind == 'tile'")
    assert len(all_objects) == len(tiles) > 2 and (tiles["object_count"] == 1).all()
    assert (all_objects["box_px"].map(list) == [[6.4, 6.4, 57.6, 57.6, 0.0]] * len(all_objects)).all()

    gdf = gpd.read_parquet(merged)
    assert gdf.crs.to_epsg() == 4326
    objects = gdf[gdf["kind"] == "object"]
    utm = Transformer.from_crs("EPSG:4326", "EPSG:32618", always_xy=True)

    def metric(geom):
        return shapely.transform(geom, lambda c: np.column_stack(utm.transform(c[:, 0], c[:, 1])))

    def iou(p, q):
        p, q = metric(p), metric(q)
        inter = p.intersection(q).area
        return inter / (p.area + q.area - inter)

    boxes = {t: _tile_polygon_from_box(tr, [10, 10, 90, 90]) for t, tr in zip(tiles["tile_id"], tiles["transform"])}
    assert 2 <= len(objects) < len(all_objects)  # merged, and at least one object per patch
    assert sum(objects["n_merged"]) == len(all_objects)  # every detection in exactly one object
    assert sorted(t for ids in objects["source_tile_ids"] for t in ids) == sorted(tiles["tile_id"])
    for _, obj in objects.iterrows():
        assert obj["label"] == "ship"
        # the object's polygon is the box of one of its tiles, computed independently ...
        assert any(obj.geometry.symmetric_difference(boxes[t]).area < 1e-14 for t in obj["source_tile_ids"])
        # ... and every member overlaps THAT box at the threshold: no chain reaches past it
        assert all(iou(obj.geometry, boxes[t]) >= 0.5 - 1e-9 for t in obj["source_tile_ids"])
        assert sum(obj.geometry.distance(p) < 0.006 for p in aoi.geoms) == 1  # at its own patch
    # and no two objects are duplicates: each pair overlaps less than the threshold
    geoms = list(objects.geometry)
    assert all(iou(a, b) < 0.5 for i, a in enumerate(geoms) for b in geoms[i + 1:])
    # tile rows stay, with their object count
    assert (gdf[gdf["kind"] == "tile"]["object_count"] == 1).all()
    m = json.loads((merged / "_manifest.json").read_text())
    assert m["counts"]["objects_detected"] == len(all_objects) and m["counts"]["objects_written"] == len(objects)
    assert m["geo"]["objects"]["bbox"] == pytest.approx(list(objects.total_bounds), abs=1e-12)
    assert m["geo"]["tiles"]["bbox"] == pytest.approx(list(gdf[gdf["kind"] == "tile"].total_bounds), abs=1e-12)


def test_a_rotated_box_keeps_its_rotation_on_the_map(ray_local, sample_catalog, fixed_box_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "tank"
    assert _run(["--stac", str(sample_catalog), "--bbox", "-75.70,37.650,-75.6999,37.6501",
                 "--model", str(fixed_box_model_dir), "--tasks", "detect", "--detect", "storage tank",
                 "--max-new-tokens", "24", "--output", str(out)]) == 0
    obj = gpd.read_parquet(out).query("kind == 'object'").iloc[0]
    assert list(obj["box_px"]) == pytest.approx([12.8, 19.2, 25.6, 32.0, 30.0])
    # the long edge of the 12.8 x 12.8 px ... box is square: check the angle of its first edge in UTM
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32618", always_xy=True)
    xy = np.array([to_utm.transform(x, y) for x, y in list(obj.geometry.exterior.coords)[:-1]])
    edges = np.diff(np.vstack([xy, xy[:1]]), axis=0)
    angles = np.degrees(np.arctan2(edges[:, 1], edges[:, 0])) % 90
    assert np.allclose(angles, angles[0], atol=1e-6)
    assert min(abs(angles[0] - 60), abs(angles[0] - 30)) < 1e-6  # rotated by 30 degrees, not axis-aligned
