"""One run of a monitor at a time: a lock file with an expiry, renewed while the run is alive.

``OUTPUT/_monitor/lock.json`` names its holder (host, pid, run id) and when it expires. A run takes
the lock before it reads the ledger and gives it back at the end; while it runs, a heartbeat thread
pushes the expiry forward every third of ``expiry``. A run that was killed stops renewing, so its
lock expires and the next run takes it over. A second run that finds a live lock raises
:class:`MonitorLocked` without touching anything.

Taking, renewing, taking over and releasing the lock:

- local directories: every change to ``lock.json`` happens while holding a short-lived mutex. Under
  the mutex a run reads the lock and either creates it (none), refuses (live), or replaces it
  (expired), so of many runs starting at once exactly one holds the lock. The mutex is an exclusive
  ``flock`` on ``lock.json.flock`` (the file stays; the kernel drops the lock of a process that dies,
  so a run killed inside the critical section leaves nothing to clear). Where the filesystem has no
  ``flock`` (some network or FUSE filesystems, Windows), it is ``lock.json.mutex``, created whole
  with a hard link from a temporary file (``link`` fails when the target exists, so exactly one
  process holds it; nobody reads it half-written), held for milliseconds; one left by a process
  killed inside that window is removed after ``_MUTEX_STALE_SECONDS``. That removal can race: two
  runs that find the same stale file at the same instant may both go on.
- object stores (no exclusive create in fsspec): written, then read back after a short pause; the
  holder is whoever's write is there. Good enough behind a scheduler that never starts two runs
  at once (a CronJob with ``concurrencyPolicy: Forbid``), which is what the lock backs up.

Before the ledger is committed the run checks that it still holds the lock
(:meth:`MonitorLock.check`), so a run that lost it (paused past its expiry and taken over) never
commits over the new holder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from rsflow.errors import RsflowError
from rsflow.monitor import store

logger = logging.getLogger(__name__)

#: How long an object-store writer waits before reading the lock back.
_SETTLE_SECONDS = 1.0
#: A local lock mutex older than this was left by a killed process (it is held for milliseconds).
_MUTEX_STALE_SECONDS = 30.0
#: Longest wait for the local lock mutex (longer than it takes a stale one to be removed).
_MUTEX_WAIT_SECONDS = 45.0


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

    def remaining(self, now: datetime) -> timedelta:
        """Time left before the lock expires at ``now`` (aware; naive ``expires`` read as UTC); none when
        unreadable."""
        try:
            expires = datetime.fromisoformat(self.expires)
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)
            return expires - now
        except (ValueError, TypeError):
            return timedelta(0)

    def expired(self, now: datetime) -> bool:
        """Whether the lock has expired at ``now`` (aware). An ``expires`` without a UTC offset (a lock
        written by hand or by another tool) is UTC, as every time here is: compared as it was, a naive
        time raised TypeError in :meth:`MonitorLock.acquire`. An unreadable one has expired."""
        return self.remaining(now) <= timedelta(0)

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
        self, root: str, monitor: str, run_id: str, expiry: timedelta, *, heartbeat: bool = True,
        max_hold: timedelta | None = None,
    ) -> None:
        self.root = root
        self.monitor = monitor
        self.run_id = run_id
        self.expiry = expiry
        self.heartbeat = heartbeat
        self.max_hold = max_hold
        """The heartbeat stops renewing once the lock has been held this long: a run that hangs (a driver
        alive but stuck, which the heartbeat kept renewing for ever) then loses the lock after ``expiry``,
        the next run takes it over, and the hung one can no longer commit. None: renewed while alive."""
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
        info = self._new_info()
        with _local_mutex(path):
            current = read_lock(self.root)
            if current is not None and not current.expired(datetime.now(UTC)):
                raise MonitorLocked(self.monitor, current.to_json())
            store.write_bytes_atomic(lock_path(self.root), self._encode(info))
        self._info = info
        if current is not None:
            self.took_over = current
            logger.warning(
                "monitor %s: took over the expired lock of run %s (%s, pid %d, expired %s)",
                self.monitor,
                current.run_id,
                current.host,
                current.pid,
                current.expires,
            )

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
        with self._serialised():
            current = read_lock(self.root)
            if current is not None and current.run_id == self.run_id:
                store.remove(lock_path(self.root))
                logger.info("monitor %s: lock released by run %s", self.monitor, self.run_id)
        self._info = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- while held ---------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`LockLost` unless this run still holds the lock with a sixth of ``expiry`` (at most a
        minute) left.

        The heartbeat renews every third of ``expiry``, so a held lock has at least two thirds left while the
        renewals land. Less than the margin (renewals failing, or ``max_hold`` reached) is too close: a run
        that took the lock over once it expired could read the ledger before this run's commit lands, and both
        would process the same items."""
        current = read_lock(self.root)
        now = datetime.now(UTC)
        if self._lost or current is None or current.run_id != self.run_id or current.expired(now):
            holder = current.to_json() if current else None
            raise LockLost(
                f"run {self.run_id} no longer holds the lock of monitor {self.monitor!r} (now: {holder})"
            )
        left = current.remaining(now)
        if left < min(self.expiry / 6, timedelta(minutes=1)):
            raise LockLost(f"run {self.run_id}'s lock of monitor {self.monitor!r} expires in "
                           f"{left.total_seconds():.0f} s (renewals failing, or lock.max_hold reached): too close "
                           "to commit safely")

    def renew(self) -> None:
        """Push the expiry forward (the heartbeat calls this)."""
        with self._serialised():
            self._renew_held()

    def _renew_held(self) -> None:
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

    def _serialised(self) -> contextlib.AbstractContextManager[None]:
        """The mutex on local roots; nothing on object stores."""
        fs, path = store.filesystem(lock_path(self.root))
        return _local_mutex(path) if store.is_local(fs) else contextlib.nullcontext()

    def _renew_loop(self) -> None:
        interval = max(1.0, self.expiry.total_seconds() / 3)
        started = datetime.now(UTC)
        while not self._stop.wait(interval):
            if self.max_hold is not None and datetime.now(UTC) - started >= self.max_hold:
                logger.error(
                    "monitor %s: run %s has held the lock for lock.max_hold (%s): no longer renewed, so the "
                    "next run takes it over after lock.expiry and this run cannot commit",
                    self.monitor, self.run_id, self.max_hold,
                )
                return
            try:
                self.renew()
            except Exception:  # a storage hiccup: try again at the next beat, the expiry leaves room
                logger.warning("monitor %s: could not renew the lock", self.monitor, exc_info=True)


