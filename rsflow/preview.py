"""Result dataset -> one self-contained HTML map (``rsflow preview RESULT -o map.html``).

``write_preview(result, html_path)`` reads a result directory (GeoParquet 1.1, EPSG:4326; files
starting with ``_`` or ``.`` such as ``_manifest.json`` are ignored) and writes one HTML file
that shows every row on a Leaflet map:

* Tile footprints, coloured by what the model said: VQA rows by their answer (``yes`` green,
  ``no`` red, any other or unparsed answer neutral), classify rows by their class label (a
  categorical palette, listed in the legend), caption and every other task neutral. Rows whose
  ``status`` is ``skipped`` or ``failed`` are grey and dashed, with the error in the popup.
* Object rows (``kind == "object"``: a detected object's polygon) in yellow, outlined dark,
  with their label as tooltip, in a pane above the footprints.
* A popup per row: task, prompt, text, answer / label, parse error, status, error and tile id.
* One layer per task (per task and prompt when a task was asked several prompts, since the
  footprints of one tile would otherwise be stacked and only the top one could be clicked),
  plus one layer per task for its object rows, all in a layer control. Only the most telling
  task layer is on at start (vqa, then classify, detect, ...), with all object layers: layers
  hold the same footprints, so showing all of them would only show the top one.
* An OpenStreetMap basemap, which shows when the viewer is online; offline, the map keeps
  Leaflet's plain grey background and everything else still works.

Library and the offline trick: the map is built with **folium** (maintained, Leaflet based, all
JavaScript comes from its templates; this module writes none). folium links Leaflet, jQuery,
Bootstrap and Font Awesome from CDNs, which would leave a blank page offline. This module drops
those links (none of the folium parts used here need jQuery or Bootstrap) and inlines Leaflet's
``leaflet.js`` and ``leaflet.css`` instead, read from the **XStatic-Leaflet** wheel on PyPI
(Leaflet 1.9.3, the version folium 0.20 targets; a data-only package with no dependencies, kept
by the XStatic packaging project), with the images the CSS refers to turned into ``data:`` URIs.
The page therefore needs no network at all; the only outside URLs left in it are the basemap's
tile template and its attribution link (and the Leaflet credit inside Leaflet itself). Not
chosen: lonboard, whose ``to_html`` goes through ``ipywidgets.embed.embed_minimal_html`` (the
widget manager script comes from a CDN) and which needs WebGL; ``folium-offline``, a one-person
fork of folium that embeds its assets in Python strings.

Safety: row values are shown through folium's ``GeoJsonPopup``/``GeoJsonTooltip``, which put
them into ``innerHTML`` as they are, so every shown value is HTML-escaped here first (model output
such as ``</script><script>...`` or ``<img onerror=...>`` shows as text); the GeoJSON itself is
written by Jinja's ``tojson``, which escapes ``<``, ``>``, ``&`` and ``'``, so no value can close
the ``<script>`` that holds it. NUL and other control characters are replaced by U+FFFD, and
shown values are cut at ``MAX_TEXT_CHARS`` characters.

Rows in the page: each row is one GeoJSON feature whose ``row_id`` property is
``"<tile_id>#<n>"`` (a ``{`` in the id written ``%7B``: see :func:`safe_html`), ``n`` being the row's position in the dataset as
``geopandas.read_parquet(result)`` returns it, so the page can be checked against the dataset.
A row with a null geometry is still a feature (Leaflet skips drawing it).

Size limit: a dataset with more than ``max_rows`` rows is refused with a ``RequestError`` rather
than cut, since a silently partial preview would look like a complete one. A row costs about
0.6 KB of HTML (50,000 rows: some 25-30 MB, written in 6-11 s, still drawn by Chromium in SVG).
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import folium
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import shapely
from branca.element import Element, MacroElement
from jinja2 import Template

from rsflow.errors import RequestError

logger = logging.getLogger(__name__)

__all__ = ["PreviewSummary", "add_preview_parser", "run_preview", "write_preview"]

#: Largest number of rows drawn by default (see the module docstring).
DEFAULT_MAX_ROWS = 50_000
#: Longest shown value (prompt, text, error), in characters; longer ones end in an ellipsis.
MAX_TEXT_CHARS = 2_000
#: Decimal places kept in coordinates (7 decimal degrees is about 1 cm).
COORD_DECIMALS = 7

#: Columns a result dataset must have.
_REQUIRED = ("tile_id", "task", "prompt", "text", "status", "geometry")
#: Columns used when present (newer results add some of them).
_OPTIONAL = ("item_id", "datetime", "error", "model_id", "kind", "answer", "answer_number", "label",
             "parse_error", "object_count")

_YES = "#1a9850"
_NO = "#d73027"
_NEUTRAL = "#3f6e9a"
_FAILED = "#9e9e9e"
_OBJECT = "#ffd400"
_OTHER_CLASS = "#4d4d4d"
#: Categorical palette for classify labels (tab10 and its light variants, greys left out).
_CLASS_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
)
#: Order in which a task layer is picked to be on at start.
_TASK_PRIORITY = ("vqa", "classify", "detect", "refer", "region-caption", "caption")

#: What the map shows where no basemap tile loaded (offline).
_PLAIN_BACKGROUND = "<style>.leaflet-container { background: #e8e8e3; }</style>"
_OBJECT_PANE = "rsflow-objects"
_OSM_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
_OSM_ATTRIBUTION = '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'

_POPUP_FIELDS = ("task", "prompt", "text", "result", "parse_error", "status", "error", "tile")
_POPUP_ALIASES = ("task", "prompt", "text", "answer / label", "parse error", "status", "error", "tile")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class PreviewSummary:
    """What ``write_preview`` drew."""

    rows: int
    """Rows of the dataset in the page (one GeoJSON feature each)."""
    tiles: int
    """Distinct ``tile_id`` among footprint rows (rows that are not objects)."""
    objects: int
    """Object rows (``kind == "object"``), drawn as their own polygons."""
    path: Path
    """The HTML file written."""


def write_preview(
    result: str | Path,
    html_path: str | Path,
    *,
    title: str | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> PreviewSummary:
    """Write a self-contained HTML map of a result dataset.

    Args:
        result: a result directory (GeoParquet files, EPSG:4326; ``_*`` and ``.*`` files ignored) or
            one GeoParquet file.
        html_path: the HTML file to write; its parent directories are created.
        title: page and legend title (default: ``"rsflow preview: <result name>"``).
        max_rows: refuse datasets with more rows than this.

    Returns:
        A ``PreviewSummary`` with the counts of rows, tiles and objects drawn and the path.

    Raises:
        RequestError: ``result`` is missing, holds no GeoParquet, lacks a required column or has
            more than ``max_rows`` rows; ``max_rows`` is not positive.
    """
    if max_rows < 1:
        raise RequestError("max_rows", f"must be a positive whole number, got {max_rows}")
    result = Path(result)
    html_path = Path(html_path)
    frame = _read_result(result, max_rows)
    rows = _prepare_rows(frame)
    page_title = title if title is not None else f"rsflow preview: {result.name or result}"
    fmap = _build_map(rows, page_title)
    page = fmap.get_root().render()
    _check_self_contained(page)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(page, encoding="utf-8")
    summary = PreviewSummary(
        rows=len(rows), tiles=_count_tiles(rows), objects=sum(r.is_object for r in rows), path=html_path
    )
    logger.info("wrote a preview of %d rows (%d tiles, %d objects) to %s",
                summary.rows, summary.tiles, summary.objects, html_path)
    return summary


# --- reading ---------------------------------------------------------------------------------


def _read_result(result: Path, max_rows: int) -> gpd.GeoDataFrame:
    """Read the columns the preview uses, in ``geopandas.read_parquet`` order, in EPSG:4326."""
    if not result.exists():
        raise RequestError("RESULT", f"no such file or directory: {result}")
    if result.is_dir() and not any(
        p.suffix == ".parquet" and not p.name.startswith(("_", ".")) for p in result.rglob("*.parquet")
    ):
        raise RequestError("RESULT", f"no GeoParquet (*.parquet) files in {result}; is it an rsflow result?")
    try:
        dataset = pads.dataset(str(result), format="parquet", ignore_prefixes=["_", "."])
        names = set(dataset.schema.names)
        n_rows = dataset.count_rows()
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise RequestError("RESULT", f"cannot read {result} as Parquet: {_one_line(exc)}") from None
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise RequestError("RESULT", f"{result} lacks the result column(s) {', '.join(missing)}")
    if n_rows > max_rows:
        raise RequestError(
            "max_rows",
            f"{result} has {n_rows} rows, more than max_rows={max_rows}; raise it (--max-rows) "
            "or preview a filtered copy of the dataset",
        )
    columns = [c for c in (*_REQUIRED, *_OPTIONAL) if c in names]
    try:
        frame = gpd.read_parquet(result, columns=columns)
    except (OSError, ValueError) as exc:
        raise RequestError("RESULT", f"cannot read {result} as GeoParquet: {_one_line(exc)}") from None
    if frame.crs is None:
        frame = frame.set_crs("EPSG:4326")
    elif frame.crs.to_epsg() != 4326:
        frame = frame.to_crs("EPSG:4326")
    return frame.reset_index(drop=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- rows -> display values --------------------------------------------------------------------


def safe_html(text: str) -> str:
    """``text`` escaped for HTML, with ``{`` as ``&#123;`` (it displays the same).

    branca, which folium builds pages with, compiles each rendered part of the page again as a Jinja
    template (``Element(script(...))``): a ``{{ ... }}`` in a model's answer or a STAC item id ran as code
    on the driver (a review ran ``id`` through it), ``{# `` failed the run after every tile was inferred,
    and ``{{ship}}`` vanished from a caption. No ``{`` from the data ever reaches the page now."""
    return html.escape(text).replace("{", "&#123;")


def _clean(value: Any) -> str | None:
    """Make a value display-safe HTML: None for missing, control characters replaced, escaped, cut."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = _CONTROL_CHARS.sub("\ufffd", str(value))
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + "\u2026"
    return safe_html(text).replace("\r\n", "\n").replace("\n", "<br>")


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    """Column ``name`` as a plain list with None for missing values (all None when absent)."""
    if name not in frame:
        return [None] * len(frame)
    return [None if _missing(v) else v for v in frame[name].tolist()]


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays (e.g. source_tile_ids lists) are not missing
        return False


_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def _vqa_answer(answer: Any, text: Any) -> str | None:
    """``yes``/``no``/other answer of a VQA row; without an ``answer`` value, read from the text."""
    if isinstance(answer, str):
        return answer.strip().lower() or None
    if isinstance(text, str):
        m = _YES_NO.match(text)
        return m.group(1).lower() if m else None
    return None


def _class_label(label: Any, text: Any) -> str | None:
    """Class of a classify row: ``label``, or without one the first line of the text."""
    if isinstance(label, str) and label.strip():
        return label.strip()
    if isinstance(text, str) and text.strip():
        return text.strip().splitlines()[0].strip()
    return None


@dataclass(frozen=True)
class _Row:
    """One dataset row as the map needs it."""

    row_id: str
    """``"<tile_id>#<n>"``, n = position in the dataset."""
    tile_id: str
    task: str
    prompt: str | None
    status: str
    is_object: bool
    said: str | None
    """What the row said: VQA answer (lower case), class or object label; None otherwise."""
    popup: dict[str, str | None]
    """Popup fields, escaped HTML."""
    geometry: dict[str, Any] | None
    """GeoJSON geometry (EPSG:4326, rounded), None when null or empty."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _across_antimeridian(geoms: np.ndarray) -> np.ndarray:
    """Rows near the antimeridian with their western longitudes moved east by 360 (Leaflet draws
    longitudes past 180), where that makes them span less: a result around 180 degrees (tiles the output
    splits at the line, Fiji, Chukotka) opened on the whole world with each tile's halves at its two edges.
    Other results are returned as they are."""
    present = [g for g in geoms if g is not None]
    if not present:
        return geoms
    minx, _, maxx, _ = shapely.total_bounds(np.asarray(present, dtype=object))
    if maxx - minx <= 180.0:
        return geoms
    east = shapely.transform(geoms, lambda xy: np.column_stack([np.where(xy[:, 0] < 0, xy[:, 0] + 360.0, xy[:, 0]),
                                                                 xy[:, 1]]))
    e_minx, _, e_maxx, _ = shapely.total_bounds(np.asarray([g for g in east if g is not None], dtype=object))
    return east if e_maxx - e_minx < maxx - minx else geoms


def _prepare_rows(frame: gpd.GeoDataFrame) -> list[_Row]:
    """One ``_Row`` per dataset row, in dataset order."""
    cols = {name: _column(frame, name) for name in (*_REQUIRED, *_OPTIONAL) if name != "geometry"}
    geoms = np.asarray(frame.geometry.values, dtype=object)
    present = ~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)
    geoms[~present] = None
    geoms = shapely.transform(geoms, lambda xy: np.round(xy, COORD_DECIMALS))
    geoms = _across_antimeridian(geoms)
    rows: list[_Row] = []
    for i in range(len(frame)):
        v = {name: col[i] for name, col in cols.items()}
        tile_id, task, status = str(v["tile_id"] or ""), str(v["task"] or ""), str(v["status"] or "")
        is_object = v["kind"] == "object"
        if is_object:
            said = str(v["label"]).strip() if v["label"] is not None else None
        elif task == "classify":
            said = _class_label(v["label"], v["text"])
        elif task == "vqa":
            said = _vqa_answer(v["answer"], v["text"])
        else:
            said = str(v["answer"]) if v["answer"] is not None else None
        shown = said
        number = v["answer_number"]
        if number is not None and not is_object and task != "classify":
            shown = f"{said} ({number:g})" if said not in (None, f"{number:g}") else f"{number:g}"
        if v["object_count"] is not None and not is_object:
            found = f"{int(v['object_count'])} object(s)"
            shown = f"{shown}; {found}" if shown else found
        popup = {
            "task": _clean(task),
            "prompt": _clean(v["prompt"]),
            "text": _clean(v["text"]),
            "result": _clean(shown),
            "parse_error": _clean(v["parse_error"]),
            "status": _clean(status),
            "error": _clean(v["error"]),
            "tile": _clean(tile_id),
        }
        geom = geoms[i]
        rows.append(
            _Row(
                row_id=f"{tile_id}#{i}".replace("{", "%7B"),  # an id, never shown: no "{" (safe_html)
                tile_id=tile_id,
                task=task,
                prompt=None if v["prompt"] is None else str(v["prompt"]),
                status=status,
                is_object=is_object,
                said=said,
                popup=popup,
                geometry=None if geom is None else shapely.geometry.mapping(geom),
            )
        )
    return rows


def _count_tiles(rows: list[_Row]) -> int:
    return len({r.tile_id for r in rows if not r.is_object})


# --- colours ---------------------------------------------------------------------------------


def _class_colours(rows: list[_Row]) -> dict[str, str]:
    """Classify labels -> palette colour, most frequent first; the rest share ``_OTHER_CLASS``."""
    counts = Counter(r.said for r in rows if r.task == "classify" and r.ok and not r.is_object and r.said)
    ordered = sorted(counts, key=lambda k: (-counts[k], k))
    palette = _CLASS_PALETTE
    return {k: (palette[i] if i < len(palette) else _OTHER_CLASS) for i, k in enumerate(ordered)}


def _colour_key(row: _Row) -> str:
    """Which legend entry a row falls under: object, failed, yes, no, class or neutral."""
    if row.is_object:
        return "object"
    if not row.ok:
        return "failed"
    if row.task == "vqa" and row.said in ("yes", "no"):
        return row.said
    if row.task == "classify" and row.said is not None:
        return "class"
    return "neutral"


def _style(row: _Row, class_colours: dict[str, str]) -> dict[str, Any]:
    """Leaflet path options of one row."""
    key = _colour_key(row)
    if key == "object":
        return {"color": "#202020", "weight": 1.5, "fillColor": _OBJECT, "fillOpacity": 0.85}
    if key == "failed":
        return {"color": "#616161", "weight": 1, "dashArray": "4 3", "fillColor": _FAILED,
                "fillOpacity": 0.45}
    if key in ("yes", "no"):
        colour = _YES if key == "yes" else _NO
        return {"color": colour, "weight": 1, "fillColor": colour, "fillOpacity": 0.45}
    if key == "class":
        colour = class_colours.get(row.said or "", _OTHER_CLASS)
        return {"color": colour, "weight": 1, "fillColor": colour, "fillOpacity": 0.5}
    return {"color": _NEUTRAL, "weight": 1, "fillColor": _NEUTRAL, "fillOpacity": 0.2}


def _tooltip(row: _Row) -> str:
    """Short hover text (escaped HTML)."""
    if row.is_object:
        return _clean(row.said) or "object"
    if not row.ok:
        return safe_html(f"{row.task}: {row.status}")
    if row.said is not None:
        return _clean(f"{row.task}: {row.said}") or ""
    return safe_html(row.task)


# --- the map ---------------------------------------------------------------------------------


def _feature(row: _Row, class_colours: dict[str, str]) -> dict[str, Any]:
    props = {"row_id": row.row_id, "style": _style(row, class_colours), "tip": _tooltip(row), **row.popup}
    return {"type": "Feature", "geometry": row.geometry, "properties": props}


@dataclass(frozen=True)
class _Layer:
    """One entry of the layer control."""

    name: str
    """Plain text (escaped when written)."""
    task: str
    objects: bool
    """True for a layer of object rows."""
    rows: list[_Row]


def _layers(rows: list[_Row]) -> list[_Layer]:
    """Split rows into layers, in drawing order.

    Footprints per task (per task and prompt when a task had several prompts), then the object rows
    per task.
    """
    tasks = list(dict.fromkeys(r.task for r in rows))
    layers: list[_Layer] = []
    for task in tasks:
        of_task = [r for r in rows if r.task == task and not r.is_object]
        prompts = list(dict.fromkeys(r.prompt for r in of_task))
        if len(prompts) == 1:
            layers.append(_Layer(f"{task} ({len(of_task)})", task, False, of_task))
            continue
        for prompt in prompts:
            sel = [r for r in of_task if r.prompt == prompt]
            short = str(prompt) if len(str(prompt)) <= 40 else str(prompt)[:39] + "\u2026"
            layers.append(_Layer(f"{task}: {short} ({len(sel)})", task, False, sel))
    for task in tasks:
        sel = [r for r in rows if r.task == task and r.is_object]
        if sel:
            layers.append(_Layer(f"{task} objects ({len(sel)})", task, True, sel))
    return layers


def _first_shown(layers: list[_Layer]) -> int | None:
    """Index of the footprint layer on at start: the first of the most telling task."""
    ranked = [
        (_TASK_PRIORITY.index(layer.task) if layer.task in _TASK_PRIORITY else len(_TASK_PRIORITY), i)
        for i, layer in enumerate(layers)
        if not layer.objects
    ]
    return min(ranked)[1] if ranked else None


def base_map(title: str) -> folium.Map:
    """An empty self-contained map page (Leaflet inlined, OpenStreetMap as an optional online layer)."""
    fmap = folium.Map(location=None, tiles=None, zoom_start=2, control_scale=True)
    _inline_leaflet(fmap)
    fmap.get_root().title = safe_html(title)  # type: ignore[attr-defined]
    folium.TileLayer(
        tiles=_OSM_TILES, attr=_OSM_ATTRIBUTION, name="OpenStreetMap (online only)", max_zoom=19, overlay=True
    ).add_to(fmap)
    return fmap


def _build_map(rows: list[_Row], title: str) -> folium.Map:
    fmap = base_map(title)
    folium.map.CustomPane(_OBJECT_PANE, z_index=450, pointer_events=True).add_to(fmap)

    class_colours = _class_colours(rows)
    layers = _layers(rows)
    shown = _first_shown(layers)
    used_names: set[str] = set()
    for i, layer in enumerate(layers):
        name = layer.name
        while name in used_names:  # the layer control is keyed by name
            name += "\u200b"
        used_names.add(name)
        group = folium.FeatureGroup(name=safe_html(name), overlay=True, show=layer.objects or i == shown)
        data = {"type": "FeatureCollection", "features": [_feature(r, class_colours) for r in layer.rows]}
        options: dict[str, Any] = {"pane": _OBJECT_PANE} if layer.objects else {}
        folium.GeoJson(
            data,
            control=False,
            tooltip=folium.GeoJsonTooltip(fields=["tip"], labels=False, sticky=True),
            popup=folium.GeoJsonPopup(
                fields=list(_POPUP_FIELDS), aliases=list(_POPUP_ALIASES), localize=False, max_width=420,
                max_height=360,
            ),
            **options,
        ).add_to(group)
        group.add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)

    bounds = _bounds(rows)
    if bounds is not None:
        fmap.fit_bounds(bounds, padding=(20, 20))
    _add_legend(fmap, title, rows, class_colours)
    return fmap


def _bounds(rows: list[_Row]) -> list[list[float]] | None:
    """``[[south, west], [north, east]]`` of all geometries, None when there are none."""
    geoms = [shapely.geometry.shape(r.geometry) for r in rows if r.geometry is not None]
    if not geoms:
        return None
    minx, miny, maxx, maxy = shapely.total_bounds(np.asarray(geoms, dtype=object))
    return [[float(miny), float(minx)], [float(maxy), float(maxx)]]


@lru_cache(maxsize=1)
def _leaflet_assets() -> tuple[str, str]:
    """Leaflet's JS and CSS from the XStatic-Leaflet wheel, CSS images as ``data:`` URIs."""
    from xstatic.pkg import leaflet as xleaflet

    base = Path(xleaflet.BASE_DIR)
    js = (base / "leaflet.js").read_text(encoding="utf-8")
    css = (base / "leaflet.css").read_text(encoding="utf-8")

    def data_uri(match: re.Match[str]) -> str:
        png = base / match.group(1)
        return f"url(data:image/png;base64,{base64.b64encode(png.read_bytes()).decode('ascii')})"

    css = re.sub(r"url\((images/[\w.-]+\.png)\)", data_uri, css)
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.DOTALL)  # comments (one links a browser bug report)
    if "</script" in js.lower() or "</style" in css.lower():  # could not be inlined as it is
        raise RuntimeError(f"Leaflet from {base} cannot be inlined: it contains a closing tag")
    return js, css


def _inline_leaflet(fmap: folium.Map) -> None:
    """Replace folium's CDN links by Leaflet's own JS and CSS, inline (see the module docstring)."""
    fmap.default_js = []
    fmap.default_css = []
    js, css = _leaflet_assets()
    fmap.get_root().header.add_child(  # type: ignore[attr-defined]
        Element(f"<style>{css}</style>\n<script>{js}</script>\n{_PLAIN_BACKGROUND}"),
        name="leaflet_inline",
        index=0,
    )


_LEGEND_TEMPLATE = Template(
    """
{% macro html(this, kwargs) %}
<div class="rsflow-legend">
  <div class="rsflow-legend-title">{{ this.title }}</div>
  <div class="rsflow-legend-counts">{{ this.counts }}</div>
  {% for heading, items in this.sections %}
  <div class="rsflow-legend-heading">{{ heading }}</div>
  {% for colour, dashed, text in items %}
  <div class="rsflow-legend-item"><span class="rsflow-swatch{% if dashed %} rsflow-dashed{% endif %}"
    style="background: {{ colour }};"></span>{{ text }}</div>
  {% endfor %}
  {% endfor %}
  <div class="rsflow-legend-note">Basemap: OpenStreetMap, shown when online.</div>
</div>
<style>
  .rsflow-legend { position: fixed; left: 10px; bottom: 44px; z-index: 1000; max-height: 60vh;
    overflow-y: auto; max-width: 280px; background: rgba(255, 255, 255, 0.92); padding: 8px 10px;
    border-radius: 4px; box-shadow: 0 1px 5px rgba(0, 0, 0, 0.4); font: 12px/1.4 sans-serif; }
  .rsflow-legend-title { font-weight: bold; font-size: 13px; }
  .rsflow-legend-counts { color: #555; margin-bottom: 4px; }
  .rsflow-legend-heading { font-weight: bold; margin-top: 4px; }
  .rsflow-swatch { display: inline-block; width: 14px; height: 10px; margin-right: 6px;
    border: 1px solid #444; vertical-align: middle; }
  .rsflow-dashed { border-style: dashed; }
  .rsflow-legend-note { color: #777; margin-top: 4px; font-size: 11px; }
  .foliumpopup td { word-break: break-word; }
</style>
{% endmacro %}
"""
)


def _add_legend(fmap: folium.Map, title: str, rows: list[_Row], class_colours: dict[str, str]) -> None:
    """Add a static HTML legend (no script): counts and the colour keys present in the page."""
    keys = Counter(_colour_key(r) for r in rows)
    sections: list[tuple[str, list[tuple[str, bool, str]]]] = []
    if keys["yes"] or keys["no"] or any(r.task == "vqa" and r.ok for r in rows):
        answers = [(_YES, False, f"yes ({keys['yes']})"), (_NO, False, f"no ({keys['no']})"),
                   (_NEUTRAL, False, "other / unparsed")]
        sections.append(("vqa answer", answers))
    if class_colours:
        class_counts = Counter(r.said for r in rows if _colour_key(r) == "class")
        items = [(colour, False, safe_html(f"{name} ({class_counts[name]})"))
                 for name, colour in class_colours.items() if colour != _OTHER_CLASS]
        if _OTHER_CLASS in class_colours.values():
            items.append((_OTHER_CLASS, False, "other classes"))
        sections.append(("classify label", items))
    other: list[tuple[str, bool, str]] = []
    if keys["neutral"]:
        other.append((_NEUTRAL, False, "caption and other tasks"))
    if keys["object"]:
        other.append((_OBJECT, False, f"detected object ({keys['object']}, label on hover)"))
    if keys["failed"]:
        other.append((_FAILED, True, f"skipped / failed ({keys['failed']}, error in popup)"))
    if other:
        sections.append(("tiles and objects", other))
    counts = (f"{len(rows)} rows \u00b7 {_count_tiles(rows)} tiles \u00b7 {keys['object']} objects"
              if rows else "no rows")
    element = MacroElement()  # type: ignore[no-untyped-call]
    element._template = _LEGEND_TEMPLATE
    element.title = safe_html(title)  # type: ignore[attr-defined]
    element.counts = counts  # type: ignore[attr-defined]
    element.sections = sections  # type: ignore[attr-defined]
    fmap.get_root().add_child(element)


_EXTERNAL_ASSET = re.compile(r"<script[^>]*\ssrc=|<link[^>]*\shref=[\"']?https?:", re.IGNORECASE)


def _check_self_contained(page: str) -> None:
    """Fail loudly if a folium part brought back a CDN link (the page would be blank offline)."""
    m = _EXTERNAL_ASSET.search(page)
    if m:
        raise RuntimeError(f"preview page links an outside asset ({page[m.start():m.start() + 120]!r})")


# --- CLI -------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def add_preview_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``rsflow preview RESULT [-o HTML] [--title T] [--max-rows N]`` to ``subparsers``.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned (its ``parser_class`` is used).

    Returns:
        The new subparser.
    """
    p: argparse.ArgumentParser = subparsers.add_parser(
        "preview",
        help="write a self-contained HTML map of a result dataset",
        description="Draw every row of a result dataset (tile footprints coloured by answer or class, "
        "detected objects, failed tiles) on a Leaflet map in one HTML file that also opens offline.",
    )
    p.add_argument("result", metavar="RESULT", help="result directory (GeoParquet) or file")
    p.add_argument("-o", "--output", help="HTML file to write (default: RESULT.html beside a result folder, _NAME.html beside one file)")
    p.add_argument("--title", type=str, help="page title (default: 'rsflow preview: <RESULT name>'; \"\" for none)")
    p.add_argument(
        "--max-rows", type=_positive_int, default=DEFAULT_MAX_ROWS,
        help=f"refuse datasets with more rows (default {DEFAULT_MAX_ROWS})",
    )
    return p


def run_preview(args: argparse.Namespace) -> int:
    """Run ``rsflow preview`` from parsed arguments; prints one line and returns 0.

    Raises:
        RequestError: RESULT is not a readable result dataset, ``--output`` lies inside it, or the
            dataset has more than ``--max-rows`` rows (the CLI prints it and exits 2).
    """
    result = Path(args.result)
    if not result.exists():
        raise RequestError("RESULT", f"no such file or directory: {result}")
    where = result.resolve()
    if args.output:
        output = Path(args.output)
    elif result.is_dir():  # beside the folder (`rsflow preview .` wrote into it)
        output = where.parent / f"{where.name}.html"
    else:  # beside the file, named so that readers of its folder skip it (pyarrow ignores "_" and ".")
        output = where.parent / f"_{where.name}.html"
    if result.is_dir() and output.resolve().is_relative_to(where):
        raise RequestError("--output", f"{output} is inside the result directory {result}; write it outside")
    if (result.is_file() and output.resolve().parent == where.parent and not output.name.startswith(("_", "."))
            and any(where.parent.glob("*.parquet"))):
        # a dataset's folder: gpd.read_parquet(folder) then tried to read the page as Parquet and failed
        raise RequestError("--output", f"{output} would sit among the dataset's Parquet files in {where.parent}, "
                                       "which readers of that folder would then fail on; write it elsewhere or "
                                       "give it a name starting with '_'")
    try:
        summary = write_preview(result, output, title=args.title, max_rows=args.max_rows)
    except RequestError as exc:
        if exc.field == "max_rows":
            raise RequestError("--max-rows", exc.reason) from None
        raise
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:  # where it is written
        raise RequestError("--output", f"cannot write {output}: {exc.strerror or exc}") from None
    print(f"wrote {summary.rows} rows ({summary.tiles} tiles, {summary.objects} objects) to {summary.path}")
    return 0
