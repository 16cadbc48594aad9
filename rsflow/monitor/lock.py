"""One run of a monitor at a time: a lock file with an expiry, renewed while the run is alive.

``OUTPUT/_monitor/lock.json`` names its holder (host, pid, run id) and when it expires. A run takes
the lock before it reads the ledger and gives it back at the end; while it runs, a heartbeat thread
pushes the expiry forward every third of ``expiry``. A run that was killed stops renewing, so its
lock expires and the next run takes it over. A second run that finds a live lock raises
:class:`MonitorLocked` without touching anything.

Taking the lock:

- local directories: created with ``O_CREAT | O_EXCL`` (one creator wins). An expired lock is first
  renamed to a unique name (one renamer wins), checked to be the expired one that was read, then the
  lock is created as above; so two runs that find the same expired lock never both hold it.
- object stores (no exclusive create in fsspec): written, then read back after a short pause; the
  holder is whoever's write is there. Good enough behind a scheduler that never starts two runs
  at once (a CronJob with ``concurrencyPolicy: Forbid``), which is what the lock backs up.

Before the ledger is committed the run checks that it still holds the lock
(:meth:`MonitorLock.check`), so a run that lost it (paused past its expiry and taken over) never
commits over the new holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rsflow.errors import RsflowError
from rsflow.monitor import store

logger = logging.getLogger(__name__)

#: How long an object-store writer waits before reading the lock back.
_SETTLE_SECONDS = 1.0


class MonitorLocked(RsflowError):
    """Another run holds the monitor's lock (the CLI prints this on one line and exits 3)."""

    def __init__(self, monitor: str, holder: dict[str, Any]) -> None:
        self.holder = holder
        super().__init__(
            f"monitor {monitor!r} is locked by run {holder.get('run_id')} on {holder.get('host')} "
            f"(pid {holder.get('pid')}) since {holder.get('acquired')}; the lock expires at "
            f"{holder.get('expires')} unless that run renews it. Not starting."
        )


class LockLost(RsflowError):
    """This run's lock expired and was taken over: it must not commit."""


@dataclass(frozen=True)
class LockInfo:
    """The content of a lock file."""

    run_id: str
    host: str
    pid: int
    acquired: str
    expires: str

    def expired(self, now: datetime) -> bool:
        try:
            return datetime.fromisoformat(self.expires) <= now
        except ValueError:
            return True

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "host": self.host,
            "pid": self.pid,
            "acquired": self.acquired,
            "expires": self.expires,
        }


def lock_path(root: str) -> str:
    return store.join(root, "_monitor", "lock.json")


def read_lock(root: str) -> LockInfo | None:
    """The current lock, or None when there is none. An unreadable lock file reads as expired."""
    data = store.read_bytes(lock_path(root))
    if data is None:
        return None
    try:
        value = json.loads(data)
        return LockInfo(
            run_id=str(value["run_id"]),
            host=str(value["host"]),
            pid=int(value["pid"]),
            acquired=str(value["acquired"]),
            expires=str(value["expires"]),
        )
    except (ValueError, KeyError, TypeError):
        return LockInfo(run_id="?", host="?", pid=0, acquired="?", expires="1970-01-01T00:00:00+00:00")


