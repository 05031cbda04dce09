"""What the store returns: frozen snapshots of a run, its steps and its events; and StepSpec, what a run's
step row records of its definition. ``from_row`` reads a row of sagaflow/store/tables.py (duck-typed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from sagaflow.model import status as rules
from sagaflow.model.status import FINAL_RUN_STATUSES


@dataclass(frozen=True)
class StepSpec:
    """What a run's step row records of its definition (definition.Step) when the run starts."""

    name: str
    has_compensation: bool
    kind: str = "action"
    best_effort: bool = False
    non_atomic: bool = False
    pivot: bool = False
    group: int | None = None
    signal: str | None = None

    @property
    def special(self) -> bool:
        return (self.kind != "action" or self.best_effort or self.non_atomic or self.pivot
                or self.group is not None)

    @classmethod
    def of(cls, step) -> "StepSpec":
        """From a definition.Step (duck-typed: the store does not import definitions)."""
        # A child step always has one: undoing it compensates the child run's completed steps.
        # So does a map whose items are child runs: its undo compensates those runs.
        child = str(step.kind) == "child" or str(step.kind) == "map" and getattr(step, "child_saga", None) is not None
        return cls(name=step.name, has_compensation=step.compensate is not None or child,
                   kind=str(step.kind),
                   best_effort=step.best_effort,
                   # A map step that failed may have completed items: its undo runs too (it undoes those).
                   non_atomic=step.non_atomic or str(step.kind) == "map", pivot=step.pivot, group=step.group,
                   signal=step.signal)


@dataclass(frozen=True)
class StepState:
    """One step of a run, in definition order."""

    index: int
    name: str
    status: str
    has_compensation: bool
    attempts: int
    compensation_attempts: int
    result: Any
    error: str | None
    compensation_error: str | None
    task_id: str | None
    compensation_task_id: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    compensated_at: dt.datetime | None
    kind: str = "action"
    best_effort: bool = False
    non_atomic: bool = False
    pivot: bool = False
    group: int | None = None
    signal: str | None = None
    deadline_at: dt.datetime | None = None
    child_run_id: str | None = None
    lease_expires_at: dt.datetime | None = None  # a held step or undo counts as alive until then
    worker: str | None = None  # the worker (saga_workers.id) whose pool holds it

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    @classmethod
    def from_row(cls, row) -> "StepState":
        return cls(
            index=row.idx,
            name=row.name,
            status=row.status,
            has_compensation=row.has_compensation,
            attempts=row.attempts,
            compensation_attempts=row.compensation_attempts,
            result=row.result,
            error=row.error,
            compensation_error=row.compensation_error,
            task_id=row.task_id,
            compensation_task_id=row.compensation_task_id,
            started_at=row.started_at,
            finished_at=row.finished_at,
            compensated_at=row.compensated_at,
            kind=row.kind,
            best_effort=row.best_effort,
            non_atomic=row.non_atomic,
            pivot=row.pivot,
            group=row.branch_group,
            signal=row.signal,
            deadline_at=row.deadline_at,
            child_run_id=row.child_run_id,
            lease_expires_at=getattr(row, "lease_expires_at", None),
            worker=getattr(row, "worker", None),
        )


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    step: str | None
    at: dt.datetime
    detail: dict | None

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    @classmethod
    def from_row(cls, row) -> "Event":
        return cls(id=row.id, kind=row.kind, step=row.step, at=row.at, detail=row.detail)


@dataclass(frozen=True)
class Run:
    id: str
    saga: str
    saga_version: int
    status: str
    input: dict
    idempotency_key: str | None
    cancel_requested: bool
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    steps: tuple[StepState, ...] = field(default=())
    events: tuple[Event, ...] = field(default=())
    mode: str = "saga"
    parent_run_id: str | None = None
    parent_step: int | None = None
    parent_item: int | None = None  # the child of a map's item: the item's index
    children: tuple[str, ...] = field(default=())  # child runs' ids, in the order they started
    restarted_from: str | None = None  # client.restart: the run this one restarts
    deadline_at: dt.datetime | None = None  # the sweeper cancels the run if it is still live then
    start_at: dt.datetime | None = None  # a delayed start (status scheduled): when the sweeper starts it

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_RUN_STATUSES

    # The rules of what an operator may do with this run (sagaflow/model/status.py); faces ask these.
    @property
    def is_live(self) -> bool:
        return rules.is_live(self.status)

    @property
    def past_pivot(self) -> str | None:
        return rules.past_pivot(self)

    @property
    def can_cancel(self) -> bool:
        return rules.can_cancel(self)

    @property
    def can_retry(self) -> bool:
        return rules.can_retry(self)

    @property
    def can_resolve(self) -> bool:
        return rules.can_resolve(self)

    @property
    def can_restart(self) -> bool:
        return rules.can_restart(self)

    @property
    def cancel_pending(self) -> bool:
        return rules.cancel_pending(self)

    def to_dict(self, history: bool = True) -> dict:
        data = _jsonable({k: v for k, v in asdict(self).items() if k not in ("steps", "events", "children")})
        if history:
            data["children"] = list(self.children)
            data["steps"] = [s.to_dict() for s in self.steps]
            data["events"] = [e.to_dict() for e in self.events]
        return data

    def step(self, name: str) -> StepState:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def from_row(cls, row, steps=(), events=(), children=()) -> "Run":
        return cls(
            id=row.id,
            saga=row.saga,
            saga_version=row.saga_version,
            status=row.status,
            input=row.input,
            idempotency_key=row.idempotency_key,
            cancel_requested=row.cancel_requested,
            error=row.error,
            created_at=row.created_at,
            updated_at=row.updated_at,
            finished_at=row.finished_at,
            steps=tuple(steps),
            events=tuple(events),
            mode=row.mode,
            parent_run_id=row.parent_run_id,
            parent_step=row.parent_step,
            parent_item=getattr(row, "parent_item", None),
            children=tuple(children),
            restarted_from=getattr(row, "restarted_from", None),
            deadline_at=getattr(row, "deadline_at", None),
            start_at=getattr(row, "start_at", None),
        )


def _jsonable(data: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in data.items()}
