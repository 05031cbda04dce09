"""The metrics' counters, kept up to date by the transitions themselves, so a /metrics scrape (and the
unfiltered run counts of the list) reads two small tables whatever the number of runs.

Each transition appends what it changes to ``saga_counter_log`` in the same statement (the fast path's CTEs,
fastpath.py) or the same transaction (guards.py, runs.py, operator.py, retention.py) as the transition:
a run started, a run moving from one status to another (the live gauge: -1 on the old status, +1 on the
new), a run or step outcome, a duration (one bucket row and the sum in integer microseconds). The log is
insert-only: two workers never update the same row, so a hot saga serializes nothing and no transaction
waits on (or deadlocks over) a counter row. The sweeper moves the log into ``saga_counters`` (``compact``:
one row per series, one DELETE ... RETURNING feeding one upsert, so a row is counted in exactly one of the
two tables at any snapshot). A scrape sums both in one statement: one snapshot, never a value counted twice.

Counters and histograms only grow (a prune subtracts from the live gauge only: the runs it deletes are no
longer in any status). Histogram sums are integers (microseconds): a sum never dips by float rounding.

Series (metric, saga, step, outcome, label):
    started                saga                                     runs started
    live                   saga, outcome=status                     runs in that status now (a gauge)
    finished               saga, outcome=final status               times a run reached it
    step                   saga, step, outcome=event kind           step and compensation outcomes, retries
    run_duration           saga, outcome=final status, label        start to that status
    step_duration          saga, step, outcome=succeeded|failed     first start to the step's end
    compensation_duration  saga, step, outcome=succeeded|failed     the round's first start to its end
A histogram's label is ``le=<bound>`` (the count of values in that bucket only; the reader cumulates) or
``sum_us``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import delete, func, insert, literal, select, union_all
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from sagaflow.model.events import COMPENSATION_ENDS, STEP_OUTCOME_EVENTS, EventKind
from sagaflow.model.status import LIVE_RUN_STATUSES, RunStatus
from sagaflow.store import tables as t

# Seconds. Steps of the examples take milliseconds; real ones call APIs (seconds) or batch jobs (minutes).
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)

BOUNDS_US = tuple(round(b * 1_000_000) for b in DURATION_BUCKETS)
INF = "le=+Inf"
SUM = "sum_us"

STARTED, LIVE, FINISHED, STEP = "started", "live", "finished", "step"
RUN_DURATION, STEP_DURATION, COMPENSATION_DURATION = "run_duration", "step_duration", "compensation_duration"
HISTOGRAMS = (RUN_DURATION, STEP_DURATION, COMPENSATION_DURATION)

# The statuses whose entry counts in ``finished`` (and observes the run's duration): the end events'.
ENDED = frozenset(s.value for s in (
    RunStatus.SUCCEEDED, RunStatus.COMPENSATED, RunStatus.CANCELLED, RunStatus.COMPENSATION_FAILED,
    RunStatus.FAILED, RunStatus.STUCK, RunStatus.RESOLVED))
STEP_KINDS = frozenset(k.value for k in STEP_OUTCOME_EVENTS)
_STEP_ENDS = {EventKind.STEP_SUCCEEDED.value: "succeeded", EventKind.STEP_FAILED.value: "failed"}
_COMPENSATION_ENDS = {k.value: k.value.removeprefix("compensation_") for k in COMPENSATION_ENDS}


def bucket_label(micros: int) -> str:
    for bound, bound_us in zip(DURATION_BUCKETS, BOUNDS_US, strict=True):
        if micros <= bound_us:
            return f"le={bound!r}"
    return INF


def row(metric: str, saga: str, outcome: str = "", value: int = 1, step: str = "", label: str = "") -> dict:
    return dict(metric=metric, saga=saga, step=step or "", outcome=outcome, label=label, value=int(value))


def observe(metric: str, saga: str, outcome: str, us: int | None, step: str = "") -> list[dict]:
    """A histogram observation: its bucket +1 and the sum + ``us`` (nothing without a duration)."""
    if us is None:
        return []
    return [row(metric, saga, outcome, 1, step, bucket_label(us)), row(metric, saga, outcome, us, step, SUM)]


def log(conn, rows: list[dict]) -> None:
    """Append ``rows`` to the counter log in the caller's transaction."""
    if rows:
        conn.execute(insert(t.counter_log), rows)


