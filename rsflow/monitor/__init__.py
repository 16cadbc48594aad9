"""Scheduled area-of-interest monitoring: only new scenes, idempotent, and a report of what changed.

A monitor (``monitors/*.yaml``, :mod:`rsflow.monitor.config`) runs the region pipeline on the STAC
items it has not processed yet, writes their results into a dataset partitioned by acquisition date,
records them in a ledger (:mod:`~rsflow.monitor.ledger`) only after the write committed, and reports
what changed between consecutive observations of each tile (:mod:`~rsflow.monitor.changes`,
:mod:`~rsflow.monitor.report`), optionally calling a webhook (:mod:`~rsflow.monitor.webhook`). One run
at a time holds the lock (:mod:`~rsflow.monitor.lock`). :mod:`~rsflow.monitor.run` puts it together.
"""

from rsflow.monitor.config import MonitorConfig, load_monitor_config
from rsflow.monitor.lock import MonitorLocked
from rsflow.monitor.run import MonitorRunResult, MonitorStatus, format_status, monitor_status, run_monitor

__all__ = [
    "MonitorConfig",
    "MonitorLocked",
    "MonitorRunResult",
    "MonitorStatus",
    "format_status",
    "load_monitor_config",
    "monitor_status",
    "run_monitor",
]
