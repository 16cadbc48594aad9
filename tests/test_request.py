"""Every input spelling of a region request, offline (mirrors rsflow/request.py)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import fsspec.implementations.memory
import numpy as np
import pytest
import shapely

from rsflow.errors import RequestError
from rsflow.models.spec import ModelSpec
from rsflow.output import staging_path
from rsflow.request import (
    MAX_AOI_FILE_BYTES,
    SEARCH_MAX_VERTICES,
    TileSpec,
    parse_bbox,
    parse_datetime,
    parse_intersects,
    parse_regions,
    parse_request,
    search_geometry,
)


def _req(tmp_path, **kw):
    kw.setdefault("bbox", "-75.7,37.64,-75.66,37.67")
    kw.setdefault("output", str(tmp_path / "out"))
    kw.setdefault("model", ModelSpec(model="smoke"))
    return parse_request(**kw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2017", "2017-01-01T00:00:00Z/2017-12-31T23:59:59.999999Z"),
        ("2024-02", "2024-02-01T00:00:00Z/2024-02-29T23:59:59.999999Z"),
        ("2024-06-01", "2024-06-01T00:00:00Z/2024-06-01T23:59:59.999999Z"),
        ("2024-01-01/2024-03-31", "2024-01-01T00:00:00Z/2024-03-31T23:59:59.999999Z"),
        ("2024-01-01/..", "2024-01-01T00:00:00Z/.."),
        ("../2024-03-31", "../2024-03-31T23:59:59.999999Z"),
        ("/2024-03-31", "../2024-03-31T23:59:59.999999Z"),
        ("2024-06-01T10:00:00", "2024-06-01T10:00:00Z/2024-06-01T10:00:00Z"),  # naive = UTC
        ("2024-06-01T12:00:00+02:00/2024-06-02T00:00:00Z", "2024-06-01T10:00:00Z/2024-06-02T00:00:00Z"),
    ],
)
def test_datetime_spellings(text, expected):
    assert parse_datetime(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("../..", "open at both ends"),
        ("2024-03-31/2024-01-01", "starts after it ends"),
        ("2024-13", "cannot read"),
        ("yesterday", "cannot read"),
        ("2024-01-01/2024-02-01/2024-03-01", "more than one '/'"),
        ("20240305", "cannot read"),  # ISO basic: Python reads it as midnight, an instant
        ("2024-W10", "cannot read"),  # ISO week: Python reads it as its Monday, an instant
    ],
)
def test_datetime_errors_name_the_flag(text, match):
    with pytest.raises(RequestError, match=match) as err:
        parse_datetime(text)
    assert err.value.field == "--datetime"


def test_bbox_forms():
    assert parse_bbox("1,2,3,4").bounds == (1, 2, 3, 4)
    assert parse_bbox("1 2 3 4").bounds == (1, 2, 3, 4)
    assert parse_bbox((1, 2, 3, 4)).bounds == (1, 2, 3, 4)
    # crossing the antimeridian: two boxes, not refused, not inverted
    am = parse_bbox("170,-10,-170,10")
    assert am.geom_type == "MultiPolygon"
    assert am.area == pytest.approx(20 * 20)
    # an edge on the antimeridian itself: the box up to it, valid, no part of no width
    for text in ("170,0,-180,10", "170,0,180,10"):
        edge = parse_bbox(text)
        assert edge.is_valid and edge.bounds == (170, 0, 180, 10)
    assert parse_bbox("180,0,-170,10").bounds == (-180, 0, -170, 10)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1,2,3", "four numbers"),
        ("a,b,c,d", "four numbers"),
        ("1,4,3,2", "miny 4.0 must be smaller"),
        ("1,2,1,4", "empty"),
        ("-200,0,10,10", "longitude"),
        ("0,-95,10,10", "latitude"),
        ("435730,4159990,455060,4179460", "look like metres"),
        ("nan,0,1,1", "finite"),
        ("180,0,-180,10", "both on the antimeridian"),
        ("-75.6,37.6,-75.7,37.7", r"reads as a box across the antimeridian 359.9 degrees wide; swap them"),
    ],
)
def test_bbox_errors(text, match):
    with pytest.raises(RequestError, match=match) as err:
        parse_bbox(text)
    assert err.value.field == "--bbox"


def test_intersects_spellings(tmp_path):
    poly = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}
    feature = {"type": "Feature", "properties": {}, "geometry": poly}
    fc = {"type": "FeatureCollection", "features": [feature]}
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps(fc))
    for value in (json.dumps(poly), json.dumps(feature), json.dumps(fc), str(path), poly, "POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0))",
                  shapely.box(0, 0, 1, 1)):
        assert parse_intersects(value).equals(shapely.box(0, 0, 1, 1))


def test_a_geojson_crs_member_is_honoured():
    """GeoJSON 2008's ``crs`` member (QGIS and ogr2ogr still write it): coordinates in EPSG:3857 were read as
    degrees whatever it said; they are reprojected now, and lon/lat names leave them as they are."""
    ring = [[-8427000.0, 4530000.0], [-8423000.0, 4530000.0], [-8423000.0, 4534000.0], [-8427000.0, 4530000.0]]
    fc = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}},
          "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    minx, miny, maxx, maxy = parse_intersects(fc).bounds
    assert -75.71 < minx < maxx < -75.66 and 37.63 < miny < maxy < 37.68
    lonlat = {**fc, "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}},
              "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [-75.7, 37.6]}}]}
    assert parse_intersects(lonlat).coords[0] == (-75.7, 37.6)
    with pytest.raises(RequestError, match=r"^--intersects: the GeoJSON 'crs' 'EPSG:nope' is not a CRS"):
        parse_intersects({**lonlat, "crs": {"type": "name", "properties": {"name": "EPSG:nope"}}})


def test_a_regions_file_crs_member_is_honoured(tmp_path):
    """A ``--regions`` FeatureCollection in EPSG:3857 (as QGIS writes it) was read as degrees: every region
    was refused as outside lon/lat. Its ``crs`` now holds for each feature, as for ``--intersects``."""
    ring = [[-8427000.0, 4530000.0], [-8423000.0, 4530000.0], [-8423000.0, 4534000.0], [-8427000.0, 4530000.0]]
    fc = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}},
          "features": [{"type": "Feature", "id": "field", "properties": {},
                        "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps(fc))
    (region,) = parse_regions(path)
    minx, miny, maxx, maxy = region.geometry.bounds
    assert region.region_id == "field" and -75.71 < minx < maxx < -75.66 and 37.63 < miny < maxy < 37.68
    path.write_text(json.dumps({**fc, "crs": {"type": "name", "properties": {"name": "EPSG:nope"}}}))
    with pytest.raises(RequestError, match=r"^--regions: region 'field': the GeoJSON 'crs' 'EPSG:nope' is not a CRS"):
        parse_regions(path)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))", "invalid geometry"),  # bow tie
        ("POLYGON EMPTY", "empty"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 100], [0, 0]]]}', "outside lon/lat"),
        ("{not json", "invalid GeoJSON"),
        ("hello", "neither a GeoJSON file"),
        ('{"type": "Feature", "geometry": null}', "no geometry"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}', "invalid GeoJSON geometry: A linearring"),
        ('{"type": "Polygon", "coordinates": "x"}', "invalid GeoJSON geometry"),
        (('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
          '"coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}}]}'), r"feature 0: invalid geometry \(Self-int"),
        ("missing-aoi.geojson", "no such file: missing-aoi.geojson"),
        ('{"type": "Point", "coordinates": [1' + "0" * 5000 + ", 0]}", "invalid GeoJSON: Exceeds the limit"),
        # PostGIS writes curves; shapely raised NotImplementedError (a traceback, exit 1)
        ("CURVEPOLYGON (CIRCULARSTRING (0 0, 1 1, 2 0, 1 -1, 0 0))", "curved geometries are not supported"),
        # across the antimeridian without a split: read as a 356-degree band (a --bbox that wide is refused too)
        ("POLYGON ((177 -20, -179 -20, -179 -15, 177 -15, 177 -20))",
         r"has an edge from longitude 177 to -179, .*\(RFC 7946"),
    ],
)
def test_intersects_errors(value, match):
    with pytest.raises(RequestError, match=match) as err:
        parse_intersects(value)
    assert err.value.field == "--intersects"


def test_aoi_files_that_are_not_geojson_text_are_refused_and_a_bom_is_read(tmp_path):
    shp = tmp_path / "aoi.shp"
    shp.write_bytes(b"\x00\x00\x27\x0a\xff\xfe" * 20)  # a shapefile's binary header
    with pytest.raises(RequestError, match="is not a text file; give GeoJSON or WKT") as err:
        parse_intersects(str(shp))
    assert err.value.field == "--intersects"
    bom = tmp_path / "aoi.geojson"
    bom.write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}),
                   encoding="utf-8-sig")
    assert parse_intersects(str(bom)).equals(shapely.box(0, 0, 1, 1))


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (["not a feature"], "feature 0 of .* is not a GeoJSON Feature"),
        ([{"type": "Feature", "id": "a", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}],
         "region 'a': invalid GeoJSON geometry"),
    ],
)
def test_region_files_with_broken_features_are_refused(tmp_path, features, match):
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.raises(RequestError, match=match) as err:
        parse_regions(path)
    assert err.value.field == "--regions"


def test_a_detailed_aoi_on_the_antimeridian_is_searched_within_lon_lat_bounds():
    half_disc = shapely.Point(180, -17).buffer(5, quad_segs=800).intersection(shapely.box(170, -90, 180, 90))
    assert shapely.get_num_coordinates(half_disc) > SEARCH_MAX_VERTICES
    cover = search_geometry(half_disc)
    assert cover.is_valid and cover.contains(half_disc)
    minx, miny, maxx, maxy = cover.bounds
    assert -180 <= minx and maxx <= 180 and -90 <= miny and maxy <= 90


def test_tile_spec_checks():
    assert TileSpec().resolved(336).size_px == 336
    with pytest.raises(RequestError, match="--overlap"):
        TileSpec(size_px=64, overlap_px=64)
    with pytest.raises(RequestError, match="--overlap"):
        TileSpec(overlap_px=400).resolved(336)
    with pytest.raises(RequestError, match="--tile-size"):
        TileSpec(size_px=4)
    with pytest.raises(RequestError, match="--gsd"):
        TileSpec(gsd_m=-1)


def test_parse_request_normal_form(tmp_path):
    r = _req(tmp_path, collections="a, b,a", tasks="caption", datetime="2024-06")
    assert r.collections == ("a", "b")
    assert r.datetime == "2024-06-01T00:00:00Z/2024-06-30T23:59:59.999999Z"
    assert r.output == str((tmp_path / "out").resolve())
    assert json.loads(json.dumps(r.to_json()))["tasks"] == ["caption"]


def test_a_token_in_the_stac_url_stays_out_of_the_request_record(tmp_path):
    r = _req(tmp_path, stac="https://stac.example/v1?token=SECRET-7f3a&sig=abc", collections="sentinel-2-l2a")
    assert r.stac.endswith("token=SECRET-7f3a&sig=abc")  # the search itself uses the URL as given
    recorded = json.dumps(r.to_json())
    assert "SECRET-7f3a" not in recorded and "https://stac.example/v1?token=REDACTED" in recorded


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"tasks": "caption,dance"}, "--tasks"),
        ({"tasks": ""}, "--tasks"),
        ({"max_cloud": 120.0}, "--max-cloud"),
        ({"max_items": 0}, "--max-items"),
        ({"max_nodata": 2.0}, "--max-nodata"),
        ({"stac": "https://example.com/v1"}, "--collections"),
        ({"stac": "/no/such/catalog.json"}, "--stac"),
        ({"intersects": "POLYGON ((0 0, 1 0, 1 1, 0 0))"}, "--intersects"),
        ({"bbox": None}, "--bbox"),
        ({"model_actors": 0}, "--model-actors"),
        ({"stac": "https://", "collections": "sentinel-2-l2a"}, "--stac"),
        ({"profile": "earth-search-sentinel-2-l2b"}, "--profile"),
        ({"profile": "earth-search-sentinel-2-l2a", "collections": "landsat-c2-l2"}, "--profile"),
    ],
)
def test_parse_request_errors(tmp_path, kw, flag):
    with pytest.raises(RequestError) as err:
        _req(tmp_path, **kw)
    assert err.value.field == flag


def test_stac_spellings_are_checked_before_the_search(tmp_path):
    assert _req(tmp_path, stac="HTTPS://stac.example/v1", collections="c").stac == "https://stac.example/v1"
    catalog_dir = tmp_path / "catalog"
    catalog_dir.mkdir()
    with pytest.raises(RequestError, match=r"^--stac: .* is a directory; give its catalog.json"):
        _req(tmp_path, stac=str(catalog_dir))


def test_output_checks(tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RequestError, match="--overwrite"):
        _req(tmp_path, output=str(tmp_path / "full"))
    # --overwrite replaces an rsflow dataset, never a folder of other files
    with pytest.raises(RequestError, match=r"^--overwrite: replaces an rsflow dataset only, .* other files \(no _manifest"):
        _req(tmp_path, output=str(tmp_path / "full"), overwrite=True)
    (tmp_path / "full" / "_manifest.json").write_text("{}")
    assert _req(tmp_path, output=str(tmp_path / "full"), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RequestError, match="is a file"):
        _req(tmp_path, output=str(tmp_path / "file"))
    with pytest.raises(RequestError, match=r"cannot create .*: .*file is a file"):  # under a file: no traceback
        _req(tmp_path, output=str(tmp_path / "file" / "out"))
    with pytest.raises(RequestError, match="nosuchfs"):
        _req(tmp_path, output="nosuchfs://bucket/x")
    # a bucket root has no folder beside it to stage in (its staging path lost the "://" and went to local disk)
    for root in ("memory://bucket", "memory://bucket/"):
        with pytest.raises(RequestError, match=r"^--output: memory://bucket/? is a bucket root; give a folder in it"):
            _req(tmp_path, output=root)
    assert _req(tmp_path, output="memory://bucket/run").output == "memory://bucket/run"
    assert _req(tmp_path, output="memory:///run").output == "memory:///run"  # a folder at the root, no bucket
    assert not [p for p in fsspec.filesystem("memory").find("/bucket") if ".probe-" in p]  # its probe is gone
    with pytest.raises(RequestError, match=r"^--output: https:// is read-only"):
        _req(tmp_path, output="https://example.com/results")
    # an object-store output that holds files is refused before the run (it was found only at the commit,
    # after the whole area was inferred: a retried RayJob redid hours of GPU work, then failed)
    memfs = fsspec.filesystem("memory")
    memfs.pipe_file("/bucket/held/part-00000.parquet", b"x")
    with pytest.raises(RequestError, match=r"^--output: memory://bucket/held already holds files; .*--resume"):
        _req(tmp_path, output="memory://bucket/held")
    with pytest.raises(RequestError, match=r"^--overwrite: replaces an rsflow dataset only, .*no _manifest.json"):
        _req(tmp_path, output="memory://bucket/held", overwrite=True)
    memfs.pipe_file("/bucket/held/_manifest.json", b"{}")
    assert _req(tmp_path, output="memory://bucket/held", overwrite=True).output == "memory://bucket/held"
    memfs.rm("/bucket/held", recursive=True)
    # an object store that cannot be written: one line before the search, not a traceback mid-run
    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "pipe_file",
                        lambda *a, **k: (_ for _ in ()).throw(PermissionError("AccessDenied: no credentials")))
    with pytest.raises(RequestError, match=r"^--output: cannot write to memory://bucket/run: PermissionError: "
                                           r"AccessDenied: no credentials"):
        _req(tmp_path, output="memory://bucket/run")
    assert staging_path("s3://bucket/run", "R") == "s3://bucket/.run.staging-R"
    assert staging_path("run", "R") == ".run.staging-R"
    with pytest.raises(ValueError, match="no parent folder"):
        staging_path("s3://bucket", "R")
    # the working directory, or one holding the catalog the run reads, is never the output
    with pytest.raises(RequestError, match="working directory"):
        _req(tmp_path, output=str(Path.cwd()), overwrite=True)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "items.json").write_text("{}")
    with pytest.raises(RequestError, match="holds the catalog"):
        _req(tmp_path, output=str(tmp_path), stac=str(tmp_path / "cat" / "items.json"), overwrite=True)


# ---------------------------------------------------------------------------------------------
# Task inputs


def test_task_inputs_from_flags_and_files(tmp_path):
    qfile = tmp_path / "q.txt"
    qfile.write_text("# harbour questions\nIs there a harbour in the image?\n\nHow many ships are there?\n")
    regions = tmp_path / "regions.geojson"
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "pier", "properties": {},
         "geometry": {"type": "Point", "coordinates": [-75.68, 37.655]}}]}))
    r = _req(tmp_path, tasks="caption,vqa,classify,detect,refer,region-caption",
             question=["Is there water?"], questions=str(qfile), classes="ucmerced",
             detect="ship, storage tank", refer=["the white building"], regions=str(regions))
    assert r.inputs.questions == ("Is there water?", "Is there a harbour in the image?", "How many ships are there?")
    assert r.inputs.classes_key == "ucmerced" and len(r.inputs.classes) == 21
    assert r.inputs.categories == ("ship", "storage tank")
    assert r.inputs.expressions == ("the white building",)
    assert [x.region_id for x in r.inputs.regions] == ["pier"]
    assert r.merge_iou == 0.5 and r.preview is True
    assert _req(tmp_path, merge="none").merge_iou is None


def test_prompts_per_tile_are_bounded_and_a_json_questions_file_is_refused(tmp_path):
    """Each question is a generation on every tile, which --max-tiles does not count: a 50,000-line file
    was taken, and a JSON file (a training set) was read as 25,000 one-line "questions"."""
    many = tmp_path / "many.txt"
    many.write_text("".join(f"Is there object number {k}?\n" for k in range(300)))
    with pytest.raises(RequestError, match=r"^--questions: 300 prompts per tile .* at most 256"):
        _req(tmp_path, tasks=("vqa",), questions=str(many))
    with pytest.raises(RequestError, match=r"^--detect: 301 prompts per tile"):
        _req(tmp_path, tasks=("vqa", "detect"), question=["Any water?"], detect=",".join(f"c{k}" for k in range(300)))
    task_file = tmp_path / "tasks.yaml"  # the file's questions: the refusal names the file, not --question
    task_file.write_text("questions:\n" + "".join(f"  - Is there object number {k}?\n" for k in range(300)))
    with pytest.raises(RequestError, match=r"^--task-file: 300 prompts per tile"):
        _req(tmp_path, tasks=(), task_file=str(task_file))
    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps([{"id": 1, "conversations": [{"from": "human", "value": "Is there water?"}]}],
                                  indent=1))
    with pytest.raises(RequestError, match=r"^--questions: .*train.json is JSON; give a text file with one question"):
        _req(tmp_path, tasks=("vqa",), questions=str(as_json))
    fine = tmp_path / "fine.txt"
    fine.write_text("[sic] Is the road paved?\n")  # a line that starts with a bracket but is no JSON
    assert _req(tmp_path, tasks=("vqa",), questions=str(fine)).inputs.questions == ("[sic] Is the road paved?",)


def test_task_file(tmp_path):
    (tmp_path / "r.geojson").write_text(json.dumps(
        {"type": "Feature", "properties": {"name": "lot"}, "geometry": {"type": "Point", "coordinates": [-75.68, 37.655]}}))
    tf = tmp_path / "tasks.yaml"
    tf.write_text("questions:\n  - Is there water?\nclasses: [forest, river]\ndetect: [ship]\nregions: r.geojson\n")
    r = _req(tmp_path, tasks=(), task_file=str(tf))
    assert r.tasks == ("vqa", "classify", "detect", "region-caption")
    assert r.inputs.classes == ("forest", "river") and r.inputs.regions[0].region_id == "lot"
    tf.write_text("tasks: caption\nquestion: typo\n")
    with pytest.raises(RequestError, match="unknown key 'question'") as err:
        _req(tmp_path, tasks=(), task_file=str(tf))
    assert err.value.field == "--task-file"
    tf.write_text("questions: [Is there water?]\n")  # an unquoted '?' in a flow list: where, and why
    with pytest.raises(RequestError, match=r"not valid YAML: while parsing a flow sequence .* expected ',' or '\]', "
                                           r"but got '\?' .*line 1, column 27"):
        _req(tmp_path, tasks=(), task_file=str(tf))


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"tasks": "vqa"}, "--question"),
        ({"tasks": "classify"}, "--classes"),
        ({"tasks": "detect", "detect": " , "}, "--detect"),
        ({"tasks": "detect"}, "--detect"),
        ({"tasks": "refer"}, "--refer"),
        ({"tasks": "region-caption"}, "--regions"),
        ({"tasks": "classify", "classes": "ucmerce"}, "--classes"),
        ({"tasks": "vqa", "question": ["x" * 5000]}, "--question"),
        ({"tasks": "vqa", "questions": "/no/such/file.txt"}, "--questions"),
        ({"merge_iou": 0.0}, "--merge-iou"),
        ({"merge": "union"}, "--merge"),
    ],
)
def test_task_input_errors_name_the_flag(tmp_path, kw, flag):
    with pytest.raises(RequestError) as err:
        _req(tmp_path, **kw)
    assert err.value.field == flag


def test_region_outside_the_aoi_is_refused(tmp_path):
    regions = tmp_path / "far.geojson"
    regions.write_text(json.dumps({"type": "Feature", "id": "far", "properties": {},
                                   "geometry": {"type": "Point", "coordinates": [10.0, 50.0]}}))
    with pytest.raises(RequestError, match="'far' lies outside the AOI") as err:
        _req(tmp_path, tasks="region-caption", regions=str(regions))
    assert err.value.field == "--regions"


def test_task_file_named_adapters(tmp_path):
    for name in ("rs", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    tf = tmp_path / "tasks.yaml"
    tf.write_text("tasks: [caption, vqa]\nquestions: ['Is there water?']\n"
                  "adapters: {rs: rs, other: other}\ntask_adapters: {caption: rs, vqa: other}\n")
    r = _req(tmp_path, tasks=(), task_file=str(tf))
    assert r.model.adapters == (("rs", str(tmp_path / "rs")), ("other", str(tmp_path / "other")))
    assert r.task_adapters == (("caption", "rs"), ("vqa", "other"))
    tf.write_text("tasks: [caption]\nadapters: {rs: rs}\ntask_adapters: {caption: nope}\n")
    with pytest.raises(RequestError, match="no adapter named 'nope'"):
        _req(tmp_path, tasks=(), task_file=str(tf))


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"tasks": ("vqa",), "question": ["Is there\x00 water?"]}, "--question"),
        ({"tasks": ("vqa",), "question": ["\x1b[2J clear the screen"]}, "--question"),
        ({"tasks": ("refer",), "refer": ["the ship\x07"]}, "--refer"),
        ({"tasks": ("vqa",), "question": ["x" * 1001]}, "--question"),
        ({"tasks": ("vqa",), "question": ["\u200b\u200b"]}, "--question"),  # only zero-width spaces
        ({"tasks": ("region-caption",), "regions": "ESC_ID"}, "--regions"),  # a region id holding an escape
    ],
)
def test_prompt_inputs_are_bounded_and_free_of_control_characters(tmp_path, kw, flag):
    if kw.get("regions") == "ESC_ID":
        path = tmp_path / "regions.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [{
            "type": "Feature", "id": "lot\x1b[2J", "properties": {},
            "geometry": {"type": "Point", "coordinates": [-75.68, 37.655]}}]}))
        kw = {**kw, "regions": str(path)}
    with pytest.raises(RequestError) as err:
        _req(tmp_path, **kw)
    assert err.value.field == flag


def test_a_task_file_cannot_smuggle_control_characters_into_prompts(tmp_path):
    tf = tmp_path / "tasks.yaml"
    tf.write_text('questions:\n  - "Is there water?\\u001b]0;pwned\\u0007"\n')
    with pytest.raises(RequestError, match="control characters") as err:
        _req(tmp_path, tasks=(), task_file=str(tf))
    assert err.value.field == "--question"
    tf.write_text('questions:\n  - "Is there water?\\tReally?"\n')  # a tab is fine
    assert _req(tmp_path, tasks=(), task_file=str(tf)).inputs.questions == ("Is there water?\tReally?",)


def test_model_text_is_made_safe_to_store() -> None:
    import pyarrow as pa

    from rsflow.models.runner import MAX_ANSWER_CHARS, _clean_answer

    text = _clean_answer("  a\x00b\x1b[31mc\ud800 d\n\te</s>")
    assert text == "a\ufffdb\ufffd[31mc? d\n\te"
    pa.array([text])  # valid UTF-8: Arrow takes it (a lone surrogate would not)
    long = _clean_answer("word " * 10_000)
    assert len(long) <= MAX_ANSWER_CHARS + len(" [truncated]") and long.endswith("[truncated]")


def test_a_huge_aoi_is_searched_with_a_simplified_cover_and_planned_exactly(tmp_path):
    """A 200,000-vertex coastline-like AOI from a GeoJSON file: accepted; the STAC search gets a cover
    of at most SEARCH_MAX_VERTICES vertices that contains it; tiles are planned on the AOI itself."""
    angles = np.linspace(0, 2 * np.pi, 200_000, endpoint=False)
    radius = 0.5 + 0.01 * np.sin(angles * 997)  # a wiggly ring around (10, 45)
    ring = np.column_stack([10 + radius * np.cos(angles), 45 + radius * np.sin(angles)])
    path = tmp_path / "coast.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [[*ring.tolist(), ring[0].tolist()]]}))
    aoi = parse_intersects(str(path))
    assert shapely.get_num_coordinates(aoi) == 200_001
    cover = search_geometry(aoi)
    assert shapely.get_num_coordinates(cover) <= SEARCH_MAX_VERTICES
    assert cover.contains(aoi) and cover.area < 1.1 * aoi.area
    small = shapely.box(0, 0, 1, 1)
    assert search_geometry(small) is small
    antimeridian = parse_bbox("170,-10,-170,10")
    assert search_geometry(antimeridian) is antimeridian  # two boxes stay two boxes


def test_an_aoi_file_too_large_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.geojson"
    with open(path, "wb") as fh:  # sparse: no disk is used
        fh.truncate(MAX_AOI_FILE_BYTES + 1)
    with pytest.raises(RequestError, match="simplify it") as err:
        parse_intersects(str(path))
    assert err.value.field == "--intersects"


def test_every_yaml_file_rsflow_reads_refuses_a_key_given_twice(tmp_path):
    """``yaml.safe_load`` keeps the last of two equal keys: a task file with ``tasks:`` twice ran the second
    list only. Task files, monitor configs, finetune configs and source profiles refuse it, naming the key
    and both lines; a key set again over a merged (``<<``) mapping is still allowed."""
    from rsflow.finetune.config import load_config
    from rsflow.monitor.config import load_monitor_config
    from rsflow.sources import load_profiles

    tf = tmp_path / "tasks.yaml"
    tf.write_text("tasks: [caption]\nquestions: ['Is there water?']\ntasks: [vqa]\n")
    with pytest.raises(RequestError, match=r"key 'tasks' appears twice \(lines 1 and 3\)") as err:
        _req(tmp_path, tasks=(), task_file=str(tf))
    assert err.value.field == "--task-file"
    tf.write_text("defaults: &d {questions: ['Is there water?']}\ntasks: [vqa]\n<<: *d\nquestions: ['Is it dry?']\n")
    with pytest.raises(RequestError, match="unknown key 'defaults'"):  # read past the merge: only the key is wrong
        _req(tmp_path, tasks=(), task_file=str(tf))

    tf.write_text("tasks: [vqa]\nquestions: [" + "1" * 5000 + "]\n")  # Python will not build the number
    with pytest.raises(RequestError, match=r"^--task-file: .* is not valid YAML: a value cannot be read: Exceeds"):
        _req(tmp_path, tasks=(), task_file=str(tf))

    monitor = tmp_path / "monitor.yaml"
    monitor.write_text("name: a\noutput: out\nname: b\n")
    with pytest.raises(RequestError, match="key 'name' appears twice") as err:
        load_monitor_config(monitor)
    assert err.value.field == "config"

    finetune = tmp_path / "run.yaml"
    finetune.write_text("lr: 1.0e-4\nworkers: 1\nlr: 2.0e-4\n")
    with pytest.raises(RequestError, match="key 'lr' appears twice") as err:
        load_config(finetune, [])
    assert err.value.field == "--config"

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "p.yaml").write_text("name: p\nbands: {red: B04}\nbands: {red: B4}\n")
    with pytest.raises(RequestError, match="key 'bands' appears twice"):
        load_profiles(profiles)


def test_an_aoi_split_at_the_antimeridian_is_accepted_however_wide_its_bounds() -> None:
    """The split MultiPolygon the refusal of an unsplit one asks for spans -180 to 180 in its bounds; it and a
    polygon wider than 180 degrees that crosses nothing are AOIs (a check on the bounds had refused them)."""
    split = ('{"type": "MultiPolygon", "coordinates": [[[[177, -20], [180, -20], [180, -15], [177, -15], [177, -20]]],'
             ' [[[-180, -20], [-179, -20], [-179, -15], [-180, -15], [-180, -20]]]]}')
    assert parse_intersects(split).bounds == (-180.0, -20.0, 180.0, -15.0)
    assert parse_intersects("POLYGON ((-100 0, 0 0, 100 0, 100 10, 0 10, -100 10, -100 0))").bounds[2] == 100
    wide = "GEOMETRYCOLLECTION (MULTIPOLYGON (((177 -20, 180 -20, 180 -15, 177 -20)), ((-180 -20, -179 -20, -180 -15, -180 -20))))"
    assert parse_intersects(wide).bounds[0] == -180
