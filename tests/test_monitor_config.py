"""Monitor parts without Ray: config checks, schedule, ledger, lock, atomic store, change rules.

Bad configs fail before any work with one line naming the key (through the real CLI, exit code 2).
The lock is exercised on a real local directory and on fsspec's in-memory object store.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import shapely
import yaml
from shapely.geometry import box

from rsflow.cli import main
from rsflow.errors import RequestError
from rsflow.monitor import store
from rsflow.monitor.changes import cell_id, detect_changes
from rsflow.monitor.config import ChangeRules, parse_monitor_config
from rsflow.monitor.ledger import ItemRecord, Ledger, advance_watermark, load_ledger, save_ledger
from rsflow.monitor.lock import LockLost, MonitorLock, MonitorLocked, read_lock
from rsflow.monitor.run import run_monitor
from rsflow.monitor.schedule import parse_cron, parse_duration
from rsflow.monitor.webhook import sign

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **changes) -> dict:
    doc = {
        "name": "harbour",
        "aoi": {"bbox": [-75.70, 37.650, -75.695, 37.652]},
        "stac": "sample",
        "tasks": {"questions": ["Is there water in this image?"]},
        "model": {"model": "smoke", "max_new_tokens": 4},
        "output": str(tmp_path / "out"),
        "lookback": "5d",
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_good_config_parses(tmp_path):
    cfg = parse_monitor_config(
        _config(tmp_path, schedule="0 6 * * *", retry={"max_attempts": 2}), base_dir=tmp_path
    )
    assert cfg.name == "harbour" and cfg.output == str(tmp_path / "out")
    assert cfg.request.tasks == ("vqa",) and cfg.request.inputs.questions == (
        "Is there water in this image?",
    )
    assert cfg.lookback == timedelta(days=5) and cfg.max_attempts == 2
    assert cfg.schedule is not None and cfg.schedule.expression == "0 6 * * *"


def test_the_shipped_example_is_valid_apart_from_its_placeholders(tmp_path, monkeypatch):
    """monitors/port.yaml: every key checks out once its model and bucket are made local."""
    doc = yaml.safe_load((REPO / "monitors" / "port.yaml").read_text())
    doc["output"] = str(tmp_path / "port")
    doc["model"]["model"] = "smoke"
    monkeypatch.setenv(doc["webhook"]["secret_env"], "x")
    cfg = parse_monitor_config(doc, base_dir=REPO / "monitors")
    assert cfg.name == "port" and cfg.schedule.expression == "0 6 * * *"
    assert set(cfg.request.tasks) == {"vqa", "classify", "detect"}


BAD = [
    ({"colections": ["x"]}, "colections", "did you mean 'collections'"),
    ({"tile": {"size": 64}}, "tile.size", "unknown key"),
    ({"tasks": None}, "tasks", "required"),
    ({"tasks": {}}, "tasks", "no task"),
    ({"tasks": {"questions": []}}, "tasks.questions", "at least one"),
    ({"tasks": {"questons": ["x"]}}, "tasks", "unknown key 'questons'"),
    ({"lookback": "120d"}, "lookback", "longer than the limit of 90d"),
    ({"lookback": 5}, "lookback", "duration"),
    ({"output": "/dev/null/monitor"}, "output", "is a file"),
    ({"output": "/"}, "output", "is a filesystem root or no path"),  # it became the config file's own folder
    ({"output": "s3://"}, "output", "is a filesystem root or no path"),  # it became a local folder "s3:"
    ({"output": "file:///"}, "output", "is a filesystem root or no path"),
    ({"output": "nosuchproto://bucket/monitor"}, "output", "cannot write to nosuchproto://"),
    ({"name": "Harbour Watch"}, "name", "lower-case"),
    ({"aoi": {"bbox": [1, 2, 3]}}, "aoi.bbox", "four numbers"),
    ({"aoi": {"bbox": [-75.6, 37.7, -75.7, 37.6]}}, "aoi.bbox", "miny"),
    ({"max_cloud": 150}, "max_cloud", "percentage"),
    ({"tile": {"size_px": 4}}, "tile.size_px", "between 8"),
    ({"model": {"model": "/no/such/model", "max_new_tokens": 0}}, "model.max_new_tokens", ""),
    # found when the model is resolved or the catalog searched: still nothing written into the new root
    ({"model": {"model": "/no/such/model"}}, "model.model", "no such folder"),
    ({"collections": ["nope"]}, "collections", "has no collection 'nope'"),
    # what the pipeline checks against the model, checked before the lock: found inside the run, each run
    # counted an attempt against every pending scene, and after three they were given up for good
    ({"tasks": {"detect": ["ship"]}}, "tasks", "needs a model of the geochat family"),
    ({"tile": {"overlap_px": 100}}, "tile.overlap_px", ""),
    ({"model": {"model": "smoke", "image_size": 336}}, "model.image_size", "does not match the vision tower"),
    ({"collections": []}, "collections", "names no collection"),
    ({"schedule": "0 25 * * *"}, "schedule", "0-23"),
    ({"start": "yesterday"}, "start", "date"),
    ({"retry": {"max_attempts": 0}}, "retry.max_attempts", "between 1"),
    ({"lock": {"expiry": "2s"}}, "lock.expiry", "between"),
    ({"lock": {"max_hold": "10m"}}, "lock.max_hold", "longer than lock.expiry (30m)"),
    # more than timedelta holds: an OverflowError traceback, exit 1
    ({"lookback": "99999999999w"}, "lookback", "far too long"),
    ({"lock": {"expiry": "9999999999999d"}}, "lock.expiry", "far too long"),
    ({"lock": {"max_hold": "9999999999999d"}}, "lock.max_hold", "far too long"),
    ({"max_tiles": 0}, "max_tiles", "between 1"),
    ({"change": {"object_iou": 2}}, "change.object_iou", "IoU"),
    # a value that is there but false or empty is not an absent key
    ({"tile": 0}, "tile", "must be a mapping"),
    ({"retry": []}, "retry", "must be a mapping"),
    ({"change": False}, "change", "must be a mapping"),
    ({"lock": ""}, "lock", "must be a mapping"),
    # .nan and .inf pass every comparison by failing it: a NaN threshold turned every count_changed off
    ({"change": {"min_count_change": float("nan")}}, "change.min_count_change", "finite"),
    ({"change": {"min_count_change": float("inf")}}, "change.min_count_change", "finite"),
    ({"change": {"object_iou": float("nan")}}, "change.object_iou", "finite"),
    ({"max_cloud": float("nan")}, "max_cloud", "finite"),
    ({"max_cloud": 10**400}, "max_cloud", "finite"),  # too large for a float: an OverflowError traceback
    ({"webhook": {"url": "ftp://x"}}, "webhook.url", "http"),
    # URLs the POST would fail on, weeks later when changes are first found: refused when the file is read
    ({"webhook": {"url": "http://"}}, "webhook.url", "names no host"),
    ({"webhook": {"url": "http://127.0.0.1:99999/hook"}}, "webhook.url", "Port out of range"),
    ({"webhook": {"url": "http://127.0.0.1:8080/my hook"}}, "webhook.url", "spaces"),
    ({"webhook": {"url": "http://127.0.0.1:80x/hook"}}, "webhook.url", "not a valid URL"),
    ({"webhook": {"url": "https://user:pw@127.0.0.1/hook"}}, "webhook.url", "must not hold credentials"),
    ({"webhook": {"url": "https://token@127.0.0.1/hook"}}, "webhook.url", "must not hold credentials"),
    (
        {"webhook": {"url": "http://127.0.0.1:9/h", "secret_env": "s3cr3t value"}},
        "webhook.secret_env",
        "NAME",
    ),
    (
        {"webhook": {"url": "http://127.0.0.1:9/h", "secret_env": "RSFLOW_TEST_UNSET_SECRET"}},
        "webhook.secret_env",
        "not set",
    ),
]


@pytest.mark.parametrize(
    ("changes", "key", "reason"), BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)]
)
def test_bad_config_fails_before_any_work_with_one_line_naming_the_key(
    changes, key, reason, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("RSFLOW_TEST_UNSET_SECRET", raising=False)
    path = _write(tmp_path, _config(tmp_path, **changes))
    assert main(["monitor", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"rsflow monitor: error: {key}: "), err
    assert reason in err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_an_output_root_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        path = _write(tmp_path, _config(tmp_path, output=str(locked / "monitor")))
        assert main(["monitor", "run", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rsflow monitor: error: output: ") and err.count("\n") == 1
    finally:
        locked.chmod(0o700)


def test_an_unreachable_object_store_is_refused_before_any_work(tmp_path, capsys):
    """A store that does not answer (an FTP URL on a closed loopback port) fails at the probe that
    opens every run, before the lock, the ledger or any search."""
    from tests.stac_fixtures import free_port

    path = _write(tmp_path, _config(tmp_path, output=f"ftp://127.0.0.1:{free_port()}/monitors/harbour"))
    assert main(["monitor", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("rsflow monitor: error: output: cannot write to ftp://127.0.0.1:")
        and err.count("\n") == 1
    )


def test_monitor_names_resolve_in_the_monitors_folder(tmp_path, capsys):
    folder = tmp_path / "monitors"
    folder.mkdir()
    (folder / "harbour.yaml").write_text(yaml.safe_dump(_config(tmp_path)))
    assert main(["monitor", "status", "harbour", "--monitors-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "last run:   never" in out and "watermark:  none" in out and "lock:       free" in out
    assert main(["monitor", "status", "nosuch", "--monitors-dir", str(folder)]) == 2
    assert "NAME: no monitor file" in capsys.readouterr().err


# --- schedule and durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("0 6 * * *", "2024-05-01T06:00", "2024-05-02T06:00"),
        ("0 6 * * *", "2024-05-01T05:59", "2024-05-01T06:00"),
        ("*/15 * * * 1-5", "2024-05-04T23:50", "2024-05-06T00:00"),  # Saturday night -> Monday
        ("30 2 1 * 0", "2024-05-01T03:00", "2024-05-05T02:30"),  # day 1 OR Sunday, as cron does
        ("0 0 29 2 *", "2024-03-01T00:00", "2028-02-29T00:00"),
    ],
)
def test_next_due_follows_cron(expr, after, expected):
    t = datetime.fromisoformat(after).replace(tzinfo=UTC)
    assert parse_cron(expr).next_after(t) == datetime.fromisoformat(expected).replace(tzinfo=UTC)


@pytest.mark.parametrize("expr", ["0 6 * *", "61 * * * *", "0 0 31 2 *", "a b c d e", "*/0 * * * *"])
def test_bad_cron_is_refused(expr):
    with pytest.raises(RequestError, match="schedule"):
        parse_cron(expr)


def test_durations():
    assert parse_duration("90s", "x") == timedelta(seconds=90)
    assert parse_duration("2w", "x") == timedelta(days=14)
    for bad in ("5", "5 days", "-1d", 5):
        with pytest.raises(RequestError, match="x: give a duration"):
            parse_duration(bad, "x")


# --- store, ledger, lock -----------------------------------------------------------------------------


@pytest.mark.parametrize("root", ["local", "memory://rsflow-test-store"])
def test_atomic_writes_leave_no_temporary_and_replace_whole(root, tmp_path):
    root = str(tmp_path) if root == "local" else root
    url = store.join(root, "_monitor", "x.json")
    store.write_json_atomic(url, {"a": 1})
    store.write_json_atomic(url, {"a": 2})
    assert store.read_json(url) == {"a": 2}
    assert store.list_files(store.join(root, "_monitor")) == ["x.json"]
    store.remove(store.join(root, "_monitor"), recursive=True)


def test_a_write_that_dies_leaves_the_old_file(tmp_path, monkeypatch):
    url = str(tmp_path / "ledger.json")
    store.write_json_atomic(url, {"v": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write_json_atomic(url, {"v": 2})
    monkeypatch.undo()
    assert json.loads(Path(url).read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_result_files_are_hidden_until_committed_and_a_kill_between_commit_and_rename_is_rolled_forward(tmp_path):
    """write_partitions writes a hidden pending file, which readers of OUTPUT/results skip; the ledger's
    commit lists the final name, publish_partitions renames it, and a run killed between the two has the
    rename finished by the next run's cleanup, while an uncommitted pending file is deleted."""
    import geopandas as gpd
    import shapely

    from rsflow.monitor.ledger import RunRecord
    from rsflow.monitor.run import publish_partitions, remove_leftovers, write_partitions
    from rsflow.output import WRITTEN_SCHEMA

    row = {name: None for name in WRITTEN_SCHEMA.names}
    row.update(tile_id="t", item_id="i", kind="tile", task="vqa", prompt="q", prompt_key="q", status="ok",
               datetime=datetime(2024, 5, 1, tzinfo=UTC), geometry=shapely.to_wkb(shapely.box(0, 0, 1, 1)))
    table = pa.Table.from_pylist([row], schema=WRITTEN_SCHEMA)
    root = str(tmp_path)
    files = write_partitions(root, "r1", table)
    assert files == ["results/date=2024-05-01/part-r1.parquet"]
    assert [p.name for p in (tmp_path / "results" / "date=2024-05-01").iterdir()] == [".part-r1.parquet.pending"]
    assert not (tmp_path / "results" / "date=2024-05-01" / "part-r1.parquet").exists()
    write_partitions(root, "r2", table)  # a run that will never commit
    ledger = Ledger(monitor="harbour", runs=[RunRecord(
        run_id="r1", started="s", finished="f", items_done=["i"], items_failed=[], items_given_up=[],
        files=files, request_fingerprint="x")])
    removed = remove_leftovers(root, ledger)  # the commit happened, the rename did not: finished here
    assert removed == ["results/date=2024-05-01/.part-r2.parquet.pending"]
    assert [p.name for p in (tmp_path / "results" / "date=2024-05-01").iterdir()] == ["part-r1.parquet"]
    assert len(gpd.read_parquet(tmp_path / "results")) == 1
    publish_partitions(root, files)  # a second rename finds nothing to move
    assert [p.name for p in (tmp_path / "results" / "date=2024-05-01").iterdir()] == ["part-r1.parquet"]


