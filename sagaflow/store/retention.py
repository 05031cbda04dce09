"""Retention: delete runs that ended before a cutoff, with their steps, events and signals, in small
batches (each its own short transaction, so no lock is held for long), and fold what they counted into
``saga_totals`` in the same transaction, so the metrics' counters and histograms never go down.

Deleted: succeeded, compensated, cancelled, failed and resolved runs that ended before the cutoff. Never a
live, waiting, stuck or compensation_failed run (they wait for the runtime or an operator); never a parent
with a child that has not ended so, nor a child whose parent has not."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import Engine, and_, delete, exists, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import aliased

from sagaflow.model.status import RunStatus
from sagaflow.store import stats
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow

PRUNABLE = (RunStatus.SUCCEEDED.value, RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value,
            RunStatus.FAILED.value, RunStatus.RESOLVED.value)
BATCH = 500
# A run ended this long ago gets no more events (a late branch of a parallel group, a duplicate delivery
# refused): the sweeper folds it into saga_totals then.
FOLD_AFTER = 300.0


@dataclass
class PruneResult:
    runs: int = 0  # deleted (or, with dry_run, that would be)
    by_status: dict[str, int] = field(default_factory=dict)
    cutoff: dt.datetime | None = None
    dry_run: bool = False


def _ended(cutoff: dt.datetime):
    r = t.runs.c
    return func.coalesce(r.finished_at, r.updated_at) < cutoff


def _prunable(cutoff: dt.datetime) -> list:
    """The WHERE clause of a run that may go."""
    r = t.runs.c
    child, parent = aliased(t.runs), aliased(t.runs)
    return [
        r.status.in_(PRUNABLE),
        _ended(cutoff),
        ~exists(select(child.c.id).where(child.c.parent_run_id == r.id, child.c.status.notin_(PRUNABLE))),
        ~exists(select(parent.c.id).where(and_(parent.c.id == r.parent_run_id, parent.c.status.notin_(PRUNABLE)))),
    ]


def _add(conn, rows: list[dict]) -> None:
    """Add each row's value to saga_totals (insert, or add to the existing value)."""
    if not rows:
        return
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = insert(t.totals)
    statement = statement.on_conflict_do_update(
        index_elements=["metric", "saga", "step", "label"],
        set_={"value": t.totals.c.value + statement.excluded.value})
    conn.execute(statement, rows)


def _fold(engine: Engine, conn, run_ids: list[str]) -> None:
    """What these runs count in the metrics, added to saga_totals (in the caller's transaction)."""
    if not run_ids:
        return
    rows: list[dict] = []
    r = t.runs.c
    for saga, n in conn.execute(select(r.saga, func.count()).where(r.id.in_(run_ids)).group_by(r.saga)):
        rows.append(dict(metric="runs_started", saga=saga, step="", label="", value=n))
    for (saga, status), n in stats.run_end_counts(engine, run_ids, conn).items():
        rows.append(dict(metric="runs_finished", saga=saga, step="", label=status, value=n))
    for (saga, step, kind), n in stats.step_event_counts(engine, run_ids, conn).items():
        rows.append(dict(metric="step_events", saga=saga, step=step or "", label=kind, value=n))
    for metric, histograms in (
            ("run_duration", stats.run_duration_histograms(engine, run_ids=run_ids, conn=conn)),
            ("step_duration", stats.step_duration_histograms(engine, run_ids=run_ids, conn=conn)),
            ("compensation_duration", stats.compensation_duration_histograms(engine, run_ids=run_ids, conn=conn))):
        for (saga, step), h in histograms.items():
            rows.append(dict(metric=metric, saga=saga, step=step, label="count", value=h.count))
            rows.append(dict(metric=metric, saga=saga, step=step, label="sum", value=h.sum))
            for bound, n in zip(h.buckets, h.cumulative, strict=True):
                rows.append(dict(metric=metric, saga=saga, step=step, label=f"le={bound!r}", value=n))
    _add(conn, rows)


def read_totals(engine: Engine) -> dict[tuple[str, str, str, str], float]:
    """{(metric, saga, step, label): value} of what pruned runs counted."""
    c = t.totals.c
    with engine.connect() as conn:
        return {(row[0], row[1], row[2], row[3]): row[4]
                for row in conn.execute(select(c.metric, c.saga, c.step, c.label, c.value))}


class Retention(Engines):
    engine: Engine  # Engines'

    def prune(self, cutoff: dt.datetime, dry_run: bool = False, batch: int = BATCH) -> PruneResult:
        """Delete the runs that ended before ``cutoff`` (see the module docstring), ``batch`` at a time; with
        ``dry_run``, count them and delete nothing."""
        result = PruneResult(cutoff=cutoff, dry_run=dry_run)
        r = t.runs.c
        if dry_run:
            with self.engine.connect() as conn:
                for status, n in conn.execute(select(r.status, func.count()).where(*_prunable(cutoff))
                                              .group_by(r.status)):
                    result.by_status[status] = n
            result.runs = sum(result.by_status.values())
            return result
        while True:
            with self.engine.begin() as conn:
                query = select(r.id, r.status, r.counted).where(*_prunable(cutoff)).order_by(r.id).limit(batch)
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)  # two pruners share the work
                found = conn.execute(query).all()
                if not found:
                    break
                ids = [row.id for row in found]
                _fold(self.engine, conn, [row.id for row in found if not row.counted])  # the rest: folded before
                for table in (t.signals, t.events, t.steps):
                    conn.execute(delete(table).where(table.c.run_id.in_(ids)))
                conn.execute(delete(t.runs).where(r.id.in_(ids)))
            for row in found:
                result.by_status[row.status] = result.by_status.get(row.status, 0) + 1
            result.runs += len(found)
        return result

    def fold_counted(self, settled: float = FOLD_AFTER, batch: int = BATCH) -> int:
        """Fold the runs that ended (as prune would delete them) more than ``settled`` seconds ago into
        saga_totals and mark them ``counted``: /metrics then reads them from the totals, so a scrape costs
        what the runs not folded yet cost, not the whole history. Short batches; returns the runs folded."""
        cutoff = utcnow() - dt.timedelta(seconds=settled)
        r = t.runs.c
        folded = 0
        while True:
            with self.engine.begin() as conn:
                query = (select(r.id).where(r.counted.is_(False), r.status.in_(PRUNABLE), _ended(cutoff))
                         .order_by(r.id).limit(batch))
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                ids = list(conn.execute(query).scalars())
                if not ids:
                    return folded
                _fold(self.engine, conn, ids)
                conn.execute(update(t.runs).where(r.id.in_(ids)).values(counted=True))
            folded += len(ids)

    def totals(self) -> dict[tuple[str, str, str, str], float]:
        return read_totals(self.engine)
