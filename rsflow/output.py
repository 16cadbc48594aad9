"""Results -> GeoParquet 1.1 dataset + run manifest, committed atomically.

Layout of one run's output (a directory, local or on any fsspec filesystem)::

    OUTPUT/
      part-<hilbert>-<write task>-<block>.parquet  GeoParquet 1.1, zstd, bbox covering column
      objects-<n>.parquet                           merged detections (detect/refer runs)
      _manifest.json                                the run manifest (pyarrow/geopandas ignore '_' files)
      _preview.html                                 the map preview

``<hilbert>`` is the file's first sort key (10 hex digits), ``<write task>`` the index of the Ray
Data write task that wrote it, ``<block>`` the block's place among that task's (a retried task rewrites
the same names). Each file is written under a hidden temporary name and renamed into place.

Rows are ordered spatially: each row gets a Hilbert key of its footprint centroid, the dataset
is sorted on it (Ray Data), each sorted block is written as one file and the file names start
with the block's first key, so name order is spatial order and every file covers a compact area.

Atomic commit: everything is written into a hidden staging directory beside the output
(``.NAME.staging-RUNID``), the manifest last; on a local filesystem the staging directory is then
renamed onto OUTPUT in one ``rename`` (with ``--overwrite``, swapped with the old OUTPUT in one
``renameat2(RENAME_EXCHANGE)`` where Linux and the filesystem have it, the old one deleted after; elsewhere
the old OUTPUT is first moved aside). On object stores, where there is no rename, the files are
moved and ``_manifest.json`` (with ``"status": "complete"``) is written last: a dataset without a
complete manifest is not a finished run. A failed run deletes its staging directory; a killed
one leaves only the hidden staging directory, never something at OUTPUT.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import shapely
from ray.data import Datasink
from ray.data.datasource.datasink import WriteResult

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
PREVIEW_NAME = "_preview.html"
RAW_OBJECTS_DIR = "_objects_raw"

#: Columns of the result dataset, in order, with their meaning.
RESULT_COLUMNS: dict[str, str] = {
    "tile_id": "deterministic tile id (item, bands, window, tile spec)",
    "kind": "tile (one row per tile, task and prompt) or object (one row per detected object)",
    "item_id": "STAC item id",
    "collection": "STAC collection id",
    "datetime": "acquisition time (UTC)",
    "task": "caption | vqa | classify | detect | refer | region-caption",
    "prompt": "the user text given to the model (without the conversation template)",
    "prompt_key": "the input the prompt came from: question, class preset/list, category, expression, region id",
    "region_id": "region-caption: the region asked about",
    "text": "the model's raw generated text (null when not run)",
    "answer": "vqa: the normalised answer (yes/no, a number as text, else the stripped lower-cased text)",
    "answer_number": "vqa: the answer as a number when it is one",
    "label": "classify: the matched class; object rows: the category or expression located",
    "object_count": "detect/refer tile rows: number of boxes in the answer",
    "parse_error": "why the text did not parse (the row keeps the text)",
    "box_px": "object rows: [x1, y1, x2, y2, angle_deg] in the chip's pixel space, as the model gave it",
    "pixel_polygon": "object rows: the rotated rectangle in pixel space (WKT)",
    "source_tile_ids": "object rows: the tiles whose detections were merged into this object",
    "n_merged": "object rows: how many detections were merged into this object",
    "model_id": "model and adapter that produced the text",
    "status": "ok | skipped | failed",
    "stage": "last stage the row went through, or the stage that failed/skipped it",
    "error": "why the row was skipped or failed (null when ok)",
    "native_crs": "the item's CRS (EPSG code or WKT2); null, as are window_*, res and transform, on the row of an "
                  "item that could not be planned (stage plan: no grid)",
    "window_col_off": "window column offset in the tile grid (the item's grid at resolution res), px",
    "window_row_off": "window row offset in the tile grid (the item's grid at resolution res), px",
    "window_width": "window width in tile-grid px",
    "window_height": "window height in tile-grid px",
    "res": "tile grid resolution in native CRS units per pixel",
    "transform": "tile affine (a, b, c, d, e, f) in native_crs; pixel (0, 0) is the tile's top-left",
    "nodata_fraction": "fraction of the tile's pixels missing in any band (0-1)",
    "geometry": "EPSG:4326: the tile footprint (tile rows) or the object's rotated box (object rows)",
}

_S, _I, _F = pa.string(), pa.int64(), pa.float64()
#: Arrow schema of result rows between the stages (``_`` columns are working columns, not written).
RESULT_SCHEMA = pa.schema(
    [
        ("tile_id", _S), ("kind", _S), ("item_id", _S), ("collection", _S),
        ("datetime", pa.timestamp("us", tz="UTC")), ("task", _S), ("prompt", _S), ("prompt_key", _S),
        ("region_id", _S), ("text", _S), ("answer", _S), ("answer_number", _F), ("label", _S),
        ("object_count", _I), ("parse_error", _S), ("box_px", pa.list_(_F)), ("pixel_polygon", _S),
        ("source_tile_ids", pa.list_(_S)), ("n_merged", _I), ("model_id", _S), ("status", _S), ("stage", _S),
        ("error", _S), ("native_crs", _S), ("window_col_off", _I), ("window_row_off", _I), ("window_width", _I),
        ("window_height", _I), ("res", _F), ("transform", pa.list_(_F)), ("nodata_fraction", _F),
        ("geometry", pa.binary()),
        ("_hilbert", _I), ("_primary", pa.bool_()), ("_read_seconds", _F), ("_infer_seconds", _F),
    ]
)
WRITTEN_SCHEMA = pa.schema([f for f in RESULT_SCHEMA if not f.name.startswith("_")])


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


NULL_GEOMETRY_KEY = 1 << 32
"""Sort key of a row without a geometry (an item with neither geometry nor bbox): past every point of
the curve, so such rows sort last instead of at longitude 0, latitude 0."""


def geometry_keys(wkb: Any) -> np.ndarray:
    """:func:`hilbert_key` of each WKB geometry's centroid (``None`` or empty: :data:`NULL_GEOMETRY_KEY`).

    A geometry split at the antimeridian (a MultiPolygon of its two sides) is keyed by its centroid
    across the line (:func:`rsflow.georef.centroid_lonlat`), beside its neighbours near +-180 degrees;
    the plain centroid of its two sides lies near longitude 0.
    """
    from rsflow.georef import centroid_lonlat

    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object))
    missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    cen = shapely.centroid(np.where(missing, None, geoms))  # get_x raises on an empty point, not on None
    x, y = shapely.get_x(cen), shapely.get_y(cen)
    bounds = shapely.bounds(geoms)
    for i in np.flatnonzero(~missing & (bounds[:, 2] - bounds[:, 0] > 180.0)):
        x[i], y[i] = centroid_lonlat(geoms[i])
    keys = hilbert_key(np.where(missing, 0.0, x), np.where(missing, 0.0, y))
    return np.where(missing, NULL_GEOMETRY_KEY, keys)


def write_geoparquet(table: pa.Table, path: str, filesystem: Any = None) -> None:
    """Write result rows (``WRITTEN_SCHEMA``: WKB ``geometry`` in EPSG:4326) as one GeoParquet 1.1 file
    (:func:`geoparquet_table`); the Arrow types of the other columns are kept exactly, so every file of a
    dataset has the same schema even where a column is all null in one file."""
    table = table.select(WRITTEN_SCHEMA.names).cast(WRITTEN_SCHEMA)
    df = table.drop(["geometry"]).to_pandas(types_mapper=pd.ArrowDtype)
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    arrow = geoparquet_table(gpd.GeoDataFrame(df, geometry=gpd.GeoSeries(geoms, crs="EPSG:4326").values,
                                              crs="EPSG:4326"))
    pq.write_table(arrow, path, compression="zstd", row_group_size=50_000, filesystem=filesystem)


def geoparquet_table(gdf: gpd.GeoDataFrame) -> pa.Table:
    """``gdf`` as the Arrow table of a GeoParquet 1.1 file: geopandas builds the ``geo`` metadata (PROJJSON
    CRS, geometry types, the bbox covering column), with three changes.

    - Exterior rings counter-clockwise (holes clockwise), declared as ``orientation``, as RFC 7946 asks: a
      footprint reprojected from a grid whose axes are flipped, or an object polygon from pixel rows that
      run down, can come out clockwise.
    - A row without a geometry (missing or empty) has a null bbox: it "MUST NOT contain a bounding box
      value" (GeoParquet 1.1), and geopandas writes a struct of four nulls, which ``bbox IS NULL`` misses.
    - No pandas metadata: geopandas' names ArrowDtype list types that pandas cannot read back.
    """
    from geopandas.io.arrow import _geopandas_to_arrow  # the table geopandas' to_parquet writes

    geoms = shapely.orient_polygons(np.asarray(gdf.geometry.array, dtype=object), exterior_cw=False)
    gdf = gdf.set_geometry(gpd.GeoSeries(geoms, crs=gdf.crs, index=gdf.index))
    arrow = _geopandas_to_arrow(gdf, index=False, schema_version="1.1.0", write_covering_bbox=True)
    meta = {k: v for k, v in (arrow.schema.metadata or {}).items() if k != b"pandas"}
    geo = json.loads(meta[b"geo"])
    geo["columns"][geo["primary_column"]]["orientation"] = "counterclockwise"
    meta[b"geo"] = json.dumps(geo).encode()
    no_geometry = pa.array(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    if no_geometry.true_count:
        boxes = arrow.column("bbox").combine_chunks()
        fields = [boxes.field(i) for i in range(boxes.type.num_fields)]
        boxes = pa.StructArray.from_arrays(fields, fields=list(boxes.type), mask=no_geometry)
        arrow = arrow.set_column(arrow.schema.get_field_index("bbox"), "bbox", boxes)
    return arrow.replace_schema_metadata(meta)


@dataclass
class SinkSummary:
    """What the write tasks saw, merged on the driver."""

    rows: int = 0
    objects: int = 0
    files: list[str] = field(default_factory=list)
    tiles_by_status: dict[str, int] = field(default_factory=dict)
    rows_by_status: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    read_seconds: float = 0.0
    infer_seconds: float = 0.0

    def merge(self, other: dict[str, Any]) -> None:
        self.rows += other["rows"]
        self.objects += other["objects"]
        self.files.extend(other["files"])
        for key in ("tiles_by_status", "rows_by_status"):
            mine = getattr(self, key)
            for k, v in other[key].items():
                mine[k] = mine.get(k, 0) + v
        self.failures.extend(other["failures"])
        self.read_seconds += other["read_seconds"]
        self.infer_seconds += other["infer_seconds"]


ROWS_PER_FILE = 100_000
"""Rows per GeoParquet file written by the Ray Data sort of a large output (about 50-100 MB)."""
DRIVER_ROWS_PER_FILE = 25_000
"""Most rows per GeoParquet file when the driver writes the output (bounds its memory; see
``GeoParquetDatasink.write_sorted_parts``)."""


class GeoParquetDatasink(Datasink[dict[str, Any]]):
    """Ray Data sink: each block of sorted result rows -> one GeoParquet 1.1 file in ``directory``."""

    def __init__(self, directory: str, *, split_objects: bool = False) -> None:
        self.directory = directory.rstrip("/")
        self.split_objects = split_objects
        """Write object rows into ``_objects_raw/`` for the merge pass instead of the dataset."""
        self.summary = SinkSummary()

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        fs, root = fsspec.core.url_to_fs(self.directory)
        fs.makedirs(root, exist_ok=True)
        stats: dict[str, Any] = {
            "rows": 0,
            "objects": 0,
            "files": [],
            "tiles_by_status": {},
            "rows_by_status": {},
            "failures": [],
            "read_seconds": 0.0,
            "infer_seconds": 0.0,
        }
        n_blocks = 0
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
            if table.num_rows == 0:
                continue
            cols = table.select(["tile_id", "item_id", "kind", "task", "prompt", "status", "stage", "error", "_primary",
                                 "_read_seconds", "_infer_seconds"]).to_pandas()
            tiles = cols[cols["_primary"]]
            for status, count in tiles["status"].value_counts().items():
                stats["tiles_by_status"][status] = stats["tiles_by_status"].get(status, 0) + int(count)
            rows = cols[cols["kind"] == "tile"]
            for status, count in rows["status"].value_counts().items():
                stats["rows_by_status"][status] = stats["rows_by_status"].get(status, 0) + int(count)
            bad = rows[rows["status"] != "ok"]
            stats["failures"].extend(
                {"tile_id": r.tile_id, "item_id": r.item_id, "task": r.task, "prompt": r.prompt, "status": r.status,
                 "stage": r.stage, "error": r.error, "primary": bool(primary)}
                for r, primary in zip(bad.itertuples(), bad["_primary"], strict=True)
            )
            stats["read_seconds"] += float(tiles["_read_seconds"].sum())
            stats["infer_seconds"] += float(cols["_infer_seconds"].sum())
            first_key = int(table.column("_hilbert")[0].as_py())
            # Named after the task and the block's place in it, not at random: Ray Data retries a write task
            # whose worker died, and the retry then replaces the files the first attempt finished instead
            # of adding the same rows again under other names.
            name = f"part-{first_key:010x}-{ctx.task_idx:05d}-{n_blocks:04d}.parquet"
            n_blocks += 1
            is_object = pa.compute.equal(table.column("kind"), "object")
            n_objects = int(pa.compute.sum(is_object).as_py() or 0)
            stats["objects"] += n_objects
            if self.split_objects and n_objects:
                raw = posixpath.join(root, RAW_OBJECTS_DIR)
                fs.makedirs(raw, exist_ok=True)
                _write_geoparquet_part(table.filter(is_object), fs, raw, name)
                table = table.filter(pa.compute.invert(is_object))
            if table.num_rows:
                _write_geoparquet_part(table, fs, root, name)
                stats["rows"] += table.num_rows
                stats["files"].append(name)
        return stats

    def on_write_complete(self, write_result: WriteResult[dict[str, Any]]) -> None:
        for ret in write_result.write_returns:
            self.summary.merge(ret)

    def write_sorted_parts(self, parts_dir: str, *, rows_per_file: int = DRIVER_ROWS_PER_FILE) -> None:
        """Write every row of the staging parts in ``_hilbert`` order, in this process.

        For outputs small enough to sort in memory (see :func:`count_part_rows`): one Arrow table,
        one sort, files of at most ``rows_per_file`` rows, evenly split — no shuffle, and no 200 tiny
        files for a small run. Memory: the Arrow table (about 1 KB a row) plus one file's rows as a
        GeoDataFrame while it is written (several times its Arrow size), hence the small files.
        """
        fs, root = fsspec.core.url_to_fs(parts_dir)
        paths = sorted(p for p in fs.find(root) if posixpath.basename(p).startswith("raw-"))
        tables = [pq.read_table(p, filesystem=fs).cast(RESULT_SCHEMA) for p in paths]
        table = pa.concat_tables(tables).sort_by("_hilbert") if tables else RESULT_SCHEMA.empty_table()
        del tables
        n_files = max(1, math.ceil(table.num_rows / rows_per_file))
        size = math.ceil(table.num_rows / n_files) if table.num_rows else 0
        for i in range(n_files if size else 0):
            self.summary.merge(self.write([table.slice(i * size, size)], _DriverTask(i)))


@dataclass(frozen=True)
class _DriverTask:
    """The part of Ray Data's ``TaskContext`` that ``GeoParquetDatasink.write`` uses."""

    task_idx: int



