"""Schedules: a saga started on a cron expression (``sagaflow schedule add NAME --saga S --cron "0 2 * * *"``).

A schedule is plain data kept in SQL (store/schedules.py); the sweeper fires it (runtime/timers.py). Each
tick of the cron expression (UTC) starts one run whose idempotency key is ``schedule:<name>:<tick>``, so two
sweepers that fire the same tick start one run between them.

Cron expressions (UTC) are parsed by ``croniter`` (five fields, or six with the seconds last), the parser
DBOS's scheduled workflows use too, rather than a parser of our own.

Catch-up: a tick is *on time* while it is at most ``grace`` seconds old when a sweep sees it; every on-time
tick fires. Older ticks were missed while nothing swept (every worker down): ``skip`` fires none of them,
``once`` fires one run for the latest of them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from enum import Enum

from croniter import croniter

from sagaflow.errors import InvalidInput
from sagaflow.model.definition import NAME_PATTERN

# A sweep fires at most this many on-time ticks of one schedule (a cron firing each second, swept every 5 s,
# has five): a bound on one sweep's work whatever the expression.
MAX_TICKS_PER_SWEEP = 100


class CatchUp(str, Enum):
    """What happens to ticks missed while nothing swept."""

    SKIP = "skip"  # none of them fires
    ONCE = "once"  # one run, for the latest of them

    def __str__(self) -> str:
        return self.value


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or len(name) > 100:
        raise InvalidInput(f"schedule name {name!r:.80} must be an identifier (letters, digits, underscore) of at "
                           f"most 100 characters")
    return name


def check_cron(expression) -> str:
    """A cron expression croniter accepts: five fields (minute hour day month weekday), or six with the
    seconds last. InvalidInput otherwise."""
    if not isinstance(expression, str) or not expression.strip() or len(expression) > 200:
        raise InvalidInput(f"cron must be a cron expression such as '0 2 * * *', got {expression!r:.80}")
    expression = " ".join(expression.split())
    if not croniter.is_valid(expression):
        raise InvalidInput(f"cron expression {expression!r:.80} is not valid: five fields (minute hour day month "
                           f"weekday), or six with the seconds last, e.g. '0 2 * * *'")
    return expression


def check_catchup(value) -> CatchUp:
    try:
        return CatchUp(value)
    except ValueError:
        raise InvalidInput(f"catchup must be 'skip' or 'once', got {value!r:.80}") from None


def next_tick(expression: str, after: dt.datetime) -> dt.datetime:
    """The first tick strictly after ``after`` (UTC, aware)."""
    return croniter(expression, after.astimezone(dt.timezone.utc)).get_next(dt.datetime)


def previous_tick(expression: str, before: dt.datetime) -> dt.datetime:
    """The latest tick strictly before ``before`` (UTC, aware)."""
    return croniter(expression, before.astimezone(dt.timezone.utc)).get_prev(dt.datetime)


def due_ticks(expression: str, next_fire_at: dt.datetime, now: dt.datetime, grace: float,
              catchup: CatchUp) -> tuple[list[dt.datetime], dt.datetime]:
    """The ticks to fire now, oldest first, and the schedule's next tick after them. ``next_fire_at``: the
    first tick not fired yet. Ticks older than ``grace`` seconds were missed: ``skip`` drops them, ``once``
    fires the latest of them. At most MAX_TICKS_PER_SWEEP on-time ticks per call (the rest: the next sweep)."""
    if next_fire_at > now:
        return [], next_fire_at
    fire: list[dt.datetime] = []
    on_time_from = now - dt.timedelta(seconds=grace)
    tick = next_fire_at
    if tick < on_time_from:
        if catchup is CatchUp.ONCE:
            fire.append(previous_tick(expression, on_time_from))
        tick = next_tick(expression, on_time_from - dt.timedelta(microseconds=1))  # the first on-time tick
    while tick <= now and len(fire) < MAX_TICKS_PER_SWEEP:
        fire.append(tick)
        tick = next_tick(expression, tick)
    return fire, tick


def tick_key(name: str, tick: dt.datetime) -> str:
    """The idempotency key of the run a tick starts: one run per tick, however many sweepers fire it."""
    return f"schedule:{name}:{tick.astimezone(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"


@dataclass(frozen=True)
class Schedule:
    name: str
    saga: str
    cron: str
    input: dict
    paused: bool
    catchup: str
    next_fire_at: dt.datetime
    last_fired_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row) -> "Schedule":
        return cls(name=row.name, saga=row.saga, cron=row.cron, input=row.input, paused=row.paused,
                   catchup=row.catchup, next_fire_at=row.next_fire_at, last_fired_at=row.last_fired_at,
                   created_at=row.created_at, updated_at=row.updated_at)

    def to_dict(self) -> dict:
        return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in asdict(self).items()}
