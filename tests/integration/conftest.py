"""A real prefork worker (``sagaflow worker`` in a subprocess) against real Redis and PostgreSQL.
Never eager mode: it hides exactly the errback and chain behaviour under test (celery-facts.md, 8)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

from config.settings import Settings
from sagaflow.app import celery_app, configure, load_sagas
from tests.conftest import ARTIFACTS, ROOT
from tests.services import find_services, fresh_database


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
    })
    upgrade(database_url)
    configure(settings)
    load_sagas(settings)  # register the sagas in this process too: the modules, then the saga file
    from tasks.effects import ensure_table

    ensure_table()
    return settings


def start_worker(settings: Settings, name: str, concurrency: int = 4, log_name: str = "worker.log"):
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagaflow", "worker", "-P", "prefork", "-c", str(concurrency), "-n", f"{name}@%h"],
        env={**os.environ, **settings.as_env()}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not celery_app.control.ping(destination=[f"{name}@{os.uname().nodename}"], timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {name} did not start; see {ARTIFACTS / log_name}")
    return proc


def stop_worker(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def worker(settings):
    proc = start_worker(settings, "tests")
    yield proc
    stop_worker(proc)


@pytest.fixture
def client(worker):
    from sagaflow import SagaClient

    return SagaClient()
