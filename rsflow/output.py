"""Results -> GeoParquet 1.1 dataset + run manifest, committed atomically.

Layout of one run's output (a directory, local or on any fsspec filesystem)::

    OUTPUT/
      part-<hilbert>-<task>-<uuid>.parquet   GeoParquet 1.1, zstd, bbox covering column
      _manifest.json                          the run manifest (pyarrow/geopandas ignore '_' files)

Rows are ordered spatially: each row gets a Hilbert key of its footprint centroid, the dataset
is sorted on it (Ray Data), each sorted block is written as one file and the file names start
with the block's first key, so name order is spatial order and every file covers a compact area.

Atomic commit: everything is written into a hidden staging directory beside the output
(``.NAME.staging-RUNID``), the manifest last; on a local filesystem the staging directory is then
renamed onto OUTPUT in one ``rename``. On object stores, where there is no rename, the files are
moved and ``_manifest.json`` (with ``"status": "complete"``) is written last: a dataset without a
complete manifest is not a finished run. A failed run deletes its staging directory; a killed
one leaves only the hidden staging directory, never something at OUTPUT.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import shapely
from ray.data import Datasink
from ray.data.datasource.datasink import WriteResult

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
#: Columns of the result dataset, in order (geometry last), with their meaning.
RESULT_COLUMNS: dict[str, str] = {
    "tile_id": "deterministic tile id (item, bands, window, tile spec)",
    "item_id": "STAC item id",
    "collection": "STAC collection id",
    "datetime": "acquisition time (UTC)",
    "task": "task name, e.g. caption",
    "prompt": "the user text given to the model (without the conversation template)",
    "text": "the model's generated text (null when not run)",
    "model_id": "model and adapter that produced the text",
    "status": "ok | skipped | failed",
    "stage": "last stage the row went through, or the stage that failed/skipped it",
    "error": "why the row was skipped or failed (null when ok)",
    "native_crs": "the item's CRS (EPSG code or WKT2)",
    "window_col_off": "window column offset in the item grid, px",
    "window_row_off": "window row offset in the item grid, px",
    "window_width": "window width, px",
    "window_height": "window height, px",
    "res": "tile grid resolution in native CRS units per pixel",
    "transform": "tile affine (a, b, c, d, e, f) in native_crs; pixel (0, 0) is the tile's top-left",
    "nodata_fraction": "fraction of the tile's pixels missing in any band (0-1)",
    "geometry": "tile footprint, EPSG:4326",
}


def hilbert_key(x: np.ndarray, y: np.ndarray, order: int = 16) -> np.ndarray:
    """Hilbert-curve index of lon/lat points on a 2^order x 2^order grid over the globe.

    Nearby points get nearby keys, so sorting by the key clusters rows spatially.
    """
    n = 1 << order
    xi = np.clip(((np.asarray(x, dtype=np.float64) + 180.0) / 360.0 * n).astype(np.int64), 0, n - 1)
    yi = np.clip(((np.asarray(y, dtype=np.float64) + 90.0) / 180.0 * n).astype(np.int64), 0, n - 1)
    d = np.zeros_like(xi)
    s = n >> 1
    while s > 0:
        rx = ((xi & s) > 0).astype(np.int64)
        ry = ((yi & s) > 0).astype(np.int64)
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so the curve stays continuous
        flip = ry == 0
        swap_x = np.where(flip & (rx == 1), s - 1 - xi, xi)
        swap_y = np.where(flip & (rx == 1), s - 1 - yi, yi)
        xi, yi = np.where(flip, swap_y, swap_x), np.where(flip, swap_x, swap_y)
        s >>= 1
    return d


def to_result_rows(batch: pd.DataFrame, *, primary: tuple[str, str]) -> pd.DataFrame:
    """Model-stage rows -> result rows: rename, drop working columns, add the sort key.

    ``primary`` is the first (task, prompt) of the run: exactly one row per tile has it, which is
    how the sink counts tiles without collecting ids.
    """
    fp = shapely.from_wkb(batch["footprint_wkb"].to_numpy())
    cen = shapely.centroid(fp)
    out = pd.DataFrame(
        {
            "tile_id": batch["tile_id"].astype(str),
            "item_id": batch["item_id"].astype(str),
            "collection": batch["collection"].astype(str),
            "datetime": pd.to_datetime(batch["datetime"], utc=True, errors="coerce", format="ISO8601"),
            "task": batch["task"].astype(str),
            "prompt": batch["prompt"].astype(str),
            "text": batch["text"].where(batch["text"].notna(), None),
            "model_id": batch["model_id"].astype(str),
            "status": batch["status"].astype(str),
            "stage": batch["stage"].astype(str),
            "error": batch["error"].where(batch["error"].notna(), None),
            "native_crs": batch["crs"].astype(str),
            "window_col_off": batch["col_off"].astype("int64"),
            "window_row_off": batch["row_off"].astype("int64"),
            "window_width": batch["width"].astype("int64"),
            "window_height": batch["height"].astype("int64"),
            "res": batch["res"].astype("float64"),
            "transform": [list(map(float, t)) for t in batch["transform"]],
            "nodata_fraction": batch["nodata_fraction"].astype("float64"),
            "geometry": batch["footprint_wkb"],
            "_hilbert": hilbert_key(shapely.get_x(cen), shapely.get_y(cen)),
            "_primary": (batch["task"] == primary[0]) & (batch["prompt"] == primary[1]),
            "_read_seconds": batch.get("read_seconds", pd.Series(0.0, index=batch.index)).astype("float64"),
            "_infer_seconds": batch.get("infer_seconds", pd.Series(0.0, index=batch.index)).astype("float64"),
        }
    )
    return out


def write_geoparquet(df: pd.DataFrame, path: str, filesystem: Any = None) -> None:
    """Write result rows (WKB ``geometry`` column in EPSG:4326) as one GeoParquet 1.1 file."""
    df = df.copy()
    for col in ("text", "error"):  # all-null batches must still be typed as strings
        if col in df:
            df[col] = df[col].astype("string")
    geom = df["geometry"]
    if len(geom) and not isinstance(geom.iloc[0], shapely.Geometry):
        geom = gpd.GeoSeries.from_wkb(geom.to_numpy(), crs="EPSG:4326")
    gdf = gpd.GeoDataFrame(df.drop(columns=["geometry"]), geometry=gpd.GeoSeries(geom, crs="EPSG:4326").values)
    gdf = gdf.set_crs("EPSG:4326", allow_override=True)
    gdf.to_parquet(
        path,
        index=False,
        compression="zstd",
        schema_version="1.1.0",
        write_covering_bbox=True,
        row_group_size=50_000,
        filesystem=filesystem,
    )


@dataclass
class SinkSummary:
    """What the write tasks saw, merged on the driver."""

    rows: int = 0
    files: list[str] = field(default_factory=list)
    tiles_by_status: dict[str, int] = field(default_factory=dict)
    rows_by_status: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    read_seconds: float = 0.0
    infer_seconds: float = 0.0

    def merge(self, other: dict[str, Any]) -> None:
        self.rows += other["rows"]
        self.files.extend(other["files"])
        for key in ("tiles_by_status", "rows_by_status"):
            mine = getattr(self, key)
            for k, v in other[key].items():
                mine[k] = mine.get(k, 0) + v
        self.failures.extend(other["failures"])
        self.read_seconds += other["read_seconds"]
        self.infer_seconds += other["infer_seconds"]


class GeoParquetDatasink(Datasink[dict[str, Any]]):
    """Ray Data sink: each block of sorted result rows -> one GeoParquet 1.1 file in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory.rstrip("/")
        self.summary = SinkSummary()

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        fs, root = fsspec.core.url_to_fs(self.directory)
        fs.makedirs(root, exist_ok=True)
        stats: dict[str, Any] = {
            "rows": 0,
            "files": [],
            "tiles_by_status": {},
            "rows_by_status": {},
            "failures": [],
            "read_seconds": 0.0,
            "infer_seconds": 0.0,
        }
        for block in blocks:
            df = block.to_pandas() if isinstance(block, pa.Table) else pd.DataFrame(block)
            if df.empty:
                continue
            tiles = df[df["_primary"]]
            for status, count in tiles["status"].value_counts().items():
                stats["tiles_by_status"][status] = stats["tiles_by_status"].get(status, 0) + int(count)
            for status, count in df["status"].value_counts().items():
                stats["rows_by_status"][status] = stats["rows_by_status"].get(status, 0) + int(count)
            bad = df[df["status"] != "ok"]
            stats["failures"].extend(
                {"tile_id": r.tile_id, "task": r.task, "prompt": r.prompt, "status": r.status, "stage": r.stage,
                 "error": r.error}
                for r in bad.itertuples()
            )
            stats["read_seconds"] += float(tiles["_read_seconds"].sum())
            stats["infer_seconds"] += float(df["_infer_seconds"].sum())
            name = f"part-{int(df['_hilbert'].iloc[0]):010x}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
            out = df.drop(columns=[c for c in df.columns if c.startswith("_")])
            write_geoparquet(out, posixpath.join(root, name), filesystem=fs)
            stats["rows"] += len(out)
            stats["files"].append(name)
        return stats

    def on_write_complete(self, write_result: WriteResult[dict[str, Any]]) -> None:
        for ret in write_result.write_returns:
            self.summary.merge(ret)