def test_status_shows_the_items_of_the_run_holding_the_lock_as_in_progress(tmp_path, monkeypatch):
    """A run counts its items' attempts before the pipeline runs, so until it commits the ledger has them
    failed by a run that did not finish: status said so of a live run's items; it says running now."""
    import rsflow.monitor.lock as lock_module
    from rsflow.monitor.run import INTERRUPTED, format_status, monitor_status

    monkeypatch.setattr(lock_module, "_SETTLE_SECONDS", 0.01)
    cfg = parse_monitor_config(_config(tmp_path), base_dir=tmp_path)
    ledger = Ledger(monitor=cfg.name)
    for item_id, run in (("a", "run-now"), ("b", "run-before")):
        ledger.items[item_id] = ItemRecord(id=item_id, collection="c", datetime="2024-05-01T10:00:00Z",
                                           state="failed", attempts=1, run_id=run, error=INTERRUPTED)
    save_ledger(cfg.output, ledger)
    lock = MonitorLock(cfg.output, cfg.name, "run-now", timedelta(minutes=5), heartbeat=False)
    lock.acquire()
    status = monitor_status(cfg)
    assert [r.id for r in status.in_progress] == ["a"] and [r.id for r in status.failed] == ["b"]
    assert status.counts["failed"] == 1 and status.counts["in_progress"] == 1
    text = format_status(status)
    assert "1 failed (to retry), 0 given up, 1 in progress" in text and "running   a (attempt 1, run run-now" in text
    lock.release()
    status = monitor_status(cfg)  # no live holder: a run that did not finish
    assert [r.id for r in status.failed] == ["a", "b"] and not status.in_progress


def test_ledger_round_trip_and_watermark(tmp_path):
    ledger = Ledger(monitor="harbour")
    ledger.items["a"] = ItemRecord(
        id="a", collection="c", datetime="2024-05-01T10:00:00Z", state="done", attempts=1, run_id="r1"
    )
    ledger.items["b"] = ItemRecord(
        id="b",
        collection="c",
        datetime="2024-05-09T10:00:00Z",
        state="failed",
        attempts=1,
        run_id="r1",
        error="boom",
    )
    advance_watermark(ledger)
    assert ledger.watermark == "2024-05-01T10:00:00Z"  # a failed item does not move it
    ledger.items["b"].state = "given_up"
    advance_watermark(ledger)
    assert ledger.watermark == "2024-05-09T10:00:00Z"
    save_ledger(str(tmp_path), ledger)
    again = load_ledger(str(tmp_path), "harbour")
    assert again.to_json() == ledger.to_json() and again.counts() == {"done": 1, "failed": 0, "given_up": 1}
    with pytest.raises(ValueError, match="harbour"):
        load_ledger(str(tmp_path), "other")


@pytest.mark.parametrize("root", ["local", "memory://rsflow-test-lock"])
def test_a_held_lock_refuses_a_second_run_and_an_expired_one_is_taken_over(root, tmp_path, monkeypatch):
    import rsflow.monitor.lock as lock_module

    monkeypatch.setattr(lock_module, "_SETTLE_SECONDS", 0.01)
    root = str(tmp_path) if root == "local" else root
    first = MonitorLock(root, "harbour", "run-1", timedelta(minutes=5), heartbeat=False)
    first.acquire()
    with pytest.raises(MonitorLocked, match="locked by run run-1") as exc:
        MonitorLock(root, "harbour", "run-2", timedelta(minutes=5), heartbeat=False).acquire()
    assert "\n" not in str(exc.value)
    first.check()
    # renewals failing: a lock held with seconds left is too close to commit on (the margin: a sixth of expiry)
    held = read_lock(root)
    store.write_json_atomic(lock_module.lock_path(root),
                            {**held.to_json(), "expires": (datetime.now(UTC) + timedelta(seconds=20)).isoformat()})
    with pytest.raises(LockLost, match=r"expires in (19|20) s \(renewals failing, or lock.max_hold reached\)"):
        first.check()
    store.write_json_atomic(lock_module.lock_path(root), held.to_json())

    # run-1 is killed: its lock is no longer renewed and expires
    stale = read_lock(root)
    expired = {**stale.to_json(), "expires": (datetime.now(UTC) - timedelta(seconds=1)).isoformat()}
    store.write_json_atomic(lock_module.lock_path(root), expired)
    second = MonitorLock(root, "harbour", "run-2", timedelta(minutes=5), heartbeat=False)
    second.acquire()
    assert second.took_over is not None and second.took_over.run_id == "run-1"
    assert read_lock(root).run_id == "run-2"
    with pytest.raises(LockLost):
        first.check()  # the killed run, were it to wake up, must not commit
    first.release()  # and does not remove the new holder's lock
    assert read_lock(root).run_id == "run-2"
    second.release()
    assert read_lock(root) is None
    store.remove(store.join(root, "_monitor"), recursive=True)


def test_a_run_holding_the_lock_past_max_hold_stops_renewing_it_so_a_hung_run_is_taken_over(tmp_path):
    """The heartbeat renewed a hung run's lock for as long as its driver lived, and every scheduled run after
    it exited 3. Past lock.max_hold it stops: the lock expires, and the hung run can no longer commit."""
    root = str(tmp_path)
    hung = MonitorLock(root, "harbour", "run-1", timedelta(seconds=2), max_hold=timedelta(seconds=0.5))
    alive = MonitorLock(str(tmp_path / "other"), "harbour", "run-2", timedelta(seconds=2))  # no max_hold
    hung.acquire()
    alive.acquire()
    try:
        time.sleep(3.5)
        assert read_lock(root).expired(datetime.now(UTC))
        with pytest.raises(LockLost):
            hung.check()
        alive.check()  # renewed all along
    finally:
        hung.release()
        alive.release()


def test_the_heartbeat_keeps_a_live_lock_from_expiring(tmp_path):
    lock = MonitorLock(str(tmp_path), "harbour", "run-1", timedelta(seconds=3))
    with lock:
        first = read_lock(str(tmp_path)).expires
        import time

        time.sleep(2.5)
        assert read_lock(str(tmp_path)).expires > first
        lock.check()
    assert read_lock(str(tmp_path)) is None


def test_webhook_signature_is_hmac_sha256_of_the_body():
    import hashlib
    import hmac

    body = b'{"changes": 2}'
    assert sign(body, "k") == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()