def count_part_rows(parts_dir: str) -> int:
    """Rows in the staging parts, from their Parquet footers (nothing else is read)."""
    fs, root = fsspec.core.url_to_fs(parts_dir)
    paths = [p for p in fs.find(root) if posixpath.basename(p).startswith("raw-")] if fs.exists(root) else []
    return sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths)


def merge_object_files(
    directory: str, iou_threshold: float | None, metric_crs: dict[str, str] | None = None
) -> tuple[list[str], int]:
    """The merge pass: ``_objects_raw/`` -> merged object rows written into ``directory``.

    Detections of the same item, task and label whose rotated polygons overlap at ``iou_threshold``
    or more (IoU in metres: in ``metric_crs[item_id]`` where given, else in the UTM zone of each group's
    centroid, which is what the region job uses) become one object: the row of the largest member, with
    ``source_tile_ids`` listing every tile that saw it and ``n_merged`` their count. Runs on the
    driver over the object rows only (tile rows never pass through it).

    Returns:
        ``(file names written, number of objects)``.
    """
    from rsflow.merge import Detection, merge_detections

    fs, root = fsspec.core.url_to_fs(directory)
    raw = posixpath.join(root, RAW_OBJECTS_DIR)
    if not fs.exists(raw):
        return [], 0
    paths = sorted(p for p in fs.find(raw) if p.endswith(".parquet"))
    table = pa.concat_tables(
        [pq.read_table(p, filesystem=fs, columns=WRITTEN_SCHEMA.names).cast(WRITTEN_SCHEMA) for p in paths]
    )
    polys = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    rows = table.select(["tile_id", "item_id", "label", "task"]).to_pylist()
    # A row without a map geometry (one an earlier version wrote for a box in padding past a pole, carried
    # by --resume) cannot be merged: it stays an object of its own rather than failing the whole pass.
    placed = [i for i, poly in enumerate(polys) if poly is not None and not poly.is_empty]
    detections = [
        Detection(tile_id=rows[i]["tile_id"], item_id=rows[i]["item_id"], label=rows[i]["label"] or "",
                  polygon_4326=polys[i], task=rows[i]["task"])
        for i in placed
    ]
    merged = [
        replace(m, best_index=placed[m.best_index], member_indices=[placed[k] for k in m.member_indices])
        for m in merge_detections(detections, iou_threshold, metric_crs=metric_crs)
    ]
    unplaced = sorted(set(range(len(rows))) - set(placed))
    # A row carried over by --resume from a committed run is already a merged object: it stands for its
    # own source tiles and detections, which the merge adds up with the new detections it joins.
    carried = table.select(["source_tile_ids", "n_merged"]).to_pylist()
    keep, tile_ids, counts = [], [], []
    for m in merged:
        keep.append(m.best_index)  # the opener: not the first of equal polygons in arrival order
        tiles, n = set(), 0
        for i in m.member_indices:
            sources = carried[i]["source_tile_ids"]
            tiles.update(sources or [rows[i]["tile_id"]])
            n += int(carried[i]["n_merged"] or 1) if sources else 1
        tile_ids.append(sorted(tiles))
        counts.append(n)
    for i in unplaced:
        keep.append(i)
        tile_ids.append(carried[i]["source_tile_ids"] or [rows[i]["tile_id"]])
        counts.append(int(carried[i]["n_merged"] or 1))
    out = table.take(pa.array(keep, type=pa.int64()))
    out = out.set_column(out.schema.get_field_index("source_tile_ids"), "source_tile_ids",
                         pa.array(tile_ids, type=pa.list_(pa.string())))
    out = out.set_column(out.schema.get_field_index("n_merged"), "n_merged", pa.array(counts, type=pa.int64()))
    order = np.argsort(geometry_keys(out.column("geometry").to_numpy(zero_copy_only=False)), kind="stable")
    out = out.take(pa.array(order, type=pa.int64()))
    names = []
    for i, start in enumerate(range(0, out.num_rows, 50_000)):
        name = f"objects-{i:05d}.parquet"
        write_geoparquet(out.slice(start, 50_000), posixpath.join(root, name), filesystem=fs)
        names.append(name)
    fs.rm(raw, recursive=True)
    logger.info("merged %d detections into %d objects (IoU >= %s)", table.num_rows, out.num_rows, iou_threshold)
    return names, out.num_rows


