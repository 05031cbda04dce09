"""The store under test: SQLite (always) and PostgreSQL (when a server answers, as on this project's
machines and CI), because PostgreSQL runs the success-path transitions as single statements of their own
(store/repository.py) and both paths must hold the same guarantees."""

import os

import pytest
from sqlalchemy import text

from sagaflow.app import configure, get_store
from sagaflow.config.settings import Settings
from sagaflow.store import Store
from sagaflow.store.migrate import upgrade
from sagaflow.store.workers import set_current_worker
from tests.services import DEFAULT_PG, TEST_DATABASE, fresh_database, pg_answers


@pytest.fixture(scope="session")
def postgres_url():
    admin = os.environ.get("SAGAFLOW_TEST_PG_URL") or DEFAULT_PG
    if not pg_answers(admin):
        return None
    url = fresh_database(admin, f"{TEST_DATABASE}_unit")
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, postgres_url):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'unit.db'}"
        upgrade(url)
    else:
        if postgres_url is None:
            pytest.skip("no PostgreSQL answers; the integration tests start one")
        url = postgres_url
    s = Store(url)
    if request.param == "postgresql":
        with s.engine.begin() as conn:
            conn.execute(text("TRUNCATE saga_map_items, saga_signals, saga_events, saga_steps, saga_runs, "
                              "saga_counters, saga_counter_log"))
    yield s
    s.dispose()


@pytest.fixture
def app_and_store(tmp_path):
    """The web app on a SQLite store of its own (the page tests), and that store."""
    settings = Settings.from_env({"SAGAFLOW_HOME": str(tmp_path)})
    configure(settings)
    upgrade(settings.database_url)
    from sagaflow.web import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    yield app, get_store()
    set_current_worker(None)
    configure(Settings.from_env({}))
