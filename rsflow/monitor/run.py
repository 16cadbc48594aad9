"""One monitor run: new scenes only, results committed before they count, then what changed.

Layout of a monitor's output root (local directory or fsspec URL)::

    OUTPUT/
      results/date=YYYY-MM-DD/part-<run id>.parquet   GeoParquet 1.1, partitioned by acquisition date (UTC)
      changes.parquet                                  every change between consecutive observations
      report.html                                      map + timeline per tile (opens offline)
      runs/<run id>.json                               what each committed run did (search, items, counts)
      _monitor/ledger.json                             items done / failed / given up, watermark, runs
      _monitor/last_run.json                           the latest run, whatever it did (for status)
      _monitor/lock.json                               while a run holds the lock
      _monitor/work/<run id>/                          a run's region output before it is partitioned

A run, in order (:func:`run_monitor`):

1. checks the model and that the output root can be written (bad input fails here, before anything);
2. takes the lock (:mod:`rsflow.monitor.lock`) or exits, naming the holder;
3. reads the ledger (a root with published results and no committed run in its ledger is refused:
   :func:`check_results_have_a_ledger`) and removes what an unfinished run left: hidden result files and
   run records no committed run lists, work folders, temporary files (never a published partition);
4. searches items from ``watermark - lookback`` (or ``start``; earlier when an item to retry is
   older), every one of them however the API orders a capped search (:func:`collect_items`), and
   keeps the newest ``max_items`` not done and not given up (the older ones are the ledger's backfill,
   which the next runs search first); items the search refuses (no assets, an id another item has) are
   failed items of the ledger, with the reason; after two runs that died with an item, the oldest such
   item runs alone (:func:`_isolate_crashed`; the others wait, recorded);
5. connects to the cluster (one that cannot be reached fails the run here, with nothing counted), saves
   the items' attempts in the ledger (a run that dies in the pipeline has tried them; a pipeline that
   raises ``ConnectionError`` gives them back), then runs the region pipeline on exactly those items
   (:func:`rsflow.pipeline.run_region`, into ``_monitor/work/<run id>``);
6. writes the rows of the items that succeeded, and of items it gives up while some of their tiles
   answered (the ok rows and the failed tile rows, with their reasons: everything that could be computed
   for that date), into the date partitions, one new file per date, each atomically, and its run record;
7. **commits**: saves the ledger (items done, failed items' attempts, items given up, watermark,
   the run's files, and, after a run that tried a crash suspect alone, the other suspects cleared:
   :func:`_clear_suspects`) in one atomic write. Until then nothing it wrote counts: a run killed before
   this leaves the watermark, the runs and the done items as they were (its items only have one more
   attempt), and step 3 of the next run deletes its files, so no (tile, date, task, prompt) row is
   ever in the dataset twice;
8. recomputes ``changes.parquet`` and ``report.html`` from the committed results, calls the
   webhook when this run's items brought changes, and deletes its work folder.

A run that finds nothing new writes nothing but ``_monitor/last_run.json`` (and the ledger, when it gave
items up or counted failures of items it did not run: refused, no longer found). The changes and report
carry the id of the run they reflect; any run that finds them behind the ledger (a run killed
between steps 7 and 8) rebuilds them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import posixpath
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from shapely.geometry import mapping

from rsflow.errors import GpuUnavailable, RequestError, request_error_in
from rsflow.hrefs import redact
from rsflow.monitor import store
from rsflow.monitor.changes import CHANGE_COLUMNS, RESULT_COLUMNS_USED, detect_changes, timelines
from rsflow.monitor.config import ChangeRules, MonitorConfig, as_config_error, probe_output_root
from rsflow.monitor.ledger import (
    ItemRecord,
    ItemState,
    Ledger,
    RunRecord,
    advance_watermark,
    load_ledger,
    parse_time,
    save_ledger,
)
from rsflow.monitor.lock import LockInfo, MonitorLock, read_lock
from rsflow.monitor.webhook import WebhookResult, send_webhook
from rsflow.request import search_geometry

logger = logging.getLogger(__name__)

RESULTS_DIR = "results"
RUNS_DIR = "runs"
WORK_DIR = "_monitor/work"
CHANGES_NAME = "changes.parquet"
REPORT_NAME = "report.html"
LAST_RUN_NAME = "_monitor/last_run.json"
#: Schema metadata key of changes.parquet: the committed run it reflects.
CHANGES_RUN_KEY = b"rsflow:monitor_run"
#: Schema metadata key of changes.parquet: the change rules it was computed with (``_rules_tag``).
CHANGES_RULES_KEY = b"rsflow:change_rules"


@dataclass(frozen=True)
class MonitorRunResult:
    """What one run did."""

    run_id: str
    outcome: str
    """``processed`` (items were run and committed) or ``nothing-new``."""
    search_window: str
    """The datetime interval searched."""
    items_found: int
    """Items the search returned."""
    items_done: list[str] = field(default_factory=list)
    items_failed: list[str] = field(default_factory=list)
    """Items that failed this run and will be retried."""
    items_given_up: list[str] = field(default_factory=list)
    items_partial: list[str] = field(default_factory=list)
    """Items of ``items_given_up`` whose rows this run committed (some tiles failed on every attempt, the
    others answered): their ok rows and failed tile rows are in the results."""
    files: list[str] = field(default_factory=list)
    """Files the run added (relative to the output root)."""
    removed: list[str] = field(default_factory=list)
    """Leftovers of unfinished runs that this run deleted."""
    new_changes: int = 0
    """Changes that involve this run's items."""
    changes_by_kind: dict[str, int] = field(default_factory=dict)
    watermark: str | None = None
    webhook: WebhookResult | None = None
    refused: dict[str, str] = field(default_factory=dict)
    """Items the search refused (ledger key -> why); also in ``items_failed`` or ``items_given_up``."""


def run_monitor(config: MonitorConfig, *, address: str | None = None) -> MonitorRunResult:
    """Run the monitor once (see the module docstring).

    Raises:
        RequestError: a bad model or an output root that cannot be written (before any work).
        MonitorLocked: another run holds the lock (nothing was touched).
        SourceError: the STAC source could not be searched (nothing committed).
    """
    from rsflow.errors import ModelError
    from rsflow.models.spec import model_input_size, resolve_adapter, resolve_model_dir, resolve_prompt_format

    started = datetime.now(UTC)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    try:  # the model's files, read before the lock is taken or anything searched or written
        request = config.request
        resolve_adapter(request.model)
        resolve_model_dir(request.model)
        # What the pipeline checks against the model, checked here: found inside run_region, each failed run
        # counted an attempt against every pending scene, and after three the scenes were given up for good.
        request.tile.resolved(model_input_size(request.model))  # an overlap or --image-size the model refuses
        request.inputs.prompts(request.tasks, resolve_prompt_format(request.model))  # a task the family cannot do
    except ModelError as exc:
        raise RequestError("model.model", str(exc)) from None
    except RequestError as exc:  # named by its flag (--model, --adapter): the config key instead
        raise as_config_error(exc) from None
    root = config.output
    if _first_run(root):  # nothing is written into a new root before the search's own checks passed
        try:
            _check_search(config, started)
        except RequestError as exc:
            raise as_config_error(exc) from None
    probe_output_root(root)
    _check_ledger_owner(root, config.name)
    with MonitorLock(root, config.name, run_id, config.lock_expiry, max_hold=config.lock_max_hold) as lock:
        last: dict[str, Any] = {"run_id": run_id, "started": _iso(started), "outcome": "failed"}
        if lock.took_over is not None:
            last["took_over_lock_of"] = lock.took_over.run_id
        try:
            result = _run_locked(config, lock, run_id, started, address)
        except BaseException as exc:
            if isinstance(exc, RequestError):  # found by the search (a collection the catalog lost): the key
                exc = as_config_error(exc)
            last.update(finished=_iso(datetime.now(UTC)), error=redact(f"{type(exc).__name__}: {exc}")[:2000])
            _write_last_run(root, last)
            if isinstance(exc, RequestError):
                raise exc from None
            raise
        last.update(
            finished=_iso(datetime.now(UTC)),
            outcome=result.outcome,
            search_window=result.search_window,
            items_found=result.items_found,
            items_done=len(result.items_done),
            items_failed=len(result.items_failed),
            items_given_up=len(result.items_given_up),
            items_given_up_with_rows=len(result.items_partial),
            items_refused=result.refused,
            new_changes=result.new_changes,
            watermark=result.watermark,
            removed_leftovers=len(result.removed),
            webhook=_webhook_record(result.webhook),
        )
        _write_last_run(root, last)
    return result


