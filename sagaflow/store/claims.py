"""Steps and claims: the forward path of a step (claim, complete, retry, fail), its lease, and the
transitions of a held step or compensation that the PostgreSQL fast path also runs (``Claims._held``).

A step (or compensation) is *claimed* by one delivery at a time. The claim token is
``"<celery task id>:<retries>"``: a retry of the holder (same task id, a higher retries number: a policy
retry, a retry after a lost pool child or a database outage) takes the claim over; a redelivery of the same
message (worker died) may take it over once the lease expired; so may any delivery once the recovery
sweeper revoked an expired claim; anything else is a duplicate and backs off (guards.claimable).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

from sqlalchemy import func, select, update

from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import Claim, ClaimOutcome
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.flags import overrule_cancel_past_pivot
from sagaflow.store.guards import (
    HELD_STEP,
    LIVE_RUN,
    claimable,
    event,
    fail_step,
    move_step,
    run_status,
    set_run_status,
    succeed_run,
    touch,
)
from sagaflow.store.workers import current_worker


def with_traceback(detail: dict, traceback: str | None) -> dict:
    """An attempt's event detail with its traceback (``traceback`` key), when there is one."""
    return {**detail, "traceback": traceback} if traceback else detail


def claim_lost(status: str | None, result, error, done: StepStatus, failed: StepStatus) -> Claim:
    """What a delivery that could not claim is told, from the status it found."""
    if status == done.value:
        return Claim(ClaimOutcome.DONE, result=result)
    if status == failed.value:
        return Claim(ClaimOutcome.FAILED, error=error)
    return Claim(ClaimOutcome.BUSY)


def _failed_while_compensating(status: str | None, error: str | None) -> Claim:
    """A step's delivery found its run compensating: FAILED if this step's failure is recorded, so the step's
    errback fires again and re-publishes the undos still to do. The task that failed the step began the
    compensation in the same statement and published the undos itself (store.fail_and_compensate); if its
    worker died in between, this redelivery is what moves the run on. Otherwise GONE: a duplicate."""
    if status == StepStatus.FAILED.value:
        return Claim(ClaimOutcome.FAILED, error=error)
    return Claim(ClaimOutcome.GONE)


# The transitions of a held step that fastpath.HELD runs as one statement each on PostgreSQL, and that
# Claims._held runs as a transaction elsewhere: kind -> (the status held, the attempts column the event
# reports, whether the run's updated_at moves). A step's success does not touch the run (one row write less
# per step): the recovery sweeper reads its finished_at instead (recovery.stalled).
HELD = {
    EventKind.STEP_SUCCEEDED: (StepStatus.RUNNING, "attempts", False),
    EventKind.STEP_RETRIED: (StepStatus.RUNNING, "attempts", True),
    EventKind.STEP_FAILED: (StepStatus.RUNNING, None, True),
    EventKind.COMPENSATION_RETRIED: (StepStatus.COMPENSATING, "compensation_attempts", True),
    EventKind.COMPENSATION_FAILED: (StepStatus.COMPENSATING, None, True),
}