def started(saga: str, status: RunStatus = RunStatus.PENDING) -> list[dict]:
    """A run created in ``status``: pending, or scheduled for a delayed start."""
    return [row(STARTED, saga), row(LIVE, saga, status.value)]


def moved(saga: str, old: str, new: str, created_at: dt.datetime | None, now: dt.datetime) -> list[dict]:
    """A run from ``old`` to ``new``: the live gauge, and on a final status its count and duration."""
    rows = [row(LIVE, saga, old, -1), row(LIVE, saga, new, 1)]
    if new in ENDED:
        rows.append(row(FINISHED, saga, new))
        rows += observe(RUN_DURATION, saga, new, _us(created_at, now))
    return rows


def step_event(conn, run_id: str, kind: str, step: str | None, now: dt.datetime) -> None:
    """An event of ``kind`` about ``step`` (guards.event calls this): a step or compensation outcome or retry
    counts, and an end observes its duration (from the step's row)."""
    if kind not in STEP_KINDS:
        return
    r, s = t.runs.c, t.steps.c
    found = conn.execute(
        select(r.saga, s.started_at, s.compensation_started_at)
        .select_from(t.runs.outerjoin(t.steps, (s.run_id == r.id) & (s.name == step)))
        .where(r.id == run_id).order_by(s.idx).limit(1)).first()
    if found is None:
        return
    rows = [row(STEP, found.saga, kind, 1, step or "")]
    if kind in _STEP_ENDS:
        rows += observe(STEP_DURATION, found.saga, _STEP_ENDS[kind], _us(found.started_at, now), step or "")
    elif kind in _COMPENSATION_ENDS:
        rows += observe(COMPENSATION_DURATION, found.saga, _COMPENSATION_ENDS[kind],
                        _us(found.compensation_started_at, now), step or "")
    log(conn, rows)


