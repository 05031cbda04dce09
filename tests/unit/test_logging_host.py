"""Logging the way libraries do it (issue 13): sagaflow's code names its loggers and adds no handler; the entry
points (CLI, worker, web app) configure output only when the host has not. Each case runs in a fresh
interpreter, so its logging starts unconfigured, as a host process's does; the record is a real one, the web
app's ``web_exposed_without_token`` warning (SAGAFLOW_ALLOWED_HOSTS beyond loopback, no token)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from tests.conftest import ROOT

APP = "from sagaflow.web import create_app; create_app()"


def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    base.update({"SAGAFLOW_HOME": str(tmp_path), "SAGAFLOW_ALLOWED_HOSTS": "sagas.example.com",
                 "SAGAFLOW_IMPORTS": "sagaflow.tasks", "PYTHONPATH": str(ROOT), **env})
    done = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done


def test_the_hosts_basicconfig_receives_sagaflows_records(tmp_path):
    done = _python("import logging, sys\n"
                   "logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='HOST %(name)s %(message)s')\n"
                   + APP, tmp_path, SAGAFLOW_LOG_LEVEL="INFO")
    assert "HOST sagaflow.web web_exposed_without_token" in done.stdout.splitlines()
    assert "web_exposed_without_token" not in done.stderr  # no handler of sagaflow's beside the host's


def test_the_hosts_dictconfig_receives_sagaflows_records(tmp_path):
    config = {"version": 1, "formatters": {"f": {"format": "DICT %(levelname)s %(name)s %(message)s"}},
              "handlers": {"out": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "f"}},
              "loggers": {"sagaflow": {"level": "WARNING"}}, "root": {"handlers": ["out"], "level": "ERROR"}}
    done = _python(f"import logging.config; logging.config.dictConfig({config!r})\n" + APP, tmp_path)
    assert "DICT WARNING sagaflow.web web_exposed_without_token" in done.stdout.splitlines()
    assert done.stderr == ""


def test_unconfigured_the_entry_point_writes_json_lines_that_parse(tmp_path):
    done = _python(APP, tmp_path, SAGAFLOW_LOG_FORMAT="json")
    (line,) = [line for line in done.stderr.splitlines() if "web_exposed_without_token" in line]
    record = json.loads(line)
    assert record["event"] == "web_exposed_without_token" and record["level"] == "warning"
    assert record["logger"] == "sagaflow.web" and record["allowed_hosts"] == "sagas.example.com"


def test_unconfigured_the_default_is_logfmt(tmp_path):
    done = _python(APP, tmp_path)
    (line,) = [line for line in done.stderr.splitlines() if "web_exposed_without_token" in line]
    assert "level=warning logger=sagaflow.web event=web_exposed_without_token" in line


def test_the_cli_refuses_an_unknown_log_format_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    done = subprocess.run([sys.executable, "-m", "sagaflow", "runs"], capture_output=True, text=True, timeout=60,
                          env={**env, "SAGAFLOW_HOME": str(tmp_path), "SAGAFLOW_LOG_FORMAT": "xml"}, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr == "Error: SAGAFLOW_LOG_FORMAT must be one of logfmt, json, got 'xml'\n"


def test_library_code_adds_no_handler_and_never_stops_propagation():
    """Only sagaflow/logs.py's setup_logging, which the entry points call, touches handlers."""
    found = []
    for folder in (ROOT / "sagaflow", ROOT / "web", ROOT / "tasks", ROOT / "config"):
        for path in folder.rglob("*.py"):
            if path == ROOT / "sagaflow" / "logs.py" or "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr in ("addHandler", "propagate"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not found, found