class Claims(Engines):
    def claim_step(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str],
                   lease_seconds: float) -> Claim:
        if self.fast:
            claim = self._claim_step_in_one_statement(run_id, idx, token, earlier_tokens, lease_seconds)
            if claim is not None:
                return claim
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            run = conn.execute(select(r.status, r.cancel_requested, r.input).where(r.id == run_id)).first()
            if run is None or run.status not in LIVE_RUN:
                if run is not None and run.status == RunStatus.COMPENSATING.value:
                    step = conn.execute(select(s.status, s.error).where(s.run_id == run_id, s.idx == idx)).first()
                    return _failed_while_compensating(*(step or (None, None)))
                return Claim(ClaimOutcome.GONE)
            may_claim = claimable(StepStatus.PENDING, StepStatus.RUNNING, token, earlier_tokens, now)
            # Step flags: a cancel that lost the race with the pivot's success is overruled, never acted on.
            cancel = run.cancel_requested and not overrule_cancel_past_pivot(conn, run_id, now)
            if cancel:
                if self._stop_for_cancel(conn, run_id, idx, may_claim, now):
                    return Claim(ClaimOutcome.CANCELLED)
            else:
                if run.status == RunStatus.PENDING.value:
                    set_run_status(conn, run_id, RunStatus.PENDING, RunStatus.RUNNING, now)
                claimed = conn.execute(
                    update(t.steps)
                    .where(s.run_id == run_id, s.idx == idx, may_claim)
                    .values(
                        status=StepStatus.RUNNING.value,
                        attempts=s.attempts + 1,
                        claim=token,
                        lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                        started_at=func.coalesce(s.started_at, now),
                        task_id=token.rsplit(":", 1)[0],
                        worker=current_worker(),
                    )
                    .returning(s.attempts, s.name)
                ).first()
                if claimed is not None:
                    event(conn, run_id, EventKind.STEP_STARTED, claimed.name, {"attempt": claimed.attempts}, now)
                    return Claim(ClaimOutcome.CLAIMED, attempt=claimed.attempts,
                                 round_attempt=self._round_attempt(conn, run_id, claimed.name, claimed.attempts),
                                 input=run.input)
            current = conn.execute(
                select(s.status, s.result, s.error).where(s.run_id == run_id, s.idx == idx)
            ).first()
        status, result, error = current if current is not None else (None, None, None)
        if status == StepStatus.FAILED_BEST_EFFORT.value:  # step flags: done, with no result
            return Claim(ClaimOutcome.DONE, result=None)
        return claim_lost(status, result, error, StepStatus.SUCCEEDED, StepStatus.FAILED)

    def _claim_step_in_one_statement(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str],
                                     lease_seconds: float) -> Claim | None:
        """claim_step on PostgreSQL. None when a cancel was requested: the transaction above decides."""
        now = utcnow()
        assert self.fast is not None  # called only under ``if self.fast``
        row = self.fast.claim_step(run_id, idx, token, earlier_tokens,
                                   now + dt.timedelta(seconds=lease_seconds), now, current_worker())
        if row is None or row.status not in LIVE_RUN:
            if row is not None and row.status == RunStatus.COMPENSATING.value:
                return _failed_while_compensating(row.step_status, row.error)
            return Claim(ClaimOutcome.GONE)
        if row.attempts is not None:
            return Claim(ClaimOutcome.CLAIMED, attempt=row.attempts, round_attempt=row.attempts, input=row.input)
        if row.cancel_requested:
            return None
        return claim_lost(row.step_status, row.result, row.error, StepStatus.SUCCEEDED, StepStatus.FAILED)

    def _stop_for_cancel(self, conn, run_id: str, idx: int, may_claim, now: dt.datetime) -> bool:
        """A cancel was requested. Only a delivery that could claim the step acts on it: a duplicate of a
        step whose holder is still running backs off, so the holder finishes and the next step stops
        (acting here would mark the step failed and leave the holder's effect never undone)."""
        s = t.steps.c
        reason = "cancelled while the step was waiting to run again"
        # It was waiting to run again: a retry, or a redelivery after a crash.
        if fail_step(conn, run_id, idx, StepStatus.RUNNING, reason, now, where=[may_claim]) is not None:
            return True
        return conn.execute(select(s.idx).where(s.run_id == run_id, s.idx == idx, may_claim)).first() is not None

    def complete_step(self, run_id: str, idx: int, token: str, result: Any) -> bool:
        """Record the result; False if this delivery no longer holds the step."""
        now = utcnow()
        return self._held(EventKind.STEP_SUCCEEDED, run_id, idx, token, now, {}, dict(result=result),
                          status=StepStatus.SUCCEEDED.value, result=result, error=None, finished_at=now,
                          lease_expires_at=None)

    def complete_last_step(self, run_id: str, idx: int, token: str, result: Any) -> str | None:
        """Record the last step's result and finish the run with it (``succeeded``), unless a cancel came in
        (the run stays ``running``: the caller raises SagaCancelled into the errback). Returns the run's
        status after, or None when this delivery no longer holds the step."""
        now = utcnow()
        if self.fast:
            return self.fast.complete_last_step(run_id, idx, token, result, now)
        with self.engine.begin() as conn:
            held = move_step(conn, run_id, idx, StepStatus.RUNNING, token=token, returning=[t.steps.c.attempts],
                             status=StepStatus.SUCCEEDED.value, result=result, error=None, finished_at=now,
                             lease_expires_at=None)
            if held is None:
                return None
            event(conn, run_id, EventKind.STEP_SUCCEEDED, held.name, {"attempt": held.attempts}, now)
            if succeed_run(conn, run_id, now):
                return RunStatus.SUCCEEDED.value
            touch(conn, run_id, now)
            return run_status(conn, run_id)

    def retry_step(self, run_id: str, idx: int, token: str, error: str, delay: float, lease_seconds: float,
                   traceback: str | None = None) -> bool:
        return self._retry(EventKind.STEP_RETRIED, run_id, idx, token, error, delay, lease_seconds, traceback)

    def fail_step(self, run_id: str, idx: int, token: str, error: str, traceback: str | None = None) -> bool:
        """The step failed for good: its error, and the traceback of that attempt in the event."""
        now = utcnow()
        return self._held(EventKind.STEP_FAILED, run_id, idx, token, now, with_traceback({"error": error}, traceback),
                          dict(error=error, traceback=traceback),
                          status=StepStatus.FAILED.value, error=error, finished_at=now, lease_expires_at=None)

    def finish_run(self, run_id: str) -> ClaimOutcome:
        """The last link of the chain: running -> succeeded, unless a cancel came in meanwhile."""
        now = utcnow()
        r = t.runs.c
        if self.fast:
            finished = self.fast.finish_run(run_id, now)
        else:
            with self.engine.begin() as conn:
                finished = succeed_run(conn, run_id, now)
        if finished:
            return ClaimOutcome.CLAIMED
        run = self._read(lambda conn: conn.execute(select(r.status, r.cancel_requested).where(r.id == run_id)).first())
        if run is not None and run.status == RunStatus.RUNNING.value and run.cancel_requested:
            return ClaimOutcome.CANCELLED
        return ClaimOutcome.GONE

    def extend_lease(self, run_id: str, idx: int, token: str, lease_seconds: float) -> tuple[bool, bool]:
        """A long step's heartbeat: push its lease forward. Returns (still held, cancel requested)."""
        now = utcnow()
        with self.engine.begin() as conn:
            held = move_step(conn, run_id, idx, HELD_STEP, token=token,
                             lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
            cancel = conn.execute(select(t.runs.c.cancel_requested).where(t.runs.c.id == run_id)).scalar()
        return held is not None, bool(cancel)

    # ------------------------------------------------------------ the held transitions (fastpath.HELD)

    def _held(self, kind: EventKind, run_id: str, idx: int, token: str, now: dt.datetime, detail: dict, fast: dict,
              **values) -> bool:
        """The HELD transition ``kind`` of the step (or compensation) this delivery holds: its row takes
        ``values`` and ``kind`` is recorded with ``detail`` (after the attempt, when HELD names its column).
        On PostgreSQL one prepared statement (fastpath.HELD, given ``fast``); else one transaction. False,
        changing nothing, when this delivery no longer holds it."""
        if self.fast:
            return self.fast.update_held(kind, run_id, idx, token, now, **fast)
        active, attempts, moves_run = HELD[kind]
        s = t.steps.c
        with self.engine.begin() as conn:
            row = move_step(conn, run_id, idx, active, token=token, returning=[s.attempts, s.compensation_attempts],
                            **values)
            if row is None:
                return False
            attempt = {"attempt": row._mapping[attempts]} if attempts else {}
            event(conn, run_id, kind, row.name, ({**attempt, **detail} if detail or attempt else None), now)
            if moves_run:
                touch(conn, run_id, now)
        return True

    def _retry(self, kind: EventKind, run_id: str, idx: int, token: str, error: str, delay: float,
               lease_seconds: float, traceback: str | None = None) -> bool:
        """A policy retry of a held step or compensation: the lease covers the wait before the retry too
        (a waiting step is not a stuck one), and the error is kept."""
        now = utcnow()
        lease = now + dt.timedelta(seconds=delay + lease_seconds)
        retry_in = round(delay, 3)
        error_column = "error" if HELD[kind][0] is StepStatus.RUNNING else "compensation_error"
        return self._held(kind, run_id, idx, token, now,
                          with_traceback({"error": error, "retry_in": retry_in}, traceback),
                          dict(error=error, lease=lease, retry_in=retry_in, traceback=traceback),
                          lease_expires_at=lease, **{error_column: error})

    @staticmethod
    def _round_attempt(conn, run_id: str, step: str, attempts: int) -> int:
        """The step's executions since the last operator retry (what its retry policy counts): a step that
        an operator sent forward again (request_forward_retry) starts a new round; its attempts keep growing."""
        if attempts <= 1:
            return attempts
        e = t.events.c
        last_retry = (select(func.max(e.id)).where(e.run_id == run_id, e.kind == EventKind.RETRY_REQUESTED.value)
                      .scalar_subquery())
        count = conn.execute(
            select(func.count()).select_from(t.events)
            .where(e.run_id == run_id, e.kind == EventKind.STEP_STARTED.value, e.step == step,
                   e.id > func.coalesce(last_retry, 0))
        ).scalar()
        return min(attempts, count or attempts)