def test_a_webhook_behind_a_redirect_is_not_counted_as_delivered():
    """urllib would follow a 302 with a GET without the body, which the receiver answers 200: the summary
    never arrives, and the run must not mark it delivered. The redirect is named instead."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rsflow.monitor.config import WebhookConfig
    from rsflow.monitor.webhook import send_webhook

    seen = []

    class Redirecting(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(("POST", self.path))
            self.send_response(302)
            self.send_header("Location", "/moved")
            self.end_headers()

        def do_GET(self):
            seen.append(("GET", self.path))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        result = send_webhook(WebhookConfig(url=url), {"changes": 1}, backoff_seconds=0.0)
    finally:
        server.shutdown()
    assert not result.delivered and result.status == 302 and "redirect to" in result.error
    assert seen == [("POST", "/hook")]


def test_a_webhook_that_cannot_be_delivered_is_a_failed_result_never_an_exception(monkeypatch):
    """send_webhook runs after the run's commit: anything it raised failed a committed run, and every later
    run that owed the same changes. A receiver that answers something that is not HTTP (BadStatusLine), URLs
    urllib refuses (a space, a port out of range or not a number) and any other error are failed results."""
    import socket
    import threading
    import urllib.request

    from rsflow.monitor.config import WebhookConfig
    from rsflow.monitor.webhook import send_webhook

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def answer_garbage():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"garbage\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        results = {
            url: send_webhook(WebhookConfig(url=url, timeout_seconds=5), {"changes": 1}, backoff_seconds=0.0)
            for url in (
                f"http://127.0.0.1:{port}/hook",
                f"http://127.0.0.1:{port}/my hook",
                "http://127.0.0.1:99999/hook",
                "http://127.0.0.1:80x/hook",
            )
        }
    finally:
        listener.close()
    assert all(not r.delivered and r.status is None and r.error for r in results.values()), results
    assert results[f"http://127.0.0.1:{port}/hook"].error.startswith("BadStatusLine")
    assert results[f"http://127.0.0.1:{port}/my hook"].error.startswith("InvalidURL")
    assert "my hook" not in results[f"http://127.0.0.1:{port}/my hook"].error  # urllib quotes the path

    def broken(*args, **kwargs):
        raise RuntimeError("a bug somewhere below urllib")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", broken)
    result = send_webhook(WebhookConfig(url="http://127.0.0.1:9/hook"), {"changes": 1}, backoff_seconds=0.0)
    assert not result.delivered and result.error == "RuntimeError: a bug somewhere below urllib"


def test_a_webhook_url_is_recorded_and_logged_with_its_scheme_and_host_only(tmp_path, caplog, monkeypatch):
    """Slack, Discord and Zapier hook URLs carry their token in the path: run records (config.summary(), under
    an output root that is often a shared bucket), log lines and delivery errors show the scheme and host,
    and a short hash of the rest that tells two hooks apart, never the path or the query."""
    import logging

    from rsflow.monitor.config import WebhookConfig
    from rsflow.monitor.webhook import send_webhook

    monkeypatch.setenv("RSFLOW_TEST_HOOK_SECRET", "x")
    urls = ["https://hooks.example.com/api/webhooks/1234/SECRETTOKEN?thread=OTHERTOKEN",
            "https://hooks.example.com/api/webhooks/1234/ANOTHERTOKEN"]
    shown = []
    for url in urls:
        doc = _config(tmp_path, webhook={"url": url, "secret_env": "RSFLOW_TEST_HOOK_SECRET"})
        summary = json.dumps(parse_monitor_config(doc, base_dir=tmp_path).summary())
        for secret in ("SECRETTOKEN", "OTHERTOKEN", "ANOTHERTOKEN", "webhooks", "1234"):
            assert secret not in summary
        shown.append(json.loads(summary)["webhook"]["url"])
    assert all(u.startswith("https://hooks.example.com/") for u in shown) and shown[0] != shown[1]

    caplog.set_level(logging.DEBUG, logger="rsflow")
    for url in ("http://127.0.0.1:9/api/webhooks/1234/SECRETTOKEN", "http://127.0.0.1:9/api/SECRET TOKEN"):
        result = send_webhook(WebhookConfig(url=url, timeout_seconds=2), {"changes": 1}, attempts=1)
        assert not result.delivered and "SECRET" not in result.error and "webhooks" not in result.error
    assert caplog.records and not [r for r in caplog.records if "SECRET" in r.getMessage()]
    assert any("http://127.0.0.1:9/<path " in r.getMessage() for r in caplog.records)


# --- change rules on hand-made rows -----------------------------------------------------------------

_T = (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)


def _row(
    item,
    day,
    task,
    key,
    *,
    answer=None,
    number=None,
    label=None,
    count=None,
    kind="tile",
    col=0,
    geometry=None,
    status="ok",
    model="demo",
):
    tr = list(_T)
    tr[2] += col * 640
    return {
        "tile_id": f"{item}:c{col}",
        "kind": kind,
        "item_id": item,
        "model_id": model,
        "datetime": pd.Timestamp(day, tz="UTC"),
        "task": task,
        "prompt": key,
        "prompt_key": key,
        "text": answer,
        "answer": answer,
        "answer_number": number,
        "label": label,
        "object_count": count,
        "status": status,
        "native_crs": "EPSG:32618",
        "transform": tr,
        "window_width": 64,
        "window_height": 64,
        "geometry": geometry or box(-75 + col * 0.01, 37, -75 + col * 0.01 + 0.007, 37.006),
    }


def test_change_kinds():
    q, n, c, d = "Is there water?", "How many ships?", "forest,water", "ship"
    obj_a = box(-74.999, 37.001, -74.998, 37.002)
    obj_b = box(-74.996, 37.004, -74.995, 37.005)
    rows = pd.DataFrame(
        [
            _row("i1", "2024-05-01", "vqa", q, answer="no"),
            _row("i2", "2024-05-11", "vqa", q, answer="no"),
            _row("i3", "2024-05-21", "vqa", q, answer="yes"),
            _row("i1", "2024-05-01", "vqa", n, answer="3", number=3.0),
            _row("i2", "2024-05-11", "vqa", n, answer="4", number=4.0),  # below the threshold of 2
            _row("i3", "2024-05-21", "vqa", n, answer="7", number=7.0),
            _row("i1", "2024-05-01", "classify", c, label="forest"),
            _row("i3", "2024-05-21", "classify", c, label="water"),
            _row("i2", "2024-05-11", "classify", c, label=None, status="failed"),  # not an observation
            _row("i1", "2024-05-01", "detect", d, count=1),
            _row("i3", "2024-05-21", "detect", d, count=1),
            _row("i1", "2024-05-01", "detect", d, kind="object", label=d, geometry=obj_a),
            _row("i3", "2024-05-21", "detect", d, kind="object", label=d, geometry=obj_b),
            _row("i1", "2024-05-01", "caption", "Describe", answer="a field"),
            _row("i3", "2024-05-21", "caption", "Describe", answer="a lake"),
            _row(
                "i1", "2024-05-01", "vqa", q, answer="no", col=1
            ),  # another tile, seen once: nothing to compare
            # an item that could not be planned: no grid (null CRS, affine, window), so no cell, no change
            {**_row("i4", "2024-05-31", "vqa", q, answer=None, status="failed"),
             "native_crs": None, "transform": None, "window_width": None, "window_height": None},
        ]
    )
    changes = detect_changes(rows, ChangeRules(min_count_change=2, object_iou=0.3))
    got = sorted(zip(changes["change"], changes["before_item_id"], changes["after_item_id"], strict=True))
    assert got == [
        ("answer_flipped", "i2", "i3"),
        ("class_changed", "i1", "i3"),
        ("count_changed", "i2", "i3"),
        ("object_appeared", "i1", "i3"),
        ("object_vanished", "i1", "i3"),
    ]
    assert set(changes["cell_id"]) == {cell_id("EPSG:32618", _T, 64, 64)}
    appeared = changes[changes["change"] == "object_appeared"].iloc[0]
    assert shapely.equals(appeared.geometry, obj_b)
    flip = changes[changes["change"] == "answer_flipped"].iloc[0]
    assert (flip.before_value, flip.after_value) == ("no", "yes")


def test_cells_of_grids_in_degrees_are_told_apart_as_finely_as_grids_in_metres():
    """A cell is quantised in pixels of its own grid: two EPSG:4326 grids of ~10 m pixels that differ (here by
    6.5 px at the far edge of a 504 px window, or by a third of a pixel) are other places, while the same grid
    read with float noise from two items' metadata is one. Fixed decimals of degrees (0.001 deg, ~110 m)
    made the different grids one cell and compared their tiles as the same place."""
    deg = [8.983e-5, 0.0, -76.1000, 0.0, -8.983e-5, 37.5]
    other = [9.02e-5, 0.0, -76.1004, 0.0, -9.02e-5, 37.5004]
    third = [*deg[:2], deg[2] + deg[0] / 3, *deg[3:]]
    noisy = [deg[0] * (1 + 1e-12), 0.0, deg[2] + 1e-12, 0.0, deg[4], deg[5] - 1e-12]
    cell = cell_id("EPSG:4326", deg, 504, 504)
    assert cell != cell_id("EPSG:4326", other, 504, 504) and cell != cell_id("EPSG:4326", third, 504, 504)
    assert cell == cell_id("EPSG:4326", noisy, 504, 504)
    utm = list(_T)
    here = cell_id("EPSG:32618", utm, 64, 64)
    assert here != cell_id("EPSG:32618", [*utm[:2], utm[2] + 10 / 3, *utm[3:]], 64, 64)
    assert here == cell_id("EPSG:32618", [*utm[:2], utm[2] + 1e-7, *utm[3:]], 64, 64)

    q = "Is there water?"
    rows = pd.DataFrame([
        {**_row("i1", "2024-05-01", "vqa", q, answer="no"), "native_crs": "EPSG:4326", "transform": deg},
        {**_row("i2", "2024-05-11", "vqa", q, answer="yes"), "native_crs": "EPSG:4326", "transform": other},
    ])
    assert detect_changes(rows, ChangeRules()).empty  # not one place: nothing to compare


def test_an_unparsed_answer_neither_hides_nor_makes_a_change_and_two_models_are_not_compared():
    """no -> (unparsed) -> yes is a flip, as with a failed tile between; an unparsed answer in one granule of
    an instant does not veto what the next instant changed; and after the config moved to another model,
    its answers are not changes from the old model's."""
    q = "Is there water?"
    rows = pd.DataFrame(
        [
            _row("i1", "2024-05-01", "vqa", q, answer="no"),
            _row("i2", "2024-05-11", "vqa", q, answer=None),  # ok tile, answer that did not parse
            _row("i3", "2024-05-21", "vqa", q, answer="yes"),
            _row("j1", "2024-05-01", "vqa", q, answer="no", col=1),
            _row("j2", "2024-05-01", "vqa", q, answer=None, col=1),  # the other granule of that instant
            _row("j3", "2024-05-11", "vqa", q, answer="yes", col=1),
            _row("k1", "2024-05-01", "vqa", q, answer="no", col=2),
            _row("k2", "2024-05-11", "vqa", q, answer="yes", col=2, model="geochat-lora"),
        ]
    )
    changes = detect_changes(rows, ChangeRules())
    got = sorted(zip(changes["change"], changes["before_item_id"], changes["after_item_id"], strict=True))
    assert got == [("answer_flipped", "i1", "i3"), ("answer_flipped", "j1", "j3")]


