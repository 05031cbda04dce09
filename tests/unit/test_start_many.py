"""Starting runs in one statement (store.create_runs: fastpath.CREATE_RUNS on PostgreSQL, one transaction on
SQLite) and client.start_many: what is written matches what start always wrote, idempotency keys hold inside
and across batches, the counters count each run once, and a batch with one bad item writes nothing."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from sagaflow import InvalidInput, SagaClient, tasks  # noqa: F401  (tasks: the example sagas)
from sagaflow.app import configure
from sagaflow.config.settings import Settings
from sagaflow.errors import BrokerUnavailable
from sagaflow.model import StepSpec
from sagaflow.store import tables as t
from tests.helpers import round_trips

STEPS = [StepSpec("reserve", True), StepSpec("charge", True), StepSpec("notify", False)]
SPECIAL = [StepSpec("prepare", True), StepSpec("left", True, group=1), StepSpec("right", True, group=1),
           StepSpec("approve", False, kind="gate", signal="approved"), StepSpec("ship", True, pivot=True),
           StepSpec("tell", False, best_effort=True)]


def rows(store, table) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def started_total(store, saga: str) -> int:
    return store.counter_values().started.get(saga, 0)


def test_create_runs_writes_what_create_run_read_back_shows(store):
    answers = store.create_runs("pay", 3, [("r1", {"a": 1}, None), ("r2", {"b": [1, 2]}, "k2")], STEPS)
    assert [created for _, created in answers] == [True, True]
    for run, _ in answers:
        stored = store.get_run(run.id)
        assert (stored.status, stored.input, stored.idempotency_key, stored.saga_version) == \
            (run.status, run.input, run.idempotency_key, 3) == ("pending", run.input, run.idempotency_key, 3)
        assert [(s.name, s.status, s.has_compensation) for s in stored.steps] == \
            [(s.name, s.status, s.has_compensation) for s in run.steps] == \
            [("reserve", "pending", True), ("charge", "pending", True), ("notify", "pending", False)]
        assert [(e.id, e.kind, e.detail) for e in stored.events] == [(e.id, e.kind, e.detail) for e in run.events]
        assert [e.kind for e in stored.events] == ["run_started"]
    assert started_total(store, "pay") == 2
    assert store.counter_values().live[("pay", "pending")] == 2


def test_special_steps_are_written_as_the_definition_says(store):
    (run, created), = store.create_runs("flow", 1, [("r-special", {}, None)], SPECIAL)
    assert created
    stored = store.get_run(run.id)
    assert [(s.name, s.kind, s.group, s.signal, s.pivot, s.best_effort, s.non_atomic) for s in stored.steps] == \
        [(s.name, s.kind, s.group, s.signal, s.pivot, s.best_effort, s.non_atomic) for s in SPECIAL]


def test_duplicate_keys_inside_and_across_batches(store):
    first = store.create_runs("pay", 1, [("a1", {"n": 1}, "ka"), ("b1", {"n": 2}, "kb"), ("a2", {"n": 3}, "ka"),
                                          ("n1", {"n": 4}, None)], STEPS)
    assert [created for _, created in first] == [True, True, False, True]
    assert first[2][0].id == "a1" and first[2][0].input == {"n": 1}  # the first item's run, as start answers
    second = store.create_runs("pay", 1, [("a3", {"n": 5}, "ka"), ("c1", {"n": 6}, "kc"), ("c2", {}, "kc")], STEPS)
    assert [(run.id, created) for run, created in second] == [("a1", False), ("c1", True), ("c1", False)]
    assert rows(store, t.runs) == 4
    assert rows(store, t.steps) == 4 * len(STEPS)
    assert rows(store, t.events) == 4
    assert started_total(store, "pay") == 4  # each run counted once, repeats not at all


def test_delayed_starts_with_a_deadline(store):
    start_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(hours=1)
    answers = store.create_runs("pay", 1, [("d1", {}, None), ("d2", {}, "kd")], STEPS, start_at=start_at,
                                deadline=60)
    for run, created in answers:
        assert created
        stored = store.get_run(run.id)
        assert stored.status == run.status == "scheduled"
        assert stored.start_at == run.start_at == start_at
        assert stored.deadline_at == run.deadline_at == start_at + dt.timedelta(seconds=60)
        assert [(e.id, e.kind, e.detail) for e in stored.events] == [(e.id, e.kind, e.detail) for e in run.events]
        assert [e.kind for e in stored.events] == ["run_started", "run_scheduled"]  # in that order
        assert stored.events[1].detail == {"start_at": start_at.isoformat()}
    assert store.counter_values().live[("pay", "scheduled")] == 2


def test_a_deadline_counts_from_now_for_a_run_started_now(store):
    before = dt.datetime.now(dt.timezone.utc)
    (run, _), = store.create_runs("pay", 1, [("n1", {}, None)], STEPS, deadline=30)
    stored = store.get_run(run.id)
    assert stored.deadline_at == run.deadline_at
    assert before + dt.timedelta(seconds=29) < stored.deadline_at < before + dt.timedelta(seconds=40)


def test_plain_runs_have_no_steps_and_no_events(store):
    answers = store.create_runs("pay", 1, [("p1", {}, None), ("p2", {}, "kp")], STEPS, mode="plain")
    for run, _ in answers:
        stored = store.get_run(run.id)
        assert (stored.mode, stored.steps, stored.events) == ("plain", (), ())
    assert started_total(store, "pay") == 2


def test_one_round_trip_for_a_start_and_for_a_batch_on_postgresql(store):
    if not store.fast:
        pytest.skip("the one-statement start is PostgreSQL's (SQLite: one transaction)")
    store.create_runs("pay", 1, [("warm", {}, None)], STEPS)  # a connection, its prepared statements
    start_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    with round_trips(store) as one:
        store.create_runs("pay", 1, [("r1", {"x": 1}, "k1")], SPECIAL, deadline=30)
    assert one["n"] == 1
    with round_trips(store) as delayed:
        store.create_runs("pay", 1, [("r2", {}, None)], STEPS, start_at=start_at, deadline=30)
    assert delayed["n"] == 1
    with round_trips(store) as batch:
        store.create_runs("pay", 1, [(f"b{i}", {"i": i}, f"kb{i}") for i in range(100)], STEPS)
    assert batch["n"] == 1
    assert rows(store, t.runs) == 103


def test_sent_as_text_the_statement_writes_the_same(store):
    """Behind PgBouncer in transaction mode (SAGAFLOW_PREPARED_STATEMENTS=false) the statement goes as text,
    its parameters untyped literals: every kind of run still comes out as the prepared one writes it."""
    if not store.fast:
        pytest.skip("PostgreSQL's statement")
    store.fast.prepared = False
    start_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(hours=1)
    (delayed, _), = store.create_runs("pay", 1, [("t1", {"a": [1]}, "kt")], SPECIAL, start_at=start_at, deadline=9)
    stored = store.get_run("t1")
    assert (stored.status, stored.start_at, stored.deadline_at) == ("scheduled", start_at,
                                                                   start_at + dt.timedelta(seconds=9))
    assert [e.kind for e in stored.events] == ["run_started", "run_scheduled"]
    assert [(s.name, s.kind, s.group, s.signal) for s in stored.steps] == [(s.name, s.kind, s.group, s.signal)
                                                                           for s in SPECIAL]
    again = store.create_runs("pay", 1, [("t2", {}, "kt"), ("t3", {}, None)], STEPS, mode="plain")
    assert [(run.id, created) for run, created in again] == [("t1", False), ("t3", True)]
    assert store.get_run("t3").events == ()
    assert started_total(store, "pay") == 2


# ---------------------------------------------------------------------------------------------- the client


@pytest.fixture
def client(store, tmp_path):
    configure(Settings.from_env({"SAGAFLOW_HOME": str(tmp_path), "SAGAFLOW_DATABASE_URL": store.url}))
    yield SagaClient(store)
    configure()


@pytest.mark.parametrize("inputs,keys,match", [
    ([{}, [1], {}, "x"], None, r"2 of 4 items are invalid, nothing was started: item 1: input must be a JSON "
                              r"object .*; item 3: input must be"),
    ([{}, {"a": {1, 2}}], None, r"item 1: .*not JSON-serializable"),
    ([{}, {}], ["k", ""], r"item 1: idempotency_key must be a non-empty string"),
    ([{}, {}], ["k"], r"one key \(or None\) per input \(2\)"),
    ([{}, {}], "kk", r"one key \(or None\) per input"),
    ({"a": 1}, None, r"inputs must be a list of JSON objects"),
    ("abc", None, r"inputs must be a list"),
    ([{}] * 1001, None, r"at most 1000 inputs"),
])
def test_a_batch_with_a_bad_item_writes_nothing(client, store, inputs, keys, match):
    with pytest.raises(InvalidInput, match=match):
        client.start_many("create_booking", inputs, idempotency_keys=keys, delay=60)
    for table in (t.runs, t.steps, t.events, t.counter_log):
        assert rows(store, table) == 0


def test_bad_options_write_nothing(client, store):
    for options in ({"priority": 10}, {"deadline": -1}, {"delay": 0}, {"delay": 5, "at": dt.datetime.now()}):
        with pytest.raises(InvalidInput):
            client.start_many("create_booking", [{}], **options)
    assert rows(store, t.runs) == 0


def test_start_many_delayed_keeps_keys_and_order(client, store):
    runs = client.start_many("create_booking", [{"n": i} for i in range(5)],
                             idempotency_keys=["a", None, "b", "a", None], delay=3600)
    assert [r.input for r in runs] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 0}, {"n": 4}]
    assert runs[3].id == runs[0].id
    assert all(r.status == "scheduled" for r in runs)
    again = client.start_many("create_booking", [{"n": 9}, {"n": 10}], idempotency_keys=["b", "c"], delay=3600)
    assert again[0].id == runs[2].id and again[1].id not in {r.id for r in runs}
    assert rows(store, t.runs) == 5  # a, n1, b, n4, c
    assert started_total(store, "create_booking") == 5
    assert client.start_many("create_booking", []) == []


def test_the_snapshot_start_many_returns_is_what_get_reads(client, store):
    run, = client.start_many("create_booking", [{"customer": "c1"}], idempotency_keys=["x"], delay=60, deadline=5)
    stored = client.get(run.id)
    for field in ("id", "saga", "saga_version", "status", "input", "idempotency_key", "mode", "start_at",
                  "deadline_at", "created_at"):
        assert getattr(run, field) == getattr(stored, field), field
    assert [(s.name, s.status) for s in run.steps] == [(s.name, s.status) for s in stored.steps]
    assert [(e.id, e.kind) for e in run.events] == [(e.id, e.kind) for e in stored.events]


@pytest.fixture
def closed_broker_client(store, tmp_path):
    configure(Settings.from_env({"SAGAFLOW_HOME": str(tmp_path), "SAGAFLOW_DATABASE_URL": store.url,
                                 "SAGAFLOW_BROKER_URL": "redis://127.0.0.1:1/0"}))
    yield SagaClient(store)
    configure()


def test_a_batch_the_broker_refuses_records_nothing(closed_broker_client, store):
    with pytest.raises(BrokerUnavailable, match="0 of 3 new runs started"):
        closed_broker_client.start_many("create_booking", [{}, {}, {}], idempotency_keys=["a", "b", None])
    for table in (t.runs, t.steps, t.events):
        assert rows(store, table) == 0
