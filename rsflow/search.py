"""Search: a :class:`SearchQuery` -> the STAC items that cover an AOI in a time range.

Two paths with one result type:

- **api**: an ``http(s)`` STAC API, searched with pystac-client (bounded by ``max_items``, retried with
  backoff on 429/5xx for GET and POST alike, with a per-request timeout).
- **local**: a static ``catalog.json`` (or collection; its child and item links must be local paths, a
  link by URL is refused), an ItemCollection / FeatureCollection JSON, a single item JSON, a
  stac-geoparquet ``.parquet`` file, or ``"sample"`` (the embedded sample catalog,
  :func:`rsflow.sample.ensure_sample_catalog`). The API's filters are applied in Python.

Either way the cloud filter is applied client-side too (APIs without the query extension ignore it),
items are de-duplicated by id (paging can repeat items), items without geometry or assets are skipped
with a warning naming them, and the result is sorted by (datetime, id) so that reruns are deterministic.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from calendar import monthrange
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from rsflow.errors import RequestError, SourceError
from rsflow.hrefs import redact

logger = logging.getLogger(__name__)

__all__ = [
    "RETRY_STATUS_CODES",
    "SearchQuery",
    "SearchResult",
    "SourceKind",
    "normalize_datetime",
    "search_items",
]

SourceKind = Literal["api", "local"]
RETRY_STATUS_CODES: tuple[int, ...] = (429, 500, 502, 503, 504)
"""HTTP statuses retried with exponential backoff (``Retry-After`` is honoured for 429/503)."""

_GEOMETRY_TYPES = frozenset(
    {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection"}
)
_OPEN = ".."


# --------------------------------------------------------------------------------------------- datetime


def normalize_datetime(value: str | datetime | None) -> str | None:
    """Normalise a datetime or interval to ``START/END`` in RFC 3339 UTC (``..`` for an open end).

    Spellings (the meanings of pystac-client): ``"2024"`` is the whole year, ``"2024-03"`` the whole
    month, ``"2024-03-05"`` the whole day (each from 00:00:00 to 23:59:59.999999 UTC); a full timestamp is an
    instant (``"t/t"``); naive timestamps count as UTC, others are converted to UTC; ``"A/B"`` joins two
    spellings (the start of A to the end of B); ``".."`` or an empty side leaves that end open.

    Args:
        value: the user's ``--datetime`` value, a :class:`datetime`, or None.

    Returns:
        e.g. ``"2024-01-01T00:00:00Z/2024-03-31T23:59:59.999999Z"``, ``"2024-01-01T00:00:00Z/.."``, or None.

    Raises:
        RequestError: ``--datetime`` for an unreadable value, an interval open at both ends, or start > end.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        instant = _format_instant(_as_utc(value))
        return f"{instant}/{instant}"
    text = str(value).strip()
    if not text:
        return None
    parts = text.split("/")
    start: datetime | None
    end: datetime | None
    if len(parts) == 1:
        start, end = _parse_period(parts[0])
    elif len(parts) == 2:
        start = None if parts[0].strip() in ("", _OPEN) else _parse_period(parts[0])[0]
        end = None if parts[1].strip() in ("", _OPEN) else _parse_period(parts[1])[1]
    else:
        raise RequestError(
            "--datetime", f"{text!r} has more than one '/'; use START/END, e.g. 2024-01/2024-03"
        )
    if start is None and end is None:
        raise RequestError("--datetime", f"{text!r} is open at both ends; give at least a start or an end")
    if start is not None and end is not None and start > end:
        raise RequestError("--datetime", f"{text!r} starts after it ends; swap the two sides")
    return f"{_format_instant(start) if start else _OPEN}/{_format_instant(end) if end else _OPEN}"


