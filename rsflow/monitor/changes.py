"""What changed between consecutive observations of the same place: pure functions over result rows.

A *cell* is a place on the ground that several items see identically: the same native CRS, the same
pixel grid origin and resolution, the same window size (``cell_id`` hashes them). Tile ids include
the item id, so the cell, not the tile id, is what links one date to the next. Items on other grids
(another UTM zone, a shifted tiling) make other cells and are not compared with these.

For every cell, task and prompt seen on two or more items, the observations (ok rows only; a failed
or skipped tile is not an observation) are ordered by acquisition time and each consecutive pair is
compared:

========================  =====================================================================
``answer_flipped``        vqa: a yes/no answer became the other one
``answer_changed``        vqa: another answer that is not a number changed (``forest`` -> ``water``)
``count_changed``         vqa numbers, and detect/refer object counts, moved by ``min_count_change`` or more
``class_changed``         classify: the matched class changed
``object_appeared``       detect/refer: an object of the label with no object of the earlier
                          observation overlapping it at ``object_iou`` or more (IoU in the native CRS)
``object_vanished``       the same, backwards
========================  =====================================================================

Answers that did not parse (null ``answer`` / ``label`` / ``object_count``) are not observations (the
observations before and after them are compared), nor are counts of an answer the model stopped at
``max_new_tokens`` (its ``parse_error`` holds :data:`rsflow.interpret.ANSWER_CUT_NOTE`: the boxes or the
number after the cut are missing, so its count and objects would read as ships that vanished), answers
of different models (``model_id``: another checkpoint or adapter, after the config changed) are never
compared with each other, and captions and region captions (free text that always differs) are not
compared.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import shapely
from shapely.geometry.base import BaseGeometry

from rsflow.monitor.config import ChangeRules

logger = logging.getLogger(__name__)

CHANGE_KINDS = (
    "answer_flipped",
    "answer_changed",
    "count_changed",
    "class_changed",
    "object_appeared",
    "object_vanished",
)

#: Columns of the ``changes`` GeoParquet, in order, with their meaning.
CHANGE_COLUMNS: dict[str, str] = {
    "change": "answer_flipped | answer_changed | count_changed | class_changed | object_appeared | object_vanished",
    "cell_id": "the place: hash of (native CRS, window origin in pixels, resolution, window size)",
    "task": "vqa | classify | detect | refer",
    "prompt": "the user text asked",
    "prompt_key": "the input the prompt came from (question, class list, category, expression)",
    "label": "classify: the class after (or before, when null after); objects: the category",
    "before_item_id": "STAC item of the earlier observation",
    "after_item_id": "STAC item of the later observation",
    "before_tile_id": "tile of the earlier observation",
    "after_tile_id": "tile of the later observation",
    "before_datetime": "acquisition time of the earlier observation (UTC)",
    "after_datetime": "acquisition time of the later observation (UTC)",
    "before_value": "the earlier answer, class, count or object label",
    "after_value": "the later answer, class, count or object label",
    "before_count": "count_changed: the earlier count",
    "after_count": "count_changed: the later count",
    "geometry": "EPSG:4326: the tile footprint, or the object's polygon for object changes",
}

#: Columns of result rows this module reads.
RESULT_COLUMNS_USED = (
    "tile_id",
    "kind",
    "item_id",
    "model_id",
    "datetime",
    "task",
    "prompt",
    "prompt_key",
    "text",
    "answer",
    "answer_number",
    "label",
    "object_count",
    "parse_error",
    "status",
    "native_crs",
    "transform",
    "window_width",
    "window_height",
    "geometry",
)

_COMPARED_TASKS = ("vqa", "classify", "detect", "refer")
_YES_NO = ("yes", "no")


def cell_id(native_crs: str, transform: Iterable[float], width: int, height: int) -> str:
    """The place a tile covers, independent of the item: native CRS, grid origin, resolution, size.

    Quantised relative to the pixel, whatever the CRS's unit: the origin in pixels to 1/1000 of one, the
    resolution to 7 significant digits (a drift under 1/1000 px across a 10,000 px window). Fixed decimals
    in CRS units (0.001 for the origin) were 1/10,000 px in metres but 11 px of a 10 m grid in degrees
    (EPSG:4326), where different grids made one cell and were compared as one place."""
    a, _, c, _, e, f = (float(v) for v in list(transform)[:6])
    col, row = (c / a, f / e) if a and e else (c, f)  # the origin in pixels of the grid
    col, row = round(col, 3) + 0.0, round(row, 3) + 0.0  # + 0.0: -0.0 is 0.0
    key = f"{native_crs}|{col:.3f}|{row:.3f}|{a:.7g}|{e:.7g}|{int(width)}x{int(height)}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def add_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``cell_id`` column (object rows get the cell of their tile; a row with no pixel
    grid, from an item that could not be planned, gets None: it covers no cell)."""
    rows = rows.copy()
    rows["cell_id"] = [
        cell_id(crs, tr, w, h) if crs and tr is not None else None
        for crs, tr, w, h in zip(
            rows["native_crs"], rows["transform"], rows["window_width"], rows["window_height"], strict=True
        )
    ]
    return rows


