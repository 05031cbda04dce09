"""Bad input is refused before anything is written (SQLite, no broker needed)."""

import pytest
from sqlalchemy import func, select

from sagaflow import (
    InvalidInput,
    SagaClient,
    UnknownSaga,
    tasks,  # noqa: F401
)
from sagaflow.app import configure
from sagaflow.config.settings import Settings
from sagaflow.errors import BrokerUnavailable
from sagaflow.store import tables


@pytest.fixture
def client(store, tmp_path):
    configure(Settings.from_env({"SAGAFLOW_HOME": str(tmp_path), "SAGAFLOW_DATABASE_URL": store.url}))
    yield SagaClient(store)
    configure()


@pytest.mark.parametrize("saga,data,error,match", [
    ("nope", {}, UnknownSaga, "unknown saga 'nope'"),
    ("create_booking", [1], InvalidInput, "must be a JSON object"),
    ("create_booking", {"a": {1, 2}}, InvalidInput, "not JSON-serializable"),
    ("create_booking", {"a": float("inf")}, InvalidInput, "not JSON-serializable"),
])
def test_bad_start_is_refused_and_writes_nothing(client, store, saga, data, error, match):
    with pytest.raises(error, match=match):
        client.start(saga, data)
    assert store.list_runs()[1] == 0


def test_without_a_broker_start_says_what_to_do_and_writes_nothing(client, store):
    with pytest.raises(BrokerUnavailable, match="sagaflow worker"):
        client.start("create_booking", {})
    assert store.list_runs()[1] == 0


@pytest.fixture
def closed_broker_client(store, tmp_path):
    """A broker URL on a port nothing listens on (not the embedded broker: the publish itself fails)."""
    configure(Settings.from_env({"SAGAFLOW_HOME": str(tmp_path), "SAGAFLOW_DATABASE_URL": store.url,
                                 "SAGAFLOW_BROKER_URL": "redis://127.0.0.1:1/0"}))
    yield SagaClient(store)
    configure()


@pytest.mark.parametrize("key", [None, "order-17"])
def test_a_start_the_broker_refuses_records_nothing(closed_broker_client, store, key):
    for _ in range(2):  # the idempotency key is free again: the second start is refused the same way
        with pytest.raises(BrokerUnavailable, match="nothing was recorded: check SAGAFLOW_BROKER_URL"):
            closed_broker_client.start("create_booking", {"customer": "c1"}, idempotency_key=key)
        assert store.list_runs()[1] == 0
    with store.engine.connect() as conn:
        for table in (tables.runs, tables.steps, tables.events):
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0


def test_discard_leaves_a_run_that_has_begun(store):
    from sagaflow.model import StepSpec
    from sagaflow.store.discard import discard_unpublished_run

    run, _ = store.create_run("r-begun", "create_booking", 1, {}, [StepSpec("a", True), StepSpec("b", False)])
    assert store.claim_step(run.id, 0, "t:0", [], 30).outcome.value == "claimed"
    assert not discard_unpublished_run(store, run.id)
    assert store.get_run(run.id).step("a").status == "running"
    run, _ = store.create_run("r-fresh", "create_booking", 1, {}, [StepSpec("a", True)])
    assert discard_unpublished_run(store, run.id)
    assert not discard_unpublished_run(store, run.id)  # gone
    assert store.list_runs()[1] == 1
