"""Model rows -> result rows: answers normalised, classes matched, boxes put on the map.

One input row is one (tile, prompt) answer from the model stage. It becomes one ``kind="tile"``
result row (raw text kept, typed columns filled per task) and, for ``detect`` and ``refer``, one
``kind="object"`` row per box the answer holds, with the box in the chip's pixel space, the
rotated rectangle as a pixel polygon, and its EPSG:4326 polygon computed through the tile's
affine and CRS (every corner transformed; see :mod:`rsflow.georef`). Text that does not parse
never fails the tile: the row keeps the text and ``parse_error`` says what was wrong.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import shapely

from rsflow.georef import box_to_map, box_to_pixels
from rsflow.models.parse import match_class, normalize_vqa, parse_boxes
from rsflow.models.slots import ANSWER_CUT_COLUMN
from rsflow.output import RESULT_SCHEMA, geometry_keys

logger = logging.getLogger(__name__)

#: Tasks whose answers are boxes.
BOX_TASKS = ("detect", "refer")


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def _utc(value: Any) -> pd.Timestamp | None:
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        return None
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


_GRID_COLUMNS = ("native_crs", "window_col_off", "window_row_off", "window_width", "window_height", "res", "transform")
"""Result columns that place a tile in its item's pixel grid."""


def _tile_base(row: dict[str, Any]) -> dict[str, Any]:
    """The columns every result row of a tile shares.

    A row with no pixel grid (an item or planning unit that could not be planned: its CRS is empty) has
    null :data:`_GRID_COLUMNS`: it covers no window, and the planning placeholders (a tile-sized window
    at offset 0, a zero transform) would read as a real tile at the scene's corner.
    """
    base = {
        "tile_id": str(row["tile_id"]),
        "item_id": str(row["item_id"]),
        "collection": str(row["collection"]),
        "datetime": _utc(row.get("datetime")),
        "task": _text(row.get("task")),
        "prompt": _text(row.get("prompt")),
        "prompt_key": _text(row.get("prompt_key")),
        "region_id": _text(row.get("region_id")),
        "text": _text(row.get("text")),
        "model_id": str(row["model_id"]),
        "status": str(row["status"]),
        "stage": _text(row.get("stage")),
        "error": _text(row.get("error")),
        "nodata_fraction": float(row["nodata_fraction"]),
        **dict.fromkeys(_GRID_COLUMNS),
    }
    if row["crs"]:
        base.update(
            native_crs=str(row["crs"]),
            window_col_off=int(row["col_off"]),
            window_row_off=int(row["row_off"]),
            window_width=int(row["width"]),
            window_height=int(row["height"]),
            res=float(row["res"]),
            transform=[float(v) for v in row["transform"]],
        )
    return base


def interpret_row(row: dict[str, Any], *, classes: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One model row -> its result rows (the tile row first, then its objects).

    Args:
        row: a model-stage row (tile columns plus task, prompt, prompt_key, text, status, ...).
        classes: the classify class list (``--classes``).

    Returns:
        Result rows as dicts with the columns of ``RESULT_SCHEMA`` except the geometry bytes and
        sort key, which are filled here too.
    """
    base = _tile_base(row)
    footprint = row["footprint_wkb"]  # empty for an item with neither geometry nor bbox (a failed row)
    base.update(kind="tile", geometry=bytes(footprint) if footprint is not None and len(footprint) else None)
    out = [base]
    text = base["text"]
    if base["status"] != "ok" or text is None:
        return out
    task = base["task"]
    if task == "vqa":
        ans = normalize_vqa(text)
        base.update(answer=ans.answer, answer_number=ans.number, parse_error=ans.parse_error)
    elif task == "classify":
        match = match_class(text, list(classes))
        base.update(label=match.label, parse_error=match.parse_error)
    elif task in BOX_TASKS:
        parsed = parse_boxes(text)
        errors = [parsed.parse_error] if parsed.parse_error else []
        objects = []
        for i, box in enumerate(parsed.boxes):
            try:
                poly_px, _, poly_4326 = box_to_map(
                    box, base["transform"], base["native_crs"], base["window_width"], base["window_height"]
                )
            except ValueError as exc:  # a box that does not project: note it, keep the others
                errors.append(f"box {i + 1}: {exc}")
                continue
            if poly_4326.is_empty:  # e.g. drawn in a tile's padding past a pole: nowhere on Earth
                errors.append(f"box {i + 1}: lies outside the world (in the tile's padding past a pole)")
                continue
            x1, y1, x2, y2, angle = box_to_pixels(box, base["window_width"], base["window_height"])
            obj = dict(base)
            obj.update(
                kind="object",
                label=base["prompt_key"] or box.phrase,
                box_px=[x1, y1, x2, y2, angle],
                pixel_polygon=poly_px.wkt,
                source_tile_ids=[base["tile_id"]],
                n_merged=1,
                geometry=shapely.to_wkb(poly_4326),
                parse_error=None,
            )
            objects.append(obj)
        if not parsed.boxes and not errors:
            errors.append("no box in the answer")
        base.update(object_count=len(objects), parse_error="; ".join(errors) or None)
        out.extend(objects)
    if _is_true(row.get(ANSWER_CUT_COLUMN)):  # e.g. boxes past the cut were never written: a lower count
        base["parse_error"] = "; ".join(e for e in (base.get("parse_error"), ANSWER_CUT_NOTE) if e)
    return out


ANSWER_CUT_NOTE = "the answer reached --max-new-tokens before it ended: it may be cut short"
"""``parse_error`` of an answer generation stopped at the token limit (the infer stage's ``answer_cut``)."""


def _is_true(value: Any) -> bool:
    return isinstance(value, bool | np.bool_) and bool(value)


def interpret_batch(batch: pd.DataFrame, *, classes: tuple[str, ...] = ()) -> pa.Table:
    """Ray Data UDF: model rows -> result rows as an Arrow table of ``RESULT_SCHEMA``.

    ``_primary`` marks the first prompt of each tile (``prompt_index == 0``), so the sink can count
    tiles without collecting ids; ``_hilbert`` is the sort key of the row's geometry centroid.
    """
    rows: list[dict[str, Any]] = []
    records = batch.to_dict("records")
    for rec in records:
        results = interpret_row(rec, classes=classes)
        primary = int(rec.get("prompt_index", 0)) == 0
        for i, r in enumerate(results):
            r["_primary"] = primary and i == 0
            r["_read_seconds"] = float(rec.get("read_seconds") or 0.0) if r["_primary"] else 0.0
            r["_infer_seconds"] = float(rec.get("infer_seconds") or 0.0) if i == 0 else 0.0
        rows.extend(results)
    if rows:
        keys = geometry_keys([r["geometry"] for r in rows])
        for r, k in zip(rows, keys, strict=True):
            r["_hilbert"] = int(k)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
