"""store/fastpath.py's prepared statements go to the driver directly (PostgreSQL only): what they return
reads as the transactional path's would, and a connection the server dropped surfaces as SQLAlchemy's
OperationalError (which the runtime's outage retries catch) and leaves the pool."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from sagaflow.model import ClaimOutcome
from sagaflow.store import Store

STEPS = [("a", True), ("b", True)]


@pytest.fixture
def pg_store(postgres_url):
    if postgres_url is None:
        pytest.skip("no PostgreSQL answers; the integration tests start one")
    store = Store(postgres_url)
    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE saga_map_items, saga_signals, saga_events, saga_steps, saga_runs, saga_counters, "
                          "saga_counter_log"))
    yield store
    store.dispose()


def test_results_and_json_values_read_back_as_python_values(pg_store):
    pg_store.create_run("r1", "s", 1, {"nested": {"x": [1, "two", None]}}, STEPS)
    claim = pg_store.claim_step("r1", 0, "t1:0", [], 30)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.input == {"nested": {"x": [1, "two", None]}}
    assert pg_store.complete_step("r1", 0, "t1:0", None)  # None is stored as JSON null
    again = pg_store.claim_step("r1", 0, "t2:0", [], 30)
    assert again.outcome is ClaimOutcome.DONE and again.result is None
    assert pg_store.claim_step("r1", 1, "t3:0", [], 30).outcome is ClaimOutcome.CLAIMED
    assert pg_store.complete_last_step("r1", 1, "t3:0", {"ok": 1.5}) == "succeeded"
    run = pg_store.get_run("r1")
    assert run.status == "succeeded" and run.steps[1].result == {"ok": 1.5}
    assert run.steps[0].started_at.tzinfo is not None  # timestamps were stored as UTC
    assert abs((run.steps[0].started_at - run.created_at).total_seconds()) < 5


def test_a_dropped_connection_raises_operational_error_and_the_next_call_gets_a_fresh_one(pg_store):
    pg_store.create_run("r2", "s", 1, {}, STEPS)
    assert pg_store.claim_step("r2", 0, "t1:0", [], 30).outcome is ClaimOutcome.CLAIMED  # a pooled connection
    admin = Store(pg_store.url)
    with admin.engine.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    admin.dispose()
    with pytest.raises(OperationalError) as caught:
        pg_store.complete_step("r2", 0, "t1:0", {"v": 1})
    assert caught.value.connection_invalidated
    assert pg_store.complete_step("r2", 0, "t1:0", {"v": 1})  # a new connection, prepared again


def test_a_database_that_cannot_be_reached_raises_sqlalchemy_operational_error():
    from tests.services import free_port

    store = Store(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere")
    assert store.fast is not None
    with pytest.raises(OperationalError):  # what the runtime's outage retries catch, not psycopg2's own
        store.claim_step("r", 0, "t:0", [], 30)
