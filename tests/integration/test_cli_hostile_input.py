"""Hostile and mistaken input to the `sagaflow` console script (issue 11): every one ends in one line on
stderr, ``Error: ...``, a non-zero exit, no traceback and nothing written; stored text reaches the terminal
with its control characters escaped.

Through the real console script (.venv/bin/sagaflow) in a subprocess, against the test PostgreSQL; these
need no worker: nothing they do may get as far as publishing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from sagaflow.app import get_store
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

SAGAFLOW = Path(sys.executable).parent / "sagaflow"
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # newline and tab excepted


def sagaflow(*args: str | bytes, env: dict, timeout: float = 120) -> tuple[int, str, str]:
    done = subprocess.run([SAGAFLOW, *args], env=env, cwd=ROOT, capture_output=True, timeout=timeout)
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")  # strict: valid UTF-8


@pytest.fixture
def env(settings):
    # The console script has its own folder on sys.path, not the working directory: the test sagas
    # (SAGAFLOW_IMPORTS names tests.sagas...) are found through PYTHONPATH.
    return {**os.environ, **settings.as_env(), "SAGAFLOW_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}


def count_rows() -> tuple[int, int, int]:
    with get_store().engine.connect() as conn:
        return tuple(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()
                     for table in ("saga_runs", "saga_steps", "saga_events"))


def assert_one_line_error(code: int, out: str, err: str, exit_code: int, message: str) -> None:
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("Error: ") and message in err, err
    assert code == exit_code, (code, err)
    assert out == ""
    assert not RAW_CONTROLS.search(err)


DEEP_OBJECT = '{"a":' * 600 + "1" + "}" * 600
DEEP_ARRAY = "[" * 100_000  # json.loads itself raises RecursionError on this (argv holds at most 128 KiB)


@pytest.mark.parametrize("args,extra_env,exit_code,message", [
    # --input: parsed under SAGAFLOW_JSON_MAX_DEPTH/_BYTES, without recursion
    (["start", "create_booking", "--input", DEEP_OBJECT], {}, 1,
     "--input is nested deeper than 64 levels of arrays and objects (SAGAFLOW_JSON_MAX_DEPTH)"),
    (["start", "create_booking", "--input", DEEP_ARRAY], {}, 1, "--input is nested deeper than 64 levels"),
    (["start", "create_booking", "--input", '{"a": "%s"}' % ("x" * 200)], {"SAGAFLOW_JSON_MAX_BYTES": "100"}, 1,
     "over the limit of 100 (SAGAFLOW_JSON_MAX_BYTES)"),
    (["start", "create_booking", "--input", b'{"customer": "\xff"}'], {}, 1,
     "--input contains a lone surrogate (not valid Unicode)"),
    (["start", "create_booking", "--input", '{"customer": "a\\u0000b"}'], {}, 1, "--input contains a NUL character"),
    (["start", "create_booking", "--input", '{"amount": NaN}'], {}, 1, "--input is not valid JSON: NaN is not JSON"),
    (["start", "create_booking", "--input", "{not json"], {}, 1, "--input is not valid JSON"),
    (["start", "create_booking", "--input", "[1]"], {}, 1, "must be a JSON object"),
    # --idempotency-key: argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)
    (["start", "create_booking", "--idempotency-key", b"\xff"], {}, 1,
     "idempotency_key contains a lone surrogate (not valid Unicode)"),
    (["start", "create_booking", "--wait", "--timeout", "nan"], {}, 2,
     "Invalid value for '--timeout': 'nan' is not a positive, finite number of seconds"),
    (["start", "create_booking", "--wait", "--timeout", "-1"], {}, 2, "not a positive, finite number of seconds"),
    (["start", "no_such_saga"], {}, 1, "unknown saga 'no_such_saga'"),
    # runs: bounded before any query (PostgreSQL's BIGINT ends at 9223372036854775807)
    (["runs", "--offset", "99999999999999999999"], {}, 2,
     "Invalid value for '--offset': 99999999999999999999 is not in the range 0<=x<=1000000000000"),
    (["runs", "--offset", "-1"], {}, 2, "is not in the range 0<=x<=1000000000000"),
    (["runs", "--limit", "0"], {}, 2, "Invalid value for '--limit': 0 is not in the range 1<=x<=1000"),
    (["runs", "--limit", "1001"], {}, 2, "is not in the range 1<=x<=1000"),
    (["runs", "--limit", "many"], {}, 2, "Invalid value for '--limit'"),
    (["runs", "--saga", b"\xff"], {}, 1, "--saga contains a lone surrogate"),
    (["runs", "--status", "bogus\x1b[2J"], {}, 1, "unknown status 'bogus\\x1b[2J'"),
    # run ids
    (["status", b"\xff"], {}, 1, "the run id contains a lone surrogate"),
    (["status", "no-such-run"], {}, 1, "unknown run id 'no-such-run'"),
    (["cancel", "x" * 500], {}, 1, "a run id is a string of 1 to"),
    (["retry", "no-such-run"], {}, 1, "unknown run id 'no-such-run'"),
    (["signal", "no-such-run", "approve", "--payload", DEEP_ARRAY], {}, 1,
     "--payload is nested deeper than 64 levels"),
    (["signal", "no-such-run", "approve", "--payload", "{bad"], {}, 1, "--payload is not valid JSON"),
    (["signal", "no-such-run", "not a name"], {}, 1, "must be an identifier"),
    (["recover", "--stall-timeout", "-5"], {}, 2, "Invalid value for '--stall-timeout'"),
    (["recover", "--stall-timeout", "inf"], {}, 2, "not a positive, finite number of seconds"),
    (["worker", "--loglevel", "loud"], {}, 2, "Invalid value for '-l' / '--loglevel'"),
    (["flower", "--port", "70000"], {}, 2, "Invalid value for '--port'"),
    (["demo", "--timeout", "0"], {}, 2, "Invalid value for '--timeout'"),
    (["no-such-command"], {}, 2, "No such command 'no-such-command'. (see `sagaflow --help`)"),
    (["--no-such-option"], {}, 2, "No such option '--no-such-option'. (see `sagaflow --help`)"),
    (["db", "downgrade"], {}, 2, "Missing argument 'REVISION'. (see `sagaflow db downgrade --help`)"),
    # settings: Settings.from_env's ValueError, at import time before the fix
    (["runs"], {"SAGAFLOW_VISIBILITY_TIMEOUT": "abc"}, 2,
     "SAGAFLOW_VISIBILITY_TIMEOUT must be an integer, got 'abc'"),
    (["start", "create_booking"], {"SAGAFLOW_JSON_MAX_DEPTH": "0"}, 2,
     "SAGAFLOW_JSON_MAX_DEPTH must be a positive integer, got 0"),
    (["status", "x"], {"SAGAFLOW_PREPARED_STATEMENTS": "maybe"}, 2, "SAGAFLOW_PREPARED_STATEMENTS must be 1 or 0"),
    (["runs"], {"SAGAFLOW_LOG_LEVEL": "LOUD"}, 2, "SAGAFLOW_LOG_LEVEL must be one of DEBUG, INFO, WARNING"),
    (["worker"], {"SAGAFLOW_WORKER_POOL": "bogus"}, 2, "SAGAFLOW_WORKER_POOL must be one of prefork"),
    (["runs"], {"SAGAFLOW_IMPORTS": "sagaflow.tasks,no_such_module_h11"}, 1,
     "cannot import saga module 'no_such_module_h11' named in SAGAFLOW_IMPORTS"),
    (["runs"], {"SAGAFLOW_SAGA_FILES": "/nonexistent/h11.yaml"}, 1, "/nonexistent/h11.yaml: cannot read the saga file"),
    # environment bytes that are not UTF-8 (lone surrogates in Python): before the fix a traceback, and for
    # the broker a run row written before its publish failed
    (["start", "create_booking"], {"SAGAFLOW_BROKER_URL": "redis://\udcff/0"}, 2,
     "SAGAFLOW_BROKER_URL contains a lone surrogate"),
    (["runs"], {"SAGAFLOW_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1/\udcff"}, 2,
     "SAGAFLOW_DATABASE_URL contains a lone surrogate"),
    # the database address: never echoed with its password
    (["runs"], {"SAGAFLOW_DATABASE_URL": "not a url"}, 2,
     "SAGAFLOW_DATABASE_URL must be a URL such as postgresql://user:password@host/db or sqlite:///path"),
    (["runs"], {"SAGAFLOW_DATABASE_URL": "nosuchdialect://u:s3cret@h/db"}, 2,
     "SAGAFLOW_DATABASE_URL: database 'nosuchdialect' is not supported; use postgresql://"),
    (["db", "upgrade"], {"SAGAFLOW_DATABASE_URL": "nosuchdialect://u:s3cret@h/db"}, 2,
     "SAGAFLOW_DATABASE_URL: database 'nosuchdialect' is not supported"),
    (["db", "upgrade", b"\xff"], {}, 1, "the revision contains a lone surrogate"),
    # issue 13: the log format, your Celery app, a database sagaflow does not run on (never echoing the URL)
    (["runs"], {"SAGAFLOW_LOG_FORMAT": "xml"}, 2, "SAGAFLOW_LOG_FORMAT must be one of logfmt, json, got 'xml'"),
    (["runs"], {"SAGAFLOW_CELERY_APP": "proj"}, 2, "SAGAFLOW_CELERY_APP must be module:attribute"),
    (["worker"], {"SAGAFLOW_CELERY_APP": "no_such_proj_h13.celery:app"}, 2,
     "SAGAFLOW_CELERY_APP: cannot import 'no_such_proj_h13.celery'"),
    (["runs"], {"SAGAFLOW_CELERY_CONFIG": "no_such_celeryconfig_h13"}, 2,
     "SAGAFLOW_CELERY_CONFIG: cannot import 'no_such_celeryconfig_h13'"),
    (["runs"], {"SAGAFLOW_DATABASE_URL": "mysql://u:s3cret@h/db"}, 2,
     "SAGAFLOW_DATABASE_URL: database 'mysql' is not supported; use postgresql://user:password@host/db"),
    (["db", "downgrade", "base"], {}, 1, "drops every sagaflow table and every run in them: add --yes to confirm"),
])
def test_bad_input_is_one_line_a_non_zero_exit_and_writes_nothing(env, args, extra_env, exit_code, message):
    before = count_rows()
    code, out, err = sagaflow(*args, env={**env, **extra_env})
    assert_one_line_error(code, out, err, exit_code, message)
    assert "s3cret" not in err
    assert count_rows() == before


def test_a_bad_revision_lists_the_known_ones_and_leaves_the_schema_alone(env):
    from sagaflow.store.migrate import current_revision, head_revision

    before = count_rows()
    for action in ("downgrade", "upgrade"):
        code, out, err = sagaflow("db", action, "nope", env=env)
        assert_one_line_error(code, out, err, 1, f"cannot {action} to revision 'nope': Can't locate revision")
        assert f"Revisions: head, {head_revision()}" in err and err.rstrip().endswith("drops every table)")
    assert current_revision(get_store().engine) == head_revision()
    assert count_rows() == before


def test_upgrading_says_where_the_database_is_now(env):
    from sagaflow.store.migrate import head_revision

    code, out, err = sagaflow("db", "upgrade", "0001", env=env)  # older than the current: alembic does nothing
    assert code == 0, err
    assert out.startswith(f"database at {head_revision()} (head): postgresql")


@pytest.mark.parametrize("source,message", [
    ("x = 1 / 0\n", "ZeroDivisionError: division by zero ({path}:1)"),
    ("def broken(:\n", "SyntaxError: invalid syntax"),
    ("import no_such_dependency_h11\n", "it imports 'no_such_dependency_h11', which is not installed"),
])
def test_a_saga_module_that_fails_to_import_is_one_line_saying_where(env, tmp_path, source, message):
    module = f"broken_sagas_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{module}.py"
    path.write_text(source)
    before = count_rows()
    code, out, err = sagaflow("start", "create_booking",
                              env={**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
                                   "SAGAFLOW_IMPORTS": f"tasks,{module}"})
    assert_one_line_error(code, out, err, 1, f"cannot import saga module {module!r} named in SAGAFLOW_IMPORTS")
    assert message.format(path=path) in err
    assert count_rows() == before


HOSTILE = "boom\x1b[2J\x1b]0;pwned\x07\rforged line\x08\x9b31m\u2028end"  # PostgreSQL text holds no NUL


def test_stored_text_reaches_the_terminal_escaped_and_json_as_it_is(env):
    """A step error or input holding escape sequences (here written straight into the tables, as an old
    row or another writer could have) cannot clear or retitle the operator's terminal."""
    store = get_store()
    run_id = str(uuid.uuid4())
    store.create_run(run_id, "create_booking", 1, {"customer": HOSTILE}, [("create_invoice", True)])
    with store.engine.begin() as conn:  # a final status: no sweeper or worker ever picks this run up
        conn.execute(text("UPDATE saga_runs SET status = 'failed', error = :e WHERE id = :id"),
                     {"e": HOSTILE, "id": run_id})
        conn.execute(text("UPDATE saga_steps SET status = 'failed', error = :e WHERE run_id = :id"),
                     {"e": HOSTILE, "id": run_id})
        conn.execute(text("UPDATE saga_events SET detail = CAST(:d AS JSON) WHERE run_id = :id"),
                     {"d": json.dumps({"error": HOSTILE}), "id": run_id})

    code, out, err = sagaflow("status", run_id, env=env)
    assert code == 0, err
    assert not RAW_CONTROLS.search(out), out
    escaped = "boom\\x1b[2J\\x1b]0;pwned\\x07\\rforged line\\x08\\x9b31m\\u2028end"
    assert f"error: {escaped}" in out
    assert out.count(escaped) == 3  # the run's error, the step's error, the event's detail
    assert len(out.splitlines()) == 4  # run, error, one step, one event: no line was broken

    code, out, err = sagaflow("status", run_id, "--json", env=env)
    assert code == 0, err
    assert not RAW_CONTROLS.search(out)
    shown = json.loads(out)
    assert shown["error"] == HOSTILE and shown["input"] == {"customer": HOSTILE}
    assert shown["steps"][0]["error"] == HOSTILE
