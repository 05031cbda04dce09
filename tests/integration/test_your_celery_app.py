"""A team's own Celery app (issue 13): a project folder with ``proj/celery.py`` that calls
``sagaflow.install(app)`` and defines a task of its own beside the sagas. ``celery -A proj worker`` runs both;
the startup checks refuse a setting that contradicts sagaflow's; ``sagaflow start`` and ``sagaflow flower`` use
that app through SAGAFLOW_CELERY_APP. Every process runs from the project folder, as a team would run them, on
the real Redis and PostgreSQL of the test session, on the app's own queue (``proj``): the session's worker,
which consumes ``celery``, never sees these messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import ARTIFACTS
from tests.helpers import wait_for, wait_until_flower_enabled_events
from tests.services import free_port
from tests.web_client import call

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent

PROJECT = {
    "proj/__init__.py": "",
    "proj/celeryconfig.py": """\
import os

broker_url = os.environ["PROJ_BROKER_URL"]
task_default_queue = "proj"        # the team's own routing, honoured by sagaflow's messages too
worker_prefetch_multiplier = 4     # the team's own choice, left as it is
if os.environ.get("PROJ_ACKS_LATE") == "0":
    task_acks_late = False         # contradicts what sagaflow needs: the worker must refuse to start
""",
    "proj/celery.py": """\
from pathlib import Path

from celery import Celery

import sagaflow

app = Celery("proj")
app.config_from_object("proj.celeryconfig")
sagaflow.install(app)


@app.task(name="proj.touch")
def touch(path, text):
    Path(path).write_text(text)
""",
    "proj/sagas.py": """\
from pathlib import Path

from sagaflow import NonRetryableError, Saga

trip = Saga("h13_trip", version=1)


@trip.step
def reserve(ctx):
    return {"seat": "12A", "customer": ctx.input["customer"]}


@reserve.compensation
def release(ctx):
    with open(ctx.input["undo_log"], "a") as log:
        log.write(f"released {ctx.result['seat']}\\n")


@trip.step
def pay(ctx):
    if ctx.input.get("decline"):
        raise NonRetryableError("card declined")
    return {"paid": True}