def _webhook_record(hook: WebhookResult | None) -> dict[str, Any] | None:
    """A delivery as ``last_run.json`` stores it: its error passed through :func:`rsflow.hrefs.redact`, as
    :mod:`~rsflow.monitor.webhook` already does (the file sits under an output root that is often shared)."""
    if hook is None:
        return None
    record = dataclasses.asdict(hook)
    record["error"] = redact(hook.error) if hook.error else hook.error
    return record


def _first_run(root: str) -> bool:
    """Whether ``root`` holds no monitor state yet (False when it cannot be listed: the write probe that
    follows says why)."""
    try:
        return not store.list_files(store.join(root, "_monitor"))
    except Exception:  # noqa: BLE001 - any storage failure: probe_output_root reports it
        return False


def _search(config: MonitorConfig, begin: str, end: str, max_items: int) -> Any:
    """The monitor's search of ``begin/end`` (ISO 8601, ``..`` open), at most ``max_items`` items."""
    from rsflow.search import SearchQuery, normalize_datetime, search_items

    request = config.request
    return search_items(SearchQuery(
        stac=request.stac, collections=request.collections, intersects=mapping(search_geometry(request.aoi)),
        datetime=normalize_datetime(f"{begin}/{end}"), max_cloud=request.max_cloud, max_items=max_items,
    ))


def _check_search(config: MonitorConfig, now: datetime) -> None:
    """One search of a first run's window for one item, before the output root is touched: what only the
    source can tell (a collection it does not have, a catalog that is not one) is refused with nothing
    written; a later run records such a failure in ``last_run.json`` instead.

    Raises:
        RequestError: the request's flag, e.g. ``--collections`` (the caller names the config key).
    """
    _search(config, _iso(search_start(config, Ledger(monitor=config.name), now)), "..", 1)


