"""Cron schedules (five fields, UTC) and durations, for a monitor's ``schedule`` and ``lookback``.

Only what ``rsflow monitor status`` needs to say when a monitor is next due: the five standard
fields ``minute hour day-of-month month day-of-week`` with ``*``, numbers, ``a-b`` ranges, ``*/n`` and
``a-b/n`` steps and ``,`` lists (day-of-week 0-7, 0 and 7 both Sunday; no names, no ``@daily``). As in
cron, when both day fields are restricted a day matches if either does. Times are UTC, as in a
Kubernetes CronJob without ``timeZone``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rsflow.errors import RequestError

_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class CronSchedule:
    """A parsed five-field cron expression."""

    expression: str
    """The expression as given."""
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    """0 = Sunday ... 6 = Saturday (7 folded into 0)."""
    days_restricted: bool
    weekdays_restricted: bool

    def day_matches(self, when: datetime) -> bool:
        """True when the day of ``when`` is a scheduled day (month, day of month, day of week)."""
        if when.month not in self.months:
            return False
        day_ok = when.day in self.days
        weekday_ok = (when.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def matches(self, when: datetime) -> bool:
        """True when the minute ``when`` falls in is a scheduled minute."""
        return when.minute in self.minutes and when.hour in self.hours and self.day_matches(when)

    def next_after(self, when: datetime) -> datetime:
        """The first scheduled minute strictly after ``when`` (a timezone-aware UTC datetime).

        Raises:
            ValueError: no such minute within eight years (e.g. ``0 0 31 2 *``).
        """
        first = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = first.replace(hour=0, minute=0)
        times = [(h, m) for h in sorted(self.hours) for m in sorted(self.minutes)]
        for _ in range(366 * 8):
            if self.day_matches(day):
                for h, m in times:
                    candidate = day.replace(hour=h, minute=m)
                    if candidate >= first:
                        return candidate
            day += timedelta(days=1)
        raise ValueError(f"schedule {self.expression!r} never fires")


def parse_cron(expression: str, field: str = "schedule") -> CronSchedule:
    """``"0 6 * * *"`` -> :class:`CronSchedule`.

    Raises:
        RequestError: naming ``field``: not five fields, a value out of range, a bad step, or a
            schedule that never fires.
    """
    if not isinstance(expression, str):
        raise RequestError(field, f"give a cron expression such as '0 6 * * *', got {expression!r}")
    parts = expression.split()
    if len(parts) != 5:
        raise RequestError(field, f"{expression!r} is not five cron fields (minute hour day month weekday)")
    sets = []
    for text, (name, low, high) in zip(parts, _FIELDS, strict=True):
        sets.append(_parse_field(text, name, low, high, expression, field))
    weekdays = frozenset(d % 7 for d in sets[4])
    schedule = CronSchedule(
        expression=expression,
        minutes=frozenset(sets[0]),
        hours=frozenset(sets[1]),
        days=frozenset(sets[2]),
        months=frozenset(sets[3]),
        weekdays=weekdays,
        days_restricted=parts[2] != "*",
        weekdays_restricted=parts[4] != "*",
    )
    try:
        schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC))
    except ValueError:
        raise RequestError(field, f"{expression!r} never fires (no such date)") from None
    return schedule


def _parse_field(text: str, name: str, low: int, high: int, expression: str, field: str) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) < 1:
                raise RequestError(field, f"bad step {step_text!r} in the {name} field of {expression!r}")
            step = int(step_text)
        if part == "*":
            start, end = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise RequestError(field, f"bad range {part!r} in the {name} field of {expression!r}")
            start, end = int(a), int(b)
        elif part.isdigit():
            start = end = int(part)
            if step != 1:
                end = high
        else:
            raise RequestError(
                field, f"bad value {part!r} in the {name} field of {expression!r} (numbers only)"
            )
        if not (low <= start <= high and low <= end <= high) or start > end:
            raise RequestError(
                field, f"{part!r} is outside {low}-{high} in the {name} field of {expression!r}"
            )
        values.update(range(start, end + 1, step))
    return values


def parse_duration(value: object, field: str) -> timedelta:
    """``"5d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` -> :class:`timedelta`.

    Raises:
        RequestError: naming ``field`` for anything else (a bare number has no unit and is refused).
    """
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise RequestError(field, f"give a duration such as 90s, 30m, 12h, 5d or 2w, got {value!r}")
    try:
        return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    except (OverflowError, ValueError):  # more days than timedelta holds (or a float of inf): a traceback otherwise
        raise RequestError(
            field, f"{value.strip()[:40]!r} is far too long; give a duration such as 90s, 30m, 12h, 5d or 2w"
        ) from None


def format_duration(delta: timedelta) -> str:
    """A duration the way :func:`parse_duration` reads it (largest whole unit)."""
    seconds = delta.total_seconds()
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNIT_SECONDS[unit] and seconds % _UNIT_SECONDS[unit] == 0:
            return f"{int(seconds // _UNIT_SECONDS[unit])}{unit}"
    return f"{seconds:g}s"
