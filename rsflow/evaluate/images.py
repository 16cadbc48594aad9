"""Benchmark image files -> RGB uint8 arrays: the read stage of ``rsflow eval``.

Benchmarks ship their images as files (UCMerced and RSVQA GeoTIFFs, AID and RSICD JPEGs, GeoChat-Bench
PNGs). :func:`read_image_batch` is the Ray Data batch function that replaces the region job's windowed
COG reads (:func:`rsflow.read.read_blocks`) for them; the model stage after it is the same.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def read_rgb(path: str) -> np.ndarray:
    """One image file as ``[H, W, 3]`` uint8 RGB.

    PIL first (PNG, JPEG, baseline TIFF; grey, palette and RGBA images converted to RGB, as LLaVA's
    loaders do with ``convert("RGB")``); a TIFF PIL cannot decode (tiled or compressed GeoTIFFs) is
    read with rasterio, which must give three or more uint8 bands (the first three are RGB).

    Raises:
        OSError: the file cannot be read as an image.
        ValueError: a GeoTIFF that is not 8-bit RGB.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as pil_error:
        if not path.lower().endswith((".tif", ".tiff")):
            raise
        import rasterio

        try:
            with rasterio.open(path) as src:
                data = src.read()
        except Exception as exc:
            raise OSError(f"cannot read {path}: {pil_error}; rasterio: {exc}") from exc
        if data.dtype != np.uint8 or data.shape[0] < 3:
            raise ValueError(
                f"{path} has {data.shape[0]} band(s) of {data.dtype}; expected 8-bit RGB"
            ) from pil_error
        return np.ascontiguousarray(np.moveaxis(data[:3], 0, -1))


def read_image_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Ray Data batch UDF (CPU tasks): image rows -> rows with ``image`` and read status.

    Input columns: ``tile_id``, ``image_path`` (a local file), plus any others (kept).
    Output adds ``image`` (uint8 ``[B, H, W, 3]``, or an object array of ``H x W x 3`` arrays when the
    sizes differ), ``image_width``, ``image_height`` (pixels; 0 when unread), ``status`` (``ok`` or
    ``failed``), ``error``, ``stage`` and ``read_seconds``. A file that cannot be read is a failed row
    with the reason, never an exception.
    """
    paths = [str(p) for p in batch["image_path"]]
    n = len(paths)
    images: list[np.ndarray] = []
    status = np.array(["ok"] * n, dtype=object)
    error = np.array([None] * n, dtype=object)
    stage = np.array(["read"] * n, dtype=object)
    widths = np.zeros(n, dtype=np.int64)
    heights = np.zeros(n, dtype=np.int64)
    seconds = np.zeros(n)
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        try:
            rgb = read_rgb(path)
        except Exception as exc:  # noqa: BLE001 - a bad file is data, not a crash
            status[i], error[i] = "failed", f"{type(exc).__name__}: {exc}"
            logger.warning("image %s: read failed: %s", path, error[i])
            rgb = np.zeros((1, 1, 3), dtype=np.uint8)
        else:
            heights[i], widths[i] = rgb.shape[:2]
        images.append(rgb)
        seconds[i] = time.perf_counter() - t0
    out = dict(batch)
    if "row_prompts" in out:  # back to plain lists of dicts, which Arrow takes as list<struct> again
        prompts = np.empty(n, dtype=object)
        for i, value in enumerate(out["row_prompts"]):
            prompts[i] = [dict(p) for p in value] if value is not None else []
        out["row_prompts"] = prompts
    if len({im.shape for im in images}) == 1:
        out["image"] = np.stack(images)
    else:
        ragged = np.empty(n, dtype=object)
        for i, im in enumerate(images):
            ragged[i] = im
        out["image"] = ragged
    out.update(
        image_width=widths, image_height=heights, status=status, error=error, stage=stage, read_seconds=seconds
    )
    return out
