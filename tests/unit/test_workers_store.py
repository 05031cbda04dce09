"""Worker liveness in SQL (store/workers.py), on SQLite and PostgreSQL with no broker: a claim names its
worker; a worker that stopped heartbeating makes its claims dead at once, whatever their lease; a clean
stop removes the worker; the sweeper lease is held by one caller at a time."""

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import select, text, update

from sagaflow.model import ClaimOutcome as C
from sagaflow.store import tables as t
from sagaflow.store.workers import current_worker, set_current_worker

STEPS = [("a", True), ("b", True), ("c", False)]
DEAD_AFTER = 15.0


@pytest.fixture
def store(store):
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM saga_workers"))
        conn.execute(text("DELETE FROM saga_leases"))
    yield store
    set_current_worker(None)


def as_worker(store, worker_id):
    set_current_worker(worker_id)
    store.heartbeat(worker_id, worker_id.split(":")[0], 1)


def silence(store, worker_id, seconds):
    """The worker's last heartbeat was ``seconds`` ago (it was SIGKILLed then)."""
    with store.engine.begin() as conn:
        conn.execute(update(t.workers).where(t.workers.c.id == worker_id).values(
            heartbeat_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)))


def holder(store, run_id, idx):
    with store.engine.connect() as conn:
        return conn.execute(select(t.steps.c.worker).where(t.steps.c.run_id == run_id, t.steps.c.idx == idx)).scalar()


def stalled(store):
    return [run_id for run_id, _ in store.stalled_runs(600, dead_after=DEAD_AFTER)]


def test_a_claim_names_the_worker_whose_pool_holds_it_steps_and_compensations(store):
    as_worker(store, "w1@host:11")
    store.create_run("r1", "s", 1, {}, STEPS)
    assert store.claim_step("r1", 0, "t0:0", [], 300).outcome is C.CLAIMED
    assert holder(store, "r1", 0) == "w1@host:11"
    store.complete_step("r1", 0, "t0:0", {})
    store.claim_step("r1", 1, "t1:0", [], 300)
    store.fail_step("r1", 1, "t1:0", "boom")
    assert store.begin_compensation("r1", 1, "lost") == [0]
    as_worker(store, "w2@host:22")
    assert store.claim_compensation("r1", 0, "u0:0", [], 300).outcome is C.CLAIMED
    assert holder(store, "r1", 0) == "w2@host:22"


def test_a_dead_workers_claim_stalls_the_run_at_once_whatever_its_lease_and_names_the_dead_worker(store):
    as_worker(store, "doomed@host:1")
    store.create_run("r1", "s", 1, {}, STEPS)
    store.claim_step("r1", 0, "t0:0", [], 300)  # the default step timeout: the lease runs for minutes
    assert stalled(store) == []
    silence(store, "doomed@host:1", DEAD_AFTER - 5)  # missed a beat or two: not dead yet
    assert stalled(store) == []
    assert store.stalled_runs(600) == []  # leases alone (dead_after None): the lease still runs
    silence(store, "doomed@host:1", DEAD_AFTER + 1)
    assert stalled(store) == ["r1"]
    (run_id, seen), = store.stalled_runs(600, dead_after=DEAD_AFTER)
    recovery = store.take_over_stalled(run_id, seen, 600, dead_after=DEAD_AFTER)
    assert (recovery.action, recovery.index, recovery.revoked) == ("resume", 0, ("a",))
    event = [e for e in store.get_run("r1").events if e.kind == "run_recovered"][-1]
    assert event.detail["dead_workers"] == ["doomed@host:1"]
    assert stalled(store) == []
    as_worker(store, "rescuer@host:2")
    claim = store.claim_step("r1", 0, "new:0", [], 300)
    assert claim.outcome is C.CLAIMED and claim.attempt == 2
    assert holder(store, "r1", 0) == "rescuer@host:2"
    assert not store.complete_step("r1", 0, "t0:0", {"late": True})  # the dead worker's orphan, late


