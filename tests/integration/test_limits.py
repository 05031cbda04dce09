"""Limits across every worker (issue 19): a step's concurrency and rate_limit, a saga's max_concurrent_runs,
held by the state store, not per process. Two `sagaflow worker`s of four prefork processes each consume the
limited steps' queue; every action records when it ran (tests/sagas_limits.py), and the tests count."""

from __future__ import annotations

import signal
import time

import pytest

from sagaflow import SagaClient
from tests.helpers import kinds, wait_for
from tests.sagas_limits import PRIO_QUEUE, QUEUE, SOLO_QUEUE, ensure_table, most_at_once, recorded
from tests.workers import start_worker, stop_worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_workers(settings, worker):
    ensure_table()
    procs = [start_worker(settings, f"limits{n}", concurrency=4, log_name=f"limits{n}.log",
                          args=("-Q", f"{QUEUE},celery")) for n in (1, 2)]
    yield procs
    for proc in procs:
        stop_worker(proc)


@pytest.fixture
def client(two_workers):
    return SagaClient()


def wait_all(client, run_ids, timeout=120):
    return [client.wait(run_id, timeout=timeout) for run_id in run_ids]


def test_forty_runs_through_a_concurrency_3_step_never_run_more_than_3_at_once(client):
    ids = [client.start("limit_concurrency", {"sleep": 0.3}).id for _ in range(40)]
    runs = wait_all(client, ids)
    assert {r.status for r in runs} == {"succeeded"}
    spans = [(b, e) for run_id, b, e in recorded("limit_concurrency") if run_id in set(ids)]
    assert len(spans) == 40 and all(e is not None for _, e in spans)
    assert most_at_once(spans) == 3  # the limit binds, and holds across both workers
    queued = [r for r in runs if ("step_queued", "call_provider") in kinds(r)]
    assert queued, "some runs waited in line"


def test_a_rate_limit_of_5_per_second_holds_across_two_workers_over_10_seconds(client):
    ids = [client.start("limit_rate", {}).id for _ in range(50)]
    runs = wait_all(client, ids)
    assert {r.status for r in runs} == {"succeeded"}
    starts = sorted(b for run_id, b, _ in recorded("limit_rate") if run_id in set(ids))
    assert len(starts) == 50
    assert starts[-1] - starts[0] >= 9.0  # 50 starts at 5 per second take about 10 seconds
    for i, first in enumerate(starts):  # every window of one second, beginning at each start
        assert sum(1 for s in starts[i:i + 6] if s < first + 1.0) <= 5, f"more than 5 starts after {first}"


def test_max_concurrent_runs_2_ten_runs_and_a_queued_run_cancelled(client):
    ids = [client.start("limit_runs", {"sleep": 0.5}).id for _ in range(10)]
    wait_for(lambda: any(client.get(i).status == "queued" for i in ids), timeout=30, what="a queued run")
    doomed = next(i for i in reversed(ids) if client.get(i).status == "queued")
    cancelled = client.cancel(doomed)
    assert cancelled.status == "cancelled"
    runs = wait_all(client, ids)
    by_id = {r.id: r for r in runs}
    assert by_id[doomed].status == "cancelled" and ("run_queued", None) in kinds(by_id[doomed])
    assert [s.status for s in by_id[doomed].steps] == ["skipped", "skipped"]
    assert {r.status for r in runs if r.id != doomed} == {"succeeded"}
    # A run's span: its first step's start to its end (finished_at), from SQL.
    spans = [(r.steps[0].started_at.timestamp(), r.finished_at.timestamp()) for r in runs if r.id != doomed]
    assert most_at_once(spans) <= 2
    assert sum(1 for r in runs if ("run_queued", None) in kinds(r)) >= 5
    # They were given their slots in the order they came. Two slots: two runs granted together (the first
    # two, or two freed at once) run on two worker processes and may begin in either order, so a run may
    # start at most one place from its place in line, never further.
    order = [r.id for r in sorted((r for r in runs if r.id != doomed), key=lambda r: r.steps[0].started_at)]
    line = [i for i in ids if i != doomed]
    assert max(abs(order.index(i) - line.index(i)) for i in line) <= 1, (order, line)


def test_start_many_under_max_concurrent_runs_2_queues_and_runs_them_all(client):
    runs = client.start_many("limit_runs", [{"sleep": 0.3} for _ in range(8)])
    done = wait_all(client, [r.id for r in runs])
    assert {r.status for r in done} == {"succeeded"}
    spans = [(r.steps[0].started_at.timestamp(), r.finished_at.timestamp()) for r in done]
    assert most_at_once(spans) <= 2
    assert sum(1 for r in done if ("run_queued", None) in kinds(r)) >= 4


def test_a_worker_killed_while_holding_a_slot_frees_it(settings, client):
    doomed = start_worker(settings, "limitsdoomed", concurrency=2, log_name="limitsdoomed.log",
                          args=("-Q", SOLO_QUEUE))
    first = client.start("limit_solo", {"sleep": 30}).id
    wait_for(lambda: client.get(first).step("alone").status == "running", timeout=30, what="the holder")
    second = client.start("limit_solo", {"sleep": 0.1}).id
    wait_for(lambda: client.get(second).step("alone").status == "queued", timeout=30, what="the second in line")
    doomed.send_signal(signal.SIGKILL)  # holds the only slot, for 30 s more; its lease would last minutes
    doomed.wait()
    rescue = start_worker(settings, "limitsrescue", concurrency=2, log_name="limitsrescue.log",
                          args=("-Q", SOLO_QUEUE))
    try:
        began = time.monotonic()
        assert client.wait(second, timeout=90).status == "succeeded"
        freed_after = time.monotonic() - began
        assert client.wait(first, timeout=120).status == "succeeded"  # the killed holder's run is re-driven
    finally:
        stop_worker(rescue)
        stop_worker(doomed)
    assert freed_after < 60  # freed by the worker's liveness (dead after 15 s, a sweep every 5 s), not a lease
    done = [(b, e) for run_id, b, e in recorded("limit_solo") if run_id in (first, second) and e is not None]
    assert most_at_once(done) == 1


def test_under_a_backlog_of_200_runs_higher_priority_runs_finish_first(settings, worker):
    if not settings.effective_broker_url.startswith("redis") and not settings.rabbitmq_priority:
        pytest.skip("RabbitMQ serves priorities only with SAGAFLOW_RABBITMQ_PRIORITY (queues with x-max-priority)")
    client = SagaClient()
    # The backlog first: nobody consumes the queue yet. 170 runs at the default priority, then 30 urgent ones.
    low = [client.start("limit_priority", {"p": 0}).id for _ in range(170)]
    high = [client.start("limit_priority", {"p": 9}, priority=9).id for _ in range(30)]
    proc = start_worker(settings, "prio", concurrency=1, log_name="prio.log", args=("-Q", PRIO_QUEUE))
    try:
        runs = [client.wait(run_id, timeout=300) for run_id in low + high]
    finally:
        stop_worker(proc)
    assert {r.status for r in runs} == {"succeeded"}
    by_end = [r.id for r in sorted(runs, key=lambda r: r.finished_at)]
    first = set(by_end[:30])
    assert len(first & set(high)) >= 27, f"{len(first & set(high))} of the first 30 to finish were urgent"
    assert max(by_end.index(i) for i in high) < 40  # every urgent run ahead of at least 130 earlier ones
