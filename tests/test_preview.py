"""rsflow.preview: the HTML holds exactly the dataset's rows, escapes what it shows, needs no network."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest
import shapely

from rsflow.errors import RequestError
from rsflow.preview import PreviewSummary, add_preview_parser, run_preview, write_preview

NASTY = "a ship</script><script>alert(1)</script> <img src=x onerror=alert(2)> & 'q' \x00 end"
STEP = 0.01  # tile side, degrees


def make_row(col: int, row: int, **values: Any) -> dict[str, Any]:
    """One result row on a tile of a small grid near -75.7, 37.65 (EPSG:4326)."""
    x0, y0 = -75.75 + col * STEP, 37.60 + row * STEP
    base: dict[str, Any] = {
        "tile_id": f"t-{col}-{row}",
        "item_id": "S2B_MSIL2A_20240601",
        "collection": "sentinel-2-l2a",
        "datetime": "2024-06-01T15:50:00Z",
        "task": "caption",
        "prompt": "Describe the image.",
        "text": "Fields and a road.",
        "status": "ok",
        "error": None,
        "model_id": "smoke",
        "geometry": shapely.box(x0, y0, x0 + STEP, y0 + STEP),
    }
    base.update(values)
    return base


def write_result(directory: Path, rows: list[dict[str, Any]], *, files: int = 1) -> Path:
    """Write rows as a result dataset: ``files`` GeoParquet 1.1 parts plus a ``_manifest.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
    chunk = max(1, -(-len(gdf) // files))
    for i in range(files):
        part = gdf.iloc[i * chunk:(i + 1) * chunk] if len(gdf) else gdf
        if len(part) or i == 0:
            part.to_parquet(directory / f"part-{i:03d}.parquet", index=False, schema_version="1.1.0")
    (directory / "_manifest.json").write_text(json.dumps({"status": "complete"}))
    return directory


def mixed_rows() -> list[dict[str, Any]]:
    """Caption, vqa yes/no, classify, detect with object rows, failed and skipped tiles."""
    rows: list[dict[str, Any]] = []
    classes = ["forest", "water", "urban"]
    for c in range(3):
        for r in range(3):
            rows.append(make_row(c, r, kind="tile"))
            answer = "yes" if (c + r) % 2 else "no"
            rows.append(make_row(c, r, kind="tile", task="vqa", prompt="Is there a ship?",
                                 text=f"{answer.title()}.", answer=answer))
            rows.append(make_row(c, r, kind="tile", task="classify", prompt="Classify the scene.",
                                 text=classes[c], label=classes[c]))
            rows.append(make_row(c, r, kind="tile", task="detect", prompt="Find the ships.", text="[]",
                                 object_count=1 if c == 1 else 0))
    # one object row on tile t-1-*, with its own small polygon
    for r in range(3):
        x0, y0 = -75.75 + STEP + 0.002, 37.60 + r * STEP + 0.002
        rows.append(make_row(1, r, kind="object", task="detect", prompt="Find the ships.", text=None,
                             label="ship", geometry=shapely.box(x0, y0, x0 + 0.003, y0 + 0.002)))
    rows.append(make_row(3, 0, kind="tile", task="vqa", prompt="Is there a ship?", text="Maybe",
                         answer="maybe", parse_error="not yes/no"))
    rows.append(make_row(3, 1, kind="tile", task="vqa", prompt="Is there a ship?", text=None, status="failed",
                         error="RuntimeError: CUDA out of memory"))
    rows.append(make_row(3, 2, kind="tile", task="caption", text=None, status="skipped",
                         error="nodata fraction 0.93 > 0.5"))
    rows.append(make_row(4, 0, kind="tile", text=NASTY))
    return rows


_ADD_CALL = re.compile(r"geo_json_\w+_add\((\{.*\})\);")


def features_in(page: str) -> list[dict[str, Any]]:
    """Every GeoJSON feature embedded in a preview page (folium writes one ``..._add({...});`` per layer)."""
    return [f for m in _ADD_CALL.finditer(page) for f in json.loads(m.group(1))["features"]]


def expected_ids(result: Path) -> list[str]:
    gdf = gpd.read_parquet(result)
    return [f"{t}#{i}" for i, t in enumerate(gdf["tile_id"])]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreviewSummary, str]:
    root = tmp_path_factory.mktemp("preview")
    result = write_result(root / "result", mixed_rows(), files=3)
    summary = write_preview(result, root / "map.html", title="test <map>")
    return result, summary, summary.path.read_text(encoding="utf-8")


def test_page_holds_exactly_the_rows(mixed: tuple[Path, PreviewSummary, str]) -> None:
    result, summary, page = mixed
    ids = [f["properties"]["row_id"] for f in features_in(page)]
    assert sorted(ids) == sorted(expected_ids(result))
    assert len(ids) == len(set(ids)) == summary.rows == 9 * 4 + 3 + 4
    assert summary.tiles == 9 + 4
    assert summary.objects == 3


def test_colours_layers_and_popups(mixed: tuple[Path, PreviewSummary, str]) -> None:
    _, _, page = mixed
    feats = {f["properties"]["row_id"]: f["properties"] for f in features_in(page)}
    by_tip: dict[str, set[str]] = {}
    for p in feats.values():
        by_tip.setdefault(p["tip"], set()).add(p["style"]["fillColor"])
    assert by_tip["vqa: yes"] != by_tip["vqa: no"] and len(by_tip["vqa: yes"]) == 1
    assert by_tip["vqa: maybe"] == by_tip["caption"]  # other answers: neutral
    assert len(by_tip["classify: forest"] | by_tip["classify: water"] | by_tip["classify: urban"]) == 3
    assert by_tip["vqa: failed"] == by_tip["caption: skipped"]  # grey
    failed = next(p for p in feats.values() if p["tip"] == "vqa: failed")
    assert failed["error"] == "RuntimeError: CUDA out of memory" and failed["style"]["dashArray"]
    assert by_tip["ship"]  # object rows: label as tooltip
    maybe = next(p for p in feats.values() if p["tip"] == "vqa: maybe")
    assert maybe["parse_error"] == "not yes/no" and maybe["prompt"] == "Is there a ship?"
    for name in ("vqa (", "classify (", "detect (", "caption (", "detect objects (3)"):
        assert name in page  # one layer per task, object rows in their own layer
    assert "L.control.layers(" in page
    for key in ("forest (3)", "water (3)", "urban (3)", "yes", "skipped / failed"):
        assert key in page  # legend
    assert "<title>test &lt;map&gt;</title>" in page


def test_text_is_escaped_and_cannot_inject(mixed: tuple[Path, PreviewSummary, str]) -> None:
    _, _, page = mixed
    assert page.count("alert(1)") == 1 and "<script>alert(1)" not in page
    assert "onerror=alert(2)>" not in page  # never a live tag
    assert "\x00" not in page
    nasty = next(f["properties"] for f in features_in(page) if f["properties"]["tile"] == "t-4-0")
    # shown as text: escaped for innerHTML, NUL replaced
    assert nasty["text"].startswith("a ship&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt; &lt;img")
    assert "\ufffd" in nasty["text"] and "\x00" not in nasty["text"]
    # every <script> in the page is one folium/Leaflet wrote: a text cannot add one
    scripts = re.findall(r"<script\b", page, re.IGNORECASE)
    assert len(scripts) == len(re.findall(r"</script>", page, re.IGNORECASE))


def test_page_is_self_contained(mixed: tuple[Path, PreviewSummary, str]) -> None:
    from xstatic.pkg import leaflet as xleaflet

    _, _, page = mixed
    assert not re.search(r"<script[^>]*\ssrc=", page, re.IGNORECASE)
    assert not re.search(r"<link[^>]*\shref=", page, re.IGNORECASE)
    leaflet_js = (Path(xleaflet.BASE_DIR) / "leaflet.js").read_text(encoding="utf-8")
    assert leaflet_js in page  # Leaflet itself is inlined
    rest = page.replace(leaflet_js, "")  # its own credit link and SVG namespace aside
    urls = set(re.findall(r"https?://[^\s\"'<>)\\]+", rest))
    assert urls <= {"https://tile.openstreetmap.org/{z}/{x}/{y}.png", "https://www.openstreetmap.org/copyright"}
    assert "https://tile.openstreetmap.org/{z}/{x}/{y}.png" in urls  # the basemap, for online viewers
    assert "images/layers.png" not in page and "data:image/png;base64," in page


def test_empty_dataset(tmp_path: Path) -> None:
    empty = gpd.GeoDataFrame(
        {c: [] for c in ("tile_id", "task", "prompt", "text", "status", "error")},
        geometry=gpd.GeoSeries([], crs="EPSG:4326"),
    ).astype({c: "string" for c in ("tile_id", "task", "prompt", "text", "status", "error")})
    result = tmp_path / "empty"
    result.mkdir()
    empty.to_parquet(result / "part-empty.parquet", index=False, schema_version="1.1.0")
    summary = write_preview(result, tmp_path / "out" / "empty.html")
    page = summary.path.read_text(encoding="utf-8")
    assert (summary.rows, summary.tiles, summary.objects) == (0, 0, 0)
    assert features_in(page) == [] and "no rows" in page and "L.map(" in page


def test_old_results_without_new_columns(tmp_path: Path) -> None:
    """No kind/answer/label columns: VQA answers and classes are read from the text."""
    rows = [make_row(0, 0, task="vqa", prompt="Water?", text="Yes, a lake."),
            make_row(1, 0, task="vqa", prompt="Water?", text="no"),
            make_row(2, 0, task="classify", prompt="Class?", text="forest\n")]
    result = write_result(tmp_path / "old", rows)
    summary = write_preview(result, tmp_path / "old.html")
    tips = sorted(f["properties"]["tip"] for f in features_in(summary.path.read_text(encoding="utf-8")))
    assert tips == ["classify: forest", "vqa: no", "vqa: yes"]
    assert summary.objects == 0 and summary.tiles == 3


def test_one_layer_per_prompt_when_a_task_has_several(tmp_path: Path) -> None:
    rows = [make_row(0, 0, task="vqa", prompt="Water?", answer="yes"),
            make_row(0, 0, task="vqa", prompt="Boats <b>here</b>?", answer="no"),
            make_row(1, 0, task="vqa", prompt="Water?", answer="no")]
    page = write_preview(write_result(tmp_path / "two", rows), tmp_path / "two.html").path.read_text("utf-8")
    layer_names = re.findall(r'"(vqa: [^"]*)" : feature_group_', page)
    # HTML-escaped (Leaflet's layer control sets innerHTML), then JSON-escaped by folium
    assert layer_names == [
        "vqa: Water? (2)", "vqa: Boats \\u0026lt;b\\u0026gt;here\\u0026lt;/b\\u0026gt;? (1)"
    ]
    assert len(features_in(page)) == 3


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="^RESULT: no such file"):
        write_preview(tmp_path / "missing", tmp_path / "a.html")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "_manifest.json").write_text("{}")
    with pytest.raises(RequestError, match="^RESULT: no GeoParquet"):
        write_preview(tmp_path / "nothing", tmp_path / "a.html")
    result = write_result(tmp_path / "r", [make_row(0, 0), make_row(1, 0), make_row(2, 0)])
    with pytest.raises(RequestError, match="^max_rows: .* has 3 rows, more than max_rows=2"):
        write_preview(result, tmp_path / "a.html", max_rows=2)
    assert not (tmp_path / "a.html").exists()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rsflow")
    add_preview_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_functions(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    result = write_result(tmp_path / "run", [make_row(0, 0), make_row(1, 0, task="vqa", answer="yes")])
    assert run_preview(_parse(["preview", str(result), "-o", str(tmp_path / "map.html")])) == 0
    assert "wrote 2 rows (2 tiles, 0 objects)" in capsys.readouterr().out
    assert run_preview(_parse(["preview", str(result)])) == 0  # default: RESULT.html beside it
    assert (tmp_path / "run.html").exists()
    with pytest.raises(RequestError, match="^RESULT: no such file"):
        run_preview(_parse(["preview", str(tmp_path / "nope")]))
    with pytest.raises(RequestError, match="^--output: .* inside the result"):
        run_preview(_parse(["preview", str(result), "-o", str(result / "map.html")]))
    with pytest.raises(RequestError, match="^--max-rows: "):
        run_preview(_parse(["preview", str(result), "--max-rows", "1"]))
    # one file of a dataset: the page went beside it as part-000.parquet.html, and every reader of the
    # folder then failed on it ("Parquet magic bytes not found"); now "_"-named, which readers skip
    part = result / "part-000.parquet"
    assert run_preview(_parse(["preview", str(part)])) == 0
    assert (result / "_part-000.parquet.html").exists() and len(gpd.read_parquet(result)) == 2
    with pytest.raises(RequestError, match="^--output: .* among the dataset's Parquet files"):
        run_preview(_parse(["preview", str(part), "-o", str(result / "part.html")]))
    # `rsflow preview .` inside a result: the page goes beside the folder, not into it
    monkeypatch.chdir(result)
    assert run_preview(_parse(["preview", "."])) == 0 and (tmp_path / "run.html").exists()


def test_jinja_syntax_in_answers_ids_and_titles_is_shown_never_run(tmp_path: Path) -> None:
    """branca compiles each rendered part of a folium page again as a Jinja template: a model's answer or a
    STAC item id holding ``{{ ... }}`` ran as code on the driver, ``{#`` failed the run after every tile was
    inferred, and ``{{ship}}`` vanished from a caption. Now every ``{`` from the data is ``&#123;``."""
    marker = tmp_path / "ran"
    payload = f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}"
    rows = [make_row(0, 0, kind="tile", text="{{7*7}} ships and {{ship}}"),
            make_row(1, 0, kind="tile", text=payload),
            make_row(2, 0, kind="tile", tile_id="t-{# open comment", text="a {% if %} b"),
            make_row(0, 1, kind="tile", task="classify", prompt="Classify.", text="{{x}}", label="{{x}}")]
    result = write_result(tmp_path / "result", rows)
    page = write_preview(result, tmp_path / "map.html", title="T{{7*7}}").path.read_text(encoding="utf-8")
    assert not marker.exists()  # the payload was not run
    texts = {f["properties"]["tile"]: f["properties"]["text"] for f in features_in(page)}
    assert texts["t-0-0"] == "&#123;&#123;7*7}} ships and &#123;&#123;ship}}"
    assert texts["t-&#123;# open comment"] == "a &#123;% if %} b"
    assert "T&#123;&#123;7*7}}" in page and "T49" not in page and "49 ships" not in page
    assert "{{" not in page and "{%" not in page and "{#" not in page


