"""Limits in SQL (store/limits.py), on SQLite and PostgreSQL with no broker: slots up to the capacity, a line
served in arrival order, a dead holder's slot freed by its worker's liveness, a queued run cancelled at once,
a rate window that never holds more than its count."""

import datetime as dt
import uuid

import pytest
from sqlalchemy import text, update

from sagaflow.model import ClaimOutcome
from sagaflow.model.outcomes import SlotOutcome as S
from sagaflow.store import tables as t
from sagaflow.store.limits import RUN_SLOT, run_key, step_key
from sagaflow.store.workers import set_current_worker

KEY = step_key("s", "b")
DEAD_AFTER = 15.0


@pytest.fixture
def store(store):
    set_current_worker(None)  # a client's claims and slots (no worker): the lease alone decides
    with store.engine.begin() as conn:
        for table in ("saga_slots", "saga_slot_waiters", "saga_rate_starts", "saga_workers"):
            conn.execute(text(f"DELETE FROM {table}"))
    yield store
    set_current_worker(None)


def new_run(store, saga="s") -> str:
    run_id = str(uuid.uuid4())
    store.create_run(run_id, saga, 1, {}, [("a", True), ("b", True)])
    return run_id


def ask(store, run_id, idx=1, capacity=2, key=KEY):
    return store.acquire_slot(key, capacity, run_id, idx, "s", 1, 60.0, DEAD_AFTER)


def test_slots_up_to_the_capacity_then_a_line_served_in_arrival_order(store):
    runs = [new_run(store) for _ in range(5)]
    assert [ask(store, r) for r in runs] == [S.GRANTED, S.GRANTED, S.QUEUED, S.QUEUED, S.QUEUED]
    assert store.get_run(runs[2]).steps[1].status == "queued"
    assert [e.kind for e in store.get_run(runs[2]).events][-1] == "step_queued"
    assert ask(store, runs[2]) is S.QUEUED  # asking again: still in line, no second event
    assert [e.kind for e in store.get_run(runs[2]).events].count("step_queued") == 1
    assert ask(store, runs[0]) is S.HELD  # a duplicate delivery of a holder
    promoted = store.release_slot(KEY, 2, runs[0], 1, 60.0, DEAD_AFTER)
    assert [(p.run_id, p.index) for p in promoted] == [(runs[2], 1)]
    assert promoted[0].results == {}
    assert store.get_run(runs[2]).steps[1].status == "pending"  # its claim may take it now
    assert ask(store, runs[2]) is S.HELD  # the slot was reserved for it
    assert store.promote(KEY, 2, 60.0, DEAD_AFTER) == []  # both slots held
    assert [p.run_id for p in store.promote(KEY, 4, 60.0, DEAD_AFTER)] == [runs[3], runs[4]]  # capacity raised


def test_a_newcomer_waits_behind_the_line_even_when_a_slot_is_free(store):
    runs = [new_run(store) for _ in range(3)]
    assert [ask(store, r, capacity=1) for r in runs] == [S.GRANTED, S.QUEUED, S.QUEUED]
    with store.engine.begin() as conn:  # the holder's slot is gone (released, nobody promoted yet)
        conn.execute(text("DELETE FROM saga_slots"))
    late = new_run(store)
    assert ask(store, late, capacity=1) is S.QUEUED
    assert ask(store, runs[1], capacity=1) is S.GRANTED  # the first in line


def test_a_dead_workers_slot_is_freed_by_its_liveness_and_the_line_moves(store):
    runs = [new_run(store) for _ in range(2)]
    set_current_worker("w1:1")
    store.heartbeat("w1:1", "w1", 1)
    assert ask(store, runs[0], capacity=1) is S.GRANTED
    set_current_worker(None)
    assert ask(store, runs[1], capacity=1) is S.QUEUED
    assert store.promote(KEY, 1, 60.0, DEAD_AFTER) == []  # the holder's worker is alive
    with store.engine.begin() as conn:
        conn.execute(update(t.workers).values(heartbeat_at=dt.datetime.now(dt.timezone.utc)
                                               - dt.timedelta(seconds=DEAD_AFTER + 1)))
    assert [p.run_id for p in store.promote(KEY, 1, 60.0, DEAD_AFTER)] == [runs[1]]