def test_observations_at_one_instant_are_not_a_change_from_each_other():
    """Two items over the cell at the same time (a reprocessed scene, two granules of one pass): each is
    compared with the earlier observation, never with the other; the next time compares with one of them."""
    q = "Is there water?"
    rows = pd.DataFrame([
        _row("a", "2024-05-01", "vqa", q, answer="no"),
        _row("b0", "2024-05-11", "vqa", q, answer="no"),
        _row("b1", "2024-05-11", "vqa", q, answer="yes"),
        _row("c", "2024-05-21", "vqa", q, answer="yes"),
    ])
    changes = detect_changes(rows, ChangeRules())
    got = list(zip(changes["change"], changes["before_item_id"], changes["after_item_id"], strict=True))
    assert got == [("answer_flipped", "a", "b1")]
    assert (changes["before_datetime"] < changes["after_datetime"]).all()
    # the same with the ids of the two simultaneous items the other way round in sort order
    renamed = rows.replace({"item_id": {"b0": "b9"}})
    again = detect_changes(renamed, ChangeRules())
    assert list(zip(again["change"], again["before_item_id"], again["after_item_id"], strict=True)) == got


def test_an_object_seen_by_either_granule_of_an_instant_has_not_appeared_later():
    d = "ship"
    x, z = box(-74.999, 37.001, -74.998, 37.002), box(-74.996, 37.004, -74.995, 37.005)
    rows = pd.DataFrame([
        _row("a", "2024-05-11", "detect", d, count=1),  # two granules at one instant: a saw z, b saw x
        _row("a", "2024-05-11", "detect", d, kind="object", label=d, geometry=z),
        _row("b", "2024-05-11", "detect", d, count=1),
        _row("b", "2024-05-11", "detect", d, kind="object", label=d, geometry=x),
        _row("c", "2024-05-21", "detect", d, count=2),  # later: both, each seen before by one granule
        _row("c", "2024-05-21", "detect", d, kind="object", label=d, geometry=x),
        _row("c", "2024-05-21", "detect", d, kind="object", label=d, geometry=z),
    ])
    changes = detect_changes(rows, ChangeRules(min_count_change=5, object_iou=0.3))
    assert "object_appeared" not in set(changes["change"])  # b had x, a had z


def _model_row(item, day, task, key, text, *, cut):
    """A model-stage row as rsflow.interpret reads it (tests/test_interpret.py's), ``answer_cut`` as the
    model runner sets it when generation stopped at max_new_tokens."""
    return {
        "tile_id": f"{item}:r0c0", "item_id": item, "collection": "c", "datetime": f"{day}T10:00:00Z",
        "task": task, "prompt": key, "prompt_key": key, "region_id": None, "text": text,
        "model_id": "geochat",
        "status": "ok", "stage": "infer", "error": None, "crs": "EPSG:32618", "col_off": 0, "row_off": 0,
        "width": 64, "height": 64, "res": 10.0, "transform": list(_T), "nodata_fraction": 0.0,
        "footprint_wkb": shapely.to_wkb(box(-75.0, 37.0, -74.993, 37.006)), "prompt_index": 0,
        "answer_cut": cut,
    }


def test_an_answer_cut_at_max_new_tokens_is_no_count_and_no_objects():
    """A reply that ran into max_new_tokens lost the boxes (or digits) after the cut: its row says so in
    parse_error, after whatever else the parser noted (here the unterminated box the cut left), and its count
    and objects are no observation, as an unparsed answer is. It used to make count_changed plus an
    object_vanished per missing ship; the observations around it are still compared."""
    from rsflow.interpret import ANSWER_CUT_NOTE, interpret_row

    ships = [f"{{<{18 * k + 2}><10><{18 * k + 8}><16>|<0>}}" for k in range(5)]
    more = ships + ["{<2><60><8><66>|<0>}", "{<40><60><46><66>|<0>}"]  # two ships more on the third date
    n = "How many ships are there?"
    model_rows = [
        _model_row("d1", "2024-05-01", "detect", "ship", "".join(ships), cut=False),
        _model_row("d2", "2024-05-11", "detect", "ship", "".join(ships[:3]) + "{<56><1", cut=True),
        _model_row("d3", "2024-05-21", "detect", "ship", "".join(more), cut=False),
        _model_row("d1", "2024-05-01", "vqa", n, "12", cut=False),
        _model_row("d2", "2024-05-11", "vqa", n, "1", cut=True),  # "1" of "12": the digits after the cut
        _model_row("d3", "2024-05-21", "vqa", n, "12", cut=False),
    ]
    rows = [r for m in model_rows for r in interpret_row(m)]
    cut_tile = next(r for r in rows if r["item_id"] == "d2" and r["kind"] == "tile" and r["task"] == "detect")
    assert cut_tile["object_count"] == 3 and ANSWER_CUT_NOTE in cut_tile["parse_error"]
    assert cut_tile["parse_error"] != ANSWER_CUT_NOTE  # the cut is one note among others
    frame = pd.DataFrame(rows)
    frame["geometry"] = [shapely.from_wkb(g) for g in frame["geometry"]]

    changes = detect_changes(frame, ChangeRules(min_count_change=2, object_iou=0.3))
    got = sorted(zip(changes["change"], changes["before_item_id"], changes["after_item_id"], strict=True))
    assert got == [("count_changed", "d1", "d3"), *[("object_appeared", "d1", "d3")] * 2]


def _fake_search(items, max_items, order):
    """A STAC search over ``items`` that stops at ``max_items`` in the given order ("oldest" first, as an
    API without sorting may answer, or "newest")."""
    from types import SimpleNamespace

    from rsflow.monitor.ledger import parse_time

    calls = []

    def search(begin, end):
        calls.append((begin, end))
        lo, hi = parse_time(begin), None if end == ".." else parse_time(end)
        inside = [i for i in items if lo <= parse_time(i["properties"]["datetime"])
                  and (hi is None or parse_time(i["properties"]["datetime"]) <= hi)]
        inside.sort(key=lambda i: i["properties"]["datetime"], reverse=order == "newest")
        return SimpleNamespace(items=inside[:max_items], reached_max_items=len(inside) > max_items)

    return search, calls


def _dated(item_id, when):
    return {"id": item_id, "properties": {"datetime": when}}


@pytest.mark.parametrize("order", ["oldest", "newest"])
def test_a_window_is_searched_completely_however_the_api_orders_a_capped_search(order):
    """A capped search is split by time until no part is capped: every item of the window is seen, a late
    scene among many done ones included, whatever order the API answers in (rustac's is insertion order),
    and done items never use up max_items."""
    from rsflow.monitor.run import collect_items

    items = [_dated(f"d{k:02d}", f"2024-05-{k + 1:02d}T10:00:00Z") for k in range(20)]
    items.append(_dated("late", "2024-05-03T12:00:00Z"))  # published after the window's others were done
    search, calls = _fake_search(items, 3, order)
    now = datetime(2024, 6, 1, tzinfo=UTC)
    found = collect_items(search, datetime(2024, 5, 1, tzinfo=UTC), None, now=now,
                          is_pending=lambda i: i["id"] == "late", max_items=3)
    assert sorted(i["id"] for i in found.items) == sorted(i["id"] for i in items)
    assert [i["id"] for i in found.pending] == ["late"] and found.complete and found.backfill is None
    assert len(calls) > 1


def test_more_items_to_process_than_one_run_takes_leave_the_older_ones_to_the_next_runs():
    """Pending items are gathered newest first up to max_items; the older part of the window is the backfill,
    which the next run searches the same way: between them, every item once. One second holding more items
    than max_items is reported, not split for ever."""
    from rsflow.monitor.ledger import parse_time
    from rsflow.monitor.run import collect_items

    items = [_dated(f"i{k:02d}", f"2024-05-{k + 1:02d}T10:00:00Z") for k in range(10)]
    search, _ = _fake_search(items, 4, "oldest")
    now = datetime(2024, 6, 1, tzinfo=UTC)
    done: set[str] = set()
    start, end = datetime(2024, 5, 1, tzinfo=UTC), None
    runs = []
    for _ in range(6):
        found = collect_items(search, start, end, now=now, is_pending=lambda i: i["id"] not in done, max_items=4)
        assert len(found.pending) <= 4
        runs.append(sorted(i["id"] for i in found.pending))
        done.update(i["id"] for i in found.pending)
        if found.backfill is None:
            break
        start, end = parse_time(found.backfill["start"]), parse_time(found.backfill["before"])
    assert sorted(k for run in runs for k in run) == [i["id"] for i in items] and len(runs) >= 3
    assert max(runs[0]) == "i09"  # the newest first

    crowded = [_dated(f"c{k}", "2024-05-05T10:00:00Z") for k in range(6)]
    search, _ = _fake_search(crowded, 4, "oldest")
    found = collect_items(search, datetime(2024, 5, 1, tzinfo=UTC), None, now=now, is_pending=lambda i: True,
                          max_items=10)
    assert found.crowded and not found.complete and len(found.items) == 4


