"""An operator's hand on a final run: settle it (``resolve``: compensation_failed or stuck -> resolved, a
note in the history, nothing published) and link a restart (the new run names the old one, the old one
records a ``run_restarted`` event naming the new one)."""

from __future__ import annotations

import datetime as dt
from typing import Callable

from sqlalchemy import Engine, select, update

from sagaflow.errors import InvalidTransition, UnknownRun
from sagaflow.model.events import EventKind
from sagaflow.model.snapshots import Run
from sagaflow.model.status import CANCELLABLE_RUN_STATUSES, RESOLVABLE_RUN_STATUSES, RunStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.guards import event, set_run_status

RESOLVABLE = tuple(s.value for s in RESOLVABLE_RUN_STATUSES)
CANCELLABLE = tuple(s.value for s in CANCELLABLE_RUN_STATUSES)


class Operator(Engines):
    engine: Engine  # Engines'
    get_run: Callable[..., Run]  # Runs'

    def resolve_run(self, run_id: str, note: str, origin: dict | None = None) -> Run:
        """compensation_failed or stuck -> resolved, with ``note`` and the former status in a run_resolved
        event, in one transaction. InvalidTransition, nothing written, for any other status."""
        now = utcnow()
        r = t.runs.c
        with self.engine.begin() as conn:
            status = conn.execute(select(r.status).where(r.id == run_id)).scalar()
            if status is None:
                raise UnknownRun(f"unknown run id {run_id!r}")
            changed = status in RESOLVABLE and set_run_status(conn, run_id, status, RunStatus.RESOLVED, now,
                                                              finished_at=now)
            if changed:
                event(conn, run_id, EventKind.RUN_RESOLVED, None, {"note": note, "from": status, **(origin or {})}, now)
        if not changed:
            raise InvalidTransition(f"run {run_id} is {status}: only a compensation_failed or stuck run can be "
                                    f"resolved by hand")
        return self.get_run(run_id)

    def link_restart(self, old_run_id: str, new_run_id: str, version: int, note: str | None = None,
                     origin: dict | None = None) -> None:
        """The new run names the old (``restarted_from``); the old records ``run_restarted`` naming the new,
        and the new ``restarted_from`` naming the old and the version it runs (``note``: why not the old
        run's version). One transaction."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(update(t.runs).where(t.runs.c.id == new_run_id).values(restarted_from=old_run_id))
            detail = {"new_run_id": new_run_id, "saga_version": version, **(origin or {})}
            event(conn, old_run_id, EventKind.RUN_RESTARTED, None, detail, now)
            back = {"run_id": old_run_id, "saga_version": version, **({"note": note} if note else {})}
            event(conn, new_run_id, EventKind.RESTARTED_FROM, None, back, now)

    def set_deadline(self, run_id: str, deadline_at) -> None:
        """The run's deadline (start(deadline=) or Saga(deadline=)), written before its first message."""
        with self.engine.begin() as conn:
            conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(deadline_at=deadline_at))

    def passed_deadlines(self, limit: int = 500) -> list[tuple[str, dt.datetime]]:
        """(run id, deadline) of the runs still pending, running or waiting past their deadline, oldest
        deadline first. Runs that ended before theirs have it cleared here (so the index scan stays short)."""
        now = utcnow()
        r = t.runs.c
        with self.engine.begin() as conn:
            conn.execute(update(t.runs).where(r.deadline_at <= now, r.status.notin_(CANCELLABLE))
                         .values(deadline_at=None))
            rows = conn.execute(select(r.id, r.deadline_at).where(r.deadline_at <= now, r.status.in_(CANCELLABLE))
                                .order_by(r.deadline_at).limit(limit)).all()
        return [(row.id, row.deadline_at) for row in rows]

    def take_deadline(self, run_id: str, deadline_at: dt.datetime) -> bool:
        """Claim a passed deadline (compare-and-set: one sweeper wins) and record ``deadline_passed``; the
        caller then cancels the run. False when another sweeper took it or the run moved on."""
        now = utcnow()
        r = t.runs.c
        with self.engine.begin() as conn:
            won = conn.execute(
                update(t.runs).where(r.id == run_id, r.deadline_at == deadline_at, r.status.in_(CANCELLABLE))
                .values(deadline_at=None, updated_at=now)
            ).rowcount
            if won:
                event(conn, run_id, EventKind.DEADLINE_PASSED, None, {"deadline": deadline_at.isoformat()}, now)
        return bool(won)