def test_a_runs_slot_lives_with_the_run_and_a_queued_run_cancels_at_once(store):
    key = run_key("s")
    runs = [new_run(store) for _ in range(3)]
    assert [ask(store, r, idx=RUN_SLOT, capacity=1, key=key) for r in runs] == [S.GRANTED, S.QUEUED, S.QUEUED]
    assert store.get_run(runs[1]).status == "queued"
    assert store.cancel_queued_run(runs[1])
    cancelled = store.get_run(runs[1])
    assert cancelled.status == "cancelled" and [s.status for s in cancelled.steps] == ["skipped", "skipped"]
    assert not store.cancel_queued_run(runs[1])  # once
    assert store.promote(key, 1, 0.0, DEAD_AFTER) == []  # the first run is live: it holds its slot
    claim = store.claim_step(runs[0], 0, "t:0", [], 60.0)
    assert claim.outcome is ClaimOutcome.CLAIMED
    store.complete_step(runs[0], 0, "t:0", 1)
    store.claim_step(runs[0], 1, "u:0", [], 60.0)
    assert store.complete_last_step(runs[0], 1, "u:0", 2) == "succeeded"
    promoted = store.promote(key, 1, 0.0, DEAD_AFTER)
    assert [(p.run_id, p.index) for p in promoted] == [(runs[2], 0)]
    assert store.get_run(runs[2]).status == "pending"


def test_a_cancelled_run_never_waits_in_line(store):
    runs = [new_run(store) for _ in range(2)]
    assert ask(store, runs[0], capacity=1) is S.GRANTED
    store.request_cancel(runs[1])
    assert ask(store, runs[1], capacity=1) is S.HELD  # its claim then meets the cancel


def test_a_rate_window_never_holds_more_than_its_count(store):
    run_id = new_run(store)
    waits = [store.take_rate(KEY, 3, 1.0, run_id, 1) for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert all(0 < w <= 1.1 for w in waits[3:])
    assert store.take_rate(step_key("s", "other"), 3, 1.0, run_id, 1) == 0.0  # each key its own window


def test_queued_counts_feed_the_metrics_gauge(store):
    runs = [new_run(store) for _ in range(3)]
    for r in runs:
        ask(store, r, capacity=1)
    assert store.queued_counts() == {("s", "b"): 2}


def test_metrics_show_the_lines_as_gauges(store):
    from prometheus_client import CollectorRegistry, generate_latest

    from sagaflow import SagaClient
    from sagaflow.web.metrics import SagaflowCollector

    runs = [new_run(store) for _ in range(3)]
    for r in runs:
        ask(store, r, capacity=1)
    for r in runs:
        ask(store, r, idx=RUN_SLOT, capacity=1, key=run_key("s"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SagaflowCollector(lambda: SagaClient(store)))
    text = generate_latest(registry).decode()
    assert 'sagaflow_queued{saga="s",step="b"} 2.0' in text
    assert 'sagaflow_queued{saga="s",step="run"} 2.0' in text
    assert 'sagaflow_runs{saga="s",status="queued"} 2.0' in text


def test_the_live_gauge_follows_queued_runs(store):
    """Into the line, out of it by a cancel or a promotion: each move is counted with the transition, so the
    live gauge (what /metrics and the run list's totals read) equals the rows."""
    from sagaflow.store import stats

    def gauge_equals_rows():
        live = {k: v for k, v in store.counter_values().live.items() if v and k[0] == "s"}
        assert live == {k: v for k, v in stats.run_counts(store.engine).items() if k[0] == "s"}
        return live

    key = run_key("s")
    runs = [new_run(store) for _ in range(3)]
    [ask(store, r, idx=RUN_SLOT, capacity=1, key=key) for r in runs]
    assert gauge_equals_rows()[("s", "queued")] == 2
    assert store.cancel_queued_run(runs[1])
    assert gauge_equals_rows()[("s", "queued")] == 1
    store.claim_step(runs[0], 0, "t:0", [], 60.0)
    store.complete_step(runs[0], 0, "t:0", 1)
    store.claim_step(runs[0], 1, "u:0", [], 60.0)
    assert store.complete_last_step(runs[0], 1, "u:0", 2) == "succeeded"
    assert [p.run_id for p in store.promote(key, 1, 0.0, DEAD_AFTER)] == [runs[2]]
    assert ("s", "queued") not in gauge_equals_rows()
