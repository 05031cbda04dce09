"""The README's "A 30-second example", as a new user runs it: its code blocks are read from README.md itself
(not copied here), written into an empty project folder, and its commands run from there with the console
script, against a real worker. Its client block succeeds; the same sagas with an address the mailer refuses
compensate. Run three times: with nothing configured (SQLite and the embedded Redis, as the README promises),
and with the plain ``postgresql://`` and ``postgres://`` URLs a hosting provider hands out (psycopg2).

The section's shape, which the README keeps: python blocks whose first line is a comment naming a file
(``# myapp/sagas.py``) are that file; a bash block holds ``export NAME=value`` lines and ``sagaflow ...``
commands (``sagaflow worker`` starts in the background, the others must succeed); the python block without a
file name is the client code, and leaves its last run in ``run``."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import ARTIFACTS, ROOT

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
HEADING = "## A 30-second example"


def example_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, text) of each fenced block under HEADING, up to the next ``## `` heading."""
    start = readme.index(HEADING) + len(HEADING)
    end = readme.find("\n## ", start)
    section = readme[start:] if end < 0 else readme[start:end]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", section, re.M | re.S)]


def split_example(blocks):
    """(files {path: text}, exports {name: value}, commands [argv], client code)."""
    files, exports, commands, client = {}, {}, [], None
    for language, text in blocks:
        first = text.splitlines()[0] if text.strip() else ""
        if language == "python":
            named = re.match(r"#\s*([\w./-]+\.py)\b", first)
            if named:
                files[named.group(1)] = text
            else:
                assert client is None, "the section has one client block"
                client = text
        elif language in ("bash", "sh", "shell"):
            for line in text.splitlines():
                words = shlex.split(line, comments=True)
                if not words:
                    continue
                if words[0] == "export":
                    for assignment in words[1:]:
                        name, _, value = assignment.partition("=")
                        exports[name] = value
                else:
                    assert words[0] == "sagaflow", f"an unexpected command in the example: {line}"
                    commands.append(words)
    return files, exports, commands, client


CLIENT_RUNNER = """\
import json, sys
namespace = {}
exec(compile(open(sys.argv[1]).read(), "README client block", "exec"), namespace)
run = namespace["run"]
print(json.dumps({"status": run.status, "steps": {s.name: s.status for s in run.steps}}))
"""

FAILING_RUNNER = """\
import json
from sagaflow import SagaClient
client = SagaClient.from_env()
run = client.wait(client.start("create_booking", {"customer": "nobody"}, idempotency_key="order-18").id, timeout=60)
print(json.dumps({"status": run.status, "steps": {s.name: s.status for s in run.steps},
                  "undone": [e.step for e in run.events if e.kind == "compensation_succeeded"]}))
"""


def test_the_readme_example_parses_into_files_exports_commands_and_client():
    files, exports, commands, client = split_example(example_blocks((ROOT / "README.md").read_text()))
    assert "myapp/sagas.py" in files and exports.get("SAGAFLOW_IMPORTS") == "myapp.sagas"
    assert ["sagaflow", "db", "upgrade"] in commands and any(c[:2] == ["sagaflow", "worker"] for c in commands)
    assert client is not None and "SagaClient.from_env()" in client


@pytest.fixture(params=["nothing-configured", "postgresql://", "postgres://"])
def database(request, services):
    if request.param == "nothing-configured":
        yield {}
        return
    from tests.services import fresh_database

    url = fresh_database(services.pg_admin_url, name="sagaflow_test_i13_readme")
    plain = request.param + url.split("://", 1)[1]  # what a hosting provider hands out: no driver named
    yield {"SAGAFLOW_DATABASE_URL": plain}


def _run(args, cwd, env, timeout=120):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_readme_example_runs_from_an_empty_project_folder(tmp_path, database):
    files, exports, commands, client = split_example(example_blocks((ROOT / "README.md").read_text()))
    project = tmp_path / "project"
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    (project / "client_block.py").write_text(client)
    # A new user's shell: no SAGAFLOW_* or PYTHONPATH of ours; the console script on PATH.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAFLOW_", "PYTHON"))}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", **database, **exports})

    worker = None
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "readme-example-worker.log"
    try:
        for words in commands:
            argv = [str(BIN / "sagaflow"), *words[1:]]
            if words[1] == "worker":
                worker = subprocess.Popen(argv, cwd=project, env=env, stdout=open(log_path, "w"),
                                          stderr=subprocess.STDOUT, start_new_session=True)
                _wait_for_worker(worker, project / ".sagaflow" / "redis.sock", log_path)
            else:
                done = _run(argv, project, env)
                assert done.returncode == 0, f"{words}: {done.stderr}"
        assert worker is not None

        done = _run([str(BIN / "python"), "-c", CLIENT_RUNNER, "client_block.py"], project, env)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.splitlines()[-1])
        assert result["status"] == "succeeded", result
        assert set(result["steps"].values()) == {"succeeded"}

        done = _run([str(BIN / "python"), "-c", FAILING_RUNNER], project, env)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.splitlines()[-1])
        assert result["status"] == "compensated", result
        assert result["steps"]["create_invoice"] == "compensated" and result["undone"] == ["create_invoice"]
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(worker.pid, signal.SIGKILL)  # pool children and the embedded broker
            except ProcessLookupError:
                pass
            worker.wait()


def _wait_for_worker(proc, socket: Path, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the README's `sagaflow worker` did not start; see {log_path}")
        if socket.exists():
            ping = Celery("readme-ping", broker=f"redis+socket://{socket}", set_as_current=False)
            try:
                if ping.control.ping(timeout=0.5):
                    return
            finally:
                ping.close()
        time.sleep(0.2)
