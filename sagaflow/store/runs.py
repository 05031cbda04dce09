"""Runs: create (with their step rows and first event, idempotently), read, list, and the operator's
cancel of a live run."""

from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from sagaflow.errors import InvalidTransition, UnknownRun
from sagaflow.model.events import EventKind
from sagaflow.model.snapshots import Event, Run, StepSpec, StepState
from sagaflow.model.status import LIVE_RUN_STATUSES, RunStatus, StepStatus
from sagaflow.store import counters
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.flags import refuse_cancel
from sagaflow.store.guards import LIVE_RUN, event
from sagaflow.store.search import search_conditions

# A search's total is counted up to this many runs past the page (then "10,000+"): counting a broad match
# exactly costs a scan of every matching index entry.
COUNT_CAP = 10_000
_LIVE = frozenset(s.value for s in LIVE_RUN_STATUSES)


class Total(int):
    """A run count; ``exact`` False when it was capped (at least this many)."""

    exact: bool

    def __new__(cls, value: int, exact: bool = True) -> "Total":
        total = super().__new__(cls, value)
        total.exact = exact
        return total


def _started(saga: str, version: int, parent_run_id: str | None, parent_step: int | None) -> dict:
    detail = {"saga": saga, "version": version}
    if parent_run_id is not None:
        detail.update(parent_run_id=parent_run_id, parent_step=parent_step)
    return detail


def insert_run(conn, run_id: str, saga: str, version: int, input: dict, idempotency_key: str | None,
               steps: list[StepSpec], now: dt.datetime, mode: str = "saga", parent_run_id: str | None = None,
               parent_step: int | None = None, start_at: dt.datetime | None = None,
               deadline_at: dt.datetime | None = None, started_event: bool = True, priority: int = 0,
               parent_item: int | None = None) -> int | None:
    """The run row, one row per step and its ``run_started`` event, in the caller's transaction (a run the
    client starts, or a child run its parent's step starts). ``start_at``: a delayed start, recorded
    ``scheduled`` (the sweeper starts it then: store/timers.py). Returns the event's id (None:
    ``started_event`` False, a plain run started now, which records no events)."""
    status = RunStatus.SCHEDULED if start_at is not None else RunStatus.PENDING
    conn.execute(insert(t.runs).values(
        id=run_id, saga=saga, saga_version=version, status=status.value, input=input,
        idempotency_key=idempotency_key, cancel_requested=False, created_at=now, updated_at=now, mode=mode,
        parent_run_id=parent_run_id, parent_step=parent_step, parent_item=parent_item, start_at=start_at,
        deadline_at=deadline_at, priority=priority))
    if steps:
        conn.execute(insert(t.steps), [
            dict(run_id=run_id, idx=i, name=spec.name, status=StepStatus.PENDING.value,
                 has_compensation=spec.has_compensation, attempts=0, compensation_attempts=0,
                 compensation_round_attempts=0, kind=spec.kind, best_effort=spec.best_effort,
                 non_atomic=spec.non_atomic, pivot=spec.pivot, branch_group=spec.group, signal=spec.signal)
            for i, spec in enumerate(steps)])
    counters.log(conn, counters.started(saga, status))
    if not started_event:
        return None
    return conn.execute(
        insert(t.events).values(run_id=run_id, kind=EventKind.RUN_STARTED.value, step=None, at=now,
                                detail=_started(saga, version, parent_run_id, parent_step))
        .returning(t.events.c.id)
    ).scalar_one()


