"""`sagaflow db current`, `db history`, and a downgrade that asks first (issue 13), on a SQLite file, through
the console script as a user types it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sagaflow.store.migrate import head_revision

SAGAFLOW = str(Path(sys.executable).parent / "sagaflow")


@pytest.fixture
def env(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    return {**base, "SAGAFLOW_HOME": str(tmp_path)}


def _sagaflow(env, *args, stdin: str | None = None):
    return subprocess.run([SAGAFLOW, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)


def _tables(env) -> set[str]:
    path = Path(env["SAGAFLOW_HOME"]) / "sagaflow.db"
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_current_and_history_say_where_the_database_is(env):
    done = _sagaflow(env, "db", "current")
    assert done.returncode == 0 and done.stdout.startswith("base (no tables): sqlite:///"), done.stderr
    assert _sagaflow(env, "db", "upgrade").returncode == 0
    done = _sagaflow(env, "db", "current")
    assert done.stdout.startswith(f"{head_revision()} (head): sqlite:///")
    lines = _sagaflow(env, "db", "history").stdout.splitlines()
    assert lines[0].startswith(head_revision()) and lines[0].endswith("(current)")
    assert lines[-1].startswith("0001") and sum(line.endswith("(current)") for line in lines) == 1


def test_a_downgrade_asks_first_and_without_an_answer_changes_nothing(env):
    assert _sagaflow(env, "db", "upgrade").returncode == 0
    before = _tables(env)
    assert "saga_runs" in before
    done = _sagaflow(env, "db", "downgrade", "base")  # no terminal: refused, saying how to confirm
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"Error: downgrading sqlite:///{env['SAGAFLOW_HOME']}/sagaflow.db to base drops every "
                           f"sagaflow table and every run in them: add --yes to confirm\n")
    assert _tables(env) == before
    done = _sagaflow(env, "db", "downgrade", "base", "--yes")
    assert done.returncode == 0 and done.stdout.startswith("database at base (no tables)"), done.stderr
    assert "saga_runs" not in _tables(env)


def test_an_unknown_revision_is_refused_before_any_question(env):
    assert _sagaflow(env, "db", "upgrade").returncode == 0
    done = _sagaflow(env, "db", "downgrade", "nope")
    assert done.returncode == 1 and "cannot downgrade to revision 'nope'" in done.stderr
    assert "--yes" not in done.stderr