@dataclass(frozen=True)
class Observation:
    """One ok tile row: what one item said about one cell for one prompt."""

    cell_id: str
    task: str
    prompt: str
    prompt_key: str
    item_id: str
    tile_id: str
    datetime: pd.Timestamp
    value: str | None
    """What is compared: the vqa answer, the class, the object count (as text); None if unparsed, or a
    count (objects, a numeric answer) of an answer cut at ``max_new_tokens``."""
    number: float | None
    """The vqa answer as a number, or the object count."""
    geometry: BaseGeometry | None = field(default=None, compare=False)
    model_id: str = ""
    """The model (with its adapter) that answered: answers of two models are never compared."""
    cut: bool = False
    """The answer reached ``max_new_tokens`` before it ended."""


def observations(rows: pd.DataFrame) -> list[Observation]:
    """The ok tile rows of ``rows`` (with ``cell_id``) as :class:`Observation` s, sorted by cell,
    task, prompt, time and item."""
    from rsflow.interpret import ANSWER_CUT_NOTE  # here: rsflow.interpret brings Ray Data in

    tiles = rows[(rows["kind"] == "tile") & (rows["status"] == "ok")]
    out = []
    for r in tiles.itertuples(index=False):
        # parse_error joins every note with "; " (a box that did not project, then the cut): look for the cut
        cut = ANSWER_CUT_NOTE in (_text(getattr(r, "parse_error", None)) or "")
        value, number = _value(r, cut=cut)
        out.append(
            Observation(
                cell_id=r.cell_id,
                task=str(r.task),
                prompt=_text(r.prompt) or "",
                prompt_key=_text(r.prompt_key) or "",
                item_id=str(r.item_id),
                tile_id=str(r.tile_id),
                datetime=pd.Timestamp(r.datetime),
                value=value,
                number=number,
                geometry=r.geometry,
                model_id=_text(getattr(r, "model_id", None)) or "",
                cut=cut,
            )
        )
    out.sort(key=lambda o: (o.cell_id, o.task, o.prompt_key, o.prompt, o.model_id, o.datetime, o.item_id))
    return out


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    return str(value)


def _number(value: Any) -> float | None:
    if value is None or value is pd.NA:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(number) else number


def _value(r: Any, *, cut: bool = False) -> tuple[str | None, float | None]:
    """(value, number) of a tile row; an answer cut short has no count: the boxes, or the digits, after the
    cut are missing (``object_count`` counts the boxes written, whatever the reply was going to say). A cut
    yes/no answer or class keeps its first words, which are the answer."""
    task = r.task
    if task == "vqa":
        number = _number(r.answer_number)
        if cut and number is not None:
            return None, None
        return _text(r.answer), number
    if task == "classify":
        return _text(r.label), None
    if task in ("detect", "refer"):
        if cut:
            return None, None
        count = _number(r.object_count)
        return (None, None) if count is None else (str(int(count)), count)
    return _text(r.text), None