class Runs(Engines):
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
        start_at: dt.datetime | None = None,
    ) -> tuple[Run, bool]:
        """Insert the run, one row per step and the first event in one transaction (create_runs of one run).

        ``steps``: StepSpec, or (name, has compensation) pairs. ``mode="plain"``: policy switched
        compensation off for this run: the run row alone (no step rows, no event; flags.py ends it).
        ``start_at``: a delayed start (status ``scheduled``). Returns ``(run, created)``; with an idempotency
        key already used, the existing run and False.
        """
        specs = [s if isinstance(s, StepSpec) else StepSpec(*s) for s in steps]
        if parent_run_id is None:
            return self.create_runs(saga, version, [(run_id, input, idempotency_key)], specs, mode=mode,
                                    start_at=start_at)[0]
        # A child run (children.py inserts those in its parent's step's transaction; this is for the store's
        # own tests of children).
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                event_id = insert_run(conn, run_id, saga, version, input, idempotency_key, specs, now, mode,
                                      parent_run_id, parent_step)
        except IntegrityError:
            if idempotency_key is None:
                raise
            return self._existing(idempotency_key), False
        return self._new_run(run_id, saga, version, input, idempotency_key, specs, now, event_id, mode=mode,
                             parent_run_id=parent_run_id, parent_step=parent_step), True

    def create_runs(self, saga: str, version: int, runs: Sequence[tuple[str, dict, str | None]],
                    steps: Sequence[StepSpec], *, mode: str = "saga", start_at: dt.datetime | None = None,
                    deadline: float | None = None, priority: int = 0) -> list[tuple[Run, bool]]:
        """Runs of one saga, ``runs`` as (run id, input, idempotency key or None), all in one transaction (on
        PostgreSQL one statement: fastpath.CREATE_RUNS), each with its step rows, its ``run_started`` event
        and its counters. ``start_at``: delayed starts (status ``scheduled``, a ``run_scheduled`` event).
        ``deadline``: seconds from the start (now, or ``start_at``). ``priority``: kept for what the sweeper
        and operators publish for the runs (runtime/publish.py). Returns ``(run, created)`` for each item,
        in order: an idempotency key already used, before or earlier in ``runs``, gives that run and False."""
        now = utcnow()
        specs = [] if mode == "plain" else list(steps)
        status = RunStatus.SCHEDULED if start_at is not None else RunStatus.PENDING
        deadline_at = (start_at or now) + dt.timedelta(seconds=deadline) if deadline is not None else None
        # One row per key: a key given twice in the batch is one run, the first item's.
        first_of: dict[str, int] = {}
        new: list[tuple[str, dict, str | None]] = []
        for i, (run_id, input, key) in enumerate(runs):
            if key is None or key not in first_of:
                if key is not None:
                    first_of[key] = i
                new.append((run_id, input, key))
        if self.fast:
            created = self.fast.create_runs(saga, version, new, specs, now, mode=mode, status=status.value,
                                            start_at=start_at, deadline_at=deadline_at, priority=priority)
        else:
            created = self._insert_runs(saga, version, new, specs, now, mode, start_at, deadline_at, priority)
        answers: list[tuple[Run, bool]] = []
        made: dict[str, Run] = {}
        for run_id, input, key in runs:
            if run_id in created and run_id not in made:
                started_event, scheduled_event = created[run_id]
                made[run_id] = self._new_run(run_id, saga, version, input, key, specs, now, started_event,
                                             mode=mode, status=status, start_at=start_at,
                                             deadline_at=deadline_at, scheduled_event=scheduled_event)
                answers.append((made[run_id], True))
            elif key is not None and runs[first_of[key]][0] in made:  # a repeat of a key of this batch
                answers.append((made[runs[first_of[key]][0]], False))
            else:  # the key was taken before (or, an impossibility with uuid4 ids, the run id)
                answers.append((self._existing(key), False))
        return answers

    def _insert_runs(self, saga, version, runs, specs, now, mode, start_at, deadline_at, priority) -> dict:
        """create_runs in one transaction of short statements (SQLite): {run id: (event ids)} of the runs
        created. SQLite's BEGIN IMMEDIATE holds the database's write lock from the start, so no other start
        can take a key between the read of the keys and the inserts."""
        created: dict[str, tuple[int | None, int | None]] = {}
        keys = [key for _, _, key in runs if key is not None]
        with self.engine.begin() as conn:
            taken = set(conn.execute(select(t.runs.c.idempotency_key)
                                     .where(t.runs.c.idempotency_key.in_(keys))).scalars()) if keys else set()
            for run_id, input, key in runs:
                if key in taken:
                    continue
                started = insert_run(conn, run_id, saga, version, input, key, specs, now, mode, start_at=start_at,
                                     deadline_at=deadline_at, started_event=mode != "plain" or start_at is not None,
                                     priority=priority)
                scheduled = None
                if start_at is not None:
                    scheduled = conn.execute(
                        insert(t.events).values(run_id=run_id, kind=EventKind.RUN_SCHEDULED.value, step=None,
                                                at=now, detail={"start_at": start_at.isoformat()})
                        .returning(t.events.c.id)).scalar_one()
                created[run_id] = (started, scheduled)
        return created

    def run_priority(self, run_id: str) -> int:
        """The run's priority (0 to 9; 0 for a run not found): what a message published for it outside its
        own task goes at (runtime/publish.py)."""
        r = t.runs.c
        value = self._read(lambda conn: conn.execute(select(r.priority).where(r.id == run_id)).scalar())
        return int(value or 0)

    def _existing(self, idempotency_key: str | None) -> Run:
        existing = self.find_by_idempotency_key(idempotency_key) if idempotency_key is not None else None
        if existing is None:  # the insert conflicted on something else: only a reused run id can
            raise InvalidTransition("a run with this id exists already")
        return existing

    @staticmethod
    def _new_run(run_id, saga, version, input, idempotency_key, steps: list[StepSpec], now, event_id,
                 mode="saga", parent_run_id=None, parent_step=None, status=RunStatus.PENDING, start_at=None,
                 deadline_at=None, scheduled_event=None) -> Run:
        """The snapshot of a run just inserted, built from what was written rather than read back."""
        events = []
        if event_id is not None:
            events.append(Event(id=event_id, kind=EventKind.RUN_STARTED.value, step=None, at=now,
                                detail=_started(saga, version, parent_run_id, parent_step)))
        if scheduled_event is not None:
            events.append(Event(id=scheduled_event, kind=EventKind.RUN_SCHEDULED.value, step=None, at=now,
                                detail={"start_at": start_at.isoformat()}))
        return Run(
            id=run_id, saga=saga, saga_version=version, status=status.value, input=input,
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
            events=tuple(events),
            mode=mode, parent_run_id=parent_run_id, parent_step=parent_step, deadline_at=deadline_at,
            start_at=start_at,
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

    @staticmethod
    def _load(conn, row) -> Run:
        steps = conn.execute(select(t.steps).where(t.steps.c.run_id == row.id).order_by(t.steps.c.idx))
        events = conn.execute(select(t.events).where(t.events.c.run_id == row.id).order_by(t.events.c.id))
        children = conn.execute(select(t.runs.c.id).where(t.runs.c.parent_run_id == row.id)
                                .order_by(t.runs.c.created_at, t.runs.c.id)).scalars()
        return Run.from_row(row, map(StepState.from_row, steps), map(Event.from_row, events), children)

    def list_runs(
        self, status: str | None = None, saga: str | None = None, limit: int = 50, offset: int = 0, *,
        since: dt.datetime | None = None, until: dt.datetime | None = None, idempotency_key: str | None = None,
        input: dict | None = None,
    ) -> tuple[list[Run], "Total"]:
        """Newest first, without steps and events; and the total matching the filters (a Total: exact, or
        capped for a search beyond COUNT_CAP, see _total). ``since`` /
        ``until`` bound the start (``since <= created_at < until``); ``input``: top-level fields that must
        equal the run's (search.py says how each value compares)."""
        def read(conn):
            conditions = search_conditions(conn.dialect.name, status=status, saga=saga, since=since,
                                           until=until, idempotency_key=idempotency_key, input=input)
            rows = conn.execute(
                select(t.runs)
                .where(*conditions)
                .order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc())
                .limit(limit)
                .offset(offset)
            )
            runs = [Run.from_row(r) for r in rows]
            # A live status is counted from its rows (few, on the status index): exact even when a row was
            # changed by hand, past the transitions that keep the gauge. A final one (most rows) reads the gauge.
            broad = status in _LIVE or any(v is not None for v in (since, until, idempotency_key, input))
            return runs, self._total(conn, conditions, status, saga, offset, broad=broad)

        return self._read(read)

    @staticmethod
    def _total(conn, conditions, status, saga, offset: int, broad: bool) -> "Total":
        """How many runs match: exact from the live gauge when only a final status and saga filter
        (counters.py: two small tables, whatever the number of runs); else counted up to COUNT_CAP past
        ``offset`` and, beyond that, ``offset + COUNT_CAP`` with ``exact`` False (shown as "10,000+")."""
        if not broad:
            counts = counters.live_counts(conn, saga)
            return Total(sum(n for (_, s), n in counts.items() if status is None or s == status), True)
        cap = offset + COUNT_CAP
        found = conn.execute(select(func.count()).select_from(
            select(t.runs.c.id).where(*conditions).limit(cap + 1).subquery())).scalar_one()
        return Total(min(found, cap), found <= cap)

    def request_cancel(self, run_id: str, origin: dict | None = None) -> Run:
        """The operator's cancel of a live run: a flag the next claim reads (a waiting run: waits.py's
        cancel_waiting). InvalidTransition, nothing written, for a run that cannot be cancelled."""
        now = utcnow()
        r = t.runs.c
        with self.engine.begin() as conn:
            refuse_cancel(conn, run_id)  # step flags and policy: past the pivot, or a plain run
            changed = conn.execute(
                update(t.runs)
                .where(r.id == run_id, r.status.in_(LIVE_RUN), r.cancel_requested.is_(False))
                .values(cancel_requested=True, updated_at=now)
            ).rowcount
            if changed:
                event(conn, run_id, EventKind.CANCEL_REQUESTED, None, origin or None, now)
        run = self.get_run(run_id)
        if not changed and not (run.cancel_requested and run.status in LIVE_RUN):
            raise InvalidTransition(f"run {run_id} is {run.status}: only pending or running runs can be cancelled")
        return run
