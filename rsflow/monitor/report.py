"""The change report: one self-contained HTML page with a map and a timeline per tile.

Built with folium exactly as :mod:`rsflow.preview` builds its map (Leaflet inlined from the
XStatic-Leaflet wheel, so the page opens offline; OpenStreetMap under it when online):

- every cell observed on two or more dates is drawn with its footprint: red where something changed,
  grey-blue where nothing did; its popup is the cell's timeline, one row per date and one column per
  prompt, changed values highlighted;
- objects that appeared (green) or vanished (dashed red) are drawn with their label;
- a panel lists the counts per kind of change and, for each changed tile, its timeline again.

Every value shown is HTML-escaped (model text can hold markup).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import folium
import pandas as pd
from branca.element import Element
from shapely.geometry import mapping

from rsflow.monitor.changes import Timeline
from rsflow.preview import _check_self_contained, base_map, safe_html

logger = logging.getLogger(__name__)

_CHANGED = "#d73027"
_UNCHANGED = "#5b7a99"
_APPEARED = "#1a9850"
_MAX_VALUE_CHARS = 80
_MAX_PANEL_TILES = 200


def _short(value: str) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= _MAX_VALUE_CHARS else value[: _MAX_VALUE_CHARS - 1] + "\u2026"


def timeline_table(timeline: Timeline) -> str:
    """The timeline of one cell as an HTML table (values escaped)."""
    head = "".join(
        f"<th>{safe_html(task)}: {safe_html(_short(key))}</th>" for task, key in timeline.columns
    )
    body = []
    for when, item in timeline.dates:
        cells = []
        for column in timeline.columns:
            value = timeline.values.get((item, column))
            mark = (item, column) in timeline.changed
            text = "\u2013" if value is None else safe_html(_short(value))
            style = f' style="background:{_CHANGED};color:#fff;font-weight:bold"' if mark else ""
            cells.append(f"<td{style}>{text}</td>")
        body.append(f"<tr><td>{when:%Y-%m-%d %H:%M}</td><td>{safe_html(item)}</td>{''.join(cells)}</tr>")
    return (
        '<table class="rsflow-timeline"><tr><th>date (UTC)</th><th>item</th>'
        + head
        + "</tr>"
        + "".join(body)
        + "</table>"
    )


def build_report(
    *, title: str, changes: pd.DataFrame, timelines: dict[str, Timeline], summary: dict[str, Any]
) -> str:
    """The report page as one HTML string (self-contained: no outside script or stylesheet)."""
    fmap = base_map(title)
    changed_cells = set(changes["cell_id"]) if len(changes) else set()
    tiles_group = folium.FeatureGroup(name="tiles (click for the timeline)", show=True)
    features = []
    for cell, tl in timelines.items():
        if tl.geometry is None:
            continue
        changed = cell in changed_cells
        features.append(
            {
                "type": "Feature",
                "geometry": mapping(tl.geometry),
                "properties": {
                    "cell": safe_html(cell),
                    "changed": changed,
                    "popup": timeline_table(tl),
                    "tip": safe_html(f"tile {cell}: {'changed' if changed else 'no change'}"),
                },
            }
        )
    if features:
        folium.GeoJson(
            {"type": "FeatureCollection", "features": features},
            style_function=lambda f: {
                "color": _CHANGED if f["properties"]["changed"] else _UNCHANGED,
                "weight": 2,
                "fillOpacity": 0.35 if f["properties"]["changed"] else 0.1,
            },
            tooltip=folium.GeoJsonTooltip(fields=["tip"], labels=False),
            popup=folium.GeoJsonPopup(fields=["popup"], labels=False, max_width=640),
        ).add_to(tiles_group)
    tiles_group.add_to(fmap)

    objects = (
        changes[changes["change"].isin(["object_appeared", "object_vanished"])] if len(changes) else changes
    )
    if len(objects):
        group = folium.FeatureGroup(name="objects appeared / vanished", show=True)
        feats = [
            {
                "type": "Feature",
                "geometry": mapping(r.geometry),
                "properties": {
                    "kind": r.change,
                    "tip": safe_html(
                        f"{r.change}: {r.label} "
                        f"({r.before_datetime:%Y-%m-%d} \u2192 "
                        f"{r.after_datetime:%Y-%m-%d})"
                    ),
                },
            }
            for r in objects.itertuples(index=False)
            if r.geometry is not None
        ]
        folium.GeoJson(
            {"type": "FeatureCollection", "features": feats},
            style_function=lambda f: {
                "color": _APPEARED if f["properties"]["kind"] == "object_appeared" else _CHANGED,
                "weight": 2,
                "dashArray": None if f["properties"]["kind"] == "object_appeared" else "5,5",
            },
            tooltip=folium.GeoJsonTooltip(fields=["tip"], labels=False),
        ).add_to(group)
        group.add_to(fmap)
    folium.LayerControl(collapsed=True).add_to(fmap)
    bounds = [tl.geometry.bounds for tl in timelines.values() if tl.geometry is not None]
    if bounds:
        fmap.fit_bounds(
            [
                [min(b[1] for b in bounds), min(b[0] for b in bounds)],
                [max(b[3] for b in bounds), max(b[2] for b in bounds)],
            ],
            padding=(20, 20),
        )
    fmap.get_root().html.add_child(Element(_panel(title, changes, timelines, summary)))  # type: ignore[attr-defined]
    page = fmap.get_root().render()
    _check_self_contained(page)
    return page


def _panel(title: str, changes: pd.DataFrame, timelines: dict[str, Timeline], summary: dict[str, Any]) -> str:
    counts = Counter(changes["change"]) if len(changes) else Counter()
    lines = (
        "".join(f"<li>{safe_html(kind)}: {n}</li>" for kind, n in sorted(counts.items())) or "<li>none</li>"
    )
    facts = "".join(f"<div>{safe_html(str(k))}: {safe_html(str(v))}</div>" for k, v in summary.items())
    changed_cells = sorted(set(changes["cell_id"])) if len(changes) else []
    sections = []
    for cell in changed_cells[:_MAX_PANEL_TILES]:
        tl = timelines.get(cell)
        if tl is not None:
            sections.append(f"<h4>tile {safe_html(cell)}</h4>{timeline_table(tl)}")
    more = (
        f"<p>{len(changed_cells) - _MAX_PANEL_TILES} more changed tiles: see the changes GeoParquet.</p>"
        if len(changed_cells) > _MAX_PANEL_TILES
        else ""
    )
    return f"""
<div class="rsflow-report">
  <h3>{safe_html(title)}</h3>
  {facts}
  <div><b>changes</b><ul>{lines}</ul></div>
  <div><b>{len(changed_cells)} changed tiles</b> of {len(timelines)} seen on two or more dates</div>
  {"".join(sections)}{more}
</div>
<style>
  .rsflow-report {{ position: fixed; left: 54px; top: 10px; z-index: 1000; max-height: 90vh; max-width: 44vw;
    overflow: auto; background: rgba(255,255,255,0.95); padding: 8px 12px; border-radius: 4px;
    box-shadow: 0 1px 5px rgba(0,0,0,0.4); font: 12px/1.4 sans-serif; }}
  .rsflow-report h3 {{ margin: 0 0 4px 0; font-size: 14px; }}
  .rsflow-report h4 {{ margin: 8px 0 2px 0; font-size: 12px; }}
  .rsflow-timeline {{ border-collapse: collapse; font: 11px/1.3 sans-serif; }}
  .rsflow-timeline td, .rsflow-timeline th {{ border: 1px solid #bbb; padding: 1px 4px; text-align: left; }}
</style>
"""