def _run_locked(
    config: MonitorConfig, lock: MonitorLock, run_id: str, started: datetime, address: str | None
) -> MonitorRunResult:
    from rsflow.pipeline import run_region
    from rsflow.search import normalize_datetime

    root = config.output
    ledger = load_ledger(root, config.name)
    check_results_have_a_ledger(root, ledger)  # before anything is deleted or searched
    removed = remove_leftovers(root, ledger)

    interrupted = _give_up_interrupted(ledger, config.max_attempts)
    watermark_before = ledger.watermark
    advance_watermark(ledger, started)  # a watermark in the future (an older rsflow's) comes back before the search
    repaired = ledger.watermark != watermark_before
    if ledger.backfill:  # the older part of a window whose items were more than one run takes
        start_iso, end_iso = ledger.backfill["start"], ledger.backfill["before"]
    else:
        start_iso, end_iso = _iso(search_start(config, ledger, started)), ".."
    window = normalize_datetime(f"{start_iso}/{end_iso}")
    window_start, window_end = parse_time(start_iso), parse_time(end_iso) if end_iso != ".." else None
    request = config.request

    def search(begin: str, end: str) -> Any:
        return _search(config, begin, end, request.max_items)

    found = collect_items(
        search, window_start, window_end, now=started,
        is_pending=lambda i: _is_pending(ledger.items.get(str(i["id"]))) and _taken_by(ledger, i) is None,
        max_items=request.max_items,
    )
    for item in found.items:  # an id a ledger record of another collection holds: refused, as within a search
        other = _taken_by(ledger, item)
        if other is not None:
            found.refused.append((item, _same_id_recorded(other)))
    backfill = found.backfill
    if backfill is not None:
        logger.warning(
            "monitor %s: %s holds more items to process than max_items %d; the next runs process the older ones, "
            "up to %s",
            config.name,
            window,
            request.max_items,
            backfill["before"],
        )
    _warn_future(config.name, found, started)
    pending = _isolate_crashed(found.pending, ledger)
    # the suspect tried alone, if any: a normal finish of this run clears the others (below)
    isolated = [str(i["id"]) for i in pending if _is_suspect(ledger.items.get(str(i["id"])))]
    held = {str(i["id"]) for i in pending}
    for item in found.pending:  # held back while a crash is isolated: kept in the ledger, so searched again
        item_id = str(item["id"])
        if item_id not in held and item_id not in ledger.items:
            ledger.items[item_id] = ItemRecord(
                id=item_id, collection=str(item.get("collection") or ""), datetime=str(_item_time(item) or ""),
                state="failed", attempts=0, run_id=run_id, error=WAITING,
            )
    skipped = len(found.items) - len(found.pending)
    logger.info(
        "monitor %s: %d items since %s (%d searches), %d already done or given up, %d to process",
        config.name,
        len(found.items),
        window,
        found.searches,
        skipped,
        len(pending),
    )
    vanished_failed, vanished_given_up = _count_vanished(
        ledger, found, window_start, window_end, run_id,
        config.max_attempts,
    )
    refused_failed, refused_given_up, refused = _record_refused(ledger, found, run_id, config.max_attempts)
    vanished_failed += refused_failed  # failed without running: both kinds count like a run's failures
    given_up_before = [*interrupted, *vanished_given_up, *refused_given_up]  # given up without running again
    if not pending:
        if backfill != ledger.backfill or vanished_failed or given_up_before or repaired:
            ledger.backfill = backfill
            advance_watermark(ledger, started)  # items given up count as in a processed run: the search moves on
            lock.check()
            save_ledger(root, ledger)
        if any(r.notified is False for r in ledger.runs):  # changes an earlier run committed but never sent
            changes = ensure_changes_report(config, ledger, force=True)
            _notify(config, ledger, lock, run_id, changes, set(), [], [])
        ensure_changes_report(config, ledger)
        return MonitorRunResult(
            run_id=run_id,
            outcome="nothing-new",
            search_window=window or "",
            items_found=len(found.items),
            items_failed=vanished_failed,
            items_given_up=given_up_before,
            removed=removed,
            watermark=ledger.watermark,
            refused=refused,
        )

    # The cluster first: one that cannot be reached (ray.init raises ConnectionError) fails the run before any
    # attempt is counted below. During an outage every run died with all its items, and after two such runs
    # the items were tried one a run and given up after max_attempts, while nothing was wrong with them.
    _connect(address)

    # Each item's attempt is counted before the pipeline runs: a run that dies inside it (an OOM kill, a
    # worker crash, a pipeline error) leaves them failed with one more attempt, so that an item that always
    # crashes is tried alone next time and then given up instead of holding every new item back for ever.
    before_attempt = {str(i["id"]): ledger.items.get(str(i["id"])) for i in pending}
    attempts_now = {}
    for item in pending:
        item_id = str(item["id"])
        previous = ledger.items.get(item_id)
        attempts_now[item_id] = (previous.attempts if previous else 0) + 1
        ledger.items[item_id] = ItemRecord(
            id=item_id, collection=str(item.get("collection") or ""), datetime=str(_item_time(item) or ""),
            state="failed", attempts=attempts_now[item_id], run_id=run_id, error=INTERRUPTED,
            alone=len(pending) == 1,
        )
    lock.check()
    save_ledger(root, ledger)

    scratch = store.join(root, WORK_DIR, run_id)
    try:
        region = run_region(
            dataclasses.replace(request, output=scratch, overwrite=False, preview=False),
            address=address,
            items=pending,
        )
    except Exception as exc:
        # The cluster went away (or never answered) under the run, it gave --require-gpu no GPU node, or the
        # request is bad (also as a Ray worker raised it, wrapped in Ray's errors): not the items' doing. The
        # driver is alive to say so, so their records are put back as they were: the run fails, and no
        # attempt is counted.
        if isinstance(exc, ConnectionError | GpuUnavailable) or request_error_in(exc) is not None:
            _restore(root, ledger, lock, before_attempt)
        raise
    table = _region_rows(scratch, region.manifest)
    outcome = item_outcomes(table, pending)
    done = [i for i in pending if outcome[str(i["id"])]["failed"] is None]

    # The ledger as it will be once committed.
    failed, given_up = list(vanished_failed), list(given_up_before)
    states: dict[str, ItemState] = {}
    for item in pending:
        item_id = str(item["id"])
        if outcome[item_id]["failed"] is None:
            states[item_id] = "done"
        elif attempts_now[item_id] >= config.max_attempts:
            states[item_id] = "given_up"
            given_up.append(item_id)
        else:
            states[item_id] = "failed"
            failed.append(item_id)
    # An item given up while some of its tiles answered keeps its rows: the ok ones and a failed row with the
    # reason for each failed tile, as the region run wrote them. They used to be dropped with the item, so its
    # date was missing for every tile of the AOI (the good ones were re-inferred on each retry, then thrown
    # away). An item to retry writes nothing: its next attempt writes them all, so no row is there twice.
    partial = [str(i["id"]) for i in pending
               if states[str(i["id"])] == "given_up" and outcome[str(i["id"])]["ok_tiles"]]
    kept = [*(str(i["id"]) for i in done), *partial]
    files = write_partitions(root, run_id, table.filter(pc.is_in(table["item_id"], pa.array(kept, pa.string()))))
    for item in pending:
        item_id = str(item["id"])
        info = outcome[item_id]
        error = info["failed"]
        if item_id in partial:
            error = (f"{error}; given up with its rows kept: {info['ok_tiles']} of {info['tiles']} tiles ok, the "
                     "failed ones as status=failed rows")
            logger.warning("monitor %s: %s given up after %d attempts: %s", config.name, item_id,
                           attempts_now[item_id], error)
        ledger.items[item_id] = ItemRecord(
            id=item_id,
            collection=str(item.get("collection") or ""),
            datetime=str(_item_time(item) or ""),
            state=states[item_id],
            attempts=attempts_now[item_id],
            run_id=run_id,
            error=error,
            tiles=info["tiles"],
            rows=info["rows"] if item_id in kept else 0,
        )
    cleared = _clear_suspects(ledger, set(attempts_now)) if isolated else []
    if cleared:
        logger.info(
            "monitor %s: the run that tried %s alone finished: %d items held back meanwhile are no longer "
            "suspected of crashing runs (the next run takes them together): %s",
            config.name, isolated[0], len(cleared), ", ".join(cleared[:10]),
        )
    advance_watermark(ledger, started)  # an item dated after the run's start does not move it (a mistyped year)
    ledger.backfill = backfill
    record_name = posixpath.join(RUNS_DIR, f"{run_id}.json")
    run_record = {
        "run_id": run_id,
        "monitor": config.name,
        "started": _iso(started),
        "finished": _iso(datetime.now(UTC)),
        "config": config.summary(),
        "search": {
            "window": window,
            "found": len(found.items),
            "skipped": skipped,
            "searches": found.searches,
            "backfill": backfill,
        },
        "items": {"done": [str(i["id"]) for i in done], "failed": failed, "given_up": given_up,
                  "given_up_with_rows": partial, "cleared": cleared},
        "errors": {**{k: v["failed"] for k, v in outcome.items() if v["failed"]},
                   **{k: f"refused: {v}" for k, v in refused.items()}},
        "files": files,
        "region_manifest": region.manifest,
    }
    store.write_json_atomic(store.join(root, record_name), run_record)
    ledger.runs.append(
        RunRecord(
            run_id=run_id,
            started=_iso(started),
            finished=_iso(datetime.now(UTC)),
            items_done=[str(i["id"]) for i in done],
            items_failed=failed,
            items_given_up=given_up,
            items_partial=partial,
            files=[*files, record_name],
            request_fingerprint=request_fingerprint(region.manifest),
            notified=False if config.webhook is not None else None,
        )
    )
    _warn_if_request_changed(config.name, ledger)

    lock.check()  # never commit over a run that took an expired lock over
    save_ledger(root, ledger)  # <- the commit
    publish_partitions(root, files)  # a kill before this is rolled forward by the next run (remove_leftovers)
    logger.info(
        "monitor %s: run %s committed: %d items done, %d failed, %d given up (%d with their rows); watermark %s",
        config.name,
        run_id,
        len(done),
        len(failed),
        len(given_up),
        len(partial),
        ledger.watermark,
    )

    changes = ensure_changes_report(config, ledger, force=True)
    done_ids = {str(i["id"]) for i in done}
    new, by_kind, hook = _notify(config, ledger, lock, run_id, changes, {*done_ids, *partial}, failed, given_up)
    store.remove(scratch, recursive=True)
    return MonitorRunResult(
        run_id=run_id,
        outcome="processed",
        search_window=window or "",
        items_found=len(found.items),
        items_done=sorted(done_ids),
        items_failed=failed,
        items_given_up=given_up,
        items_partial=partial,
        files=[*files, record_name],
        removed=removed,
        new_changes=len(new),
        changes_by_kind=by_kind,
        watermark=ledger.watermark,
        webhook=hook,
        refused=refused,
    )


# --- steps ------------------------------------------------------------------------------------


def search_start(config: MonitorConfig, ledger: Ledger, now: datetime) -> datetime:
    """Where a run's search starts: ``watermark - lookback`` (not before ``start``), or ``start``
    (default ``now - lookback``) for a first run; earlier when an item to retry is older."""
    watermark = parse_time(ledger.watermark)
    if watermark is None:
        begin = config.start or (now - config.lookback)
    else:
        begin = watermark - config.lookback
        if config.start is not None:
            begin = max(begin, config.start)
    for record in ledger.items.values():
        when = parse_time(record.datetime)
        if record.state == "failed" and when is not None and when < begin:
            begin = when
    return begin


