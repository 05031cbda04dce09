"""Hostile input never crashes a worker (issue 11).

A value nested a few hundred levels deep passes ``json.dumps``, but a prefork worker's main process dies pickling
it for its pool (``RecursionError``: "Unrecoverable error"), and the message goes back to the queue to kill the
next worker. Deeper still (about 990 levels), JSON decoding fails: Celery drops the message and the run never
ends; in the Redis envelope, the worker dies. The client refuses such values (safejson); the worker refuses what
gets past it (sagaflow/inbound.py): the step fails and the run compensates, or a generic task's message is
dropped, logged. A crash shows here as the session worker's process gone.
"""

from __future__ import annotations

import base64
import json
import re
import uuid

import pytest
import redis
from sqlalchemy import func, select

from sagaflow import InvalidInput
from sagaflow.app import celery_app, get_store
from sagaflow.model import StepSpec
from sagaflow.model.definition import registry
from sagaflow.runtime.compiler import ON_STEP_FAILED, compile_run
from sagaflow.store import tables
from tests.conftest import ARTIFACTS
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

LOG = "worker.log"  # the session's worker (conftest.py): the one consumer of the default queue here
QUEUE = "celery"  # the default queue: a Redis list of that name in the tests' db
HOLD = "hostile-hold"  # a queue no worker consumes: a message is built there, then altered and requeued


@pytest.fixture
def broker(settings):
    return redis.Redis.from_url(settings.effective_broker_url)


def nested(depth: int):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


def nested_text(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


def runs_count() -> int:
    with get_store().engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(tables.runs)).scalar_one()


def events_count() -> int:
    with get_store().engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(tables.events)).scalar_one()


def leftovers(broker, needles) -> list[str]:
    """Messages still queued or unacknowledged that belong to this test: their envelope, or their base64 body,
    names one of ``needles`` (run ids, task ids, markers). Other tests' messages may sit in the shared queue's
    ``unacked`` hash (countdown retries wait there), so only ours count. Read as text, never decoded as JSON:
    a leftover may be too deep to decode."""
    found = []
    for raw in broker.lrange(QUEUE, 0, -1) + broker.hvals("unacked"):
        text = raw.decode("utf-8", "replace")
        body = re.search(r'"body": ?"([A-Za-z0-9+/=]*)"', text)
        decoded = base64.b64decode(body.group(1)).decode("utf-8", "replace") if body else ""
        if any(n in text or n in decoded for n in needles):
            found.append(text[:200])
    return found


def assert_worker_sound(worker, client, broker, *needles: str) -> None:
    """The worker's main process lives, nothing of this test (``needles``) is left queued or unacknowledged,
    and a normal run still succeeds."""
    assert needles, "name this test's runs or messages"
    assert worker.poll() is None, f"the worker died (exit code {worker.returncode}); see test-artifacts/{LOG}"
    run = client.start("two_steps", {})
    assert client.wait(run.id, timeout=60).status == "succeeded"
    wait_for(lambda: not leftovers(broker, needles), timeout=30,
             what=f"no message of this test left queued or unacknowledged ({needles})")
    assert worker.poll() is None


def wait_final(worker, client, run_id: str):
    """The run once it is final; fails at once if the worker died meanwhile."""
    def final():
        assert worker.poll() is None, f"the worker died (exit code {worker.returncode}); see test-artifacts/{LOG}"
        run = client.get(run_id)
        return run.is_final and run

    return wait_for(final, timeout=60, what="the run to end")


def running_at_second_step(saga_name: str = "two_steps") -> str:
    """A run of two_steps whose first step succeeded (recorded directly) and whose second was never published:
    where a message from an older sagaflow, or a re-drive of a result stored before the limit, would find it."""
    saga = registry.get(saga_name)
    run_id = str(uuid.uuid4())
    store = get_store()
    store.create_run(run_id, saga.name, saga.version, {}, [StepSpec.of(s) for s in saga.steps])
    token = f"test-{run_id}:0"
    assert store.claim_step(run_id, 0, token, [], 30).outcome.value == "claimed"
    assert store.complete_step(run_id, 0, token, {"opened": True})
    return run_id


