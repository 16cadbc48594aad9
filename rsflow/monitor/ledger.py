"""The ledger: which items a monitor has processed, which failed, and its watermark.

One JSON file, ``OUTPUT/_monitor/ledger.json``, replaced atomically (:mod:`rsflow.monitor.store`).
Saving it is a run's commit point: the result files a run wrote count only once the ledger lists
them, so a run killed before that leaves the ledger, the watermark and the committed dataset as
they were, and the next run removes what it left (see :mod:`rsflow.monitor.run`).

Item states:

- ``done``: its rows are in the results dataset (a file named in ``files``).
- ``failed``: a run could not process it (``error`` says why); retried by the next runs.
- ``given_up``: it failed ``max_attempts`` times; listed, never tried again. An item given up because some of
  its tiles failed on every attempt while others answered has its rows in the results all the same (``rows``
  > 0): the ok rows and a ``status=failed`` row, with the reason, for each failed tile, committed by the run
  that gave it up. Without them its date was missing for every tile of the AOI, the good ones too.

The watermark is the latest acquisition time among items that are done or given up: the next
search starts at ``watermark - lookback`` (or earlier, at the oldest item still to retry).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from rsflow.monitor import store

logger = logging.getLogger(__name__)

LEDGER_FORMAT = 2
"""Version of the ledger's JSON layout. 2 added ``ItemRecord.alone`` and ``RunRecord.items_partial``: a format 1
ledger is read (they take their defaults) and written back as 2, which an rsflow that knows only 1 refuses with
"upgrade rsflow" (it would have failed on the unknown fields)."""
READABLE_FORMATS = (1, 2)
ItemState = Literal["done", "failed", "given_up"]


@dataclass
class ItemRecord:
    """What the monitor knows about one STAC item."""

    id: str
    """STAC item id."""
    collection: str
    """STAC collection id."""
    datetime: str
    """Acquisition time as the item gives it (RFC 3339)."""
    state: ItemState
    """``done``, ``failed`` or ``given_up``."""
    attempts: int
    """Runs that tried it."""
    run_id: str
    """The last run that tried it."""
    error: str | None = None
    """Why the last attempt failed (None when done)."""
    tiles: int = 0
    """Tiles of the item that touched the AOI (items the pipeline ran)."""
    rows: int = 0
    """Result rows written for it into the results: done items, and items given up with some tiles ok (their
    failed tiles' rows included); 0 where none were written (failed, or given up with no tile ok)."""
    alone: bool = False
    """Its last attempt was in a run that had no other item. A run that dies with one item only (error
    :data:`rsflow.monitor.run.INTERRUPTED`) died of that item or of the cluster, never of another item: only
    such a crash gives an item up (:func:`rsflow.monitor.run._give_up_interrupted`). Absent in older ledgers
    (False)."""


@dataclass
class RunRecord:
    """One committed run."""

    run_id: str
    started: str
    """UTC, ISO 8601."""
    finished: str
    """UTC, ISO 8601 (when the ledger was committed)."""
    items_done: list[str]
    """Items this run processed successfully."""
    items_failed: list[str]
    """Items this run tried and failed (to be retried)."""
    items_given_up: list[str]
    """Items this run gave up on."""
    files: list[str]
    """Files this run added, relative to the output root (result partitions, its run record)."""
    request_fingerprint: str
    """Hash of what was asked of every tile (tasks, prompts, model, tile spec): a change means the
    results of earlier runs answer other questions."""
    items_partial: list[str] = field(default_factory=list)
    """Items of ``items_given_up`` whose rows this run wrote: some of their tiles failed on every attempt and
    the others answered; their ok rows and failed tile rows are in ``files`` (their changes are this run's).
    Absent in older ledgers (empty)."""
    notified: bool | None = None
    """With a webhook: False from the commit until its changes are delivered (a run stopped in between,
    or a delivery that failed, leaves it False and the next run sends them); None without one."""


@dataclass
class Ledger:
    """The whole ledger of one monitor."""

    monitor: str
    """The monitor's name."""
    watermark: str | None = None
    """Latest acquisition time (UTC, ISO 8601) among done and given-up items; None before any."""
    items: dict[str, ItemRecord] = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)
    format: int = LEDGER_FORMAT
    backfill: dict[str, str] | None = None
    """``{"start", "before"}`` (UTC, ISO 8601) while a search stopped at ``max_items``: searches keep the
    newest items, so the older ones of that window, up to ``before`` (the oldest item it returned), are
    what the next runs search, before the window moves on from the watermark again."""

    def committed_files(self) -> set[str]:
        """Every file a committed run added (relative to the output root)."""
        return {f for run in self.runs for f in run.files}

    def counts(self) -> dict[str, int]:
        """Items per state."""
        out = {"done": 0, "failed": 0, "given_up": 0}
        for record in self.items.values():
            out[record.state] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "monitor": self.monitor,
            "watermark": self.watermark,
            "backfill": self.backfill,
            "items": {k: asdict(v) for k, v in sorted(self.items.items())},
            "runs": [asdict(r) for r in self.runs],
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Ledger:
        if value.get("format") not in READABLE_FORMATS:
            raise ValueError(f"ledger format {value.get('format')!r} is not one of {READABLE_FORMATS}; upgrade rsflow")
        return cls(
            monitor=value["monitor"],
            watermark=value.get("watermark"),
            backfill=value.get("backfill"),
            items={k: ItemRecord(**v) for k, v in value.get("items", {}).items()},
            runs=[RunRecord(**r) for r in value.get("runs", [])],
        )  # written back in this version's format


def ledger_path(root: str) -> str:
    return store.join(root, "_monitor", "ledger.json")


def load_ledger(root: str, monitor: str) -> Ledger:
    """The ledger under ``root``, or an empty one for a monitor that never committed a run.

    Raises:
        ValueError: the ledger belongs to another monitor, or has an unknown format.
    """
    value = store.read_json(ledger_path(root))
    if value is None:
        return Ledger(monitor=monitor)
    ledger = Ledger.from_json(value)
    if ledger.monitor != monitor:
        raise ValueError(f"{root} holds the ledger of monitor {ledger.monitor!r}, not {monitor!r}")
    return ledger


def save_ledger(root: str, ledger: Ledger) -> None:
    """Replace the ledger in one atomic write (the run's commit)."""
    store.write_json_atomic(ledger_path(root), ledger.to_json())


def advance_watermark(ledger: Ledger, now: datetime | None = None) -> None:
    """Set the watermark to the latest acquisition time among done and given-up items, never later than
    ``now`` (the run's start; default: the current time).

    An item dated after ``now`` (a mistyped year in the catalog) does not count: the watermark used to jump
    to its time, and every later search started after every real scene, saying "nothing new" for ever. A
    watermark already in the future (written before this check) is brought back to the latest item up to
    ``now`` (or to ``now``). Items dated in the future are still searched (the window is open at the end),
    and done once; the run names them in a warning.
    """
    now = now or datetime.now(UTC)
    times = [parse_time(r.datetime) for r in ledger.items.values() if r.state in ("done", "given_up")]
    times = [t for t in times if t is not None and t <= now]
    current = parse_time(ledger.watermark) if ledger.watermark else None
    if current is not None and current > now:
        back = max(times) if times else now
        logger.warning("the watermark %s is in the future: set back to %s", ledger.watermark, _iso(back))
        ledger.watermark, current = _iso(back), back
    if times:
        latest = max(times)
        if current is None or latest > current:
            ledger.watermark = _iso(latest)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time from an item or the ledger -> aware UTC datetime (None if absent or unreadable)."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