def _create_exclusive(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data``, or raise FileExistsError; readers never see it empty.

    The bytes go to a temporary file first, which is then hard-linked to ``path`` (``link`` fails
    when ``path`` exists, like ``O_EXCL``). Filesystems without hard links fall back to ``O_EXCL``.
    """
    tmp = f"{path}{store.TMP_MARK}{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network or FUSE filesystems)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


_NO_FLOCK_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP})


@contextlib.contextmanager
def _local_mutex(lock_file: str) -> Iterator[None]:
    """Hold the local mutex of ``lock_file`` for the duration of the block: an exclusive ``flock`` on
    ``<lock_file>.flock``, or ``<lock_file>.mutex`` where the filesystem has no ``flock`` (see the
    module docstring).

    Raises:
        TimeoutError: another process held it for ``_MUTEX_WAIT_SECONDS`` (it is only ever held for
            milliseconds, so something is wrong with the filesystem).
    """
    deadline = time.monotonic() + _MUTEX_WAIT_SECONDS
    fd = _flocked(f"{lock_file}.flock", deadline)
    if fd is None:
        with _link_mutex(lock_file, deadline):
            yield
        return
    try:
        yield
    finally:
        os.close(fd)  # closing the last descriptor drops the flock


def _flocked(path: str, deadline: float) -> int | None:
    """A descriptor of ``path`` holding an exclusive ``flock``, or None where the platform or the
    filesystem has no ``flock``.

    Raises:
        TimeoutError: another process held it until ``deadline``.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"{path} stayed locked for {_MUTEX_WAIT_SECONDS} s") from None
            time.sleep(0.005)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK_ERRNOS:
                return None
            raise


@contextlib.contextmanager
def _link_mutex(lock_file: str, deadline: float) -> Iterator[None]:
    """Hold ``<lock_file>.mutex``, created whole with a hard link (filesystems without ``flock``)."""
    mutex = f"{lock_file}.mutex"
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}\n".encode()
    while True:
        try:
            _create_exclusive(mutex, owner)
            break
        except FileExistsError:
            try:
                age = time.time() - os.stat(mutex).st_mtime
            except FileNotFoundError:
                continue
            if age > _MUTEX_STALE_SECONDS:  # its holder was killed inside the critical section
                logger.warning("removing a stale lock mutex %s (%.0f s old)", mutex, age)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(mutex)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mutex} stayed held for {_MUTEX_WAIT_SECONDS} s") from None
            time.sleep(0.005)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mutex)