def publish_altered(broker, signature, placeholder: str, replacement: str, header: str | None = None) -> None:
    """Publish ``signature`` (a real sagaflow message, errbacks and all) with the JSON string ``placeholder`` in
    its body replaced by the raw JSON text ``replacement``, which need not be decodable by this process: built
    on a queue nobody reads, rewritten in Redis, pushed onto the worker's queue. ``header``: raw JSON text added
    to the envelope's headers as ``"deep"``."""
    signature.apply_async(queue=HOLD)
    raw = wait_for(lambda: broker.rpop(HOLD), what="the message on the hold queue")
    envelope = json.loads(raw)
    body = base64.b64decode(envelope["body"]).decode()
    assert json.dumps(placeholder) in body
    envelope["body"] = base64.b64encode(body.replace(json.dumps(placeholder), replacement).encode()).decode()
    envelope["properties"]["delivery_info"]["routing_key"] = QUEUE
    text = json.dumps(envelope)
    if header is not None:
        assert text.startswith('{"body"') and '"headers": {' in text
        text = text.replace('"headers": {', '"headers": {"deep": ' + header + ", ", 1)
    broker.lpush(QUEUE, text)


# ------------------------------------------------------------------------------------- refused at the door

def test_deep_input_is_refused_by_start_and_writes_nothing(client):
    before = runs_count()
    with pytest.raises(InvalidInput, match="nested deeper than 64 levels"):
        client.start("create_booking", {"customer": nested(600)})
    assert runs_count() == before


def test_a_deep_signal_payload_is_refused_and_records_nothing(client, worker, broker):
    run = client.start("approval", {})
    wait_for(lambda: client.get(run.id).status == "waiting", timeout=60, what="the run to wait at its gate")
    runs, events = runs_count(), events_count()
    with pytest.raises(InvalidInput, match="nested deeper than 64 levels"):
        client.signal(run.id, "approved", {"by": nested(600)})
    assert (runs_count(), events_count()) == (runs, events)
    assert client.get(run.id).status == "waiting"
    client.signal(run.id, "approved", {"by": "ops"})  # the gate still passes with a sound payload
    assert client.wait(run.id, timeout=60).status == "succeeded"
    assert_worker_sound(worker, client, broker, run.id)


# ------------------------------------------------------------------------------------ refused by the worker

def test_a_step_returning_a_deep_result_fails_once_and_the_run_compensates(client, worker, broker):
    run = wait_final(worker, client, client.start("deep_result", {"depth": 600}).id)

    assert run.status == "compensated"
    nest = run.step("nest")
    assert nest.status == "failed" and nest.attempts == 1  # not retried
    assert "nested deeper than 64 levels" in nest.error
    assert run.step("stage").status == "compensated"
    assert_worker_sound(worker, client, broker, run.id)


@pytest.mark.parametrize("depth", [600, 5000, 100_000])
def test_a_deep_step_message_fails_its_step_and_the_run_compensates(client, worker, broker, depth):
    """Depth 600: more than the main process can pickle for its pool; 5,000 and 100,000: more than JSON can
    decode. The message reaches the worker straight from the queue, as from an older sagaflow."""
    run_id = running_at_second_step()
    saga = registry.get("two_steps")
    chain = compile_run(celery_app, saga, run_id, start=1, results={"open_account": "@@deep@@"})
    publish_altered(broker, chain, "@@deep@@", nested_text(depth))

    run = wait_final(worker, client, run_id)
    assert run.status == "compensated"
    assert run.step("welcome").status == "failed"
    assert "message was refused" in run.step("welcome").error
    assert run.step("open_account").status == "compensated"
    assert_worker_sound(worker, client, broker, run_id)
    log = (ARTIFACTS / LOG).read_text()
    assert "event=message_refused task=two_steps.welcome" in log and f"run_id={run_id}" in log


def test_a_deep_header_in_the_redis_envelope_fails_its_step(client, worker, broker):
    """5,000 levels in a header of the Redis envelope: kombu's transport decodes it outside Celery's error
    handling (the worker died and the message was lost)."""
    run_id = running_at_second_step()
    saga = registry.get("two_steps")
    chain = compile_run(celery_app, saga, run_id, start=1, results={"open_account": "@@shallow@@"})
    publish_altered(broker, chain, "@@shallow@@", '"shallow"', header=nested_text(5000))

    run = wait_final(worker, client, run_id)
    assert run.status == "compensated"
    assert "message was refused" in run.step("welcome").error
    assert_worker_sound(worker, client, broker, run_id)