_YEAR = re.compile(r"^\d{4}$")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _parse_period(text: str) -> tuple[datetime, datetime]:
    """First and last microsecond of a year, month or day spelling (an item at 23:59:59.5 is in its day);
    an instant gives (t, t)."""
    text = text.strip()
    last_us = timedelta(days=1, microseconds=-1)
    try:
        if _YEAR.match(text):
            year = int(text)
            return datetime(year, 1, 1, tzinfo=UTC), datetime(year, 12, 31, tzinfo=UTC) + last_us
        if match := _MONTH.match(text):
            year, month = int(match[1]), int(match[2])
            last = monthrange(year, month)[1]
            return datetime(year, month, 1, tzinfo=UTC), datetime(year, month, last, tzinfo=UTC) + last_us
        if _DAY.match(text):
            day = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return day, day + last_us
        if not _INSTANT.match(text):  # ISO basic (20240305) or week (2024-W10) forms read as other instants
            raise ValueError("not one of the spellings below")
        instant = _as_utc(datetime.fromisoformat(text.replace("z", "Z")))
        return instant, instant
    except ValueError as err:
        raise RequestError(
            "--datetime",
            f"cannot read {text!r} ({err}); use RFC 3339 such as 2024-01-15T10:00:00Z, or 2024, 2024-01, "
            "2024-01-15, joined as START/END with .. for an open end",
        ) from err


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _format_instant(value: datetime) -> str:
    text = (
        value.astimezone(UTC)
        .replace(tzinfo=None)
        .isoformat(timespec="microseconds" if value.microsecond else "seconds")
    )
    return f"{text}Z"


def _parse_interval(normalised: str | None) -> tuple[datetime | None, datetime | None]:
    if normalised is None:
        return None, None
    start_text, end_text = normalised.split("/")
    start = None if start_text == _OPEN else datetime.fromisoformat(start_text)
    end = None if end_text == _OPEN else datetime.fromisoformat(end_text)
    return start, end


# --------------------------------------------------------------------------------------------- query


@dataclass(frozen=True)
class SearchQuery:
    """What to search: a source, collections, an AOI, a time range and bounds. Checked, never rewritten."""

    stac: str
    """An ``http(s)`` STAC API URL; a local static ``catalog.json``, ItemCollection/FeatureCollection JSON or
    stac-geoparquet ``.parquet`` path; or ``"sample"`` for the embedded sample catalog."""
    collections: tuple[str, ...]
    """STAC collection ids; an item must belong to one of them. Required (at least one) for a STAC API;
    empty for a local catalog means every collection in it."""
    intersects: dict[str, Any]
    """The AOI as a GeoJSON geometry in EPSG:4326 (lon, lat degrees); items must intersect it."""
    datetime: str | None = None
    """Time range as normalised by :func:`normalize_datetime` (``START/END`` UTC, ``..`` open); None: any."""
    max_cloud: float | None = None
    """Largest ``eo:cloud_cover`` kept, in percent (0-100, inclusive); None: no cloud filter. Items that do
    not state ``eo:cloud_cover`` are dropped when this is set (as the STAC API query extension does)."""
    max_items: int = 100
    """Upper bound on the items fetched from an API (and returned); a search is never unbounded."""

    def __post_init__(self) -> None:
        if not isinstance(self.stac, str) or not self.stac.strip():
            raise RequestError("--stac", "give a STAC API URL, a local catalog/items file, or 'sample'")
        if not isinstance(self.collections, tuple):
            raise RequestError("--collections", "must be a tuple of collection ids")
        if not self.collections and self.stac.startswith(("http://", "https://")):
            raise RequestError(
                "--collections", f"give at least one collection id to search {self.stac}, e.g. sentinel-2-l2a"
            )
        for collection in self.collections:
            if not isinstance(collection, str) or not collection.strip():
                raise RequestError("--collections", f"{collection!r} is not a collection id")
        _check_aoi(self.intersects)
        if self.datetime is not None:
            normalised = normalize_datetime(self.datetime)
            if normalised != self.datetime:
                raise RequestError(
                    "--datetime",
                    f"{self.datetime!r} is not normalised; pass normalize_datetime(...) = {normalised!r}",
                )
        if self.max_cloud is not None and (
            isinstance(self.max_cloud, bool)
            or not isinstance(self.max_cloud, int | float)
            or not (0.0 <= self.max_cloud <= 100.0)
        ):
            raise RequestError("--max-cloud", f"must be a percentage from 0 to 100, got {self.max_cloud!r}")
        if isinstance(self.max_items, bool) or not isinstance(self.max_items, int) or self.max_items < 1:
            raise RequestError("--max-items", f"must be a whole number >= 1, got {self.max_items!r}")


