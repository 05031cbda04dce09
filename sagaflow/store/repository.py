"""Every SQL statement sagaflow runs, and the guarded transitions of runs and steps.

Each transition is an ``UPDATE ... WHERE status = <expected>`` (compare-and-set) whose row count says
whether this caller won. A duplicate delivery, a duplicate errback or a late retry loses the race and
changes nothing. Each method is one transaction.

A step (or compensation) is *claimed* by one delivery at a time. The claim token is
``"<celery task id>:<retries>"``: a retry of the holder (same task id, a higher retries number: a policy
retry, a retry after a lost pool child or a database outage) takes the claim over; a redelivery of the same
message (worker died) may take it over once the lease expired; so may any delivery once the recovery
sweeper revoked an expired claim; anything else is a duplicate and backs off.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, case, create_engine, event, exists, func, insert, inspect, or_, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError

from sagaflow.errors import InvalidTransition, SchemaMissing, UnknownRun
from sagaflow.store import tables as t
from sagaflow.store.models import Event, Run, RunStatus, StepState, StepStatus


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)  # a fresh SAGAFLOW_HOME
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            # Let SQLAlchemy issue BEGIN itself (below): pysqlite's implicit BEGIN is deferred, and a
            # deferred read-then-write transaction fails with "database is locked" under concurrency.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # pre_ping: a connection the server dropped (restart, pg_terminate_backend) is replaced, not used.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # this delivery holds the step: run the action
    DONE = "done"  # already finished by an earlier delivery: carry its result on
    FAILED = "failed"  # already failed for good: fire the errback again (it may have been lost)
    BUSY = "busy"  # another live delivery holds it: this one is a duplicate
    CANCELLED = "cancelled"  # the run was cancelled: stop the chain, compensate
    GONE = "gone"  # the run moved on (compensating or final): nothing to do


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    attempt: int = 0  # executions of this action (or compensation) so far, this one included
    round_attempt: int = 0  # the same, counted from the last operator retry: what the retry policy counts
    input: dict | None = None
    result: Any = None
    error: str | None = None


_LIVE_RUN = (RunStatus.PENDING.value, RunStatus.RUNNING.value)
_IN_PROGRESS_RUN = (*_LIVE_RUN, RunStatus.COMPENSATING.value)  # what the recovery sweeper watches
_HELD_STEP = (StepStatus.RUNNING.value, StepStatus.COMPENSATING.value)


@dataclass(frozen=True)
class Recovery:
    """What the sweeper must publish to move a stalled run on, decided from SQL in one transaction.

    action: "resume" (the forward chain from ``index``, given ``results``), "errback" (``index`` failed but
    the run never began compensating), "finish" (every step done), "compensate" (``indexes``, latest first;
    empty: finish the compensation).
    """

    run_id: str
    saga: str
    version: int
    action: str
    index: int = 0
    results: dict | None = None
    indexes: tuple[int, ...] = ()
    revoked: tuple[str, ...] = ()  # steps whose expired claim was taken back


class Store:
    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or create_db_engine(url)

    def dispose(self) -> None:
        self.engine.dispose()

    def check_schema(self) -> None:
        """Raise SchemaMissing, saying what to run, unless the database is at the latest migration."""
        from sagaflow.store.migrate import current_revision, head_revision

        where = self.engine.url.render_as_string(hide_password=True)
        if not inspect(self.engine).has_table(t.runs.name):
            raise SchemaMissing(f"the database {where} has no sagaflow tables: run `sagaflow db upgrade` first")
        current, head = current_revision(self.engine), head_revision()
        if current != head:
            raise SchemaMissing(
                f"the database {where} is at schema revision {current}, this sagaflow needs {head}: "
                f"run `sagaflow db upgrade`"
            )

    # ---------------------------------------------------------------- runs: create and read

    def create_run(
        self,
        run_id: str,
        saga: str,
        version: int,
        input: dict,
        steps: Iterable[tuple[str, bool]],
        idempotency_key: str | None = None,
    ) -> tuple[Run, bool]:
        """Insert the run, one row per step and the first event in one transaction.

        Returns ``(run, created)``; with an idempotency key already used, the existing run and False.
        """
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(t.runs).values(
                        id=run_id,
                        saga=saga,
                        saga_version=version,
                        status=RunStatus.PENDING.value,
                        input=input,
                        idempotency_key=idempotency_key,
                        cancel_requested=False,
                        created_at=now,
                        updated_at=now,
                    )
                )
                conn.execute(
                    insert(t.steps),
                    [
                        dict(
                            run_id=run_id,
                            idx=i,
                            name=name,
                            status=StepStatus.PENDING.value,
                            has_compensation=has_comp,
                            attempts=0,
                            compensation_attempts=0,
                            compensation_round_attempts=0,
                        )
                        for i, (name, has_comp) in enumerate(steps)
                    ],
                )
                self._event(conn, run_id, "run_started", None, {"saga": saga, "version": version}, now)
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.find_by_idempotency_key(idempotency_key)
            if existing is None:
                raise
            return existing, False
        return self.get_run(run_id), True

    def find_by_idempotency_key(self, key: str) -> Run | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.runs).where(t.runs.c.idempotency_key == key)).first()
            return self._load(conn, row) if row is not None else None

    def get_run(self, run_id: str, history: bool = True) -> Run:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.runs).where(t.runs.c.id == run_id)).first()
            if row is None:
                raise UnknownRun(f"unknown run id {run_id!r}")
            return self._load(conn, row) if history else Run.from_row(row)

    def _load(self, conn, row) -> Run:
        steps = conn.execute(select(t.steps).where(t.steps.c.run_id == row.id).order_by(t.steps.c.idx))
        events = conn.execute(select(t.events).where(t.events.c.run_id == row.id).order_by(t.events.c.id))
        return Run.from_row(row, map(StepState.from_row, steps), map(Event.from_row, events))

    def list_runs(
        self, status: str | None = None, saga: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Run], int]:
        """Newest first, without steps and events; and the total count matching the filters."""
        conditions = []
        if status:
            conditions.append(t.runs.c.status == status)
        if saga:
            conditions.append(t.runs.c.saga == saga)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.runs)
                .where(*conditions)
                .order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc())
                .limit(limit)
                .offset(offset)
            )
            runs = [Run.from_row(r) for r in rows]
            total = conn.execute(select(func.count()).select_from(t.runs).where(*conditions)).scalar_one()
        return runs, total

    # ---------------------------------------------------------------- the forward path

    def claim_step(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str],
                   lease_seconds: float) -> Claim:
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = conn.execute(
                select(t.runs.c.status, t.runs.c.cancel_requested, t.runs.c.input).where(t.runs.c.id == run_id)
            ).first()
            if run is None or run.status not in _LIVE_RUN:
                return Claim(ClaimOutcome.GONE)
            claimable = self._claimable(StepStatus.PENDING, StepStatus.RUNNING, token, earlier_tokens, now)
            if run.cancel_requested:
                if self._stop_for_cancel(conn, run_id, idx, claimable, now):
                    return Claim(ClaimOutcome.CANCELLED)
            else:
                if run.status == RunStatus.PENDING.value:
                    self._set_run_status(conn, run_id, RunStatus.PENDING, RunStatus.RUNNING, now)
                claimed = conn.execute(
                    update(t.steps)
                    .where(s.run_id == run_id, s.idx == idx, claimable)
                    .values(
                        status=StepStatus.RUNNING.value,
                        attempts=s.attempts + 1,
                        claim=token,
                        lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                        started_at=func.coalesce(s.started_at, now),
                        task_id=token.rsplit(":", 1)[0],
                    )
                    .returning(s.attempts, s.name)
                ).first()
                if claimed is not None:
                    self._event(conn, run_id, "step_started", claimed.name, {"attempt": claimed.attempts}, now)
                    return Claim(ClaimOutcome.CLAIMED, attempt=claimed.attempts, round_attempt=claimed.attempts,
                             input=run.input)
            current = conn.execute(
                select(s.status, s.result, s.error).where(s.run_id == run_id, s.idx == idx)
            ).first()
        if current is not None and current.status == StepStatus.SUCCEEDED.value:
            return Claim(ClaimOutcome.DONE, result=current.result)
        if current is not None and current.status == StepStatus.FAILED.value:
            return Claim(ClaimOutcome.FAILED, error=current.error)
        return Claim(ClaimOutcome.BUSY)

    def complete_step(self, run_id: str, idx: int, token: str, result: Any) -> bool:
        """Record the result; False if this delivery no longer holds the step."""
        return self._update_held(
            run_id, idx, token, StepStatus.RUNNING, "step_succeeded", lambda row: {"attempt": row["attempts"]},
            status=StepStatus.SUCCEEDED.value, result=result, error=None, finished_at=utcnow(),
            lease_expires_at=None,
        )

    def retry_step(self, run_id: str, idx: int, token: str, error: str, delay: float, lease_seconds: float) -> bool:
        return self._note_retry(run_id, idx, token, error, delay, lease_seconds, StepStatus.RUNNING,
                                "step_retried", "attempts")

    def fail_step(self, run_id: str, idx: int, token: str, error: str) -> bool:
        return self._end_claim(run_id, idx, token, StepStatus.RUNNING, StepStatus.FAILED, "step_failed",
                               {"error": error}, error=error, finished_at=utcnow())

    def finish_run(self, run_id: str) -> ClaimOutcome:
        """The last link of the chain: running -> succeeded, unless a cancel came in meanwhile."""
        now = utcnow()
        with self.engine.begin() as conn:
            done = conn.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.status == RunStatus.RUNNING.value,
                       t.runs.c.cancel_requested.is_(False))
                .values(status=RunStatus.SUCCEEDED.value, updated_at=now, finished_at=now)
            ).rowcount
            if done:
                self._event(conn, run_id, "run_succeeded", None, None, now)
                return ClaimOutcome.CLAIMED
            run = conn.execute(select(t.runs.c.status, t.runs.c.cancel_requested).where(t.runs.c.id == run_id)).first()
        if run is not None and run.status == RunStatus.RUNNING.value and run.cancel_requested:
            return ClaimOutcome.CANCELLED
        return ClaimOutcome.GONE

    # ---------------------------------------------------------------- the backward path

    def begin_compensation(self, run_id: str, failed_idx: int, lost_error: str) -> list[int] | None:
        """running -> compensating. Returns the indexes to compensate, latest first, or None when another
        errback got here first. A step still marked running was lost (hard time limit, dead process): it is
        recorded as failed. Steps that never started are marked skipped."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            if not self._set_run_status(conn, run_id, _LIVE_RUN, RunStatus.COMPENSATING, now):
                return None
            lost = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == failed_idx, s.status == StepStatus.RUNNING.value)
                .values(status=StepStatus.FAILED.value, error=lost_error, finished_at=now, lease_expires_at=None)
                .returning(s.name)
            ).first()
            if lost is not None:
                self._event(conn, run_id, "step_failed", lost.name, {"error": lost_error}, now)
            conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.status == StepStatus.PENDING.value)
                .values(status=StepStatus.SKIPPED.value)
            )
            todo = self._to_compensate(conn, run_id)
            if not todo:
                self._finish_compensation(conn, run_id, now)
        return todo

    def compensations_to_redrive(self, run_id: str) -> list[int] | None:
        """For a run still compensating: the steps not yet undone, latest first, the one in progress
        included (a re-published chain then starts where the original is, and backs off if it is busy).
        None when the run is not compensating."""
        s = t.steps.c
        with self.engine.connect() as conn:
            status = conn.execute(select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar()
            if status != RunStatus.COMPENSATING.value:
                return None
            rows = conn.execute(
                select(s.idx)
                .where(s.run_id == run_id, s.has_compensation.is_(True),
                       s.status.in_([StepStatus.SUCCEEDED.value, StepStatus.COMPENSATING.value]))
                .order_by(s.idx.desc())
            )
            return [r.idx for r in rows]

    def claim_compensation(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str],
                           lease_seconds: float) -> Claim:
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = conn.execute(select(t.runs.c.status, t.runs.c.input).where(t.runs.c.id == run_id)).first()
            if run is None or run.status != RunStatus.COMPENSATING.value:
                return Claim(ClaimOutcome.GONE)
            claimed = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx,
                       self._claimable(StepStatus.SUCCEEDED, StepStatus.COMPENSATING, token, earlier_tokens, now))
                .values(
                    status=StepStatus.COMPENSATING.value,
                    compensation_attempts=s.compensation_attempts + 1,
                    compensation_round_attempts=case(
                        (s.status == StepStatus.SUCCEEDED.value, 1), else_=s.compensation_round_attempts + 1
                    ),
                    claim=token,
                    lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                    compensation_task_id=token.rsplit(":", 1)[0],
                )
                .returning(s.compensation_attempts, s.compensation_round_attempts, s.name, s.result)
            ).first()
            if claimed is not None:
                self._event(conn, run_id, "compensation_started", claimed.name,
                            {"attempt": claimed.compensation_attempts}, now)
                return Claim(ClaimOutcome.CLAIMED, attempt=claimed.compensation_attempts,
                             round_attempt=claimed.compensation_round_attempts, input=run.input,
                             result=claimed.result)
            current = conn.execute(
                select(s.status, s.compensation_error).where(s.run_id == run_id, s.idx == idx)
            ).first()
        if current is not None and current.status == StepStatus.COMPENSATED.value:
            return Claim(ClaimOutcome.DONE)
        if current is not None and current.status == StepStatus.COMPENSATION_FAILED.value:
            return Claim(ClaimOutcome.FAILED, error=current.compensation_error)
        return Claim(ClaimOutcome.BUSY)

    def complete_compensation(self, run_id: str, idx: int, token: str) -> bool:
        now = utcnow()
        return self._end_claim(run_id, idx, token, StepStatus.COMPENSATING, StepStatus.COMPENSATED,
                               "compensation_succeeded", None, compensation_error=None, compensated_at=now)

    def retry_compensation(self, run_id: str, idx: int, token: str, error: str, delay: float,
                           lease_seconds: float) -> bool:
        return self._note_retry(run_id, idx, token, error, delay, lease_seconds, StepStatus.COMPENSATING,
                                "compensation_retried", "compensation_attempts")

    def fail_compensation(self, run_id: str, idx: int, token: str, error: str) -> bool:
        return self._end_claim(run_id, idx, token, StepStatus.COMPENSATING, StepStatus.COMPENSATION_FAILED,
                               "compensation_failed", {"error": error}, compensation_error=error)

    def mark_compensation_failed(self, run_id: str, idx: int, lost_error: str) -> bool:
        """The errback of a compensation that gave up: the run waits for an operator."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            lost = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.COMPENSATING.value)
                .values(status=StepStatus.COMPENSATION_FAILED.value, compensation_error=lost_error,
                        lease_expires_at=None)
                .returning(s.name)
            ).first()
            if lost is not None:
                self._event(conn, run_id, "compensation_failed", lost.name, {"error": lost_error}, now)
            step = conn.execute(select(s.name, s.compensation_error).where(s.run_id == run_id, s.idx == idx)).first()
            error = f"compensation of step {step.name!r} failed: {step.compensation_error}"
            if not self._set_run_status(conn, run_id, RunStatus.COMPENSATING, RunStatus.COMPENSATION_FAILED, now,
                                        error=error, finished_at=now):
                return False
            self._event(conn, run_id, "run_compensation_failed", step.name, {"error": error}, now)
        return True

    def finish_compensation(self, run_id: str) -> bool:
        now = utcnow()
        with self.engine.begin() as conn:
            return self._finish_compensation(conn, run_id, now)

    # ---------------------------------------------------------------- leases and recovery

    def extend_lease(self, run_id: str, idx: int, token: str, lease_seconds: float) -> tuple[bool, bool]:
        """A long step's heartbeat: push its lease forward. Returns (still held, cancel requested)."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            held = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.status.in_(_HELD_STEP), s.claim == token)
                .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
            ).rowcount
            cancel = conn.execute(select(t.runs.c.cancel_requested).where(t.runs.c.id == run_id)).scalar()
        return bool(held), bool(cancel)

    @staticmethod
    def _stalled(now: dt.datetime, stall_timeout: float):
        """Run is in progress, no step holds a live lease, and either a holder's lease expired (it died) or
        nothing moved for stall_timeout seconds (a message was lost: broker restart, a crash before publish,
        a start whose publish failed)."""
        r, s = t.runs.c, t.steps.c
        held = (s.run_id == r.id) & s.status.in_(_HELD_STEP)
        return and_(
            r.status.in_(_IN_PROGRESS_RUN),
            ~exists().where(held, s.lease_expires_at >= now),
            or_(exists().where(held, s.lease_expires_at < now),
                r.updated_at < now - dt.timedelta(seconds=stall_timeout)),
        )

    def stalled_runs(self, stall_timeout: float, limit: int = 500) -> list[tuple[str, dt.datetime]]:
        """(run id, updated_at) of the stalled runs, longest stalled first."""
        r = t.runs.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(r.id, r.updated_at).where(self._stalled(utcnow(), stall_timeout))
                .order_by(r.updated_at).limit(limit)
            )
            return [(row.id, row.updated_at) for row in rows]

    def take_over_stalled(self, run_id: str, seen_updated_at: dt.datetime, stall_timeout: float) -> Recovery | None:
        """Claim the re-drive of a stalled run (compare-and-set on updated_at, so of two sweepers one
        wins, and a run that moved meanwhile is left alone), take back expired claims, and decide from
        SQL what to publish. None when this caller did not win."""
        now = utcnow()
        r, s = t.runs.c, t.steps.c
        with self.engine.begin() as conn:
            run = conn.execute(
                update(t.runs)
                .where(r.id == run_id, r.updated_at == seen_updated_at, self._stalled(now, stall_timeout))
                .values(updated_at=now)
                .returning(r.status, r.saga, r.saga_version)
            ).first()
            if run is None:
                return None
            # The holder is gone: any delivery may claim the step now, and the lease no longer counts.
            revoked = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.status.in_(_HELD_STEP), s.lease_expires_at < now)
                .values(claim=None, lease_expires_at=None)
                .returning(s.name)
            ).all()
            steps = conn.execute(
                select(s.idx, s.name, s.status, s.result, s.has_compensation)
                .where(s.run_id == run_id).order_by(s.idx)
            ).all()
            recovery = self._recovery_plan(run_id, run, steps, tuple(r.name for r in revoked))
            self._event(conn, run_id, "run_recovered", None,
                        {"action": recovery.action, "revoked": list(recovery.revoked),
                         **({"from_step": steps[recovery.index].name} if recovery.action in ("resume", "errback")
                            else {})}, now)
        return recovery

    @staticmethod
    def _recovery_plan(run_id: str, run, steps, revoked: tuple[str, ...]) -> Recovery:
        base = dict(run_id=run_id, saga=run.saga, version=run.saga_version, revoked=revoked)
        if run.status == RunStatus.COMPENSATING.value:
            todo = [st.idx for st in reversed(steps) if st.has_compensation
                    and st.status in (StepStatus.SUCCEEDED.value, StepStatus.COMPENSATING.value)]
            return Recovery(action="compensate", indexes=tuple(todo), **base)
        done = (StepStatus.SUCCEEDED.value, StepStatus.SKIPPED.value)
        frontier = next((st for st in steps if st.status not in done), None)
        results = {st.name: st.result for st in steps if st.status == StepStatus.SUCCEEDED.value}
        if frontier is None:
            return Recovery(action="finish", index=len(steps), results=results, **base)
        if frontier.status == StepStatus.FAILED.value:
            return Recovery(action="errback", index=frontier.idx, **base)
        return Recovery(action="resume", index=frontier.idx, results=results, **base)

    # ---------------------------------------------------------------- operator requests

    def request_cancel(self, run_id: str) -> Run:
        now = utcnow()
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.status.in_(_LIVE_RUN), t.runs.c.cancel_requested.is_(False))
                .values(cancel_requested=True, updated_at=now)
            ).rowcount
            if changed:
                self._event(conn, run_id, "cancel_requested", None, None, now)
        run = self.get_run(run_id)
        if not changed and not (run.cancel_requested and run.status in _LIVE_RUN):
            raise InvalidTransition(f"run {run_id} is {run.status}: only pending or running runs can be cancelled")
        return run

    def request_retry(self, run_id: str) -> list[int]:
        """compensation_failed -> compensating; returns the indexes still to compensate, latest first."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            if not self._set_run_status(conn, run_id, RunStatus.COMPENSATION_FAILED, RunStatus.COMPENSATING, now,
                                        error=None, finished_at=None):
                status = conn.execute(select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar()
                if status is None:
                    raise UnknownRun(f"unknown run id {run_id!r}")
                raise InvalidTransition(
                    f"run {run_id} is {status}: only runs in compensation_failed can be retried"
                )
            # Back to "completed, not yet undone"; the attempt count keeps growing across retries.
            conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.status == StepStatus.COMPENSATION_FAILED.value)
                .values(status=StepStatus.SUCCEEDED.value, claim=None, lease_expires_at=None)
            )
            self._event(conn, run_id, "retry_requested", None, None, now)
            todo = self._to_compensate(conn, run_id)
            if not todo:
                self._finish_compensation(conn, run_id, now)
        return todo

    # ---------------------------------------------------------------- helpers

    def _stop_for_cancel(self, conn, run_id: str, idx: int, claimable, now: dt.datetime) -> bool:
        """A cancel was requested. Only a delivery that could claim the step acts on it: a duplicate of a
        step whose holder is still running backs off, so the holder finishes and the next step stops
        (acting here would mark the step failed and leave the holder's effect never undone)."""
        s = t.steps.c
        reason = "cancelled while the step was waiting to run again"
        waiting = conn.execute(  # it was waiting to run again: a retry, or a redelivery after a crash
            update(t.steps)
            .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.RUNNING.value, claimable)
            .values(status=StepStatus.FAILED.value, error=reason, finished_at=now, lease_expires_at=None)
            .returning(s.name)
        ).first()
        if waiting is not None:
            self._event(conn, run_id, "step_failed", waiting.name, {"error": reason}, now)
            return True
        return conn.execute(select(s.idx).where(s.run_id == run_id, s.idx == idx, claimable)).first() is not None

    @staticmethod
    def _claimable(start: StepStatus, active: StepStatus, token: str, earlier_tokens: Sequence[str],
                   now: dt.datetime):
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

    def _note_retry(self, run_id, idx, token, error, delay, lease_seconds, active: StepStatus, kind: str,
                    attempts_column: str) -> bool:
        # The lease covers the wait before the retry too: a waiting step is not a stuck one.
        lease = utcnow() + dt.timedelta(seconds=delay + lease_seconds)
        error_column = "error" if active is StepStatus.RUNNING else "compensation_error"
        return self._update_held(
            run_id, idx, token, active, kind,
            lambda row: {"attempt": row[attempts_column], "error": error, "retry_in": round(delay, 3)},
            lease_expires_at=lease, **{error_column: error},
        )

    def _end_claim(self, run_id, idx, token, active: StepStatus, final: StepStatus, kind: str, detail,
                   **values) -> bool:
        return self._update_held(run_id, idx, token, active, kind, lambda row: detail,
                                 status=final.value, lease_expires_at=None, **values)

    def _update_held(self, run_id, idx, token, active: StepStatus, kind: str, detail, **values) -> bool:
        """Update the step this delivery holds (status ``active``, claim ``token``) and record ``kind``;
        False, changing nothing, when it does not hold it any more."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            row = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.status == active.value, s.claim == token)
                .values(**values)
                .returning(s.name, s.attempts, s.compensation_attempts)
            ).first()
            if row is None:
                return False
            self._event(conn, run_id, kind, row.name, detail(row._mapping), now)
            self._touch(conn, run_id, now)
        return True

    def _to_compensate(self, conn, run_id: str) -> list[int]:
        s = t.steps.c
        rows = conn.execute(
            select(s.idx)
            .where(s.run_id == run_id, s.status == StepStatus.SUCCEEDED.value, s.has_compensation.is_(True))
            .order_by(s.idx.desc())
        )
        return [r.idx for r in rows]

    def _finish_compensation(self, conn, run_id: str, now: dt.datetime) -> bool:
        cancelled = conn.execute(select(t.runs.c.cancel_requested).where(t.runs.c.id == run_id)).scalar()
        final = RunStatus.CANCELLED if cancelled else RunStatus.COMPENSATED
        if not self._set_run_status(conn, run_id, RunStatus.COMPENSATING, final, now, finished_at=now):
            return False
        self._event(conn, run_id, f"run_{final.value}", None, None, now)
        return True

    @staticmethod
    def _set_run_status(conn, run_id, expected, new: RunStatus, now, **values) -> bool:
        expected_values = [expected.value] if isinstance(expected, RunStatus) else list(expected)
        return bool(
            conn.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.status.in_(expected_values))
                .values(status=new.value, updated_at=now, **values)
            ).rowcount
        )

    @staticmethod
    def _touch(conn, run_id: str, now: dt.datetime) -> None:
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(updated_at=now))

    @staticmethod
    def _event(conn, run_id: str, kind: str, step: str | None, detail: dict | None, now: dt.datetime) -> None:
        conn.execute(insert(t.events).values(run_id=run_id, kind=kind, step=step, at=now, detail=detail))


def ensure_json(value: Any, what: str) -> Any:
    """Round-trip through JSON so only JSON data is stored; raise TypeError naming ``what`` otherwise.
    NaN and infinities are refused: they are not JSON, and PostgreSQL rejects them."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serializable: {exc}") from None
