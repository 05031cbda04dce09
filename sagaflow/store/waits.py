"""Waits: gates and signals (a run that waits holds no worker), the cancel of a waiting run, and the step
that passes a gate or a child run's end on (``Waits._pass_step``; the child runs themselves: children.py).

sagaflow/runtime/waits.py drives these. Every transaction locks the run row first (SELECT ... FOR UPDATE on
PostgreSQL; on SQLite every transaction is BEGIN IMMEDIATE, serialized anyway), so a gate that begins to
wait and a signal that arrives at that moment, or a child that ends while its parent is cancelled, never
miss each other. Lock order: a parent run before its child.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, insert, select, update

from sagaflow.errors import InvalidTransition, UnknownRun
from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import WaitOutcome
from sagaflow.model.status import FINAL_RUN_STATUSES, RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.guards import (
    LIVE_RUN,
    event,
    fail_step,
    held_step,
    lock_run,
    move_step,
    results,
    set_run_status,
    succeed_run,
    touch,
)


def lock_wait_run(conn, run_id: str):
    """The run row, locked (SELECT ... FOR UPDATE), with what the waits transitions read of it."""
    r = t.runs.c
    return lock_run(conn, run_id, r.id, r.saga, r.saga_version, r.input, r.error, r.parent_run_id, r.parent_step)


def enter_wait(conn, run_id: str, idx: int, token: str, now: dt.datetime, cancelled_because, *columns):
    """What every step that starts to wait does first (a gate, a sleep or a long retry wait, a child step):
    lock the run and check that ``token`` still holds the running step. Returns ``(run, step, base, None)``
    to go on, or an outcome for the caller to return: ``lost`` (the run or the step moved on), or
    ``cancelled`` when a cancel came in since the claim (the step fails, ``cancelled_because(step)`` its
    error). ``base``: the fields of every outcome about this step."""
    run = lock_wait_run(conn, run_id)
    step = held_step(conn, run_id, idx, token, StepStatus.RUNNING, *columns)
    if run is None or run.status != RunStatus.RUNNING.value or step is None:
        return run, step, {}, WaitOutcome("lost", run_id=run_id, index=idx)
    base = dict(run_id=run_id, saga=run.saga, version=run.saga_version, index=idx)
    if run.cancel_requested:
        fail_step(conn, run_id, idx, StepStatus.RUNNING, cancelled_because(step), now, token=token)
        return run, step, base, WaitOutcome("cancelled", **base)
    return run, step, base, None


class Waits(Engines):
    def _pass_step(self, conn, run, idx: int, name: str, result: Any, detail: dict, now,
                   from_status: StepStatus) -> WaitOutcome:
        """A gate or child step succeeded with ``result``: finish the run if it was the last step (unless a
        cancel came in: then the errback compensates everything, this step included), else hand back the
        chain to publish from the next step. The caller moved the step; the run leaves running/waiting."""
        event(conn, run.id, EventKind.STEP_SUCCEEDED, name, detail, now)
        base = dict(run_id=run.id, saga=run.saga, version=run.saga_version, index=idx)
        live = (RunStatus.RUNNING, RunStatus.WAITING)
        last = conn.execute(select(func.max(t.steps.c.idx)).where(t.steps.c.run_id == run.id)).scalar()
        if idx == last:
            if not run.cancel_requested and succeed_run(conn, run.id, now, expected=live, unless_cancelled=False):
                return WaitOutcome("finished", status=RunStatus.SUCCEEDED.value, result=result, **base)
            set_run_status(conn, run.id, live, RunStatus.RUNNING, now)
            return WaitOutcome("errback", result=result, error="cancelled before the run finished", **base)
        if from_status is StepStatus.WAITING:
            set_run_status(conn, run.id, RunStatus.WAITING, RunStatus.RUNNING, now)
        else:
            touch(conn, run.id, now)
        return WaitOutcome("continue", result=result, results=results(conn, run.id), **base)

    def wait_for_signal(self, run_id: str, idx: int, token: str, timeout: float) -> WaitOutcome:
        """The gate ``idx`` (held by ``token``) is reached. Its signal already delivered: the step succeeds
        with the payload as its result. Else the step waits (deadline: now + ``timeout``) and so does the
        run, holding no worker and no lease. A cancel that came in since the claim fails the step."""
        now = utcnow()
        s, sig = t.steps.c, t.signals.c
        with self.engine.begin() as conn:
            run, step, base, stop = enter_wait(
                conn, run_id, idx, token, now, lambda step: f"cancelled at the gate for signal {step.signal!r}",
                s.signal)
            if stop is not None:
                return stop
            payload = conn.execute(select(sig.payload, sig.received_at)
                                   .where(sig.run_id == run_id, sig.name == step.signal)).first()
            if payload is not None:
                if move_step(conn, run_id, idx, StepStatus.RUNNING, token=token, status=StepStatus.SUCCEEDED.value,
                             result=payload.payload, error=None, finished_at=now, lease_expires_at=None,
                             claim=None) is None:
                    return WaitOutcome("lost", run_id=run_id, index=idx)
                return self._pass_step(conn, run, idx, step.name, payload.payload,
                                       {"signal": step.signal, "received_before_the_gate": True}, now,
                                       StepStatus.RUNNING)
            deadline = now + dt.timedelta(seconds=timeout)
            if move_step(conn, run_id, idx, StepStatus.RUNNING, token=token, status=StepStatus.WAITING.value,
                         deadline_at=deadline, claim=None, lease_expires_at=None) is None:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            set_run_status(conn, run_id, RunStatus.RUNNING, RunStatus.WAITING, now)
            event(conn, run_id, EventKind.RUN_WAITING, step.name,
                  {"signal": step.signal, "deadline": deadline.isoformat()}, now)
        return WaitOutcome("waiting", **base)

    def deliver_signal(self, run_id: str, name: str, payload: Any, origin: dict | None = None) -> WaitOutcome:
        """Record signal ``name`` for the run, once; if a gate waits for it, pass the gate (its result: the
        payload) and hand back what to publish. Refused, changing nothing: an unknown run (UnknownRun); a
        final run, a saga with no gate for ``name``, a signal already delivered (InvalidTransition)."""
        now = utcnow()
        s, sig = t.steps.c, t.signals.c
        with self.engine.begin() as conn:
            run = lock_wait_run(conn, run_id)
            if run is None:
                raise UnknownRun(f"unknown run id {run_id!r}")
            if run.status in {st.value for st in FINAL_RUN_STATUSES}:
                raise InvalidTransition(f"run {run_id} is {run.status}: a finished run takes no signals")
            gates = conn.execute(select(s.idx, s.name, s.status).where(
                s.run_id == run_id, s.kind == "gate", s.signal == name).order_by(s.idx)).all()
            if not gates:
                raise InvalidTransition(f"run {run_id} (saga {run.saga!r} version {run.saga_version}) has no gate "
                                        f"for signal {name!r}")
            earlier = conn.execute(select(sig.received_at).where(sig.run_id == run_id, sig.name == name)).scalar()
            if earlier is not None:
                raise InvalidTransition(f"signal {name!r} was already delivered to run {run_id} "
                                        f"(at {earlier.isoformat()}); a signal is delivered once")
            conn.execute(insert(t.signals).values(run_id=run_id, name=name, payload=payload, received_at=now))
            waiting = next((g for g in gates if g.status == StepStatus.WAITING.value), None)
            event(conn, run_id, EventKind.SIGNAL_RECEIVED, waiting.name if waiting else None,
                  {"signal": name, "gate_waiting": waiting is not None, **(origin or {})}, now)
            base = dict(run_id=run_id, saga=run.saga, version=run.saga_version)
            if waiting is None or run.status != RunStatus.WAITING.value:
                touch(conn, run_id, now)
                return WaitOutcome("none", **base)  # kept: the gate takes it when the run gets there
            if move_step(conn, run_id, waiting.idx, StepStatus.WAITING, status=StepStatus.SUCCEEDED.value,
                         result=payload, error=None, finished_at=now) is None:
                return WaitOutcome("none", **base)
            return self._pass_step(conn, run, waiting.idx, waiting.name, payload, {"signal": name}, now,
                                   StepStatus.WAITING)

    def expired_gates(self, limit: int = 500) -> list:
        """(run_id, idx, name, signal, saga, version, deadline_at) of the gates still waiting past their
        deadline."""
        r, s = t.runs.c, t.steps.c
        now = utcnow()
        return self._read(lambda conn: conn.execute(
            select(s.run_id, s.idx, s.name, s.signal, r.saga, r.saga_version, s.deadline_at)
            .join(t.runs, r.id == s.run_id)
            .where(s.kind == "gate", s.status == StepStatus.WAITING.value, s.deadline_at < now,
                   r.status == RunStatus.WAITING.value)
            .order_by(s.deadline_at).limit(limit)
        ).all())

    def time_out_gate(self, run_id: str, idx: int, error: str) -> WaitOutcome | None:
        """Compare-and-set: the gate still waits past its deadline -> failed, the run -> running; the caller
        publishes the errback. None when a signal, a cancel or another sweeper got there first."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = lock_wait_run(conn, run_id)
            if run is None or run.status != RunStatus.WAITING.value:
                return None
            if fail_step(conn, run_id, idx, StepStatus.WAITING, error, now,
                         where=[s.kind == "gate", s.deadline_at < now]) is None:
                return None
            set_run_status(conn, run_id, RunStatus.WAITING, RunStatus.RUNNING, now)
        return WaitOutcome("errback", run_id=run_id, saga=run.saga, version=run.saga_version, index=idx, error=error)

    def cancel_waiting(self, run_id: str, origin: dict | None = None) -> list[WaitOutcome] | None:
        """Cancel a run that waits (None when it does not: request_cancel handles live runs). At a gate: the
        gate fails and the errback compensates at once ("errback" outcomes to publish). At a child step: the
        run keeps waiting with its cancel recorded, and the child is cancelled (recursively, if it waits
        too); the child's end then fails the step and the run compensates."""
        now = utcnow()
        with self.engine.begin() as conn:
            run = lock_wait_run(conn, run_id)
            if run is None:
                raise UnknownRun(f"unknown run id {run_id!r}")
            if run.status != RunStatus.WAITING.value:
                return None
            return self._cancel_waiting(conn, run, now, origin)

    def _cancel_waiting(self, conn, run, now, origin: dict | None = None) -> list[WaitOutcome]:
        s, r = t.steps.c, t.runs.c
        if not run.cancel_requested:
            conn.execute(update(t.runs).where(r.id == run.id).values(cancel_requested=True, updated_at=now))
            event(conn, run.id, EventKind.CANCEL_REQUESTED, None, origin or None, now)
        step = conn.execute(select(s.idx, s.name, s.kind, s.signal, s.child_run_id)
                            .where(s.run_id == run.id, s.status == StepStatus.WAITING.value)).first()
        if step is None:
            return []
        if step.kind in ("gate", "sleep", "action"):  # a gate, a sleep, a step waiting out a long retry delay
            error = {"gate": f"cancelled while waiting for signal {step.signal!r}",
                     "sleep": "cancelled during the sleep"}.get(step.kind, "cancelled while waiting to retry")
            if fail_step(conn, run.id, step.idx, StepStatus.WAITING, error, now) is None:
                return []
            set_run_status(conn, run.id, RunStatus.WAITING, RunStatus.RUNNING, now)
            return [WaitOutcome("errback", run_id=run.id, saga=run.saga, version=run.saga_version, index=step.idx,
                                error=error)]
        return self._cancel_child(conn, run.id, step.child_run_id, now) if step.child_run_id else []

    def _cancel_child(self, conn, parent_id: str, child_id: str, now) -> list[WaitOutcome]:
        """Under the parent's lock: cancel its child run (and, through it, the child runs it waits for). A
        waiting child as cancel_waiting does; a live one gets the cancel flag (it compensates at its next
        step), and so do the children of its child branches still running."""
        r = t.runs.c
        child = lock_wait_run(conn, child_id)
        if child is None or child.cancel_requested and child.status != RunStatus.WAITING.value:
            return []
        if child.status == RunStatus.WAITING.value:
            return self._cancel_waiting(conn, child, now)
        if child.status not in LIVE_RUN:
            return []
        conn.execute(update(t.runs).where(r.id == child.id).values(cancel_requested=True, updated_at=now))
        event(conn, child.id, EventKind.CANCEL_REQUESTED, None, {"by_parent": parent_id}, now)
        return self._cancel_child_branches(conn, child.id, now)

    def _cancel_child_branches(self, conn, run_id: str, now) -> list[WaitOutcome]:
        """Under the run's lock, its cancel recorded: cancel the child runs its child branches and its map
        items wait for (they wait holding no worker, so no claim of their own would meet the cancel)."""
        s, m = t.steps.c, t.map_items.c
        waiting = conn.execute(
            select(s.child_run_id)
            .where(s.run_id == run_id, s.status == StepStatus.WAITING.value, s.branch_group.is_not(None),
                   s.child_run_id.is_not(None))
            .order_by(s.idx)
        ).scalars().all()
        # The children of a map's items in flight (a map of child runs): each waits holding no worker too.
        waiting += conn.execute(
            select(m.child_run_id)
            .where(m.run_id == run_id, m.status == "running", m.child_run_id.is_not(None))
            .order_by(m.idx, m.item)
        ).scalars().all()
        outcomes: list[WaitOutcome] = []
        for child_id in waiting:
            outcomes += self._cancel_child(conn, run_id, child_id, now)
        return outcomes

    def cancel_child_branches(self, run_id: str) -> list[WaitOutcome]:
        """A cancel was recorded for a running run (request_cancel): cancel the child runs of its parallel
        child branches too, so each ends (compensating itself) and the run compensates without waiting for
        them to finish their work. Returns what to publish (a waiting grandchild's errback)."""
        now = utcnow()
        with self.engine.begin() as conn:
            run = lock_wait_run(conn, run_id)
            if run is None or not run.cancel_requested or run.status not in LIVE_RUN:
                return []
            return self._cancel_child_branches(conn, run_id, now)