def _us(start: dt.datetime | None, now: dt.datetime) -> int | None:
    """``now - start`` in whole microseconds (never below 0); None without a start. A naive value is UTC."""
    if start is None:
        return None
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    return max((now - start) // dt.timedelta(microseconds=1), 0)


# ------------------------------------------------------------------------------------------------ SQL text
# The same rows for the fast path's statements (fastpath.py), as SQL text for PostgreSQL.

def sql_us(start: str, end: str = ":now") -> str:
    """Whole microseconds from ``start`` to ``end`` (timestamps without time zone), never below 0."""
    return f"greatest(0, round(extract(epoch from ({end} - {start})) * 1000000))::bigint"


def sql_bucket(us: str) -> str:
    whens = " ".join(f"WHEN {us} <= {b} THEN 'le={bound!r}'" for bound, b in zip(DURATION_BUCKETS, BOUNDS_US,
                                                                                  strict=True))
    return f"CASE {whens} ELSE '{INF}' END"


def sql_observe(metric: str, saga: str, step: str, outcome: str, start: str, source: str,
                where: str = "true") -> str:
    """A SELECT of the two log rows of an observation from ``start`` to :now, one per row of ``source``
    (``where`` filters them; a row without a start observes nothing)."""
    return f"""SELECT '{metric}', o.saga, o.step, o.outcome, v.label, v.value
    FROM (SELECT {saga} AS saga, {step} AS step, {outcome} AS outcome, {sql_us(start)} AS us
          FROM {source} WHERE {where} AND {start} IS NOT NULL) o
    CROSS JOIN LATERAL (VALUES ({sql_bucket('o.us')}, 1::bigint), ('{SUM}', o.us)) AS v(label, value)"""


def sql_moved(saga: str, old: str, new: str, created_at: str, source: str, where: str = "true") -> str:
    """The rows of ``moved`` for each row of ``source``, as a SELECT (the final ones only where ``new`` is
    final)."""
    ended = ", ".join(f"'{s}'" for s in sorted(ENDED))
    return f"""SELECT '{LIVE}', {saga}, '', {old}, '', -1::bigint FROM {source} WHERE {where}
    UNION ALL SELECT '{LIVE}', {saga}, '', {new}, '', 1::bigint FROM {source} WHERE {where}
    UNION ALL SELECT '{FINISHED}', {saga}, '', {new}, '', 1::bigint FROM {source} WHERE {where} AND {new} IN ({ended})
    UNION ALL {sql_observe(RUN_DURATION, saga, "''", new, created_at, source, f"{where} AND {new} IN ({ended})")}"""


LOG_INSERT = "INSERT INTO saga_counter_log (metric, saga, step, outcome, label, value)"


# ------------------------------------------------------------------------------------------------ reads


@dataclass
class Histogram:
    """Cumulative counts per upper bound (Prometheus style), plus the count and the sum of the values."""

    buckets: tuple[float, ...]
    cumulative: list[int] = field(default_factory=list)
    count: int = 0
    sum: float = 0.0
    sum_us: int = 0  # the same sum in whole microseconds (what the counters keep: it never dips by rounding)


@dataclass
class Counts:
    """Everything the counters hold, summed over the compacted table and the log (one snapshot)."""

    started: dict[str, int] = field(default_factory=dict)  # saga -> runs ever started
    live: dict[tuple[str, str], int] = field(default_factory=dict)  # (saga, status) -> runs now
    finished: dict[tuple[str, str], int] = field(default_factory=dict)  # (saga, status) -> times reached
    steps: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (saga, step, kind) -> events
    # metric -> (saga, step, outcome) -> Histogram (run_duration: step "")
    histograms: dict[str, dict[tuple[str, str, str], Histogram]] = field(default_factory=dict)


def _summed(where: Iterable = ()):
    c, g = t.counters.c, t.counter_log.c
    where = list(where)
    both = union_all(
        select(c.metric, c.saga, c.step, c.outcome, c.label, c.value).where(*[w(c) for w in where]),
        select(g.metric, g.saga, g.step, g.outcome, g.label, g.value).where(*[w(g) for w in where]),
    ).subquery("both")
    b = both.c
    return (select(b.metric, b.saga, b.step, b.outcome, b.label, func.sum(b.value))
            .group_by(b.metric, b.saga, b.step, b.outcome, b.label))


def read(conn) -> Counts:
    out = Counts(histograms={m: {} for m in HISTOGRAMS})
    for metric, saga, step, outcome, label, value in conn.execute(_summed()):
        value = int(value)
        if metric == STARTED:
            out.started[saga] = value
        elif metric == LIVE:
            out.live[(saga, outcome)] = value
        elif metric == FINISHED:
            out.finished[(saga, outcome)] = value
        elif metric == STEP:
            out.steps[(saga, step, outcome)] = value
        elif metric in out.histograms:
            h = out.histograms[metric].setdefault(
                (saga, step, outcome), Histogram(DURATION_BUCKETS, [0] * len(DURATION_BUCKETS)))
            if label == SUM:
                h.sum_us = value
            elif label == INF:
                h.count += value
            else:
                bound = float(label.removeprefix("le="))
                if bound in DURATION_BUCKETS:
                    h.cumulative[DURATION_BUCKETS.index(bound)] += value
                    h.count += value
    for series in out.histograms.values():
        for h in series.values():
            running = 0
            for i, n in enumerate(h.cumulative):
                running += n
                h.cumulative[i] = running
            h.sum = h.sum_us / 1_000_000
    return out


def live_counts(conn, saga: str | None = None) -> dict[tuple[str, str], int]:
    """{(saga, status): runs in that status now}, from the live gauge (zeros left out)."""
    where = [lambda c: c.metric == LIVE]
    if saga:
        where.append(lambda c: c.saga == saga)
    return {(row[1], row[3]): int(row[5]) for row in conn.execute(_summed(where)) if int(row[5])}


# ------------------------------------------------------------------------------------------------ upkeep


def compact(conn) -> int:
    """Move the log into saga_counters (the caller's transaction); returns the log rows moved."""
    key = ["metric", "saga", "step", "outcome", "label"]
    if conn.dialect.name == "postgresql":
        # One statement: a log row is deleted and added to its series at the same snapshot, and a row
        # appended meanwhile (not visible to the DELETE) stays for the next time.
        result = conn.exec_driver_sql("""
WITH moved AS (DELETE FROM saga_counter_log RETURNING metric, saga, step, outcome, label, value),
added AS (
    INSERT INTO saga_counters (metric, saga, step, outcome, label, value)
    SELECT metric, saga, step, outcome, label, sum(value) FROM moved
    GROUP BY metric, saga, step, outcome, label ORDER BY metric, saga, step, outcome, label
    ON CONFLICT (metric, saga, step, outcome, label) DO UPDATE SET value = saga_counters.value + excluded.value
)
SELECT count(*) FROM moved""")
        return int(result.scalar_one())
    # SQLite: transactions are serialized (BEGIN IMMEDIATE), so no row is appended between these statements.
    g = t.counter_log.c
    upto = conn.execute(select(func.max(g.id))).scalar()
    if upto is None:
        return 0
    rows = [dict(zip(key + ["value"], r, strict=True)) for r in conn.execute(
        select(g.metric, g.saga, g.step, g.outcome, g.label, func.sum(g.value)).where(g.id <= upto)
        .group_by(g.metric, g.saga, g.step, g.outcome, g.label))]
    moved_count = conn.execute(select(func.count()).select_from(t.counter_log).where(g.id <= upto)).scalar_one()
    add(conn, rows)
    conn.execute(delete(t.counter_log).where(g.id <= upto))
    return int(moved_count)


def reconcile_live(conn) -> int:
    """Set the live gauge back to what the rows say, for the live statuses only (few rows, on the status
    index): a row changed by hand past the transitions (an operator's UPDATE, a restore) would otherwise
    leave it off for good, a negative count on the page. One INSERT ... SELECT of the differences: the rows
    and the gauge are read in that statement's one snapshot, so a transition committed meanwhile keeps its
    own log rows and nothing is counted twice. Returns the series corrected."""
    r, c, g = t.runs.c, t.counters.c, t.counter_log.c
    live = sorted(s.value for s in LIVE_RUN_STATUSES)
    parts = union_all(
        select(r.saga.label("saga"), r.status.label("status"), func.count().label("v"))
        .where(r.status.in_(live)).group_by(r.saga, r.status),
        select(c.saga, c.outcome, -c.value).where(c.metric == LIVE, c.outcome.in_(live)),
        select(g.saga, g.outcome, -g.value).where(g.metric == LIVE, g.outcome.in_(live)),
    ).subquery()
    diff = func.sum(parts.c.v)
    corrections = (select(literal(LIVE), parts.c.saga, literal(""), parts.c.status, literal(""), diff)
                   .group_by(parts.c.saga, parts.c.status).having(diff != 0))
    result = conn.execute(insert(t.counter_log).from_select(
        ["metric", "saga", "step", "outcome", "label", "value"], corrections))
    return max(result.rowcount or 0, 0)


def add(conn, rows: list[dict]) -> None:
    """Add each row's value to its series in saga_counters (insert, or add to the existing value)."""
    if not rows:
        return
    upsert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = upsert(t.counters)
    statement = statement.on_conflict_do_update(
        index_elements=["metric", "saga", "step", "outcome", "label"],
        set_={"value": t.counters.c.value + statement.excluded.value})
    conn.execute(statement, sorted(rows, key=lambda r: (r["metric"], r["saga"], r["step"], r["outcome"],
                                                          r["label"])))


def merged(rows: list[dict]) -> list[dict]:
    """One row per series (an upsert may not name the same row twice)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["metric"], r["saga"], r["step"], r["outcome"], r["label"])
        if key in out:
            out[key]["value"] += r["value"]
        else:
            out[key] = dict(r)
    return list(out.values())


__all__ = ["DURATION_BUCKETS", "Counts", "Histogram", "add", "compact", "live_counts", "log", "moved", "observe",
           "merged", "read", "started", "step_event"]
