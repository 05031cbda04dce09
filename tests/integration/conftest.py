"""A real prefork worker (``sagaflow worker`` in a subprocess, tests/workers.py) against real Redis and
PostgreSQL."""

from __future__ import annotations

import pytest
import redis

from config.settings import Settings
from sagaflow.app import configure, load_sagas
from tests.conftest import ROOT
from tests.services import find_services, fresh_database
from tests.workers import start_worker, stop_worker


@pytest.fixture(scope="session")
def services():
    found = find_services()
    print("\n" + "\n".join(found.how))
    yield found
    found.stop()


@pytest.fixture(scope="session")
def settings(services, tmp_path_factory):
    from sagaflow.store.migrate import upgrade

    database_url = fresh_database(services.pg_admin_url)
    redis.Redis.from_url(services.redis_url).flushdb()  # our own db number only
    settings = Settings.from_env({
        "SAGAFLOW_HOME": str(tmp_path_factory.mktemp("sagaflow-home")),
        "SAGAFLOW_DATABASE_URL": database_url,
        "SAGAFLOW_BROKER_URL": services.redis_url,
        "SAGAFLOW_IMPORTS": "tasks,tests.sagas",
        "SAGAFLOW_SAGA_FILES": str(ROOT / "config" / "sagas.yaml"),
        "SAGAFLOW_LOG_LEVEL": "INFO",
        "SAGAFLOW_ALERT_HOOK": "tests.sagas:record_alert",
    })
    upgrade(database_url)
    configure(settings)
    load_sagas(settings)  # register the sagas in this process too: the modules, then the saga file
    from tasks.effects import ensure_table

    ensure_table()
    return settings


@pytest.fixture(scope="session")
def worker(settings):
    proc = start_worker(settings, "tests")
    yield proc
    stop_worker(proc)


@pytest.fixture
def client(worker):
    from sagaflow import SagaClient

    return SagaClient()
