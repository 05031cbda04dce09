"""The web app's guards that need no broker (Flask's test client on SQLite): bodies too deep for the
default 1 MiB limit, the warnings when the app is reachable beyond loopback without a token, and a short
token refused by ``sagaflow web`` in one line."""

import logging

import pytest
from click.testing import CliRunner

from sagaflow.app import configure
from sagaflow.config.settings import Settings
from sagaflow.store.migrate import upgrade

TOKEN = "0123456789abcdef0123456789abcdef"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def warnings():
    handler = _Records()
    logger = logging.getLogger("sagaflow.web")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


@pytest.fixture
def env(tmp_path):
    values = {"SAGAFLOW_HOME": str(tmp_path)}
    settings = Settings.from_env(values)
    upgrade(settings.database_url)
    yield values
    configure(Settings.from_env({}))


def _app(env, **extra):
    from sagaflow.web import create_app

    app = create_app(Settings.from_env({**env, **extra}))
    app.config["TESTING"] = True
    return app


@pytest.mark.parametrize("body", [
    b'{"saga": "create_booking", "input": ' + b"[" * 600 + b"]" * 600 + b"}",
    b"[" * 100_000,
    b'{"saga": "x", "input": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
], ids=["nested 600", "100000 brackets", "50000 objects"])
def test_a_deep_body_under_the_size_limit_is_a_400_naming_the_depth_limit(env, body):
    answer = _app(env).test_client().post("/api/runs", data=body, content_type="application/json")
    assert answer.status_code == 400
    assert "nested deeper than 64 levels" in answer.json["error"]
    assert "SAGAFLOW_JSON_MAX_DEPTH" in answer.json["error"]


def test_the_app_warns_when_it_answers_beyond_loopback_without_a_token(env, warnings):
    _app(env)
    _app(env, SAGAFLOW_ALLOWED_HOSTS="localhost,127.0.0.1")
    _app(env, SAGAFLOW_ALLOWED_HOSTS="sagaflow.example", SAGAFLOW_API_TOKEN=TOKEN)
    assert [r.getMessage() for r in warnings] == []

    _app(env, SAGAFLOW_ALLOWED_HOSTS="sagaflow.example")
    _app(env, SAGAFLOW_ALLOWED_HOSTS="*")
    assert [r.getMessage() for r in warnings] == ["web_exposed_without_token"] * 2
    assert warnings[0].allowed_hosts == "sagaflow.example" and "SAGAFLOW_API_TOKEN" in warnings[0].hint


def test_sagaflow_web_refuses_a_short_token_and_warns_on_a_public_address(env, warnings, monkeypatch):
    from sagaflow.cli import main

    served = []
    monkeypatch.setattr("werkzeug.serving.run_simple", lambda host, port, app, **kw: served.append((host, port)))
    runner = CliRunner()

    short = runner.invoke(main, ["web"], env={**env, "SAGAFLOW_API_TOKEN": "s3cret"})
    assert short.exit_code == 2 and served == []
    assert short.output.strip().splitlines() == [
        "Error: SAGAFLOW_API_TOKEN is 6 characters: it needs at least 32 (e.g. openssl rand -hex 32)"]
    blank = runner.invoke(main, ["web"], env={**env, "SAGAFLOW_API_TOKEN": "  "})
    assert blank.exit_code == 2 and "SAGAFLOW_API_TOKEN is blank" in blank.output and served == []

    assert runner.invoke(main, ["web"], env={**env, "SAGAFLOW_API_TOKEN": ""}).exit_code == 0
    assert warnings == []  # loopback: fine without a token
    public = runner.invoke(main, ["web", "--host", "0.0.0.0", "--port", "8123"],
                           env={**env, "SAGAFLOW_API_TOKEN": ""})
    assert public.exit_code == 0 and served[-1] == ("0.0.0.0", 8123)
    assert [r.getMessage() for r in warnings] == ["web_exposed_without_token"]
    assert warnings[0].host == "0.0.0.0"
    assert "SAGAFLOW_ALLOWED_HOSTS is localhost,127.0.0.1,[::1]" in public.output  # why other names get 400
    guarded = runner.invoke(main, ["web", "--host", "0.0.0.0"], env={**env, "SAGAFLOW_API_TOKEN": TOKEN})
    assert guarded.exit_code == 0 and len(warnings) == 1


def test_a_run_stored_before_the_checks_with_a_lone_surrogate_still_shows(env):
    """SQLite stores what PostgreSQL refuses: a lone surrogate in JSON (as an escape), a NUL in text. The
    run's page, the list and the API show them escaped instead of failing to encode them."""
    from sqlalchemy import update

    from sagaflow.app import get_store
    from sagaflow.model import StepSpec
    from sagaflow.store import tables as t

    app = _app(env)
    store = get_store()
    store.create_run("old-1", "create_booking", 1, {}, [StepSpec("create_invoice", True)])
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == "old-1").values(
            input={"name": "a\ud800b", "k\x00": 1}, idempotency_key="key-\x00", error="boom \x00"))

    web = app.test_client()
    page = web.get("/runs/old-1")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "a\\ud800b" in text and "key-\\u0000" in text and "boom \\u0000" in text
    listing = web.get("/api/runs")
    assert listing.status_code == 200 and "\\ud800" in listing.json["items"][0]["input_preview"]
    assert web.get("/api/runs/old-1").status_code == 200
    assert web.get("/").status_code == 200