def staging_path(output: str, run_id: str) -> str:
    """Hidden sibling of ``output`` where a run writes before it commits.

    Raises:
        ValueError: ``output`` has no parent folder to stage in (``s3://bucket``; the request refuses it).
    """
    protocol, path = fsspec.core.split_protocol(output.rstrip("/"))
    parent, name = posixpath.split(path)
    if not name or (protocol and not parent):
        raise ValueError(f"{output} has no parent folder to stage beside")
    staged = posixpath.join(parent, f".{name}.staging-{run_id}")
    return f"{protocol}://{staged}" if protocol else staged


def write_empty(directory: str) -> str:
    """An empty but valid GeoParquet file with the result schema (for runs that found nothing)."""
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    name = "part-empty.parquet"
    write_geoparquet(WRITTEN_SCHEMA.empty_table(), posixpath.join(root, name), filesystem=fs)
    return name


def dataset_geo(directory: str, files: list[str]) -> dict[str, Any]:
    """The extent and geometry types of the whole dataset, per table (``objects-*`` files and the tile
    rows' ``part-*`` files), from each file's own GeoParquet ``geo`` metadata (footers only).

    Each file's ``geo`` is exact for that file, but a reader of the folder (``pyarrow.dataset``, which
    geopandas and GDAL build on) shows the first file's, and ``objects-*`` sort first: its bbox left out
    the tiles at the dataset's edges. A geometry split at the antimeridian has a bbox from -180 to 180
    (GeoParquet's covering bbox cannot wrap), so bbox reads near +-180 need an exact ``intersects`` after.
    """
    fs, root = fsspec.core.url_to_fs(directory)
    tables: dict[str, dict[str, Any]] = {}
    for name in sorted(files):
        geo = json.loads((pq.read_metadata(posixpath.join(root, name), filesystem=fs).metadata or {})
                         .get(b"geo", b"{}"))
        column = geo.get("columns", {}).get(geo.get("primary_column", "geometry"), {})
        entry = tables.setdefault("objects" if name.startswith("objects-") else "tiles",
                                  {"files": 0, "bbox": None, "geometry_types": []})
        entry["files"] += 1
        entry["geometry_types"] = sorted({*entry["geometry_types"], *column.get("geometry_types", [])})
        bbox = column.get("bbox")
        if bbox and all(math.isfinite(v) for v in bbox):
            old = entry["bbox"]
            entry["bbox"] = bbox if old is None else [min(old[0], bbox[0]), min(old[1], bbox[1]),
                                                      max(old[2], bbox[2]), max(old[3], bbox[3])]
    return tables


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
    fs.invalidate_cache()  # listings this process cached before the run's tasks wrote into staging
    if fs.exists(dst):
        if not overwrite and fs.ls(dst):
            raise FileExistsError(f"{output} appeared while the run was going; the result is left in {staging}")
        if local and _exchange(src, dst):  # the new dataset at OUTPUT, the old one at the staging path
            fs.rm(src, recursive=True)
            return
        trash = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        # On an object store the old manifest goes first: a move there is a copy and a delete per object, and
        # ``_manifest.json`` sorts before the data files, so moving the folder whole deleted it last, and
        # readers saw a complete manifest over a dataset losing its files.
        old_manifest = posixpath.join(dst, MANIFEST_NAME)
        if not local and fs.exists(old_manifest):
            fs.mv(old_manifest, posixpath.join(trash, MANIFEST_NAME))
        if fs.exists(dst) and (local or fs.find(dst)):
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
        if fs.exists(src):  # an object store has no empty directories: moving the files may have removed it
            fs.rm(src, recursive=True)
    if trash is not None:
        fs.rm(trash, recursive=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two local paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so that
    ``--overwrite`` never leaves a moment with nothing at OUTPUT; False where the platform or the
    filesystem cannot (then OUTPUT is moved aside to ``OUTPUT.old-*`` and the new one renamed in).

    Raises:
        OSError: the swap failed for another reason (e.g. permissions).
    """
    import ctypes
    import errno
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc before 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def discard(staging: str) -> None:
    """Delete a staging directory (best effort, for failed runs)."""
    try:
        fs, path = fsspec.core.url_to_fs(staging)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:  # cleanup must never hide the run's own error
        logger.warning("could not remove staging directory %s", staging, exc_info=True)


# ---------------------------------------------------------------------------------------------- resume

RESUME_NAME = "_resume.json"
"""Written into the staging directory when a run starts: what ``--resume`` needs to continue it."""


@dataclass
class ResumeSource:
    """Where ``--resume`` continues from: an interrupted run's staging directory, or a committed run
    that finished with failed tiles."""

    directory: str
    """The staging directory, or the committed output."""
    committed: bool
    request: dict[str, Any]
    """The run's request JSON (from ``_resume.json`` or the committed manifest)."""
    failed_tiles: int = 0
    """Committed runs: failed tiles and items recorded in the manifest."""
    replaces_committed: bool = False
    """Interrupted runs: the run was to replace a committed output (``--overwrite``, or a ``--resume`` of a
    committed run), so its continuation commits over that output too."""


def _stagings(output: str) -> tuple[Any, str, list[str]]:
    """``(filesystem, output's path, its staging directories)``: the hidden siblings :func:`staging_path`
    names, oldest run first."""
    fs, root = fsspec.core.url_to_fs(output.rstrip("/"))
    parent, name = posixpath.split(root)
    if not fs.exists(parent):
        return fs, root, []
    paths = [p for p in fs.ls(parent, detail=False) if posixpath.basename(p.rstrip("/")).startswith(f".{name}.staging-")]
    return fs, root, sorted(paths, key=run_id_of)


def find_resumable(output: str) -> ResumeSource | None:
    """The most recent interrupted run of ``output`` (a staging directory holding ``_resume.json``) unless
    the committed run is newer, else the committed run itself when its manifest is complete; None when
    there is neither."""
    fs, root, stagings = _stagings(output)
    candidates = [p for p in stagings if fs.exists(posixpath.join(p, RESUME_NAME))
                  and not fs.exists(posixpath.join(p, MANIFEST_NAME))]  # a complete result is not continued
    manifest_path = posixpath.join(root, MANIFEST_NAME)
    committed = None
    if fs.exists(manifest_path):
        with fs.open(manifest_path, "r") as fh:
            m = json.load(fh)
        if m.get("status") == "complete":
            committed = m
    # Staging names end in the run id, which starts with the UTC time: an interrupted run older than the
    # committed one was superseded by it (e.g. an --overwrite run that finished afterwards).
    newest = candidates[-1] if candidates else None
    if newest is not None and (committed is None or run_id_of(newest) > str(committed.get("run_id", ""))):
        with fs.open(posixpath.join(newest, RESUME_NAME), "r") as fh:
            info = json.load(fh)
        return ResumeSource(directory=_unstrip(output, newest), committed=False, request=info["request"],
                            replaces_committed=bool(info.get("replaces_committed", False)))
    if committed is not None:
        counts = committed.get("counts", {})
        return ResumeSource(directory=output.rstrip("/"), committed=True, request=committed.get("request", {}),
                            failed_tiles=int(counts.get("tiles_failed", 0)) + int(counts.get("items_failed", 0)))
    return None


def discard_superseded(output: str, run_id: str) -> list[str]:
    """After the ``--resume`` run ``run_id`` committed ``output``: delete the staging directories older than it
    without a manifest: interrupted runs, which ``--resume`` passed over for the one it continued (the
    newest) and can never continue now, and resumes killed while carrying rows over (no ``_resume.json``:
    never continued), whether the run resumed was interrupted or committed. A complete result left in staging
    (it has its manifest) and newer directories are kept. Returns the directories deleted."""
    fs, _, stagings = _stagings(output)
    gone = []
    for path in stagings:
        if run_id_of(path) < run_id and not fs.exists(posixpath.join(path, MANIFEST_NAME)):
            discard(_unstrip(output, path))
            gone.append(_unstrip(output, path))
    return gone


def run_id_of(staging: str) -> str:
    """The run id a staging directory is named after (:func:`staging_path`)."""
    return posixpath.basename(staging.rstrip("/")).rsplit(".staging-", 1)[-1]


def _unstrip(output: str, path: str) -> str:
    """``path`` as returned by fsspec (no protocol) with ``output``'s protocol put back."""
    if "://" in output and "://" not in path:
        return f"{output.split('://', 1)[0]}://{path}"
    return path


PARTS_DIR = "_parts"
"""Inside a staging directory: result rows as the stages finish them (all columns, unsorted). A run that
is killed keeps what it finished here; the final pass sorts them into the dataset."""


class RawPartsSink(Datasink[int]):
    """Ray Data sink: the result rows of each write task (one block or several) -> one Parquet file in
    ``directory`` as soon as the task is done (``RESULT_SCHEMA``, working columns included), written to
    a hidden name and renamed, so a file either is complete or is not there: a task's rows, every prompt
    of a tile among them, are kept or lost together."""

    def __init__(self, directory: str) -> None:
        self.directory = directory.rstrip("/")
        self.rows = 0
        """Rows written by this run (not counting rows carried over by ``--resume``)."""

    def on_write_complete(self, write_result: WriteResult[int]) -> None:
        self.rows += int(sum(int(n) for n in write_result.write_returns))

    def write(self, blocks: Any, ctx: Any) -> int:
        fs, root = fsspec.core.url_to_fs(self.directory)
        fs.makedirs(root, exist_ok=True)
        tables = []
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
            if table.num_rows:
                tables.append(table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA))
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        # one file per write task, named after it: a task Ray retries after its worker died replaces the
        # file the first attempt may have finished instead of adding the same rows under another name
        _write_part(table, fs, root, f"raw-{ctx.task_idx:05d}.parquet")
        return table.num_rows


