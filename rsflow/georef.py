"""GeoChat boxes <-> map geometry, as pure functions of a tile's affine transform and CRS.

Three spaces are involved:

- the **0-100 grid** of GeoChat's box text (``models.parse.Box``): 1/100 of the tile width for x and of its
  height for y, origin at the tile's top-left corner, y down;
- **pixel space** of the tile: ``(col, row)`` in pixels, x right, y down, integer values on pixel CORNERS
  (``(0, 0)`` is the top-left corner of the top-left pixel, ``(width_px, height_px)`` the bottom-right corner
  of the last pixel). A grid value ``v`` maps to ``v / 100 * width_px`` (geochat_demo.py,
  ``bounding_box_size = 100``);
- **map space**: the tile's native CRS through its affine ``(a, b, c, d, e, f)``
  (``x = a*col + b*row + c``, ``y = d*col + e*row + f``, GDAL/rasterio pixel-corner convention), and
  EPSG:4326 as ``(lon, lat)`` (pyproj ``always_xy``).

Rotated boxes are turned into polygons corner by corner and every vertex is transformed, so a rotated box
stays rotated on the map; nothing is ever rebuilt from two corners.
"""

from __future__ import annotations

import logging
import math
import threading
from functools import lru_cache
from typing import Final, cast

import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from rsflow.models.parse import Box
from rsflow.models.prompts import BoxInt

logger = logging.getLogger(__name__)

Transform6 = tuple[float, float, float, float, float, float]
"""Affine ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``, ``y = d*col + e*row + f`` (pixel corners)."""

GRID: Final[float] = 100.0
"""GeoChat's box grid size (geochat_demo.py ``bounding_box_size``)."""

_SNAP: Final[float] = 1e-3
"""Grid units. Values this close to an integer are taken as that integer before rounding outwards, and an
areal region that meets the tile in a strip thinner than this only touches it. A region's edges are straight
in lon/lat and bow slightly in the tile CRS (about 1e-5 grid units over a 640 m tile), which must not push a
box edge to the next integer. (1e-3 grid units = 1e-5 of the tile width.)"""


@lru_cache(maxsize=128)
def _transformer(src: str, dst: str, _thread: int) -> Transformer:
    # One Transformer per (CRS pair, thread): they are costly to build and not meant to be shared by threads.
    return Transformer.from_crs(src, dst, always_xy=True)