def test_a_run_that_dies_counts_an_attempt_and_a_failed_item_no_longer_found_is_given_up():
    """Crashes: the items of a run that died are tried again, together once, then one at a time, oldest
    first, and given up after max_attempts; a failed item a complete search no longer returns counts
    attempts too (it used to stay failed and hold the search start back for ever)."""
    from rsflow.monitor.run import (
        INTERRUPTED,
        VANISHED,
        Collected,
        _count_vanished,
        _give_up_interrupted,
        _isolate_crashed,
    )

    ledger = Ledger(monitor="m")
    pending = [_dated("a", "2024-05-02T10:00:00Z"), _dated("b", "2024-05-01T10:00:00Z")]
    for i in pending:
        ledger.items[i["id"]] = ItemRecord(id=i["id"], collection="c", datetime=i["properties"]["datetime"],
                                           state="failed", attempts=1, run_id="r1", error=INTERRUPTED)
    assert _isolate_crashed(pending, ledger) == pending  # one crash: both again
    for record in ledger.items.values():
        record.attempts = 2
    assert [i["id"] for i in _isolate_crashed(pending, ledger)] == ["b"]
    ledger.items["b"].attempts = 3
    assert _give_up_interrupted(ledger, 3) == []  # its crashes were all in company: isolated, not given up
    ledger.items["b"].alone = True  # its third attempt, alone, died too
    assert _give_up_interrupted(ledger, 3) == ["b"] and ledger.items["b"].state == "given_up"
    assert ledger.items["a"].state == "failed" and _give_up_interrupted(ledger, 3) == []

    ledger.items["old"] = ItemRecord(id="old", collection="c", datetime="2024-04-01T10:00:00Z", state="failed",
                                     attempts=1, run_id="r1", error="HTTP 503")
    complete = Collected(items=[pending[0]], pending=[], backfill=None, searches=1)
    start = datetime(2024, 4, 1, tzinfo=UTC)
    assert _count_vanished(ledger, complete, start, None, "r2", 3) == (["old"], [])
    assert (ledger.items["old"].attempts, ledger.items["old"].error) == (2, VANISHED)
    assert ledger.items["a"].attempts == 2  # found: not counted
    partial = Collected(items=[], pending=[], backfill={"start": "x", "before": "y"}, searches=1)
    assert _count_vanished(ledger, partial, start, None, "r3", 3) == ([], [])  # an incomplete search says nothing
    assert _count_vanished(ledger, complete, start, None, "r3", 3) == ([], ["old"])
    assert ledger.items["old"].state == "given_up"


# --- whole runs, the region pipeline replaced (no Ray) ---------------------------------------------------


@pytest.fixture
def fake_region(monkeypatch):
    """rsflow.pipeline.run_region replaced by a :class:`~tests.monitor_fixtures.FakeRegion`."""
    import rsflow.pipeline
    from tests.monitor_fixtures import FakeRegion

    fake = FakeRegion()
    monkeypatch.setattr(rsflow.pipeline, "run_region", fake)
    monkeypatch.setattr(rsflow.pipeline, "_ensure_ray", fake.connect)  # the monitor connects before it counts
    return fake


def test_an_item_given_up_in_a_run_that_finds_nothing_new_exits_4_and_moves_the_watermark(
    tmp_path, fake_region, capsys
):
    """The item of a run that died is given up by the next run before anything runs (max_attempts 1): that run
    finds nothing new, but it gave an item up, so it exits 4 as the README says, and the watermark moves past
    the item as a processed run's would. It used to exit 0 with the watermark left behind."""
    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    catalog = write_items(tmp_path / "items.json", [plain_item("A", "2024-05-02T10:00:00Z")])
    path = _write(tmp_path, plain_monitor_doc(catalog, tmp_path / "out", retry={"max_attempts": 1}))
    fake_region.error = MemoryError("worker OOM (simulated)")
    with pytest.raises(MemoryError):
        main(["monitor", "run", "--config", str(path)])
    fake_region.error = None
    capsys.readouterr()
    assert main(["monitor", "run", "--config", str(path)]) == 4
    out = capsys.readouterr().out
    assert "nothing new" in out and "1 given up" in out
    ledger = load_ledger(str(tmp_path / "out"), "plain")
    assert ledger.items["A"].state == "given_up" and ledger.watermark == "2024-05-02T10:00:00Z"
    assert fake_region.calls == [["A"]]
    assert main(["monitor", "run", "--config", str(path)]) == 0  # given up once, reported once


def test_items_the_search_refuses_are_failed_items_of_the_ledger_and_the_exit_code(
    tmp_path, fake_region, capsys
):
    """An item with no assets, and a second item with an id another collection's item already has, are refused
    by the search (the region job makes them failed rows). The monitor records them as failed items with the
    reason (ledger, status, last_run.json, exit 4), gives them up after max_attempts, and no longer says a
    thing about them then. They used to be dropped with a log line, the run exiting 0."""
    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    items = [plain_item("A", "2024-05-02T10:00:00Z", "c1"), plain_item("A", "2024-05-03T10:00:00Z", "c2"),
             plain_item("B", "2024-05-04T10:00:00Z", "c1", assets=False)]
    catalog = write_items(tmp_path / "items.json", items)
    out = tmp_path / "out"
    doc = plain_monitor_doc(catalog, out, collections=["c1", "c2"], retry={"max_attempts": 2})
    path = _write(tmp_path, doc)
    assert main(["monitor", "run", "--config", str(path)]) == 4
    assert fake_region.calls == [["A"]]
    ledger = load_ledger(str(out), "plain")
    assert {k: (r.state, r.attempts) for k, r in ledger.items.items()} == {
        "A": ("done", 1), "B": ("failed", 1), "c2/A": ("failed", 1)}
    assert ledger.items["B"].error == "refused: the item has no assets"
    assert "another item with id 'A'" in ledger.items["c2/A"].error
    last = json.loads((out / "_monitor" / "last_run.json").read_text())
    assert last["items_failed"] == 2 and set(last["items_refused"]) == {"B", "c2/A"}
    capsys.readouterr()
    assert main(["monitor", "status", str(path)]) == 0
    assert "failed    B (1 attempts): refused: the item has no assets" in capsys.readouterr().out

    assert main(["monitor", "run", "--config", str(path)]) == 4  # nothing new; both given up
    ledger = load_ledger(str(out), "plain")
    assert {k: r.state for k, r in ledger.items.items()} == {"A": "done", "B": "given_up", "c2/A": "given_up"}
    assert main(["monitor", "run", "--config", str(path)]) == 0
    assert fake_region.calls == [["A"]]

    # two items with one id, each found by another search of a split window, are told apart there too
    from rsflow.monitor.run import collect_items

    first = plain_item("X", "2024-05-02T10:00:00Z", "c1")
    second = plain_item("X", "2024-05-20T10:00:00Z", "c2")
    search, _ = _fake_search([first, second], 1, "oldest")
    found = collect_items(search, datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 31, tzinfo=UTC),
                          now=datetime(2024, 6, 1, tzinfo=UTC), is_pending=lambda i: True, max_items=5)
    assert [i["collection"] for i in found.items] == ["c2"]  # newer windows first
    assert [(i["collection"], why.split(" (")[0]) for i, why in found.refused] == [
        ("c1", "another item with id 'X'")]


@pytest.mark.parametrize("outage", ["unreachable", "lost", "no-gpu", "died"])
def test_after_an_outage_the_backlog_and_a_new_scene_are_processed_by_the_next_run_or_two(
    outage, tmp_path, fake_region
):
    """Two scheduled runs fail while the cluster is down, then it is back and a new scene arrives (findings:
    every later run used to process one scene, the new one waiting six runs, and three outage runs gave good
    scenes up). A cluster that cannot be reached ("unreachable": ray.init raises ConnectionError, before any
    attempt is counted) or that goes away under the run ("lost": the pipeline raises ConnectionError, and
    the attempts are given back) costs the items nothing: the next run does them all. A run that dies in the
    pipeline for a reason the monitor cannot tell from a scene that kills runs ("died") counts attempts, so
    the next run tries the oldest scene alone (a suspect in a run with others that died again would be given
    up for their crash), and its normal finish ends the isolation: the run after it does the rest and the
    new scene. No scene is given up (default max_attempts 3). A --require-gpu run whose actors got no GPU
    node ("no-gpu") is the cluster's doing too: it counted attempts, and three such runs gave scenes up."""
    from rsflow.errors import GpuUnavailable
    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    items = [plain_item(f"s{k}", f"2024-05-{k + 2:02d}T10:00:00Z") for k in range(6)]
    catalog = write_items(tmp_path / "items.json", items)
    out = tmp_path / "out"
    config = parse_monitor_config(plain_monitor_doc(catalog, out), base_dir=tmp_path, check_env=False)
    backlog = [f"s{k}" for k in range(6)]
    for _ in range(2):
        if outage == "unreachable":
            fake_region.connect_error = ConnectionError("could not connect to the Ray cluster (simulated)")
        else:
            error = {"lost": ConnectionError, "no-gpu": GpuUnavailable, "died": RuntimeError}[outage]
            fake_region.error = error("cluster down (simulated)")
        with pytest.raises((ConnectionError, RuntimeError, GpuUnavailable), match="simulated"):
            run_monitor(config)
    assert fake_region.calls == ([] if outage == "unreachable" else [backlog, backlog])
    ledger = load_ledger(str(out), "plain")
    assert {r.attempts for r in ledger.items.values()} == ({2} if outage == "died" else set())

    fake_region.error = fake_region.connect_error = None
    write_items(catalog, [*items, plain_item("new", "2024-05-20T10:00:00Z")])
    done = []
    for _ in range(3):
        result = run_monitor(config)
        assert not result.items_failed and not result.items_given_up
        done.append(result.items_done)
    if outage == "died":
        assert done == [["s0"], ["new", *backlog[1:]], []]
    else:
        assert done == [["new", *backlog], [], []]
    ledger = load_ledger(str(out), "plain")
    assert {r.state for r in ledger.items.values()} == {"done"} and len(ledger.items) == 7
    assert ledger.watermark == "2024-05-20T10:00:00Z"


