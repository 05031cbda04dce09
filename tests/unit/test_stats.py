"""The read-only aggregates behind /api/stats and /metrics, on rows with known times (SQLite)."""

import datetime as dt

import pytest
from sqlalchemy import insert

from sagaflow.store import stats
from sagaflow.store import tables as t

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def add_run(store, run_id, saga, status, steps, events):
    """steps: [(name, status, started_s, finished_s)]; events: [(kind, step, at_s)] in order."""
    with store.engine.begin() as conn:
        conn.execute(insert(t.runs).values(id=run_id, saga=saga, saga_version=1, status=status, input={},
                                           cancel_requested=False, created_at=T0, updated_at=T0))
        for i, (name, st, started, finished) in enumerate(steps):
            conn.execute(insert(t.steps).values(
                run_id=run_id, idx=i, name=name, status=st, has_compensation=True, attempts=1,
                compensation_attempts=0, compensation_round_attempts=0,
                started_at=at(started) if started is not None else None,
                finished_at=at(finished) if finished is not None else None))
        for kind, step, when in events:
            conn.execute(insert(t.events).values(run_id=run_id, kind=kind, step=step, at=at(when)))


@pytest.fixture
def filled(store):
    # r1: a succeeds in 0.3 s, b in 2 s (after one retry).
    add_run(store, "r1", "book", "succeeded", [("a", "succeeded", 0, 0.3), ("b", "succeeded", 1, 3)], [
        ("run_started", None, 0), ("step_succeeded", "a", 0.3), ("step_retried", "b", 1.5),
        ("step_succeeded", "b", 3), ("run_succeeded", None, 3)])
    # r2: a succeeds in 0.2 s, b fails at once; a is compensated in 0.5 s after one retry of the undo.
    add_run(store, "r2", "book", "compensated", [("a", "compensated", 0, 0.2), ("b", "failed", 1, 1)], [
        ("run_started", None, 0), ("step_succeeded", "a", 0.2), ("step_failed", "b", 1),
        ("compensation_started", "a", 2), ("compensation_retried", "a", 2.1), ("compensation_started", "a", 2.3),
        ("compensation_succeeded", "a", 2.5), ("run_compensated", None, 2.5)])
    # r3: the undo of a fails for good (4 s), an operator retries, then it succeeds in 1 s.
    add_run(store, "r3", "pay", "compensated", [("a", "compensated", 0, 0.05), ("b", "failed", 1, 1)], [
        ("run_started", None, 0), ("step_succeeded", "a", 0.05), ("step_failed", "b", 1),
        ("compensation_started", "a", 2), ("compensation_failed", "a", 6), ("run_compensation_failed", "a", 6),
        ("retry_requested", None, 10), ("compensation_started", "a", 11), ("compensation_succeeded", "a", 12),
        ("run_compensated", None, 12)])
    # r4: still running; r5: waiting for an operator.
    add_run(store, "r4", "pay", "running", [("a", "running", 0, None), ("b", "pending", None, None)],
            [("run_started", None, 0)])
    add_run(store, "r5", "pay", "compensation_failed", [("a", "compensation_failed", 0, 1), ("b", "failed", 1, 2)],
            [("run_started", None, 0), ("compensation_started", "a", 3), ("compensation_failed", "a", 4),
             ("run_compensation_failed", "a", 4)])
    return store.engine


def test_run_counts_and_compensation_rate(filled):
    counts = stats.run_counts(filled)
    assert counts == {("book", "succeeded"): 1, ("book", "compensated"): 1, ("pay", "compensated"): 1,
                      ("pay", "running"): 1, ("pay", "compensation_failed"): 1}
    assert stats.by_status(counts)["compensated"] == 2 and stats.by_status(counts)["pending"] == 0
    assert stats.compensation_rate(counts) == 0.75  # 3 of the 4 finished runs
    assert stats.run_counts(filled, saga="book") == {("book", "succeeded"): 1, ("book", "compensated"): 1}
    assert stats.compensation_rate({}) is None


def test_run_end_counts_come_from_the_event_history(filled):
    assert stats.run_end_counts(filled) == {
        ("book", "succeeded"): 1, ("book", "compensated"): 1,
        ("pay", "compensation_failed"): 2, ("pay", "compensated"): 1,  # r3 counted under both
    }


def test_step_event_counts(filled):
    counts = stats.step_event_counts(filled)
    assert counts[("book", "b", "step_retried")] == 1
    assert counts[("book", "a", "compensation_retried")] == 1
    assert counts[("pay", "a", "compensation_failed")] == 2
    assert counts[("pay", "a", "compensation_succeeded")] == 1
    assert counts[("book", "a", "step_succeeded")] == 2


def test_step_duration_histogram_is_counted_in_sql(filled):
    h = stats.step_duration_histograms(filled, buckets=(0.1, 0.25, 0.5, 1.0, 2.5))
    # book.a: 0.3, 0.2; book.b: 2 (retried), 0 (failed at once); pay.a: 0.05 and 1 (r5); r4's a is unfinished.
    assert h[("book", "a")].cumulative == [0, 1, 2, 2, 2] and h[("book", "a")].count == 2
    assert h[("book", "a")].sum == pytest.approx(0.5, abs=1e-3)
    assert h[("book", "b")].cumulative == [1, 1, 1, 1, 2]
    assert h[("pay", "a")].cumulative == [1, 1, 1, 2, 2]


def test_compensation_durations_pair_each_round_start_with_its_end(filled):
    h = stats.compensation_duration_histograms(filled, buckets=(0.25, 0.5, 1.0, 2.5, 5.0))
    # book.a: 2 -> 2.5 (0.5 s, retry inside). pay.a: r3 rounds 2 -> 6 (4 s) and 11 -> 12 (1 s); r5 3 -> 4 (1 s).
    assert h[("book", "a")].count == 1 and h[("book", "a")].cumulative == [0, 1, 1, 1, 1]
    assert h[("pay", "a")].count == 3 and h[("pay", "a")].cumulative == [0, 0, 2, 2, 3]
    assert h[("pay", "a")].sum == pytest.approx(6.0, abs=1e-3)


def test_percentiles_interpolate_like_postgresql(filled):
    p = stats.step_duration_percentiles(filled)
    assert p[("book", "a")]["count"] == 2
    assert p[("book", "a")]["p50"] == pytest.approx(0.25, abs=1e-3)
    assert p[("book", "a")]["max"] == pytest.approx(0.3, abs=1e-3)
    assert set(stats.step_duration_percentiles(filled, saga="pay")) == {("pay", "a"), ("pay", "b")}
