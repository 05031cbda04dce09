"""Limits that hold across every worker: a saga's ``max_concurrent_runs``, a step's ``concurrency`` and
``rate_limit`` (model/definition.py), enforced in SQL so that twenty workers allow what one allows.

- A *slot* is a row of ``saga_slots`` under a key: ``run:<saga>`` (idx -1: one per live run) or
  ``step:<saga>.<step>`` (one per step running). A run's slot lives while the run is live (any status but a
  final one, and not ``queued``); a step's while its lease runs and the worker it names heartbeats
  (store/workers.py), so a killed holder's slot frees itself with its lease or its worker's liveness.
- A run or step over its limit becomes a *waiter* (``saga_slot_waiters``; arrival order: a run's start
  time, a step's first ask, then the row's id), its
  status ``queued`` (a ``run_queued``/``step_queued`` event), and its delivery ends: it holds no worker.
  When a slot frees (``release``, a run's end, or the sweeper finding a dead holder: ``promote``), the
  earliest waiters get the free slots *reserved* for them (a slot row written for them, their status back
  to ``pending``) and the runtime publishes their chains; their delivery finds the slot ``held``.
- A rate limit keeps the starts of the last period (``saga_rate_starts``): a start is let through while the
  window holds fewer than ``count``; else the caller is told how long to wait (the runtime schedules the
  step again then, its status ``queued`` meanwhile).

Every decision about one key runs in one transaction that holds the key's lock: a transaction-scoped
advisory lock on PostgreSQL (works through PgBouncer's transaction pooling), the database lock SQLite's
``BEGIN IMMEDIATE`` takes anyway.
"""

from __future__ import annotations

import datetime as dt
import random

from sqlalchemy import and_, delete, exists, func, insert, or_, select, text, update

from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import Promoted, SlotOutcome
from sagaflow.model.status import FINAL_RUN_STATUSES, RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.guards import event, set_run_status
from sagaflow.store.workers import current_worker

RUN_SLOT = -1  # the idx of a run's slot
# A rate window is kept this much longer than its period, so that the starts an action sees (a few
# milliseconds after the SQL decision, each by its own delay) never crowd more than ``count`` into a period.
RATE_MARGIN = 0.1
PRUNE_RATE_STARTS = 0.05  # the share of starts that also delete the rows older than the window
ENDED = tuple(s.value for s in FINAL_RUN_STATUSES) + (RunStatus.QUEUED.value,)


def run_key(saga: str) -> str:
    return f"run:{saga}"


def step_key(saga: str, step: str) -> str:
    return f"step:{saga}.{step}"


