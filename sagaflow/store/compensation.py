"""Compensation: the errback's move to ``compensating``, the claim, completion, retry and failure of each
undo, the end of the compensation, and the operator's retry of a compensation that failed.

Only steps recorded as completed are undone (guards.to_compensate), each at most once (its claim), latest
first.
"""

from __future__ import annotations

import datetime as dt
from typing import Sequence

from sqlalchemy import and_, case, func, literal, or_, select, update

from sagaflow.errors import InvalidTransition, UnknownRun
from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import Claim, ClaimOutcome
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.claims import Claims, claim_lost, with_traceback
from sagaflow.store.engine import utcnow
from sagaflow.store.groups import branches_unsettled
from sagaflow.store.guards import (
    FAILED_NON_ATOMIC,
    LIVE_RUN,
    claimable,
    event,
    fail_step,
    lock_run,
    move_step,
    run_status,
    set_run_status,
    to_compensate,
    touch,
)
from sagaflow.store.workers import current_worker


def undo_gave_up(conn, run_id: str) -> bool:
    """Some step of the run is ``compensation_failed``: the run cannot end ``compensated``."""
    s = t.steps.c
    return conn.execute(select(s.idx).where(s.run_id == run_id, s.status == StepStatus.COMPENSATION_FAILED.value)
                        .limit(1)).first() is not None