def _notify(
    config: MonitorConfig, ledger: Ledger, lock: MonitorLock, run_id: str, changes: pd.DataFrame,
    done_ids: set[str], failed: list[str], given_up: list[str],
) -> tuple[pd.DataFrame, dict[str, int], WebhookResult | None]:
    """The changes that concern ``done_ids`` (the items whose rows this run committed: done, and given up with
    their rows) and the items of committed runs whose changes were never delivered (``RunRecord.notified``
    False), sent to the webhook; those runs are then marked notified (a second ledger write) unless the
    delivery failed. Returns (those changes, counts by kind, the delivery)."""
    owed = [r for r in ledger.runs if r.notified is False]
    items = done_ids | {i for r in owed for i in (*r.items_done, *r.items_partial)}
    new = (
        changes[changes["after_item_id"].isin(items) | changes["before_item_id"].isin(items)]
        if len(changes)
        else changes
    )
    by_kind = (
        {str(k): int(v) for k, v in new["change"].value_counts().sort_index().items()} if len(new) else {}
    )
    hook = None
    if len(new) and config.webhook is not None:
        hook = send_webhook(
            config.webhook, webhook_payload(config, run_id, new, by_kind, items, failed, given_up, ledger)
        )
    if owed and (hook is None or hook.delivered):
        for record in owed:
            record.notified = True
        lock.check()
        save_ledger(config.output, ledger)
    return new, by_kind, hook


INTERRUPTED = "the run that processed it did not finish (killed, or the pipeline raised)"
"""``error`` of items whose attempt began in a run that never recorded its outcome."""

WAITING = "not tried yet: held back while the item that crashed runs was tried alone"
"""``error`` of new items a run left for later while it isolated a crash (:func:`_isolate_crashed`)."""

CLEARED = ("a run that died had it, but a run without it then finished: that attempt is not held against it "
           "(given back)")
"""``error`` of a crash suspect that a finished isolating run cleared (:func:`_clear_suspects`)."""

VANISHED = "no longer returned by the search (the AOI, max_cloud or the catalog changed)"
"""``error`` of a failed item that a complete search of its time no longer finds."""


@dataclass
class Collected:
    """What :func:`collect_items` found."""

    items: list[dict[str, Any]]
    """Every item found (once each), newest windows first."""
    pending: list[dict[str, Any]]
    """The items to process, at most ``max_items``."""
    backfill: dict[str, str] | None
    """``{"start", "before"}`` (inclusive) still to search, when more items wait than one run takes."""
    searches: int
    crowded: list[str] = field(default_factory=list)
    """Instants (one second) holding more than ``max_items`` items: only ``max_items`` of them were seen."""
    refused: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    """Items the search returned but refused, with why (``SearchResult.refused``: no geometry, no assets, an
    id another item has; also an id another search of the window returned for another item)."""

    @property
    def complete(self) -> bool:
        """Every item of the window was seen."""
        return self.backfill is None and not self.crowded


def collect_items(
    search: Any, start: datetime, end: datetime | None, *, now: datetime, is_pending: Any, max_items: int,
) -> Collected:
    """Every item of ``[start, end]`` (``end`` None: open), however the API orders a search that stops at
    ``max_items``: such a window is split in two at its middle time and each half searched, the newer
    first, down to windows of one second. Items to process (``is_pending``) are gathered, newest first,
    up to ``max_items``; the window where they run over gives its newest, and everything older (up to the
    first item left out, inclusive) becomes the backfill, which the next runs search the same way. Done
    items never count towards ``max_items``, so items that arrive late inside the window are found however
    many done ones it holds.

    Args:
        search: ``(start_iso, end_iso_or_"..") -> result`` with ``items``, ``reached_max_items`` and
            ``refused`` (optional).
        start, end: the window (UTC); ``now`` bounds an open end for splitting.
    """
    stack: list[tuple[datetime, datetime | None]] = [(start, end)]
    items: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    crowded: list[str] = []
    refused: list[tuple[dict[str, Any], str]] = []
    searches = 0
    while stack:
        begin, finish = stack.pop()
        found = search(_iso(begin), _iso(finish) if finish is not None else "..")
        searches += 1
        upper = finish if finish is not None else max(now, begin)
        if found.reached_max_items and upper - begin > timedelta(seconds=1):
            middle = begin + (upper - begin) / 2
            stack.append((begin, middle - timedelta(microseconds=1)))
            stack.append((middle, finish))  # searched first: newer items first
            continue
        if found.reached_max_items:
            crowded.append(_iso(begin))
            logger.warning("more than max_items %d items between %s and %s: only %d of them are seen",
                           max_items, _iso(begin), _iso(upper), len(found.items))
        refused += list(getattr(found, "refused", None) or [])
        new = []
        for item in found.items:  # an item on the edge of two windows comes back: the same one, dropped
            first = seen.setdefault(str(item["id"]), item)
            if first is item:
                new.append(item)
            elif (item.get("collection"), _item_time(item)) != (first.get("collection"), _item_time(first)):
                refused.append((item, _same_id(first)))  # another item with that id: rsflow keys items by id
        waiting = [i for i in new if is_pending(i)]
        items += new
        if len(pending) + len(waiting) > max_items:  # this window has them all: the newest that fit
            waiting.sort(key=lambda i: (parse_time(_item_time(i)) or begin, str(i["id"])), reverse=True)
            room = max_items - len(pending)
            pending += waiting[:room]
            before = parse_time(_item_time(waiting[room])) or upper  # inclusive: the done ones come back
            backfill = {"start": _iso(start), "before": _iso(before)}
            return Collected(items, pending, backfill, searches, crowded, refused)
        pending += waiting
    return Collected(items, pending, None, searches, crowded, refused)


def _warn_future(name: str, found: Collected, now: datetime) -> None:
    """Name the items to process dated after ``now`` (a mistyped year, a catalog's bad entry): they are
    processed, but do not move the watermark (:func:`~rsflow.monitor.ledger.advance_watermark`), which they
    used to push past every real scene."""
    future = [i for i in found.pending if (parse_time(_item_time(i)) or now) > now]
    if future:
        logger.warning(
            "monitor %s: %d items are dated after this run's start %s (a wrong datetime in the catalog?); they do "
            "not move the watermark: %s", name, len(future), _iso(now),
            ", ".join(f"{i['id']} ({_item_time(i)})" for i in future[:10]),
        )


def _same_id(first: dict[str, Any]) -> str:
    """Why an item is refused whose id ``first`` has (the words of :func:`rsflow.search._screen`)."""
    return (f"another item with id {str(first.get('id'))!r} (collection {first.get('collection')!r}, "
            f"datetime {_item_time(first)!r}) was found first; rsflow keys results by item id")


def _taken_by(ledger: Ledger, item: dict[str, Any]) -> ItemRecord | None:
    """The ledger record of another item that has ``item``'s id (another collection), or None.

    The ledger is keyed by item id: such an item matched the other's record and, when that was done, was
    skipped as already processed, recorded nowhere (the duplicates of one search are refused and recorded
    as ``collection/id``; those of two runs were not)."""
    record = ledger.items.get(str(item["id"]))
    collection = str(item.get("collection") or "")
    if record is None or not record.collection or not collection or record.collection == collection:
        return None
    return record


def _same_id_recorded(record: ItemRecord) -> str:
    """Why an item is refused whose id a ledger record of another collection holds (cf. :func:`_same_id`)."""
    return (f"another item with id {record.id!r} (collection {record.collection!r}, datetime "
            f"{record.datetime!r}) is in the ledger ({record.state}); rsflow keys results by item id")