def staging_path(output: str, run_id: str) -> str:
    """Hidden sibling of ``output`` where a run writes before it commits."""
    parent, name = posixpath.split(output.rstrip("/"))
    return posixpath.join(parent, f".{name}.staging-{run_id}")


def write_empty(directory: str) -> str:
    """An empty but valid GeoParquet file with the result schema (for runs that found nothing)."""
    cols = {c: pd.Series(dtype="string") for c in RESULT_COLUMNS if c != "geometry"}
    df = pd.DataFrame(cols)
    fs, root = fsspec.core.url_to_fs(directory)
    gdf = gpd.GeoDataFrame(df, geometry=gpd.GeoSeries([], crs="EPSG:4326"))
    name = "part-empty.parquet"
    gdf.to_parquet(posixpath.join(root, name), index=False, compression="zstd", schema_version="1.1.0",
                   write_covering_bbox=True, filesystem=fs)
    return name


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    """Write ``_manifest.json`` (sorted keys) into ``directory``."""
    fs, root = fsspec.core.url_to_fs(directory)
    with fs.open(posixpath.join(root, MANIFEST_NAME), "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def commit(staging: str, output: str, *, overwrite: bool) -> None:
    """Move a finished staging directory onto ``output`` (see the module docstring)."""
    fs, src = fsspec.core.url_to_fs(staging)
    _, dst = fsspec.core.url_to_fs(output)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if fs.exists(dst):
        if not overwrite and fs.ls(dst):
            raise FileExistsError(f"{output} appeared while the run was going; the result is left in {staging}")
        trash = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        fs.mv(dst, trash, recursive=True)
    else:
        trash = None
    if local:
        import os

        os.replace(src, dst)  # one atomic rename of the whole directory
    else:
        files = [p for p in fs.find(src) if posixpath.basename(p) != MANIFEST_NAME]
        for path in files:
            fs.mv(path, posixpath.join(dst, posixpath.relpath(path, src)))
        fs.mv(posixpath.join(src, MANIFEST_NAME), posixpath.join(dst, MANIFEST_NAME))
        fs.rm(src, recursive=True)
    if trash is not None:
        fs.rm(trash, recursive=True)


def discard(staging: str) -> None:
    """Delete a staging directory (best effort, for failed runs)."""
    try:
        fs, path = fsspec.core.url_to_fs(staging)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:  # cleanup must never hide the run's own error
        logger.warning("could not remove staging directory %s", staging, exc_info=True)
