"""Image preparation that LLaVA-1.5 does before the CLIP processor (``image_aspect_ratio='pad'``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def expand2square(img: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Pad an RGB image to a square, LLaVA's way (``llava/mm_utils.py expand2square``).

    The canvas side is ``max(H, W)`` filled with ``background``; the image is pasted centred on the
    short axis at offset ``(max - min) // 2`` (integer division, so an odd remainder leaves the extra
    pixel after the image: bottom or right). A square input is returned as it is, not copied: callers
    only read it, and a model actor used to copy every chip here (about 7 ms a 50-chip block of 336 px
    tiles, half the no-op actor's CPU); the ``crop`` aspect passes the chip on the same way.

    Args:
        img: ``H x W x 3`` uint8 array (pixel rows first).
        background: fill colour ``(R, G, B)``, 0-255.

    Returns:
        ``S x S x 3`` uint8 array with ``S = max(H, W)``.

    Raises:
        ValueError: ``img`` is not ``H x W x 3`` uint8 with ``H, W >= 1``.
    """
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise ValueError(f"image must be an HxWx3 uint8 array, got shape {shape} dtype {dtype}")
    height, width = int(img.shape[0]), int(img.shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"image must not be empty, got shape {img.shape}")
    if height == width:
        return img
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[...] = np.asarray(background, dtype=np.uint8)
    if width > height:
        top = (width - height) // 2
        canvas[top : top + height, :, :] = img
    else:
        left = (height - width) // 2
        canvas[:, left : left + width, :] = img
    return canvas


def background_from_processor(image_processor: Any) -> tuple[int, int, int]:
    """The padding colour LLaVA uses: the processor's normalisation mean scaled to 0-255 (truncated).

    Args:
        image_processor: anything with an ``image_mean`` of three floats in 0-1 (a CLIP image processor).

    Returns:
        ``tuple(int(x * 255) for x in image_mean)``, e.g. ``(122, 116, 104)`` for the OpenAI CLIP mean.
    """
    mean: Sequence[float] = image_processor.image_mean
    r, g, b = (int(x * 255) for x in mean)
    return (r, g, b)
