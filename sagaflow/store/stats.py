"""Read-only aggregate queries over the runs, steps and events tables (the percentiles of client.stats, and
counters.seed, which counts rows written past the runtime), and the reads of the counters the transitions
keep (counters.py: the live counts, /metrics).

Nothing here writes, and nothing here is called on the runtime's path.

Every query runs on PostgreSQL and on SQLite. Durations are computed in SQL (``_seconds``), so histograms
are counted by the database, not by pulling every row into Python.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine

from sagaflow.model.events import COMPENSATION_ENDS, STEP_OUTCOME_EVENTS, EventKind
from sagaflow.model.status import RunStatus, compensation_rate, counts_by_status
from sagaflow.store import counters
from sagaflow.store import tables as t
from sagaflow.store.counters import DURATION_BUCKETS, Histogram
from sagaflow.store.engine import Engines

# event kind -> the final run status it records (run_failed: plain runs record no events, so they show in
# the status gauge only).
END_EVENTS = {EventKind.run_ended(status).value: status.value for status in (
    RunStatus.SUCCEEDED, RunStatus.COMPENSATED, RunStatus.CANCELLED, RunStatus.COMPENSATION_FAILED, RunStatus.FAILED,
    RunStatus.STUCK, RunStatus.RESOLVED)}
STEP_EVENTS = tuple(kind.value for kind in STEP_OUTCOME_EVENTS)
_COMPENSATION_END = tuple(kind.value for kind in COMPENSATION_ENDS)


def _seconds(engine: Engine, start, end):
    """``end - start`` in seconds, as a SQL expression of this engine's dialect."""
    if engine.dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    # SQLite: the difference of two Julian day numbers is exact to about 50 microseconds; rounded to the
    # millisecond, a duration that falls on a bucket bound is counted in that bucket.
    return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)


# ------------------------------------------------------------------------------------------------ runs


def run_counts(engine: Engine, saga: str | None = None) -> dict[tuple[str, str], int]:
    """{(saga, status): runs in that status now}."""
    r = t.runs.c
    query = select(r.saga, r.status, func.count()).group_by(r.saga, r.status)
    if saga:
        query = query.where(r.saga == saga)
    with engine.connect() as conn:
        return {(row[0], row[1]): row[2] for row in conn.execute(query)}


# The pure arithmetic over run_counts' answer is the model's (faces compute it without the store).
by_status = counts_by_status


# ------------------------------------------------------------------------------------------------ events


def run_end_counts(engine: Engine, run_ids=None, conn=None) -> dict[tuple[str, str], int]:
    """{(saga, final status): times a run reached it}, from the event history, which only grows: a run
    retried out of compensation_failed that then compensates counts once under each status. ``run_ids``:
    only those runs (retention.py folds what it deletes into the totals)."""
    e, r = t.events.c, t.runs.c
    query = (select(r.saga, e.kind, func.count())
             .select_from(t.events.join(t.runs, e.run_id == r.id))
             .where(e.kind.in_(list(END_EVENTS)), *_only(e.run_id, run_ids))
             .group_by(r.saga, e.kind))
    return {(row[0], END_EVENTS[row[1]]): row[2] for row in _rows(engine, conn, query)}


def step_event_counts(engine: Engine, run_ids=None, conn=None) -> dict[tuple[str, str, str], int]:
    """{(saga, step, kind): events} for the step and compensation outcomes and retries."""
    e, r = t.events.c, t.runs.c
    query = (select(r.saga, e.step, e.kind, func.count())
             .select_from(t.events.join(t.runs, e.run_id == r.id))
             .where(e.kind.in_(STEP_EVENTS), *_only(e.run_id, run_ids))
             .group_by(r.saga, e.step, e.kind))
    return {(row[0], row[1], row[2]): row[3] for row in _rows(engine, conn, query)}


def _only(column, run_ids) -> list:
    if run_ids is None:
        return []
    return [column.in_(list(run_ids))]


def _rows(engine: Engine, conn, query) -> list:
    """The rows of ``query`` on ``conn`` (the caller's transaction), or on a connection of its own."""
    if conn is not None:
        return list(conn.execute(query).all())
    with engine.connect() as own:
        return list(own.execute(query).all())


# ------------------------------------------------------------------------------------------------ durations