def test_a_worker_that_stopped_cleanly_leaves_the_list_and_its_claims_count_as_dead(store):
    as_worker(store, "w1@host:1")
    as_worker(store, "w2@host:2")
    store.create_run("r1", "s", 1, {}, STEPS)
    store.claim_step("r1", 0, "t0:0", [], 300)
    live = store.live_workers(DEAD_AFTER)
    assert [w["id"] for w in live] == ["w1@host:1", "w2@host:2"]
    assert live[1]["holds"] == [{"run_id": "r1", "step": "a", "status": "running"}] and live[0]["holds"] == []
    assert store.remove_worker("w2@host:2")
    assert not store.remove_worker("w2@host:2")
    assert [w["id"] for w in store.live_workers(DEAD_AFTER)] == ["w1@host:1"]
    assert stalled(store) == ["r1"]


def test_a_claim_made_outside_a_worker_keeps_lease_semantics(store):
    set_current_worker(None)
    store.create_run("r1", "s", 1, {}, STEPS)
    store.claim_step("r1", 0, "t0:0", [], 300)
    assert holder(store, "r1", 0) is None and current_worker() is None
    assert stalled(store) == []


def test_the_sweeper_lease_is_held_by_one_of_fifty_callers_and_renewed_by_its_holder(store):
    won = []

    def offer(i):
        if store.take_lease("sweeper", f"w{i}", 10):
            won.append(i)

    threads = [threading.Thread(target=offer, args=(i,)) for i in range(50)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(won) == 1
    first = f"w{won[0]}"
    assert store.take_lease("sweeper", first, 0.05)  # the holder renews
    assert not store.take_lease("sweeper", "other", 10)
    time.sleep(0.1)
    assert store.take_lease("sweeper", "other", 10)  # expired: another takes over
    store.release_lease("sweeper", first)  # not its holder: nothing happens
    assert not store.take_lease("sweeper", first, 10)
    store.release_lease("sweeper", "other")
    assert store.take_lease("sweeper", first, 10)


def test_dead_workers_rows_are_forgotten_once_they_hold_nothing(store):
    as_worker(store, "dead@host:1")
    store.create_run("r1", "s", 1, {}, STEPS)
    store.claim_step("r1", 0, "t0:0", [], 300)
    silence(store, "dead@host:1", 1000)
    assert store.forget_dead_workers(60) == 0  # still named by a held claim
    store.complete_step("r1", 0, "t0:0", {})
    assert store.forget_dead_workers(60) == 1


def test_a_sweeper_sees_only_the_sagas_it_can_compile(store):
    as_worker(store, "doomed@host:1")
    store.create_run("r1", "s", 1, {}, STEPS)
    store.claim_step("r1", 0, "t0:0", [], 300)
    silence(store, "doomed@host:1", DEAD_AFTER + 1)
    assert [r for r, _ in store.stalled_runs(600, dead_after=DEAD_AFTER, sagas=["other"])] == []
    assert [r for r, _ in store.stalled_runs(600, dead_after=DEAD_AFTER, sagas=["other", "s"])] == ["r1"]


def test_a_live_workers_expired_lease_is_taken_back_without_naming_the_worker_dead(store):
    # The soak on RabbitMQ showed "dead_workers" naming a worker that heartbeated all along: only its
    # retry's message was lost, and the claim's lease ran out.
    as_worker(store, "alive@host:3")
    store.create_run("r1", "s", 1, {}, STEPS)
    store.claim_step("r1", 0, "t0:0", [], 0.05)
    time.sleep(0.1)
    store.heartbeat("alive@host:3", "host", 3)
    (run_id, seen), = store.stalled_runs(600, dead_after=DEAD_AFTER)
    recovery = store.take_over_stalled(run_id, seen, 600, dead_after=DEAD_AFTER)
    assert recovery.revoked == ("a",)
    event = [e for e in store.get_run("r1").events if e.kind == "run_recovered"][-1]
    assert "dead_workers" not in event.detail