def test_a_scene_that_kills_runs_is_given_up_alone_while_the_others_and_a_new_scene_are_done(
    tmp_path, fake_region
):
    """The isolation that follows two crashed runs ends with the first run that finishes: the scenes held back
    get back the attempt of their last crash and run together again; when the culprit is among them it kills
    that run, and it is then tried alone and given up. No innocent scene is given up: a scene that arrives
    meanwhile waits (recorded) until the suspect tried alone is settled, rather than share its run."""
    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    items = [plain_item("a", "2024-05-02T10:00:00Z"), plain_item("p", "2024-05-03T10:00:00Z"),
             plain_item("b", "2024-05-04T10:00:00Z")]
    catalog = write_items(tmp_path / "items.json", items)
    out = tmp_path / "out"
    config = parse_monitor_config(plain_monitor_doc(catalog, out), base_dir=tmp_path, check_env=False)
    fake_region.killer = "p"
    outcomes = []
    for run in range(7):
        if run == 4:
            write_items(catalog, [*items, plain_item("new", "2024-05-10T10:00:00Z")])
        try:
            result = run_monitor(config)
            outcomes.append((result.items_done, result.items_given_up))
        except RuntimeError:
            outcomes.append("died")
    assert fake_region.calls == [["a", "b", "p"], ["a", "b", "p"], ["a"], ["b", "p"], ["p"], ["b"], ["new"]]
    assert outcomes == ["died", "died", (["a"], []), "died", "died", (["b"], ["p"]), (["new"], [])]
    ledger = load_ledger(str(out), "plain")
    assert {k: r.state for k, r in ledger.items.items()} == {"a": "done", "b": "done", "new": "done",
                                                              "p": "given_up"}



def test_a_scene_with_a_tile_that_always_fails_is_given_up_with_its_good_rows_kept(
    tmp_path, monkeypatch, capsys
):
    """One tile of a scene fails at every attempt (a corrupt block): the scene is retried, then given up, as
    before, but the run that gives it up commits its rows, the ok ones and a failed row with the reason for
    the bad tile, so its date is in the results for every tile that could be computed. Its rows used to be
    dropped with it (the date missing for the whole AOI). The failed row is no observation for the changes,
    the exit code and summary still say the scene was given up, and no later run processes or publishes
    it again."""
    import pyarrow.parquet as pq

    import rsflow.pipeline
    from rsflow.monitor.run import CHANGES_NAME, LAST_RUN_NAME
    from tests.monitor_fixtures import RowRegion, plain_item, plain_monitor_doc, write_items

    def answer(item_id: str, col: int) -> tuple[str, str | None]:
        if (item_id, col) == ("s1", 2):  # its text kept on the failed row: read as an answer, "yes" would flip
            return "yes", "read failed: TIFFReadEncodedTile() failed (corrupt block)"
        return ("yes" if item_id == "s2" else "no"), None

    fake = RowRegion(answer)
    monkeypatch.setattr(rsflow.pipeline, "run_region", fake)
    monkeypatch.setattr(rsflow.pipeline, "_ensure_ray", fake.connect)
    days = ("2024-05-02", "2024-05-03", "2024-05-04")
    catalog = write_items(tmp_path / "items.json", [plain_item(f"s{k}", f"{d}T10:00:00Z") for k, d in enumerate(days)])
    out = tmp_path / "out"
    path = _write(tmp_path, plain_monitor_doc(catalog, out))  # retry.max_attempts: 3 (the default)

    def results() -> pd.DataFrame:
        files = sorted((out / "results").rglob("part-*.parquet"))
        return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)

    codes, summaries, s1_rows = [], [], []
    for _ in range(3):
        codes.append(main(["monitor", "run", "--config", str(path)]))
        summaries.append(capsys.readouterr().out)
        s1_rows.append(int((results()["item_id"] == "s1").sum()))
    assert fake.calls == [["s0", "s1", "s2"], ["s1"], ["s1"]]
    assert codes == [4, 4, 4] and s1_rows == [0, 0, 3]  # retried with nothing written, then its rows committed
    assert "0 items done, 0 failed (will retry), 1 given up (1 with their rows kept)" in summaries[2]

    ledger = load_ledger(str(out), "plain")
    s1 = ledger.items["s1"]
    assert (s1.state, s1.attempts, s1.tiles, s1.rows) == ("given_up", 3, 3, 3)
    assert "corrupt block" in s1.error and "rows kept: 2 of 3 tiles ok" in s1.error
    assert ledger.runs[-1].items_given_up == ["s1"] and ledger.runs[-1].items_partial == ["s1"]
    assert ledger.runs[-1].items_done == [] and ledger.watermark == "2024-05-04T10:00:00Z"
    last = json.loads((out / LAST_RUN_NAME).read_text())
    assert (last["items_given_up"], last["items_given_up_with_rows"]) == (1, 1)

    rows = results()
    got = rows[rows["item_id"] == "s1"].sort_values("tile_id")
    assert list(got["tile_id"]) == ["s1:c0", "s1:c1", "s1:c2"]
    assert list(got["status"]) == ["ok", "ok", "failed"] and list(got["answer"])[:2] == ["no", "no"]
    assert got.iloc[2]["stage"] == "read" and "corrupt block" in got.iloc[2]["error"]
    assert not rows.duplicated(["tile_id", "task", "prompt"]).any() and len(rows) == 9
    assert sorted({p.parent.name for p in (out / "results").rglob("part-*.parquet")}) == [f"date={d}" for d in days]

    # the failed tile is no observation: its cell goes from s0 straight to s2; s1's good tiles are compared
    changes = pq.read_table(out / CHANGES_NAME).to_pandas()
    assert sorted(zip(changes["change"], changes["before_tile_id"], changes["after_tile_id"], strict=True)) == [
        ("answer_flipped", "s0:c2", "s2:c2"),
        ("answer_flipped", "s1:c0", "s2:c0"),
        ("answer_flipped", "s1:c1", "s2:c1"),
    ]

    # never processed again, nothing published twice; the status lists it as given up, with its reason
    published = {f: f.read_bytes() for f in (out / "results").rglob("*") if f.is_file()}
    assert main(["monitor", "run", "--config", str(path)]) == 0
    assert "nothing new" in capsys.readouterr().out and fake.calls == [["s0", "s1", "s2"], ["s1"], ["s1"]]
    assert {f: f.read_bytes() for f in (out / "results").rglob("*") if f.is_file()} == published
    assert main(["monitor", "status", str(path)]) == 0
    assert "given up  s1 (3 attempts): 1 tile(s) failed at read" in capsys.readouterr().out


# --- scheduling files ------------------------------------------------------------------------------


