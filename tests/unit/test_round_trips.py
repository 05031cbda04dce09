"""The round trips a step costs on PostgreSQL, counted on the wire (tests/wire.py): the store's calls a step's
task makes on the W1 success path, for a 4-step run, as the runtime makes them (runtime/steps.py): claim,
then complete (the last step's completion finishes the run). Counts, never time.

Two round trips per step, and one durable commit: the claim's commit does not wait for the WAL flush
(store/fastpath.py, CLAIM_STEP says why that is safe); the completion's does."""

import pytest
from sqlalchemy import text

from sagaflow.model import ClaimOutcome
from sagaflow.store import Store
from sagaflow.store.fastpath import NO_FLUSH_WAIT
from tests.wire import WireRecorder

STEPS = [("a", True), ("b", True), ("c", True), ("d", True)]


@pytest.fixture
def recorder(postgres_url):
    if postgres_url is None:
        pytest.skip("no PostgreSQL answers; the integration tests start one")
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    wire = WireRecorder(url.host or "127.0.0.1", url.port or 5432)
    yield wire
    wire.close()


@pytest.fixture(params=["prepared", "text"])
def wired_store(request, recorder, postgres_url):
    """A store that reaches PostgreSQL through the recorder; "text": the statements sent as text, as behind
    PgBouncer in transaction mode (SAGAFLOW_PREPARED_STATEMENTS=false)."""
    store = Store(recorder.url(postgres_url), prepared_statements=request.param == "prepared")
    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE saga_map_items, saga_signals, saga_events, saga_steps, saga_runs, saga_counters, "
                          "saga_counter_log"))
    # The hot path's connection: opened (and its statements prepared) before anything is counted.
    store.create_run("warm-up", "s", 1, {}, STEPS)
    assert store.claim_step("warm-up", 0, "w:0", [], 30).outcome is ClaimOutcome.CLAIMED
    yield store
    store.dispose()


def test_a_four_step_run_costs_two_round_trips_per_step_and_one_durable_commit(wired_store, recorder):
    store = wired_store
    mark = recorder.mark()
    store.create_run("r", "s", 1, {"n": 1}, STEPS)
    assert len(recorder.since(mark)) == 1  # the start: the run, its steps and its event in one statement

    per_step = []
    for k in range(4):
        mark = recorder.mark()
        claim = store.claim_step("r", k, f"t{k}:0", [], 30)
        assert claim.outcome is ClaimOutcome.CLAIMED and claim.input == {"n": 1}
        if k < 3:
            assert store.complete_step("r", k, f"t{k}:0", {"k": k})
        else:
            assert store.complete_last_step("r", k, f"t{k}:0", {"k": k}) == "succeeded"
        per_step.append(recorder.since(mark))

    assert [len(trips) for trips in per_step] == [2, 2, 2, 2]
    assert sum(len(trips) for trips in per_step) == 8
    for claim_trip, complete_trip in per_step:
        assert claim_trip.startswith(NO_FLUSH_WAIT)  # the claim: committed without waiting for the flush
        assert "synchronous_commit" not in complete_trip  # the completion: a durable commit
    run = store.get_run("r")
    assert run.status == "succeeded" and [s.result for s in run.steps] == [{"k": k} for k in range(4)]


def test_a_failing_fourth_step_begins_the_undos_in_its_own_round_trip(wired_store, recorder):
    """W2: the 4th step fails for good; its failure and the run's move to compensating are one statement
    (store.fail_and_compensate, no errback task between), then each undo costs a claim (without the flush
    wait, as a step's) and a completion (durable)."""
    store = wired_store
    store.create_run("w2", "s", 1, {}, STEPS)
    mark = recorder.mark()
    for k in range(3):
        assert store.claim_step("w2", k, f"t{k}:0", [], 30).outcome is ClaimOutcome.CLAIMED
        assert store.complete_step("w2", k, f"t{k}:0", {"k": k})
    assert store.claim_step("w2", 3, "t3:0", [], 30).outcome is ClaimOutcome.CLAIMED
    fail = recorder.mark()
    assert store.fail_and_compensate("w2", 3, "t3:0", "ValueError: no") == (True, [2, 1, 0])
    assert len(recorder.since(fail)) == 1
    for k in (2, 1, 0):
        undo = recorder.mark()
        assert store.claim_compensation("w2", k, f"u{k}:0", [], 30).outcome is ClaimOutcome.CLAIMED
        store.complete_compensation("w2", k, f"u{k}:0")
        claim_trip, complete_trip = recorder.since(undo)
        assert claim_trip.startswith(NO_FLUSH_WAIT) and "synchronous_commit" not in complete_trip
    assert len(recorder.since(mark)) == 3 * 2 + 2 + 3 * 2  # was 15 with the errback's own statement
    assert store.get_run("w2").status == "compensated"


def test_the_claims_commit_setting_stays_with_its_own_statement(wired_store, recorder):
    """SET LOCAL lasts for the claim's own transaction: the connection's next statement commits durably."""
    store = wired_store
    store.create_run("r2", "s", 1, {}, STEPS)
    assert store.claim_step("r2", 0, "t:0", [], 30).outcome is ClaimOutcome.CLAIMED
    assert store._read(lambda conn: conn.execute(text("SHOW synchronous_commit")).scalar()) == "on"


def test_a_duplicate_claim_still_backs_off_and_a_retry_still_takes_over(wired_store):
    """The non-durable claim is the same compare-and-set while PostgreSQL runs (store/guards.claimable)."""
    store = wired_store
    store.create_run("r3", "s", 1, {}, STEPS)
    assert store.claim_step("r3", 0, "t:0", [], 30).outcome is ClaimOutcome.CLAIMED
    assert store.claim_step("r3", 0, "t:0", [], 30).outcome is ClaimOutcome.BUSY  # the same message again
    assert store.claim_step("r3", 0, "u:0", [], 30).outcome is ClaimOutcome.BUSY  # another copy
    retry = store.claim_step("r3", 0, "t:1", ["t:0"], 30)
    assert retry.outcome is ClaimOutcome.CLAIMED and retry.attempt == 2
    assert not store.complete_step("r3", 0, "t:0", {})  # the earlier delivery no longer holds it
    assert store.complete_step("r3", 0, "t:1", {})
