"""Tile -> chip: windowed reads of the three RGB sources onto the tile's grid, stretched to uint8.

Every band is read through a ``WarpedVRT`` whose grid is the tile's own (CRS, affine, size), so
GDAL fetches only the source blocks under the window, bands of coarser resolution are resampled
onto the tile grid (bilinear; ``average`` when a target GSD is coarser than the source; nearest
when the grids agree, which makes the read exact), and pixels past the scene edge come back as
nodata: edge tiles are padded, not cropped.

Stretch: physical value ``v = DN * scale + offset`` (scale/offset from the item's raster:bands,
else the source profile); ``uint8 = clip((v - lo) / (hi - lo), 0, 1) * 255`` rounded, with
``(lo, hi)`` the profile's stretch. Nodata pixels (in any band) are black (0, 0, 0) and count
towards the tile's nodata fraction; a tile above ``max_nodata`` is marked ``skipped`` with the
reason, and a tile whose read raises is marked ``failed`` with the error. Neither stops the batch.

Object stores: hrefs on ``s3://``, ``gs://`` and ``az://`` are opened by GDAL's ``/vsis3/``,
``/vsigs/`` and ``/vsiaz/`` (rasterio maps the scheme), with the same windowed reads: GDAL fetches
the header and then only the byte ranges of the blocks under the window. Credentials come from the
environment or the cloud's default chain (instance profile, IRSA, workload identity); rsflow never
reads, passes or logs them. A custom S3 endpoint (MinIO, Ceph, a test server) named the AWS SDKs'
way (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``) is handed on to GDAL, which only knows
``AWS_S3_ENDPOINT`` (see :func:`s3_endpoint_options`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Interleaving, Resampling
from rasterio.env import get_gdal_config
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from rsflow.hrefs import redact, redact_logs
from rsflow.sources import sign_href

logger = logging.getLogger(__name__)

# GDAL quotes the URL it failed on, signature and all ("CPLE_AppDefined in HTTP response code on
# https://...?sig=...: 403"), in messages rasterio logs at INFO: redact them in every process that reads.
redact_logs("rasterio")

#: GDAL settings for reading cloud-optimised GeoTIFFs over HTTP(S)/S3: do not list the remote
#: "directory" on open (one request per file instead of many), retry transient HTTP errors, merge
#: neighbouring range requests and cache blocks. Set once per read worker.
#:
#: GDAL_CACHEMAX (64 MB) is the most a read worker's block cache may hold: each planning unit is
#: read with the cache set to what its reads need (:func:`unit_block_cache_bytes`, at least
#: :data:`_MIN_BLOCK_CACHE_BYTES`), never more than this. Units are rectangles of tiles
#: (:func:`rsflow.plan.plan_units`, at most about 3,800 px wide, as tall or taller) read row by row,
#: and a row of tiles straddles two block rows, the next row of tiles reading one of them again: two
#: rows of 512 px uint16 blocks of three bands across such a unit are about 28 MB, of 1,024 px blocks
#: (Sentinel-2's COGs) about 56 MB. A cache of fixed size filled up to that size whatever the unit
#: needed (a 2,000 px scene's unit needs 13 MB).
#:
#: VSI_CACHE keeps recently read byte ranges of each open file; its default of 25 MB per file handle,
#: for three band files of every dataset a worker keeps open, took 75 MB or more of each read worker on a
#: 20,000 px scene. 5 MB per handle (the size rio-tiler suggests for COGs) still covers a COG's header
#: and neighbouring range requests.
GDAL_REMOTE_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": "5000000",
    "GDAL_CACHEMAX": "64",
}


def _resampling(src_res: float, dst_res: float) -> Resampling:
    if math.isclose(src_res, dst_res, rel_tol=1e-6):
        return Resampling.nearest
    return Resampling.bilinear if src_res > dst_res else Resampling.average


# ------------------------------------------------------------------------------------ open datasets

_OPEN_MAX = 6
"""Datasets kept open per read worker: the three band files of the item being read and of one more (a
worker given units of two items in turn). Each open file holds up to VSI_CACHE_SIZE of cached bytes
and its header: with 48, a worker that had read 16 items kept 240 MB of them."""
_REMOTE_OPEN_SECONDS = 300.0
"""A remote dataset is reopened after this long (its signature or contents may have changed)."""
_open_cache: OrderedDict[tuple[str, int | None], tuple[Any, Any, float]] = OrderedDict()
_checked: set[tuple[str, int | None]] | None = None
"""Open datasets already checked for freshness in the block :func:`read_batch` is reading: a block
checks each file once, not once per tile and band (a ``stat`` each); None outside a block."""


def _local_stamp(url: str) -> Any:
    """What identifies a local file's contents (so a replaced file is reopened); None for URLs."""
    if "://" in url and not url.startswith("file://"):
        return None
    try:
        st = os.stat(url.removeprefix("file://"))
    except OSError:
        return "missing"
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _open_dataset(url: str, overview_level: int | None = None) -> Any:
    """``rasterio.open(url)``, kept open for the next tiles of this worker.

    Opening a COG costs a header read (and for remote files an HTTP round trip); a worker reads many
    tiles of the same files in a row, so the datasets stay open (at most :data:`_OPEN_MAX`, least
    recently used closed first). A local file whose inode, size or mtime changed, and a remote one
    opened more than :data:`_REMOTE_OPEN_SECONDS` ago, are reopened (checked once per block of tiles).
    """
    key = (url, overview_level)
    if _checked is not None and key in _checked and key in _open_cache and not _open_cache[key][0].closed:
        _open_cache.move_to_end(key)
        return _open_cache[key][0]
    if _checked is not None:
        _checked.add(key)
    stamp = _local_stamp(url)
    now = time.monotonic()
    cached = _open_cache.get(key)
    if cached is not None:
        ds, cached_stamp, opened = cached
        fresh = cached_stamp == stamp if stamp is not None else now - opened < _REMOTE_OPEN_SECONDS
        if fresh and not ds.closed:
            _open_cache.move_to_end(key)
            return ds
        del _open_cache[key]
        ds.close()
    kwargs: dict[str, Any] = {} if overview_level is None else {"overview_level": overview_level}
    ds = rasterio.open(url, **kwargs)
    _open_cache[key] = (ds, stamp, now)
    while len(_open_cache) > _OPEN_MAX:
        _, (old, _, _) = _open_cache.popitem(last=False)
        old.close()
    return ds


