"""RabbitMQ specifics (the rest of the suite runs on RabbitMQ with SAGAFLOW_TEST_BROKER=rabbitmq): quorum
queues (SAGAFLOW_RABBITMQ_QUORUM=true) run a saga with a retry (native delayed delivery) and a
compensation, every queue declared as a quorum queue. Skipped, saying why, where no RabbitMQ answers."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from celery import Celery

from sagaflow import SagaClient
from sagaflow.config.celeryconfig import celery_settings
from sagaflow.tasks.effects import effects_of
from tests.services import TEST_DATABASE, find_rabbitmq
from tests.workers import start_worker, stop_worker

pytestmark = pytest.mark.integration

VHOST = f"{TEST_DATABASE}_quorum"


@pytest.fixture(scope="module")
def quorum_url():
    url, why = find_rabbitmq(None, VHOST)
    if url is None:
        pytest.skip(f"no RabbitMQ for the quorum-queue test: {why}")
    yield url
    subprocess.run([shutil.which("rabbitmqctl"), "delete_vhost", VHOST], capture_output=True, timeout=60)


def queue_types() -> dict[str, str]:
    out = subprocess.run([shutil.which("rabbitmqctl"), "list_queues", "-p", VHOST, "name", "type", "--quiet",
                          "--no-table-headers"], capture_output=True, text=True, timeout=60).stdout
    return dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)


def test_quorum_queues_run_a_saga_with_a_retry_and_a_compensation(settings, quorum_url):
    local = settings.with_(broker_url=quorum_url, rabbitmq_quorum=True)
    app = Celery("quorum-test")
    app.conf.update(celery_settings(local))
    assert app.conf.task_default_queue_type == "quorum"
    client = SagaClient(app=app)
    worker = start_worker(local, "quorum", concurrency=2, log_name="quorum.log", args=("-Q", "faults,celery"),
                          app=app)
    try:
        ok = client.start("faults", {"flaky": {"charge": 1}})  # one retry with a countdown
        undone = client.start("faults", {"fail_at": "notify"})
        ok, undone = client.wait(ok.id, timeout=60), client.wait(undone.id, timeout=60)
    finally:
        stop_worker(worker)
        app.close()
    assert ok.status == "succeeded" and ok.step("charge").attempts == 2
    assert effects_of(ok.id) == [("do", "book"), ("do", "charge"), ("do", "notify")]
    assert undone.status == "compensated"
    assert effects_of(undone.id) == [("do", "book"), ("do", "charge"), ("undo", "charge"), ("undo", "book")]
    types = queue_types()
    assert types.get("faults") == "quorum" and types.get("celery") == "quorum", types