class MonitorLock:
    """The lock of one monitor output root, held by one run.

    Use as a context manager: ``with MonitorLock(root, name, run_id, expiry): ...``.
    """

    def __init__(
        self, root: str, monitor: str, run_id: str, expiry: timedelta, *, heartbeat: bool = True
    ) -> None:
        self.root = root
        self.monitor = monitor
        self.run_id = run_id
        self.expiry = expiry
        self.heartbeat = heartbeat
        self.took_over: LockInfo | None = None
        """The expired lock this run replaced, if any."""
        self._info: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False

    # -- acquire / release ------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, or raise :class:`MonitorLocked` naming the live holder."""
        fs, path = store.filesystem(lock_path(self.root))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if store.is_local(fs):
            self._acquire_local(path)
        else:
            self._acquire_remote()
        if self.heartbeat:
            self._thread = threading.Thread(
                target=self._renew_loop, name=f"rsflow-lock-{self.monitor}", daemon=True
            )
            self._thread.start()
        logger.info(
            "monitor %s: lock taken by run %s (expires %s)",
            self.monitor,
            self.run_id,
            self._info.expires if self._info else "?",
        )

    def _new_info(self) -> LockInfo:
        now = datetime.now(UTC)
        return LockInfo(
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired=now.isoformat(),
            expires=(now + self.expiry).isoformat(),
        )

    def _encode(self, info: LockInfo) -> bytes:
        return (json.dumps(info.to_json(), indent=1, sort_keys=True) + "\n").encode()

    def _acquire_local(self, path: str) -> None:
        for _ in range(3):
            info = self._new_info()
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = store.read_bytes(lock_path(self.root))
                current = read_lock(self.root) if seen is not None else None
                if current is None:
                    continue  # released meanwhile: try again
                if not current.expired(datetime.now(UTC)):
                    raise MonitorLocked(self.monitor, current.to_json()) from None
                # Expired: move it aside (one renamer wins), check it is the one we judged expired.
                aside = f"{path}.expired{store.TMP_MARK}{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue  # another run moved it first; race for the create
                with open(aside, "rb") as fh:
                    moved = fh.read()
                if moved != seen:  # a fresh lock was created in between: give it back
                    try:
                        os.link(aside, path)
                    except FileExistsError:
                        pass
                    os.unlink(aside)
                    holder = read_lock(self.root) or current
                    raise MonitorLocked(self.monitor, holder.to_json()) from None
                os.unlink(aside)
                self.took_over = current
                logger.warning(
                    "monitor %s: taking over the expired lock of run %s (%s, pid %d, expired %s)",
                    self.monitor,
                    current.run_id,
                    current.host,
                    current.pid,
                    current.expires,
                )
                continue
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._encode(info))
                fh.flush()
                os.fsync(fh.fileno())
            self._info = info
            return
        current = read_lock(self.root)
        raise MonitorLocked(self.monitor, current.to_json() if current else {"run_id": "?"})

    def _acquire_remote(self) -> None:
        current = read_lock(self.root)
        if current is not None and not current.expired(datetime.now(UTC)):
            raise MonitorLocked(self.monitor, current.to_json())
        if current is not None:
            self.took_over = current
            logger.warning("monitor %s: taking over the expired lock of run %s", self.monitor, current.run_id)
        info = self._new_info()
        store.write_bytes_atomic(lock_path(self.root), self._encode(info))
        time.sleep(_SETTLE_SECONDS)
        mine = read_lock(self.root)
        if mine is None or mine.run_id != self.run_id:
            raise MonitorLocked(self.monitor, mine.to_json() if mine else {"run_id": "?"})
        self._info = info

    def release(self) -> None:
        """Stop renewing and delete the lock if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current = read_lock(self.root)
        if current is not None and current.run_id == self.run_id:
            store.remove(lock_path(self.root))
            logger.info("monitor %s: lock released by run %s", self.monitor, self.run_id)
        self._info = None

    def __enter__(self) -> MonitorLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- while held ---------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`LockLost` unless this run still holds an unexpired lock."""
        current = read_lock(self.root)
        now = datetime.now(UTC)
        if self._lost or current is None or current.run_id != self.run_id or current.expired(now):
            holder = current.to_json() if current else None
            raise LockLost(
                f"run {self.run_id} no longer holds the lock of monitor {self.monitor!r} (now: {holder})"
            )

    def renew(self) -> None:
        """Push the expiry forward (the heartbeat calls this)."""
        current = read_lock(self.root)
        if current is None or current.run_id != self.run_id:
            self._lost = True
            logger.error(
                "monitor %s: run %s lost its lock (now held by %s)",
                self.monitor,
                self.run_id,
                current.run_id if current else "nobody",
            )
            return
        info = LockInfo(
            run_id=current.run_id,
            host=current.host,
            pid=current.pid,
            acquired=current.acquired,
            expires=(datetime.now(UTC) + self.expiry).isoformat(),
        )
        store.write_bytes_atomic(lock_path(self.root), self._encode(info))
        self._info = info

    def _renew_loop(self) -> None:
        interval = max(1.0, self.expiry.total_seconds() / 3)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception:  # a storage hiccup: try again at the next beat, the expiry leaves room
                logger.warning("monitor %s: could not renew the lock", self.monitor, exc_info=True)