def detect_changes(rows: pd.DataFrame, rules: ChangeRules) -> pd.DataFrame:
    """All changes between consecutive observations in ``rows`` (result rows, any number of items).

    Args:
        rows: result rows with at least :data:`RESULT_COLUMNS_USED`; ``geometry`` as shapely
            geometries in EPSG:4326.
        rules: thresholds.

    Returns:
        One row per change with the columns of :data:`CHANGE_COLUMNS` (``geometry`` shapely,
        EPSG:4326), sorted by later time, cell, task, prompt, kind and values.
    """
    rows = add_cells(rows)
    # An answer that did not parse is no observation: it must not stand between two that did (no -> ? -> yes
    # is a flip), nor, beside another granule of its instant, veto what the next instant changed.
    obs = [o for o in observations(rows) if o.value is not None]
    objects = _index_objects(rows[(rows["kind"] == "object") & (rows["status"] == "ok")])
    changes: list[dict[str, Any]] = []
    for earlier, after in _consecutive(obs):
        if after.task not in _COMPARED_TASKS:
            continue
        found = []
        for before in earlier:
            pair = _compare(before, after, rules)
            if after.task in ("detect", "refer"):
                pair += _compare_objects(before, after, objects, rules)
            found.append(pair)
        # several observations at the earlier instant: a change only where ``after`` differs from all of
        # them (the same kind, and for an object the same object, found against each)
        changes.extend(c for c in found[0] if all(any(_same_change(c, o) for o in pair) for pair in found[1:]))
    frame = pd.DataFrame(changes, columns=list(CHANGE_COLUMNS))
    if len(frame):
        frame = frame.sort_values(
            ["after_datetime", "cell_id", "task", "prompt_key", "change", "before_value", "after_value"],
            kind="stable",
            na_position="first",
        ).reset_index(drop=True)
    return frame


