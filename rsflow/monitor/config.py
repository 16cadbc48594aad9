"""A monitor described in YAML (``monitors/*.yaml``) -> one checked :class:`MonitorConfig`.

Every key is checked before any work: an unknown key, a wrong type or a bad value is a
:class:`~rsflow.errors.RequestError` whose field is the key's path in the file (``lookback``,
``webhook.secret_env``, ``tile.size_px``), so the CLI prints one line naming it. The region part
(AOI, source, tasks, tiles, model) goes through :func:`rsflow.request.parse_request`, the region
job's own validation; its flag names are translated back to the config's keys.

Example (``monitors/port.yaml`` has a commented one)::

    name: port
    aoi: {bbox: [-75.70, 37.64, -75.66, 37.67]}
    stac: https://earth-search.aws.element84.com/v1
    collections: [sentinel-2-l2a]
    max_cloud: 20
    start: 2024-06-01
    lookback: 5d
    schedule: "0 6 * * *"
    tasks: {questions: [Is there water in this image?], detect: [ship]}
    model: {model: path/to/llava}
    output: s3://bucket/rsflow/monitors/port
    webhook: {url: https://hooks.example.com/rsflow, secret_env: RSFLOW_WEBHOOK_SECRET}

The webhook secret is never in the file: ``secret_env`` names the environment variable that holds
it, read only when the webhook is called.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from rsflow.errors import RequestError
from rsflow.models.spec import ModelSpec
from rsflow.monitor.schedule import CronSchedule, format_duration, parse_cron, parse_duration
from rsflow.request import (
    RegionRequest,
    parse_request,
    parse_task_file,
    parse_task_mapping,
    refuse_output_in_job_copy,
)
from rsflow.yamlio import load_yaml

logger = logging.getLogger(__name__)

MAX_LOOKBACK = timedelta(days=90)
"""Longest ``lookback`` accepted: it exists for scenes published late, not to reprocess history
(use ``start`` on a new output root for that)."""
DEFAULT_LOOKBACK = timedelta(days=3)
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LOCK_EXPIRY = timedelta(minutes=30)
MIN_LOCK_EXPIRY = timedelta(seconds=10)
MAX_LOCK_EXPIRY = timedelta(hours=24)
MAX_ATTEMPTS_LIMIT = 100

TOP_KEYS = (
    "name",
    "aoi",
    "stac",
    "collections",
    "max_cloud",
    "max_items",
    "max_tiles",
    "profile",
    "start",
    "lookback",
    "schedule",
    "tasks",
    "tile",
    "max_nodata",
    "model",
    "model_actors",
    "read_workers",
    "require_gpu",
    "merge_iou",
    "output",
    "retry",
    "change",
    "lock",
    "webhook",
)
"""Keys a monitor file may have."""
_AOI_KEYS = ("bbox", "intersects")
_TILE_KEYS = ("size_px", "overlap_px", "gsd_m")
_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.name != "adapters")
_RETRY_KEYS = ("max_attempts",)
_CHANGE_KEYS = ("min_count_change", "object_iou")
_LOCK_KEYS = ("expiry", "max_hold")
_WEBHOOK_KEYS = ("url", "secret_env", "timeout_seconds")
def as_config_error(exc: RequestError) -> RequestError:
    """``exc`` with the request flag it names (``--collections``) replaced by the config key that feeds
    it (``collections``): a monitor is configured by its file, not by flags.

    The region run's refusal of a run that plans more than ``--max-tiles`` tiles says to shrink the AOI or
    the date range, or raise the flag; a monitor has no date range, and the tiles of a run are those of the
    items it takes, so the message names ``max_items`` (the next runs take the items left) and ``max_tiles``:
    the run was refused on every schedule, naming a flag the monitor does not have."""
    reason = exc.reason
    if exc.field == "--max-tiles" and "plans more than" in reason:
        reason = (f"{reason.split(';')[0]}; lower max_items (the items one run takes: the next runs take the "
                  "others, newest first), shrink the AOI, or raise max_tiles")
    return RequestError(_FLAG_TO_KEY.get(exc.field, exc.field), reason)


_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: parse_request's flags -> the config keys that feed them (for error messages).
_FLAG_TO_KEY = {
    "--bbox": "aoi.bbox",
    "--intersects": "aoi.intersects",
    "--stac": "stac",
    "--collections": "collections",
    "--max-cloud": "max_cloud",
    "--max-items": "max_items",
    "--max-tiles": "max_tiles",
    "--profile": "profile",
    "--tile-size": "tile.size_px",
    "--overlap": "tile.overlap_px",
    "--gsd": "tile.gsd_m",
    "--max-nodata": "max_nodata",
    "--tasks": "tasks",
    "--task-file": "tasks",
    "--question": "tasks.questions",
    "--questions": "tasks.questions",
    "--classes": "tasks.classes",
    "--detect": "tasks.detect",
    "--refer": "tasks.refer",
    "--regions": "tasks.regions",
    "--merge-iou": "merge_iou",
    "--model": "model.model",
    "--adapter": "model.adapter",
    "--vision-tower": "model.vision_tower",
    "--image-aspect": "model.image_aspect",
    "--prompt-format": "model.prompt_format",
    "--image-size": "model.image_size",
    "--dtype": "model.dtype",
    "--attn-implementation": "model.attn_implementation",
    "--max-new-tokens": "model.max_new_tokens",
    "--batch-size": "model.batch_size",
    "--model-actors": "model_actors",
    "--read-workers": "read_workers",
    "--require-gpu": "require_gpu",
    "adapters": "tasks.adapters",
}


@dataclass(frozen=True)
class WebhookConfig:
    """Where to POST a summary when a run finds changes."""

    url: str
    """``http(s)`` URL the JSON summary is POSTed to."""
    secret_env: str | None = None
    """Name of the environment variable holding the shared secret that signs the body
    (``X-Rsflow-Signature-256: sha256=<HMAC-SHA256 hex>``); None: unsigned."""
    timeout_seconds: float = 10.0
    """Per-attempt timeout, seconds."""


@dataclass(frozen=True)
class ChangeRules:
    """What counts as a change between two observations of a tile."""

    min_count_change: float = 1.0
    """A count (detected objects of a label, or a numeric VQA answer) changed when it moved by at
    least this much."""
    object_iou: float = 0.3
    """An object matches one of the earlier observation when their polygons overlap at this IoU or
    more; unmatched objects have appeared (or vanished)."""


@dataclass(frozen=True)
class MonitorConfig:
    """One monitor, validated."""

    name: str
    """Monitor name (lower-case letters, digits, ``-``, ``_``)."""
    request: RegionRequest
    """The region request each run executes (its ``output`` is replaced by the run's scratch folder)."""
    output: str
    """Output root: a local directory (absolute) or an fsspec URL."""
    lookback: timedelta = DEFAULT_LOOKBACK
    """Each run searches from ``watermark - lookback`` (scenes published late still get in)."""
    start: datetime | None = None
    """Earliest acquisition time of the first run (UTC); None: ``now - lookback``."""
    schedule: CronSchedule | None = None
    """When the monitor is meant to run (for ``status``'s next due); None: unscheduled."""
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Runs that may try an item before it is given up."""
    lock_expiry: timedelta = DEFAULT_LOCK_EXPIRY
    """A lock not renewed for this long (its run was killed) may be taken over."""
    lock_max_hold: timedelta = timedelta(hours=24)
    """A run holding the lock this long stops renewing it (a hung run), so that the next takes over."""
    change: ChangeRules = field(default_factory=ChangeRules)
    """What counts as a change."""
    webhook: WebhookConfig | None = None
    """Called with a summary when a run finds changes; None: no call."""
    source: str | None = None
    """The YAML file the config came from."""

    def summary(self) -> dict[str, Any]:
        """The config as plain JSON (for run records and ``status --json``)."""
        return {
            "name": self.name,
            "source": self.source,
            "output": self.output,
            "lookback": format_duration(self.lookback),
            "start": self.start.isoformat() if self.start else None,
            "schedule": self.schedule.expression if self.schedule else None,
            "max_attempts": self.max_attempts,
            "lock_expiry": format_duration(self.lock_expiry),
            "lock_max_hold": format_duration(self.lock_max_hold),
            "change": dataclasses.asdict(self.change),
            "webhook": {"url": _redact_url(self.webhook.url), "secret_env": self.webhook.secret_env}
            if self.webhook
            else None,
            "request": self.request.to_json(),
        }


def load_monitor_config(path: str | Path, *, check_env: bool = True) -> MonitorConfig:
    """Read and check a monitor YAML file.

    Args:
        path: the file.
        check_env: also require the webhook's secret variable to be set (``rsflow monitor run``);
            ``status`` does not need it.

    Raises:
        RequestError: naming the key at fault (``config`` for an unreadable file).
    """
    import yaml

    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RequestError("config", f"no such file {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestError("config", f"cannot read {path}: {exc}") from None
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RequestError("config", f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_monitor_config(doc, base_dir=p.resolve().parent, source=str(p), check_env=check_env)


def parse_monitor_config(
    doc: Any, *, base_dir: Path, source: str = "<config>", check_env: bool = True
) -> MonitorConfig:
    """A loaded YAML mapping -> :class:`MonitorConfig` (see :func:`load_monitor_config`).

    Paths in the file (a task file, regions, an AOI file, a local STAC catalog, a local output)
    are relative to ``base_dir``.
    """
    doc = _mapping(doc, "config", TOP_KEYS, source)
    for key in ("name", "aoi", "stac", "tasks", "model", "output"):
        if key not in doc or doc[key] in (None, "", {}):
            if key == "tasks" and key in doc:
                raise RequestError("tasks", f"no task given in {source}; e.g. tasks: {{questions: [...]}}")
            raise RequestError(key, f"is required in {source}")
    name = doc["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise RequestError("name", f"use lower-case letters, digits, '-' and '_' (at most 63), got {name!r}")

    aoi = _mapping(doc["aoi"], "aoi", _AOI_KEYS, source)
    if ("bbox" in aoi) == ("intersects" in aoi):
        raise RequestError("aoi", "give exactly one of aoi.bbox (minx,miny,maxx,maxy) or aoi.intersects")
    bbox = aoi.get("bbox")
    if isinstance(bbox, list):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
            raise RequestError("aoi.bbox", f"must be four numbers, got {bbox!r}")
        bbox = tuple(float(v) for v in bbox)
    intersects = aoi.get("intersects")
    if isinstance(intersects, str) and not intersects.lstrip().startswith(("{", "POLYGON", "MULTI")):
        candidate = base_dir / intersects
        intersects = str(candidate) if candidate.is_file() else intersects

    stac = _string(doc["stac"], "stac")
    if not stac.startswith(("http://", "https://")) and stac != "sample":
        local = base_dir / stac
        stac = str(local.resolve()) if local.exists() else stac
    collections = doc.get("collections")
    if collections is not None and not (
        isinstance(collections, str)
        or (isinstance(collections, list) and all(isinstance(c, str) for c in collections))
    ):
        raise RequestError("collections", f"must be a list of collection ids, got {collections!r}")

    tasks = _tasks(doc["tasks"], base_dir, source)
    tile = _section(doc, "tile", _TILE_KEYS, source)
    model = _model(doc["model"], base_dir, source)
    output = check_output_root(doc["output"], base_dir)

    numbers = {key: _number(doc.get(key), key) for key in ("max_cloud", "max_nodata", "merge_iou")}
    wholes = {key: _whole(doc.get(key), key) for key in ("max_items", "max_tiles", "model_actors", "read_workers")}
    tile_size, overlap = (
        _whole(tile.get("size_px"), "tile.size_px"),
        _whole(tile.get("overlap_px"), "tile.overlap_px"),
    )

    try:
        request = parse_request(
            bbox=bbox,
            intersects=intersects,
            collections=collections,
            max_cloud=numbers["max_cloud"],
            max_items=wholes["max_items"] if wholes["max_items"] is not None else 100,
            max_tiles=wholes["max_tiles"] if wholes["max_tiles"] is not None else 100_000,
            stac=stac,
            profile=_optional_string(doc.get("profile"), "profile"),
            tile_size=tile_size,
            overlap=0 if overlap is None else overlap,
            gsd=_number(tile.get("gsd_m"), "tile.gsd_m"),
            max_nodata=numbers["max_nodata"] if numbers["max_nodata"] is not None else 0.5,
            tasks=(),
            task_file=tasks,
            merge="iou",
            merge_iou=numbers["merge_iou"] if numbers["merge_iou"] is not None else 0.5,
            preview=False,
            # The real output of each run is a scratch folder under the root (see rsflow.monitor.run); the root
            # is probed when a run starts (probe_output_root): reading the config writes nothing.
            output=_scratch_placeholder(output),
            probe_output=False,
            overwrite=True,
            model=model,
            model_actors=wholes["model_actors"],
            read_workers=wholes["read_workers"],
            require_gpu=_flag_value(doc.get("require_gpu"), "require_gpu"),
        )
    except RequestError as exc:
        raise as_config_error(exc) from None

    lookback = parse_duration(doc["lookback"], "lookback") if "lookback" in doc else DEFAULT_LOOKBACK
    if lookback <= timedelta(0):
        raise RequestError("lookback", "must be longer than zero")
    if lookback > MAX_LOOKBACK:
        raise RequestError(
            "lookback",
            f"{format_duration(lookback)} is longer than the limit of {format_duration(MAX_LOOKBACK)}; "
            "to process older scenes, set 'start' on a new output root",
        )
    start = _start(doc.get("start"))
    schedule = parse_cron(doc["schedule"]) if doc.get("schedule") is not None else None

    retry = _section(doc, "retry", _RETRY_KEYS, source)
    max_attempts = _whole(retry.get("max_attempts"), "retry.max_attempts")
    if max_attempts is not None and not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise RequestError(
            "retry.max_attempts", f"must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {max_attempts}"
        )

    change_doc = _section(doc, "change", _CHANGE_KEYS, source)
    min_count = _number(change_doc.get("min_count_change"), "change.min_count_change")
    object_iou = _number(change_doc.get("object_iou"), "change.object_iou")
    rules = ChangeRules(
        min_count_change=1.0 if min_count is None else min_count,
        object_iou=0.3 if object_iou is None else object_iou,
    )
    if rules.min_count_change <= 0:
        raise RequestError("change.min_count_change", f"must be > 0, got {rules.min_count_change}")
    if not 0 < rules.object_iou <= 1:
        raise RequestError("change.object_iou", f"is an IoU in (0, 1], got {rules.object_iou}")

    lock = _section(doc, "lock", _LOCK_KEYS, source)
    expiry = parse_duration(lock["expiry"], "lock.expiry") if "expiry" in lock else DEFAULT_LOCK_EXPIRY
    if not MIN_LOCK_EXPIRY <= expiry <= MAX_LOCK_EXPIRY:
        raise RequestError(
            "lock.expiry",
            f"must be between {format_duration(MIN_LOCK_EXPIRY)} and {format_duration(MAX_LOCK_EXPIRY)}, "
            f"got {format_duration(expiry)}",
        )
    max_hold = parse_duration(lock["max_hold"], "lock.max_hold") if "max_hold" in lock else timedelta(hours=24)
    if not expiry < max_hold <= timedelta(days=7):
        raise RequestError(
            "lock.max_hold", f"must be longer than lock.expiry ({format_duration(expiry)}) and at most 7d, "
                             f"got {format_duration(max_hold)}",
        )

    webhook = _webhook(doc.get("webhook"), source, check_env)
    return MonitorConfig(
        name=name,
        request=request,
        output=output,
        lookback=lookback,
        start=start,
        schedule=schedule,
        max_attempts=max_attempts if max_attempts is not None else DEFAULT_MAX_ATTEMPTS,
        lock_expiry=expiry,
        lock_max_hold=max_hold,
        change=rules,
        webhook=webhook,
        source=source,
    )


def check_output_root(value: Any, base_dir: Path) -> str:
    """The ``output`` key -> a normalised root (absolute local path or URL) that can be written.

    Local roots: the directory (or the nearest existing folder above it) must be a writable
    directory. URLs: fsspec must know the scheme (its package installed); whether the store answers
    is checked when a run starts (:func:`probe_output_root`).

    Raises:
        RequestError: ``output``.
    """
    raw = _string(value, "output").strip()
    root = raw.rstrip("/")
    if not root or raw.endswith("://") or root in ("file:", "file://"):  # "/" stripped to "" was the config's folder
        raise RequestError("output", f"{value!r} is a filesystem root or no path; give a folder for the monitor")
    refuse_output_in_job_copy(root, "output", base=base_dir)  # relative roots are from the config's folder
    if "://" in root and not root.startswith("file://"):
        import fsspec

        scheme = root.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(scheme)
        except (ValueError, ImportError) as exc:
            hint = (
                " (pip install -e '.[s3]' in the rsflow checkout)"
                if scheme == "s3"
                else " (pip install -e '.[gcs]' in the rsflow checkout)"
                if scheme in ("gs", "gcs")
                else ""
            )
            raise RequestError(
                "output", f"cannot write to {scheme}:// URLs: {' '.join(str(exc).split())}{hint}"
            ) from None
        return root
    path = Path(root.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    path = Path(os.path.normpath(path))
    if path.exists() and not path.is_dir():
        raise RequestError("output", f"{path} is a file; give a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RequestError("output", f"cannot create {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RequestError("output", f"cannot create or write {path}: {parent} is not writable")
    return str(path)


def probe_output_root(root: str) -> None:
    """Create the root's state folder and write and delete a small file in it.

    Raises:
        RequestError: ``output``, when the root cannot be reached or written (no credentials, no
            bucket, a full disk, ...).
    """
    from rsflow.monitor import store

    probe = store.join(root, "_monitor", f".probe{store.TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        store.write_bytes_atomic(probe, b"rsflow\n")
        store.remove(probe)
    except Exception as exc:  # noqa: BLE001 - any storage failure means the same thing to the user
        raise RequestError(
            "output", f"cannot write to {root}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None


def _scratch_placeholder(root: str) -> str:
    return f"{root.rstrip('/')}/_monitor/work/run"


def _redact_url(url: str) -> str:
    """The URL as records and logs show it: its scheme and host (and port), with its path and query
    replaced by a short hash of them. Hook URLs (Slack, Discord, Zapier) carry their token in the path,
    and run records sit under an output root that is often a shared bucket; the hash still tells two
    hooks of one host apart. Never raises, whatever the text."""
    import hashlib
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # a port out of range, a broken [IPv6] host: say no more than the scheme
        return f"{url.split(':', 1)[0][:16]}://<unreadable URL>"
    if port is not None:
        host = f"{host}:{port}"
    rest = url.split("://", 1)[-1][len(parts.netloc):] if "://" in url else url
    tag = f"/<path {hashlib.sha256(rest.encode()).hexdigest()[:8]}>" if rest not in ("", "/") else ""
    return f"{parts.scheme}://{host}{tag}"


def _check_webhook_url(url: str) -> None:
    """Refuse, when the file is read, a URL the POST would fail on: a webhook is called only when a run
    finds changes, which can be weeks after the config was written.

    Raises:
        RequestError: ``webhook.url``.
    """
    from urllib.parse import urlsplit

    shown = _redact_url(url)
    if any(c.isspace() or not c.isprintable() for c in url):
        raise RequestError(
            "webhook.url", f"must not hold spaces or control characters (percent-encode them), got {shown!r}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RequestError("webhook.url", f"is not a valid URL ({exc}), got {shown!r}") from None
    if parts.scheme not in ("http", "https"):
        raise RequestError("webhook.url", f"must be an http(s) URL, got {shown!r}")
    if not parts.hostname:
        raise RequestError("webhook.url", f"names no host, got {shown!r}")
    if "@" in parts.netloc:  # urllib cannot send user:password@ (InvalidURL), and the error text held the password
        raise RequestError(
            "webhook.url",
            "must not hold credentials (user:password@host: the POST cannot send them, and errors quoted them); "
            "put the secret in the environment variable that webhook.secret_env names (it signs the body: the "
            f"X-Rsflow-Signature-256 header), not in the URL; got {shown!r}",
        )
    if port == 0:
        raise RequestError("webhook.url", f"port must be between 1 and 65535, got {shown!r}")


def _mapping(value: Any, key: str, known: tuple[str, ...], source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        where = (
            f"{source} must be a mapping of keys"
            if key == "config"
            else f"must be a mapping with keys {', '.join(known)}"
        )
        raise RequestError(key, where)
    for k in value:
        if not isinstance(k, str) or k not in known:
            path = str(k) if key == "config" else f"{key}.{k}"
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
            raise RequestError(path, f"unknown key in {source}{hint}")
    return value


def _section(doc: dict[str, Any], key: str, known: tuple[str, ...], source: str) -> dict[str, Any]:
    """An optional mapping of ``doc`` (``tile``, ``retry``, ...): absent or null is empty, anything else
    must be a mapping. ``tile: 0``, ``retry: []`` or ``change: false`` are refused, not read as absent: they
    say the user meant something, and it is not what the run would do."""
    value = doc.get(key)
    return {} if value is None else _mapping(value, key, known, source)


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(key, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _optional_string(value: Any, key: str) -> str | None:
    return None if value is None else _string(value, key)


def _number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(key, f"must be a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:  # YAML's .nan and .inf: NaN fails every comparison, so range checks miss it
        raise RequestError(key, f"must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def _flag_value(value: Any, key: str) -> bool:
    """A yes/no key: ``true``/``false`` (YAML booleans), absent meaning no."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(key, f"must be true or false, got {value!r}")
    return value


def _whole(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(key, f"must be a whole number, got {value!r}")
    return value


def _tasks(value: Any, base_dir: Path, source: str) -> dict[str, Any]:
    """``tasks``: a task file path, or the task file's content inline."""
    try:
        if isinstance(value, str):
            path = base_dir / value
            parsed = parse_task_file(path)
        else:
            parsed = parse_task_mapping(value, base_dir=base_dir, source=f"'tasks' of {source}")
    except RequestError as exc:
        raise RequestError("tasks", exc.reason) from None
    if not parsed.get("tasks"):
        raise RequestError(
            "tasks", f"no task given in {source}; e.g. tasks: {{questions: [Is there water?]}}"
        )
    return parsed


def _model(value: Any, base_dir: Path, source: str) -> ModelSpec:
    if isinstance(value, str):
        value = {"model": value}
    spec = _mapping(value, "model", _MODEL_KEYS, source)
    if "model" not in spec:
        raise RequestError(
            "model.model", f"is required in {source} (a checkpoint folder, hub id, or 'smoke')"
        )
    fields = dict(spec)
    for key in ("model", "adapter", "vision_tower"):
        ref = fields.get(key)
        if isinstance(ref, str) and ref.startswith(("./", "../")):
            fields[key] = str((base_dir / ref).resolve())
    try:
        return ModelSpec(**fields)
    except RequestError as exc:
        raise RequestError(_FLAG_TO_KEY.get(exc.field, f"model.{exc.field}"), exc.reason) from None
    except TypeError as exc:
        raise RequestError("model", f"{exc}") from None


def _start(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise RequestError(
                "start", f"give a date or RFC 3339 time such as 2024-06-01, got {value!r}"
            ) from None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    raise RequestError("start", f"give a date or RFC 3339 time such as 2024-06-01, got {value!r}")


def _webhook(value: Any, source: str, check_env: bool) -> WebhookConfig | None:
    if value is None:
        return None
    hook = _mapping(value, "webhook", _WEBHOOK_KEYS, source)
    url = _string(hook.get("url"), "webhook.url")
    _check_webhook_url(url)
    secret_env = hook.get("secret_env")
    if secret_env is not None:
        if not isinstance(secret_env, str) or not _ENV_NAME.match(secret_env):
            raise RequestError(
                "webhook.secret_env",
                "must be the NAME of an environment variable (the secret itself never goes in the file)",
            )
        if check_env and not os.environ.get(secret_env):
            raise RequestError(
                "webhook.secret_env", f"the environment variable {secret_env} is not set or empty"
            )
    timeout = _number(hook.get("timeout_seconds"), "webhook.timeout_seconds")
    if timeout is not None and not 0 < timeout <= 300:
        raise RequestError("webhook.timeout_seconds", f"must be in (0, 300], got {timeout}")
    return WebhookConfig(url=url, secret_env=secret_env, timeout_seconds=10.0 if timeout is None else timeout)
