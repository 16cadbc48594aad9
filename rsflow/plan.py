"""Items -> tiles: a pixel grid per item, cut into windows, kept only where they touch the AOI.

The grid of an item is the pixel grid of its finest RGB band (or, with a target GSD, a grid of
that resolution over the same extent and origin). Windows of ``size_px`` are laid with a stride
of ``size_px - overlap_px`` starting at the grid's top-left pixel::

    n_cols = max(1, ceil((grid_width_px - size_px) / stride_px) + 1)

so the last column starts before the right edge and may run past it: edge windows are kept and
padded with nodata at read time, never dropped or shifted (shifting would make ids depend on the
scene size). The AOI test is done in the item's CRS: the AOI is densified and reprojected there,
then intersected with each candidate window's rectangle (touching counts).

Tile ids are a hash of (item id, RGB asset keys and band indices, window, grid resolution, tile
spec): the same request gives the same ids every time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import shapely
from pyproj import CRS, Transformer
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

from rsflow.errors import RequestError
from rsflow.georef import split_at_antimeridian
from rsflow.request import TileSpec
from rsflow.sources import SourceProfile, band_scaling

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BandSource:
    """One of the three RGB bands of an item, as read."""

    asset: str
    """Asset key in the item."""
    href: str
    """Asset href as stored in the catalog (unsigned)."""
    band: int
    """1-based band index inside the asset's file."""
    scale: float
    """Physical value = DN * scale + offset (from raster:bands, else the profile's default)."""
    offset: float
    """See ``scale``."""
    nodata: float | None
    """DN that marks missing data, or None."""


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid in a projected (or geographic) CRS."""

    crs: str
    """CRS as ``EPSG:n`` where it has a code, else WKT2."""
    transform: tuple[float, float, float, float, float, float]
    """Affine (a, b, c, d, e, f): x = a*col + b*row + c, y = d*col + e*row + f."""
    width_px: int
    """Columns."""
    height_px: int
    """Rows."""


@dataclass(frozen=True)
class Tile:
    """One window of one item: everything a reader needs, as plain values (it travels in Arrow)."""

    tile_id: str
    """Deterministic id (see module docstring)."""
    item_id: str
    """STAC item id."""
    collection: str
    """STAC collection id."""
    datetime: str
    """Item acquisition time, RFC 3339 UTC."""
    crs: str
    """The item's native CRS (``EPSG:n`` or WKT2)."""
    transform: list[float]
    """The tile's own affine (a, b, c, d, e, f) in ``crs``: pixel (0, 0) is the tile's top-left."""
    col_off: int
    """Window column offset in the item grid, px."""
    row_off: int
    """Window row offset in the item grid, px."""
    width: int
    """Window width, px (= tile size)."""
    height: int
    """Window height, px (= tile size)."""
    res: float
    """Grid resolution in CRS units per pixel (metres for UTM)."""
    footprint_wkb: bytes
    """Window footprint in EPSG:4326 as WKB (densified, so it stays exact after reprojection)."""
    hrefs: list[str]
    """Unsigned hrefs of the red, green, blue sources."""
    bands: list[int]
    """1-based band index of each source."""
    scale: list[float]
    """Per-band scale."""
    offset: list[float]
    """Per-band offset."""
    nodata: list[float]
    """Per-band nodata DN as the catalog states it (NaN where it states none: the file's own is used)."""
    stretch_lo: float
    """Physical value mapped to 0."""
    stretch_hi: float
    """Physical value mapped to 255."""
    signing: str
    """Signing scheme applied at read time ('' for none)."""

    def to_row(self) -> dict[str, Any]:
        """The tile as a Ray Data row (plus the status columns every later stage carries)."""
        row = {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: asdict deep-copies every list
        row.update(status="ok", error=None, stage="plan", nodata_fraction=float("nan"))
        return row


def _crs_of(obj: dict[str, Any]) -> CRS | None:
    for key in ("proj:code", "proj:epsg", "proj:wkt2", "proj:projjson"):
        val = obj.get(key)
        if val is None:
            continue
        if key == "proj:epsg":
            return CRS.from_epsg(int(val))
        return CRS.from_user_input(val)
    return None


def _crs_string(crs: CRS) -> str:
    code = crs.to_epsg()
    return f"EPSG:{code}" if code else crs.to_wkt()


def band_sources(item: dict[str, Any], profile: SourceProfile) -> list[BandSource]:
    """The item's red, green and blue sources per the profile (scale/offset/nodata from the
    item's own metadata where it states them, else the profile's; see ``sources.band_scaling``).

    Raises:
        RequestError: an RGB asset named by the profile is missing from the item.
    """
    out = []
    for ref in profile.rgb:
        scaling = band_scaling(profile, item, ref)
        out.append(
            BandSource(
                asset=ref.asset,
                href=item["assets"][ref.asset]["href"],
                band=ref.band,
                scale=scaling.scale,
                offset=scaling.offset,
                nodata=scaling.nodata,
            )
        )
    return out


def asset_grid(item: dict[str, Any], asset_key: str, open_header: Any = None) -> Grid:
    """The pixel grid of one asset from its ``proj:*`` fields (asset first, then item).

    Falls back to reading the file header (``open_header(href)`` -> rasterio dataset) when the
    catalog does not say.
    """
    asset = item["assets"][asset_key]
    props = item.get("properties", {})
    transform = asset.get("proj:transform") or props.get("proj:transform")
    shp = asset.get("proj:shape") or props.get("proj:shape")
    crs = _crs_of(asset) or _crs_of(props)
    if transform is not None and shp is not None and crs is not None:
        t = tuple(float(v) for v in transform[:6])
        return Grid(crs=_crs_string(crs), transform=t, width_px=int(shp[1]), height_px=int(shp[0]))  # type: ignore[arg-type]
    if open_header is None:
        raise KeyError(f"asset {asset_key!r} of item {item.get('id')!r} has no proj:transform/proj:shape/proj:code")
    with open_header(asset["href"]) as src:
        a = src.transform
        return Grid(
            crs=_crs_string(CRS.from_user_input(src.crs.to_wkt())),
            transform=(a.a, a.b, a.c, a.d, a.e, a.f),
            width_px=src.width,
            height_px=src.height,
        )


def item_grid(grids: list[Grid], gsd_m: float | None) -> Grid:
    """The tile grid of an item: its finest band's grid, or that band's extent on square pixels of
    ``gsd_m`` metres (in the CRS's units), or, for a band whose pixels are not square, of the finer of its
    two pixel sizes (tiles are square; those bands are then read through a warp).

    Raises:
        ValueError: rotated or not north-up grids (columns that do not run east, rows that do not run
            south), or bands in different CRSs.
        RequestError: (``--gsd``) ``gsd_m`` for a CRS that does not measure in metres or feet (degrees).
    """
    if len({g.crs for g in grids}) != 1:
        raise ValueError(f"RGB bands are in different CRSs: {sorted({g.crs for g in grids})}")
    for g in grids:
        # Columns must run east (a > 0) as rows run south (e < 0): the windows are laid east of the origin,
        # and a grid whose columns run west would be tiled on its mirror image (every tile nodata).
        if g.transform[1] != 0 or g.transform[3] != 0 or g.transform[4] >= 0 or g.transform[0] <= 0:
            raise ValueError(f"grid {g.transform} is rotated or not north-up; not supported")
    finest = min(grids, key=lambda g: min(abs(g.transform[0]), abs(g.transform[4])))
    a, _, c, _, e, f = finest.transform
    square = math.isclose(abs(a), abs(e), rel_tol=1e-9)
    if gsd_m is None and square:
        return finest
    res = min(abs(a), abs(e)) if gsd_m is None else gsd_m / _metres_per_unit(finest.crs)
    width_crs = finest.width_px * abs(a)
    height_crs = finest.height_px * abs(e)
    return Grid(
        crs=finest.crs,
        transform=(res, 0.0, c, 0.0, -res, f),
        width_px=max(1, math.ceil(width_crs / res - 1e-9)),
        height_px=max(1, math.ceil(height_crs / res - 1e-9)),
    )


@functools.lru_cache(maxsize=64)
def _metres_per_unit(crs: str) -> float:
    """Metres in one unit of a projected CRS's x axis (1 for metres, 0.3048... for feet), for ``--gsd``."""
    parsed = CRS.from_user_input(crs)
    axis = parsed.axis_info[0] if parsed.axis_info else None
    if parsed.is_geographic or axis is None or not axis.unit_conversion_factor or axis.unit_name in ("degree",
                                                                                                  "radian"):
        unit = axis.unit_name if axis is not None else "unknown units"
        raise RequestError("--gsd", f"is in metres, but the imagery's CRS {crs} measures in {unit}s; "
                                    "leave --gsd out to tile on the imagery's own grid")
    return float(axis.unit_conversion_factor)


def window_offsets(length_px: int, size_px: int, stride_px: int) -> list[int]:
    """Offsets of windows along one axis (see the module docstring for the edge rule).

    >>> window_offsets(10, 4, 4)
    [0, 4, 8]
    >>> window_offsets(8, 4, 2)
    [0, 2, 4]
    >>> window_offsets(3, 4, 4)
    [0]
    """
    n = max(1, math.ceil((length_px - size_px) / stride_px) + 1)
    return [i * stride_px for i in range(n)]


_AOI_CLIP_MARGIN_DEG = 0.05
"""Margin (degrees) around an item's footprint to which the AOI is clipped before it is reprojected
(:func:`aoi_in_crs`): far more than the footprint's densified edges stray from the true ones."""


def aoi_in_crs(aoi: BaseGeometry, crs: str, *, near: tuple[float, float, float, float] | None = None,
               ) -> BaseGeometry:
    """Reproject an EPSG:4326 AOI into ``crs``, densified first so edges stay true.

    ``near``: bounds in ``crs`` of what the AOI will be tested against (an item's grid). The AOI is first
    clipped, in EPSG:4326, to their footprint with a margin: a projected CRS holds only near its area
    (UTM returns infinities or far-off points a continent away from its zone), so a continent-sized AOI
    reprojected whole touched no tile of an item it covers, or made planning fail. Where the bounds hold a
    pole, their footprint is the cap between their edges and the pole (``georef.split_at_antimeridian``);
    it was an invalid band at the edges' latitude, and the clip dropped every window nearer the pole.
    """
    if near is not None:
        aoi = shapely.intersection(aoi, footprint_4326(near, crs).buffer(_AOI_CLIP_MARGIN_DEG))
    transformer = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    dense = shapely.segmentize(aoi, max_segment_length=0.001) if shapely.get_dimensions(aoi) > 0 else aoi

    def fwd(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    out = shapely.transform(dense, fwd)
    return out if out.is_valid else shapely.make_valid(out)


@functools.lru_cache(maxsize=64)
def _to_4326(crs: str) -> Transformer:
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


_FOOTPRINT_SEGMENTS = 8
"""Segments per side of a tile footprint: its edges stay true after reprojection to EPSG:4326."""


def footprints_4326(minx: np.ndarray, miny: np.ndarray, maxx: np.ndarray, maxy: np.ndarray, crs: str) -> np.ndarray:
    """Window rectangles in ``crs`` as densified EPSG:4326 polygons (8 segments a side), all at once.

    The rings are what ``shapely.segmentize(box(...), side / 8)`` makes (counter-clockwise from the
    south-east corner), built as one array of vertices with one reprojection call for every tile: per
    tile, shapely and pyproj calls cost more than the read of a small tile. A window across the
    antimeridian is the MultiPolygon of its two sides, a window that holds a pole the cap between its
    edges and the pole, and a window of a geographic grid past 180 degrees is wrapped and split there
    (:func:`rsflow.georef.split_at_antimeridian`).
    """
    minx, miny, maxx, maxy = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in (minx, miny, maxx, maxy))
    f = np.arange(_FOOTPRINT_SEGMENTS) / _FOOTPRINT_SEGMENTS
    zero = np.zeros_like(f)
    # the four sides of box(minx, miny, maxx, maxy): east (up), north (west), west (down), south (east)
    xs = np.hstack([maxx + zero, maxx + (minx - maxx) * f, minx + zero, minx + (maxx - minx) * f, maxx])
    ys = np.hstack([miny + (maxy - miny) * f, maxy + zero, maxy + (miny - maxy) * f, miny + zero, miny])
    lon, lat = _to_4326(crs).transform(xs.ravel(), ys.ravel())
    ring = np.stack([np.asarray(lon), np.asarray(lat)], axis=-1).reshape(xs.shape[0], xs.shape[1], 2)
    polygons = shapely.polygons(ring)
    bounds = shapely.bounds(polygons)
    # rings across the antimeridian or round a pole, and windows of a geographic grid that run past 180 or a pole
    # (a ring through a pole, on a vertex or between two, spans 180 degrees or reaches +-90)
    odd = (bounds[:, 2] - bounds[:, 0] >= 180.0 - 1e-6) | (bounds[:, 0] < -180.0) | (bounds[:, 2] > 180.0)
    odd |= (bounds[:, 1] <= -90.0 + 1e-9) | (bounds[:, 3] >= 90.0 - 1e-9)
    for i in np.flatnonzero(odd):
        polygons[i] = split_at_antimeridian(polygons[i])
    return polygons


def footprint_4326(bounds_crs: tuple[float, float, float, float], crs: str) -> BaseGeometry:
    """A window rectangle in ``crs`` as a densified EPSG:4326 polygon (8 segments a side)."""
    return footprints_4326(*([v] for v in bounds_crs), crs)[0]


def tile_id(item_id: str, sources: list[BandSource], col_off: int, row_off: int, res: float, spec: TileSpec) -> str:
    """Deterministic tile id from the item, its RGB sources, the window and the tile spec."""
    return _tile_ids(item_id, sources, res, spec)(col_off, row_off)


def _tile_ids(item_id: str, sources: list[BandSource], res: float, spec: TileSpec) -> Callable[[int, int], str]:
    """:func:`tile_id` for the windows of one item: the id key is JSON with sorted keys, and only its
    window changes from tile to tile, so it is written once with a placeholder for the window."""
    hole = "\x00window\x00"
    key = json.dumps(
        {
            "item": item_id,
            "bands": [[s.asset, s.band] for s in sources],
            "window": hole,
            "res": round(res, 9),
            "spec": [spec.size_px, spec.overlap_px, None if spec.gsd_m is None else float(spec.gsd_m)],
        },
        sort_keys=True,
    )
    head, tail = key.split(json.dumps(hole))
    size = spec.size_px

    def one(col_off: int, row_off: int) -> str:
        window = json.dumps([col_off, row_off, size, size])
        digest = hashlib.sha1(f"{head}{window}{tail}".encode()).hexdigest()[:12]
        return f"{item_id}:r{row_off}c{col_off}:{digest}"

    return one


def plan_tiles(
    item: dict[str, Any],
    profile: SourceProfile,
    spec: TileSpec,
    aoi: BaseGeometry,
    open_header: Any = None,
    *,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> list[Tile]:
    """All tiles of one item whose window touches the AOI.

    Args:
        item: a STAC item as a dict.
        profile: how to make RGB from this item's collection.
        spec: tile spec with ``size_px`` resolved.
        aoi: area of interest in EPSG:4326.
        open_header: ``href -> rasterio dataset`` used only when the item lacks ``proj:*`` fields.
        rows: only the rows of tiles whose row offset (px) lies in this inclusive range, so that one
            item can be planned in parts (:func:`plan_units`); default all.
        cols: likewise for the columns of tiles (column offset, px).

    Returns:
        Tiles in row-major order of the item grid.
    """
    sources, grid, row_offs, col_offs = _item_windows(item, profile, spec, aoi, open_header, rows, cols)
    size, (_, _, x0, _, _, y0) = int(spec.size_px or 0), grid.transform
    res = abs(grid.transform[0])
    dt = item_datetime(item)
    minx, maxy = x0 + col_offs * res, y0 - row_offs * res  # as _item_windows computes each window
    wkbs = shapely.to_wkb(footprints_4326(minx, maxy - size * res, minx + size * res, maxy, grid.crs))
    ids = _tile_ids(item["id"], sources, res, spec)
    shared: dict[str, Any] = {
        "item_id": item["id"], "collection": item.get("collection") or "", "datetime": dt, "crs": grid.crs,
        "width": size, "height": size, "res": res, "hrefs": [s.href for s in sources],
        "bands": [s.band for s in sources], "scale": [s.scale for s in sources],
        "offset": [s.offset for s in sources],
        "nodata": [float("nan") if s.nodata is None else float(s.nodata) for s in sources],
        "stretch_lo": float(profile.stretch[0]), "stretch_hi": float(profile.stretch[1]),
        "signing": profile.signing or "",
    }
    tiles = [
        Tile(tile_id=ids(c, r), transform=[res, 0.0, bx0, 0.0, -res, by1], col_off=c, row_off=r,
             footprint_wkb=wkb, **shared)
        for r, c, bx0, by1, wkb in zip(row_offs.tolist(), col_offs.tolist(), minx.tolist(), maxy.tolist(), wkbs,
                                        strict=True)
    ]
    logger.debug("item %s: %d tiles of %d px touch the AOI", item.get("id"), len(tiles), size)
    return tiles


def _item_windows(
    item: dict[str, Any],
    profile: SourceProfile,
    spec: TileSpec,
    aoi: BaseGeometry,
    open_header: Any,
    rows: tuple[int, int] | None,
    cols: tuple[int, int] | None = None,
) -> tuple[list[BandSource], Grid, np.ndarray, np.ndarray]:
    """The item's RGB sources, its tile grid, and the row and column offsets (px, two int arrays) of every
    window that touches the AOI, row-major (what :func:`plan_tiles` and :func:`tile_offsets` share); the
    windows are tested against the AOI all at once."""
    if spec.size_px is None:
        raise ValueError("TileSpec.size_px must be resolved before planning")
    size, stride = spec.size_px, spec.size_px - spec.overlap_px
    sources = band_sources(item, profile)
    grids = [asset_grid(item, s.asset, open_header) for s in sources]
    grid = item_grid(grids, spec.gsd_m)
    a, _, x0, _, _, y0 = grid.transform
    res = abs(a)
    reach = size * res  # edge windows reach past the grid (padded), by less than a tile
    aoi_native = aoi_in_crs(aoi, grid.crs, near=(x0 - reach, y0 - grid.height_px * res - reach,
                                                 x0 + grid.width_px * res + reach, y0 + reach))
    shapely.prepare(aoi_native)  # many intersects tests against one geometry
    minx, miny, maxx, maxy = aoi_native.bounds
    # AOI bounds in grid pixels (columns grow east, rows grow south).
    px_min, px_max = (minx - x0) / res, (maxx - x0) / res
    py_min, py_max = (y0 - maxy) / res, (y0 - miny) / res
    col_offsets = [c for c in window_offsets(grid.width_px, size, stride) if c <= px_max and c + size >= px_min]
    row_offsets = [r for r in window_offsets(grid.height_px, size, stride) if r <= py_max and r + size >= py_min]
    if rows is not None:
        row_offsets = [r for r in row_offsets if rows[0] <= r <= rows[1]]
    if cols is not None:
        col_offsets = [c for c in col_offsets if cols[0] <= c <= cols[1]]
    rr, cc = (a.ravel() for a in np.meshgrid(np.asarray(row_offsets, dtype=np.int64),
                                             np.asarray(col_offsets, dtype=np.int64), indexing="ij"))
    bx0, by1 = x0 + cc * res, y0 - rr * res
    touches = shapely.intersects(aoi_native, shapely.box(bx0, by1 - size * res, bx0 + size * res, by1))
    return sources, grid, rr[touches], cc[touches]


def item_footprint(item: dict[str, Any]) -> BaseGeometry:
    """The item's geometry (EPSG:4326) or its bbox when it has none."""
    if item.get("geometry"):
        return shape(item["geometry"])
    return box(*item["bbox"][:4]) if item.get("bbox") else shapely.Polygon()


def item_datetime(item: dict[str, Any]) -> str:
    """The time an item's tiles carry: its ``datetime``, else its range's ``start_datetime``, else ``""``
    (no time: a null in the results).

    Raises:
        ValueError: a value that is not a date and time (the result rows parse it with ``pandas.Timestamp``;
            e.g. ``2016-02-30T16:00:00Z``): the item fails planning with this reason, where it used to
            fail the whole run after inference.
    """
    props = item.get("properties") or {}
    value = props.get("datetime") or props.get("start_datetime") or ""
    if value == "":
        return ""
    import pandas as pd

    if not isinstance(value, str):
        raise ValueError(f"item datetime {value!r} is not a string (RFC 3339)")  # noqa: TRY004 - planning records ValueErrors
    try:
        pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"item datetime {value!r} is not a date and time: {exc}") from None
    return value


def tile_offsets(
    item: dict[str, Any], profiles: dict[str, SourceProfile], spec: TileSpec, aoi: BaseGeometry, open_header: Any = None
) -> list[tuple[int, int]]:
    """``(row offset px, column offset px)`` of every tile the item plans over the AOI, row-major; ``[]``
    for an item that cannot be planned (the pipeline records it as failed, with the reason).

    Counted on the driver before any pixel is read (metadata only: the item's ``proj:*`` fields, or
    file headers where they are missing), for ``--max-tiles`` and :func:`plan_units`."""
    profile = profiles.get(item.get("collection") or "")
    if profile is None:
        return []
    try:  # the windows only: no footprints, ids or rows are built on the driver
        _, _, row_offs, col_offs = _item_windows(item, profile, spec, aoi, open_header, None)
    except RequestError:  # the request cannot work for this imagery (e.g. --gsd on degrees): say so first
        raise
    except Exception:  # noqa: BLE001 - the pipeline records the failure with its reason
        return []
    return list(zip(row_offs.tolist(), col_offs.tolist(), strict=True))


Unit = tuple[tuple[int, int], tuple[int, int]]
"""A planning unit: inclusive ranges of tile row offsets and of tile column offsets (px)."""


def plan_units(offsets: list[tuple[int, int]], tiles_per_unit: int, unit_tiles: int | None = None) -> list[Unit | None]:
    """Cut an item's tiles (:func:`tile_offsets`) into rectangles, as inclusive ``(rows, cols)`` offset
    ranges for ``plan_tiles(rows=..., cols=...)``, so that planning, and every stage after it, works on
    one rectangle per task; ``[None]`` (the whole item, one unit) for an item without tiles or that
    cannot be planned.

    Columns are cut into bands about ``sqrt(tiles_per_unit)`` tiles wide, and each band into runs of
    whole rows of about ``unit_tiles`` tiles (default ``tiles_per_unit``: near-square units). A read
    worker reads a unit row by row, so the internal blocks it keeps cached while it goes down a unit span
    the unit's width, not the scene's (a full-width unit on a 20,000 px scene needed a block cache of two
    block rows of the whole scene, 122 MB of uint16 for three bands). A unit's height costs no memory
    (its chips leave in blocks as they are read), and each internal block under the edge between two
    units is decoded twice (by each unit's reads, in different workers): taller units
    (``unit_tiles`` above ``tiles_per_unit``) decode fewer blocks twice.

    >>> plan_units([(r, c) for r in (0, 64, 128, 192) for c in (0, 64, 128, 192)], 4)
    [((0, 64), (0, 64)), ((128, 192), (0, 64)), ((0, 64), (128, 192)), ((128, 192), (128, 192))]
    >>> plan_units([(r, c) for r in (0, 64, 128, 192) for c in (0, 64, 128, 192)], 4, unit_tiles=8)
    [((0, 192), (0, 64)), ((0, 192), (128, 192))]
    >>> plan_units([(0, 0), (0, 64), (0, 128)], 32)
    [((0, 0), (0, 128))]
    >>> plan_units([], 32)
    [None]
    """
    if not offsets:
        return [None]
    rows_of: dict[int, list[int]] = {}  # column offset -> row offsets of its tiles
    for r, c in offsets:
        rows_of.setdefault(c, []).append(r)
    cols = sorted(rows_of)
    n_bands = math.ceil(len(cols) / max(1, min(len(cols), round(math.sqrt(tiles_per_unit)))))
    per_unit = max(1, unit_tiles or tiles_per_unit)
    units: list[Unit | None] = []
    for b in range(n_bands):
        band = cols[b * len(cols) // n_bands : (b + 1) * len(cols) // n_bands]
        c0, c1 = band[0], band[-1]
        counts: dict[int, int] = {}
        for c in band:
            for r in rows_of[c]:
                counts[r] = counts.get(r, 0) + 1
        total = sum(counts.values())
        if not total:
            continue
        n_units = max(1, round(total / per_unit))
        first, seen, k = None, 0, 1
        for r in sorted(counts):
            first = r if first is None else first
            seen += counts[r]
            if seen >= k * total / n_units:  # rows split as evenly as whole rows allow
                units.append(((first, r), (c0, c1)))
                first, k = None, k + 1
        if first is not None:
            units.append(((first, max(counts)), (c0, c1)))
    return units