def test_the_monitor_report_shows_jinja_syntax_as_text() -> None:
    """The monitor's report page is built the same way (folium, branca): a title or summary value with
    Jinja syntax is shown, never compiled."""
    import pandas as pd

    from rsflow.monitor.report import build_report

    page = build_report(title="port {{7*7}}", changes=pd.DataFrame({"change": [], "cell_id": []}), timelines={},
                        summary={"note": "{% if x %}{# c"})
    assert "port &#123;&#123;7*7}}" in page and "port 49" not in page
    assert "&#123;% if x %}&#123;# c" in page and "{{" not in page and "{%" not in page


def test_a_result_across_the_antimeridian_opens_on_it_in_one_piece(tmp_path: Path) -> None:
    """Tiles split at 180 degrees (as the output writes them) made the page open on the whole world, each
    tile's halves drawn at its two edges; western longitudes now continue past 180."""
    split = shapely.MultiPolygon([shapely.box(179.99, -17.0, 180.0, -16.99), shapely.box(-180.0, -17.0, -179.99, -16.99)])
    rows = [make_row(0, 0, geometry=split), make_row(1, 0, geometry=shapely.box(-179.99, -17.0, -179.98, -16.99)),
            make_row(2, 0, geometry=shapely.box(179.98, -17.0, 179.99, -16.99))]
    page = write_preview(write_result(tmp_path / "result", rows), tmp_path / "map.html").path.read_text(encoding="utf-8")
    (south, west), (north, east) = json.loads(re.search(r"map_\w+\.fitBounds\(\s*(\[\[.*?\]\])", page, re.DOTALL).group(1))
    assert 179.97 < west < east < 180.03 and south == -17.0 and north == -16.99
    xs = [x for f in features_in(page) for x, _ in shapely.get_coordinates(shapely.geometry.shape(f["geometry"]))]
    assert min(xs) >= 179.98 and max(xs) <= 180.02
