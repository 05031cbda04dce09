"""The compare-and-set primitives every concern of the store is built from, each written once.

A transition is an ``UPDATE ... WHERE status = <expected>`` whose row count (or returned row) says whether
this caller won: a duplicate delivery, a duplicate errback or a late retry loses and changes nothing.
``move_step`` is the one guarded move of a step row (a step held by a delivery adds ``claim = <token>``:
the held-step guard; ``held_step`` reads it for a decision taken under the run lock); ``set_run_status``
the one guarded move of a run row. ``event`` records what happened in the caller's transaction, so a
transition and its event commit together or not at all.

Every function here takes the caller's connection and opens no transaction of its own.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

from sqlalchemy import and_, insert, or_, select, update

from sagaflow.model.events import EventKind
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import counters
from sagaflow.store import tables as t

LIVE_RUN = (RunStatus.PENDING.value, RunStatus.RUNNING.value)
IN_PROGRESS_RUN = (*LIVE_RUN, RunStatus.COMPENSATING.value)  # what the recovery sweeper watches
HELD_STEP = (StepStatus.RUNNING.value, StepStatus.COMPENSATING.value)
# Finished forward, as the chain counts it: a best-effort step that failed counts as done without a result.
DONE_STEP = (StepStatus.SUCCEEDED.value, StepStatus.SKIPPED.value, StepStatus.FAILED_BEST_EFFORT.value)
# A non-atomic step that failed may have done part of its work: it is undone too (step flags).
FAILED_NON_ATOMIC = and_(t.steps.c.non_atomic.is_(True), t.steps.c.status == StepStatus.FAILED.value)


def _values(statuses) -> list[str]:
    if isinstance(statuses, (RunStatus, StepStatus)):
        return [statuses.value]
    if isinstance(statuses, str):
        return [statuses]
    return [s.value if isinstance(s, (RunStatus, StepStatus)) else s for s in statuses]


def _status_is(column, statuses):
    values = _values(statuses)
    return column == values[0] if len(values) == 1 else column.in_(values)


def move_step(conn, run_id: str, idx: int, expected, *, token: str | None = None, where: Iterable = (),
              returning: Sequence = (), **values):
    """Compare-and-set on one step: from ``expected`` (a status, or several) to ``values``. With ``token``
    only while this delivery holds it (``claim = token``: the held-step guard); ``where`` adds conditions.
    Returns the moved row (``name`` and the columns in ``returning``, read after the update), or None,
    changing nothing, when the step was not there to move."""
    s = t.steps.c
    guard = [s.run_id == run_id, s.idx == idx, _status_is(s.status, expected), *where]
    if token is not None:
        guard.append(s.claim == token)
    return conn.execute(update(t.steps).where(*guard).values(**values).returning(s.name, *returning)).first()


def held_step(conn, run_id: str, idx: int, token: str, active: StepStatus, *columns):
    """Read the step ``idx`` (its name, status, claim and ``columns``) if this delivery holds it (status
    ``active``, claim ``token``); else None. For a transition that decides under the run lock before it
    moves the step (with move_step's own guard)."""
    s = t.steps.c
    step = conn.execute(select(s.name, s.status, s.claim, *columns).where(s.run_id == run_id, s.idx == idx)).first()
    if step is None or step.status != active.value or step.claim != token:
        return None
    return step


def fail_step(conn, run_id: str, idx: int, expected, error: str, now: dt.datetime, *, token: str | None = None,
              where: Iterable = (), detail: dict | None = None, returning: Sequence = ()):
    """move_step to ``failed`` with ``error`` (its lease dropped), and its ``step_failed`` event carrying
    the error and ``detail``. The row, or None when nothing moved."""
    row = move_step(conn, run_id, idx, expected, token=token, where=where, returning=returning,
                    status=StepStatus.FAILED.value, error=error, finished_at=now, lease_expires_at=None)
    if row is not None:
        event(conn, run_id, EventKind.STEP_FAILED, row.name, {"error": error, **(detail or {})}, now)
    return row


def claimable(start: StepStatus, active: StepStatus, token: str, earlier_tokens: Sequence[str], now: dt.datetime):
    """Who may claim a step (to ``active``): any delivery while it is ``start``; the holder's own
    redelivery once its lease expired; any delivery once the sweeper revoked the claim; a retry of the
    holder (an earlier token of the same task). fastpath._CLAIMABLE is the same condition in SQL text."""
    s = t.steps.c
    options = [
        s.status == start.value,
        and_(s.status == active.value, s.claim == token, s.lease_expires_at < now),
        and_(s.status == active.value, s.claim.is_(None)),  # revoked by the recovery sweeper
    ]
    if earlier_tokens:
        # Any earlier retry, not only the previous one: a retry that died before claiming (database
        # down) must not strand the step.
        options.append(and_(s.status == active.value, s.claim.in_(list(earlier_tokens))))
    return or_(*options)


def set_run_status(conn, run_id: str, expected, new: RunStatus, now: dt.datetime, *, where: Iterable = (),
                   **values) -> bool:
    """Compare-and-set on the run: from ``expected`` (a status, or several) to ``new``, with the counters'
    move (counters.moved: the live gauge, and a final status's count and duration) in the same
    transaction. False, changing nothing, when the run was not in it."""
    r = t.runs.c
    statuses = _values(expected)
    if len(statuses) > 1:  # which one it leaves: read under the row lock, then moved from exactly that one
        old = conn.execute(select(r.status).where(r.id == run_id).with_for_update()).scalar()
        if old not in statuses:
            return False
        statuses = [old]
    moved = conn.execute(
        update(t.runs).where(r.id == run_id, r.status == statuses[0], *where)
        .values(status=new.value, updated_at=now, **values).returning(r.saga, r.created_at)
    ).first()
    if moved is None:
        return False
    counters.log(conn, counters.moved(moved.saga, statuses[0], new.value, moved.created_at, now))
    return True


def succeed_run(conn, run_id: str, now: dt.datetime, expected=RunStatus.RUNNING, unless_cancelled: bool = True) -> bool:
    """``expected`` -> succeeded, with its ``run_succeeded`` event; with ``unless_cancelled``, not when a
    cancel was requested. False, changing nothing, when the run was not there to finish."""
    where = [t.runs.c.cancel_requested.is_(False)] if unless_cancelled else []
    if not set_run_status(conn, run_id, expected, RunStatus.SUCCEEDED, now, where=where, finished_at=now):
        return False
    event(conn, run_id, EventKind.RUN_SUCCEEDED, None, None, now)
    return True


def lock_run(conn, run_id: str, *columns):
    """The run's status and cancel flag (and ``columns``), with its row locked until the transaction ends
    (PostgreSQL: SELECT ... FOR UPDATE; SQLite renders no FOR UPDATE, its transactions are serialized
    already by BEGIN IMMEDIATE). None for an unknown run."""
    r = t.runs.c
    return conn.execute(select(r.status, r.cancel_requested, *columns).where(r.id == run_id).with_for_update()).first()


def run_status(conn, run_id: str) -> str | None:
    return conn.execute(select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar()


def to_compensate(conn, run_id: str, in_progress: bool = False) -> list[int]:
    """Steps completed and not yet undone, latest first; with ``in_progress``, those being undone too."""
    s = t.steps.c
    statuses = [StepStatus.SUCCEEDED.value] + ([StepStatus.COMPENSATING.value] if in_progress else [])
    rows = conn.execute(
        select(s.idx)
        .where(s.run_id == run_id, or_(s.status.in_(statuses), FAILED_NON_ATOMIC), s.has_compensation.is_(True))
        .order_by(s.idx.desc())
    )
    return [r.idx for r in rows]


def results(conn, run_id: str) -> dict:
    """The results so far, by step name, as the chain would carry them (a best-effort failure: None)."""
    s = t.steps.c
    rows = conn.execute(
        select(s.name, s.result)
        .where(s.run_id == run_id, s.status.in_([StepStatus.SUCCEEDED.value, StepStatus.FAILED_BEST_EFFORT.value]))
        .order_by(s.idx)
    )
    return {row.name: row.result for row in rows}


def touch(conn, run_id: str, now: dt.datetime) -> None:
    conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(updated_at=now))


def event(conn, run_id: str, kind: EventKind, step: str | None, detail: dict | None, now: dt.datetime) -> None:
    """Record ``kind`` in the caller's transaction (its text, as stored ever since; a kind the model does not
    name is a ValueError, before anything is written)."""
    kind = EventKind(kind)
    conn.execute(insert(t.events).values(run_id=run_id, kind=kind.value, step=step, at=now, detail=detail))
    counters.step_event(conn, run_id, kind.value, step, now)  # a step outcome counts (the others: nothing)
