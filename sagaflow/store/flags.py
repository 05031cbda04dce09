"""Step flags and plain runs (issue 5, A): best-effort, non-atomic and pivot steps (definition.Step), and
the runs policy switched to a plain chain (sagaflow/model/policy.py).

Only sagas with such steps take these paths, always on the transactional store (runtime.store_for): the
linear fast path never sees them. A non-atomic step's undo is compensation.py's (guards.FAILED_NON_ATOMIC);
a plain run is created by runs.py's create_run with the rest. The pivot's rules reach two other concerns
through the functions here: a claim overrules a cancel past the pivot (claims.py), and an operator cannot
cancel a run past it (runs.py).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update

from sagaflow.errors import InvalidTransition
from sagaflow.model.events import EventKind
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.guards import (
    DONE_STEP,
    LIVE_RUN,
    event,
    fail_step,
    move_step,
    results,
    run_status,
    set_run_status,
    succeed_run,
    touch,
)
from sagaflow.store.maps import reopen_items


def past_pivot(conn, run_id: str) -> str | None:
    """The name of the run's pivot step if it succeeded: from then on the run can no longer be undone."""
    s = t.steps.c
    return conn.execute(
        select(s.name).where(s.run_id == run_id, s.pivot.is_(True), s.status == StepStatus.SUCCEEDED.value)
        .limit(1)
    ).scalar()


def overrule_cancel_past_pivot(conn, run_id: str, now: dt.datetime) -> bool:
    """A cancel requested while the pivot ran (accepted then) is noticed after the pivot succeeded: it can
    no longer be honoured without leaving the saga half undone, so it is cleared and recorded
    (``cancel_overruled``), and the run goes forward. True when the run is past its pivot."""
    pivot = past_pivot(conn, run_id)
    if pivot is None:
        return False
    r = t.runs.c
    if conn.execute(update(t.runs).where(r.id == run_id, r.cancel_requested.is_(True))
                    .values(cancel_requested=False, updated_at=now)).rowcount:
        event(conn, run_id, EventKind.CANCEL_OVERRULED, None,
              {"pivot": pivot, "reason": f"the pivot {pivot!r} succeeded before the cancel took effect: "
                                         f"the run can no longer be undone and goes forward"}, now)
    return True

def refuse_cancel(conn, run_id: str) -> None:
    """Raise InvalidTransition (nothing written) for a live run that cannot be cancelled: a plain run
    (policy), or one past its pivot."""
    run = conn.execute(select(t.runs.c.status, t.runs.c.mode, t.runs.c.saga)
                       .where(t.runs.c.id == run_id)).first()
    if run is None or run.status not in LIVE_RUN:
        return
    if run.mode == "plain":
        raise InvalidTransition(f"run {run_id} runs as a plain Celery chain (compensation is off by policy "
                                f"for saga {run.saga!r}): it cannot be cancelled")
    pivot = past_pivot(conn, run_id)
    if pivot is not None:
        raise InvalidTransition(f"run {run_id} is past its pivot step {pivot!r}, which succeeded: it can no "
                                f"longer be undone, so it cannot be cancelled; it goes forward (to "
                                f"succeeded, or stuck for an operator)")