def _same_change(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["change"] != b["change"]:
        return False
    if a["change"] in ("object_appeared", "object_vanished"):
        return a.get("geometry") is not None and b.get("geometry") is not None and bool(
            shapely.equals(a["geometry"], b["geometry"]))
    return True


def _consecutive(obs: list[Observation]) -> Iterable[tuple[list[Observation], Observation]]:
    """What to compare: per cell and prompt, each observation with the observations of the instant
    before its own. Observations at one instant (two granules of one pass over the cell, a scene
    reprocessed under a new id) are not a change from one another; the next instant is compared with
    all of them (:func:`detect_changes` keeps a change found against every one)."""
    for _, series in itertools.groupby(obs, key=lambda o: (o.cell_id, o.task, o.prompt_key, o.prompt, o.model_id)):
        earlier: list[Observation] = []
        for _, at_once in itertools.groupby(series, key=lambda o: o.datetime):
            same_time = list(at_once)
            for after in same_time:
                before = [a for a in earlier if a.item_id != after.item_id]
                if before:
                    yield before, after
            earlier = same_time


def _row(kind: str, before: Observation, after: Observation, **values: Any) -> dict[str, Any]:
    row = {
        "change": kind,
        "cell_id": after.cell_id,
        "task": after.task,
        "prompt": after.prompt,
        "prompt_key": after.prompt_key,
        "label": None,
        "before_item_id": before.item_id,
        "after_item_id": after.item_id,
        "before_tile_id": before.tile_id,
        "after_tile_id": after.tile_id,
        "before_datetime": before.datetime,
        "after_datetime": after.datetime,
        "before_value": before.value,
        "after_value": after.value,
        "before_count": None,
        "after_count": None,
        "geometry": after.geometry,
    }
    row.update(values)
    return row


def _compare(before: Observation, after: Observation, rules: ChangeRules) -> list[dict[str, Any]]:
    if before.value is None or after.value is None:
        return []
    if before.task == "vqa":
        if before.value in _YES_NO and after.value in _YES_NO:
            return [_row("answer_flipped", before, after)] if before.value != after.value else []
        if before.number is not None and after.number is not None:
            if abs(after.number - before.number) >= rules.min_count_change:
                return [
                    _row("count_changed", before, after, before_count=before.number, after_count=after.number)
                ]
            return []
        return [_row("answer_changed", before, after)] if before.value != after.value else []
    if before.task == "classify":
        if before.value != after.value:
            return [_row("class_changed", before, after, label=after.value)]
        return []
    if (
        before.number is not None
        and after.number is not None
        and (abs(after.number - before.number) >= rules.min_count_change)
    ):
        return [
            _row(
                "count_changed",
                before,
                after,
                label=after.prompt_key,
                before_count=before.number,
                after_count=after.number,
            )
        ]
    return []


#: (task, label, item id) -> that item's objects of the label: (cell id, EPSG:4326 polygon, native CRS).
@dataclass
class _Objects:
    """The objects of one (task, label, item): where each is (cell), its EPSG:4326 polygon and its item's CRS,
    with each CRS's metric polygons and a spatial index built once (they were projected again for every cell
    compared, each against every object of the item: 1,000 tiles of 100 objects were 10^8 projections)."""

    cells: list[str] = field(default_factory=list)
    geometries: list[BaseGeometry] = field(default_factory=list)
    crs: list[str] = field(default_factory=list)
    _projected: dict[str, tuple[Any, list[BaseGeometry]]] = field(default_factory=dict)

    def in_crs(self, crs: str) -> tuple[Any, list[BaseGeometry]]:
        """``(STRtree, polygons)`` of every object in ``crs``'s metres."""
        if crs not in self._projected:
            polys = [_metric(g, crs) for g in self.geometries]
            self._projected[crs] = (shapely.STRtree(polys), polys)
        return self._projected[crs]


ObjectIndex = dict[tuple[str, str, str], _Objects]


def _index_objects(objects: pd.DataFrame) -> ObjectIndex:
    index: ObjectIndex = {}
    for r in objects.itertuples(index=False):
        entry = index.setdefault((str(r.task), _text(r.label) or "", str(r.item_id)), _Objects())
        entry.cells.append(r.cell_id)
        entry.geometries.append(r.geometry)
        entry.crs.append(str(r.native_crs))
    return index


def _compare_objects(
    before: Observation, after: Observation, objects: ObjectIndex, rules: ChangeRules
) -> list[dict[str, Any]]:
    """Objects of the label in this cell with no match in the other observation (matched against the
    other observation's objects in any cell: a merged object may sit on a neighbouring tile). Only objects
    whose boxes meet can reach ``object_iou`` (> 0): the others are never compared."""
    label = before.prompt_key
    none = _Objects()
    earlier = objects.get((before.task, label, before.item_id), none)
    later = objects.get((after.task, label, after.item_id), none)
    out = []
    for kind, mine, other, ref in (
        ("object_appeared", later, earlier, after),
        ("object_vanished", earlier, later, before),
    ):
        for i, cell in enumerate(mine.cells):
            if cell != ref.cell_id:
                continue
            crs = mine.crs[i]
            poly = mine.in_crs(crs)[1][i]
            tree, polys = other.in_crs(crs) if other.geometries else (None, [])
            near = tree.query(poly) if tree is not None else []
            if not any(_iou(poly, polys[j]) >= rules.object_iou for j in near):
                geometry = mine.geometries[i]
                out.append(
                    _row(
                        kind,
                        before,
                        after,
                        label=label,
                        before_value=label if kind == "object_vanished" else None,
                        after_value=label if kind == "object_appeared" else None,
                        geometry=geometry,
                    )
                )
    return out


@lru_cache(maxsize=16)
def _to_native(crs: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:4326", crs, always_xy=True)


def _metric(geom: BaseGeometry, crs: str | None) -> BaseGeometry:
    if crs is None:
        return geom
    tr = _to_native(crs)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def _iou(a: BaseGeometry, b: BaseGeometry) -> float:
    union = a.union(b).area
    return float(a.intersection(b).area / union) if union > 0 else 0.0


# --- timelines (for the report) -------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """Every observation of one cell, by time: what each prompt was answered on each date."""

    cell_id: str
    geometry: BaseGeometry | None
    """The cell's footprint (EPSG:4326)."""
    columns: list[tuple[str, str]]
    """(task, prompt key) in a fixed order."""
    dates: list[tuple[pd.Timestamp, str]]
    """(acquisition time, item id), oldest first."""
    values: dict[tuple[str, tuple[str, str]], str]
    """(item id, column) -> the value shown."""
    changed: set[tuple[str, tuple[str, str]]]
    """(item id, column) cells whose value differs from the previous date in a way that counts."""


def timelines(rows: pd.DataFrame, changes: pd.DataFrame) -> dict[str, Timeline]:
    """One :class:`Timeline` per cell observed by two or more items."""
    rows = add_cells(rows)
    obs = observations(rows)
    by_cell: dict[str, list[Observation]] = {}
    for o in obs:
        by_cell.setdefault(o.cell_id, []).append(o)
    changed_keys = {
        (r.cell_id, r.after_item_id, r.task, _text(r.prompt_key) or "")
        for r in changes.itertuples(index=False)
    }
    out = {}
    for cell, cell_obs in sorted(by_cell.items()):
        items = sorted({(o.datetime, o.item_id) for o in cell_obs})
        if len(items) < 2:
            continue
        columns = sorted({(o.task, o.prompt_key) for o in cell_obs})
        values = {
            (o.item_id, (o.task, o.prompt_key)): o.value
            if o.value is not None
            else "(answer cut short)" if o.cut else "(no answer)"
            for o in cell_obs
        }
        changed = {k for k in values if (cell, k[0], k[1][0], k[1][1]) in changed_keys}
        out[cell] = Timeline(
            cell_id=cell,
            geometry=cell_obs[-1].geometry,
            columns=columns,
            dates=items,
            values=values,
            changed=changed,
        )
    return out