def close_datasets() -> None:
    """Close every dataset this worker keeps open."""
    while _open_cache:
        _, (ds, _, _) = _open_cache.popitem()
        ds.close()


def _overview_level(src: Any, band: int, dst_res: float) -> int | None:
    """The coarsest overview of ``band`` no coarser than ``dst_res`` (None: read full resolution).

    A tile grid coarser than the source (``--gsd``) is averaged from the overview closest to it
    instead of from every native pixel: GDAL fetches and decodes a fraction of the bytes.
    """
    src_res = abs(src.transform.a)
    level = None
    for i, factor in enumerate(src.overviews(band)):
        if factor * src_res <= dst_res * (1 + 1e-6):
            level = i
    return level


def _aligned_window(src: Any, tile: dict[str, Any], transform: Affine, res: float) -> Window | None:
    """The source window that IS the tile when the tile grid is the source's own pixel grid (same
    CRS, same pixel size, whole-pixel offset); None when a resampling warp is needed."""
    st = src.transform
    if st.b != 0 or st.d != 0 or not math.isclose(st.a, res, rel_tol=1e-9) or not math.isclose(-st.e, res, rel_tol=1e-9):
        return None
    col = (transform.c - st.c) / st.a
    row = (transform.f - st.f) / st.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    if not _same_crs(src, str(tile["crs"])):
        return None
    return Window(round(col), round(row), int(tile["width"]), int(tile["height"]))


@functools.lru_cache(maxsize=256)
def _crs_equal(src_wkt: str, tile_crs: str) -> bool:
    return bool(CRS.from_user_input(src_wkt) == CRS.from_user_input(tile_crs))


_crs_matches: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()
"""Per open dataset, whether its CRS is a tile CRS (asked once per band of every tile; the answer
cannot change while the dataset is open)."""


def _same_crs(src: Any, tile_crs: str) -> bool:
    known = _crs_matches.get(src)
    if known is None:
        known = _crs_matches[src] = {}
    same = known.get(tile_crs)
    if same is None:
        same = known[tile_crs] = src.crs is not None and _crs_equal(src.crs.to_wkt(), tile_crs)
    return same