def transform_geometry(geom: BaseGeometry, src_crs: str, dst_crs: str) -> BaseGeometry:
    """Reproject every vertex of ``geom`` from ``src_crs`` to ``dst_crs`` (pyproj, ``always_xy``).

    Raises:
        ValueError: a vertex has no finite image in ``dst_crs`` (outside the projection's domain).
    """
    transformer = _transformer(src_crs, dst_crs, threading.get_ident())

    def fwd(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    out = shapely.transform(geom, fwd)
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise ValueError(f"geometry does not project from {src_crs} to {dst_crs} (non-finite coordinates)")
    return out


def box_to_pixels(box_: Box, width_px: int, height_px: int) -> tuple[float, float, float, float, float]:
    """A grid box in tile pixels: ``(x1, y1, x2, y2, angle_deg)`` with ``x = value / 100 * width_px``.

    Args:
        box_: a parsed GeoChat box (0-100 grid).
        width_px: tile width in pixels (the image the model saw, at native resolution).
        height_px: tile height in pixels.

    Returns:
        Pixel coordinates of the unrotated box (pixel-corner convention) and its angle in degrees, unchanged.
    """
    return (
        box_.x1 / GRID * width_px,
        box_.y1 / GRID * height_px,
        box_.x2 / GRID * width_px,
        box_.y2 / GRID * height_px,
        box_.angle_deg,
    )


def rotated_rect_px(x1: float, y1: float, x2: float, y2: float, angle_deg: float) -> Polygon:
    """The box ``(x1, y1, x2, y2)`` rotated by ``angle_deg`` about its centre, in pixel space (y down).

    Corners as geochat_demo.py ``bbox_and_angle_to_polygon``: with ``(cx, cy)`` the centre, ``w, h`` the
    sides and the offsets ``(dx, dy)`` in order (-w/2, -h/2), (w/2, -h/2), (w/2, h/2), (-w/2, h/2)::

        x' = cos(a)*dx - sin(a)*dy + cx,   y' = sin(a)*dx + cos(a)*dy + cy

    With y down a positive angle turns the box clockwise as seen on the image. The demo DRAWS boxes with
    ``cv2.getRotationMatrix2D(centre, a, 1)``, which turns the other way; which sense GeoChat was trained
    with is unconfirmed (models.md 3.4, GeoChat issue #5) - this follows the polygon helper, as the
    reference's evaluation note does (models.md 6.1).

    Args:
        x1: left edge of the unrotated box, pixels.
        y1: top edge, pixels.
        x2: right edge, pixels (> x1).
        y2: bottom edge, pixels (> y1).
        angle_deg: rotation in degrees. A multiple of 360 gives the axis-aligned box exactly.

    Returns:
        A 4-corner polygon (top-left corner of the unrotated box first).
    """
    if angle_deg % 360.0 == 0.0:
        return Polygon([(x1, y1), (x2, y1), (x2, y2), (x1, y2)])
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    w, h = abs(x2 - x1), abs(y2 - y1)
    a = math.radians(angle_deg)
    cos_a, sin_a = math.cos(a), math.sin(a)
    offsets = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return Polygon([(cos_a * dx - sin_a * dy + cx, sin_a * dx + cos_a * dy + cy) for dx, dy in offsets])


def pixel_polygon_to_crs(poly_px: Polygon, transform6: Transform6 | list[float]) -> Polygon:
    """Map every vertex of a pixel-space polygon through the tile affine into the tile's CRS.

    Args:
        poly_px: polygon in tile pixels (pixel-corner convention).
        transform6: the tile's affine ``(a, b, c, d, e, f)``.

    Returns:
        The polygon in the tile's native CRS (same vertices, same order).
    """
    a, b, c, d, e, f = (float(v) for v in transform6)

    def fwd(coords: np.ndarray) -> np.ndarray:
        col, row = coords[:, 0], coords[:, 1]
        return np.column_stack([a * col + b * row + c, d * col + e * row + f])

    return cast(Polygon, shapely.transform(poly_px, fwd))


def split_at_antimeridian(geom: BaseGeometry) -> BaseGeometry:
    """An EPSG:4326 polygon reprojected vertex by vertex, made a valid lon/lat geometry that stays inside
    ``[-180, 180] x [-90, 90]``; any other geometry as it is.

    - A ring that jumps across the antimeridian (its longitudes span more than 180 degrees: a tile of a
      UTM zone 1 or 60 scene, say) becomes the MultiPolygon of its parts west and east of it. Unsplit, it
      is a valid polygon about 360 degrees wide, which every reader and spatial filter takes at its word.
    - A ring that winds round a pole (a tile of a polar grid that holds the pole) becomes the cap between
      it and the pole, closed through ``(+-180, +-90)`` (:func:`_polar_cap`). As it was, it was an invalid
      thin band at the ring's latitude that left out the tile's own area.
    - A polygon past +-180 degrees (a padded edge tile of an EPSG:4326 grid that reaches the line: a
      geographic CRS keeps whatever longitude it is given) is wrapped and split there, so that GeoParquet
      bboxes stay within [-180, 180]; what lies past a pole is cut off.

    Each part is counter-clockwise.
    """
    if geom.is_empty or not isinstance(geom, Polygon):
        return geom
    through = _through_pole(np.asarray(geom.exterior.coords))
    if through is not None:
        return _wrap_lonlat(through) if through.bounds[0] < -180.0 or through.bounds[2] > 180.0 else orient(through, 1.0)
    minx, miny, maxx, maxy = geom.bounds
    if maxx - minx > 180.0:
        winding = _pole_winding(np.asarray(geom.exterior.coords)[:, 0])
        if winding != 0:
            return _polar_cap(geom, winding)
        shifted = shapely.transform(geom, _eastward)  # -179.99 -> 180.01: the ring continuous across 180
        if shifted.bounds[2] - shifted.bounds[0] > 180.0:  # neither across 180 nor round a pole: no better guess
            return geom
        geom = shifted
    elif minx >= -180.0 and maxx <= 180.0 and miny >= -90.0 and maxy <= 90.0:
        return geom
    return _wrap_lonlat(cast(Polygon, geom))


_POLE_EPS = 1e-9
"""Degrees from +-90 latitude within which a reprojected vertex is the pole itself."""


def _through_pole(coords: np.ndarray) -> Polygon | None:
    """A closed ring that passes through a pole (a tile with the pole on its corner or edge) as the lon/lat
    polygon it bounds, longitudes continuous (they may run past +-180); ``None`` for any other ring.

    At the pole a vertex's longitude means nothing (pyproj gives the projection's central meridian), and an
    edge through the pole between two vertices jumps 180 degrees of longitude: taken as a longitude step,
    either made a ring that seemed to wind round the pole (the whole polar cap, up to twice the tile) or cut
    a wedge into the tile. Here the ring runs from the vertex after the pole to the vertex before it,
    unrolled, and closes along the pole's latitude.
    """
    ring = coords[:-1]
    at_pole = np.abs(np.abs(ring[:, 1]) - 90.0) <= _POLE_EPS
    if at_pole.all():
        return None
    keep = ring[~at_pole]
    steps = (np.diff(keep[:, 0], append=keep[:1, 0]) + 180.0) % 360.0 - 180.0  # keep[k] -> keep[k + 1], cyclic
    # where the ring crosses the pole: after a vertex followed by pole vertices, or a step of 180 degrees
    crossing = at_pole[(np.flatnonzero(~at_pole) + 1) % len(ring)] | (np.abs(np.abs(steps) - 180.0) <= 1e-6)
    if int(crossing.sum()) != 1 or len(keep) < 3:
        return None  # no pole on the ring (or a ring that crosses it more than once: not a tile's)
    last = int(np.flatnonzero(crossing)[0])
    arc = np.roll(keep, -(last + 1), axis=0)  # from the vertex after the crossing to the one before it
    arc_steps = np.roll(steps, -(last + 1))[:-1]
    lon = arc[0, 0] + np.concatenate([[0.0], np.cumsum(arc_steps)])
    north = ring[at_pole][:, 1].mean() > 0 if at_pole.any() else keep[:, 1].mean() > 0
    pole = 90.0 if north else -90.0
    shell = np.vstack([np.column_stack([lon, arc[:, 1]]), [[lon[-1], pole], [lon[0], pole]]])
    poly = Polygon(shell)
    return poly if poly.is_valid else None


def _eastward(coords: np.ndarray) -> np.ndarray:
    return np.column_stack([np.where(coords[:, 0] < 0, coords[:, 0] + 360.0, coords[:, 0]), coords[:, 1]])


def _pole_winding(lon: np.ndarray) -> int:
    """How many times a closed ring of longitudes goes round a pole, eastward positive (0 for a ring that
    crosses the antimeridian and comes back). Each step is taken as the shorter way round: a tile's edge
    turns less than 180 degrees about a pole it does not pass through."""
    step = (np.diff(lon) + 180.0) % 360.0 - 180.0
    return round(float(step.sum()) / 360.0)


def _polar_cap(poly: Polygon, winding: int) -> BaseGeometry:
    """The cap between a ring that goes once round a pole and that pole, in ``[-180, 180] x [-90, 90]``.

    The ring is unrolled eastward into a curve whose end is its start plus 360 degrees, repeated over
    four periods (so that it spans [-180, 180] with room for any wiggle), closed along the pole's latitude
    and clipped to [-180, 180]: the seam at +-180 falls where the clip puts it, not where the ring starts.
    The pole is the one on the ring's side of the equator (a tile holds at most one pole).
    """
    coords = np.asarray(poly.exterior.coords)
    if winding < 0:
        coords = coords[::-1]
    lat = coords[:, 1]
    lon = coords[0, 0] + np.concatenate([[0.0], np.cumsum((np.diff(coords[:, 0]) + 180.0) % 360.0 - 180.0)])
    pole = 90.0 if float(lat.mean()) > 0 else -90.0
    periods = (-2, -1, 0, 1)
    xs = np.concatenate([lon[:-1] + 360.0 * k for k in periods] + [lon[-1:] + 360.0 * periods[-1]])
    ys = np.concatenate([lat[:-1]] * len(periods) + [lat[-1:]])
    ring = np.vstack([np.column_stack([xs, ys]), [[xs[-1], pole], [xs[0], pole]]])
    cap = shapely.clip_by_rect(Polygon(ring), -180.0, -90.0, 180.0, 90.0)
    if not cap.is_valid:
        cap = shapely.make_valid(cap)
    parts = [orient(p, sign=1.0) for p in shapely.get_parts(cap) if isinstance(p, Polygon) and p.area > 0]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def _wrap_lonlat(poly: Polygon) -> BaseGeometry:
    """A polygon whose longitudes are continuous but run past +-180, as its pieces in each 360-degree
    period moved into [-180, 180] (one piece per period it reaches), clipped to latitudes [-90, 90]."""
    minx, _, maxx, _ = poly.bounds
    parts: list[Polygon] = []
    for k in range(math.floor((minx + 180.0) / 360.0), math.floor((maxx + 180.0) / 360.0) + 1):
        piece = shapely.clip_by_rect(poly, -180.0 + 360.0 * k, -90.0, 180.0 + 360.0 * k, 90.0)
        if k:
            piece = shapely.transform(piece, lambda c, k=k: c - np.array([360.0 * k, 0.0]))
        parts += [orient(p, sign=1.0) for p in shapely.get_parts(piece) if isinstance(p, Polygon) and p.area > 0]
    if not parts:
        return Polygon()
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def centroid_lonlat(geom: BaseGeometry) -> tuple[float, float]:
    """The centroid ``(lon, lat)`` of an EPSG:4326 geometry, taken across the antimeridian for one split
    there (the plain centroid of its two sides lies near longitude 0)."""
    minx, _, maxx, _ = geom.bounds
    if maxx - minx > 180.0:
        shifted = shapely.transform(geom, lambda c: np.column_stack([np.where(c[:, 0] < 0, c[:, 0] + 360.0, c[:, 0]),
                                                                    c[:, 1]]))
        if shifted.bounds[2] - shifted.bounds[0] <= 180.0:
            point = shifted.centroid
            return ((point.x + 180.0) % 360.0) - 180.0, point.y
    point = geom.centroid
    return point.x, point.y


def to_epsg4326(poly: Polygon, crs: str, *, max_segment: float | None = None) -> BaseGeometry:
    """Reproject a polygon from ``crs`` to EPSG:4326 ``(lon, lat)``, vertex by vertex.

    Args:
        poly: polygon in ``crs``.
        crs: its CRS (``EPSG:n`` or WKT).
        max_segment: if given, edges are first split so no segment is longer than this (in ``crs`` units),
            so that straight edges in ``crs`` stay (nearly) true after reprojection.

    Returns:
        The polygon in EPSG:4326 with a counter-clockwise exterior ring (GeoJSON's winding); a
        MultiPolygon of its two sides where it crosses the antimeridian (:func:`split_at_antimeridian`).

    Raises:
        ValueError: ``max_segment`` is not positive, or a vertex does not project (see
            ``transform_geometry``).
    """
    if max_segment is not None:
        if not max_segment > 0:
            raise ValueError(f"max_segment must be > 0, got {max_segment}")
        poly = cast(Polygon, shapely.segmentize(poly, max_segment_length=max_segment))
    out = cast(Polygon, transform_geometry(poly, crs, "EPSG:4326"))
    return split_at_antimeridian(orient(out, sign=1.0))


def box_to_map(
    box_: Box,
    tile_transform: Transform6 | list[float],
    tile_crs: str,
    width_px: int,
    height_px: int,
    *,
    densify_px: float | None = None,
) -> tuple[Polygon, Polygon, Polygon]:
    """A GeoChat box on a tile as polygons in pixel space, the tile CRS and EPSG:4326.

    Args:
        box_: parsed box (0-100 grid).
        tile_transform: the tile's affine ``(a, b, c, d, e, f)`` (its pixel (0, 0) is the tile's corner).
        tile_crs: the tile's CRS.
        width_px: tile width, pixels.
        height_px: tile height, pixels.
        densify_px: if given, the EPSG:4326 polygon gets a vertex at least every ``densify_px`` pixels along
            each edge (the pixel and native polygons keep their 4 corners: the affine keeps lines straight).

    Returns:
        ``(polygon_px, polygon_native, polygon_4326)``.

    Raises:
        ValueError: ``densify_px`` is not positive; the box does not project to EPSG:4326.
    """
    poly_px = rotated_rect_px(*box_to_pixels(box_, width_px, height_px))
    native = pixel_polygon_to_crs(poly_px, tile_transform)
    dense_px = poly_px
    if densify_px is not None:
        if not densify_px > 0:
            raise ValueError(f"densify_px must be > 0, got {densify_px}")
        dense_px = cast(Polygon, shapely.segmentize(poly_px, max_segment_length=densify_px))
    return poly_px, native, to_epsg4326(pixel_polygon_to_crs(dense_px, tile_transform), tile_crs)


def _grid_floor(v: float) -> int:
    r = round(v)
    return int(r) if abs(v - r) < _SNAP else math.floor(v)


def _grid_ceil(v: float) -> int:
    r = round(v)
    return int(r) if abs(v - r) < _SNAP else math.ceil(v)


def region_to_box(
    region_4326: BaseGeometry,
    tile_transform: Transform6 | list[float],
    tile_crs: str,
    width_px: int,
    height_px: int,
) -> BoxInt | None:
    """The tile's 0-100 grid box around a map region (the ``[identify]`` input for region captioning).

    The region is reprojected into the tile CRS (densified first), mapped into pixel space with the inverse
    affine, clipped to the tile, and its bounds are converted to the grid and rounded OUTWARDS
    (floor for x1/y1, ceil for x2/y2; values within 1e-3 grid units of an integer count as that integer) so
    the box covers the region. A box thinner than one grid unit is widened to one unit, inside [0, 100].
    (geochat_demo.py's ``mask2bbox`` writes cell indices 0..99 of a 100x100 mask; we use the 0-100 scale
    of the model's own boxes for both directions.)

    Args:
        region_4326: region geometry in EPSG:4326 ``(lon, lat)``.
        tile_transform: the tile's affine ``(a, b, c, d, e, f)``.
        tile_crs: the tile's CRS.
        width_px: tile width, pixels.
        height_px: tile height, pixels.

    Returns:
        ``(x1, y1, x2, y2)`` with ``0 <= x1 < x2 <= 100`` and ``0 <= y1 < y2 <= 100``; None when the region
        does not meet the tile (for an areal region: shares no area with it).

    Raises:
        ValueError: the tile affine is not invertible; the region does not project to the tile CRS.
    """
    fwd = Affine(*(float(v) for v in tile_transform))
    if fwd.is_degenerate:
        raise ValueError(f"tile transform {tuple(tile_transform)} is not invertible")
    inv = ~fwd
    if region_4326.is_empty:
        return None
    if not region_4326.is_valid:
        region_4326 = shapely.make_valid(region_4326)
    tile_px = box(0.0, 0.0, float(width_px), float(height_px))
    footprint = to_epsg4326(
        pixel_polygon_to_crs(
            cast(Polygon, shapely.segmentize(tile_px, max_segment_length=max(width_px, height_px) / 16)),
            tile_transform,
        ),
        tile_crs,
    )
    minx, miny, maxx, maxy = footprint.bounds
    span = max(maxx - minx, maxy - miny)
    region = region_4326
    # Cut a large region down to the tile's neighbourhood before reprojecting it (fewer vertices, and no
    # vertices far outside the tile CRS's domain). Skipped where the footprint wraps in longitude (polar
    # tiles, the antimeridian): there lon/lat bounds say nothing useful.
    if footprint.is_valid and maxx - minx < 180.0:
        window = footprint.buffer(0.5 * span)
        if not region.intersects(window):
            return None
        region = region.intersection(window)
        if region.is_empty:
            return None
    if shapely.get_dimensions(region) > 0:
        region = shapely.segmentize(region, max_segment_length=span / 16)
    region_crs = transform_geometry(region, "EPSG:4326", tile_crs)

    def to_px(coords: np.ndarray) -> np.ndarray:
        x, y = coords[:, 0], coords[:, 1]
        return np.column_stack([inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f])

    region_px = shapely.transform(region_crs, to_px)
    if not region_px.is_valid:
        region_px = shapely.make_valid(region_px)
    clipped = region_px.intersection(tile_px)
    if clipped.is_empty:
        return None
    bx1, by1, bx2, by2 = clipped.bounds
    # An areal region that only touches the tile (a shared edge, up to reprojection noise) does not meet it.
    thin = min((bx2 - bx1) / width_px, (by2 - by1) / height_px) * GRID < _SNAP
    if region_px.area > 0 and (thin or clipped.area == 0):
        return None
    x1 = _grid_floor(bx1 / width_px * GRID)
    y1 = _grid_floor(by1 / height_px * GRID)
    x2 = _grid_ceil(bx2 / width_px * GRID)
    y2 = _grid_ceil(by2 / height_px * GRID)
    x1, x2 = _widen(max(0, x1), min(100, x2))
    y1, y2 = _widen(max(0, y1), min(100, y2))
    return (x1, y1, x2, y2)


def _widen(lo: int, hi: int) -> tuple[int, int]:
    if hi > lo:
        return lo, hi
    if lo < 100:
        return lo, lo + 1
    return 99, 100
