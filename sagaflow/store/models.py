"""What the store returns: frozen snapshots of a run, its steps and its events."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class RunStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    SUCCEEDED = "succeeded"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# compensation_failed is final for the runtime but waits for an operator (client.retry).
FINAL_RUN_STATUSES = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.COMPENSATED, RunStatus.COMPENSATION_FAILED, RunStatus.CANCELLED, RunStatus.FAILED}
)


class StepStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


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

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_RUN_STATUSES

    def to_dict(self, history: bool = True) -> dict:
        data = _jsonable({k: v for k, v in asdict(self).items() if k not in ("steps", "events")})
        if history:
            data["steps"] = [s.to_dict() for s in self.steps]
            data["events"] = [e.to_dict() for e in self.events]
        return data

    def step(self, name: str) -> StepState:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def from_row(cls, row, steps=(), events=()) -> "Run":
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
        )


def _jsonable(data: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in data.items()}
