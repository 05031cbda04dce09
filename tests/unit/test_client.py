"""Bad input is refused before anything is written (SQLite, no broker needed)."""

import pytest

from sagaflow import InvalidInput, SagaClient, UnknownSaga
from sagaflow.app import configure
from sagaflow.errors import BrokerUnavailable
from config.settings import Settings
import tasks  # noqa: F401


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