""",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, settings):
    root = tmp_path_factory.mktemp("team-project")
    for name, text in PROJECT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAFLOW_", "PYTHONPATH"))}
    env.update({
        "SAGAFLOW_HOME": str(root / ".sagaflow"),
        "SAGAFLOW_DATABASE_URL": settings.database_url,
        "SAGAFLOW_BROKER_URL": settings.broker_url,
        "SAGAFLOW_IMPORTS": "proj.sagas",
        "SAGAFLOW_CELERY_APP": "proj.celery:app",
        "SAGAFLOW_LOG_LEVEL": "INFO",
        "PROJ_BROKER_URL": settings.broker_url,
    })
    return root, env


def _celery_worker(root: Path, env: dict, name: str, log_name: str) -> subprocess.Popen:
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / log_name, "w")
    return subprocess.Popen([str(BIN / "celery"), "-A", "proj", "worker", "-P", "prefork", "-c", "2",
                             "-n", f"{name}@%h", "-l", "INFO"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def proj_worker(project, settings):
    root, env = project
    proc = _celery_worker(root, env, "proj13", "proj-worker.log")
    ping = Celery("ping", broker=settings.broker_url, set_as_current=False)
    deadline = time.monotonic() + 60
    try:
        while not ping.control.ping(destination=[f"proj13@{os.uname().nodename}"], timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery -A proj worker did not start; see {ARTIFACTS / 'proj-worker.log'}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _sagaflow(root: Path, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sagaflow"), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_celery_a_proj_worker_runs_the_teams_task_and_the_sagas(project, proj_worker, tmp_path):
    root, env = project
    marker = tmp_path / "touched"
    # The team's own task, sent through its own app, from its own folder.
    sent = subprocess.run([sys.executable, "-c", f"from proj.celery import touch; touch.delay({str(marker)!r}, 'ok')"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: marker.exists() and marker.read_text() == "ok", timeout=30, what="proj.touch to run")

    undo_log = tmp_path / "undo.log"
    ok = _sagaflow(root, env, "start", "h13_trip", "--input",
                   json.dumps({"customer": "c1", "undo_log": str(undo_log)}), "--wait", "--json")
    assert ok.returncode == 0, ok.stderr
    run = json.loads(ok.stdout)
    assert run["status"] == "succeeded" and [s["status"] for s in run["steps"]] == ["succeeded", "succeeded"]

    failed = _sagaflow(root, env, "start", "h13_trip", "--input",
                       json.dumps({"customer": "c2", "undo_log": str(undo_log), "decline": True}), "--wait", "--json")
    assert failed.returncode == 1, failed.stderr
    run = json.loads(failed.stdout)
    assert run["status"] == "compensated"
    assert undo_log.read_text() == "released 12A\n"  # once: the one completed step, undone


def test_the_worker_refuses_a_setting_that_contradicts_sagaflows(project, settings):
    root, env = project
    proc = _celery_worker(root, {**env, "PROJ_ACKS_LATE": "0"}, "proj13-bad", "proj-worker-refused.log")
    try:
        assert proc.wait(60) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (ARTIFACTS / "proj-worker-refused.log").read_text()
    assert ("Error: Celery setting task_acks_late=False contradicts sagaflow, which needs True to lose nothing"
            in log), log
    assert "Traceback" not in log


def test_sagaflow_worker_on_the_teams_app_refuses_it_too(project):
    root, env = project
    done = _sagaflow(root, {**env, "PROJ_ACKS_LATE": "0"}, "worker", "-n", "proj13-cli@%h", timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith("Error: Celery setting task_acks_late=False contradicts sagaflow")


def test_sagaflow_flower_on_the_teams_app_lists_the_saga_steps(project, proj_worker, tmp_path):
    root, env = project
    port = free_port()
    log = open(ARTIFACTS / "proj-flower.log", "w")
    flower = subprocess.Popen([str(BIN / "sagaflow"), "flower", "--port", str(port)], cwd=root,
                              env={**env, "FLOWER_UNAUTHENTICATED_API": "true"}, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        node = f'flower_worker_online{{worker="proj13@{os.uname().nodename}"}} 1.0'

        def online():
            if flower.poll() is not None:
                raise RuntimeError(f"flower exited; see {ARTIFACTS / 'proj-flower.log'}")
            try:
                return node in call("GET", f"{url}/metrics", timeout=2).text
            except OSError:
                return False

        wait_for(online, timeout=60, what="flower to see the team's worker")

        def trip():
            done = _sagaflow(root, env, "start", "h13_trip", "--input",
                             json.dumps({"customer": "c3", "undo_log": str(tmp_path / "u.log")}), "--wait", "--json")
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        # the team's worker sends no task events until Flower enables them (sagaflow's default)
        wait_until_flower_enabled_events(url, lambda: {s["task_id"] for s in trip()["steps"]})
        run = trip()
        expected = {s["task_id"]: f"h13_trip.{s['name']}" for s in run["steps"]}

        def listed():
            tasks = call("GET", f"{url}/api/tasks?limit=1000").json
            return {t: tasks[t]["name"] for t in expected if t in tasks} == expected

        wait_for(listed, timeout=30, what="flower to list the saga's step tasks")
    finally:
        flower.terminate()
        try:
            flower.wait(20)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()
        log.close()


# ------------------------------------------------------------------ sagaflow's own app: checks and extra settings

def _own_app_env(tmp_path, settings, **extra) -> dict:
    (tmp_path / "h13_celeryconfig.py").write_text(
        "import os\n"
        "task_default_queue = 'h13q'\n"
        "broker_transport_options = {'socket_keepalive': True}\n"
        "if os.environ.get('H13_ACKS_LATE') == '0':\n"
        "    task_acks_late = False\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAFLOW_", "PYTHONPATH"))}
    return {**env, **settings.as_env(), "SAGAFLOW_CELERY_CONFIG": "h13_celeryconfig", "SAGAFLOW_IMPORTS":
            "sagaflow.tasks", "SAGAFLOW_SAGA_FILES": "", "SAGAFLOW_ALERT_HOOK": "", **extra}


def test_sagaflow_celery_config_adds_settings_to_sagaflows_own_app(tmp_path, settings):
    env = _own_app_env(tmp_path, settings)
    code = ("from sagaflow.app import celery_app, get_settings; c = celery_app.conf; "
            "print(c.task_default_queue, c.broker_transport_options['socket_keepalive'], "
            "c.broker_transport_options['visibility_timeout'], c.task_acks_late)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["h13q", "True", str(settings.visibility_timeout), "True"]


def test_sagaflow_worker_refuses_a_celery_config_that_contradicts_sagaflows(tmp_path, settings):
    env = _own_app_env(tmp_path, settings, H13_ACKS_LATE="0")
    done = _sagaflow(tmp_path, env, "worker", "-n", "h13-own@%h", timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("Error: Celery setting task_acks_late=False contradicts sagaflow, which needs True to lose "
                           "nothing (remove it from your Celery configuration)\n")


def test_celery_a_sagaflow_app_worker_runs_the_startup_checks(tmp_path, settings):
    """Before issue 13 only `sagaflow worker` checked the visibility timeout: `celery -A sagaflow.app worker`
    started with one that lets a waiting retry be delivered twice."""
    env = _own_app_env(tmp_path, settings, SAGAFLOW_VISIBILITY_TIMEOUT="100")
    done = subprocess.run([str(BIN / "celery"), "-A", "sagaflow.app", "worker", "-n", "h13-celery@%h", "-Q", "h13q"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Error: SAGAFLOW_VISIBILITY_TIMEOUT=100 s is not above" in done.stderr
    assert "Traceback" not in done.stderr


def test_sagaflow_web_on_the_teams_app_starts_runs_its_worker_completes(project, proj_worker, tmp_path):
    """`sagaflow web` from the project folder, with SAGAFLOW_CELERY_APP: a run started through the API goes to
    the team's app's queue, where `celery -A proj worker` runs it."""
    root, env = project
    token = "h13-token-" + "x" * 32
    port = free_port()
    log = open(ARTIFACTS / "proj-web.log", "w")
    web = subprocess.Popen([str(BIN / "sagaflow"), "web", "--port", str(port)], cwd=root,
                           env={**env, "SAGAFLOW_API_TOKEN": token}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if web.poll() is not None:
                raise RuntimeError(f"sagaflow web exited; see {ARTIFACTS / 'proj-web.log'}")
            try:
                return call("GET", f"{url}/healthz", timeout=2).status == 200
            except OSError:
                return False

        wait_for(up, timeout=60, what="sagaflow web to answer")
        started = call("POST", f"{url}/api/runs", {"saga": "h13_trip", "input": {
            "customer": "c4", "undo_log": str(tmp_path / "u.log")}}, token=token)
        assert started.status == 202, started.text
        run_id = started.json["id"]

        def finished():
            run = call("GET", f"{url}/api/runs/{run_id}", token=token).json
            return run if run["status"] in ("succeeded", "compensated", "failed") else None

        assert wait_for(finished, timeout=60, what="the run to finish")["status"] == "succeeded"
    finally:
        web.terminate()
        try:
            web.wait(20)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait()
        log.close()
