"""Durable timers: a sleep step, a step waiting out a retry delay too long for the broker, and a delayed start.

Each is a time kept in SQL, with no worker and no message holding it: the step waits (``waiting``, its
``deadline_at`` the time it wakes) and so does its run; a delayed start is a run ``scheduled`` with its
``start_at``. The sweeper (sagaflow/runtime/timers.py) reads what is due at *its* ``now`` (a parameter, so
a test moves the clock of the sweeper it calls, never the worker's) and moves each one on with a
compare-and-set under the run lock: one sweeper wins each timer, and a cancel that comes in at the same
moment either finds the run still waiting (and fails the step) or finds it moved on.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update

from sagaflow.errors import UnknownRun
from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import WaitOutcome
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import utcnow
from sagaflow.store.guards import event, move_step, results, set_run_status
from sagaflow.store.waits import Waits, enter_wait, lock_wait_run

SLEEP = "sleep"
RETRY = "retry"


class Timers(Waits):
    # ------------------------------------------------------------ a step begins to wait for its time

    def start_sleep(self, run_id: str, idx: int, token: str, seconds: float) -> WaitOutcome:
        """The sleep step ``idx`` (held by ``token``) is reached: it and its run wait until now + ``seconds``,
        holding no claim and no lease. "waiting"; "cancelled" when a cancel came in since the claim (the step
        is failed: the caller goes into the errback); "lost" when this delivery no longer holds the step."""
        return self._wait_for_time(run_id, idx, token, seconds, SLEEP)

    def wait_retry(self, run_id: str, idx: int, token: str, delay: float) -> WaitOutcome:
        """A step whose retry (already recorded: retry_step) waits ``delay`` seconds, longer than the broker
        should hold a message: the step goes ``waiting`` until then, the run too, and the delivery ends. The
        sweeper sets the step pending again when due and publishes the chain from it."""
        return self._wait_for_time(run_id, idx, token, delay, RETRY)

    def _wait_for_time(self, run_id: str, idx: int, token: str, seconds: float, timer: str) -> WaitOutcome:
        now = utcnow()
        with self.engine.begin() as conn:
            reason = "cancelled at the sleep" if timer == SLEEP else "cancelled while waiting to retry"
            run, step, base, stop = enter_wait(conn, run_id, idx, token, now, lambda step: reason)
            if stop is not None:
                return stop
            until = now + dt.timedelta(seconds=seconds)
            if move_step(conn, run_id, idx, StepStatus.RUNNING, token=token, status=StepStatus.WAITING.value,
                         deadline_at=until, claim=None, lease_expires_at=None, worker=None) is None:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            set_run_status(conn, run_id, RunStatus.RUNNING, RunStatus.WAITING, now)
            event(conn, run_id, EventKind.RUN_WAITING, step.name,
                  {"timer": timer, "seconds": round(seconds, 3), "until": until.isoformat()}, now)
        return WaitOutcome("waiting", **base)

    # ------------------------------------------------------------ the sweeper: timers due

    def due_timers(self, now: dt.datetime, limit: int = 500) -> list:
        """(run_id, idx, name, kind, saga, saga_version, deadline_at) of the sleeps and retry waits due at
        ``now``, earliest first."""
        r, s = t.runs.c, t.steps.c
        return self._read(lambda conn: conn.execute(
            select(s.run_id, s.idx, s.name, s.kind, r.saga, r.saga_version, s.deadline_at)
            .join(t.runs, r.id == s.run_id)
            .where(s.kind.in_(("sleep", "action")), s.status == StepStatus.WAITING.value, s.deadline_at <= now,
                   r.status == RunStatus.WAITING.value)
            .order_by(s.deadline_at).limit(limit)
        ).all())

    def fire_timer(self, run_id: str, idx: int, now: dt.datetime) -> WaitOutcome | None:
        """Compare-and-set: the step still waits and its time (``deadline_at``) is at or before ``now``. A
        sleep succeeds (its result: when it woke) and the run goes on ("continue", or "finished" as the last
        step, or "errback" if a cancel raced it); a retry wait goes back to pending and the run to running
        ("resume": publish the chain from the step). None when a cancel or another sweeper got there first."""
        s = t.steps.c
        with self.engine.begin() as conn:
            run = lock_wait_run(conn, run_id)
            if run is None or run.status != RunStatus.WAITING.value:
                return None
            step = conn.execute(select(s.name, s.kind, s.deadline_at).where(
                s.run_id == run_id, s.idx == idx, s.status == StepStatus.WAITING.value,
                s.kind.in_(("sleep", "action")), s.deadline_at <= now)).first()
            if step is None:
                return None
            detail = {"timer": SLEEP if step.kind == "sleep" else RETRY, "due": step.deadline_at.isoformat()}
            if step.kind == "sleep":
                result = {"slept_until": step.deadline_at.isoformat()}
                if move_step(conn, run_id, idx, StepStatus.WAITING, status=StepStatus.SUCCEEDED.value,
                             result=result, error=None, finished_at=now, deadline_at=None) is None:
                    return None
                event(conn, run_id, EventKind.TIMER_FIRED, step.name, detail, now)
                return self._pass_step(conn, run, idx, step.name, result, {"timer": SLEEP}, now,
                                       StepStatus.WAITING)
            if move_step(conn, run_id, idx, StepStatus.WAITING, status=StepStatus.PENDING.value,
                         deadline_at=None) is None:
                return None
            set_run_status(conn, run_id, RunStatus.WAITING, RunStatus.RUNNING, now)
            event(conn, run_id, EventKind.TIMER_FIRED, step.name, detail, now)
            return WaitOutcome("resume", run_id=run_id, saga=run.saga, version=run.saga_version, index=idx,
                               results=results(conn, run_id))

    # ------------------------------------------------------------ delayed starts

    def due_starts(self, now: dt.datetime, limit: int = 500) -> list:
        """(id, saga, saga_version, mode, input, deadline_at) of the scheduled runs due to start at ``now``."""
        r = t.runs.c
        return self._read(lambda conn: conn.execute(
            select(r.id, r.saga, r.saga_version, r.mode, r.input, r.deadline_at)
            .where(r.status == RunStatus.SCHEDULED.value, r.start_at <= now)
            .order_by(r.start_at).limit(limit)
        ).all())

    def release_scheduled(self, run_id: str, now: dt.datetime) -> bool:
        """Compare-and-set scheduled -> pending when due at ``now``; the caller publishes the first step. False
        when it was cancelled, or another sweeper released it."""
        r = t.runs.c
        with self.engine.begin() as conn:
            if not set_run_status(conn, run_id, RunStatus.SCHEDULED, RunStatus.PENDING, utcnow(),
                                  where=[r.start_at <= now]):
                return False
            start_at = conn.execute(select(r.start_at).where(r.id == run_id)).scalar()
            event(conn, run_id, EventKind.TIMER_FIRED, None,
                  {"timer": "start", "due": start_at.isoformat() if start_at else None}, utcnow())
        return True

    def cancel_scheduled(self, run_id: str) -> bool:
        """A cancel of a run that has not started: scheduled -> cancelled at once (nothing ran, nothing to
        undo). False, changing nothing, when the run is not scheduled (UnknownRun when there is none)."""
        now = utcnow()
        r = t.runs.c
        with self.engine.begin() as conn:
            exists = conn.execute(select(r.status).where(r.id == run_id)).first()
            if exists is None:
                raise UnknownRun(f"unknown run id {run_id!r}")
            if not set_run_status(conn, run_id, RunStatus.SCHEDULED, RunStatus.CANCELLED, now,
                                  cancel_requested=True, finished_at=now):
                return False
            conn.execute(update(t.steps).where(t.steps.c.run_id == run_id,
                                               t.steps.c.status == StepStatus.PENDING.value)
                         .values(status=StepStatus.SKIPPED.value))
            event(conn, run_id, EventKind.CANCEL_REQUESTED, None, None, now)
            event(conn, run_id, EventKind.RUN_CANCELLED, None, {"before_start": True}, now)
        return True