def _without_nan(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``valid`` less the NaN pixels of float data: a NaN is no measurement whatever nodata the catalog
    or the file states (a catalog's ``nodata: nan`` reaches the read as "not stated", and a file may
    carry no nodata at all), and it would be stretched to an arbitrary byte."""
    return valid & ~np.isnan(data) if data.dtype.kind in "fc" else valid


def _read_aligned(src: Any, band: int, window: Window, nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
    """A direct windowed read; the part of the window outside the scene is padded (invalid)."""
    height, width = int(window.height), int(window.width)
    if window.col_off >= 0 and window.row_off >= 0 and window.col_off + width <= src.width \
            and window.row_off + height <= src.height:  # inside the scene: the read is the tile
        data = src.read(band, window=window)
        valid = not_nodata(data, nodata) if nodata is not None else src.read_masks(band, window=window) > 0
        return data, _without_nan(data, valid)
    inner = window.intersection(Window(0, 0, src.width, src.height)) if _overlaps(window, src) else None
    data = np.zeros((height, width), dtype=src.dtypes[band - 1])
    valid = np.zeros((height, width), dtype=bool)
    if inner is not None:
        r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
        h, w = int(inner.height), int(inner.width)
        part = src.read(band, window=inner)
        data[r0 : r0 + h, c0 : c0 + w] = part
        if nodata is not None:
            valid[r0 : r0 + h, c0 : c0 + w] = not_nodata(part, nodata)
        else:  # no nodata value: the dataset's own mask (internal mask or alpha), else every pixel
            valid[r0 : r0 + h, c0 : c0 + w] = src.read_masks(band, window=inner) > 0
    return data, _without_nan(data, valid)


def not_nodata(data: np.ndarray, nodata: float) -> np.ndarray:
    """``data != nodata``, compared in the data's own type when ``nodata`` is one of its values.

    Numpy compares uint16 pixels with a Python float by casting every pixel to float64 first: five
    times the time of comparing with ``np.uint16(0)``, a sixth of the stretch's cost per pixel. A value
    the type cannot hold exactly (70000 or 0.5 for uint16, 0.1 for float32) is compared as before. A NaN
    nodata marks the NaN pixels of float data (``data != nan`` would be true for every pixel) and none of
    integer data.
    """
    if math.isnan(nodata):
        return ~np.isnan(data) if data.dtype.kind in "fc" else np.ones(data.shape, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):  # out-of-range casts are caught below
        try:
            native = data.dtype.type(nodata)
        except (OverflowError, ValueError, TypeError):
            return data != nodata
    return data != native if native == nodata else data != nodata


def _overlaps(window: Window, src: Any) -> bool:
    return (window.col_off < src.width and window.row_off < src.height
            and window.col_off + window.width > 0 and window.row_off + window.height > 0)


def _read_warped(src: Any, band: int, tile: dict[str, Any], transform: Affine, res: float,
                 nodata: float | None, reopen: Callable[[int], Any]) -> tuple[np.ndarray, np.ndarray]:
    """The tile's grid warped from the source (another CRS, pixel size or sub-pixel offset);
    ``reopen(level)`` opens the source at an overview level."""
    height, width = int(tile["height"]), int(tile["width"])
    src_res = abs(src.transform.a)
    if res > src_res * (1 + 1e-6):
        level = _overview_level(src, band, res)
        if level is not None:
            src = reopen(level)
            src_res = abs(src.transform.a)
    vrt_args: dict[str, Any] = dict(
        crs=tile["crs"], transform=transform, width=width, height=height, resampling=_resampling(src_res, res)
    )
    # A source with an alpha band of its own (an RGBA mosaic) carries it into the VRT, and GDAL refuses to
    # add a second one: its mask then marks both the transparent pixels and those outside the scene.
    has_alpha = ColorInterp.alpha in src.colorinterp
    if nodata is not None:
        vrt_args.update(src_nodata=nodata, nodata=nodata)
    elif not has_alpha:
        vrt_args.update(add_alpha=True)  # the alpha band marks pixels outside the scene
    with WarpedVRT(src, **vrt_args) as vrt:
        if nodata is not None:
            masked = vrt.read(band, masked=True)
            data, valid = np.ma.getdata(masked), ~np.ma.getmaskarray(masked)
        elif has_alpha:
            data, valid = vrt.read(band), vrt.read_masks(band) > 0
        else:
            data, valid = vrt.read(band), vrt.read(vrt.count) > 0
    return data, _without_nan(data, valid)


def _stretch_values(values: np.ndarray, scale: float, offset: float, lo: float, hi: float) -> np.ndarray:
    physical = values.astype(np.float64) * scale + offset
    stretched = np.rint(np.clip((physical - lo) / (hi - lo), 0.0, 1.0) * 255.0)
    return np.nan_to_num(stretched, nan=0.0).astype(np.uint8)  # NaN (float nodata) is masked black anyway


@functools.lru_cache(maxsize=64)
def _stretch_table(dtype: str, scale: float, offset: float, lo: float, hi: float) -> pa.Array:
    """The stretch of every value of an 8/16-bit integer type, indexed by value minus the type's minimum."""
    info = np.iinfo(dtype)
    return pa.array(_stretch_values(np.arange(info.min, info.max + 1, dtype=np.int64), scale, offset, lo, hi))


def stretch(data: np.ndarray, scale: float, offset: float, lo: float, hi: float) -> np.ndarray:
    """Stored values -> uint8: ``rint(clip((v * scale + offset - lo) / (hi - lo), 0, 1) * 255)``.

    8- and 16-bit integer data (nearly all imagery) goes through a table of the 256 or 65,536
    possible results, computed once with the same float64 formula: one lookup per pixel instead of
    eight array passes, with bit-identical output. The lookup is Arrow's ``take``, which takes uint8
    and uint16 indices as they are (numpy's converts every index to int64 first: twice the time); a
    signed value's index (value minus the type's minimum) is its bits with the sign bit flipped.
    The result is read-only (a view of Arrow's buffer).
    """
    if data.dtype.kind in "ui" and data.dtype.itemsize <= 2:
        table = _stretch_table(data.dtype.str, scale, offset, lo, hi)
        if not data.dtype.isnative:  # Arrow takes no byte-swapped indices
            data = data.astype(data.dtype.newbyteorder("="))
        flat = np.ascontiguousarray(data).reshape(-1)
        if data.dtype.kind == "i":  # -32768 -> 0x0000, -1 -> 0x7fff, 0 -> 0x8000: value minus the minimum
            unsigned = flat.dtype.str.replace("i", "u")
            flat = flat.view(unsigned) ^ np.array(1 << (8 * data.dtype.itemsize - 1), dtype=unsigned)
        looked_up = pc.take(table, pa.array(flat)).to_numpy(zero_copy_only=False)
        return looked_up.reshape(data.shape)
    return _stretch_values(data, scale, offset, lo, hi)


def _band_nodata(declared: float, src: Any) -> float | None:
    """A band's nodata: what the catalog declares, else (NaN) what the file says, else None."""
    return declared if not math.isnan(declared) else src.nodata


def declared_nodata(tile: Mapping[str, Any]) -> list[float]:
    """The tile's nodata DN per band (:attr:`rsflow.plan.Tile.nodata`; one number for every band is
    taken too), NaN where the catalog states none."""
    value = tile["nodata"]
    if isinstance(value, np.ndarray | list | tuple):
        return [float(v) for v in value]
    return [float(value)] * len(tile["hrefs"])


def read_chip(
    tile: dict[str, Any],
    *,
    opener: Callable[..., Any] | None = None,
) -> tuple[np.ndarray, float]:
    """Read one tile as an RGB uint8 chip.

    Where the tile grid is the source's own pixel grid (the usual case: tiles are planned on the
    finest band's grid) each band is one windowed read of exactly the tile's pixels, so GDAL decodes
    only the internal blocks under it; otherwise (a coarser ``--gsd``, bands of another resolution or
    CRS) through a ``WarpedVRT`` on the tile's grid, from the overview nearest the tile's pixel size.
    Datasets stay open across tiles of the same worker (:func:`_open_dataset`).

    Args:
        tile: a tile row (see :class:`rsflow.plan.Tile`).
        opener: passed to ``rasterio.open`` (tests use it to count the bytes read); the dataset is
            then opened for this tile only.

    Returns:
        ``(chip, nodata_fraction)``: chip is ``[height, width, 3]`` uint8; the fraction is of
        pixels missing in at least one band (0-1).
    """
    height, width = int(tile["height"]), int(tile["width"])
    transform = Affine(*tile["transform"][:6])
    res = float(tile["res"])
    lo, hi = float(tile["stretch_lo"]), float(tile["stretch_hi"])
    declared = declared_nodata(tile)
    chip = np.zeros((height, width, 3), dtype=np.uint8)
    valid = np.ones((height, width), dtype=bool)
    for i, (href, band, scale, offset) in enumerate(
        zip(tile["hrefs"], tile["bands"], tile["scale"], tile["offset"], strict=True)
    ):
        url = sign_href(str(href), str(tile.get("signing") or ""))
        with contextlib.ExitStack() as stack:
            if opener is not None:  # a dataset for this tile only, every open through the opener
                def reopen(level: int, url: str = url) -> Any:
                    return stack.enter_context(rasterio.open(url, opener=opener, overview_level=level))

                src = stack.enter_context(rasterio.open(url, opener=opener))
            else:
                def reopen(level: int, url: str = url) -> Any:
                    return _open_dataset(url, level)

                src = _open_dataset(url)
            nodata = _band_nodata(declared[i], src)
            window = _aligned_window(src, tile, transform, res)
            if window is not None:
                data, band_valid = _read_aligned(src, int(band), window, nodata)
            else:
                data, band_valid = _read_warped(src, int(band), tile, transform, res, nodata, reopen)
        chip[..., i] = stretch(data, float(scale), float(offset), lo, hi)
        valid &= band_valid
    n_valid = int(np.count_nonzero(valid))
    if n_valid < valid.size:
        chip[~valid] = 0
    return chip, 1.0 - n_valid / valid.size


_SOURCE_COLUMNS = ("hrefs", "bands", "scale", "offset", "nodata", "stretch_lo", "stretch_hi", "signing")

_STRETCH_CHUNK = 1 << 17
"""Pixels stretched per call when a row of tiles is read at once: one lookup over a whole 3,700 px row of
336 px tiles (2.5 MB of uint16 in, 1.2 MB out) ran 3x slower per pixel than over a tile's 113,000."""

_ROW_KEY = (*_SOURCE_COLUMNS, "crs", "res", "width", "height")
"""What tiles read together as one row (:func:`read_row`) share, besides their row of the grid."""


def read_row(tiles: list[dict[str, Any]]) -> list[tuple[np.ndarray, float]] | None:
    """The chips (views of one row array) of tiles side by side on one row of the source's own pixel
    grid (same sources, size and top edge), each band read ONCE across the row and the chips sliced
    out of it: what :func:`read_chip` gives for each tile, bit for bit, with one GDAL read per band
    instead of one per band and tile (whose per-call cost is most of a small tile's read).

    None when the row cannot be read that way (a tile off the source's grid or past the scene's edge,
    tiles not left to right or with a gap between them): read those tiles one by one. A read that
    raises propagates; the caller then reads the tiles one by one, so that a failure is recorded
    against the tiles it concerns.
    """
    first = tiles[0]
    height, width = int(first["height"]), int(first["width"])
    transform, res = Affine(*first["transform"][:6]), float(first["res"])
    lo, hi = float(first["stretch_lo"]), float(first["stretch_hi"])
    declared = declared_nodata(first)
    offsets = [round((float(t["transform"][2]) - transform.c) / res) for t in tiles]
    if any(not 0 < b - a <= width for a, b in itertools.pairwise(offsets)) or any(
        not math.isclose(float(t["transform"][2]), transform.c + o * res, rel_tol=0, abs_tol=res * 1e-6)
        or float(t["transform"][5]) != transform.f for t, o in zip(tiles, offsets, strict=True)
    ):
        return None
    span = offsets[-1] + width
    row = np.empty((height, span, len(first["hrefs"])), dtype=np.uint8)  # band-interleaved, as the chips
    row_valid = np.ones((height, span), dtype=bool)
    for i, (href, band, scale, offset) in enumerate(
        zip(first["hrefs"], first["bands"], first["scale"], first["offset"], strict=True)
    ):
        src = _open_dataset(sign_href(str(href), str(first.get("signing") or "")))
        window = _aligned_window(src, first, transform, res)
        if window is None or window.col_off < 0 or window.row_off < 0 \
                or window.col_off + span > src.width or window.row_off + height > src.height:
            return None
        nodata = _band_nodata(declared[i], src)
        data, valid = _read_aligned(src, int(band), Window(window.col_off, window.row_off, span, height), nodata)
        step = max(1, _STRETCH_CHUNK // span)  # a few rows at a time: the table lookup stays in cache
        for r in range(0, height, step):
            row[r : r + step, :, i] = stretch(data[r : r + step], float(scale), float(offset), lo, hi)
        row_valid &= valid
    if not row_valid.all():  # a pixel missing in any band is black in every chip that holds it
        row[~row_valid] = 0
    out = []
    for o in offsets:
        valid = row_valid[:, o : o + width]
        out.append((row[:, o : o + width], 1.0 - int(np.count_nonzero(valid)) / valid.size))
    return out


def s3_endpoint_options(environ: Mapping[str, str]) -> dict[str, str]:
    """GDAL options for a custom S3 endpoint given the AWS SDKs' way, from a process environment.

    boto3, s3fs and the AWS CLI take the endpoint as a URL in ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``; GDAL's ``/vsis3/`` takes ``AWS_S3_ENDPOINT`` (host and port), ``AWS_HTTPS``
    and ``AWS_VIRTUAL_HOSTING``. When only the URL is set, this returns the GDAL equivalents:
    ``http://minio:9000`` -> ``AWS_S3_ENDPOINT=minio:9000``, ``AWS_HTTPS=NO``,
    ``AWS_VIRTUAL_HOSTING=FALSE`` (path-style requests, which every S3-compatible server accepts).
    Options already set in ``environ`` are left out, so the user's own GDAL settings win.

    Returns:
        The options to set (empty when there is no custom endpoint or GDAL already has one).
    """
    url = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if not url or environ.get("AWS_S3_ENDPOINT"):
        return {}
    parsed = urlparse(url if "://" in url else f"https://{url}")
    if not parsed.netloc:
        return {}
    options = {
        "AWS_S3_ENDPOINT": parsed.netloc + parsed.path.rstrip("/"),
        "AWS_HTTPS": "NO" if parsed.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    return {k: v for k, v in options.items() if k not in environ}


def configure_gdal(options: dict[str, str]) -> None:
    """Put GDAL config options into this worker's environment, once (GDAL reads them from the
    process environment; an option the user already set wins), plus the worker's custom S3
    endpoint, if any (:func:`s3_endpoint_options`)."""
    for key, value in {**options, **s3_endpoint_options(os.environ)}.items():
        os.environ.setdefault(key, value)


_SHORT_READ = re.compile(r"got (\d+) bytes, expected (\d+)")
"""libtiff's words for a block that lies (partly) past the end of the file."""
_REASON_MAX_CHARS = 2000


def read_failure_reason(exc: BaseException) -> str:
    """The ``error`` of a tile whose read raised ``exc``: what went wrong, with no credentials.

    rasterio's own message is often only "Read failed. See previous exception for details."; the
    GDAL errors that say what happened (``HTTP response code: 404``, libtiff's ``got 0 bytes,
    expected 6109``) are its causes, so they are kept, outermost first. A block past the end of the
    file is named as a truncated file. GDAL quotes the URL it failed on, signature included: every
    URL's query values are redacted (:func:`rsflow.hrefs.redact`).
    """
    messages: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(messages) < 8:
        text = str(current).strip().removesuffix("See previous exception for details.").strip()
        if text and not any(text in m for m in messages):
            messages.append(text.rstrip(".") if current is exc else text)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    reason = f"{type(exc).__name__}: {': '.join(messages)}"
    short = _SHORT_READ.search(reason)
    if short and int(short[1]) < int(short[2]):
        reason = f"truncated file (a block lies past its end): {reason}"
    reason = redact(reason)
    return reason if len(reason) <= _REASON_MAX_CHARS else reason[: _REASON_MAX_CHARS - 3] + "..."


# ------------------------------------------------------------------------------------- failed sources

_VSI_PREFIXES = {
    "http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/", "gcs": "/vsigs/",
    "az": "/vsiaz/",
}
"""GDAL's file system for each remote scheme (as rasterio maps them)."""
_SUSPECT_MAX = 1024
_suspect_hrefs: OrderedDict[str, None] = OrderedDict()
"""Hrefs whose reads failed in this worker: nothing cached about them is trusted again."""


def forget_source(href: str) -> None:
    """Drop what this process keeps about ``href`` (as in the catalog; a signed form of it too): its
    open datasets (:func:`_open_dataset`) and GDAL's ``/vsicurl/`` cache of its size, header and
    blocks, so the next read fetches them again.

    GDAL keeps a remote file's size and blocks per URL for the life of the process (a Ray worker
    outlives runs), so a file that was truncated, missing or refused and is then fixed at the same
    URL would keep failing in every worker that saw it broken.
    """
    opened = [k for k in _open_cache if k[0] == href or (k[0].startswith(href) and k[0][len(href)] in "?&#")]
    for key in opened:  # the signed form of a catalog href is the href with a query added
        ds, _, _ = _open_cache.pop(key)
        ds.close()
    scheme, sep, rest = href.partition("://")
    prefix = _VSI_PREFIXES.get(scheme.lower()) if sep else None
    clear = _curl_cache_clearer()
    if prefix is not None and clear is not None:
        clear((prefix + (href if prefix == "/vsicurl/" else rest)).encode())


@functools.cache
def _curl_cache_clearer() -> Callable[[bytes], None] | None:
    """GDAL's ``VSICurlPartialClearCache(prefix)`` from the libgdal rasterio loaded (rasterio does not
    wrap it), or None where that library cannot be found (the cache is then left alone)."""
    import ctypes
    import glob

    candidates: list[str] = []
    try:
        with open("/proc/self/maps") as maps:  # the very library in this process (Linux)
            candidates += [line.split()[-1] for line in maps if "/libgdal" in line.split()[-1]]
    except OSError:
        pass
    here = os.path.dirname(rasterio.__file__)
    for pattern in ("../rasterio.libs/libgdal*", ".dylibs/libgdal*", "../rasterio.libs/gdal*.dll"):
        candidates += glob.glob(os.path.join(here, pattern))
    for path in dict.fromkeys(candidates):
        try:
            fn = ctypes.CDLL(path).VSICurlPartialClearCache
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_char_p], None
        return fn  # type: ignore[no-any-return]
    logger.info("GDAL's VSICurlPartialClearCache not found: a remote file fixed in place is read afresh "
                "only by new workers")
    return None


def _note_failed_source(hrefs: list[str]) -> None:
    for href in hrefs:
        _suspect_hrefs[href] = None
        _suspect_hrefs.move_to_end(href)
        forget_source(href)
    while len(_suspect_hrefs) > _SUSPECT_MAX:
        _suspect_hrefs.popitem(last=False)


def _lists_for_arrow(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``columns`` with every object column of per-row arrays (how Ray Data hands a variable-length Arrow
    list column, e.g. ``region_boxes``, to a numpy batch) turned into per-row lists: Ray converts lists
    back to an Arrow list column, but an array of arrays to pickled Python objects, which every later
    stage then unpickles row by row ("Failed to convert column ... falling back to serialize as pickled
    python objects")."""
    out = dict(columns)
    for name, column in columns.items():
        if column.dtype == object and any(isinstance(v, np.ndarray) for v in column):
            lists = np.empty(len(column), dtype=object)
            lists[:] = [list(v) if isinstance(v, np.ndarray) else v for v in column]
            out[name] = lists
    return out


def read_batch(
    batch: dict[str, np.ndarray], *, max_nodata: float, gdal_options: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Tile rows -> tile rows with ``image`` and read status: one block's worth of a read task, which
    runs :func:`read_blocks` over a planning unit.

    Read tasks are tasks rather than actors so that read concurrency follows the free CPUs; Ray reuses
    worker processes, so the GDAL options set here persist per worker.
    """
    global _checked
    configure_gdal(GDAL_REMOTE_OPTIONS if gdal_options is None else gdal_options)
    n = len(batch["tile_id"])
    size_h, size_w = int(batch["height"][0]), int(batch["width"][0])
    images = np.zeros((n, size_h, size_w, 3), dtype=np.uint8)
    status = np.array(batch["status"], dtype=object)
    # Ray hands an all-null column over as float NaN: keep "no error" None, or a batch with no failed
    # tile writes a float column that cannot be merged with the string column of one that has some.
    error = np.array([e if isinstance(e, str) else None for e in batch["error"]], dtype=object)
    stage = np.array(batch["stage"], dtype=object)
    nodata_fraction = np.full(n, np.nan)
    seconds = np.zeros(n)
    _checked = set()
    try:
        _read_rows(batch, max_nodata, images, status, error, stage, nodata_fraction, seconds)
    finally:
        _checked = None
    # The source description is spent once the chip exists; do not carry it into the model stage.
    out = _lists_for_arrow({k: v for k, v in batch.items() if k not in _SOURCE_COLUMNS})
    out.update(
        image=images, status=status, error=error, stage=stage, nodata_fraction=nodata_fraction, read_seconds=seconds
    )
    return out


def _read_rows(batch: dict[str, np.ndarray], max_nodata: float, images: np.ndarray, status: np.ndarray,
               error: np.ndarray, stage: np.ndarray, nodata_fraction: np.ndarray, seconds: np.ndarray) -> None:
    """:func:`read_batch`'s loop: each ok row's chip into ``images``, its outcome into the other arrays.

    Runs of ok tiles on one row of one item's grid (planning yields a unit's tiles row by row, left to
    right) are read together (:func:`read_row`); any other tile, and every tile of a run whose row read
    raised, is read on its own (:func:`read_chip`), so a failure is recorded against its own tiles.
    """
    n = len(status)
    i = 0
    while i < n:
        if status[i] != "ok":
            i += 1
            continue
        j = i + 1
        while j < n and status[j] == "ok" and _same_row(batch, i, j) and _next_to(batch, j - 1, j):
            j += 1
        tiles = [{k: v[m] for k, v in batch.items()} for m in range(i, j)]
        start = time.perf_counter()
        _forget_suspects(tiles[0])
        chips = _read_run(tiles)
        each = (time.perf_counter() - start) / max(1, sum(c is not None for c in chips))
        for m, tile, chip in zip(range(i, j), tiles, chips, strict=True):
            if chip is not None:
                _record(m, chip[0], chip[1], max_nodata, images, status, error, stage, nodata_fraction)
                seconds[m] = each
            else:
                start = time.perf_counter()
                _read_one(m, tile, max_nodata, images, status, error, stage, nodata_fraction)
                seconds[m] = time.perf_counter() - start
        i = j


def _read_run(tiles: list[dict[str, Any]]) -> list[tuple[np.ndarray, float] | None]:
    """:func:`read_row` over a run of tiles, or over all but its last where the last runs past the
    scene's right edge (the usual reason a row cannot be read at once); None for each tile to read on
    its own (every tile of a row whose read raised)."""
    for k in (len(tiles), len(tiles) - 1):
        if k < 2:
            break
        try:
            chips = read_row(tiles[:k])
        except Exception:  # noqa: BLE001 - read them one by one: the failure lands on its own tiles
            break
        if chips is not None:
            return [*chips, *([None] * (len(tiles) - k))]
    return [None] * len(tiles)


def _same_row(batch: dict[str, np.ndarray], i: int, j: int) -> bool:
    """Whether rows ``i`` and ``j`` of a batch are tiles of the same sources, size and grid row."""
    if float(batch["transform"][i][5]) != float(batch["transform"][j][5]):
        return False
    for k in _ROW_KEY:
        a, b = batch[k][i], batch[k][j]
        if isinstance(a, np.ndarray | list | tuple) or isinstance(b, np.ndarray | list | tuple):
            if len(a) != len(b) or not all(_same_value(x, y) for x, y in zip(a, b, strict=True)):
                return False
        elif not _same_value(a, b):
            return False
    return True


def _same_value(a: Any, b: Any) -> bool:
    """``a == b``, NaN equal to NaN (a nodata that states none)."""
    nan = isinstance(a, float | np.floating) and isinstance(b, float | np.floating) and math.isnan(a) and math.isnan(b)
    return bool(a == b) or nan


def _next_to(batch: dict[str, np.ndarray], i: int, j: int) -> bool:
    """Whether tile ``j`` starts right of tile ``i`` and touches or overlaps it (no gap to read)."""
    step = float(batch["transform"][j][2]) - float(batch["transform"][i][2])
    return 0 < step <= float(batch["width"][i]) * float(batch["res"][i]) * (1 + 1e-9)


def _forget_suspects(tile: dict[str, Any]) -> None:
    for href in (str(h) for h in tile["hrefs"]):  # it failed here before (this run or an earlier one): read it afresh
        if href in _suspect_hrefs:
            forget_source(href)


def _read_one(i: int, tile: dict[str, Any], max_nodata: float, images: np.ndarray, status: np.ndarray,
              error: np.ndarray, stage: np.ndarray, nodata_fraction: np.ndarray) -> None:
    _forget_suspects(tile)
    try:
        chip, frac = read_chip(tile)
    except Exception as exc:  # noqa: BLE001 - a bad tile is data, not a crash: record it, carry on
        status[i], stage[i] = "failed", "read"
        error[i] = read_failure_reason(exc)
        logger.warning("tile %s: read failed: %s", tile["tile_id"], error[i])
        _note_failed_source([str(h) for h in tile["hrefs"]])
    else:
        _record(i, chip, frac, max_nodata, images, status, error, stage, nodata_fraction)


def _record(i: int, chip: np.ndarray, frac: float, max_nodata: float, images: np.ndarray, status: np.ndarray,
            error: np.ndarray, stage: np.ndarray, nodata_fraction: np.ndarray) -> None:
    images[i] = chip
    nodata_fraction[i] = frac
    if frac > max_nodata:
        status[i], stage[i] = "skipped", "read"
        error[i] = f"nodata fraction {frac:.3f} exceeds --max-nodata {max_nodata}"
    else:
        stage[i] = "read"


_MIN_BLOCK_CACHE_BYTES = 8 * 2**20
"""The least block cache a unit is read with: room for the blocks :func:`unit_block_cache_bytes` leaves
out (masks, overviews, a warp's margins)."""


def unit_block_cache_bytes(batch: dict[str, np.ndarray]) -> int | None:
    """The decoded internal blocks a planning unit's reads keep reusing, in bytes: for each band source,
    the block rows under one row of tiles (a row of tiles shares a block row with the next) across the
    unit's width, counted in whole blocks and at most the source's own block rows and columns. A
    pixel-interleaved file counts every band (GDAL caches all bands of a block it decodes).

    None (keep the worker's GDAL_CACHEMAX) where it cannot be told without reading: no tile left to
    read, a source that does not open, a source in another CRS than the tiles, a band the source does
    not have, or anything else that goes wrong. The sizing is an optimisation: it never raises, since
    it runs once for the whole unit, before any tile is read, and a failure here would fail the read
    task (and the run) instead of the tiles concerned, which the reads then record one by one.

    E.g. a unit 11 tiles of 336 px wide over three uint16 COGs of 512 px blocks: 9 block columns x 2
    block rows x 512 KiB x 3 bands = 27 MiB; a 2,000 px scene in one unit: 4 x 2 blocks per band, 12 MiB.
    """
    try:
        return _unit_block_cache_bytes(batch)
    except Exception as exc:  # noqa: BLE001 - the reads record what is wrong, tile by tile
        logger.debug("block cache of a unit not sized: %s", read_failure_reason(exc))
        return None


def _unit_block_cache_bytes(batch: dict[str, np.ndarray]) -> int | None:
    ok = [i for i, s in enumerate(batch["status"]) if s == "ok"]
    if not ok:
        return None
    first = {k: v[ok[0]] for k, v in batch.items()}
    res, height, width = float(first["res"]), int(first["height"]), int(first["width"])
    xs = [float(batch["transform"][i][2]) for i in ok]
    span_x, span_y = max(xs) - min(xs) + width * res, height * res  # the unit's width, one tile row's height
    total = 0
    for href, bands in _bands_by_href(first).items():
        try:
            src = _open_dataset(sign_href(href, str(first.get("signing") or "")))
        except Exception:  # noqa: BLE001 - the read itself records why the source fails
            return None
        if not _same_crs(src, str(first["crs"])):
            return None
        if any(not 1 <= band <= src.count for band in bands):
            return None  # a band the source does not have: its tiles fail, each with the reason
        if src.count > 1 and src.interleaving == Interleaving.pixel:
            bands = list(range(1, src.count + 1))
        for band in bands:
            bh, bw = src.block_shapes[band - 1]
            cols = min(math.ceil(span_x / abs(src.transform.a) / bw) + 1, math.ceil(src.width / bw))
            rows = min(math.ceil(span_y / abs(src.transform.e) / bh) + 1, math.ceil(src.height / bh))
            total += cols * rows * bw * bh * np.dtype(src.dtypes[band - 1]).itemsize
    return total


def _bands_by_href(tile: dict[str, Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for href, band in zip(tile["hrefs"], tile["bands"], strict=True):
        out.setdefault(str(href), [])
        if int(band) not in out[str(href)]:
            out[str(href)].append(int(band))
    return out


def read_blocks(
    batch: dict[str, np.ndarray], *, tiles_per_block: int | None, max_nodata: float,
    gdal_options: dict[str, str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch UDF (a generator): a planning unit's tile rows -> :func:`read_batch` over runs of
    ``tiles_per_block`` rows (all at once for ``None``), each yielded as it is read, so that a read task
    holds one block of chips at a time and the next stage can start on the first.

    The unit is read with GDAL's block cache set to what it needs (:func:`unit_block_cache_bytes`,
    between :data:`_MIN_BLOCK_CACHE_BYTES` and the worker's GDAL_CACHEMAX), so that a read worker's
    memory follows the unit, not the cache's ceiling.
    """
    configure_gdal(GDAL_REMOTE_OPTIONS if gdal_options is None else gdal_options)
    n = len(batch["tile_id"])
    need = unit_block_cache_bytes(batch) if n else None
    cache: dict[str, int] = {}
    if need is not None:
        ceiling = int(get_gdal_config("GDAL_CACHEMAX"))
        cache["GDAL_CACHEMAX"] = min(ceiling, max(need, _MIN_BLOCK_CACHE_BYTES))
    step = max(1, n if tiles_per_block is None else tiles_per_block)  # a unit whose tiles were all skipped: n = 0
    for start in range(0, n, step):
        part = batch if step >= n else {k: v[start : start + step] for k, v in batch.items()}
        with rasterio.Env(**cache):  # set and restored around each block: no GDAL state across a yield
            out = read_batch(part, max_nodata=max_nodata, gdal_options=gdal_options)
        yield out
        del out, part  # the consumer has the block: its chips must not stay alive through the next read