def _check_aoi(geometry: Any) -> None:
    if not isinstance(geometry, dict) or geometry.get("type") not in _GEOMETRY_TYPES:
        raise RequestError(
            "--intersects", "must be a GeoJSON geometry dict (Polygon, MultiPolygon, Point, ...) in EPSG:4326"
        )
    try:
        geom = shape(geometry)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, shapely.errors.GEOSException) as err:
        raise RequestError("--intersects", f"is not a readable GeoJSON geometry: {err}") from err
    if geom.is_empty:
        raise RequestError("--intersects", "the AOI geometry is empty")
    west, south, east, north = geom.bounds
    if not (-180.0 <= west <= east <= 180.0 and -90.0 <= south <= north <= 90.0):
        raise RequestError(
            "--intersects",
            f"bounds ({west}, {south}, {east}, {north}) are not lon/lat degrees in EPSG:4326 "
            "(lon -180..180, lat -90..90); reproject the AOI first",
        )
    if not geom.is_valid:
        raise RequestError(
            "--intersects",
            f"the AOI geometry is invalid ({shapely.is_valid_reason(geom)}); fix or buffer(0) it",
        )


# --------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class SearchResult:
    """The items found and how the search went."""

    items: list[dict[str, Any]]
    """STAC item dicts, unique by id, sorted by (datetime or start_datetime, id)."""
    source_kind: SourceKind
    """``"api"`` (pystac-client against an HTTP STAC API) or ``"local"`` (files read and filtered here)."""
    source: str
    """The endpoint URL or the local file that was searched (``"sample"`` resolved to its catalog.json)."""
    n_duplicates: int
    """Items dropped because their id had been seen already."""
    n_skipped: int
    """Items dropped because they had no geometry or no assets (each logged as a warning)."""
    n_cloud_filtered: int
    """Items dropped by the client-side ``max_cloud`` filter."""
    reached_max_items: bool
    """True when the bound was hit (an API returned ``max_items`` items, or a local source had more matches
    than ``max_items``): more matching items may exist."""
    duration_seconds: float
    """Wall-clock time of the search, in seconds."""
    cloud_filter_on_server: bool = field(default=False)
    """True when ``max_cloud`` was also sent to the API (it conforms to the query extension)."""
    refused: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    """Items not in ``items``, each with why: no geometry, no assets, or an id another item has."""


# --------------------------------------------------------------------------------------------- search


def search_items(
    query: SearchQuery,
    *,
    timeout_seconds: float = 30.0,
    max_retries: int = 5,
    backoff_factor: float = 0.5,
) -> SearchResult:
    """Find the items of ``query.collections`` that intersect the AOI in the time range.

    Args:
        query: the checked query.
        timeout_seconds: per-request connect/read timeout for APIs, in seconds.
        max_retries: retries per request on connection errors and on HTTP 429/500/502/503/504.
        backoff_factor: exponential backoff base, in seconds (sleeps ``backoff_factor * 2**(n-1)``).

    Returns:
        A :class:`SearchResult`.

    Raises:
        RequestError: ``--stac`` for a local path that does not exist or cannot be read as STAC.
        SourceError: the API failed (unreachable, HTTP error, not a STAC API), naming the URL and status.
    """
    started = time.monotonic()
    stac = query.stac.strip()
    if stac == "sample":
        from rsflow.sample import ensure_sample_catalog

        stac = str(ensure_sample_catalog())
    if stac.startswith(("http://", "https://")):
        found = _search_api(
            stac,
            query,
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            backoff_factor=backoff_factor,
        )
        kind: SourceKind = "api"
    else:
        found = _search_local(_local_path(stac), query)
        kind = "local"

    if found.unknown_collections:
        has = f"; it has: {', '.join(found.known_collections)}" if found.known_collections else ""
        raise RequestError(
            "--collections",
            f"{redact(stac)} has no collection {', '.join(map(repr, found.unknown_collections))}{has}",
        )
    items, n_duplicates, n_skipped, refused = _screen(found.items)
    kept, n_cloud = _filter_cloud(items, query.max_cloud)
    n_cloud += found.n_cloud_filtered
    kept.sort(key=_sort_key)
    if n_duplicates:
        logger.info("dropped %d duplicate items (same id) from %s", n_duplicates, redact(stac))
    if found.reached_max_items:
        logger.warning(
            "the search of %s stopped at --max-items %d; more matching items may exist",
            redact(stac),
            query.max_items,
        )
    result = SearchResult(
        items=kept,
        source_kind=kind,
        source=stac,
        n_duplicates=n_duplicates,
        n_skipped=n_skipped,
        n_cloud_filtered=n_cloud,
        reached_max_items=found.reached_max_items,
        duration_seconds=time.monotonic() - started,
        cloud_filter_on_server=found.cloud_on_server,
        refused=refused,
    )
    logger.info("found %d items in %s (%s) in %.2f s", len(result.items), redact(stac), kind,
                result.duration_seconds)
    return result


