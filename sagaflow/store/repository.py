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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import and_, case, create_engine, event, exists, func, insert, inspect, or_, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError

from sagaflow.errors import InvalidTransition, SchemaMissing, UnknownRun
from sagaflow.store import tables as t
from sagaflow.store.fastpath import FastPath
from sagaflow.store.models import FINAL_RUN_STATUSES, Event, Run, RunStatus, StepSpec, StepState, StepStatus


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_db_engine(url: str, autocommit: bool = False) -> Engine:
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
    if not autocommit:
        # The transactions of the rare paths and of operator requests: a connection the server dropped
        # (restart, pg_terminate_backend) is replaced before use, for one round trip per checkout.
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=5, max_overflow=5)
    _ping_when_idle(engine)
    return engine


IDLE_PING_SECONDS = 10.0


def _ping_when_idle(engine: Engine) -> None:
    """The hot path's engine: replace a pooled connection the server dropped (restart, idle timeout,
    pg_terminate_backend) before using it. pool_pre_ping would cost a round trip at every checkout, as much
    as a whole transition; this pings only a connection that sat idle. One that drops while busy raises:
    a task's database-outage retry takes over, and a read is tried again (Store._read)."""

    @event.listens_for(engine, "checkin")
    def _idle_since(dbapi_conn, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, proxy):
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT 1")
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()
        except Exception as exc:  # the driver's OperationalError / InterfaceError
            raise DisconnectionError(str(exc)) from exc  # the pool retries with a new connection


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


LOST_BRANCH = ("the branch's worker process was lost while the run was compensating; it recorded no outcome, "
               "so nothing of it is undone")
_LIVE_RUN = (RunStatus.PENDING.value, RunStatus.RUNNING.value)
_IN_PROGRESS_RUN = (*_LIVE_RUN, RunStatus.COMPENSATING.value)  # what the recovery sweeper watches
_HELD_STEP = (StepStatus.RUNNING.value, StepStatus.COMPENSATING.value)
# A non-atomic step that failed may have done part of its work: it is undone too (step flags).
_FAILED_NON_ATOMIC = and_(t.steps.c.non_atomic.is_(True), t.steps.c.status == StepStatus.FAILED.value)


@dataclass(frozen=True)
class Recovery:
    """What the sweeper must publish to move a stalled run on, decided from SQL in one transaction.

    action: "resume" (the forward chain from ``index``, given ``results``), "errback" (``index`` failed but
    the run never began compensating), "finish" (every step done), "compensate" (``indexes``, latest first;
    empty: finish the compensation), "wait" (``index`` waits for its signal or child run: nothing to
    publish); from sagaflow/waits.py's sweep: "gate_timeout" (the errback of a gate past its deadline),
    "child_finished" (a child's end, re-announced to its parent).
    """

    run_id: str
    saga: str
    version: int
    action: str
    index: int = 0
    results: dict | None = None
    indexes: tuple[int, ...] = ()
    revoked: tuple[str, ...] = ()  # steps whose expired claim was taken back


@dataclass(frozen=True)
class BranchOutcome:
    """What a parallel branch's success decided (Store.complete_branch), for its task to act on.

    decision: "waiting" (a sibling is still open: publish nothing), "joined" (this branch completed the
    group: publish the steps from ``next_index`` with ``results``, read from SQL), "finished" (the group ended
    the saga: the run succeeded), "cancelled" (a cancel came in: raise SagaCancelled into the errback),
    "late" (the run began compensating while the branch ran: publish its own undo if ``compensate``),
    "recorded" (the run waits for an operator or is final: publish nothing); for a failure (fail_branch):
    "errback" (fire it: it begins the compensation) or "quiet" (fire none); "stopped" (stop_branch) and
    "lost" (settle_lost_branch).

    ``release``: the undos of the steps before the group, latest first, which waited for the group to
    settle (Store.hold_back): this transition settled it, publish them now.
    """

    decision: str
    next_index: int | None = None
    results: dict | None = None
    compensate: bool = False
    release: tuple[int, ...] = ()


# A branch that counts as done for the join of its group.
_BRANCH_DONE = (StepStatus.SUCCEEDED.value, StepStatus.FAILED_BEST_EFFORT.value)


@dataclass(frozen=True)
class WaitOutcome:
    """What a transition of a gate, a signal or a child run decided, for sagaflow/waits.py to publish.

    action: "waiting" (nothing to publish: the run waits), "continue" (publish the chain of ``run_id`` from
    ``index + 1`` with ``results``), "finished" (the run ended in ``status``: tell its parent, if any),
    "errback" (publish on_step_failed for ``index``), "compensate" (publish the compensations ``indexes``,
    latest first, of ``run_id``), "cancelled" (a cancel came in before the step could wait: fail into the
    errback), "failed" (give up: ``error``), "lost" (this delivery no longer holds the step), "none"
    (nothing to do: a duplicate, or a signal kept for a gate the run has not reached).
    """

    action: str
    run_id: str
    saga: str = ""
    version: int = 0
    index: int = 0
    results: dict | None = None
    result: Any = None
    status: str | None = None
    indexes: tuple[int, ...] = ()
    child_run_id: str | None = None
    error: str | None = None


# A child run in one of these has ended for its parent: succeeded, or it can no longer succeed. ``stuck``
# is not among them: an operator may still take that run forward.
CHILD_ENDED = (RunStatus.SUCCEEDED.value, RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value,
               RunStatus.FAILED.value, RunStatus.COMPENSATION_FAILED.value)
CHILD_UNDONE = (RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value, RunStatus.COMPENSATION_FAILED.value)


