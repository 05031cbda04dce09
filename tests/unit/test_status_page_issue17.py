"""Issue 17's pieces without a worker: the store's attention reads (SQLite and PostgreSQL), who asked on an
operator event, tracebacks bounded, the time limit named, the traceback's file and line."""

import datetime as dt

import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from sagaflow.model.events import REASON_CHARS, Origin
from sagaflow.runtime.outcomes import TRACEBACK_CHARS, describe, traceback_text
from sagaflow.store import tables as t
from sagaflow.web.present import BarError


def _set(store, run_id, **values):
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(**values))


def _step(store, run_id, idx, **values):
    with store.engine.begin() as conn:
        conn.execute(update(t.steps).where(t.steps.c.run_id == run_id, t.steps.c.idx == idx).values(**values))


RUN_A = "a1b2c3d4-0000-4000-8000-000000000001"
RUN_B = "a1b2ffff-0000-4000-8000-000000000002"


def test_find_runs_by_id_prefix_and_idempotency_key(store):
    store.create_run(RUN_A, "s", 1, {}, [("a", True)], "order-17")
    store.create_run(RUN_B, "s", 1, {}, [("a", True)])
    assert store.find_runs(RUN_A[:8]) == [RUN_A]
    assert sorted(store.find_runs("a1b2")) == sorted([RUN_A, RUN_B])
    assert store.find_runs("order-17") == [RUN_A]
    assert store.find_runs("a1b") == []  # too short to be a prefix, and no such key
    assert store.find_runs("a1b2%") == []  # not hex: a key only, never a LIKE pattern


def test_attention_lists_what_needs_an_operator_and_marks_the_step(store):
    for n, status in enumerate(["compensation_failed", "stuck", "waiting", "succeeded", "compensated", "running"]):
        store.create_run(f"r{n}", "s", 1, {}, [("a", True), ("b", True)])
        _set(store, f"r{n}", status=status)
    _set(store, "r5", deadline_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))
    _step(store, "r0", 1, status="failed", error="boom")
    _step(store, "r0", 0, status="compensation_failed", compensation_error="undo boom")
    _step(store, "r2", 1, status="waiting", started_at=dt.datetime.now(dt.timezone.utc))
    assert {r.id for r in store.attention_runs()} == {"r0", "r1", "r2", "r5"}
    marks = store.step_marks(["r0", "r2", "r3"])
    assert (marks["r0"].name, marks["r0"].status, marks["r0"].error) == ("a", "compensation_failed", "undo boom")
    assert (marks["r2"].name, marks["r2"].status) == ("b", "waiting") and marks["r2"].since is not None
    assert "r3" not in marks and store.step_marks([]) == {}


def test_operator_events_record_who_asked(store):
    store.create_run("r1", "s", 1, {}, [("a", True)])
    by = Origin(actor="ops-anna", source="page", client="10.0.0.7", reason="customer asked").detail()
    store.request_cancel("r1", by)
    event = store.get_run("r1").events[-1]
    assert event.kind == "cancel_requested"
    assert event.detail == {"actor": "ops-anna", "source": "page", "client": "10.0.0.7", "reason": "customer asked"}


def test_origin_is_bounded_and_checked():
    assert Origin().detail() == {"source": "client"}
    assert Origin(actor="x", reason="  ").detail() == {"actor": "x", "source": "client"}
    assert len(Origin(reason="r" * 10_000).detail()["reason"]) == REASON_CHARS
    with pytest.raises(ValueError, match="source must be one of"):
        Origin(source="email")


def test_a_traceback_is_bounded_and_names_file_and_line():
    def read(record):
        return record.get("x")  # a str has no .get: AttributeError

    try:
        read("text")
    except AttributeError as exc:
        text = traceback_text(exc)
    assert text is not None and text.endswith("'str' object has no attribute 'get'")
    where = BarError("failed", text).where
    assert where is not None and where.startswith("unit/test_status_page_issue17.py:") and where.endswith("in read")
    assert traceback_text(ValueError("never raised")) is None
    try:
        raise ValueError("x" * 20_000)
    except ValueError as exc:
        long = traceback_text(exc)
    assert long is not None and long.startswith("... (earlier frames cut)") and len(long) <= TRACEBACK_CHARS + 40


def test_a_soft_time_limit_error_names_the_limit():
    assert describe(SoftTimeLimitExceeded(), 30) == ("SoftTimeLimitExceeded: the step ran past its time limit of "
                                                     "30 s (the soft limit: the process is killed if it runs on)")
    assert "time limit (" in describe(SoftTimeLimitExceeded())
    assert describe(ValueError("x"), 30) == "ValueError: x"


def test_a_long_pause_is_drawn_short_on_the_time_axis():
    from sagaflow.web.present import Bar, TimeAxis

    t0 = dt.datetime(2026, 12, 6, 3, 0, tzinfo=dt.timezone.utc)
    second = dt.timedelta(seconds=1)
    bars = [Bar("step", 0, "a", "succeeded", 1, t0, t0 + second, [], None, None),
            Bar("step", 1, "gate", "succeeded", 1, t0 + 3600 * second, t0 + 3601 * second, [], None, None)]
    axis = TimeAxis(bars, t0 + 3601 * second)
    assert axis.pauses == [(t0 + second, t0 + 3600 * second)]
    assert 40 < axis.at(t0 + 3600 * second) < 60  # not squeezed to the right edge
    assert axis.at(t0) == 0 and axis.at(t0 + 3601 * second) == 100
    assert axis.at(t0 + second) < axis.at(t0 + 1800 * second) < axis.at(t0 + 3600 * second)