#: Without the query extension, ``--max-cloud`` is applied here to at most this many times ``--max-items``
#: items of the API's answer (newest first), so that a search where few pass does not page through an
#: entire catalog; stopping there counts as reaching ``--max-items``.
_CLIENT_FILTER_SCAN = 20


@dataclass(frozen=True)
class _Found:
    items: list[dict[str, Any]]
    reached_max_items: bool
    cloud_on_server: bool = False
    unknown_collections: tuple[str, ...] = ()
    """Requested collections the source does not have (a typo finds nothing, and must not pass for it)."""
    known_collections: tuple[str, ...] | None = None
    """The collections a local source has (named in the error), None for an API."""
    n_cloud_filtered: int = 0
    """Items dropped for ``max_cloud`` before ``max_items`` was applied (a local source, or an API
    without the query extension)."""


def _search_api(
    url: str, query: SearchQuery, *, timeout_seconds: float, max_retries: int, backoff_factor: float
) -> _Found:
    from pystac import STACError
    from pystac_client import Client
    from pystac_client.conformance import ConformanceClasses
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO
    from pystac_client.warnings import DoesNotConformTo
    from urllib3.util.retry import Retry

    retry = Retry(
        total=max_retries,
        backoff_factor=backoff_factor,
        status_forcelist=RETRY_STATUS_CODES,
        allowed_methods=None,  # retry POST /search too
        raise_on_status=False,  # after the last retry, hand back the error response (its status is kept)
    )
    stac_io = StacApiIO(timeout=timeout_seconds, max_retries=retry)
    try:
        # Client.open resets the StacApiIO timeout to its own argument: pass it again.
        client = Client.open(url, stac_io=stac_io, timeout=timeout_seconds)
        use_query = query.max_cloud is not None and client.conforms_to(ConformanceClasses.QUERY)
        if query.max_cloud is not None and not use_query:
            logger.info(
                "%s does not conform to the STAC API query extension; filtering eo:cloud_cover here",
                redact(url),
            )
        filter_here = query.max_cloud is not None and not use_query
        search = client.search(
            collections=list(query.collections),
            intersects=query.intersects,
            datetime=query.datetime,
            # Filtering here, the cap applies to the items that pass, as the query extension's would
            # (and as a local source does): the API's first max_items could all be too cloudy.
            max_items=_CLIENT_FILTER_SCAN * query.max_items if filter_here else query.max_items,
            limit=min(query.max_items, 100),
            query={"eo:cloud_cover": {"lte": query.max_cloud}} if use_query else None,
        )
        n_cloud, reached = 0, False
        if filter_here:
            items = []
            for item in search.items_as_dicts():
                passed, dropped = _filter_cloud([item], query.max_cloud)
                items += passed
                n_cloud += dropped
                if len(items) >= query.max_items:
                    reached = True
                    break
            else:  # the scan stopped at its own cap: more items may pass further on
                reached = len(items) + n_cloud >= _CLIENT_FILTER_SCAN * query.max_items
        else:
            items = list(search.items_as_dicts())
            reached = len(items) >= query.max_items
        unknown = []
        # An API without the collections endpoint cannot say; there, no items is just no items.
        missing = set(query.collections) - {str(i.get("collection")) for i in items}
        if not (client.conforms_to(ConformanceClasses.COLLECTIONS) or client.conforms_to(ConformanceClasses.FEATURES)):
            missing = set()
        for collection in sorted(missing):
            try:  # no item from it: does it exist at all?
                if client.get_collection(collection) is None:  # pystac-client's answer to a 404 on some APIs
                    unknown.append(collection)
            except APIError as err:
                if getattr(err, "status_code", None) != 404:
                    raise
                unknown.append(collection)
            except (KeyError, ValueError):  # pystac-client's "not found" on some APIs
                unknown.append(collection)
    except APIError as err:
        status = getattr(err, "status_code", None)
        raise SourceError(
            f"STAC API {redact(url)} failed{f' with HTTP {status}' if status else ''}: "
            f"{_short(str(err))} (check --stac)",
            status_code=status,
        ) from err
    except DoesNotConformTo as err:
        raise SourceError(
            f"{redact(url)} is not a STAC API with item search ({redact(str(err))}); check --stac"
        ) from err
    except (
        OSError,
        ValueError,
        KeyError,
        STACError,
    ) as err:  # requests errors are OSErrors; bad JSON ValueError
        raise SourceError(f"STAC API {redact(url)} could not be searched: {_short(str(err))}") from err
    return _Found(items=items, reached_max_items=reached, cloud_on_server=use_query,
                  unknown_collections=tuple(unknown), n_cloud_filtered=n_cloud)