def test_kubernetes_cronjob_submits_the_monitor_without_overlap():
    docs = list(yaml.safe_load_all((REPO / "cluster" / "monitor-cronjob.yaml").read_text()))
    (cron,) = [d for d in docs if d and d["kind"] == "CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    example = yaml.safe_load((REPO / "monitors" / "port.yaml").read_text())
    assert spec["schedule"] == example["schedule"] and parse_cron(spec["schedule"])
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and spec["jobTemplate"]["spec"]["backoffLimit"] == 0
    (container,) = pod["containers"]
    command = " ".join(container["command"] + container["args"])
    assert (
        "ray job submit" in command and "-- python jobs/monitor_aoi.py --config monitors/port.yaml" in command
    )
    assert any(e["name"] == "RAY_ADDRESS" and e["value"].endswith(":8265") for e in container["env"])
    assert "SECRET" not in json.dumps(container)  # the secret goes to the head pod, not the submitter


def test_raycronjob_runs_the_monitor_on_the_existing_cluster():
    (doc,) = [d for d in yaml.safe_load_all((REPO / "cluster" / "monitor-raycronjob.yaml").read_text()) if d]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCronJob"
    assert set(doc["spec"]) == {"schedule", "jobTemplate"}  # the fields the alpha CRD has
    parse_cron(doc["spec"]["schedule"])
    job = doc["spec"]["jobTemplate"]
    assert job["clusterSelector"] == {"ray.io/cluster": "rsflow"}
    assert job["entrypoint"].endswith("jobs/monitor_aoi.py --config /opt/rsflow/monitors/port.yaml")


def test_readme_documents_a_plain_cron_line():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Monitoring") :]
    lines = [
        ln.strip()
        for ln in section.splitlines()
        if "jobs/monitor_aoi.py --config" in ln and ln.strip()[:1].isdigit()
    ]
    assert lines, "no crontab line in the README's Monitoring section"
    schedule = " ".join(lines[0].split()[:5])
    parse_cron(schedule)
    assert (REPO / "jobs" / "monitor_aoi.py").is_file() and (REPO / "monitors" / "port.yaml").is_file()


# --- the monitor's own files on an object store (fsspec memory://) ------------------------------------


def _result_table(rows: list[dict]):
    import pyarrow as pa

    from rsflow.output import WRITTEN_SCHEMA

    full = [{name: r.get(name) for name in WRITTEN_SCHEMA.names} for r in rows]
    for r in full:
        r["geometry"] = shapely.to_wkb(r["geometry"])
        r["datetime"] = r["datetime"].to_pydatetime()
    return pa.Table.from_pylist(full, schema=WRITTEN_SCHEMA)


def test_partitions_ledger_changes_and_report_on_an_object_store(tmp_path):
    from rsflow.monitor.ledger import RunRecord
    from rsflow.monitor.run import (
        CHANGES_NAME,
        REPORT_NAME,
        ensure_changes_report,
        publish_partitions,
        remove_leftovers,
        write_partitions,
    )

    root = f"memory://rsflow-monitor-{uuid.uuid4().hex[:8]}/out"
    cfg = parse_monitor_config(_config(tmp_path, output=root), base_dir=tmp_path)
    assert cfg.output == root
    q = "Is there water in this image?"
    table = _result_table(
        [
            {**_row("i1", "2024-05-01", "vqa", q, answer="no"), "kind": "tile"},
            {**_row("i2", "2024-05-11", "vqa", q, answer="yes"), "kind": "tile"},
        ]
    )
    files = write_partitions(root, "run-1", table)
    assert files == [
        "results/date=2024-05-01/part-run-1.parquet",
        "results/date=2024-05-11/part-run-1.parquet",
    ]
    ledger = Ledger(monitor="harbour")
    ledger.runs.append(
        RunRecord(
            run_id="run-1",
            started="",
            finished="",
            items_done=["i1", "i2"],
            items_failed=[],
            items_given_up=[],
            files=files,
            request_fingerprint="x",
        )
    )
    save_ledger(root, ledger)
    publish_partitions(root, files)  # the commit's rename of the hidden pending files
    changes = ensure_changes_report(cfg, load_ledger(root, "harbour"))
    assert list(changes["change"]) == ["answer_flipped"]
    assert store.read_bytes(store.join(root, CHANGES_NAME)) and store.read_bytes(
        store.join(root, REPORT_NAME)
    )
    assert len(ensure_changes_report(cfg, load_ledger(root, "harbour"))) == 0  # up to date: not rebuilt

    # an uncommitted partition (a killed run's) is removed; committed ones stay
    write_partitions(root, "run-2", table.slice(0, 1))
    removed = remove_leftovers(root, load_ledger(root, "harbour"))
    assert removed == ["results/date=2024-05-01/.part-run-2.parquet.pending"]
    assert store.list_files(store.join(root, "results")) == [f.removeprefix("results/") for f in files]
    store.remove(root, recursive=True)


def test_an_output_root_of_another_monitor_is_refused(tmp_path, capsys):
    save_ledger(str(tmp_path / "out"), Ledger(monitor="forest-edge"))
    path = _write(tmp_path, _config(tmp_path))
    assert main(["monitor", "status", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("rsflow monitor: error: output: ") and "'forest-edge'" in err and err.count("\n") == 1
    )


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-flock"])
@pytest.mark.parametrize("stale", [False, True], ids=["free", "expired"])
def test_of_many_runs_starting_at_once_exactly_one_gets_the_lock(stale, flock, tmp_path, monkeypatch):
    """Also where the filesystem has no flock (the hard-linked mutex file instead)."""
    import threading

    import rsflow.monitor.lock as lock_module

    if not flock:
        monkeypatch.setattr(lock_module, "_flocked", lambda path, deadline: None)

    root = str(tmp_path)
    if stale:
        store.write_json_atomic(
            lock_module.lock_path(root),
            {
                "run_id": "killed",
                "host": "h",
                "pid": 1,
                "acquired": "2024-01-01T00:00:00+00:00",
                "expires": "2024-01-01T00:30:00+00:00",
            },
        )
    start, winners, refused = threading.Barrier(8), [], []

    def attempt(i: int) -> None:
        lock = MonitorLock(root, "harbour", f"run-{i}", timedelta(minutes=5), heartbeat=False)
        start.wait()
        try:
            lock.acquire()
            winners.append(i)
        except MonitorLocked:
            refused.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 7
    assert read_lock(root).run_id == f"run-{winners[0]}"
    # no temporaries left; the flock file stays (removing it could let two processes lock two files)
    assert sorted(p.name for p in (tmp_path / "_monitor").iterdir()) == ["lock.json", "lock.json.flock"][: 1 + flock]


def test_a_process_killed_inside_the_lock_mutex_does_not_hold_up_the_next_run(tmp_path):
    """The mutex that serialises changes to lock.json is the kernel's: a process killed while it holds
    it (here, SIGKILLed inside the critical section) leaves nothing the next run must wait out. A file
    left behind used to hold every run up for 30 s, and two runs clearing it at once could both go on."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    import rsflow.monitor.lock as lock_module

    lock_file = lock_module.lock_path(str(tmp_path))
    (tmp_path / "_monitor").mkdir()
    code = (
        "import time\n"
        "from rsflow.monitor.lock import _local_mutex\n"
        f"with _local_mutex({lock_file!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        entered = []

        def enter() -> None:
            with lock_module._local_mutex(lock_file):
                entered.append(time.monotonic())

        waiter = threading.Thread(target=enter, daemon=True)
        waiter.start()
        waiter.join(0.5)
        assert not entered  # held: nobody else gets in
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        waiter.join(10)
        assert entered and entered[0] - killed < 5
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    ("failed", "given_up", "expected"),
    [([], [], 0), (["b"], [], 4), ([], ["b"], 4)],
    ids=["ok", "failed", "given-up"],
)
def test_monitor_run_exit_code_says_whether_items_failed(
    failed, given_up, expected, tmp_path, monkeypatch, capsys
):
    import rsflow.monitor.run as run_module
    from rsflow.monitor.run import MonitorRunResult

    def fake_run(config, address=None):
        return MonitorRunResult(
            run_id="r",
            outcome="processed",
            search_window="2024-05-01T00:00:00Z/..",
            items_found=2,
            items_done=["a"],
            items_failed=failed,
            items_given_up=given_up,
        )

    monkeypatch.setattr(run_module, "run_monitor", fake_run)
    path = _write(tmp_path, _config(tmp_path))
    assert main(["monitor", "run", "--config", str(path)]) == expected
    assert "1 items done" in capsys.readouterr().out


def test_status_of_a_monitor_whose_store_cannot_be_read_is_one_line(tmp_path, capsys, monkeypatch):
    """`rsflow monitor status` on an object-store output it cannot reach (no credentials, no network) printed
    a 75-line botocore traceback with exit 1; it is one line naming output now, exit 2."""
    pytest.importorskip("s3fs")
    from tests.stac_fixtures import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    path = _write(tmp_path, _config(tmp_path, output="s3://rsflow-test-bucket/monitor"))
    assert main(["monitor", "status", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsflow monitor: error: output: cannot read s3://rsflow-test-bucket/monitor: ") and "\n" not in err


# --- review findings: watermark, lost ledger, webhook credentials, crashes, max_tiles, ids, lock, durations ----


def test_an_item_dated_in_the_future_does_not_move_the_watermark_past_the_next_scenes(
    tmp_path, fake_region, caplog
):
    """A catalog entry with a mistyped year (2204) was processed and pushed the watermark into the future:
    every later search started after every real scene, and the monitor said "nothing new" for ever. It is
    processed, named in a warning, and the watermark stays at the latest scene up to the run's start, also when
    the item is given up (refused: no assets) in a run that processes nothing."""
    import logging

    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    items = [plain_item("s0", "2024-05-02T10:00:00Z"), plain_item("typo", "2204-05-03T10:00:00Z")]
    catalog = write_items(tmp_path / "items.json", items)
    out = tmp_path / "out"
    config = parse_monitor_config(plain_monitor_doc(catalog, out), base_dir=tmp_path, check_env=False)
    caplog.set_level(logging.WARNING, logger="rsflow")
    first = run_monitor(config)
    assert first.items_done == ["s0", "typo"] and first.watermark == "2024-05-02T10:00:00Z"
    assert any("typo (2204-05-03T10:00:00Z)" in r.getMessage() for r in caplog.records)
    write_items(catalog, [*items, plain_item("new", "2024-05-07T10:00:00Z")])  # the next real scene
    assert run_monitor(config).items_done == ["new"]
    assert load_ledger(str(out), "plain").watermark == "2024-05-07T10:00:00Z"

    # given up without running (refused, max_attempts 1), in a run that finds nothing else
    write_items(catalog, [*items, plain_item("new", "2024-05-07T10:00:00Z"),
                          plain_item("typo2", "2304-01-01T10:00:00Z", assets=False)])
    refused = parse_monitor_config(plain_monitor_doc(catalog, out, retry={"max_attempts": 1}), base_dir=tmp_path,
                                   check_env=False)
    result = run_monitor(refused)
    assert result.outcome == "nothing-new" and result.items_given_up == ["typo2"]
    assert load_ledger(str(out), "plain").watermark == "2024-05-07T10:00:00Z"

    # a ledger whose watermark is already in the future (an older rsflow's) is set back before the search, and
    # the next real scene is found (the repair had waited for a run that was never searched in the right window)
    from rsflow.monitor.ledger import save_ledger

    stuck = load_ledger(str(out), "plain")
    stuck.watermark = "2204-05-03T10:00:00Z"
    save_ledger(str(out), stuck)
    write_items(catalog, [*items, plain_item("new", "2024-05-07T10:00:00Z"), plain_item("later", "2024-05-09T10:00:00Z")])
    assert run_monitor(config).items_done == ["later"]
    assert load_ledger(str(out), "plain").watermark == "2024-05-09T10:00:00Z"
    stuck = load_ledger(str(out), "plain")
    stuck.watermark = "2204-05-03T10:00:00Z"
    save_ledger(str(out), stuck)
    assert run_monitor(config).outcome == "nothing-new"  # nothing to do, but the repair is saved
    assert load_ledger(str(out), "plain").watermark == "2024-05-09T10:00:00Z"
    ledger = Ledger(monitor="m", watermark="2204-05-03T10:00:00Z")
    ledger.items["s0"] = ItemRecord(id="s0", collection="c", datetime="2024-05-02T10:00:00Z", state="done",
                                    attempts=1, run_id="r")
    advance_watermark(ledger, datetime(2024, 6, 1, tzinfo=UTC))
    assert ledger.watermark == "2024-05-02T10:00:00Z"


def test_a_root_with_published_results_but_no_ledger_is_refused_and_nothing_is_deleted(tmp_path, fake_region, capsys):
    """A missing ledger (deleted to "reset" the monitor, lost to a lifecycle rule) read as a new monitor, and
    the cleanup of an unfinished run's files deleted every committed result and run record. The run is refused
    now, before any work, with one line naming output and how to go on; and the cleanup never deletes a
    published partition, even one the ledger does not list (it keeps its run record too)."""
    from rsflow.monitor.ledger import RunRecord
    from rsflow.monitor.run import remove_leftovers
    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    catalog = write_items(tmp_path / "items.json", [plain_item("A", "2024-05-02T10:00:00Z")])
    out = tmp_path / "out"
    path = _write(tmp_path, plain_monitor_doc(catalog, out))
    published = out / "results" / "date=2024-05-02" / "part-r0.parquet"
    published.parent.mkdir(parents=True)
    published.write_bytes(b"rows of a committed run")
    (out / "runs").mkdir()
    (out / "runs" / "r0.json").write_text("{}")
    (out / "_monitor").mkdir()
    (out / "_monitor" / "last_run.json").write_text("{}")
    assert main(["monitor", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsflow monitor: error: output: ") and err.count("\n") == 1, err
    assert "restore _monitor/ledger.json" in err and "new output root" in err
    assert published.exists() and (out / "runs" / "r0.json").exists() and fake_region.calls == []

    # a ledger that does not list them (restored from an older copy): kept, with their run record; what an
    # unfinished run left (a hidden pending file, the record of a run that never committed) still goes
    ledger = Ledger(monitor="plain", runs=[RunRecord(
        run_id="r-old", started="s", finished="f", items_done=[], items_failed=[], items_given_up=[],
        files=[], request_fingerprint="x")])
    pending = published.parent / ".part-r1.parquet.pending"
    pending.write_bytes(b"rows of a killed run")
    (out / "runs" / "r1.json").write_text("{}")
    removed = remove_leftovers(str(out), ledger)
    assert sorted(removed) == ["results/date=2024-05-02/.part-r1.parquet.pending", "runs/r1.json"]
    assert published.exists() and (out / "runs" / "r0.json").exists()


def test_a_webhook_url_with_credentials_is_refused_and_never_leaks_its_password(tmp_path, capsys, caplog, monkeypatch):
    """``https://user:password@host/...`` passed the config check; urllib cannot send it (InvalidURL:
    nonnumeric port: 'password@host'), and that error, with the password, went to the log, last_run.json and
    stdout on every run. It is refused when the file is read, and a delivery error, however it arises, is
    scrubbed of the URL's credentials before it is logged, stored or printed."""
    import logging

    import rsflow.monitor.run as run_module
    from rsflow.monitor.config import WebhookConfig
    from rsflow.monitor.run import MonitorRunResult, _webhook_record
    from rsflow.monitor.webhook import WebhookResult, send_webhook

    url = "https://monitor:Tr0ub4dor@hooks.example.invalid/services/T0KEN"
    path = _write(tmp_path, _config(tmp_path, webhook={"url": url}))
    assert main(["monitor", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsflow monitor: error: webhook.url: must not hold credentials") and err.count("\n") == 1
    assert "secret_env" in err and "Tr0ub4dor" not in err and not (tmp_path / "out").exists()

    caplog.set_level(logging.DEBUG, logger="rsflow")
    result = send_webhook(WebhookConfig(url=url, timeout_seconds=2), {"changes": 1}, attempts=1)
    assert not result.delivered and result.error.startswith("InvalidURL") and "Tr0ub4dor" not in result.error
    assert not [r for r in caplog.records if "Tr0ub4dor" in r.getMessage()]

    leaked = WebhookResult(delivered=False, status=None, attempts=1, error=f"URLError: cannot open {url}")
    assert "Tr0ub4dor" not in json.dumps(_webhook_record(leaked))  # last_run.json

    def fake_run(config, address=None):
        return MonitorRunResult(run_id="r", outcome="processed", search_window="2024-05-01T00:00:00Z/..",
                                items_found=1, items_done=["a"], webhook=leaked)

    monkeypatch.setattr(run_module, "run_monitor", fake_run)
    path = _write(tmp_path, _config(tmp_path))
    assert main(["monitor", "run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "webhook FAILED" in out and "Tr0ub4dor" not in out


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_with_few_attempts_a_scene_that_kills_runs_is_still_given_up_alone(max_attempts, tmp_path, fake_region):
    """With retry.max_attempts 1 or 2, every scene of two runs that died (a node lost, an OOM elsewhere) was
    given up by the next run before the crash could be isolated. A crash now counts against an item for giving
    it up only when it ran alone: after an outage of two runs no scene is given up, and a scene that kills runs
    is isolated and given up on its own while the others are done, as with the default of 3."""
    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    items = [plain_item(f"s{k}", f"2024-05-{k + 2:02d}T10:00:00Z") for k in range(4)]
    catalog = write_items(tmp_path / "items.json", items)
    doc = plain_monitor_doc(catalog, tmp_path / "out", retry={"max_attempts": max_attempts})
    config = parse_monitor_config(doc, base_dir=tmp_path, check_env=False)
    fake_region.error = RuntimeError("worker node lost (simulated)")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="simulated"):
            run_monitor(config)
    fake_region.error = None
    done = []
    for _ in range(3):
        result = run_monitor(config)
        assert not result.items_given_up and not result.items_failed
        done.append(result.items_done)
    assert done == [["s0"], ["s1", "s2", "s3"], []]

    items = [plain_item("a", "2024-05-02T10:00:00Z"), plain_item("p", "2024-05-03T10:00:00Z"),
             plain_item("b", "2024-05-04T10:00:00Z")]
    catalog = write_items(tmp_path / "items2.json", items)
    doc = plain_monitor_doc(catalog, tmp_path / "out2", retry={"max_attempts": max_attempts})
    config = parse_monitor_config(doc, base_dir=tmp_path, check_env=False)
    fake_region.calls.clear()
    fake_region.killer = "p"
    outcomes = []
    for _ in range(7):
        try:
            result = run_monitor(config)
            outcomes.append((result.items_done, result.items_given_up))
        except RuntimeError:
            outcomes.append("died")
    assert fake_region.calls == [["a", "b", "p"], ["a", "b", "p"], ["a"], ["b", "p"], ["p"], ["b"]]
    assert outcomes == ["died", "died", (["a"], []), "died", "died", (["b"], ["p"]), ([], [])]


def test_a_run_planning_more_than_max_tiles_names_the_monitor_keys_that_help(tmp_path, fake_region, capsys):
    """The region run refuses a run whose items plan more than --max-tiles tiles; the monitor printed that, on
    every scheduled run, telling the user to raise a flag it does not have or shrink a date range it does not
    have. It names max_items (the items one run takes) and max_tiles, a key passed to the region run now, and
    counts no attempt."""
    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    catalog = write_items(tmp_path / "items.json", [plain_item(f"s{k}", f"2024-05-0{k + 2}T10:00:00Z")
                                                    for k in range(3)])
    out = tmp_path / "out"
    path = _write(tmp_path, plain_monitor_doc(catalog, out))
    fake_region.error = RequestError("--max-tiles", "the AOI plans more than 100000 tiles (100012+ counted over 3 "
                                     "items); shrink the AOI or the date range, or raise --max-tiles")
    assert main(["monitor", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsflow monitor: error: max_tiles: the AOI plans more than 100000 tiles") and err.count(
        "\n") == 1, err
    assert "lower max_items" in err and "raise max_tiles" in err and "--max-tiles" not in err
    assert "date range" not in err
    assert all(r.attempts == 0 for r in load_ledger(str(out), "plain").items.values())  # given back

    cfg = parse_monitor_config(plain_monitor_doc(catalog, out, max_tiles=250_000), base_dir=tmp_path, check_env=False)
    assert cfg.request.max_tiles == 250_000
    assert parse_monitor_config(plain_monitor_doc(catalog, out), base_dir=tmp_path,
                                check_env=False).request.max_tiles == 100_000


def test_an_id_another_collections_item_holds_in_the_ledger_is_recorded_not_skipped(tmp_path, fake_region, capsys):
    """The ledger is keyed by item id: a scene of another collection with an id done in an earlier run (the
    first item out of the search window by then) matched that record and was skipped as processed, recorded
    nowhere. It is refused and recorded as collection/id, as duplicates within one search are (exit 4)."""
    from tests.monitor_fixtures import plain_item, plain_monitor_doc, write_items

    first = [plain_item("A", "2024-05-02T10:00:00Z", "c1"), plain_item("B", "2024-05-15T10:00:00Z", "c1"),
             plain_item("Z", "2024-01-01T10:00:00Z", "c2")]  # before start: the catalog has c2, the search never sees it
    catalog = write_items(tmp_path / "items.json", first)
    out = tmp_path / "out"
    path = _write(tmp_path, plain_monitor_doc(catalog, out, collections=["c1", "c2"], lookback="2d"))
    assert main(["monitor", "run", "--config", str(path)]) == 0
    write_items(catalog, [*first, plain_item("A", "2024-05-20T10:00:00Z", "c2")])
    capsys.readouterr()
    assert main(["monitor", "run", "--config", str(path)]) == 4
    assert fake_region.calls == [["A", "B"]]
    ledger = load_ledger(str(out), "plain")
    assert (ledger.items["A"].collection, ledger.items["A"].state) == ("c1", "done")
    record = ledger.items["c2/A"]
    assert (record.state, record.collection) == ("failed", "c2")
    assert "another item with id 'A' (collection 'c1'" in record.error
    last = json.loads((out / "_monitor" / "last_run.json").read_text())
    assert list(last["items_refused"]) == ["c2/A"]


def test_the_locks_own_temporaries_are_left_and_a_lock_expiry_without_offset_is_utc(tmp_path):
    """The cleanup spared lock.json* but the lock's temporary is .lock.json.tmp-* (a leading dot): it was
    deleted under a renewal. A lock expiry written without a UTC offset (by hand, another tool) made acquire
    raise TypeError (naive against aware); it is read as UTC."""
    from rsflow.monitor.run import remove_leftovers

    root = str(tmp_path)
    (tmp_path / "_monitor").mkdir()
    for name in (".lock.json.tmp-1a2b3c4d", "lock.json.mutex.tmp-1a2b3c4d"):
        (tmp_path / "_monitor" / name).write_text("{}")
    (tmp_path / "_monitor" / ".ledger.json.tmp-1a2b3c4d").write_text("{}")
    assert remove_leftovers(root, Ledger(monitor="m")) == ["_monitor/.ledger.json.tmp-1a2b3c4d"]
    assert sorted(p.name for p in (tmp_path / "_monitor").iterdir()) == [
        ".lock.json.tmp-1a2b3c4d", "lock.json.mutex.tmp-1a2b3c4d"]

    def hand_written(expires: datetime) -> None:
        (tmp_path / "_monitor" / "lock.json").write_text(json.dumps({
            "run_id": "r0", "host": "h", "pid": 1, "acquired": "2024-01-01T00:00:00",
            "expires": expires.replace(tzinfo=None).isoformat()}))

    hand_written(datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(MonitorLocked, match="r0"):
        MonitorLock(root, "m", "r1", timedelta(minutes=1), heartbeat=False).acquire()
    hand_written(datetime(2024, 1, 1, 0, 30))
    lock = MonitorLock(root, "m", "r1", timedelta(minutes=1), heartbeat=False)
    lock.acquire()
    assert lock.took_over is not None and lock.took_over.run_id == "r0"
    lock.release()


def test_a_format_1_ledger_is_read_and_written_back_as_format_2(tmp_path) -> None:
    """Format 2 added fields an rsflow that knows format 1 could not read (it failed with a TypeError on the
    unknown keys): the number moved, so such an rsflow refuses the file naming the upgrade instead."""
    from rsflow.monitor.ledger import Ledger

    old = {"format": 1, "monitor": "m", "watermark": "2024-05-02T10:00:00Z", "backfill": None,
           "items": {"s0": {"id": "s0", "collection": "c", "datetime": "2024-05-02T10:00:00Z", "state": "done",
                            "attempts": 1, "run_id": "r"}},
           "runs": []}
    ledger = Ledger.from_json(old)
    assert ledger.items["s0"].alone is False and ledger.to_json()["format"] == 2
    with pytest.raises(ValueError, match=r"ledger format 3 is not one of \(1, 2\); upgrade rsflow"):
        Ledger.from_json({**old, "format": 3})
