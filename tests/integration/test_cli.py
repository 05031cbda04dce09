"""The `sagaflow` command against the test services, and `sagaflow demo` on the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sagaflow.demo import SCENARIOS
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def sagaflow(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sagaflow", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def env(settings, worker):
    return {**os.environ, **settings.as_env(), "SAGAFLOW_LOG_LEVEL": "WARNING"}


def test_start_wait_status_and_runs(env):
    done = sagaflow("start", "create_booking", "--input", '{"customer": "cli"}', "--wait", "--json", env=env)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded"
    assert [s["status"] for s in run["steps"]] == ["succeeded"] * 4

    shown = sagaflow("status", run["id"], env=env)
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "run_succeeded" in shown.stdout

    listed = json.loads(sagaflow("runs", "--saga", "create_booking", "--json", env=env).stdout)
    assert run["id"] in [r["id"] for r in listed["items"]]


def test_start_input_file_starts_one_run_per_line(env, tmp_path):
    lines = tmp_path / "runs.jsonl"
    lines.write_text('{"customer": "file-1"}\n\n{"customer": "file-2"}\n{"customer": "file-3"}\n')
    done = sagaflow("start", "create_booking", "--input-file", str(lines), "--wait", "--json", env=env)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    assert [r["input"] for r in runs] == [{"customer": f"file-{i}"} for i in (1, 2, 3)]
    assert {r["status"] for r in runs} == {"succeeded"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"customer": "never-1"}\n[1]\n')
    refused = sagaflow("start", "create_booking", "--input-file", str(bad), env=env)
    assert refused.returncode != 0 and "line 2 of --input-file" in refused.stderr and "Traceback" not in refused.stderr
    listed = json.loads(sagaflow("runs", "--input", "customer=never-1", "--json", env=env).stdout)
    assert listed["items"] == []


def test_failed_run_exits_non_zero_with_wait(env):
    done = sagaflow("start", "data_ingest", "--input", '{"fail_at": "parse"}', "--wait", env=env)
    assert done.returncode == 1
    assert "compensated" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["start", "create_booking", "--input", "{not json"], "not valid JSON"),
    (["start", "create_booking", "--input", "[1]"], "must be a JSON object"),
    (["start", "nope"], "unknown saga 'nope'"),
    (["status", "no-such-run"], "unknown run id"),
    (["cancel", "no-such-run"], "unknown run id"),
    (["retry", "no-such-run"], "unknown run id"),
    (["runs", "--status", "bogus"], "unknown status"),
])
def test_bad_input_gives_a_clear_error_and_non_zero_exit(env, args, message):
    done = sagaflow(*args, env=env)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_commands_need_the_schema_and_say_how_to_create_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_HOME"] = str(tmp_path)
    done = sagaflow("runs", env=env)
    assert done.returncode == 1
    assert "sagaflow db upgrade" in done.stderr


def test_demo_runs_on_the_embedded_default_and_exits_zero(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_HOME"] = str(tmp_path / "home")
    done = sagaflow("demo", env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(SCENARIOS)} of {len(SCENARIOS)} runs ended as expected" in done.stdout
    assert "(branches joined) -> request_information" in done.stdout  # the parallel example
    assert "add_calendar FAILED -> undo send_whatsapp -> undo send_email -> undo create_invoice" in done.stdout
    assert "sqlite" in done.stdout
    assert not (tmp_path / "home" / "redis.sock").exists()  # the embedded broker was stopped


def test_an_unreachable_database_gives_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env.update(SAGAFLOW_HOME=str(tmp_path), SAGAFLOW_DATABASE_URL="postgresql+psycopg2://nobody@127.0.0.1:1/none")
    done = sagaflow("runs", env=env)
    assert done.returncode == 1
    assert "cannot use the database postgresql+psycopg2://nobody@127.0.0.1:1/none" in done.stderr
    assert "SAGAFLOW_DATABASE_URL" in done.stderr and "Traceback" not in done.stderr


def test_a_fresh_home_says_to_create_the_schema(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_HOME"] = str(tmp_path / "never-used")
    done = sagaflow("start", "create_booking", env=env)
    assert done.returncode == 1
    assert "no sagaflow tables: run `sagaflow db upgrade` first" in done.stderr


def test_the_cli_sees_the_declarative_sagas_of_saga_files(env):
    done = sagaflow("start", "ingest_document", "--input", '{"fail_at": "publish"}', "--wait", "--json", env=env)
    assert done.returncode == 1, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "compensated"
    assert [s["name"] for s in run["steps"]] == ["ingest", "parse", "embed", "publish"]


def test_an_invalid_saga_file_stops_the_cli_with_an_error_naming_file_saga_and_handler(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sagas:\n  - name: broken\n    steps:\n      - action: ingest\n        compensation: nope\n")
    done = sagaflow("runs", env={**env, "SAGAFLOW_SAGA_FILES": str(bad)})
    assert done.returncode != 0
    assert (f"{bad}:5: saga 'broken' version 1, step 'ingest': unknown handler 'nope' for the compensation"
            in done.stderr)
    assert "Traceback" not in done.stderr