class Flags(Engines):
    # ------------------------------------------------------------ best-effort steps

    def fail_best_effort(self, run_id: str, idx: int, token: str, error: str, finish: bool = False) -> str | None:
        """A best-effort step gave up: ``failed_best_effort``, and the run goes on without its result. With
        ``finish`` (the last step) the run ends ``succeeded`` in the same transaction, unless a cancel came
        in (it stays running: the caller compensates). Returns the run's status after, or None when this
        delivery no longer holds the step."""
        now = utcnow()
        with self.engine.begin() as conn:
            held = move_step(conn, run_id, idx, StepStatus.RUNNING, token=token, returning=[t.steps.c.attempts],
                             status=StepStatus.FAILED_BEST_EFFORT.value, result=None, error=error,
                             finished_at=now, lease_expires_at=None)
            if held is None:
                return None
            event(conn, run_id, EventKind.STEP_FAILED_BEST_EFFORT, held.name,
                  {"attempt": held.attempts, "error": error}, now)
            if finish and succeed_run(conn, run_id, now):
                return RunStatus.SUCCEEDED.value
            touch(conn, run_id, now)
            return run_status(conn, run_id)

    def best_effort_lost(self, run_id: str, idx: int, lost_error: str) -> tuple[str, dict | None] | None:
        """The errback of a best-effort step whose worker was lost (hard time limit, dead process): record
        ``failed_best_effort`` and return ("resume", results so far) so the caller publishes the next step.
        ("done", None): a duplicate errback, the step already ended. None: not this case (a cancel, or the run
        is not live): the caller compensates as usual."""
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            run = conn.execute(select(r.status, r.cancel_requested).where(r.id == run_id)).first()
            if run is None or run.status not in LIVE_RUN or run.cancel_requested:
                return None
            lost = move_step(conn, run_id, idx, StepStatus.RUNNING, where=[s.best_effort.is_(True)],
                             status=StepStatus.FAILED_BEST_EFFORT.value, result=None, error=lost_error,
                             finished_at=now, lease_expires_at=None, claim=None)
            if lost is not None:
                event(conn, run_id, EventKind.STEP_FAILED_BEST_EFFORT, lost.name, {"error": lost_error}, now)
                touch(conn, run_id, now)
                return "resume", results(conn, run_id)
            status = conn.execute(select(s.status).where(s.run_id == run_id, s.idx == idx)).scalar()
        if status in (StepStatus.FAILED_BEST_EFFORT.value, StepStatus.SUCCEEDED.value):
            return "done", None
        return None

    # ------------------------------------------------------------ the pivot

    def stop_past_pivot(self, run_id: str, failed_idx: int, lost_error: str) -> bool | None:
        """The errback of a step that failed for good. None when the run's pivot has not succeeded (or it has
        none): the caller compensates as usual. Past the pivot the saga can no longer be undone: the run goes
        ``stuck`` (waits for an operator, nothing compensated, later steps stay pending) and this returns
        True; False when another errback got there first."""
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            pivot = past_pivot(conn, run_id)
            if pivot is None:
                return None
            if not set_run_status(conn, run_id, LIVE_RUN, RunStatus.STUCK, now, finished_at=now):
                return False
            fail_step(conn, run_id, failed_idx, StepStatus.RUNNING, lost_error, now)  # its worker was lost
            step = conn.execute(select(s.name, s.error).where(s.run_id == run_id, s.idx == failed_idx)).first()
            if step is not None:
                error = f"step {step.name!r} failed after the pivot {pivot!r} succeeded: {step.error}"
            else:
                error = f"the run could not finish after the pivot {pivot!r} succeeded"
            conn.execute(update(t.runs).where(r.id == run_id).values(error=error))
            event(conn, run_id, EventKind.RUN_STUCK, step.name if step is not None else None,
                  {"error": error, "pivot": pivot}, now)
        return True

    def finish_past_pivot(self, run_id: str) -> str | None:
        """The last step completed, but a cancel came in first: past the pivot the cancel is overruled and
        the run ends ``succeeded``. Returns the run's status after; None when the run is not past its pivot
        (the caller compensates, as for any cancel)."""
        now = utcnow()
        with self.engine.begin() as conn:
            if not overrule_cancel_past_pivot(conn, run_id, now):
                return None
            succeed_run(conn, run_id, now, unless_cancelled=False)
            return run_status(conn, run_id)

    def request_forward_retry(self, run_id: str, origin: dict | None = None) -> tuple[int, dict] | None:
        """stuck -> running: the failed step goes back to pending (its attempt count keeps growing; its retry
        policy starts a new round). Returns (the index to resume from, the results before it), or None when
        the run is not stuck (the caller tries the other kinds of retry)."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            if not set_run_status(conn, run_id, RunStatus.STUCK, RunStatus.RUNNING, now, error=None,
                                  finished_at=None):
                return None
            reset = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.status == StepStatus.FAILED.value)
                .values(status=StepStatus.PENDING.value, claim=None, lease_expires_at=None, finished_at=None)
                .returning(s.idx, s.name)
            ).all()
            reopen_items(conn, run_id, [row.idx for row in reset])  # a map's failed items run again
            first = min(reset, default=None, key=lambda row: row.idx)
            event(conn, run_id, EventKind.RETRY_REQUESTED, first.name if first is not None else None,
                  {"forward": True, **(origin or {})}, now)
            rows = conn.execute(select(s.idx, s.status).where(s.run_id == run_id).order_by(s.idx)).all()
            frontier = next((row.idx for row in rows if row.status not in DONE_STEP), len(rows))
            return frontier, results(conn, run_id)

    # ------------------------------------------------------------ plain runs (policy: compensation off)

    def finish_plain_run(self, run_id: str) -> bool:
        """The last step of a plain run (policy: compensation off) succeeded: one UPDATE of the run row."""
        return self._end_plain_run(run_id, RunStatus.SUCCEEDED, None)

    def fail_plain_run(self, run_id: str, error: str) -> bool:
        """A step of a plain run failed for good (or its worker was lost): the run is ``failed``, nothing is
        undone. One UPDATE of the run row; False when the run already ended (a duplicate errback)."""
        return self._end_plain_run(run_id, RunStatus.FAILED, error)

    def _end_plain_run(self, run_id: str, final: RunStatus, error: str | None) -> bool:
        now = utcnow()
        if self.fast:  # one statement, one round trip (no BEGIN, COMMIT, pre-ping), its counters included
            return self.fast.end_plain_run(run_id, final.value, error, now)
        with self.engine.begin() as conn:
            return set_run_status(conn, run_id, LIVE_RUN, final, now, where=[t.runs.c.mode == "plain"],
                                  error=error, finished_at=now)