def _short(text: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters, with any URL credentials redacted (an API's error
    quotes the request URL, tokens included)."""
    text = redact(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- local


def _local_path(stac: str) -> Path:
    if stac.startswith("file://"):
        stac = unquote(urlparse(stac).path)
    path = Path(stac).expanduser()
    if not path.is_file():
        raise RequestError(
            "--stac",
            f"{stac!r} is not a file; give an http(s) STAC API URL, a local catalog.json, an "
            "ItemCollection/FeatureCollection .json, a stac-geoparquet .parquet file, or 'sample'",
        )
    return path.resolve()


def _search_local(path: Path, query: SearchQuery) -> _Found:
    items = _read_local_items(path)
    aoi = shape(query.intersects)
    start, end = _parse_interval(query.datetime)
    wanted = set(query.collections)
    matching = [
        item
        for item in items
        if (not wanted or item.get("collection") in wanted) and _intersects(item, aoi) and _in_time(item, start, end)
    ]
    # Cloud first, as an API with the query extension filters before it pages.
    matching, n_cloud = _filter_cloud(matching, query.max_cloud)
    # Mirror the APIs' newest-first paging: with more matches than max_items, keep the newest.
    reached = len(matching) > query.max_items
    if reached:
        matching.sort(key=_sort_key, reverse=True)
        matching = matching[: query.max_items]
    known = {str(item.get("collection")) for item in items if item.get("collection")}
    return _Found(items=matching, reached_max_items=reached, n_cloud_filtered=n_cloud,
                  unknown_collections=tuple(sorted(wanted - known)), known_collections=tuple(sorted(known)))


def _read_local_items(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        return _read_geoparquet(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RequestError("--stac", f"cannot read {path} as JSON: {err}") from err
    kind = document.get("type") if isinstance(document, dict) else None
    if kind == "FeatureCollection":
        return [_absolute_assets(item, path.parent) for item in document.get("features") or []]
    if kind == "Feature":
        return [_absolute_assets(document, path.parent)]
    if kind in ("Catalog", "Collection"):
        return _walk_static(path)
    raise RequestError(
        "--stac",
        f"{path} is a {kind!r} document; expected a Catalog, Collection, FeatureCollection or Feature",
    )


def _read_geoparquet(path: Path) -> list[dict[str, Any]]:
    try:
        import rustac

        collection = rustac.read_sync(str(path))
        features = collection.get("features") or []
    except ImportError:
        try:
            import pyarrow.parquet as pq
            import stac_geoparquet.arrow as sga
        except ImportError as err:
            raise RequestError(
                "--stac", f"reading {path} needs rustac or stac-geoparquet: pip install rustac"
            ) from err
        features = list(sga.stac_table_to_items(pq.read_table(path)))
    except Exception as err:  # rustac raises its own error types for unreadable files
        raise RequestError("--stac", f"cannot read {path} as stac-geoparquet: {err}") from err
    return [_absolute_assets(item, path.parent) for item in features]


def _walk_static(root: Path) -> list[dict[str, Any]]:
    """Items of a static catalog, following ``child`` and ``item`` links (local files only).

    Raises:
        RequestError: ``--stac`` for a linked file that cannot be read, or for links by URL (``https://``,
            ``s3://``): those items would be missing from the run, which would still succeed on the rest,
            so the catalog is refused before any work, naming how many such links there are and the first.
    """
    pending = [root.resolve()]
    seen: set[Path] = set()
    items: list[dict[str, Any]] = []
    remote: list[tuple[str, Path]] = []
    while pending:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RequestError(
                "--stac", f"cannot read {path}, linked from the catalog {root}: {err}"
            ) from err
        if document.get("type") == "Feature":
            items.append(_absolute_assets(document, path.parent))
            continue
        for link in document.get("links") or []:
            if link.get("rel") not in ("child", "item"):
                continue
            href = str(link.get("href", ""))
            if "://" in href and not href.startswith("file://"):
                remote.append((href, path))
                continue
            target = Path(unquote(urlparse(href).path)) if href.startswith("file://") else Path(href)
            pending.append((path.parent / target).resolve() if not target.is_absolute() else target)
    if remote:
        first, holder = remote[0]
        raise RequestError(
            "--stac",
            f"the static catalog {root} has {len(remote)} child/item link(s) by URL rather than local path "
            f"(the first: {redact(first)}, in {holder}); a local static catalog is read from local files only: "
            "pass the catalog's STAC API URL to --stac, or a local copy whose links are local paths",
        )
    return items


def _absolute_assets(item: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative local asset hrefs absolute against the folder of the file that held the item."""
    assets = item.get("assets")
    if not isinstance(assets, dict):
        return item
    fixed = {}
    for key, asset in assets.items():
        href = asset.get("href") if isinstance(asset, dict) else None
        if isinstance(href, str) and href and "://" not in href and not Path(href).is_absolute():
            asset = {**asset, "href": str((base / href).resolve())}
        fixed[key] = asset
    return {**item, "assets": fixed}


# --------------------------------------------------------------------------------------------- filters


def _screen(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int, list[tuple[dict[str, Any], str]]]:
    """Drop repeated ids and items without geometry or assets. Returns (kept, n_duplicates, n_skipped,
    refused): an item the API returned twice (the same JSON) is dropped quietly; another item with an id
    already seen, or an item without geometry or assets, is refused with the reason (the region job
    records each as a failed row)."""
    kept: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    refused: list[tuple[dict[str, Any], str]] = []
    n_duplicates = n_skipped = 0
    for item in items:
        item_id = str(item.get("id"))
        if item_id in seen:
            n_duplicates += 1
            first = seen[item_id]
            if item != first:  # rsflow keys items by id (tile ids, the monitor's ledger, the results' item_id)
                reason = (f"another item with id {item_id!r} (collection {first.get('collection')!r}, datetime "
                          f"{(first.get('properties') or {}).get('datetime')!r}) was read first; rsflow keys "
                          "results by item id")
                logger.warning("skipping item %s of collection %r: %s", item_id, item.get("collection"), reason)
                refused.append((item, reason))
            continue
        seen[item_id] = item
        for key, what in (("geometry", "geometry"), ("assets", "assets")):
            if not item.get(key):
                logger.warning("skipping item %s: it has no %s", item_id, what)
                refused.append((item, f"the item has no {what}"))
                n_skipped += 1
                break
        else:
            kept.append(item)
    return kept, n_duplicates, n_skipped, refused


def _filter_cloud(items: list[dict[str, Any]], max_cloud: float | None) -> tuple[list[dict[str, Any]], int]:
    if max_cloud is None:
        return items, 0
    kept = []
    for item in items:
        cover = (item.get("properties") or {}).get("eo:cloud_cover")
        if (
            isinstance(cover, int | float)
            and not isinstance(cover, bool)
            and math.isfinite(cover)
            and cover <= max_cloud
        ):
            kept.append(item)
        elif cover is None:
            logger.info("dropping item %s: --max-cloud is set and it has no eo:cloud_cover", item.get("id"))
    return kept, len(items) - len(kept)


def _intersects(item: dict[str, Any], aoi: BaseGeometry) -> bool:
    geometry = item.get("geometry")
    if not geometry:
        return True  # screened out later, with a warning naming the item
    try:
        return bool(shape(geometry).intersects(aoi))
    except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException):
        logger.warning("item %s has an unreadable geometry; leaving it out", item.get("id"))
        return False


def _item_interval(item: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    properties = item.get("properties") or {}
    instant = _parse_item_time(properties.get("datetime"))
    if instant is not None:
        return instant, instant
    return _parse_item_time(properties.get("start_datetime")), _parse_item_time(
        properties.get("end_datetime")
    )


def _parse_item_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return _as_utc(datetime.fromisoformat(value.replace("z", "Z")))
    except ValueError:
        return None


def _in_time(item: dict[str, Any], start: datetime | None, end: datetime | None) -> bool:
    """True when the item's datetime, or its start/end range, overlaps [start, end] (both inclusive)."""
    if start is None and end is None:
        return True
    item_start, item_end = _item_interval(item)
    if item_start is None and item_end is None:
        logger.warning("item %s has no datetime nor start/end_datetime; leaving it out", item.get("id"))
        return False
    starts_after = end is not None and item_start is not None and item_start > end
    ends_before = start is not None and item_end is not None and item_end < start
    return not (starts_after or ends_before)


_EPOCH_MIN = datetime.min.replace(tzinfo=UTC)


def _sort_key(item: dict[str, Any]) -> tuple[datetime, str]:
    item_start, _ = _item_interval(item)
    return (item_start or _EPOCH_MIN, str(item.get("id")))
