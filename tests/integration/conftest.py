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
from sagaflow.app import celery_app, configure
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
        "SAGAFLOW_LOG_LEVEL": "INFO",
    })
    upgrade(database_url)
    configure(settings)
    import tasks  # noqa: F401  register the sagas in this process too
    import tests.sagas  # noqa: F401
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


# ---------------------------------------------------------------------------------------------- the web app

WEB_TOKEN = "test-token-7f3a9c"
WEB_MAX_BODY = 16 * 1024


def serve(app):
    """Serve a Flask app on a free port in a thread (a real HTTP server, as gunicorn would be); returns
    (base URL, stop)."""
    import threading

    from werkzeug.serving import make_server

    from tests.services import free_port

    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="web-test-server", daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        thread.join(10)

    return f"http://127.0.0.1:{server.server_port}", stop


@pytest.fixture(scope="session")
def web_url(settings, worker):
    """The web app with no token (anyone may act), linking to Flower at a fixed address."""
    from web import create_app

    url, stop = serve(create_app(settings.with_(flower_url="http://127.0.0.1:5555", api_max_body=WEB_MAX_BODY)))
    yield url
    stop()


@pytest.fixture(scope="session")
def web_token_url(settings, worker, web_url):
    """The same app with SAGAFLOW_API_TOKEN set."""
    from web import create_app

    url, stop = serve(create_app(settings.with_(api_token=WEB_TOKEN, flower_url="http://127.0.0.1:5555",
                                                api_max_body=WEB_MAX_BODY)))
    yield url
    stop()