class Limits(Engines):
    def _lock(self, conn, key: str) -> None:
        if self.engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})

    @staticmethod
    def _drop_dead_holders(conn, key: str, now: dt.datetime, dead_after: float | None) -> None:
        """Delete the slots of ``key`` that no longer count: a run's once the run ended (or is gone), a
        step's once its lease ran out or its worker stopped heartbeating."""
        sl, r, w = t.slots.c, t.runs.c, t.workers.c
        if key.startswith("run:"):
            live = exists().where(r.id == sl.run_id, r.status.notin_(ENDED))
            conn.execute(delete(t.slots).where(sl.key == key, ~live))
            return
        alive = sl.lease_expires_at >= now
        if dead_after is not None:
            beat_since = now - dt.timedelta(seconds=dead_after)
            alive = and_(alive, or_(sl.worker.is_(None),
                                    exists().where(w.id == sl.worker, w.heartbeat_at >= beat_since)))
        conn.execute(delete(t.slots).where(sl.key == key, ~alive))

    def acquire_slot(self, key: str, capacity: int, run_id: str, idx: int, saga: str, version: int,
                     lease_seconds: float, dead_after: float | None = None) -> SlotOutcome:
        """Ask for a slot of ``key`` (at most ``capacity`` held at once) for step ``idx`` of ``run_id``
        (``RUN_SLOT``: the run itself). Queued: the waiter is recorded and the step (or run) is ``queued``.

        When the limit does not bind this is three statements (the key's lock, one read of everything the
        decision needs, the slot's insert): the benchmark's limits phase measures it."""
        now = utcnow()
        sl, wt, r = t.slots.c, t.slot_waiters.c, t.runs.c
        lease = now + dt.timedelta(seconds=lease_seconds)
        mine = (sl.key == key, sl.run_id == run_id, sl.idx == idx)
        with self.engine.begin() as conn:
            self._lock(conn, key)
            state = conn.execute(select(
                select(r.cancel_requested).where(r.id == run_id).scalar_subquery().label("cancel"),
                exists().where(*mine).label("held_by_me"),
                select(func.count()).select_from(t.slots).where(sl.key == key).scalar_subquery().label("held"),
                select(func.count()).select_from(t.slot_waiters).where(wt.key == key).scalar_subquery()
                .label("waiting"),
            )).one()
            if state.cancel:
                return SlotOutcome.HELD  # no line for a cancelled run: its claim meets the cancel at once
            if state.held_by_me:
                conn.execute(update(t.slots).where(*mine).values(worker=current_worker(), lease_expires_at=lease))
                return SlotOutcome.HELD
            if state.held + state.waiting < capacity and idx != RUN_SLOT:
                conn.execute(insert(t.slots).values(key=key, run_id=run_id, idx=idx, worker=current_worker(),
                                                    lease_expires_at=lease, acquired_at=now))
                return SlotOutcome.GRANTED
            return self._acquire_or_wait(conn, key, capacity, run_id, idx, saga, version, lease, now, dead_after)

    def _acquire_or_wait(self, conn, key: str, capacity: int, run_id: str, idx: int, saga: str, version: int,
                         lease: dt.datetime, now: dt.datetime, dead_after: float | None) -> SlotOutcome:
        """The limit may bind: count only live holders, and the waiters that arrived before this one."""
        sl, wt = t.slots.c, t.slot_waiters.c
        self._drop_dead_holders(conn, key, now, dead_after)
        held = conn.execute(select(func.count()).select_from(t.slots).where(sl.key == key)).scalar_one()
        waiter = conn.execute(select(wt.id, wt.queued_at)
                              .where(wt.key == key, wt.run_id == run_id, wt.idx == idx)).first()
        # Arrival: a run's when it was started (client.start), a step's when it first asked.
        if waiter is not None:
            arrived = waiter.queued_at
        elif idx == RUN_SLOT:
            arrived = conn.execute(select(t.runs.c.created_at).where(t.runs.c.id == run_id)).scalar() or now
        else:
            arrived = now
        ahead_of = [wt.key == key, or_(wt.queued_at < arrived,
                                       and_(wt.queued_at == arrived, wt.id < (waiter.id if waiter else 0)))]
        ahead = conn.execute(select(func.count()).select_from(t.slot_waiters).where(*ahead_of)).scalar_one()
        if idx == RUN_SLOT and waiter is None:
            # Runs started earlier whose first message is still on its way count as ahead too, so a run that
            # overtook them on the broker waits its turn. (Should one's message be lost, the sweeper's
            # promote serves the line anyway: it counts slots and waiters only.)
            r = t.runs.c
            ahead += conn.execute(select(func.count()).select_from(t.runs).where(
                r.saga == saga, r.status == RunStatus.PENDING.value, r.created_at < arrived,
                r.mode == "saga", ~exists().where(sl.key == key, sl.run_id == r.id))).scalar_one()
        if held + ahead < capacity:
            conn.execute(insert(t.slots).values(key=key, run_id=run_id, idx=idx, worker=current_worker(),
                                                lease_expires_at=lease, acquired_at=now))
            if waiter is not None:
                conn.execute(delete(t.slot_waiters).where(wt.id == waiter.id))
                self._unqueue(conn, run_id, idx, now)
            return SlotOutcome.GRANTED
        if waiter is None:
            conn.execute(insert(t.slot_waiters).values(key=key, run_id=run_id, idx=idx, saga=saga,
                                                       saga_version=version, queued_at=arrived))
        self._enqueue(conn, run_id, idx, now, {"limit": key, "capacity": capacity, "ahead": ahead})
        return SlotOutcome.QUEUED

    @staticmethod
    def _enqueue(conn, run_id: str, idx: int, now: dt.datetime, detail: dict) -> bool:
        """Mark the run (RUN_SLOT) or step ``queued``, from pending; an event the first time only."""
        s = t.steps.c
        if idx == RUN_SLOT:
            moved = set_run_status(conn, run_id, RunStatus.PENDING, RunStatus.QUEUED, now)
            if moved:
                event(conn, run_id, EventKind.RUN_QUEUED, None, detail, now)
            return bool(moved)
        row = conn.execute(update(t.steps).where(s.run_id == run_id, s.idx == idx,
                                                 s.status == StepStatus.PENDING.value)
                           .values(status=StepStatus.QUEUED.value).returning(s.name)).first()
        if row is not None:
            event(conn, run_id, EventKind.STEP_QUEUED, row.name, detail, now)
        return row is not None

    @staticmethod
    def _unqueue(conn, run_id: str, idx: int, now: dt.datetime) -> None:
        s = t.steps.c
        if idx == RUN_SLOT:
            set_run_status(conn, run_id, RunStatus.QUEUED, RunStatus.PENDING, now)
        else:
            conn.execute(update(t.steps).where(s.run_id == run_id, s.idx == idx,
                                               s.status == StepStatus.QUEUED.value)
                         .values(status=StepStatus.PENDING.value))

    def release_slot(self, key: str, capacity: int, run_id: str, idx: int, lease_seconds: float,
                     dead_after: float | None = None) -> list[Promoted]:
        """Give back the slot of step ``idx`` of ``run_id`` and reserve the free slots for the earliest
        waiters; returns them (their chains to publish). No line: the lock, the delete and one read."""
        sl, wt = t.slots.c, t.slot_waiters.c
        with self.engine.begin() as conn:
            self._lock(conn, key)
            conn.execute(delete(t.slots).where(sl.key == key, sl.run_id == run_id, sl.idx == idx))
            if conn.execute(select(exists().where(wt.key == key))).scalar():
                return self._promote(conn, key, capacity, lease_seconds, dead_after)
            return []

    def promote(self, key: str, capacity: int, lease_seconds: float, dead_after: float | None = None
                ) -> list[Promoted]:
        """Reserve the free slots of ``key`` (a run ended, a holder died) for the earliest waiters."""
        with self.engine.begin() as conn:
            self._lock(conn, key)
            return self._promote(conn, key, capacity, lease_seconds, dead_after)

    def _promote(self, conn, key: str, capacity: int, lease_seconds: float, dead_after: float | None
                 ) -> list[Promoted]:
        now = utcnow()
        sl, wt = t.slots.c, t.slot_waiters.c
        self._drop_dead_holders(conn, key, now, dead_after)
        held = conn.execute(select(func.count()).select_from(t.slots).where(sl.key == key)).scalar_one()
        free = capacity - held
        if free <= 0:
            return []
        if key.startswith("run:"):
            # Runs started before the first in line whose message is still on its way get their turn first
            # (acquire_slot counts them ahead too); a lost one is re-driven by the sweeper's stall check.
            first = conn.execute(select(func.min(wt.queued_at)).where(wt.key == key)).scalar()
            if first is not None:
                r = t.runs.c
                free -= conn.execute(select(func.count()).select_from(t.runs).where(
                    r.saga == key.removeprefix("run:"), r.status == RunStatus.PENDING.value, r.created_at < first,
                    r.mode == "saga", ~exists().where(sl.key == key, sl.run_id == r.id))).scalar_one()
        if free <= 0:
            return []
        waiters = conn.execute(select(wt.id, wt.run_id, wt.idx, wt.saga, wt.saga_version).where(wt.key == key)
                               .order_by(wt.queued_at, wt.id).limit(free)).all()
        promoted = []
        for waiter in waiters:
            conn.execute(delete(t.slot_waiters).where(wt.id == waiter.id))
            conn.execute(insert(t.slots).values(key=key, run_id=waiter.run_id, idx=waiter.idx, worker=None,
                                                lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                                                acquired_at=now))
            self._unqueue(conn, waiter.run_id, waiter.idx, now)
            start = 0 if waiter.idx == RUN_SLOT else waiter.idx
            promoted.append(Promoted(waiter.run_id, waiter.saga, waiter.saga_version, start,
                                     self._results_before(conn, waiter.run_id, start)))
        return promoted

    @staticmethod
    def _results_before(conn, run_id: str, idx: int) -> dict:
        s = t.steps.c
        done = (StepStatus.SUCCEEDED.value, StepStatus.FAILED_BEST_EFFORT.value)
        rows = conn.execute(select(s.name, s.result).where(s.run_id == run_id, s.idx < idx, s.status.in_(done))
                            .order_by(s.idx))
        return {row.name: row.result for row in rows}

    def waiting_keys(self) -> list[tuple[str, str, int, int]]:
        """(key, saga, version, idx) of one waiter per key that has waiters: what the sweeper promotes."""
        wt = t.slot_waiters.c
        first = select(func.min(wt.id)).group_by(wt.key)  # any one per key: promote serves the earliest
        rows = self._read(lambda conn: conn.execute(
            select(wt.key, wt.saga, wt.saga_version, wt.idx).where(wt.id.in_(first))).all())
        return [(row.key, row.saga, row.saga_version, row.idx) for row in rows]

    def take_rate(self, key: str, count: int, period: float, run_id: str, idx: int, queued: bool = True) -> float:
        """A start of step ``idx`` of ``run_id`` under ``count`` per ``period`` seconds: 0 when it may start
        now (recorded; a ``queued`` step is ``pending`` again: ``queued`` False says it never waited), else
        the seconds until the window has room. Starts older than the window are deleted now and then."""
        window = dt.timedelta(seconds=period + RATE_MARGIN)
        rs = t.rate_starts.c
        with self.engine.begin() as conn:
            self._lock(conn, key)
            now = utcnow()  # once the lock is held: the starts are recorded in the order they were let through
            in_window = (rs.key == key, rs.at > now - window)
            started = conn.execute(select(func.count()).select_from(t.rate_starts).where(*in_window)).scalar_one()
            if started < count:
                conn.execute(insert(t.rate_starts).values(key=key, at=now))
                if queued:
                    self._unqueue(conn, run_id, idx, now)
                if random.random() < PRUNE_RATE_STARTS:
                    conn.execute(delete(t.rate_starts).where(rs.key == key, rs.at <= now - window))
                return 0.0
            oldest = conn.execute(select(rs.at).where(*in_window).order_by(rs.at.desc())
                                  .offset(count - 1).limit(1)).scalar_one()
            return max(0.001, (oldest + window - now).total_seconds())

    def queue_step_for_rate(self, run_id: str, idx: int, key: str, wait: float) -> None:
        """A step over its rate limit waits ``queued`` until it is tried again (an event the first time)."""
        now = utcnow()
        with self.engine.begin() as conn:
            self._enqueue(conn, run_id, idx, now, {"limit": key, "retry_in": round(wait, 3)})

    def cancel_queued_run(self, run_id: str) -> bool:
        """client.cancel of a run still queued for its saga's slot: it ends ``cancelled`` at once (nothing
        ran, nothing to undo) and leaves the line. False: the run is not queued."""
        now = utcnow()
        s, wt = t.steps.c, t.slot_waiters.c
        with self.engine.begin() as conn:
            if not set_run_status(conn, run_id, RunStatus.QUEUED, RunStatus.CANCELLED, now, cancel_requested=True,
                                  finished_at=now):
                return False
            conn.execute(delete(t.slot_waiters).where(wt.run_id == run_id))
            conn.execute(update(t.steps).where(s.run_id == run_id, s.status.in_(
                (StepStatus.PENDING.value, StepStatus.QUEUED.value))).values(status=StepStatus.SKIPPED.value))
            event(conn, run_id, EventKind.CANCEL_REQUESTED, None, None, now)
            event(conn, run_id, EventKind.RUN_CANCELLED, None, {"queued": True}, now)
        return True

    def leave_step_queue(self, run_id: str) -> int | None:
        """A cancel of a run whose step waits in a limit's line: the step leaves the line (``pending``
        again) so that its next delivery meets the cancel at once. Returns that step's index, or None."""
        now = utcnow()
        wt = t.slot_waiters.c
        with self.engine.begin() as conn:
            row = conn.execute(select(wt.id, wt.idx).where(wt.run_id == run_id, wt.idx != RUN_SLOT)).first()
            if row is None:
                return None
            conn.execute(delete(t.slot_waiters).where(wt.id == row.id))
            self._unqueue(conn, run_id, row.idx, now)
            return row.idx

    def queued_counts(self) -> dict[tuple[str, str], int]:
        """(saga, "run" or the step's name) -> how many wait in a limit's line now: the /metrics gauge."""
        r, s = t.runs.c, t.steps.c

        def read(conn):
            counts: dict[tuple[str, str], int] = {}
            for row in conn.execute(select(r.saga, func.count()).where(r.status == RunStatus.QUEUED.value)
                                    .group_by(r.saga)):
                counts[(row[0], "run")] = row[1]
            for row in conn.execute(select(r.saga, s.name, func.count()).join(t.runs, r.id == s.run_id)
                                    .where(s.status == StepStatus.QUEUED.value).group_by(r.saga, s.name)):
                counts[(row[0], row[1])] = row[2]
            return counts

        return self._read(read)
