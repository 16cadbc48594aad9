"""``rsflow monitor run|status NAME`` (and ``jobs/monitor_aoi.py --config FILE``).

``NAME`` is a monitor file (``monitors/port.yaml``) or a monitor name looked up as
``<monitors dir>/NAME.yaml`` (``--monitors-dir``, default ``$RSFLOW_MONITORS`` or ``monitors``).

Exit codes (:mod:`rsflow.errors`): 0 done (also when there was nothing new); 4 committed, but some
items failed this run (they are retried by the next runs, or were given up; also in a run that processed
nothing new); 2 bad config or flags
(one line naming the key); 3 another run holds the monitor's lock (one line naming it); 5 the STAC
source could not be searched; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rsflow.errors import EXIT_LOCKED, EXIT_OK, EXIT_PARTIAL, RequestError

logger = logging.getLogger(__name__)


def add_monitor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``monitor run|status`` to the ``rsflow`` subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "monitor",
        help="scheduled AOI monitoring: process only new scenes and report what changed",
        description="Run a monitor described in YAML (see monitors/port.yaml), or show where it stands.",
    )
    sub = p.add_subparsers(dest="monitor_command", required=True, parser_class=type(p))
    for name, text in (
        ("run", "search new scenes, process them, commit, report changes"),
        ("status", "last run, watermark, items done / failed / given up, next due"),
    ):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("name", nargs="?", metavar="NAME", help="monitor file, or name of monitors/NAME.yaml")
        q.add_argument("--config", metavar="YAML", help="monitor file (instead of NAME)")
        q.add_argument(
            "--monitors-dir", help="where NAME.yaml is looked up (default: $RSFLOW_MONITORS or monitors)"
        )
        if name == "run":
            q.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a cluster `ray start` started "
                           "on this machine, else a new local Ray; 'local': a new local Ray)")
        else:
            q.add_argument("--json", action="store_true", help="print the status as JSON")
        q.add_argument(
            "--log-level",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            default=argparse.SUPPRESS,
            help="logging level (default INFO)",
        )
    return p


def config_path(args: argparse.Namespace) -> Path:
    """The monitor file named by ``NAME`` or ``--config``.

    Raises:
        RequestError: ``NAME`` for neither or both, or a name with no file.
    """
    if (args.name is None) == (args.config is None):
        raise RequestError("NAME", "give a monitor name or file, or --config FILE (one of them)")
    if args.config is not None:
        return Path(args.config)
    name = str(args.name)
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    folder = Path(args.monitors_dir or os.environ.get("RSFLOW_MONITORS") or "monitors")
    for suffix in (".yaml", ".yml"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise RequestError("NAME", f"no monitor file {folder / (name + '.yaml')}; give a path or --monitors-dir")


def run_monitor_command(args: argparse.Namespace) -> int:
    """``rsflow monitor run|status``; returns the exit code (bad input raises RequestError)."""
    from rsflow.hrefs import redact
    from rsflow.monitor.config import load_monitor_config
    from rsflow.monitor.lock import MonitorLocked
    from rsflow.monitor.run import format_status, monitor_status, run_monitor

    path = config_path(args)
    if args.monitor_command == "status":
        config = load_monitor_config(path, check_env=False)
        status = monitor_status(config)
        print(json.dumps(status.to_json(), indent=1, sort_keys=True) if args.json else format_status(status))
        return EXIT_OK
    config = load_monitor_config(path)
    try:
        result = run_monitor(config, address=args.address)
    except MonitorLocked as exc:
        print(f"rsflow monitor: locked: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    failed_or_given_up = EXIT_PARTIAL if result.items_failed or result.items_given_up else EXIT_OK
    if result.outcome == "nothing-new":
        # nothing was processed, but items may have failed or been given up without running (a run that died
        # with them, a search that no longer returns them): exit 4 says so, as after a run that processed some
        tail = (
            f"; {len(result.items_failed)} failed (will retry), {len(result.items_given_up)} given up"
            if failed_or_given_up
            else ""
        )
        print(
            f"monitor {config.name}: nothing new since {result.search_window.split('/')[0]} "
            f"({result.items_found} items found, all done or given up){tail}; watermark {result.watermark}"
        )
        return failed_or_given_up
    hook = ""
    if result.webhook is not None:  # printed, not logged: no RedactingFilter sees it
        hook = (
            "; webhook called" if result.webhook.delivered else f"; webhook FAILED ({redact(result.webhook.error or '')})"
        )
    # an item given up with its good tiles' rows committed is still given up (exit 4): the count says which
    kept = f" ({len(result.items_partial)} with their rows kept)" if result.items_partial else ""
    print(
        f"monitor {config.name}: run {result.run_id}: {len(result.items_done)} items done, "
        f"{len(result.items_failed)} failed (will retry), {len(result.items_given_up)} given up{kept}; "
        f"{result.new_changes} changes; watermark {result.watermark}{hook}; output {config.output}"
    )
    return failed_or_given_up