def _write_geoparquet_part(table: pa.Table, fs: Any, folder: str, name: str) -> None:
    """:func:`write_geoparquet` into ``folder/name`` under a hidden temporary name, renamed into place: a
    write task killed half way (out of memory, a lost node) leaves no cut-short file in the dataset."""
    tmp = posixpath.join(folder, f".{name}.tmp")
    write_geoparquet(table, tmp, filesystem=fs)
    fs.mv(tmp, posixpath.join(folder, name))


def remove_unfinished(directory: str) -> list[str]:
    """Delete the hidden temporary files that killed writers left in ``directory`` (and ``_objects_raw/``)
    before it is committed; returns their names."""
    fs, root = fsspec.core.url_to_fs(directory)
    gone = []
    for folder in (root, posixpath.join(root, RAW_OBJECTS_DIR)):
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if name.startswith(".") and name.endswith(".tmp"):
                fs.rm(path)
                gone.append(name)
    return gone


def _write_part(table: pa.Table, fs: Any, folder: str, name: str) -> None:
    """``folder/name`` written under a hidden temporary name and renamed into place: a process killed
    while writing leaves no cut-short part that ``--resume`` would read (it reads ``raw-*`` only)."""
    tmp = posixpath.join(folder, f".{name}.tmp")
    pq.write_table(table, tmp, compression="zstd", filesystem=fs)
    fs.mv(tmp, posixpath.join(folder, name))


