"""Retention: delete runs that ended before a cutoff, with their steps, events and signals, in small
batches (each its own short transaction, so no lock is held for long). The metrics' counters and
histograms were counted by the transitions themselves (counters.py): a prune only takes the deleted runs
out of the live gauge of their status, in the same transaction; every counter keeps its value.

Deleted: succeeded, compensated, cancelled, failed and resolved runs that ended before the cutoff. Never a
live, waiting, stuck or compensation_failed run (they wait for the runtime or an operator); never a parent
with a child that has not ended so, nor a child whose parent has not."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import Engine, and_, case, delete, exists, func, select
from sqlalchemy.orm import aliased

from sagaflow.model.status import RunStatus
from sagaflow.store import counters, stats
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines

PRUNABLE = (RunStatus.SUCCEEDED.value, RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value,
            RunStatus.FAILED.value, RunStatus.RESOLVED.value)
BATCH = 500


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


def seed_counters(conn) -> None:
    """Add what the rows there are count (runs, their statuses, end and step events, durations) to
    saga_counters: for rows the counters never saw (migration 0006 upgrading a database; a bulk load that
    bypassed the runtime, as bench/million.py's). Not for rows the counters already count."""
    engine = conn.engine
    rows: list[dict] = []
    r = t.runs.c
    for saga, status, n in conn.execute(select(r.saga, r.status, func.count()).group_by(r.saga, r.status)):
        rows += [counters.row(counters.STARTED, saga, "", n), counters.row(counters.LIVE, saga, status, n)]
    for (saga, status), n in stats.run_end_counts(engine, conn=conn).items():
        rows.append(counters.row(counters.FINISHED, saga, status, n))
    for (saga, step, kind), n in stats.step_event_counts(engine, conn=conn).items():
        rows.append(counters.row(counters.STEP, saga, kind, n, step or ""))
    for metric, durations in ((counters.RUN_DURATION, stats._run_durations(engine)),
                              (counters.STEP_DURATION, stats._step_durations(engine)),
                              (counters.COMPENSATION_DURATION, stats._compensation_durations(engine))):
        d = durations.c
        us = select(d.saga, d.step, d.outcome, func.round(func.coalesce(d.seconds, 0) * 1000000).label("us")) \
            .subquery("us")
        u = us.c
        positive = case((u.us < 0, 0), else_=u.us)
        bounds = zip(counters.DURATION_BUCKETS, counters.BOUNDS_US, strict=True)
        bucket = case(*[(positive <= b, f"le={bound!r}") for bound, b in bounds], else_=counters.INF)
        for saga, step, outcome, label, n, total in conn.execute(
                select(u.saga, u.step, u.outcome, bucket, func.count(), func.sum(positive))
                .group_by(u.saga, u.step, u.outcome, bucket)):
            step = "" if metric == counters.RUN_DURATION else step
            rows += [counters.row(metric, saga, outcome, n, step, label),
                     counters.row(metric, saga, outcome, int(total or 0), step, counters.SUM)]
    counters.add(conn, counters.merged(rows))


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
                query = select(r.id, r.saga, r.status).where(*_prunable(cutoff)).order_by(r.id).limit(batch)
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)  # two pruners share the work
                found = conn.execute(query).all()
                if not found:
                    break
                ids = [row.id for row in found]
                # the deleted runs leave their status (the live gauge); every counter keeps what they counted
                gone: dict[tuple[str, str], int] = {}
                for row in found:
                    gone[(row.saga, row.status)] = gone.get((row.saga, row.status), 0) + 1
                counters.log(conn, [counters.row(counters.LIVE, saga, status, -n)
                                    for (saga, status), n in sorted(gone.items())])
                for table in (t.map_items, t.signals, t.events, t.steps):
                    conn.execute(delete(table).where(table.c.run_id.in_(ids)))
                conn.execute(delete(t.runs).where(r.id.in_(ids)))
            for row in found:
                result.by_status[row.status] = result.by_status.get(row.status, 0) + 1
            result.runs += len(found)
        return result

    def compact_counters(self) -> int:
        """Set the live gauge back to the rows where a hand edit moved it (counters.reconcile_live), then
        move the counter log into saga_counters (counters.compact: what the sweeper does each pass, so a
        scrape reads one row per series); returns the log rows moved."""
        with self.engine.begin() as conn:
            counters.reconcile_live(conn)
            return counters.compact(conn)

    def seed_counters(self) -> None:
        """Count the rows there are into the counters (counters.seed): only for rows written past the runtime
        (a bulk load); the runtime's own transitions count themselves."""
        with self.engine.begin() as conn:
            seed_counters(conn)