@pytest.mark.parametrize("depth", [600, 5000])
def test_a_deep_errback_message_is_dropped_and_logged(client, worker, broker, depth):
    """A generic task (here the errback) with a deep argument is acknowledged and logged, never run."""
    run_id = running_at_second_step()
    errback = celery_app.signature(ON_STEP_FAILED, args=(run_id, 1, "@@deep@@"), kwargs={"version": 1},
                                   immutable=True)  # the deep value where the saga's name goes
    publish_altered(broker, errback, "@@deep@@", nested_text(depth))

    def dropped():
        assert worker.poll() is None, f"the worker died (exit code {worker.returncode}); see test-artifacts/{LOG}"
        return any(f"event=message_dropped task={ON_STEP_FAILED}" in line and run_id in line
                   for line in (ARTIFACTS / LOG).read_text().splitlines())

    wait_for(dropped, timeout=30, what="the drop to be logged")
    assert client.get(run_id).status == "running"  # untouched: the cut message was not acted on
    assert_worker_sound(worker, client, broker, run_id)


# ------------------------------------------------------------------------------- shallow but malformed

def _headers(**changes) -> dict:
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "sagaflow.finish", "id": task_id, "root_id": task_id, "parent_id": None,
               "group": None, "retries": 0, "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}",
               "origin": "hostile-test", "ignore_result": True, "eta": None, "expires": None, "shadow": None}
    return {**headers, **changes}


_SOUND_BODY = json.dumps([[{}], {"run_id": "no-such-run"},
                          {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])


@pytest.mark.parametrize("headers,body", [
    pytest.param(_headers(task=["sagaflow.finish"]), _SOUND_BODY, id="task-name-a-list"),
    pytest.param(_headers(id=[1]), _SOUND_BODY, id="task-id-a-list"),
    pytest.param(_headers(timelimit="none"), _SOUND_BODY, id="timelimit-not-a-pair"),
    pytest.param(_headers(), json.dumps([["args only"]]), id="body-not-args-kwargs-embed"),
    pytest.param(None, None, id="envelope-not-json"),
])
def test_a_malformed_message_is_dropped_and_the_worker_lives(client, worker, broker, headers, body):
    """Shallow messages that made Celery's main process raise while receiving them ("Unrecoverable error": the
    worker exited, and the message, back in the queue, ended the next one)."""
    marker = f"hostile-{uuid.uuid4()}"  # names this message in the queue: its correlation id, or its text
    if headers is None:
        broker.lpush(QUEUE, "}{ not json " + marker)
    else:
        broker.lpush(QUEUE, json.dumps({
            "body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
            "content-type": "application/json", "headers": headers,
            "properties": {"correlation_id": marker, "reply_to": "", "delivery_mode": 2,
                           "delivery_info": {"exchange": "", "routing_key": QUEUE}, "priority": 0,
                           "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
        }))
    wait_for(lambda: broker.llen(QUEUE) == 0, timeout=30, what="the worker to take the message")
    assert_worker_sound(worker, client, broker, marker)


def test_a_deep_input_in_a_plain_run_message_fails_the_run(client, worker, broker):
    """A run that policy made plain carries its input in every message: a deep one fails the run (``failed``:
    nothing is compensated in a plain run) without running the step."""
    saga = registry.get("two_steps")
    run_id = str(uuid.uuid4())
    get_store().create_run(run_id, saga.name, saga.version, {}, [StepSpec.of(s) for s in saga.steps], mode="plain")
    chain = compile_run(celery_app, saga, run_id, plain=True, input={"customer": "@@deep@@"})
    publish_altered(broker, chain, "@@deep@@", nested_text(600))

    run = wait_final(worker, client, run_id)
    assert run.status == "failed"
    assert "message was refused" in run.error
    assert_worker_sound(worker, client, broker, run_id)
