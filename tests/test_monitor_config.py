"""Monitor parts without Ray: config checks, schedule, ledger, lock, atomic store, change rules.

Bad configs fail before any work with one line naming the key (through the real CLI, exit code 2).
The lock is exercised on a real local directory and on fsspec's in-memory object store.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
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
    ({"collections": []}, "collections", "names no collection"),
    ({"schedule": "0 25 * * *"}, "schedule", "0-23"),
    ({"start": "yesterday"}, "start", "date"),
    ({"retry": {"max_attempts": 0}}, "retry.max_attempts", "between 1"),
    ({"lock": {"expiry": "2s"}}, "lock.expiry", "between"),
    ({"change": {"object_iou": 2}}, "change.object_iou", "IoU"),
    ({"webhook": {"url": "ftp://x"}}, "webhook.url", "http"),
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
    changes = ensure_changes_report(cfg, load_ledger(root, "harbour"))
    assert list(changes["change"]) == ["answer_flipped"]
    assert store.read_bytes(store.join(root, CHANGES_NAME)) and store.read_bytes(
        store.join(root, REPORT_NAME)
    )
    assert len(ensure_changes_report(cfg, load_ledger(root, "harbour"))) == 0  # up to date: not rebuilt

    # an uncommitted partition (a killed run's) is removed; committed ones stay
    write_partitions(root, "run-2", table.slice(0, 1))
    removed = remove_leftovers(root, load_ledger(root, "harbour"))
    assert removed == ["results/date=2024-05-01/part-run-2.parquet"]
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
