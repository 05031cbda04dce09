"""client.start_many with the session's real worker, Redis and PostgreSQL: a batch of 100 runs all succeed, a
batch with one bad input writes nothing, idempotency keys hold inside and across batches, /metrics counts
the batch at once; and one start (or one batch) is one SQL round trip on PostgreSQL."""

from __future__ import annotations

import pytest

from sagaflow import InvalidInput
from tests.helpers import round_trips
from tests.integration.test_web_metrics import delta, scrape

pytestmark = pytest.mark.integration

SAGA = "commit_order"  # two steps; the second checks in SQL that the first's result was committed first


def wait_all(client, runs, timeout=120):
    return [client.wait(run.id, timeout=timeout) for run in runs]


def test_a_batch_of_100_runs_all_succeed_and_metrics_count_them_at_once(client, web_url):
    before = scrape(web_url)
    runs = client.start_many(SAGA, [{"n": i} for i in range(100)])
    assert len({r.id for r in runs}) == 100 and all(r.status == "pending" for r in runs)
    assert [r.input for r in runs] == [{"n": i} for i in range(100)]
    assert delta(before, scrape(web_url), "sagaflow_runs_started_total", saga=SAGA) == 100
    done = wait_all(client, runs)
    assert {r.status for r in done} == {"succeeded"}
    assert all(r.step("second").result == {"seen": r.step("first").result} for r in done)
    assert all(r.step("first").attempts == 1 for r in done)


def test_a_batch_with_one_bad_input_writes_nothing(client):
    total = client.list(saga=SAGA).total
    with pytest.raises(InvalidInput, match=r"1 of 3 items are invalid, nothing was started: item 2: input must be"):
        client.start_many(SAGA, [{"n": 1}, {"n": 2}, ["not", "a", "dict"]], idempotency_keys=["bad-a", "bad-b", None])
    assert client.list(saga=SAGA).total == total
    assert client.list(idempotency_key="bad-a").total == 0


def test_duplicate_keys_inside_and_across_batches_start_one_run_each(client):
    first = client.start_many(SAGA, [{"n": 1}, {"n": 2}, {"n": 3}], idempotency_keys=["dup-a", "dup-b", "dup-a"])
    assert first[2].id == first[0].id and first[1].id != first[0].id
    second = client.start_many(SAGA, [{"n": 4}, {"n": 5}], idempotency_keys=["dup-b", "dup-c"])
    assert second[0].id == first[1].id
    single = client.start(SAGA, {"n": 6}, idempotency_key="dup-c")
    assert single.id == second[1].id
    for key in ("dup-a", "dup-b", "dup-c"):
        assert client.list(idempotency_key=key).total == 1
    done = wait_all(client, [first[0], first[1], second[1]])
    assert {r.status for r in done} == {"succeeded"}
    assert all(r.step("first").attempts == 1 for r in done)  # each run published once


def test_one_start_is_one_sql_round_trip(client):
    if not client.store.fast:
        pytest.skip("the one-statement start is PostgreSQL's")
    wait_all(client, [client.start(SAGA, {"warm": True})])  # a connection with its prepared statements
    runs = []
    for options in ({}, {"idempotency_key": "rt-1"}, {"deadline": 60}, {"priority": 7}):
        with round_trips(client.store) as counted:
            runs.append(client.start(SAGA, {"n": 1}, **options))
        assert counted["n"] == 1, options
    with round_trips(client.store) as counted:
        runs += client.start_many(SAGA, [{"n": i} for i in range(50)], idempotency_keys=[f"rt-b{i}" for i in range(50)])
    assert counted["n"] == 1
    assert {r.status for r in wait_all(client, runs)} == {"succeeded"}
