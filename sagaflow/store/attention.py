"""What needs an operator's eye, for the status page's list: the runs in compensation_failed or stuck, the
runs waiting at a gate, the live runs past their deadline; the step each one failed at (or waits at), with
its error; and runs found by an id prefix or an idempotency key (the page's jump box). Reads only."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Sequence

from sqlalchemy import or_, select

from sagaflow.model.snapshots import Run
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow

NEEDS_OPERATOR = (RunStatus.COMPENSATION_FAILED.value, RunStatus.STUCK.value)
LIVE = (RunStatus.PENDING.value, RunStatus.RUNNING.value, RunStatus.WAITING.value)
# The step a run's list row names: where it failed, is failing to be undone, or waits.
MARKED_STEP = (StepStatus.FAILED.value, StepStatus.COMPENSATION_FAILED.value, StepStatus.WAITING.value)


@dataclass(frozen=True)
class StepMark:
    """The step a run stopped at, as the list shows it."""

    name: str
    status: str
    error: str | None
    since: dt.datetime | None  # when it failed, or began to wait


class Attention(Engines):
    def attention_runs(self, limit: int = 20) -> list[Run]:
        """compensation_failed and stuck runs, runs waiting at a gate, live runs past their deadline: oldest
        change first (the longest wait on top), at most ``limit``."""
        r = t.runs.c
        now = utcnow()
        return self._read(lambda conn: [Run.from_row(row) for row in conn.execute(
            select(t.runs).where(or_(r.status.in_(NEEDS_OPERATOR),
                                     r.status == RunStatus.WAITING.value,
                                     (r.deadline_at < now) & r.status.in_(LIVE)))
            .order_by(r.updated_at).limit(limit))])

    def step_marks(self, run_ids: Sequence[str]) -> dict[str, StepMark]:
        """For each run that has one: the step whose undo failed, else the step waiting, else the step that
        failed (the latest by index of its kind)."""
        if not run_ids:
            return {}
        s = t.steps.c
        rows = self._read(lambda conn: conn.execute(
            select(s.run_id, s.idx, s.name, s.status, s.error, s.compensation_error, s.finished_at, s.started_at)
            .where(s.run_id.in_(list(run_ids)), s.status.in_(MARKED_STEP))
            .order_by(s.run_id, s.idx)).all())
        marks: dict[str, StepMark] = {}
        rank = {status: n for n, status in enumerate(MARKED_STEP)}  # failed < compensation_failed < waiting
        for row in rows:
            kept = marks.get(row.run_id)
            if kept is not None and rank[kept.status] > rank[row.status]:
                continue
            error = row.compensation_error if row.status == StepStatus.COMPENSATION_FAILED.value else row.error
            since = row.started_at if row.status == StepStatus.WAITING.value else row.finished_at
            marks[row.run_id] = StepMark(row.name, row.status, error, since)
        return marks

    def find_runs(self, text: str, limit: int = 10) -> list[str]:
        """Run ids whose id starts with ``text`` (4 to 36 characters of hex and '-'), or whose idempotency
        key is ``text``; at most ``limit``, newest first."""
        r = t.runs.c
        text = text.strip()
        conditions = [r.idempotency_key == text]
        if 4 <= len(text) <= 36 and all(c in "0123456789abcdef-" for c in text.lower()):
            prefix = text.lower()
            conditions.append(r.id.startswith(prefix, autoescape=True))
        return self._read(lambda conn: list(conn.execute(
            select(r.id).where(or_(*conditions)).order_by(r.created_at.desc()).limit(limit)).scalars()))
