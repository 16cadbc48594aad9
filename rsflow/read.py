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

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from rsflow.sources import sign_href

logger = logging.getLogger(__name__)

#: GDAL settings for reading cloud-optimised GeoTIFFs over HTTP(S)/S3: do not list the remote
#: "directory" on open (one request per file instead of many), retry transient HTTP errors, merge
#: neighbouring range requests and cache blocks. Set once per read worker.
GDAL_REMOTE_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
    "GDAL_CACHEMAX": "256",
}


def _resampling(src_res: float, dst_res: float) -> Resampling:
    if math.isclose(src_res, dst_res, rel_tol=1e-6):
        return Resampling.nearest
    return Resampling.bilinear if src_res > dst_res else Resampling.average


def read_chip(
    tile: dict[str, Any],
    *,
    opener: Callable[..., Any] | None = None,
) -> tuple[np.ndarray, float]:
    """Read one tile as an RGB uint8 chip.

    Args:
        tile: a tile row (see :class:`rsflow.plan.Tile`).
        opener: passed to ``rasterio.open`` (tests use it to count the bytes read).

    Returns:
        ``(chip, nodata_fraction)``: chip is ``[height, width, 3]`` uint8; the fraction is of
        pixels missing in at least one band (0-1).
    """
    height, width = int(tile["height"]), int(tile["width"])
    transform = Affine(*tile["transform"][:6])
    res = float(tile["res"])
    lo, hi = float(tile["stretch_lo"]), float(tile["stretch_hi"])
    declared = float(tile["nodata"])
    chip = np.zeros((height, width, 3), dtype=np.uint8)
    valid = np.ones((height, width), dtype=bool)
    for i, (href, band, scale, offset) in enumerate(
        zip(tile["hrefs"], tile["bands"], tile["scale"], tile["offset"], strict=True)
    ):
        url = sign_href(str(href), str(tile.get("signing") or ""))
        kwargs: dict[str, Any] = {"opener": opener} if opener is not None else {}
        with rasterio.open(url, **kwargs) as src:
            nodata = declared if not math.isnan(declared) else src.nodata
            vrt_args: dict[str, Any] = dict(
                crs=tile["crs"],
                transform=transform,
                width=width,
                height=height,
                resampling=_resampling(abs(src.transform.a), res),
            )
            if nodata is not None:
                vrt_args.update(src_nodata=nodata, nodata=nodata)
            else:
                vrt_args.update(add_alpha=True)  # the alpha band marks pixels outside the scene
            with WarpedVRT(src, **vrt_args) as vrt:
                data = vrt.read(int(band), masked=True)
                if nodata is None:
                    band_valid = vrt.read(vrt.count) > 0
                else:
                    band_valid = ~np.ma.getmaskarray(data)
        values = np.ma.getdata(data).astype(np.float64) * float(scale) + float(offset)
        scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0
        chip[..., i] = np.rint(scaled).astype(np.uint8)
        valid &= band_valid
    chip[~valid] = 0
    return chip, float(1.0 - valid.mean())


_SOURCE_COLUMNS = ("hrefs", "bands", "scale", "offset", "nodata", "stretch_lo", "stretch_hi", "signing")


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


def read_batch(
    batch: dict[str, np.ndarray], *, max_nodata: float, gdal_options: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Ray Data batch UDF (CPU tasks): tile rows -> tile rows with ``image`` and read status.

    Runs as tasks rather than actors so that read concurrency follows the free CPUs; Ray reuses
    worker processes, so the GDAL options set here persist per worker.
    """
    configure_gdal(GDAL_REMOTE_OPTIONS if gdal_options is None else gdal_options)
    n = len(batch["tile_id"])
    size_h, size_w = int(batch["height"][0]), int(batch["width"][0])
    images = np.zeros((n, size_h, size_w, 3), dtype=np.uint8)
    status = np.array(batch["status"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    stage = np.array(batch["stage"], dtype=object)
    nodata_fraction = np.full(n, np.nan)
    seconds = np.zeros(n)
    for i in range(n):
        if status[i] != "ok":
            continue
        tile = {k: v[i] for k, v in batch.items()}
        start = time.perf_counter()
        try:
            chip, frac = read_chip(tile)
        except Exception as exc:  # a bad tile is data, not a crash: record it, carry on
            status[i], stage[i] = "failed", "read"
            error[i] = f"{type(exc).__name__}: {exc}"
            logger.warning("tile %s: read failed: %s", tile["tile_id"], error[i])
        else:
            images[i] = chip
            nodata_fraction[i] = frac
            if frac > max_nodata:
                status[i], stage[i] = "skipped", "read"
                error[i] = f"nodata fraction {frac:.3f} exceeds --max-nodata {max_nodata}"
            else:
                stage[i] = "read"
        seconds[i] = time.perf_counter() - start
    # The source description is spent once the chip exists; do not carry it into the model stage.
    out = {k: v for k, v in batch.items() if k not in _SOURCE_COLUMNS}
    out.update(
        image=images, status=status, error=error, stage=stage, nodata_fraction=nodata_fraction, read_seconds=seconds
    )
    return out