def carry_over(source: ResumeSource, staging: str) -> set[str]:
    """Copy the rows an earlier attempt finished into ``staging``'s parts; return the tiles done.

    From an interrupted run, its ``_parts/`` files (a file the kill cut short is never there: parts are
    renamed into place), one carried part per part: each holds whole tiles, so a copy killed half way
    leaves whole tiles carried or not. From a committed run, its dataset and merged objects (working
    columns rebuilt over all of it) as ONE part: the sort spread a tile's rows over several files, and a
    copy killed between them would have counted the tile done with some of its prompts' rows lost.

    Rows of tiles that failed are left out: those tiles run again. A merged object of a committed run
    that a failed tile contributed to is left out too, with every row of the other tiles it was merged
    from (transitively): they run again, and the merge pass puts the object together anew from all of
    them (kept, it would have lost the failed tile's detection, or counted another on top of its own).
    Tiles with a kept row (ok or skipped) are done.
    """
    fs, src = fsspec.core.url_to_fs(source.directory)
    _, dst = fsspec.core.url_to_fs(staging)
    parts = posixpath.join(dst, PARTS_DIR)
    fs.makedirs(parts, exist_ok=True)
    tables = []
    if source.committed:
        committed = [pq.read_table(path, filesystem=fs, columns=WRITTEN_SCHEMA.names).cast(WRITTEN_SCHEMA)
                     for path in sorted(p for p in fs.find(src) if posixpath.basename(p).endswith(".parquet"))]
        if committed:
            tables.append(_with_working_columns(pa.concat_tables(committed)))
    else:
        raw = posixpath.join(src, PARTS_DIR)
        for path in sorted(p for p in (fs.find(raw) if fs.exists(raw) else [])
                           if posixpath.basename(p).startswith("raw-") and p.endswith(".parquet")):
            tables.append(pq.read_table(path, filesystem=fs).cast(RESULT_SCHEMA))
    failed = set()
    for table in tables:
        is_failed_tile = pa.compute.and_(pa.compute.equal(table.column("kind"), "tile"),
                                         pa.compute.equal(table.column("status"), "failed"))
        failed.update(table.filter(is_failed_tile).column("tile_id").to_pylist())
    rerun = _with_merge_partners(tables, failed) if source.committed else failed
    done: set[str] = set()
    for i, table in enumerate(tables):
        keep = pa.array([not _runs_again(t, sources, rerun) for t, sources in zip(
            table.column("tile_id").to_pylist(), table.column("source_tile_ids").to_pylist(), strict=True)],
            type=pa.bool_())
        table = table.filter(keep)
        if not table.num_rows:
            continue
        _write_part(table, fs, parts, f"raw-carried-{i:05d}.parquet")
        done.update(table.filter(pa.compute.equal(table.column("kind"), "tile")).column("tile_id").to_pylist())
    logger.info("resume: %d tiles carried over from %s, %d failed ones run again (%d with the objects they share)",
                len(done), source.directory, len(failed), len(rerun))
    return done


