"""`sagaflow flower` against the test broker: after a run, Flower lists each step and compensation as a
task named after it, and the status page's links (SAGAFLOW_FLOWER_URL + /task/<id>) open those tasks.

The worker runs with the default settings, task events off (SAGAFLOW_TASK_EVENTS unset): Flower sees every
step all the same, because `sagaflow flower` has Flower switch the workers' events on while it runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sagaflow.web.present import flower_link
from tests.conftest import ARTIFACTS, ROOT
from tests.helpers import wait_for, wait_until_flower_enabled_events
from tests.services import free_port
from tests.web_client import call

pytestmark = pytest.mark.integration


@pytest.fixture
def flower(settings, worker):
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "flower.log", "w")
    env = {**os.environ, **settings.as_env(), "FLOWER_UNAUTHENTICATED_API": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "sagaflow", "flower", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        # Ready when its event consumer has seen the worker's heartbeat (events sent before that are lost).
        node = f'flower_worker_online{{worker="tests@{os.uname().nodename}"}} 1.0'
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"flower exited with {proc.returncode}; see {ARTIFACTS / 'flower.log'}")
            try:
                if node in call("GET", f"{url}/metrics", timeout=2).text:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower did not see the worker within 60 s; see {ARTIFACTS / 'flower.log'}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_flower_lists_the_step_and_compensation_tasks_by_name(flower, client, settings):
    from sagaflow.app import celery_app

    assert settings.task_events is False  # the default: the worker was not started with events on
    node = f"tests@{os.uname().nodename}"
    conf = celery_app.control.inspect(destination=[node], timeout=5).conf()[node]
    assert conf["worker_send_task_events"] is False and conf["task_send_sent_event"] is False
    wait_until_flower_enabled_events(
        flower, lambda: {s.task_id for s in client.wait(client.start("create_booking", {}).id).steps})
    run = client.wait(client.start("create_booking", {"fail_at": "add_calendar"}).id)
    assert run.status == "compensated"
    expected = {step.task_id: f"create_booking.{step.name}" for step in run.steps if step.task_id}
    expected.update({step.compensation_task_id: f"create_booking.{step.name}.compensate"
                     for step in run.steps if step.compensation_task_id})
    assert len(expected) == 4 + 3

    def seen():
        tasks = call("GET", f"{flower}/api/tasks?limit=1000").json
        return {task_id: tasks[task_id]["name"] for task_id in expected if task_id in tasks} == expected and tasks

    tasks = wait_for(seen, timeout=30, what="flower to list every step and compensation task")
    assert tasks[run.step("add_calendar").task_id]["state"] == "FAILURE"
    assert tasks[run.step("create_invoice").compensation_task_id]["state"] == "SUCCESS"
    # The failed step published the undos itself: no errback task for this run (a lost worker's still has one).
    assert not [t for t in tasks.values() if t["name"] == "sagaflow.on_step_failed" and run.id in (t["args"] or "")]

    page = call("GET", flower_link(flower, run.step("send_email").task_id))
    assert page.status == 200 and "create_booking.send_email" in page.text

    # The status page links a task to Flower only once Flower's API says it knows it; a task Flower never
    # saw (or forgot when it restarted) is named as such, not linked to Flower's 404.
    from sagaflow.web.flower import KNOWN, UNKNOWN, FlowerAsker

    asker = FlowerAsker(flower)
    assert asker.state(run.step("send_email").task_id) == KNOWN
    assert asker.state("0" * 8 + "-0000-0000-0000-" + "0" * 12) == UNKNOWN
    assert FlowerAsker("http://127.0.0.1:9").state(run.step("send_email").task_id) == "unreachable"