class Store:
    def __init__(self, url: str, engine: Engine | None = None, prepared_statements: bool = True) -> None:
        self.url = url
        self.engine = engine or create_db_engine(url)
        # PostgreSQL: the success path's transitions are one statement each, one round trip (fastpath.py).
        self.autocommit = None
        self.fast: FastPath | None = None
        if self.engine.dialect.name == "postgresql":
            self.autocommit = (self.engine.execution_options(isolation_level="AUTOCOMMIT") if engine is not None
                               else create_db_engine(url, autocommit=True))
            self.fast = FastPath(self.autocommit, prepared=prepared_statements)

    @property
    def transactional(self) -> "Store":
        """This store without the PostgreSQL fast path: every transition in repository.py's transactions,
        on the same connection pools. Runs of sagas with gates, child steps, parallel groups or step flags
        (best-effort, non-atomic, pivot) use it: their transitions decide more than the fast statements do."""
        if self.fast is None:
            return self
        clone = self.__dict__.get("_transactional")
        if clone is None:
            clone = object.__new__(Store)
            clone.__dict__.update(self.__dict__, fast=None)
            self._transactional = clone
        return clone

    def _read(self, read: Callable[[Connection], Any]) -> Any:
        """Run ``read(conn)``. On PostgreSQL the connection is an autocommit one, so a read is one round trip,
        not three (BEGIN, SELECT, ROLLBACK); each statement sees its own snapshot either way (READ
        COMMITTED). Reads change nothing, so one that meets a connection the server dropped (restart,
        pg_terminate_backend) is tried once more, on a fresh connection."""
        engine = self.autocommit or self.engine
        try:
            with engine.connect() as conn:
                return read(conn)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        with engine.connect() as conn:
            return read(conn)

    def dispose(self, close: bool = True) -> None:
        """Drop pooled connections; ``close=False`` after a fork, so the parent's stay usable by it."""
        self.engine.dispose(close=close)
        if self.autocommit is not None:
            self.autocommit.dispose(close=close)

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
        steps: Iterable[StepSpec | tuple[str, bool]],
        idempotency_key: str | None = None,
        *,
        parent_run_id: str | None = None,
        parent_step: int | None = None,
        mode: str = "saga",
    ) -> tuple[Run, bool]:
        """Insert the run, one row per step and the first event in one transaction.

        ``steps``: StepSpec, or (name, has compensation) pairs. ``mode="plain"``: policy switched
        compensation off for this run: the run row alone (no step rows, no event). Returns ``(run, created)``;
        with an idempotency key already used, the existing run and False.
        """
        if mode == "plain":
            return self._create_plain_run(run_id, saga, version, input, idempotency_key)
        now = utcnow()
        steps = [s if isinstance(s, StepSpec) else StepSpec(*s) for s in steps]
        linear = mode == "saga" and parent_run_id is None and not any(s.special for s in steps)
        if self.fast and linear:
            event_id = self.fast.create_run(run_id, saga, version, input, idempotency_key, steps, now)
            if event_id is None:
                return self._existing(idempotency_key), False
            return self._new_run(run_id, saga, version, input, idempotency_key, steps, now, event_id), True
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
                        mode=mode,
                        parent_run_id=parent_run_id,
                        parent_step=parent_step,
                    )
                )
                if steps:
                    conn.execute(
                        insert(t.steps),
                        [
                            dict(
                                run_id=run_id,
                                idx=i,
                                name=spec.name,
                                status=StepStatus.PENDING.value,
                                has_compensation=spec.has_compensation,
                                attempts=0,
                                compensation_attempts=0,
                                compensation_round_attempts=0,
                                kind=spec.kind,
                                best_effort=spec.best_effort,
                                non_atomic=spec.non_atomic,
                                pivot=spec.pivot,
                                branch_group=spec.group,
                                signal=spec.signal,
                            )
                            for i, spec in enumerate(steps)
                        ],
                    )
                event_id = None
                if mode != "plain":
                    detail = {"saga": saga, "version": version}
                    if parent_run_id is not None:
                        detail.update(parent_run_id=parent_run_id, parent_step=parent_step)
                    event_id = conn.execute(
                        insert(t.events).values(run_id=run_id, kind="run_started", step=None, at=now,
                                                detail=detail).returning(t.events.c.id)
                    ).scalar_one()
        except IntegrityError:
            if idempotency_key is None:
                raise
            return self._existing(idempotency_key), False
        return self._new_run(run_id, saga, version, input, idempotency_key, steps, now, event_id, mode=mode,
                             parent_run_id=parent_run_id, parent_step=parent_step), True

    def _existing(self, idempotency_key: str | None) -> Run:
        existing = self.find_by_idempotency_key(idempotency_key) if idempotency_key is not None else None
        if existing is None:  # the insert conflicted on something else: only a reused run id can
            raise InvalidTransition("a run with this id exists already")
        return existing

    @staticmethod
    def _new_run(run_id, saga, version, input, idempotency_key, steps: list[StepSpec], now, event_id,
                 mode="saga", parent_run_id=None, parent_step=None) -> Run:
        """The snapshot of a run just inserted, built from what was written rather than read back."""
        detail = {"saga": saga, "version": version}
        if parent_run_id is not None:
            detail.update(parent_run_id=parent_run_id, parent_step=parent_step)
        return Run(
            id=run_id, saga=saga, saga_version=version, status=RunStatus.PENDING.value, input=input,
            idempotency_key=idempotency_key, cancel_requested=False, error=None, created_at=now, updated_at=now,
            finished_at=None,
            steps=tuple(
                StepState(index=i, name=spec.name, status=StepStatus.PENDING.value,
                          has_compensation=spec.has_compensation, attempts=0, compensation_attempts=0, result=None,
                          error=None, compensation_error=None, task_id=None, compensation_task_id=None,
                          started_at=None, finished_at=None, compensated_at=None, kind=spec.kind,
                          best_effort=spec.best_effort, non_atomic=spec.non_atomic, pivot=spec.pivot,
                          group=spec.group, signal=spec.signal)
                for i, spec in enumerate(steps)),
            events=(Event(id=event_id, kind="run_started", step=None, at=now, detail=detail),)
            if event_id is not None else (),
            mode=mode, parent_run_id=parent_run_id, parent_step=parent_step,
        )

    def find_by_idempotency_key(self, key: str) -> Run | None:
        def read(conn):
            row = conn.execute(select(t.runs).where(t.runs.c.idempotency_key == key)).first()
            return self._load(conn, row) if row is not None else None

        return self._read(read)

    def get_run(self, run_id: str, history: bool = True) -> Run:
        def read(conn):
            row = conn.execute(select(t.runs).where(t.runs.c.id == run_id)).first()
            if row is None:
                raise UnknownRun(f"unknown run id {run_id!r}")
            return self._load(conn, row) if history else Run.from_row(row)

        return self._read(read)

    def _load(self, conn, row) -> Run:
        steps = conn.execute(select(t.steps).where(t.steps.c.run_id == row.id).order_by(t.steps.c.idx))
        events = conn.execute(select(t.events).where(t.events.c.run_id == row.id).order_by(t.events.c.id))
        children = conn.execute(select(t.runs.c.id).where(t.runs.c.parent_run_id == row.id)
                                .order_by(t.runs.c.created_at, t.runs.c.id)).scalars()
        return Run.from_row(row, map(StepState.from_row, steps), map(Event.from_row, events), children)

    def list_runs(
        self, status: str | None = None, saga: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Run], int]:
        """Newest first, without steps and events; and the total count matching the filters."""
        conditions = []
        if status:
            conditions.append(t.runs.c.status == status)
        if saga:
            conditions.append(t.runs.c.saga == saga)
        def read(conn):
            rows = conn.execute(
                select(t.runs)
                .where(*conditions)
                .order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc())
                .limit(limit)
                .offset(offset)
            )
            runs = [Run.from_row(r) for r in rows]
            return runs, conn.execute(select(func.count()).select_from(t.runs).where(*conditions)).scalar_one()

        return self._read(read)

    # ---------------------------------------------------------------- the forward path

    def claim_step(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str],
                   lease_seconds: float) -> Claim:
        if self.fast:
            claim = self._claim_step_in_one_statement(run_id, idx, token, earlier_tokens, lease_seconds)
            if claim is not None:
                return claim
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = conn.execute(
                select(t.runs.c.status, t.runs.c.cancel_requested, t.runs.c.input).where(t.runs.c.id == run_id)
            ).first()
            if run is None or run.status not in _LIVE_RUN:
                return Claim(ClaimOutcome.GONE)
            claimable = self._claimable(StepStatus.PENDING, StepStatus.RUNNING, token, earlier_tokens, now)
            # Step flags: a cancel that lost the race with the pivot's success is overruled, never acted on.
            cancel = run.cancel_requested and not self._overrule_cancel_past_pivot(conn, run_id, now)
            if cancel:
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
                    return Claim(ClaimOutcome.CLAIMED, attempt=claimed.attempts,
                                 round_attempt=self._round_attempt(conn, run_id, claimed.name, claimed.attempts),
                                 input=run.input)
            current = conn.execute(
                select(s.status, s.result, s.error).where(s.run_id == run_id, s.idx == idx)
            ).first()
        status, result, error = current if current is not None else (None, None, None)
        if status == StepStatus.FAILED_BEST_EFFORT.value:  # step flags: done, with no result
            return Claim(ClaimOutcome.DONE, result=None)
        return self._claim_lost(status, result, error, StepStatus.SUCCEEDED, StepStatus.FAILED)

    def _claim_step_in_one_statement(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str],
                                     lease_seconds: float) -> Claim | None:
        """claim_step on PostgreSQL. None when a cancel was requested: the transaction above decides."""
        now = utcnow()
        row = self.fast.claim_step(run_id, idx, token, earlier_tokens,
                                   now + dt.timedelta(seconds=lease_seconds), now)
        if row is None or row.status not in _LIVE_RUN:
            return Claim(ClaimOutcome.GONE)
        if row.attempts is not None:
            return Claim(ClaimOutcome.CLAIMED, attempt=row.attempts, round_attempt=row.attempts, input=row.input)
        if row.cancel_requested:
            return None
        return self._claim_lost(row.step_status, row.result, row.error, StepStatus.SUCCEEDED, StepStatus.FAILED)

    @staticmethod
    def _claim_lost(status: str | None, result, error, done: StepStatus, failed: StepStatus) -> Claim:
        if status == done.value:
            return Claim(ClaimOutcome.DONE, result=result)
        if status == failed.value:
            return Claim(ClaimOutcome.FAILED, error=error)
        return Claim(ClaimOutcome.BUSY)

    def complete_step(self, run_id: str, idx: int, token: str, result: Any) -> bool:
        """Record the result; False if this delivery no longer holds the step."""
        if self.fast:
            return self.fast.update_held("step_succeeded", run_id, idx, token, utcnow(), result=result)
        return self._update_held(
            run_id, idx, token, StepStatus.RUNNING, "step_succeeded", {}, "attempts",
            status=StepStatus.SUCCEEDED.value, result=result, error=None, finished_at=utcnow(),
            lease_expires_at=None, touch=False,
        )

    def complete_last_step(self, run_id: str, idx: int, token: str, result: Any) -> str | None:
        """Record the last step's result and finish the run with it (``succeeded``), unless a cancel came in
        (the run stays ``running``: the caller raises SagaCancelled into the errback). Returns the run's
        status after, or None when this delivery no longer holds the step."""
        now = utcnow()
        if self.fast:
            return self.fast.complete_last_step(run_id, idx, token, result, now)
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            held = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.RUNNING.value, s.claim == token)
                .values(status=StepStatus.SUCCEEDED.value, result=result, error=None, finished_at=now,
                        lease_expires_at=None)
                .returning(s.name, s.attempts)
            ).first()
            if held is None:
                return None
            self._event(conn, run_id, "step_succeeded", held.name, {"attempt": held.attempts}, now)
            if self._succeed_run(conn, run_id, now):
                return RunStatus.SUCCEEDED.value
            self._touch(conn, run_id, now)
            return conn.execute(select(r.status).where(r.id == run_id)).scalar()

    def retry_step(self, run_id: str, idx: int, token: str, error: str, delay: float, lease_seconds: float) -> bool:
        if self.fast:
            return self._fast_retry("step_retried", run_id, idx, token, error, delay, lease_seconds)
        return self._note_retry(run_id, idx, token, error, delay, lease_seconds, StepStatus.RUNNING,
                                "step_retried", "attempts")

    def fail_step(self, run_id: str, idx: int, token: str, error: str) -> bool:
        if self.fast:
            return self.fast.update_held("step_failed", run_id, idx, token, utcnow(), error=error)
        return self._end_claim(run_id, idx, token, StepStatus.RUNNING, StepStatus.FAILED, "step_failed",
                               {"error": error}, error=error, finished_at=utcnow())

    def finish_run(self, run_id: str) -> ClaimOutcome:
        """The last link of the chain: running -> succeeded, unless a cancel came in meanwhile."""
        now = utcnow()
        r = t.runs.c
        if self.fast:
            finished = self.fast.finish_run(run_id, now)
        else:
            with self.engine.begin() as conn:
                finished = self._succeed_run(conn, run_id, now)
        if finished:
            return ClaimOutcome.CLAIMED
        run = self._read(lambda conn: conn.execute(select(r.status, r.cancel_requested).where(r.id == run_id)).first())
        if run is not None and run.status == RunStatus.RUNNING.value and run.cancel_requested:
            return ClaimOutcome.CANCELLED
        return ClaimOutcome.GONE

    # ---------------------------------------------------------------- the backward path

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
        def read(conn):
            status = conn.execute(select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar()
            return self._to_compensate(conn, run_id, in_progress=True) if status == RunStatus.COMPENSATING.value else None

        return self._read(read)

    def claim_compensation(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str],
                           lease_seconds: float) -> Claim:
        now = utcnow()
        lease = now + dt.timedelta(seconds=lease_seconds)
        if self.fast:
            row = self.fast.claim_compensation(run_id, idx, token, earlier_tokens, lease, now)
            if row is None or row.status != RunStatus.COMPENSATING.value:
                return Claim(ClaimOutcome.GONE)
            if row.compensation_attempts is None:
                return self._claim_lost(row.step_status, None, row.compensation_error, StepStatus.COMPENSATED,
                                        StepStatus.COMPENSATION_FAILED)
            return Claim(ClaimOutcome.CLAIMED, attempt=row.compensation_attempts,
                         round_attempt=row.compensation_round_attempts, input=row.input, result=row.result)
        s = t.steps.c
        with self.engine.begin() as conn:
            run = conn.execute(select(t.runs.c.status, t.runs.c.input).where(t.runs.c.id == run_id)).first()
            if run is None or run.status != RunStatus.COMPENSATING.value:
                return Claim(ClaimOutcome.GONE)
            claimed = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx,
                       or_(self._claimable(StepStatus.SUCCEEDED, StepStatus.COMPENSATING, token, earlier_tokens,
                                           now),
                           _FAILED_NON_ATOMIC))  # step flags: a non-atomic step undoes its partial work
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
        status, error = current if current is not None else (None, None)
        return self._claim_lost(status, None, error, StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED)

    def complete_compensation(self, run_id: str, idx: int, token: str) -> str | None:
        """Record the undo; the last undo still to do also ends the run (``compensated``, or ``cancelled``
        when a cancel started the compensation). Returns the run's status after, or None when this delivery
        no longer holds the compensation."""
        now = utcnow()
        if self.fast:
            return self.fast.complete_compensation(run_id, idx, token, now)
        s = t.steps.c
        with self.engine.begin() as conn:
            held = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.COMPENSATING.value,
                       s.claim == token)
                .values(status=StepStatus.COMPENSATED.value, compensation_error=None, compensated_at=now,
                        lease_expires_at=None)
                .returning(s.name)
            ).first()
            if held is None:
                return None
            self._event(conn, run_id, "compensation_succeeded", held.name, None, now)
            self._lock_run(conn, run_id)  # a late branch's undo may end at the same time (parallel groups)
            if not self._to_compensate(conn, run_id, in_progress=True):
                self._finish_compensation(conn, run_id, now)
            else:
                self._touch(conn, run_id, now)
            return conn.execute(select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar()

    def retry_compensation(self, run_id: str, idx: int, token: str, error: str, delay: float,
                           lease_seconds: float) -> bool:
        if self.fast:
            return self._fast_retry("compensation_retried", run_id, idx, token, error, delay, lease_seconds)
        return self._note_retry(run_id, idx, token, error, delay, lease_seconds, StepStatus.COMPENSATING,
                                "compensation_retried", "compensation_attempts")

    def fail_compensation(self, run_id: str, idx: int, token: str, error: str) -> bool:
        if self.fast:
            return self.fast.update_held("compensation_failed", run_id, idx, token, utcnow(), error=error)
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
        a start whose publish failed). A step's success moves no run column (one row write less on the hot
        path), so "moved" is the run's updated_at or its latest step's finished_at."""
        r, s = t.runs.c, t.steps.c
        held = (s.run_id == r.id) & s.status.in_(_HELD_STEP)
        quiet_since = now - dt.timedelta(seconds=stall_timeout)
        return and_(
            r.status.in_(_IN_PROGRESS_RUN),
            r.mode == "saga",  # a plain run (policy) has no steps to re-drive: plain Celery semantics
            ~exists().where(held, s.lease_expires_at >= now),
            or_(exists().where(held, s.lease_expires_at < now),
                and_(r.updated_at < quiet_since,
                     ~exists().where(s.run_id == r.id, s.finished_at >= quiet_since))),
        )

    def stalled_runs(self, stall_timeout: float, limit: int = 500) -> list[tuple[str, dt.datetime]]:
        """(run id, updated_at) of the stalled runs, longest stalled first."""
        r = t.runs.c
        rows = self._read(lambda conn: conn.execute(
            select(r.id, r.updated_at).where(self._stalled(utcnow(), stall_timeout)).order_by(r.updated_at).limit(limit)
        ).all())
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
            if run.status == RunStatus.COMPENSATING.value:
                self._settle_lost_branches(conn, run_id, now)
            steps = conn.execute(
                select(s.idx, s.name, s.status, s.result, s.has_compensation, s.non_atomic)
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
                    and (st.status in (StepStatus.SUCCEEDED.value, StepStatus.COMPENSATING.value)
                         or (st.non_atomic and st.status == StepStatus.FAILED.value))]
            return Recovery(action="compensate", indexes=tuple(todo), **base)
        # A best-effort step that failed counts as done: the run went on without its result.
        done = (StepStatus.SUCCEEDED.value, StepStatus.SKIPPED.value, StepStatus.FAILED_BEST_EFFORT.value)
        frontier = next((st for st in steps if st.status not in done), None)
        results = {st.name: st.result for st in steps
                   if st.status in (StepStatus.SUCCEEDED.value, StepStatus.FAILED_BEST_EFFORT.value)}
        if frontier is None:
            return Recovery(action="finish", index=len(steps), results=results, **base)
        if frontier.status == StepStatus.FAILED.value:
            return Recovery(action="errback", index=frontier.idx, **base)
        if frontier.status == StepStatus.WAITING.value:  # a gate or child step: its signal or child moves it
            return Recovery(action="wait", index=frontier.idx, **base)
        return Recovery(action="resume", index=frontier.idx, results=results, **base)

    # ---------------------------------------------------------------- parallel branches
    #
    # The branches of a group run as separate messages (compiler.Fanout) and meet only here, in SQL. Each
    # decision a branch makes about its group or the run (the join, "a sibling already failed", "the run is
    # compensating: undo me too", "nothing is left: the compensation ends") is made with the run row locked
    # (_lock_run), so two branches, or a branch and the last undo, decide one after the other, each seeing
    # what the other committed. Claims, retries and undos of branches use the ordinary transitions above.
    #
    # Compensation order: the group's branches are undone before the steps before the group. When the
    # compensation begins while a branch still runs, the undos of the earlier steps wait (hold_back) until
    # every branch of the group ended and every undo of the group is done; the transition that makes this
    # true hands them out (BranchOutcome.release, release_held_undos).

    def complete_branch(self, run_id: str, idx: int, token: str, result: Any) -> BranchOutcome | None:
        """Record a branch's result and, in the same transaction, decide what follows (BranchOutcome).
        Exactly one branch of a group sees every member done: it joins the group (event group_joined) and
        is the only one told to publish what follows. None when this delivery no longer holds the step."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = self._lock_run(conn, run_id)
            if run is None:
                return None
            held = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.RUNNING.value, s.claim == token)
                .values(status=StepStatus.SUCCEEDED.value, result=result, error=None, finished_at=now,
                        lease_expires_at=None)
                .returning(s.name, s.attempts, s.branch_group, s.has_compensation)
            ).first()
            if held is None:
                return None
            live = run.status in _LIVE_RUN
            self._event(conn, run_id, "step_succeeded", held.name,
                        {"attempt": held.attempts, **({} if live else {"late": True, "run_status": run.status})},
                        now)
            self._touch(conn, run_id, now)
            return self._branch_decision(conn, run_id, run, idx, held.name, held.branch_group, now)

    def join_after_best_effort(self, run_id: str, idx: int) -> BranchOutcome | None:
        """A best-effort branch gave up and was recorded ``failed_best_effort`` (fail_best_effort,
        best_effort_lost): it counts as done for its group. Decide what follows as complete_branch does.
        None when the step is no such branch."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = self._lock_run(conn, run_id)
            step = conn.execute(select(s.name, s.status, s.branch_group).where(s.run_id == run_id, s.idx == idx)).first()
            if run is None or step is None or step.branch_group is None \
                    or step.status != StepStatus.FAILED_BEST_EFFORT.value:
                return None
            return self._branch_decision(conn, run_id, run, idx, step.name, step.branch_group, now)

    def _branch_decision(self, conn, run_id: str, run, idx: int, name: str, group: int,
                         now: dt.datetime) -> BranchOutcome:
        """Under the run lock, a branch just ended as done (succeeded, or failed_best_effort): what follows."""
        s, e = t.steps.c, t.events.c
        if run.status == RunStatus.COMPENSATING.value:
            # A sibling failed (or a cancel came in) while this branch ran: undo it too. Its own task
            # publishes the undo; without one, this may have been the last thing the run waited for.
            return self._late_end(conn, run_id, idx, run.status, "late", now)
        if run.status not in _LIVE_RUN:
            return BranchOutcome("recorded")  # compensation_failed: the operator's retry undoes it
        if run.cancel_requested:
            return BranchOutcome("cancelled")
        members = conn.execute(select(s.idx, s.name, s.status).where(s.run_id == run_id, s.branch_group == group)).all()
        if any(m.status not in _BRANCH_DONE for m in members):
            return BranchOutcome("waiting")
        joined = conn.execute(  # a best-effort branch's end is recorded before it decides: join once
            select(e.id).where(e.run_id == run_id, e.kind == "group_joined", e.step.in_([m.name for m in members]))
            .limit(1)
        ).first()
        if joined is not None:
            return BranchOutcome("waiting")
        self._event(conn, run_id, "group_joined", name, {"group": group}, now)
        next_index = max(m.idx for m in members) + 1
        total = conn.execute(select(func.count()).select_from(t.steps).where(s.run_id == run_id)).scalar_one()
        if next_index < total:
            return BranchOutcome("joined", next_index=next_index, results=self._results(conn, run_id))
        self._succeed_run(conn, run_id, now, unless_cancelled=False)
        return BranchOutcome("finished")

    def fail_branch(self, run_id: str, idx: int, token: str, error: str) -> BranchOutcome | None:
        """Record a branch's failure for good. Decides "errback" when its errback must begin the
        compensation; "quiet" when someone else already did or will (the run is compensating, or a sibling
        failed first and its errback is on its way): one errback per group failure. A late failure may end
        the compensation, or release the undos that waited. None when this delivery no longer holds the
        step."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = self._lock_run(conn, run_id)
            if run is None:
                return None
            held = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.RUNNING.value, s.claim == token)
                .values(status=StepStatus.FAILED.value, error=error, finished_at=now, lease_expires_at=None)
                .returning(s.name, s.branch_group)
            ).first()
            if held is None:
                return None
            live = run.status in _LIVE_RUN
            self._event(conn, run_id, "step_failed", held.name,
                        {"error": error, **({} if live else {"late": True, "run_status": run.status})}, now)
            self._touch(conn, run_id, now)
            if not live:  # a non-atomic branch's own undo runs too (compensate)
                return self._late_end(conn, run_id, idx, run.status, "quiet", now)
            sibling_failed = conn.execute(
                select(s.idx).where(s.run_id == run_id, s.branch_group == held.branch_group, s.idx != idx,
                                    s.status == StepStatus.FAILED.value).limit(1)
            ).first()
            return BranchOutcome("quiet" if sibling_failed is not None else "errback")

    def stop_branch(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str]) -> BranchOutcome | None:
        """A branch's retry (or redelivery) found the run no longer live: the run began compensating while
        the branch waited to run again. Record the branch as failed (it never succeeded, so nothing of it is
        undone) and end the compensation, or release the undos that waited, if it was the last thing the run
        waited for. Only a delivery that could have claimed the step acts (a duplicate of a live holder
        changes nothing: None)."""
        now = utcnow()
        s = t.steps.c
        reason = "stopped: the run began compensating while the branch waited to run again"
        with self.engine.begin() as conn:
            run = self._lock_run(conn, run_id)
            if run is None or run.status in _LIVE_RUN:
                return None
            stopped = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.branch_group.is_not(None),
                       s.status == StepStatus.RUNNING.value,
                       self._claimable(StepStatus.PENDING, StepStatus.RUNNING, token, earlier_tokens, now))
                .values(status=StepStatus.FAILED.value, error=reason, finished_at=now, lease_expires_at=None)
                .returning(s.name)
            ).first()
            if stopped is None:
                return None
            self._event(conn, run_id, "step_failed", stopped.name,
                        {"error": reason, "late": True, "run_status": run.status}, now)
            return self._late_end(conn, run_id, idx, run.status, "stopped", now)

    def settle_lost_branch(self, run_id: str, idx: int, lost_error: str) -> BranchOutcome | None:
        """The errback of a branch that ended after the run began compensating, without recording its own
        outcome (its process was lost, or killed at its hard time limit): record it as failed and end the
        compensation, or release the undos that waited, if it was the last thing the run waited for. None
        (changing nothing) when the run is still live or the step is no running branch: the caller goes on
        as for any errback."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = self._lock_run(conn, run_id)
            if run is None or run.status in _LIVE_RUN:
                return None
            lost = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.branch_group.is_not(None),
                       s.status == StepStatus.RUNNING.value)
                .values(status=StepStatus.FAILED.value, error=lost_error, finished_at=now, lease_expires_at=None)
                .returning(s.name)
            ).first()
            if lost is None:
                return None
            self._event(conn, run_id, "step_failed", lost.name,
                        {"error": lost_error, "late": True, "run_status": run.status}, now)
            return self._late_end(conn, run_id, idx, run.status, "lost", now)

    def _settle_lost_branches(self, conn, run_id: str, now: dt.datetime) -> None:
        """Recovery of a compensating run: a branch still marked running whose claim was taken back (its
        holder died; take_over_stalled) can no longer record anything: it failed (lost)."""
        s = t.steps.c
        lost = conn.execute(
            update(t.steps)
            .where(s.run_id == run_id, s.branch_group.is_not(None), s.status == StepStatus.RUNNING.value,
                   s.claim.is_(None))
            .values(status=StepStatus.FAILED.value, error=LOST_BRANCH, finished_at=now, lease_expires_at=None)
            .returning(s.name)
        ).all()
        for row in lost:
            self._event(conn, run_id, "step_failed", row.name, {"error": LOST_BRANCH, "late": True}, now)

    def hold_back(self, run_id: str, todo: list[int]) -> list[int]:
        """Of ``todo`` (undos about to be published, latest first), those to publish now. While a branch of
        the group the run stopped in still runs, or a late branch's own undo is still to come, the steps
        before that group wait: the transition that settles the group releases them (BranchOutcome.release,
        release_held_undos). The event undos_held records that they wait, undos_released that they went."""
        s = t.steps.c
        now = utcnow()
        with self.engine.begin() as conn:
            self._lock_run(conn, run_id)
            group = self._open_group(conn, run_id)
            if group is None:
                return todo
            members = conn.execute(
                select(s.idx, s.status).where(s.run_id == run_id, s.branch_group == group)
            ).all()
            undos = self._to_compensate(conn, run_id, in_progress=True)
            waiting = any(m.status == StepStatus.RUNNING.value or (m.idx in undos and m.idx not in todo)
                          for m in members)
            now_todo = [i for i in todo if i >= group] if waiting else todo
            if now_todo != todo:
                self._event(conn, run_id, "undos_held", None,
                            {"steps": [i for i in todo if i < group], "until": "the parallel group settles"}, now)
        return now_todo

    def release_held_undos(self, run_id: str) -> list[int]:
        """After an undo of a group's branch: the undos that waited for the group (hold_back), latest first,
        if the group is settled now; else nothing."""
        with self.engine.begin() as conn:
            run = self._lock_run(conn, run_id)
            if run is None or run.status != RunStatus.COMPENSATING.value:
                return []
            return self._held_undos(conn, run_id, utcnow())

    def _open_group(self, conn, run_id: str) -> int | None:
        """The group the run stopped in: the group of the latest step that started, if that is a branch."""
        s = t.steps.c
        latest = conn.execute(
            select(s.branch_group)
            .where(s.run_id == run_id, s.status.not_in([StepStatus.PENDING.value, StepStatus.SKIPPED.value]))
            .order_by(s.idx.desc()).limit(1)
        ).first()
        return latest.branch_group if latest is not None else None

    def _held_undos(self, conn, run_id: str, now: dt.datetime) -> list[int]:
        """Under the run lock: if undos wait for the open group (hold_back) and now no branch of the group
        runs and none of its undos is left, those still to do (recorded as undos_released: handed out once)."""
        s, e = t.steps.c, t.events.c
        group = self._open_group(conn, run_id)
        if group is None:
            return []
        last = conn.execute(
            select(e.kind).where(e.run_id == run_id, e.kind.in_(["undos_held", "undos_released"]))
            .order_by(e.id.desc()).limit(1)
        ).scalar()
        if last != "undos_held":
            return []
        members = conn.execute(select(s.idx, s.status).where(s.run_id == run_id, s.branch_group == group)).all()
        undos = self._to_compensate(conn, run_id, in_progress=True)
        if any(m.status == StepStatus.RUNNING.value or m.idx in undos for m in members):
            return []
        before = [i for i in undos if i < group]
        self._event(conn, run_id, "undos_released", None, {"steps": before}, now)
        return before

    def _late_end(self, conn, run_id: str, idx: int, run_status: str, decision: str,
                  now: dt.datetime) -> BranchOutcome:
        """A branch ended after the run left ``running`` (under the run lock): if it has an undo to do (it
        succeeded, or a non-atomic branch failed), its own task publishes that; else it may settle its group
        (release the undos that waited) or end the compensation."""
        if run_status == RunStatus.COMPENSATING.value and idx in self._to_compensate(conn, run_id):
            return BranchOutcome(decision, compensate=True)
        return BranchOutcome(decision, release=self._settle_compensation(conn, run_id, run_status, now))

    def _settle_compensation(self, conn, run_id: str, run_status: str, now: dt.datetime) -> tuple[int, ...]:
        """A late branch ended (under the run lock): release the undos that waited for its group, or end
        the compensation when nothing is left."""
        if run_status != RunStatus.COMPENSATING.value:
            return ()
        held = self._held_undos(conn, run_id, now)
        if held:
            return tuple(held)
        if not self._to_compensate(conn, run_id, in_progress=True):
            self._finish_compensation(conn, run_id, now)
        return ()

    def _branches_unsettled(self, conn, run_id: str) -> bool:
        """For a run with parallel groups, whether its compensation must stay open: a branch still runs (it
        will record its outcome and, if it succeeded, publish its own undo), or an undo is still to do (a
        late branch succeeded after the caller looked). Locks the run row first, so the last undo and a late
        branch decide one after the other. False at once for a run without groups."""
        s = t.steps.c
        if conn.execute(select(s.idx).where(s.run_id == run_id, s.branch_group.is_not(None)).limit(1)).first() is None:
            return False
        self._lock_run(conn, run_id)
        running = conn.execute(
            select(s.idx).where(s.run_id == run_id, s.branch_group.is_not(None),
                                s.status == StepStatus.RUNNING.value).limit(1)
        ).first()
        return running is not None or bool(self._to_compensate(conn, run_id, in_progress=True))

    @staticmethod
    def _lock_run(conn, run_id: str):
        """The run's status and cancel flag, with its row locked until the transaction ends (PostgreSQL:
        SELECT ... FOR UPDATE; SQLite renders no FOR UPDATE, its transactions are serialized already by
        BEGIN IMMEDIATE). None for an unknown run."""
        r = t.runs.c
        return conn.execute(select(r.status, r.cancel_requested).where(r.id == run_id).with_for_update()).first()

    # ---------------------------------------------------------------- operator requests

    def request_cancel(self, run_id: str) -> Run:
        now = utcnow()
        with self.engine.begin() as conn:
            self._refuse_cancel(conn, run_id)  # step flags and policy: past the pivot, or a plain run
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
            self._event(conn, run_id, "retry_requested", None, None, now)
            todo = self._to_compensate(conn, run_id)
            if not todo:
                self._finish_compensation(conn, run_id, now)
        return todo

    # ---------------------------------------------------------------- step flags and plain runs (issue 5, A)
    #
    # Best-effort, non-atomic and pivot steps (definition.Step) and the runs policy switched to a plain chain
    # (sagaflow/policy.py). Only sagas with such steps take these paths, always on the transactional store
    # (runtime.store_for): the linear fast path never sees them.

    def fail_best_effort(self, run_id: str, idx: int, token: str, error: str, finish: bool = False) -> str | None:
        """A best-effort step gave up: ``failed_best_effort``, and the run goes on without its result. With
        ``finish`` (the last step) the run ends ``succeeded`` in the same transaction, unless a cancel came
        in (it stays running: the caller compensates). Returns the run's status after, or None when this
        delivery no longer holds the step."""
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            held = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.RUNNING.value, s.claim == token)
                .values(status=StepStatus.FAILED_BEST_EFFORT.value, result=None, error=error, finished_at=now,
                        lease_expires_at=None)
                .returning(s.name, s.attempts)
            ).first()
            if held is None:
                return None
            self._event(conn, run_id, "step_failed_best_effort", held.name,
                        {"attempt": held.attempts, "error": error}, now)
            if finish and self._succeed_run(conn, run_id, now):
                return RunStatus.SUCCEEDED.value
            self._touch(conn, run_id, now)
            return conn.execute(select(r.status).where(r.id == run_id)).scalar()

    def best_effort_lost(self, run_id: str, idx: int, lost_error: str) -> tuple[str, dict | None] | None:
        """The errback of a best-effort step whose worker was lost (hard time limit, dead process): record
        ``failed_best_effort`` and return ("resume", results so far) so the caller publishes the next step.
        ("done", None): a duplicate errback, the step already ended. None: not this case (a cancel, or the run
        is not live): the caller compensates as usual."""
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            run = conn.execute(select(r.status, r.cancel_requested).where(r.id == run_id)).first()
            if run is None or run.status not in _LIVE_RUN or run.cancel_requested:
                return None
            lost = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.best_effort.is_(True),
                       s.status == StepStatus.RUNNING.value)
                .values(status=StepStatus.FAILED_BEST_EFFORT.value, result=None, error=lost_error, finished_at=now,
                        lease_expires_at=None, claim=None)
                .returning(s.name)
            ).first()
            if lost is not None:
                self._event(conn, run_id, "step_failed_best_effort", lost.name, {"error": lost_error}, now)
                self._touch(conn, run_id, now)
                return "resume", self._results(conn, run_id)
            status = conn.execute(select(s.status).where(s.run_id == run_id, s.idx == idx)).scalar()
        if status in (StepStatus.FAILED_BEST_EFFORT.value, StepStatus.SUCCEEDED.value):
            return "done", None
        return None

    def stop_past_pivot(self, run_id: str, failed_idx: int, lost_error: str) -> bool | None:
        """The errback of a step that failed for good. None when the run's pivot has not succeeded (or it has
        none): the caller compensates as usual. Past the pivot the saga can no longer be undone: the run goes
        ``stuck`` (waits for an operator, nothing compensated, later steps stay pending) and this returns
        True; False when another errback got there first."""
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            pivot = self._past_pivot(conn, run_id)
            if pivot is None:
                return None
            if not self._set_run_status(conn, run_id, _LIVE_RUN, RunStatus.STUCK, now, finished_at=now):
                return False
            lost = conn.execute(  # its worker was lost before it could record an error
                update(t.steps)
                .where(s.run_id == run_id, s.idx == failed_idx, s.status == StepStatus.RUNNING.value)
                .values(status=StepStatus.FAILED.value, error=lost_error, finished_at=now, lease_expires_at=None)
                .returning(s.name)
            ).first()
            if lost is not None:
                self._event(conn, run_id, "step_failed", lost.name, {"error": lost_error}, now)
            step = conn.execute(select(s.name, s.error).where(s.run_id == run_id, s.idx == failed_idx)).first()
            if step is not None:
                error = f"step {step.name!r} failed after the pivot {pivot!r} succeeded: {step.error}"
            else:
                error = f"the run could not finish after the pivot {pivot!r} succeeded"
            conn.execute(update(t.runs).where(r.id == run_id).values(error=error))
            self._event(conn, run_id, "run_stuck", step.name if step is not None else None,
                        {"error": error, "pivot": pivot}, now)
        return True

    def finish_past_pivot(self, run_id: str) -> str | None:
        """The last step completed, but a cancel came in first: past the pivot the cancel is overruled and
        the run ends ``succeeded``. Returns the run's status after; None when the run is not past its pivot
        (the caller compensates, as for any cancel)."""
        now = utcnow()
        r = t.runs.c
        with self.engine.begin() as conn:
            if not self._overrule_cancel_past_pivot(conn, run_id, now):
                return None
            self._succeed_run(conn, run_id, now, unless_cancelled=False)
            return conn.execute(select(r.status).where(r.id == run_id)).scalar()

    def request_forward_retry(self, run_id: str) -> tuple[int, dict] | None:
        """stuck -> running: the failed step goes back to pending (its attempt count keeps growing; its retry
        policy starts a new round). Returns (the index to resume from, the results before it), or None when
        the run is not stuck (the caller tries the other kinds of retry)."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            if not self._set_run_status(conn, run_id, RunStatus.STUCK, RunStatus.RUNNING, now, error=None,
                                        finished_at=None):
                return None
            reset = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.status == StepStatus.FAILED.value)
                .values(status=StepStatus.PENDING.value, claim=None, lease_expires_at=None, finished_at=None)
                .returning(s.idx, s.name)
            ).all()
            first = min(reset, default=None, key=lambda row: row.idx)
            self._event(conn, run_id, "retry_requested", first.name if first is not None else None,
                        {"forward": True}, now)
            rows = conn.execute(select(s.idx, s.status).where(s.run_id == run_id).order_by(s.idx)).all()
            done = (StepStatus.SUCCEEDED.value, StepStatus.SKIPPED.value, StepStatus.FAILED_BEST_EFFORT.value)
            frontier = next((row.idx for row in rows if row.status not in done), len(rows))
            return frontier, self._results(conn, run_id)

    def finish_plain_run(self, run_id: str) -> bool:
        """The last step of a plain run (policy: compensation off) succeeded: one UPDATE of the run row."""
        return self._end_plain_run(run_id, RunStatus.SUCCEEDED, None)

    def fail_plain_run(self, run_id: str, error: str) -> bool:
        """A step of a plain run failed for good (or its worker was lost): the run is ``failed``, nothing is
        undone. One UPDATE of the run row; False when the run already ended (a duplicate errback)."""
        return self._end_plain_run(run_id, RunStatus.FAILED, error)

    def _end_plain_run(self, run_id: str, final: RunStatus, error: str | None) -> bool:
        now = utcnow()
        r = t.runs.c
        # On PostgreSQL the autocommit engine: one statement, one round trip (no BEGIN, COMMIT, pre-ping).
        with (self.autocommit or self.engine).begin() as conn:
            return bool(conn.execute(
                update(t.runs)
                .where(r.id == run_id, r.mode == "plain", r.status.in_(_LIVE_RUN))
                .values(status=final.value, error=error, updated_at=now, finished_at=now)
            ).rowcount)

    def _create_plain_run(self, run_id: str, saga: str, version: int, input: dict,
                          idempotency_key: str | None) -> tuple[Run, bool]:
        """create_run(mode="plain"): the run row alone, one INSERT (autocommit on PostgreSQL)."""
        now = utcnow()
        try:
            with (self.autocommit or self.engine).begin() as conn:
                conn.execute(insert(t.runs).values(
                    id=run_id, saga=saga, saga_version=version, status=RunStatus.PENDING.value, input=input,
                    idempotency_key=idempotency_key, cancel_requested=False, created_at=now, updated_at=now,
                    mode="plain"))
        except IntegrityError:
            if idempotency_key is None:
                raise
            return self._existing(idempotency_key), False
        return self._new_run(run_id, saga, version, input, idempotency_key, [], now, None, mode="plain"), True

    def _results(self, conn, run_id: str) -> dict:
        """The results so far, by step name, as the chain would carry them (a best-effort failure: None)."""
        s = t.steps.c
        rows = conn.execute(
            select(s.name, s.result)
            .where(s.run_id == run_id,
                   s.status.in_([StepStatus.SUCCEEDED.value, StepStatus.FAILED_BEST_EFFORT.value]))
            .order_by(s.idx)
        )
        return {row.name: row.result for row in rows}

    @staticmethod
    def _past_pivot(conn, run_id: str) -> str | None:
        """The name of the run's pivot step if it succeeded: from then on the run can no longer be undone."""
        s = t.steps.c
        return conn.execute(
            select(s.name).where(s.run_id == run_id, s.pivot.is_(True), s.status == StepStatus.SUCCEEDED.value)
            .limit(1)
        ).scalar()

    def _overrule_cancel_past_pivot(self, conn, run_id: str, now: dt.datetime) -> bool:
        """A cancel requested while the pivot ran (accepted then) is noticed after the pivot succeeded: it can
        no longer be honoured without leaving the saga half undone, so it is cleared and recorded
        (``cancel_overruled``), and the run goes forward. True when the run is past its pivot."""
        pivot = self._past_pivot(conn, run_id)
        if pivot is None:
            return False
        r = t.runs.c
        if conn.execute(update(t.runs).where(r.id == run_id, r.cancel_requested.is_(True))
                        .values(cancel_requested=False, updated_at=now)).rowcount:
            self._event(conn, run_id, "cancel_overruled", None,
                        {"pivot": pivot, "reason": f"the pivot {pivot!r} succeeded before the cancel took effect: "
                                                   f"the run can no longer be undone and goes forward"}, now)
        return True

    def _refuse_cancel(self, conn, run_id: str) -> None:
        """Raise InvalidTransition (nothing written) for a live run that cannot be cancelled: a plain run
        (policy), or one past its pivot."""
        run = conn.execute(select(t.runs.c.status, t.runs.c.mode, t.runs.c.saga)
                           .where(t.runs.c.id == run_id)).first()
        if run is None or run.status not in _LIVE_RUN:
            return
        if run.mode == "plain":
            raise InvalidTransition(f"run {run_id} runs as a plain Celery chain (compensation is off by policy "
                                    f"for saga {run.saga!r}): it cannot be cancelled")
        pivot = self._past_pivot(conn, run_id)
        if pivot is not None:
            raise InvalidTransition(f"run {run_id} is past its pivot step {pivot!r}, which succeeded: it can no "
                                    f"longer be undone, so it cannot be cancelled; it goes forward (to "
                                    f"succeeded, or stuck for an operator)")

    @staticmethod
    def _round_attempt(conn, run_id: str, step: str, attempts: int) -> int:
        """The step's executions since the last operator retry (what its retry policy counts): a step that
        an operator sent forward again (request_forward_retry) starts a new round; its attempts keep growing."""
        if attempts <= 1:
            return attempts
        e = t.events.c
        last_retry = (select(func.max(e.id)).where(e.run_id == run_id, e.kind == "retry_requested")
                      .scalar_subquery())
        count = conn.execute(
            select(func.count()).select_from(t.events)
            .where(e.run_id == run_id, e.kind == "step_started", e.step == step,
                   e.id > func.coalesce(last_retry, 0))
        ).scalar()
        return min(attempts, count or attempts)

    # ---------------------------------------------------------------- waits: gates, signals, child runs
    # sagaflow/waits.py drives these. Every transaction locks the run row first (SELECT ... FOR UPDATE on
    # PostgreSQL; on SQLite every transaction is BEGIN IMMEDIATE, serialized anyway), so a gate that begins
    # to wait and a signal that arrives at that moment, or a child that ends while its parent is cancelled,
    # never miss each other. Lock order: a parent run before its child.

    @staticmethod
    def _lock_wait_run(conn, run_id: str):
        """The run row, locked (SELECT ... FOR UPDATE), with what the waits transitions read of it."""
        r = t.runs.c
        return conn.execute(
            select(r.id, r.status, r.cancel_requested, r.saga, r.saga_version, r.input, r.error,
                   r.parent_run_id, r.parent_step)
            .where(r.id == run_id).with_for_update()
        ).first()

    @staticmethod
    def _last_index(conn, run_id: str) -> int:
        return conn.execute(select(func.max(t.steps.c.idx)).where(t.steps.c.run_id == run_id)).scalar()

    @staticmethod
    def _move_step(conn, run_id: str, idx: int, expected: StepStatus, token: str | None = None, **values) -> bool:
        """Compare-and-set on one step: from ``expected`` (held by ``token``, when given) to ``values``."""
        s = t.steps.c
        guard = [s.run_id == run_id, s.idx == idx, s.status == expected.value]
        if token is not None:
            guard.append(s.claim == token)
        return bool(conn.execute(update(t.steps).where(*guard).values(**values)).rowcount)

    def _fail_held_step(self, conn, run_id: str, idx: int, token: str, error: str, now) -> bool:
        s = t.steps.c
        row = conn.execute(
            update(t.steps)
            .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.RUNNING.value, s.claim == token)
            .values(status=StepStatus.FAILED.value, error=error, finished_at=now, lease_expires_at=None)
            .returning(s.name)
        ).first()
        if row is not None:
            self._event(conn, run_id, "step_failed", row.name, {"error": error}, now)
        return row is not None

    def _pass_step(self, conn, run, idx: int, name: str, result: Any, detail: dict, now,
                   from_status: StepStatus) -> WaitOutcome:
        """A gate or child step succeeded with ``result``: finish the run if it was the last step (unless a
        cancel came in: then the errback compensates everything, this step included), else hand back the
        chain to publish from the next step. The caller moved the step; the run leaves running/waiting."""
        self._event(conn, run.id, "step_succeeded", name, detail, now)
        base = dict(run_id=run.id, saga=run.saga, version=run.saga_version, index=idx)
        live = (RunStatus.RUNNING.value, RunStatus.WAITING.value)
        if idx == self._last_index(conn, run.id):
            if not run.cancel_requested and self._succeed_run(conn, run.id, now, expected=live,
                                                              unless_cancelled=False):
                return WaitOutcome("finished", status=RunStatus.SUCCEEDED.value, result=result, **base)
            self._set_run_status(conn, run.id, live, RunStatus.RUNNING, now)
            return WaitOutcome("errback", result=result, error="cancelled before the run finished", **base)
        if from_status is StepStatus.WAITING:
            self._set_run_status(conn, run.id, RunStatus.WAITING, RunStatus.RUNNING, now)
        else:
            self._touch(conn, run.id, now)
        return WaitOutcome("continue", result=result, results=self._results(conn, run.id), **base)

    def wait_for_signal(self, run_id: str, idx: int, token: str, timeout: float) -> WaitOutcome:
        """The gate ``idx`` (held by ``token``) is reached. Its signal already delivered: the step succeeds
        with the payload as its result. Else the step waits (deadline: now + ``timeout``) and so does the
        run, holding no worker and no lease. A cancel that came in since the claim fails the step."""
        now = utcnow()
        s, sig = t.steps.c, t.signals.c
        with self.engine.begin() as conn:
            run = self._lock_wait_run(conn, run_id)
            step = conn.execute(select(s.name, s.status, s.claim, s.signal)
                                .where(s.run_id == run_id, s.idx == idx)).first()
            base = dict(run_id=run_id, saga=run.saga, version=run.saga_version, index=idx) if run else {}
            if run is None or step is None or step.status != StepStatus.RUNNING.value or step.claim != token \
                    or run.status != RunStatus.RUNNING.value:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            if run.cancel_requested:
                self._fail_held_step(conn, run_id, idx, token, f"cancelled at the gate for signal {step.signal!r}",
                                     now)
                return WaitOutcome("cancelled", **base)
            payload = conn.execute(select(sig.payload, sig.received_at)
                                   .where(sig.run_id == run_id, sig.name == step.signal)).first()
            if payload is not None:
                if not self._move_step(conn, run_id, idx, StepStatus.RUNNING, token,
                                       status=StepStatus.SUCCEEDED.value, result=payload.payload, error=None,
                                       finished_at=now, lease_expires_at=None, claim=None):
                    return WaitOutcome("lost", run_id=run_id, index=idx)
                return self._pass_step(conn, run, idx, step.name, payload.payload,
                                       {"signal": step.signal, "received_before_the_gate": True}, now,
                                       StepStatus.RUNNING)
            deadline = now + dt.timedelta(seconds=timeout)
            if not self._move_step(conn, run_id, idx, StepStatus.RUNNING, token, status=StepStatus.WAITING.value,
                                   deadline_at=deadline, claim=None, lease_expires_at=None):
                return WaitOutcome("lost", run_id=run_id, index=idx)
            self._set_run_status(conn, run_id, RunStatus.RUNNING, RunStatus.WAITING, now)
            self._event(conn, run_id, "run_waiting", step.name,
                        {"signal": step.signal, "deadline": deadline.isoformat()}, now)
        return WaitOutcome("waiting", **base)

    def deliver_signal(self, run_id: str, name: str, payload: Any) -> WaitOutcome:
        """Record signal ``name`` for the run, once; if a gate waits for it, pass the gate (its result: the
        payload) and hand back what to publish. Refused, changing nothing: an unknown run (UnknownRun); a
        final run, a saga with no gate for ``name``, a signal already delivered (InvalidTransition)."""
        now = utcnow()
        s, sig = t.steps.c, t.signals.c
        with self.engine.begin() as conn:
            run = self._lock_wait_run(conn, run_id)
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
            self._event(conn, run_id, "signal_received", waiting.name if waiting else None,
                        {"signal": name, "gate_waiting": waiting is not None}, now)
            base = dict(run_id=run_id, saga=run.saga, version=run.saga_version)
            if waiting is None or run.status != RunStatus.WAITING.value:
                self._touch(conn, run_id, now)
                return WaitOutcome("none", **base)  # kept: the gate takes it when the run gets there
            passed = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == waiting.idx, s.status == StepStatus.WAITING.value)
                .values(status=StepStatus.SUCCEEDED.value, result=payload, error=None, finished_at=now)
            ).rowcount
            if not passed:
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
            run = self._lock_wait_run(conn, run_id)
            if run is None or run.status != RunStatus.WAITING.value:
                return None
            row = conn.execute(
                update(t.steps)
                .where(s.run_id == run_id, s.idx == idx, s.kind == "gate", s.status == StepStatus.WAITING.value,
                       s.deadline_at < now)
                .values(status=StepStatus.FAILED.value, error=error, finished_at=now)
                .returning(s.name)
            ).first()
            if row is None:
                return None
            self._event(conn, run_id, "step_failed", row.name, {"error": error}, now)
            self._set_run_status(conn, run_id, RunStatus.WAITING, RunStatus.RUNNING, now)
        return WaitOutcome("errback", run_id=run_id, saga=run.saga, version=run.saga_version, index=idx, error=error)

    def start_child(self, run_id: str, idx: int, token: str, child_id: str, child_saga: str, child_version: int,
                    child_input: dict, steps: Iterable[StepSpec]) -> WaitOutcome:
        """The child step ``idx`` (held by ``token``) is reached: record the child run (idempotency key
        ``child:<run_id>:<step name>``, so a redelivery never makes two) and its link, the step and the run
        wait. The caller publishes the child's chain (``child_run_id``); if that publish is lost, the child
        stays pending and the recovery sweeper starts it. A cancel that came in since the claim fails the
        step instead, and no child is created."""
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        steps = list(steps)
        with self.engine.begin() as conn:
            run = self._lock_wait_run(conn, run_id)
            step = conn.execute(select(s.name, s.status, s.claim).where(s.run_id == run_id, s.idx == idx)).first()
            if run is None or step is None or step.status != StepStatus.RUNNING.value or step.claim != token \
                    or run.status != RunStatus.RUNNING.value:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            base = dict(run_id=run_id, saga=run.saga, version=run.saga_version, index=idx)
            if run.cancel_requested:
                self._fail_held_step(conn, run_id, idx, token, "cancelled before the child run started", now)
                return WaitOutcome("cancelled", **base)
            key = f"child:{run_id}:{step.name}"
            existing = conn.execute(select(r.id, r.saga).where(r.idempotency_key == key)).first()
            if existing is not None:
                child_id, child_saga = existing.id, existing.saga
            if not self._move_step(conn, run_id, idx, StepStatus.RUNNING, token, status=StepStatus.WAITING.value,
                                   child_run_id=child_id, claim=None, lease_expires_at=None):
                return WaitOutcome("lost", run_id=run_id, index=idx)
            if existing is None:
                conn.execute(insert(t.runs).values(
                    id=child_id, saga=child_saga, saga_version=child_version, status=RunStatus.PENDING.value,
                    input=child_input, idempotency_key=key, cancel_requested=False, created_at=now,
                    updated_at=now, mode="saga", parent_run_id=run_id, parent_step=idx))
                conn.execute(insert(t.steps), [
                    dict(run_id=child_id, idx=i, name=spec.name, status=StepStatus.PENDING.value,
                         has_compensation=spec.has_compensation, attempts=0, compensation_attempts=0,
                         compensation_round_attempts=0, kind=spec.kind, best_effort=spec.best_effort,
                         non_atomic=spec.non_atomic, pivot=spec.pivot, branch_group=spec.group,
                         signal=spec.signal)
                    for i, spec in enumerate(steps)])
                self._event(conn, child_id, "run_started", None,
                            {"saga": child_saga, "version": child_version, "parent_run_id": run_id,
                             "parent_step": idx}, now)
            self._set_run_status(conn, run_id, RunStatus.RUNNING, RunStatus.WAITING, now)
            self._event(conn, run_id, "run_waiting", step.name, {"child_run_id": child_id, "child_saga": child_saga},
                        now)
        return WaitOutcome("waiting", child_run_id=child_id, **base)

    def parent_of(self, run_id: str) -> str | None:
        return self._read(lambda conn: conn.execute(
            select(t.runs.c.parent_run_id).where(t.runs.c.id == run_id)).scalar())

    def child_ended(self, child_id: str) -> WaitOutcome:
        """The child run ended (or finished undoing): move its parent's step on. Forward (the step waits):
        child succeeded -> step succeeded with the child's results ({child step: result}), the parent goes
        on; any other end -> step failed, the errback compensates the parent. Backward (the step's
        compensation waits for the child's): revoke the step's claim and hand back the parent's
        compensations from that step, whose task then decides from the child's status. A duplicate, or a
        child that has not ended, changes nothing ("none")."""
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            child = conn.execute(select(r.status, r.saga, r.error, r.parent_run_id, r.parent_step)
                                 .where(r.id == child_id)).first()
            if child is None or child.parent_run_id is None:
                return WaitOutcome("none", run_id=child_id)
            run = self._lock_wait_run(conn, child.parent_run_id)
            if run is None:  # the parent was deleted
                return WaitOutcome("none", run_id=child_id)
            idx = child.parent_step
            step = conn.execute(select(s.name, s.status, s.child_run_id)
                                .where(s.run_id == run.id, s.idx == idx)).first()
            base = dict(run_id=run.id, saga=run.saga, version=run.saga_version, index=idx, child_run_id=child_id)
            if step is None or step.child_run_id != child_id:
                return WaitOutcome("none", **base)
            if step.status == StepStatus.WAITING.value and run.status == RunStatus.WAITING.value \
                    and child.status in CHILD_ENDED:
                if child.status == RunStatus.SUCCEEDED.value:
                    results = self._results(conn, child_id)
                    if not self._move_step(conn, run.id, idx, StepStatus.WAITING, status=StepStatus.SUCCEEDED.value,
                                           result=results, error=None, finished_at=now):
                        return WaitOutcome("none", **base)
                    return self._pass_step(conn, run, idx, step.name, results, {"child_run_id": child_id}, now,
                                           StepStatus.WAITING)
                error = (f"child run {child_id} (saga {child.saga!r}) ended {child.status}"
                         + (f": {child.error}" if child.error else ""))
                if not self._move_step(conn, run.id, idx, StepStatus.WAITING, status=StepStatus.FAILED.value,
                                       error=error, finished_at=now):
                    return WaitOutcome("none", **base)
                self._event(conn, run.id, "step_failed", step.name, {"error": error, "child_run_id": child_id}, now)
                self._set_run_status(conn, run.id, RunStatus.WAITING, RunStatus.RUNNING, now)
                return WaitOutcome("errback", error=error, **base)
            if step.status == StepStatus.COMPENSATING.value and run.status == RunStatus.COMPENSATING.value \
                    and child.status in CHILD_UNDONE:
                if not self._move_step(conn, run.id, idx, StepStatus.COMPENSATING, claim=None,
                                       lease_expires_at=None):
                    return WaitOutcome("none", **base)
                self._touch(conn, run.id, now)
                return WaitOutcome("compensate", indexes=tuple(self._to_compensate(conn, run.id, in_progress=True)),
                                   status=child.status, **base)
        return WaitOutcome("none", **base)

    def compensate_child(self, run_id: str, idx: int, token: str, fresh: bool) -> WaitOutcome:
        """The compensation of child step ``idx`` (held by ``token``): undo the child run. Child succeeded
        -> compensating, with its completed steps to undo ("compensate" them, on the child; its end wakes this
        step again); nothing to undo, or already undone -> "finished" (complete this step). Child still
        compensating -> "waiting". Child in compensation_failed: a ``fresh`` round (the first, or an
        operator's retry of the parent) retries the child's compensations; a later delivery of the same
        round gives up ("failed": the parent waits for an operator too)."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = self._lock_wait_run(conn, run_id)
            step = conn.execute(select(s.status, s.claim, s.child_run_id)
                                .where(s.run_id == run_id, s.idx == idx)).first()
            if run is None or step is None or step.status != StepStatus.COMPENSATING.value or step.claim != token:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            if step.child_run_id is None:  # the child was never recorded: nothing ran, nothing to undo
                return WaitOutcome("finished", run_id=run_id, index=idx)
            child = self._lock_wait_run(conn, step.child_run_id)
            if child is None:  # deleted by hand: there is nothing left to undo
                return WaitOutcome("finished", run_id=run_id, index=idx, child_run_id=step.child_run_id)
            base = dict(run_id=child.id, saga=child.saga, version=child.saga_version, index=idx,
                        child_run_id=child.id, status=child.status)
            if child.status in (RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value):
                return WaitOutcome("finished", **base)
            if child.status == RunStatus.COMPENSATING.value:
                return WaitOutcome("waiting", **base)
            if child.status == RunStatus.SUCCEEDED.value:
                self._set_run_status(conn, child.id, RunStatus.SUCCEEDED, RunStatus.COMPENSATING, now,
                                     finished_at=None)
                self._event(conn, child.id, "compensation_requested", None,
                            {"parent_run_id": run_id, "parent_step": idx}, now)
            elif child.status == RunStatus.COMPENSATION_FAILED.value and fresh:
                self._set_run_status(conn, child.id, RunStatus.COMPENSATION_FAILED, RunStatus.COMPENSATING, now,
                                     error=None, finished_at=None)
                conn.execute(update(t.steps)
                             .where(s.run_id == child.id, s.status == StepStatus.COMPENSATION_FAILED.value)
                             .values(status=StepStatus.SUCCEEDED.value, claim=None, lease_expires_at=None))
                self._event(conn, child.id, "retry_requested", None, {"parent_run_id": run_id}, now)
            else:
                error = (f"child run {child.id} is {child.status}"
                         + (f": {child.error}" if child.error else "")
                         + f"; fix the cause, then `sagaflow retry {run_id}` (it retries the child's undo too)")
                return WaitOutcome("failed", error=error, **base)
            todo = self._to_compensate(conn, child.id)
            if not todo:
                self._finish_compensation(conn, child.id, now)
                return WaitOutcome("finished", **base)
            self._touch(conn, run_id, now)
        return WaitOutcome("compensate", indexes=tuple(todo), **base)

    def cancel_waiting(self, run_id: str) -> list[WaitOutcome] | None:
        """Cancel a run that waits (None when it does not: request_cancel handles live runs). At a gate: the
        gate fails and the errback compensates at once ("errback" outcomes to publish). At a child step: the
        run keeps waiting with its cancel recorded, and the child is cancelled (recursively, if it waits
        too); the child's end then fails the step and the run compensates."""
        now = utcnow()
        with self.engine.begin() as conn:
            run = self._lock_wait_run(conn, run_id)
            if run is None:
                raise UnknownRun(f"unknown run id {run_id!r}")
            if run.status != RunStatus.WAITING.value:
                return None
            return self._cancel_waiting(conn, run, now)

    def _cancel_waiting(self, conn, run, now) -> list[WaitOutcome]:
        s, r = t.steps.c, t.runs.c
        if not run.cancel_requested:
            conn.execute(update(t.runs).where(r.id == run.id).values(cancel_requested=True, updated_at=now))
            self._event(conn, run.id, "cancel_requested", None, None, now)
        step = conn.execute(select(s.idx, s.name, s.kind, s.signal, s.child_run_id)
                            .where(s.run_id == run.id, s.status == StepStatus.WAITING.value)).first()
        if step is None:
            return []
        if step.kind == "gate":
            error = f"cancelled while waiting for signal {step.signal!r}"
            if not self._move_step(conn, run.id, step.idx, StepStatus.WAITING, status=StepStatus.FAILED.value,
                                   error=error, finished_at=now):
                return []
            self._event(conn, run.id, "step_failed", step.name, {"error": error}, now)
            self._set_run_status(conn, run.id, RunStatus.WAITING, RunStatus.RUNNING, now)
            return [WaitOutcome("errback", run_id=run.id, saga=run.saga, version=run.saga_version, index=step.idx,
                                error=error)]
        child = self._lock_wait_run(conn, step.child_run_id) if step.child_run_id else None
        if child is None or child.cancel_requested and child.status != RunStatus.WAITING.value:
            return []
        if child.status == RunStatus.WAITING.value:
            return self._cancel_waiting(conn, child, now)
        if child.status in _LIVE_RUN:
            conn.execute(update(t.runs).where(r.id == child.id).values(cancel_requested=True, updated_at=now))
            self._event(conn, child.id, "cancel_requested", None, {"by_parent": run.id}, now)
        return []

    def unreported_children(self, stall_timeout: float, limit: int = 500) -> list[str]:
        """Child runs that ended (or finished undoing) over ``stall_timeout`` seconds ago while their parent's
        step still waits for them: the child_finished message was lost. The sweeper publishes it again."""
        r, s = t.runs.c, t.steps.c
        child = t.runs.alias("child")
        c = child.c
        now = utcnow()
        forward = and_(s.status == StepStatus.WAITING.value, r.status == RunStatus.WAITING.value,
                       c.status.in_(CHILD_ENDED))
        backward = and_(s.status == StepStatus.COMPENSATING.value, r.status == RunStatus.COMPENSATING.value,
                        c.status.in_(CHILD_UNDONE))
        return list(self._read(lambda conn: conn.execute(
            select(c.id)
            .select_from(t.steps.join(t.runs, r.id == s.run_id).join(child, c.id == s.child_run_id))
            # Driven from the parent's status (indexed): only waiting and compensating runs are read.
            .where(r.status.in_((RunStatus.WAITING.value, RunStatus.COMPENSATING.value)), s.kind == "child",
                   or_(forward, backward),
                   c.updated_at < now - dt.timedelta(seconds=stall_timeout))
            .order_by(c.updated_at).limit(limit)
        ).scalars()))

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
            run_id, idx, token, active, kind, {"error": error, "retry_in": round(delay, 3)}, attempts_column,
            lease_expires_at=lease, **{error_column: error},
        )

    def _end_claim(self, run_id, idx, token, active: StepStatus, final: StepStatus, kind: str, detail,
                   **values) -> bool:
        return self._update_held(run_id, idx, token, active, kind, detail, None,
                                 status=final.value, lease_expires_at=None, **values)

    def _fast_retry(self, kind: str, run_id, idx, token, error: str, delay: float, lease_seconds: float) -> bool:
        now = utcnow()
        lease = now + dt.timedelta(seconds=delay + lease_seconds)  # see _note_retry
        return self.fast.update_held(kind, run_id, idx, token, now, error=error, lease=lease,
                                     retry_in=round(delay, 3))

    def _update_held(self, run_id, idx, token, active: StepStatus, kind: str, detail: dict | None,
                     attempt_column: str | None, touch: bool = True, **values) -> bool:
        """Update the step this delivery holds (status ``active``, claim ``token``), record ``kind`` with
        ``detail`` (plus ``attempt`` from ``attempt_column`` after the update) and, with ``touch``, the run's
        updated_at; False, changing nothing, when it does not hold it any more. fastpath.HELD does the same on
        PostgreSQL."""
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
            attempt = {"attempt": row._mapping[attempt_column]} if attempt_column else {}
            self._event(conn, run_id, kind, row.name, ({**attempt, **detail} if detail or attempt else None), now)
            if touch:
                self._touch(conn, run_id, now)
        return True

    def _to_compensate(self, conn, run_id: str, in_progress: bool = False) -> list[int]:
        """Steps completed and not yet undone, latest first; with ``in_progress``, those being undone too."""
        s = t.steps.c
        statuses = [StepStatus.SUCCEEDED.value] + ([StepStatus.COMPENSATING.value] if in_progress else [])
        rows = conn.execute(
            select(s.idx)
            .where(s.run_id == run_id, or_(s.status.in_(statuses), _FAILED_NON_ATOMIC), s.has_compensation.is_(True))
            .order_by(s.idx.desc())
        )
        return [r.idx for r in rows]

    def _finish_compensation(self, conn, run_id: str, now: dt.datetime) -> bool:
        if self._branches_unsettled(conn, run_id):  # the late branch finishes it (complete_branch, fail_branch)
            return False
        cancelled = conn.execute(select(t.runs.c.cancel_requested).where(t.runs.c.id == run_id)).scalar()
        final = RunStatus.CANCELLED if cancelled else RunStatus.COMPENSATED
        if not self._set_run_status(conn, run_id, RunStatus.COMPENSATING, final, now, finished_at=now):
            return False
        self._event(conn, run_id, f"run_{final.value}", None, None, now)
        return True

    def _succeed_run(self, conn, run_id: str, now: dt.datetime, expected=RunStatus.RUNNING,
                     unless_cancelled: bool = True) -> bool:
        """``expected`` -> succeeded, with its ``run_succeeded`` event; with ``unless_cancelled``, not when a
        cancel was requested. False, changing nothing, when the run was not there to finish."""
        expected_values = [expected.value] if isinstance(expected, RunStatus) else list(expected)
        r = t.runs.c
        guard = [r.id == run_id, r.status.in_(expected_values)]
        if unless_cancelled:
            guard.append(r.cancel_requested.is_(False))
        finished = conn.execute(
            update(t.runs).where(*guard).values(status=RunStatus.SUCCEEDED.value, updated_at=now, finished_at=now)
        ).rowcount
        if finished:
            self._event(conn, run_id, "run_succeeded", None, None, now)
        return bool(finished)

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
