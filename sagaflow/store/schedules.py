"""Schedules: add, read, list, pause, resume, remove; and the sweeper's firing of due ticks.

Firing a schedule is one transaction: the run of each due tick is inserted ``scheduled`` (start_at: the
tick) with the idempotency key ``schedule:<name>:<tick>`` (a key already used inserts nothing), then
``next_fire_at`` moves with a compare-and-set on the value the sweeper read. Of many sweepers firing the same
schedule at once, the first commits the runs and the move; the others find the keys taken or next_fire_at
moved and insert nothing. The runs then start like any delayed start (store/timers.py), in the same sweep.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from sagaflow.errors import InvalidTransition, UnknownSchedule
from sagaflow.model.events import EventKind
from sagaflow.model.schedule import Schedule, tick_key
from sagaflow.model.snapshots import StepSpec
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.guards import event
from sagaflow.store.runs import insert_run


class Schedules(Engines):
    def add_schedule(self, name: str, saga: str, cron: str, input: dict, catchup: str,
                     next_fire_at: dt.datetime, paused: bool = False) -> Schedule:
        """A new schedule. InvalidTransition when the name is taken (nothing changes)."""
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(t.schedules).values(
                    name=name, saga=saga, cron=cron, input=input, paused=paused, catchup=catchup,
                    next_fire_at=next_fire_at, last_fired_at=None, created_at=now, updated_at=now))
        except IntegrityError:
            raise InvalidTransition(f"a schedule named {name!r} exists already; remove it first, or pick "
                                    f"another name") from None
        return self.get_schedule(name)

    def get_schedule(self, name: str) -> Schedule:
        row = self._read(lambda conn: conn.execute(select(t.schedules).where(t.schedules.c.name == name)).first())
        if row is None:
            raise UnknownSchedule(f"unknown schedule {name!r}")
        return Schedule.from_row(row)

    def list_schedules(self) -> list[Schedule]:
        rows = self._read(lambda conn: conn.execute(select(t.schedules).order_by(t.schedules.c.name)).all())
        return [Schedule.from_row(row) for row in rows]

    def pause_schedule(self, name: str, paused: bool, next_fire_at: dt.datetime | None = None) -> Schedule:
        """Pause (no tick fires) or resume (``next_fire_at``: the first tick after now, so the ticks missed
        while paused never fire)."""
        values: dict = {"paused": paused, "updated_at": utcnow()}
        if next_fire_at is not None:
            values["next_fire_at"] = next_fire_at
        with self.engine.begin() as conn:
            changed = conn.execute(update(t.schedules).where(t.schedules.c.name == name).values(**values)).rowcount
        if not changed:
            raise UnknownSchedule(f"unknown schedule {name!r}")
        return self.get_schedule(name)

    def remove_schedule(self, name: str) -> None:
        """Delete the schedule; the runs it started stay."""
        with self.engine.begin() as conn:
            if not conn.execute(delete(t.schedules).where(t.schedules.c.name == name)).rowcount:
                raise UnknownSchedule(f"unknown schedule {name!r}")

    # ------------------------------------------------------------ the sweeper

    def due_schedules(self, now: dt.datetime, limit: int = 100) -> list[Schedule]:
        s = t.schedules.c
        rows = self._read(lambda conn: conn.execute(
            select(t.schedules).where(s.paused.is_(False), s.next_fire_at <= now).order_by(s.next_fire_at)
            .limit(limit)).all())
        return [Schedule.from_row(row) for row in rows]

    def fire_schedule(self, schedule: Schedule, ticks: list[dt.datetime], next_fire_at: dt.datetime, version: int,
                      steps: list[StepSpec], mode: str) -> list[str]:
        """Insert one ``scheduled`` run per tick (start_at: the tick; a tick whose run exists already inserts
        nothing) and move next_fire_at from what ``schedule`` read to ``next_fire_at``, in one transaction.
        Returns the ids of the runs inserted; [] when another sweeper fired these ticks first, or the schedule
        was paused, changed or removed meanwhile."""
        now = utcnow()
        s = t.schedules.c
        created: list[str] = []
        with self.engine.begin() as conn:
            moved = conn.execute(
                update(t.schedules)
                .where(s.name == schedule.name, s.next_fire_at == schedule.next_fire_at, s.paused.is_(False),
                       s.cron == schedule.cron)
                .values(next_fire_at=next_fire_at, updated_at=now,
                        **({"last_fired_at": ticks[-1]} if ticks else {}))
            ).rowcount
            if not moved:  # the row is now locked by us, or another sweeper moved it: nothing to insert
                return []
            for tick in ticks:
                key = tick_key(schedule.name, tick)
                taken = conn.execute(select(t.runs.c.id).where(t.runs.c.idempotency_key == key)).first()
                if taken is not None:
                    continue
                run_id = str(uuid.uuid4())
                insert_run(conn, run_id, schedule.saga, version, schedule.input, key, [] if mode == "plain" else steps,
                           now, mode, start_at=tick)
                event(conn, run_id, EventKind.RUN_SCHEDULED, None,
                      {"schedule": schedule.name, "tick": tick.isoformat(), "start_at": tick.isoformat()}, now)
                created.append(run_id)
        return created