class Compensation(Claims):
    def begin_compensation(self, run_id: str, failed_idx: int, lost_error: str) -> list[int] | None:
        """running -> compensating. Returns the indexes to compensate, latest first, or None when another
        errback got here first. A step still marked running was lost (hard time limit, dead process): it is
        recorded as failed. Steps that never started are marked skipped. With nothing to undo, the run ends
        at once."""
        now = utcnow()
        if self.fast:
            return self.fast.begin_compensation(run_id, failed_idx, lost_error, now)
        s = t.steps.c
        with self.engine.begin() as conn:
            if not set_run_status(conn, run_id, LIVE_RUN, RunStatus.COMPENSATING, now):
                return None
            fail_step(conn, run_id, failed_idx, StepStatus.RUNNING, lost_error, now)
            conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.status == StepStatus.PENDING.value)
                .values(status=StepStatus.SKIPPED.value)
            )
            todo = to_compensate(conn, run_id)
            if not todo:
                self._finish_compensation(conn, run_id, now)
        return todo

    def fail_and_compensate(self, run_id: str, idx: int, token: str, error: str,
                            traceback: str | None = None) -> tuple[bool, list[int] | None]:
        """A step of a linear saga failed for good in the delivery that holds it: fail_step, then
        begin_compensation (one statement on PostgreSQL), so its own task publishes the undos without an
        errback hop. Returns (this delivery held the step, the indexes to undo latest first: [] when the run
        ended at once, None when the run was no longer live and the errback decides)."""
        if self.fast:
            return self.fast.fail_and_compensate(run_id, idx, token, error, traceback, utcnow())
        if not self.fail_step(run_id, idx, token, error, traceback):
            return False, None
        return True, self.begin_compensation(run_id, idx, error)

    def compensations_to_redrive(self, run_id: str) -> list[int] | None:
        """For a run still compensating: the steps not yet undone, latest first, the one in progress
        included (a re-published chain then starts where the original is, and backs off if it is busy).
        None when the run is not compensating."""
        def read(conn):
            if run_status(conn, run_id) != RunStatus.COMPENSATING.value:
                return None
            return to_compensate(conn, run_id, in_progress=True)

        return self._read(read)

    def claim_compensation(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str],
                           lease_seconds: float) -> Claim:
        now = utcnow()
        lease = now + dt.timedelta(seconds=lease_seconds)
        if self.fast:
            row = self.fast.claim_compensation(run_id, idx, token, earlier_tokens, lease, now, current_worker())
            if row is None or row.status != RunStatus.COMPENSATING.value:
                return Claim(ClaimOutcome.GONE)
            if row.compensation_attempts is None:
                return claim_lost(row.step_status, None, row.compensation_error, StepStatus.COMPENSATED,
                                  StepStatus.COMPENSATION_FAILED)
            return Claim(ClaimOutcome.CLAIMED, attempt=row.compensation_attempts,
                         round_attempt=row.compensation_round_attempts, input=row.input, result=row.result)
        s = t.steps.c
        with self.engine.begin() as conn:
            run = conn.execute(select(t.runs.c.status, t.runs.c.input).where(t.runs.c.id == run_id)).first()
            if run is None or run.status != RunStatus.COMPENSATING.value:
                return Claim(ClaimOutcome.GONE)
            at = literal(now, t.steps.c.compensation_started_at.type)
            claimed = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx,
                       or_(claimable(StepStatus.SUCCEEDED, StepStatus.COMPENSATING, token, earlier_tokens, now),
                           FAILED_NON_ATOMIC))  # step flags: a non-atomic step undoes its partial work
                .values(
                    status=StepStatus.COMPENSATING.value,
                    compensation_attempts=s.compensation_attempts + 1,
                    compensation_round_attempts=case(
                        (s.status.in_([StepStatus.SUCCEEDED.value, StepStatus.FAILED.value]), 1),
                        else_=s.compensation_round_attempts + 1
                    ),
                    claim=token,
                    lease_expires_at=lease,
                    compensation_task_id=token.rsplit(":", 1)[0],
                    worker=current_worker(),
                    # a round starts from succeeded (or failed: a non-atomic step): its duration counts from here
                    compensation_started_at=case(
                        (s.status.in_([StepStatus.SUCCEEDED.value, StepStatus.FAILED.value]), at),
                        else_=func.coalesce(s.compensation_started_at, at)),
                )
                .returning(s.compensation_attempts, s.compensation_round_attempts, s.name, s.result)
            ).first()
            if claimed is not None:
                event(conn, run_id, EventKind.COMPENSATION_STARTED, claimed.name,
                      {"attempt": claimed.compensation_attempts}, now)
                return Claim(ClaimOutcome.CLAIMED, attempt=claimed.compensation_attempts,
                             round_attempt=claimed.compensation_round_attempts, input=run.input,
                             result=claimed.result)
            current = conn.execute(
                select(s.status, s.compensation_error).where(s.run_id == run_id, s.idx == idx)
            ).first()
        status, error = current if current is not None else (None, None)
        return claim_lost(status, None, error, StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED)

    def complete_compensation(self, run_id: str, idx: int, token: str) -> str | None:
        """Record the undo; the last undo still to do also ends the run (``compensated``, or ``cancelled``
        when a cancel started the compensation). Returns the run's status after, or None when this delivery
        no longer holds the compensation."""
        now = utcnow()
        if self.fast:
            return self.fast.complete_compensation(run_id, idx, token, now)
        with self.engine.begin() as conn:
            held = move_step(conn, run_id, idx, StepStatus.COMPENSATING, token=token,
                             status=StepStatus.COMPENSATED.value, compensation_error=None, compensated_at=now,
                             lease_expires_at=None)
            if held is None:
                return None
            event(conn, run_id, EventKind.COMPENSATION_SUCCEEDED, held.name, None, now)
            lock_run(conn, run_id)  # a late branch's undo may end at the same time (parallel groups)
            if not to_compensate(conn, run_id, in_progress=True):
                self._finish_compensation(conn, run_id, now)
            else:
                touch(conn, run_id, now)
            return run_status(conn, run_id)

    def retry_compensation(self, run_id: str, idx: int, token: str, error: str, delay: float,
                           lease_seconds: float, traceback: str | None = None) -> bool:
        return self._retry(EventKind.COMPENSATION_RETRIED, run_id, idx, token, error, delay, lease_seconds,
                           traceback)

    def fail_compensation(self, run_id: str, idx: int, token: str, error: str, traceback: str | None = None) -> bool:
        return self._held(EventKind.COMPENSATION_FAILED, run_id, idx, token, utcnow(),
                          with_traceback({"error": error}, traceback), dict(error=error, traceback=traceback),
                          status=StepStatus.COMPENSATION_FAILED.value, compensation_error=error,
                          lease_expires_at=None)

    def mark_compensation_failed(self, run_id: str, idx: int, lost_error: str) -> bool:
        """The errback of a compensation that gave up: the run waits for an operator."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            lost = move_step(conn, run_id, idx, StepStatus.COMPENSATING, status=StepStatus.COMPENSATION_FAILED.value,
                             compensation_error=lost_error, lease_expires_at=None)
            if lost is not None:
                event(conn, run_id, EventKind.COMPENSATION_FAILED, lost.name, {"error": lost_error}, now)
            step = conn.execute(select(s.name, s.compensation_error).where(s.run_id == run_id, s.idx == idx)).first()
            if step is None:  # no such step (an unknown run): nothing to record
                return False
            error = f"compensation of step {step.name!r} failed: {step.compensation_error}"
            if not set_run_status(conn, run_id, RunStatus.COMPENSATING, RunStatus.COMPENSATION_FAILED, now,
                                  error=error, finished_at=now):
                return False
            event(conn, run_id, EventKind.RUN_COMPENSATION_FAILED, step.name, {"error": error}, now)
        return True

    def finish_compensation(self, run_id: str) -> bool:
        now = utcnow()
        with self.engine.begin() as conn:
            return self._finish_compensation(conn, run_id, now)

    def _finish_compensation(self, conn, run_id: str, now: dt.datetime) -> bool:
        """compensating -> compensated (or cancelled, when a cancel started it), unless a parallel branch
        still has to settle (groups.py: the late branch finishes it) or an undo gave up (its errback, or the
        sweeper re-publishing it, ends the run compensation_failed: never compensated with an undo missing)."""
        if branches_unsettled(conn, run_id) or undo_gave_up(conn, run_id):
            return False
        cancelled = conn.execute(select(t.runs.c.cancel_requested).where(t.runs.c.id == run_id)).scalar()
        final = RunStatus.CANCELLED if cancelled else RunStatus.COMPENSATED
        if not set_run_status(conn, run_id, RunStatus.COMPENSATING, final, now, finished_at=now):
            return False
        event(conn, run_id, EventKind.run_ended(final), None, None, now)
        return True

    def request_retry(self, run_id: str, origin: dict | None = None) -> list[int]:
        """compensation_failed -> compensating; returns the indexes still to compensate, latest first."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            if not set_run_status(conn, run_id, RunStatus.COMPENSATION_FAILED, RunStatus.COMPENSATING, now,
                                  error=None, finished_at=None):
                status = run_status(conn, run_id)
                if status is None:
                    raise UnknownRun(f"unknown run id {run_id!r}")
                raise InvalidTransition(
                    f"run {run_id} is {status}: only runs in compensation_failed or stuck can be retried"
                )
            # Back to "completed, not yet undone"; the attempt count keeps growing across retries.
            conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.status == StepStatus.COMPENSATION_FAILED.value)
                .values(status=case((and_(s.non_atomic.is_(True), s.error.is_not(None)), StepStatus.FAILED.value),
                                    else_=StepStatus.SUCCEEDED.value),
                        claim=None, lease_expires_at=None)
            )
            event(conn, run_id, EventKind.RETRY_REQUESTED, None, origin or None, now)
            todo = to_compensate(conn, run_id)
            if not todo:
                self._finish_compensation(conn, run_id, now)
        return todo