def _runs_again(tile_id: str, sources: list[str] | None, rerun: set[str]) -> bool:
    return tile_id in rerun or bool(sources and not rerun.isdisjoint(sources))


def _with_merge_partners(tables: list[pa.Table], failed: set[str]) -> set[str]:
    """``failed`` plus every tile a merged object joins to one of them, to a fixed point (an object that
    runs again takes all its source tiles with it, and those may share other objects)."""
    groups = [set(sources) for table in tables
              for sources in table.filter(pa.compute.equal(table.column("kind"), "object"))
              .column("source_tile_ids").to_pylist() if sources]
    rerun = set(failed)
    grew = True
    while grew:
        grew = False
        for group in groups:
            if not group <= rerun and not rerun.isdisjoint(group):
                rerun |= group
                grew = True
    return rerun


def _with_working_columns(table: pa.Table) -> pa.Table:
    """Committed rows -> ``RESULT_SCHEMA``: the Hilbert key from the geometry, the first row of each tile
    as its primary row, no timings."""
    keys = geometry_keys(table.column("geometry").to_numpy(zero_copy_only=False))
    tiles = table.column("tile_id").to_pylist()
    kinds = table.column("kind").to_pylist()
    seen: set[str] = set()
    primary = []
    for tile, kind in zip(tiles, kinds, strict=True):
        primary.append(kind == "tile" and tile not in seen)
        if kind == "tile":
            seen.add(tile)
    n = table.num_rows
    return (
        table.append_column("_hilbert", pa.array(keys, type=pa.int64()))
        .append_column("_primary", pa.array(primary, type=pa.bool_()))
        .append_column("_read_seconds", pa.array(np.zeros(n), type=pa.float64()))
        .append_column("_infer_seconds", pa.array(np.zeros(n), type=pa.float64()))
        .select(RESULT_SCHEMA.names)
        .cast(RESULT_SCHEMA)
    )