def _run_durations(engine: Engine, run_ids=None):
    """(saga, final status as "step", seconds) of every run that ended: from its start to its end."""
    r = t.runs.c
    return (select(r.saga.label("saga"), r.status.label("step"),
                   _seconds(engine, r.created_at, r.finished_at).label("seconds"), r.status.label("outcome"))
            .where(r.finished_at.is_not(None), *_only(r.id, run_ids))
            .subquery("durations"))


def _step_durations(engine: Engine, run_ids=None):
    """(saga, step, seconds) of every step that finished (succeeded or failed for good): from its first
    start to its end, retries and their waits included."""
    s, r = t.steps.c, t.runs.c
    return (select(r.saga.label("saga"), s.name.label("step"),
                   _seconds(engine, s.started_at, s.finished_at).label("seconds"),
                   case((s.status == "failed", "failed"), else_="succeeded").label("outcome"))
            .select_from(t.steps.join(t.runs, s.run_id == r.id))
            .where(s.started_at.is_not(None), s.finished_at.is_not(None), *_only(s.run_id, run_ids))
            .subquery("durations"))


def _compensation_durations(engine: Engine, run_ids=None):
    """(saga, step, seconds) of every compensation that ended (succeeded or failed for good), from the event
    pairs: the first compensation_started of a round to the compensation_succeeded or compensation_failed
    that ends it. A round is what one failure (or one operator retry) starts; its attempts are included."""
    e = t.events.c
    is_end = case((e.kind.in_(_COMPENSATION_END), 1), else_=0)
    ordered = (
        select(e.run_id, e.step, e.kind, e.at,
               func.coalesce(func.sum(is_end).over(partition_by=(e.run_id, e.step), order_by=e.id,
                                                   rows=(None, -1)), 0).label("round"))
        .where(e.kind.in_((EventKind.COMPENSATION_STARTED.value, *_COMPENSATION_END)), *_only(e.run_id, run_ids))
        .subquery("ordered")
    )
    o = ordered.c
    rounds = (
        select(o.run_id, o.step,
               func.min(case((o.kind == EventKind.COMPENSATION_STARTED.value, o.at))).label("started"),
               func.max(case((o.kind.in_(_COMPENSATION_END), o.at))).label("ended"),
               func.max(case((o.kind.in_(_COMPENSATION_END), o.kind))).label("end_kind"))
        .group_by(o.run_id, o.step, o.round)
        .subquery("rounds")
    )
    c, r = rounds.c, t.runs.c
    outcome = func.replace(c.end_kind, "compensation_", "")
    return (select(r.saga.label("saga"), c.step.label("step"), _seconds(engine, c.started, c.ended).label("seconds"),
                   outcome.label("outcome"))
            .select_from(rounds.join(t.runs, c.run_id == r.id))
            .where(c.started.is_not(None), c.ended.is_not(None))
            .subquery("durations"))


