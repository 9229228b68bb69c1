"""Five-field cron schedules: parsing and "when does it fire next" (pure, no I/O, no clock).

A schedule is ``minute hour day-of-month month day-of-week``, each field one of
``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n`` or ``a/n``, or a
comma-separated list of those. Months and weekdays also take English
abbreviations (``jan``..``dec``, ``sun``..``sat``); weekday 7 is Sunday like 0.
The macros ``@hourly``, ``@daily`` (``@midnight``), ``@weekly``, ``@monthly``
and ``@yearly`` (``@annually``) are accepted.

Day matching follows Vixie cron: when both day-of-month and day-of-week are
restricted (neither is ``*``), a day matches if *either* does.

Times are evaluated in UTC unless a `zoneinfo` time zone name is given. The
agent passes its injectable clock's timestamp to `next_after`, so tests never
sleep for a schedule.

Shared: the agent schedules with it, the
operator and the controller validate MLTask/release triggers with it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import zoneinfo
from collections.abc import Mapping

from tether.common import errors

_MONTHS = {
    m: i
    for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)
}
_DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# (name, low, high, aliases)
_FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)
MAX_EXPRESSION_LEN = 200
# Searching further than this finds nothing new: every (month, day, weekday) combination
# repeats within 28 years (the Gregorian weekday cycle is 400 years, but 29 February on a
# given weekday recurs within 28 years between century years). Bounded to stay cheap.
_SEARCH_YEARS = 29


class InvalidCron(errors.InvalidSpec):
    """A cron expression cannot be parsed (the message names the field and why)."""


def _value(token: str, name: str, low: int, high: int, aliases: Mapping[str, int]) -> int:
    token = token.strip().lower()
    if token in aliases:
        return aliases[token]
    if not token.isdigit():
        raise InvalidCron(f"{name}: {errors.excerpt(token)} is not a number", field="trigger.schedule")
    value = int(token)
    if not low <= value <= high:
        raise InvalidCron(f"{name}: {value} is outside [{low}, {high}]", field="trigger.schedule")
    return value


def _field(text: str, name: str, low: int, high: int, aliases: Mapping[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise InvalidCron(f"{name}: empty list item in {errors.excerpt(text)}", field="trigger.schedule")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise InvalidCron(
                    f"{name}: step {errors.excerpt(step_text)} must be a positive integer", field="trigger.schedule"
                )
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            start, end = _value(a, name, low, high, aliases), _value(b, name, low, high, aliases)
            if start > end:
                raise InvalidCron(f"{name}: range {errors.excerpt(base)} runs backwards", field="trigger.schedule")
        else:
            start = _value(base, name, low, high, aliases)
            end = high if slash else start  # "a/n" means a, a+n, ... up to the field's maximum
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclasses.dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression; `next_after(ts)` is the first firing strictly after `ts`."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    day_restricted: bool
    weekday_restricted: bool
    timezone: str = "UTC"

    @classmethod
    def parse(cls, expression: object, *, timezone: str = "UTC") -> CronSchedule:
        """`expression` as given in a document (anything that is not a non-empty string is refused)."""
        if not isinstance(expression, str) or not expression.strip():
            raise InvalidCron("must be a non-empty string", field="trigger.schedule")
        if len(expression) > MAX_EXPRESSION_LEN:
            raise InvalidCron(f"longer than {MAX_EXPRESSION_LEN} characters", field="trigger.schedule")
        text = _MACROS.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) != 5:
            raise InvalidCron(
                f"{errors.excerpt(expression)} has {len(parts)} fields; expected 5 (minute hour"
                f" day-of-month month day-of-week)",
                field="trigger.schedule",
            )
        sets = [_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
            raise InvalidCron(f"unknown time zone {errors.excerpt(timezone)}", field="trigger.timezone") from None
        weekdays = frozenset(d % 7 for d in sets[4])
        schedule = cls(
            expression=expression,
            minutes=sets[0],
            hours=sets[1],
            days=sets[2],
            months=sets[3],
            weekdays=weekdays,
            day_restricted=parts[2] != "*",
            weekday_restricted=parts[4] != "*",
            timezone=timezone,
        )
        if schedule.next_after(0.0) is None:
            raise InvalidCron(f"{errors.excerpt(expression)} never fires (no such date)", field="trigger.schedule")
        return schedule

    def _day_matches(self, day: dt.date) -> bool:
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return dom or dow
        return dom and dow

    def matches(self, when: dt.datetime) -> bool:
        """Whether the schedule fires in the minute of `when` (a datetime in the schedule's zone)."""
        return (
            when.minute in self.minutes
            and when.hour in self.hours
            and when.month in self.months
            and self._day_matches(when.date())
        )

    def next_after(self, ts: float) -> float | None:
        """The first firing time (a POSIX timestamp) strictly after `ts`; None if it never fires."""
        tz = zoneinfo.ZoneInfo(self.timezone)
        start = dt.datetime.fromtimestamp(ts, tz).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        day = start.date()
        last = dt.date(min(dt.MAXYEAR, day.year + _SEARCH_YEARS), 12, 31)
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        while day <= last:
            if day.month not in self.months:
                # jump to the first day of the next month
                day = (day.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
                continue
            if self._day_matches(day):
                for hour in hours:
                    if day == start.date() and hour < start.hour:
                        continue
                    for minute in minutes:
                        if day == start.date() and hour == start.hour and minute < start.minute:
                            continue
                        candidate = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=tz)
                        # A wall time skipped by a DST jump does not exist: fold it away by round-tripping.
                        real = candidate.astimezone(dt.UTC).astimezone(tz)
                        if real.replace(tzinfo=None) != candidate.replace(tzinfo=None):
                            continue
                        stamp = candidate.timestamp()
                        if stamp > ts:
                            return stamp
            day += dt.timedelta(days=1)
        return None
