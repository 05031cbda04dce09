"""A real prefork worker (``sagaflow worker`` in a subprocess, tests/workers.py) against real Redis and
PostgreSQL."""

from __future__ import annotations

import os
import shutil

import pytest
import redis

from sagaflow.app import configure, load_sagas
from sagaflow.config.settings import Settings
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

    if services.broker_missing:
        pytest.skip(f"SAGAFLOW_TEST_BROKER asks for a broker that is not here: {services.broker_missing}")

    database_url = fresh_database(services.pg_admin_url)
    if services.broker_url == services.redis_url:
        redis.Redis.from_url(services.redis_url).flushdb()  # our own db number only
    settings = Settings.from_env({
        "SAGAFLOW_HOME": str(tmp_path_factory.mktemp("sagaflow-home")),
        "SAGAFLOW_DATABASE_URL": services.pooled(database_url),  # SAGAFLOW_TEST_PGBOUNCER=1: through PgBouncer
        "SAGAFLOW_BROKER_URL": services.broker_url,
        # Every worker that consumes the default queue (errbacks) must register every saga: the liveness
        # sagas too, since their workers share the default queue with the session's worker.
        "SAGAFLOW_IMPORTS": "sagaflow.tasks,tests.sagas,tests.sagas_flags,tests.sagas_signals,tests.sagas_branches,"
                            "tests.sagas_liveness,tests.sagas_timers,tests.sagas_limits,tests.sagas_maps",
        "SAGAFLOW_SAGA_FILES": f"{ROOT / 'config' / 'sagas.yaml'},{ROOT / 'tests' / 'sagas_maps.yaml'}",
        "SAGAFLOW_LOG_LEVEL": "INFO",
        "SAGAFLOW_ALERT_HOOK": "tests.sagas:record_alert",
        # On RabbitMQ, queues with x-max-priority (a fresh vhost: none was declared without it), so the pass
        # also checks that run priorities are served there and that everything else works on such queues.
        **({"SAGAFLOW_RABBITMQ_PRIORITY": "1"} if services.broker_url.startswith("amqp") else {}),
    })
    upgrade(database_url)  # direct: DDL needs no pooler
    configure(settings)
    load_sagas(settings)  # register the sagas in this process too: the modules, then the saga file
    from sagaflow.tasks.effects import ensure_table

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


# ---------------------------------------------------------------------------------------------- the web app

WEB_TOKEN = "test-token-7f3a9c-0b1e5d2a9c4f8e7d6b5a"  # 32+ characters, as SAGAFLOW_API_TOKEN requires
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
    from sagaflow.web import create_app

    url, stop = serve(create_app(settings.with_(flower_url="http://127.0.0.1:5555", api_max_body=WEB_MAX_BODY)))
    yield url
    stop()


@pytest.fixture(scope="session")
def web_token_url(settings, worker, web_url):
    """The same app with SAGAFLOW_API_TOKEN set."""
    from sagaflow.web import create_app

    url, stop = serve(create_app(settings.with_(api_token=WEB_TOKEN, flower_url="http://127.0.0.1:5555",
                                                api_max_body=WEB_MAX_BODY)))
    yield url
    stop()


# ---------------------------------------------------------------------------------------------- the browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    if not shutil.which(CHROMIUM):
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1366, "height": 900})  # a laptop screen
    page = context.new_page()
    page.dialogs = []  # every alert/confirm the page opened
    page.accept_dialogs = False  # dismissed unless a test says otherwise
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message),
                                      dialog.accept() if page.accept_dialogs else dialog.dismiss()))
    page.console_errors = []
    page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
    yield page
    context.close()