def _histograms(engine: Engine, durations, buckets: Sequence[float], conn=None) -> dict[tuple[str, str], Histogram]:
    d = durations.c
    seconds = func.greatest(d.seconds, 0.0) if engine.dialect.name == "postgresql" else func.max(d.seconds, 0.0)
    columns = [func.sum(case((seconds <= b, 1), else_=0)) for b in buckets]
    query = (select(d.saga, d.step, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
             .group_by(d.saga, d.step))
    out = {}
    for row in _rows(engine, conn, query):
        out[(row[0], row[1])] = Histogram(tuple(buckets), [int(v or 0) for v in row[4:]], int(row[2]),
                                          float(row[3]))
    return out


def run_duration_histograms(engine: Engine, buckets: Sequence[float] = DURATION_BUCKETS, run_ids=None, conn=None):
    """{(saga, final status): Histogram} of run durations (start to end), counted in SQL."""
    return _histograms(engine, _run_durations(engine, run_ids), buckets, conn)


def step_duration_histograms(engine: Engine, buckets: Sequence[float] = DURATION_BUCKETS, run_ids=None, conn=None):
    """{(saga, step): Histogram} of step durations, counted in SQL."""
    return _histograms(engine, _step_durations(engine, run_ids), buckets, conn)


def compensation_duration_histograms(engine: Engine, buckets: Sequence[float] = DURATION_BUCKETS, run_ids=None,
                                     conn=None):
    """{(saga, step): Histogram} of compensation durations, counted in SQL."""
    return _histograms(engine, _compensation_durations(engine, run_ids), buckets, conn)


def run_duration_percentiles(engine: Engine, quantiles: Iterable[float] = (0.5, 0.9, 0.99),
                             saga: str | None = None) -> dict[tuple[str, str], dict]:
    """{(saga, final status): {"count", "p50", "p90", "p99", "max"}} in seconds, for the runs that ended."""
    return step_duration_percentiles(engine, quantiles, saga, durations=_run_durations(engine))


def step_duration_percentiles(engine: Engine, quantiles: Iterable[float] = (0.5, 0.9, 0.99),
                              saga: str | None = None, durations=None) -> dict[tuple[str, str], dict]:
    """{(saga, step): {"count", "p50", "p90", "p99", "max"}} in seconds, for the steps that finished.
    PostgreSQL computes them (percentile_cont); SQLite, which lacks it, returns the durations to sort here."""
    quantiles = tuple(quantiles)
    d = (durations if durations is not None else _step_durations(engine)).c
    where = [d.saga == saga] if saga else []
    out: dict[tuple[str, str], dict] = {}
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            query = (select(d.saga, d.step, func.count(), func.max(d.seconds),
                            *[func.percentile_cont(q).within_group(d.seconds) for q in quantiles])
                     .where(*where).group_by(d.saga, d.step))
            for row in conn.execute(query):
                out[(row[0], row[1])] = _percentile_entry(row[2], row[3], row[4:], quantiles)
            return out
        values: dict[tuple[str, str], list[float]] = {}
        for row in conn.execute(select(d.saga, d.step, d.seconds).where(*where)):
            values.setdefault((row[0], row[1]), []).append(float(row[2]))
    for key, seconds in values.items():
        seconds.sort()
        out[key] = _percentile_entry(len(seconds), seconds[-1], [_interpolate(seconds, q) for q in quantiles],
                                     quantiles)
    return out


def _interpolate(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks: what PostgreSQL's percentile_cont computes."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _percentile_entry(count, maximum, values, quantiles) -> dict:
    entry = {"count": int(count), "max": round(max(float(maximum), 0.0), 6)}
    for q, v in zip(quantiles, values, strict=True):
        entry[f"p{round(q * 100):g}"] = round(max(float(v), 0.0), 6)
    return entry


class Stats(Engines):
    """The Store's part for these reads (the faces reach them through SagaClient, never the engine)."""

    engine: Engine  # Engines'

    def run_counts(self, saga: str | None = None) -> dict[tuple[str, str], int]:
        """{(saga, status): runs in it now}, from the live gauge the transitions keep (counters.py): two
        small tables read, whatever the number of runs (run_counts above counts the rows)."""
        return self._read(lambda conn: counters.live_counts(conn, saga))

    def counter_values(self) -> counters.Counts:
        """Every counter, gauge and histogram the transitions keep (what /metrics exposes), in one statement."""
        return self._read(counters.read)

    def run_end_counts(self, run_ids=None) -> dict[tuple[str, str], int]:
        return run_end_counts(self.engine, run_ids)

    def step_event_counts(self, run_ids=None) -> dict[tuple[str, str, str], int]:
        return step_event_counts(self.engine, run_ids)

    def step_duration_histograms(self, buckets: Sequence[float] = DURATION_BUCKETS, run_ids=None):
        return step_duration_histograms(self.engine, buckets, run_ids)

    def compensation_duration_histograms(self, buckets: Sequence[float] = DURATION_BUCKETS, run_ids=None):
        return compensation_duration_histograms(self.engine, buckets, run_ids)

    def run_duration_histograms(self, buckets: Sequence[float] = DURATION_BUCKETS, run_ids=None):
        return run_duration_histograms(self.engine, buckets, run_ids)

    def run_duration_percentiles(self, saga: str | None = None) -> dict:
        return run_duration_percentiles(self.engine, saga=saga)

    def step_duration_percentiles(self, quantiles: Iterable[float] = (0.5, 0.9, 0.99)) -> dict:
        return step_duration_percentiles(self.engine, quantiles)


__all__ = [
    "DURATION_BUCKETS", "Histogram", "Stats", "by_status", "compensation_duration_histograms", "compensation_rate",
    "run_counts", "run_duration_histograms", "run_end_counts", "step_duration_histograms",
    "step_duration_percentiles", "step_event_counts",
]