def _record_refused(
    ledger: Ledger, found: Collected, run_id: str, max_attempts: int
) -> tuple[list[str], list[str], dict[str, str]]:
    """Items the search refused are failed items of the ledger, with the reason, an attempt per run that
    finds them so, and given up after ``max_attempts``, as items the pipeline fails are: they used to be
    dropped with a log line, so that a scene never showed in the ledger, ``status`` or the exit code. An item
    whose id another item holds (the kept one, or a ledger record of another collection) is recorded as
    ``collection/id``. Returns the keys (still failed, given up) and each key's reason."""
    kept = {str(i["id"]) for i in found.items}
    reasons: dict[str, str] = {}
    failed: list[str] = []
    given_up: list[str] = []
    for item, reason in found.refused:
        item_id, collection = str(item.get("id")), str(item.get("collection") or "")
        known = ledger.items.get(item_id)
        if known is not None and known.collection and known.collection == collection and item_id in kept:
            # the ledger's own item, refused in this search because another collection's item with its id came
            # first: that one is the duplicate (refused by _taken_by), not this one
            continue
        key = item_id
        if item_id in kept or (known is not None and known.collection != collection):
            key = f"{collection}/{item_id}"
        record = ledger.items.get(key)
        if key in reasons or (record is not None and record.state != "failed"):  # done, given up: said so
            continue
        reasons[key] = reason
        attempts = (record.attempts if record else 0) + 1
        state = "given_up" if attempts >= max_attempts else "failed"
        ledger.items[key] = ItemRecord(
            id=key, collection=collection, datetime=str(_item_time(item) or ""), state=state,
            attempts=attempts, run_id=run_id, error=f"refused: {reason}",
        )
        (given_up if state == "given_up" else failed).append(key)
    if reasons:
        logger.warning("%d items refused by the search, recorded as failed: %s", len(reasons),
                       "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:5]))
    return failed, given_up, reasons


def _give_up_interrupted(ledger: Ledger, max_attempts: int) -> list[str]:
    """Items whose last attempt was in a run that died (:data:`INTERRUPTED`), in which they ran alone
    (``ItemRecord.alone``), and that have had ``max_attempts`` attempts are given up. Returns their ids.

    Alone: a run that died with other items may have died of any of them, or of the cluster. With
    ``retry.max_attempts`` 1 or 2, every item of two such runs used to be given up before
    :func:`_isolate_crashed` could try one alone; now an item that crashed only in company stays failed and is
    isolated, so "a scene that kills runs is given up on its own" holds for every ``max_attempts``. Its
    attempts can then pass ``max_attempts`` (one more per crash in company)."""
    ids = []
    for record in ledger.items.values():
        if (record.state == "failed" and record.error == INTERRUPTED and record.alone
                and record.attempts >= max_attempts):
            record.state = "given_up"
            ids.append(record.id)
    return ids


def _is_suspect(record: ItemRecord | None) -> bool:
    """Its last attempt was in a run that died, and it has had two attempts or more: after a second crash
    the run may die of one of its items, not of the cluster."""
    return (record is not None and record.state == "failed" and record.error == INTERRUPTED
            and record.attempts >= 2)


def _isolate_crashed(pending: list[dict[str, Any]], ledger: Ledger) -> list[dict[str, Any]]:
    """The items a run takes when some are crash suspects (:func:`_is_suspect`): the oldest suspect alone;
    otherwise ``pending``.

    Alone, because a suspect has one attempt or less left before ``max_attempts`` with the default 3: in a
    run with others (a new scene that kills runs, say) that died again it would be given up for another
    item's crash. If the suspect kills the run again it is given up on its own; if the run finishes, the
    crash was not its doing, and the other suspects are cleared (:func:`_clear_suspects`): the isolation
    ends there, and the next run takes them all, and the items held back meanwhile, together again (after an
    outage of the cluster, which made every item a suspect, the backlog is done in two runs)."""
    crashed = [i for i in pending if _is_suspect(ledger.items.get(str(i["id"])))]
    if not crashed:
        return pending
    return [min(crashed, key=lambda i: (str(_item_time(i) or ""), str(i["id"])))]


def _clear_suspects(ledger: Ledger, tried: set[str]) -> list[str]:
    """After an isolating run finished normally, the crash suspects it held back (all of the ledger's, also
    those beyond ``max_items``) are no longer suspects: the cluster worked, and the item tried alone was not
    the cause, or is now failed or done on its own. Each gets back the attempt of the crash that made it a
    suspect (error :data:`CLEARED`), so that a culprit still among them, which kills their next run together,
    makes them suspects again (two attempts), not items given up. Returns their ids."""
    cleared = []
    for record in ledger.items.values():
        if record.id not in tried and _is_suspect(record):
            record.attempts -= 1
            record.error = CLEARED
            cleared.append(record.id)
    return sorted(cleared)


def _connect(address: str | None) -> None:
    """Connect to the Ray cluster the region run will use (:func:`rsflow.pipeline.run_region` does the same,
    and then does nothing more)."""
    from rsflow.pipeline import _ensure_ray

    _ensure_ray(address)


def _restore(root: str, ledger: Ledger, lock: MonitorLock, records: dict[str, ItemRecord | None]) -> None:
    """Put back the item records of a run's attempt count (``None``: an item the ledger did not know), for a
    run that failed of no item's doing. Failing to save is only logged: the run's own error says more."""
    for item_id, record in records.items():
        if record is None:
            ledger.items.pop(item_id, None)
        else:
            ledger.items[item_id] = record
    try:
        lock.check()
        save_ledger(root, ledger)
    except Exception:  # the caller re-raises the run's error
        logger.warning("could not put the items' attempts back in the ledger", exc_info=True)


def _count_vanished(ledger: Ledger, found: Collected, start: datetime | None, end: datetime | None, run_id: str,
                    max_attempts: int) -> tuple[list[str], list[str]]:
    """A failed item that a complete search of its time no longer returns (the AOI, max_cloud or the
    catalog changed) gets one more attempt, :data:`VANISHED` as its error, and is given up after
    ``max_attempts``: it used to stay failed for ever and keep every search reaching back to it.
    Returns the ids (still failed, given up)."""
    failed: list[str] = []
    given_up: list[str] = []
    if not found.complete or start is None:
        return failed, given_up
    # items the search refused were found, and are counted by _record_refused (under either key it may use)
    refused = {key for i, _ in found.refused
               for key in (str(i.get("id")), f"{i.get('collection') or ''}/{i.get('id')}")}
    ids = {str(i["id"]) for i in found.items} | refused
    for record in ledger.items.values():
        when = parse_time(record.datetime)
        if record.state != "failed" or record.id in ids or when is None or when < start or (end and when > end):
            continue
        record.attempts += 1
        record.error, record.run_id = VANISHED, run_id
        record.state = "given_up" if record.attempts >= max_attempts else "failed"
        (given_up if record.state == "given_up" else failed).append(record.id)
    return failed, given_up


def _item_time(item: dict[str, Any]) -> str | None:
    props = item.get("properties") or {}
    return props.get("datetime") or props.get("start_datetime")


def _is_pending(record: ItemRecord | None) -> bool:
    return record is None or record.state == "failed"


def remove_leftovers(root: str, ledger: Ledger) -> list[str]:
    """Delete what an unfinished run left: hidden result files (pending, temporary) no committed run lists,
    the run records of runs that never committed, the work folder, temporary files. Returns the relative
    paths removed.

    Never a published partition (a visible ``part-R.parquet``): only :func:`publish_partitions` makes one,
    after the commit, so one the ledger does not list was committed by a ledger that is gone (deleted to
    "reset" the monitor, lost, or restored from an older copy). They used to be deleted as an unfinished run's
    files, the whole dataset with them when the ledger was missing; they are kept (with their run records) and
    named in a warning. A root with published results and no committed run at all is refused before this
    (:func:`check_results_have_a_ledger`)."""
    committed = ledger.committed_files()
    removed = []
    results = [posixpath.join(RESULTS_DIR, rel) for rel in store.list_files(store.join(root, RESULTS_DIR))]
    unlisted = [p for p in results if not posixpath.basename(p).startswith(".") and p not in committed]
    if unlisted:
        logger.warning(
            "kept %d published result files that no committed run of the ledger lists (was _monitor/ledger.json "
            "restored from an older copy?); their items may be processed again beside them: %s",
            len(unlisted), ", ".join(unlisted[:10]),
        )
    kept_runs = {_partition_run(p) for p in unlisted}
    for path in results:
        head, name = posixpath.split(path)
        if not name.startswith("."):  # published: see the docstring
            continue
        if name.endswith(PENDING_SUFFIX):
            final = posixpath.join(head, name[1 : -len(PENDING_SUFFIX)])
            if final in committed:  # committed, killed before its rename: finish it
                publish_partitions(root, [final])
                logger.warning("published %s, which a run committed but did not rename", final)
                continue
        if path not in committed:
            store.remove(store.join(root, path))
            removed.append(path)
    for rel in store.list_files(store.join(root, RUNS_DIR)):
        path = posixpath.join(RUNS_DIR, rel)
        if path in committed or (not rel.startswith(".") and rel.removesuffix(".json") in kept_runs):
            continue
        store.remove(store.join(root, path))
        removed.append(path)
    work = store.list_files(store.join(root, WORK_DIR))
    if work:
        store.remove(store.join(root, WORK_DIR), recursive=True)
        removed.append(WORK_DIR + "/")
    # Temporaries of results/ and runs/ went with the uncommitted files above; the others sit at the
    # root (changes, report) or in _monitor/ (ledger, lock).
    for rel in [
        *_top_level_files(root),
        *(posixpath.join("_monitor", r) for r in store.list_files(store.join(root, "_monitor"))),
    ]:
        name = posixpath.basename(rel)
        # lock.json* belongs to the lock (rsflow.monitor.lock), which cleans up after itself: its temporaries are
        # named .lock.json.tmp-* (store.write_bytes_atomic) and lock.json.mutex.tmp-* (_create_exclusive); one
        # removed under a heartbeat's renewal made its os.replace fail
        if store.TMP_MARK in name and not rel.startswith(WORK_DIR) and not name.lstrip(".").startswith("lock.json"):
            store.remove(store.join(root, rel))
            removed.append(rel)
    if removed:
        logger.warning(
            "removed %d files left by an unfinished run: %s", len(removed), ", ".join(removed[:10])
        )
    return removed


def _partition_run(path: str) -> str:
    """``results/date=D/part-R.parquet`` -> ``R``."""
    return posixpath.basename(path).removeprefix("part-").removesuffix(".parquet")


def check_results_have_a_ledger(root: str, ledger: Ledger) -> None:
    """Refuse a root whose ``results/`` holds published partitions while its ledger lists no committed run.

    The ledger was deleted (the obvious way to "reset" a monitor), lost (a lifecycle rule, a partial copy) or
    replaced: its results were committed by runs it no longer knows. Going on processed every item again
    beside those rows (so each twice), and the old cleanup deleted the whole dataset first.

    Raises:
        RequestError: ``output``, saying how to go on.
    """
    if ledger.runs:
        return
    published = [rel for rel in store.list_files(store.join(root, RESULTS_DIR))
                 if not posixpath.basename(rel).startswith(".")]
    if published:
        raise RequestError(
            "output",
            f"{root} holds {len(published)} published result files ({RESULTS_DIR}/{published[0]}, ...) but no "
            "ledger of the runs that committed them (_monitor/ledger.json is missing or lists no run); restore "
            "_monitor/ledger.json from a copy, or give the monitor a new output root (to start again, move "
            f"{RESULTS_DIR}/ and {RUNS_DIR}/ away too)",
        )


def _top_level_files(root: str) -> list[str]:
    fs, path = store.filesystem(root)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")


def _check_ledger_owner(root: str, name: str) -> None:
    """Refuse, before the lock, an output root whose ledger belongs to another monitor."""
    try:
        load_ledger(root, name)
    except ValueError as exc:
        raise RequestError("output", f"{exc}; give this monitor its own output root") from None


def _region_rows(scratch: str, manifest: dict[str, Any]) -> pa.Table:
    """The rows of the region run's dataset: exactly the files its manifest lists, which must hold the
    rows it counts. Rows read back from a listing could miss a file (an object store's stale listing, a
    work folder removed by a run that took the lock over), and an item without rows would count as done.

    Raises:
        RuntimeError: a listed file is missing, or the rows are not those the manifest counts (the run
            then commits nothing, and its items are tried again).
    """
    files = [posixpath.basename(f) for f in manifest.get("files") or [] if str(f).endswith(".parquet")]
    present = set(_parquet_files(scratch))
    missing = [f for f in files if f not in present]
    if missing:
        raise RuntimeError(f"the region run's files {missing[:3]} are gone from {scratch}; nothing was committed")
    table = read_dataset_files(scratch, files)
    expected = (manifest.get("counts") or {}).get("rows_written")
    if expected is not None and table.num_rows != int(expected):
        raise RuntimeError(
            f"{scratch} holds {table.num_rows} rows where its run wrote {expected}; nothing was committed"
        )
    return table


def _parquet_files(directory: str) -> list[str]:
    return [rel for rel in store.list_files(directory) if rel.endswith(".parquet") and "/" not in rel]


def read_dataset_files(directory: str, files: list[str], columns: list[str] | None = None) -> pa.Table:
    """The result rows of ``files`` (relative to ``directory``) as one table of the written schema."""
    from rsflow.output import WRITTEN_SCHEMA

    fs, base = store.filesystem(directory)
    schema = WRITTEN_SCHEMA if columns is None else pa.schema([WRITTEN_SCHEMA.field(c) for c in columns])
    tables = [
        pq.read_table(posixpath.join(base, f), filesystem=fs, columns=schema.names).cast(schema)
        for f in files
    ]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def item_outcomes(table: pa.Table, items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Item id -> ``{"failed": reason or None, "tiles": n, "ok_tiles": n, "rows": n}``: an item failed when any
    of its tile rows failed (planning, reading or inference); skipped tiles (nodata) are not failures.
    ``ok_tiles`` counts the tiles with an ok row (an answer): an item given up with some has its rows kept."""
    cols = table.select(["item_id", "kind", "status", "error", "stage", "tile_id"]).to_pandas()
    out = {}
    for item in items:
        item_id = str(item["id"])
        rows = cols[cols["item_id"] == item_id]
        tiles = rows[rows["kind"] == "tile"]
        bad = tiles[tiles["status"] == "failed"]
        reason = None
        if len(bad):
            first = bad.iloc[0]
            reason = f"{bad['tile_id'].nunique()} tile(s) failed at {first['stage']}: {first['error']}"
        out[item_id] = {
            "failed": reason,
            "tiles": int(tiles["tile_id"].nunique()),
            "ok_tiles": int(tiles.loc[tiles["status"] == "ok", "tile_id"].nunique()),
            "rows": len(rows),
        }
    return out


def write_partitions(root: str, run_id: str, table: pa.Table) -> list[str]:
    """Write ``table`` as one file per acquisition date: ``results/date=D/part-<run id>.parquet``.

    Rows are sorted along a Hilbert curve of their centroids (then by tile, kind, task, prompt) so
    each file reads like the region job's output. Returns the relative paths written.
    """
    from rsflow.output import geometry_keys

    if table.num_rows == 0:
        return []
    dates = pc.strftime(table["datetime"], format="%Y-%m-%d")
    files = []
    for day in sorted(set(dates.to_pylist())):
        part = table.filter(pc.equal(dates, day))
        key = geometry_keys(part["geometry"].to_numpy(zero_copy_only=False))
        part = part.append_column("_key", pa.array(key, pa.int64()))
        order = pc.sort_indices(
            part,
            sort_keys=[
                ("_key", "ascending"),
                ("tile_id", "ascending"),
                ("kind", "descending"),
                ("task", "ascending"),
                ("prompt_key", "ascending"),
                ("prompt", "ascending"),
            ],
        )
        part = part.take(order).drop(["_key"])
        rel = posixpath.join(RESULTS_DIR, f"date={day}", f"part-{run_id}.parquet")
        store.write_parquet_atomic(part, store.join(root, pending_name(rel)))
        files.append(rel)
    return files


PENDING_SUFFIX = ".pending"
"""A result file is written under a hidden name (:func:`pending_name`) and renamed to its own by
:func:`publish_partitions` once the ledger that lists it is committed: a reader of ``OUTPUT/results``
(geopandas and pyarrow skip hidden files) never sees the rows of a run that was killed before its commit."""


def pending_name(rel: str) -> str:
    """``results/date=D/part-R.parquet`` -> ``results/date=D/.part-R.parquet.pending``."""
    folder, name = posixpath.split(rel)
    return posixpath.join(folder, f".{name}{PENDING_SUFFIX}")


def publish_partitions(root: str, files: list[str]) -> None:
    """Rename each committed result file from its pending name to its own (a file already there, from a
    run that renamed it before it was killed, is left)."""
    for rel in files:
        if not rel.startswith(RESULTS_DIR + "/"):
            continue
        fs, src = store.filesystem(store.join(root, pending_name(rel)))
        if fs.exists(src):
            _, dst = store.filesystem(store.join(root, rel))
            fs.mv(src, dst)


def read_results(root: str, ledger: Ledger) -> pd.DataFrame:
    """The committed result rows (columns the change detection uses), geometry as shapely."""
    files = sorted(f for f in ledger.committed_files() if f.startswith(RESULTS_DIR + "/"))
    table = read_dataset_files(root, files, columns=list(RESULT_COLUMNS_USED))
    frame = table.drop(["geometry"]).to_pandas()
    frame["geometry"] = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    return frame


def ensure_changes_report(config: MonitorConfig, ledger: Ledger, *, force: bool = False) -> pd.DataFrame:
    """Rebuild ``changes.parquet`` and ``report.html`` unless they already reflect the ledger's
    last run. Returns the changes (empty when not rebuilt or no run committed)."""
    root = config.output
    if not ledger.runs:
        return pd.DataFrame(columns=list(CHANGE_COLUMNS))
    last_run = ledger.runs[-1].run_id
    rules = _rules_tag(config.change)
    if (  # an edit of the change rules rebuilds too: it waited for the next new scene
        not force
        and _changes_tags(root) == (last_run, rules)
        and store.read_bytes(store.join(root, REPORT_NAME)) is not None
    ):
        return pd.DataFrame(columns=list(CHANGE_COLUMNS))
    rows = read_results(root, ledger)
    changes = detect_changes(rows, config.change)
    from rsflow.monitor.report import build_report

    counts = ledger.counts()
    page = build_report(
        title=f"rsflow monitor {config.name}: what changed",
        changes=changes,
        timelines=timelines(rows, changes),
        summary={
            "runs committed": len(ledger.runs),
            "items done": counts["done"],
            "items failed (to retry)": counts["failed"],
            "items given up": counts["given_up"],
            "watermark": ledger.watermark,
            "as of run": last_run,
        },
    )
    # The report first: changes.parquet carries the run id that says both are up to date, so a run
    # stopped between the two writes leaves them to be rebuilt, not a report one run behind.
    store.write_bytes_atomic(store.join(root, REPORT_NAME), page.encode())
    store.write_bytes_atomic(store.join(root, CHANGES_NAME), changes_parquet_bytes(changes, last_run, rules=rules))
    logger.info("monitor %s: %d changes, report written", config.name, len(changes))
    return changes


def _rules_tag(rules: ChangeRules) -> str:
    return json.dumps(dataclasses.asdict(rules), sort_keys=True)


def changes_parquet_bytes(changes: pd.DataFrame, run_id: str, *, rules: str | None = None) -> bytes:
    """The changes as GeoParquet 1.1 bytes (EPSG:4326, bbox covering, zstd), tagged with ``run_id`` and the
    change rules they were computed with."""
    import geopandas as gpd

    from rsflow.output import geoparquet_table

    frame = changes.copy()
    for col in ("before_datetime", "after_datetime"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    for col in ("before_count", "after_count"):
        frame[col] = pd.to_numeric(frame[col]).astype("float64")
    text_cols = [
        c
        for c in CHANGE_COLUMNS
        if c not in ("before_datetime", "after_datetime", "before_count", "after_count", "geometry")
    ]
    for col in text_cols:
        frame[col] = frame[col].astype("object").where(frame[col].notna(), None)
    gdf = gpd.GeoDataFrame(
        frame.drop(columns=["geometry"]), geometry=gpd.GeoSeries(list(frame["geometry"]), crs="EPSG:4326")
    )
    arrow = geoparquet_table(gdf)
    target = {c: pa.string() for c in text_cols}
    target |= {c: pa.timestamp("us", tz="UTC") for c in ("before_datetime", "after_datetime")}
    target |= {c: pa.float64() for c in ("before_count", "after_count")}
    fields = [pa.field(f.name, target.get(f.name, f.type)) for f in arrow.schema]
    arrow = arrow.cast(pa.schema(fields, metadata=arrow.schema.metadata))
    meta = {k: v for k, v in (arrow.schema.metadata or {}).items() if k != b"pandas"}
    meta[CHANGES_RUN_KEY] = run_id.encode()
    if rules is not None:
        meta[CHANGES_RULES_KEY] = rules.encode()
    buffer = io.BytesIO()
    pq.write_table(arrow.replace_schema_metadata(meta), buffer, compression="zstd")
    return buffer.getvalue()


def _changes_tags(root: str) -> tuple[str | None, str | None]:
    """The run and the change rules ``changes.parquet`` reflects (None where it has no such tag)."""
    fs, path = store.filesystem(store.join(root, CHANGES_NAME))
    try:
        with fs.open(path, "rb") as fh:
            meta = pq.read_schema(fh).metadata or {}
    except (FileNotFoundError, pa.ArrowInvalid):
        return None, None
    run, rules = meta.get(CHANGES_RUN_KEY), meta.get(CHANGES_RULES_KEY)
    return (run.decode() if run else None), (rules.decode() if rules else None)


def webhook_payload(
    config: MonitorConfig,
    run_id: str,
    new: pd.DataFrame,
    by_kind: dict[str, int],
    done: set[str],
    failed: list[str],
    given_up: list[str],
    ledger: Ledger,
) -> dict[str, Any]:
    """The JSON summary POSTed to the webhook (counts, the changed tiles, where the report is)."""
    examples = [
        {
            "change": r.change,
            "cell_id": r.cell_id,
            "task": r.task,
            "prompt": r.prompt,
            "before": r.before_value,
            "after": r.after_value,
            "before_datetime": _iso(r.before_datetime),
            "after_datetime": _iso(r.after_datetime),
        }
        for r in new.head(20).itertuples(index=False)
    ]
    return {
        "monitor": config.name,
        "run_id": run_id,
        "changes": len(new),
        "changes_by_kind": by_kind,
        "tiles_changed": int(new["cell_id"].nunique()),
        "items_processed": len(done),
        "items_failed": len(failed),
        "items_given_up": len(given_up),
        "watermark": ledger.watermark,
        "report": store.join(config.output, REPORT_NAME),
        "changes_file": store.join(config.output, CHANGES_NAME),
        "examples": examples,
    }


def request_fingerprint(manifest: dict[str, Any]) -> str:
    """A short hash of what every tile was asked (prompts, model, tile spec) in a region manifest."""
    import hashlib
    import json

    key = json.dumps(
        {
            "prompts": manifest.get("prompts"),
            "model": manifest.get("model", {}).get("id"),
            "tile": manifest.get("tile_spec"),
        },
        sort_keys=True,
    )
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _warn_if_request_changed(name: str, ledger: Ledger) -> None:
    prints = {r.request_fingerprint for r in ledger.runs}
    if len(prints) > 1 and ledger.runs[-1].request_fingerprint != ledger.runs[-2].request_fingerprint:
        logger.warning(
            "monitor %s: tasks, prompts, model or tiles changed since the previous run; tiles are "
            "compared across the change only where the same prompt was asked",
            name,
        )


def _write_last_run(root: str, last: dict[str, Any]) -> None:
    try:
        store.write_json_atomic(store.join(root, LAST_RUN_NAME), last)
    except Exception:  # status information must never hide the run's own outcome
        logger.warning("could not write %s", LAST_RUN_NAME, exc_info=True)


def _iso(when: Any) -> str:
    if when is None or when is pd.NaT:
        return ""
    ts = pd.Timestamp(when)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.isoformat().replace("+00:00", "Z")


# --- status -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorStatus:
    """Where a monitor stands (``rsflow monitor status``)."""

    name: str
    output: str
    last_run: dict[str, Any] | None
    watermark: str | None
    counts: dict[str, int]
    failed: list[ItemRecord]
    given_up: list[ItemRecord]
    runs_committed: int
    schedule: str | None
    next_due: datetime | None
    lock: LockInfo | None
    lock_expired: bool
    in_progress: list[ItemRecord] = field(default_factory=list)
    """Items the run holding a live lock is processing now (their attempt is counted before the pipeline
    runs, so the ledger has them failed and interrupted until it commits: not a failure yet)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "output": self.output,
            "last_run": self.last_run,
            "watermark": self.watermark,
            "counts": self.counts,
            "failed": [dataclasses.asdict(r) for r in self.failed],
            "given_up": [dataclasses.asdict(r) for r in self.given_up],
            "in_progress": [dataclasses.asdict(r) for r in self.in_progress],
            "runs_committed": self.runs_committed,
            "schedule": self.schedule,
            "next_due": _iso(self.next_due) if self.next_due else None,
            "lock": self.lock.to_json() if self.lock else None,
            "lock_expired": self.lock_expired,
        }


def monitor_status(config: MonitorConfig, *, now: datetime | None = None) -> MonitorStatus:
    """Read the ledger, the last run and the lock (nothing is written)."""
    now = now or datetime.now(UTC)
    root = config.output
    try:  # the store answers (credentials, bucket, network) before anything is read from it
        store.list_files(store.join(root, "_monitor"))
    except Exception as exc:  # noqa: BLE001 - any storage failure means the same thing to the user
        raise RequestError("output", f"cannot read {root}: {type(exc).__name__}: {' '.join(str(exc).split())}"[:600]) from None
    _check_ledger_owner(root, config.name)
    ledger = load_ledger(root, config.name)
    last = store.read_json(store.join(root, LAST_RUN_NAME))
    next_due = None
    if config.schedule is not None:
        base = parse_time(last.get("started")) if last else None
        next_due = config.schedule.next_after(base or now)
    lock = read_lock(root)
    live = lock.run_id if lock is not None and not lock.expired(now) else None
    running = {r.id for r in ledger.items.values()
               if live is not None and r.state == "failed" and r.error == INTERRUPTED and r.run_id == live}
    counts = ledger.counts()
    counts["failed"] -= len(running)
    counts["in_progress"] = len(running)
    return MonitorStatus(
        name=config.name,
        output=root,
        last_run=last,
        watermark=ledger.watermark,
        counts=counts,
        in_progress=sorted((ledger.items[k] for k in running), key=lambda r: r.id),
        failed=sorted((r for r in ledger.items.values() if r.state == "failed" and r.id not in running),
                      key=lambda r: r.id),
        given_up=sorted((r for r in ledger.items.values() if r.state == "given_up"), key=lambda r: r.id),
        runs_committed=len(ledger.runs),
        schedule=config.schedule.expression if config.schedule else None,
        next_due=next_due,
        lock=lock,
        lock_expired=bool(lock and lock.expired(now)),
    )


def format_status(status: MonitorStatus, *, now: datetime | None = None) -> str:
    """The status as the lines ``rsflow monitor status`` prints."""
    now = now or datetime.now(UTC)
    last = status.last_run
    if last:
        what = last.get("outcome")
        if what == "processed":
            what += (
                f": {last.get('items_done', 0)} done, {last.get('items_failed', 0)} failed, "
                f"{last.get('items_given_up', 0)} given up, {last.get('new_changes', 0)} changes"
            )
        elif what == "failed":
            what += f": {last.get('error', '')}"
        last_line = f"{last.get('started')} (run {last.get('run_id')}, {what})"
    else:
        last_line = "never"
    c = status.counts
    lines = [
        f"monitor {status.name}: {status.output}",
        f"  last run:   {last_line}",
        f"  watermark:  {status.watermark or 'none (no item processed yet)'}",
        (
            f"  items:      {c['done']} done, {c['failed']} failed (to retry), {c['given_up']} given up"
            + (f", {c['in_progress']} in progress" if c.get("in_progress") else "")
            + f"; {status.runs_committed} runs committed"
        ),
    ]
    for r in status.in_progress[:20]:
        lines.append(f"    running   {r.id} (attempt {r.attempts}, run {r.run_id}, which holds the lock)")
    for r in status.failed[:20]:
        lines.append(f"    failed    {r.id} ({r.attempts} attempts): {r.error}")
    for r in status.given_up[:20]:
        lines.append(f"    given up  {r.id} ({r.attempts} attempts): {r.error}")
    if status.next_due is None:
        lines.append("  next due:   no schedule in the config")
    else:
        late = " (overdue)" if status.next_due < now else ""
        lines.append(f"  next due:   {_iso(status.next_due)}{late} (schedule '{status.schedule}', UTC)")
    if status.lock is None:
        lines.append("  lock:       free")
    else:
        state = "expired, will be taken over" if status.lock_expired else "held"
        lines.append(
            f"  lock:       {state}: run {status.lock.run_id} on {status.lock.host} (pid {status.lock.pid}), "
            f"expires {status.lock.expires}"
        )
    return "\n".join(lines)
