"""At-least-once delivery: the same step, chain or errback delivered twice changes nothing the second time.
And every bad input is refused with a clear error before anything is written."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from sagaflow import InvalidInput, UnknownRun, UnknownSaga
from sagaflow.app import celery_app, get_store
from sagaflow.model.definition import registry
from sagaflow.runtime.compiler import ON_COMPENSATION_FAILED, ON_STEP_FAILED, compile_run
from sagaflow.store import tables
from sagaflow.tasks.effects import effects_of
from tests.helpers import expected_after_failure, kinds, wait_for

pytestmark = pytest.mark.integration


def _count(table) -> int:
    with get_store().engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def _quiet(client, run_id, seconds: float = 1.0):
    """Let any stray duplicate message be consumed, then return the run."""
    time.sleep(seconds)
    return client.get(run_id)


def test_the_whole_chain_published_twice_runs_each_effect_once(client):
    saga = registry.get("create_booking")
    run = client.start("create_booking", {"sleep": {"send_email": 0.5}})
    compile_run(celery_app, saga, run.id).apply_async()  # a second copy of every step message

    run = client.wait(run.id)
    run = _quiet(client, run.id)
    assert run.status == "succeeded"
    assert effects_of(run.id) == [("do", s.name) for s in saga.steps]
    assert kinds(run, "step_started", "step_succeeded", "run_succeeded") == [
        *[k for s in saga.steps for k in (("step_started", s.name), ("step_succeeded", s.name))],
        ("run_succeeded", None),
    ]


def test_the_same_step_message_delivered_twice_while_running_is_ignored(client):
    run = client.start("create_booking", {"sleep": {"create_invoice": 1.0}})
    step = wait_for(lambda: (s := client.get(run.id).step("create_invoice")).status == "running" and s,
                    what="create_invoice to start")
    # Same task id, same retries number: what Redis redelivers after a visibility timeout.
    celery_app.signature("create_booking.create_invoice", args=({},),
                         kwargs={"run_id": run.id, "index": 0, "version": 1}).apply_async(task_id=step.task_id)

    run = _quiet(client, client.wait(run.id).id)
    assert run.status == "succeeded"
    assert run.step("create_invoice").attempts == 1
    assert kinds(run, "step_started").count(("step_started", "create_invoice")) == 1
    assert effects_of(run.id).count(("do", "create_invoice")) == 1


def test_a_late_duplicate_of_a_finished_run_changes_nothing(client):
    run = client.wait(client.start("data_ingest", {}).id)
    events_before = len(run.events)
    compile_run(celery_app, registry.get("data_ingest"), run.id).apply_async()

    run = _quiet(client, run.id)
    assert run.status == "succeeded"
    assert len(run.events) == events_before
    assert effects_of(run.id) == [("do", s.name) for s in run.steps]


def test_a_duplicate_errback_neither_moves_the_run_nor_undoes_twice(client):
    run = client.start("create_booking", {"fail_at": "add_calendar", "sleep": {"send_whatsapp": 0.8}})
    wait_for(lambda: client.get(run.id).status == "compensating", what="compensation to begin")
    errback = celery_app.signature(ON_STEP_FAILED, args=(run.id, 3), immutable=True)
    errback.apply_async()
    errback.apply_async()

    run = _quiet(client, client.wait(run.id).id)
    assert run.status == "compensated"
    assert effects_of(run.id) == expected_after_failure("create_booking", "add_calendar")
    assert kinds(run, "run_compensated") == [("run_compensated", None)]
    assert len(kinds(run, "compensation_started")) == 3

    # The compensation errback, late and twice, does not drag a compensated run back.
    celery_app.signature(ON_COMPENSATION_FAILED, args=(run.id, 0), immutable=True).apply_async()
    celery_app.signature(ON_COMPENSATION_FAILED, args=(run.id, 0), immutable=True).apply_async()
    assert _quiet(client, run.id).status == "compensated"


@pytest.mark.parametrize("bad_input,error", [
    ([1, 2], "must be a JSON object"),
    ("text", "must be a JSON object"),
    ({"when": object()}, "not JSON-serializable"),
    ({"n": float("nan")}, "not JSON-serializable"),
])
def test_input_that_is_not_a_json_object_is_refused_and_nothing_is_written(client, bad_input, error):
    before = (_count(tables.runs), _count(tables.steps), _count(tables.events))
    with pytest.raises(InvalidInput, match=error):
        client.start("create_booking", bad_input)
    assert (_count(tables.runs), _count(tables.steps), _count(tables.events)) == before


def test_unknown_saga_is_refused_and_nothing_is_written(client):
    before = _count(tables.runs)
    with pytest.raises(UnknownSaga, match="unknown saga 'no_such_saga'.*create_booking"):
        client.start("no_such_saga", {})
    assert _count(tables.runs) == before


@pytest.mark.parametrize("key", ["", "k" * 201, 17])
def test_malformed_idempotency_key_is_refused(client, key):
    with pytest.raises(InvalidInput, match="idempotency_key"):
        client.start("create_booking", {}, idempotency_key=key)


def test_unknown_run_id_is_refused_everywhere(client):
    for call in (client.get, client.cancel, client.retry, client.wait):
        with pytest.raises(UnknownRun, match="unknown run id 'nope'"):
            call("nope")


def test_list_filters_and_pages_newest_first(client):
    ids = [client.start("data_ingest", {"i": i}).id for i in range(3)]
    for run_id in ids:
        client.wait(run_id)
    page = client.list(saga="data_ingest", limit=2)
    assert len(page) == 2 and page.total >= 3
    assert [r.id for r in page] == ids[::-1][:2]
    assert all(r.status == "succeeded" for r in client.list(status="succeeded", limit=1000))
    with pytest.raises(InvalidInput, match="unknown status"):
        client.list(status="bogus")


def _crashed_run(client, saga_name: str, completed: int, failed: bool):
    """A run as a worker that died would leave it: ``completed`` steps recorded as done (their effects
    made), then optionally the next step recorded failed, and nothing published after that."""
    import uuid

    from sagaflow.model.definition import StepContext
    from sagaflow.tasks.effects import do

    saga = registry.get(saga_name)
    store = get_store()
    run, _ = store.create_run(str(uuid.uuid4()), saga.name, saga.version, {},
                              [(s.name, s.compensate is not None) for s in saga.steps])
    for i, step in enumerate(saga.steps[:completed]):
        store.claim_step(run.id, i, f"t{i}:0", [], 60)
        do(StepContext(run_id=run.id, saga=saga.name, step=step.name, input={}, attempt=1,
                       idempotency_key=f"{run.id}:{step.name}"))
        store.complete_step(run.id, i, f"t{i}:0", {})
    if failed:
        store.claim_step(run.id, completed, f"t{completed}:0", [], 60)
        store.fail_step(run.id, completed, f"t{completed}:0", "ValueError: boom")
    return run


def test_worker_died_after_recording_a_failure_the_redelivered_step_fires_the_errback(client):
    run = _crashed_run(client, "create_booking", completed=2, failed=True)
    assert client.get(run.id).status == "running"  # stuck, until the step message is redelivered:
    celery_app.signature("create_booking.send_whatsapp", args=({},),
                         kwargs={"run_id": run.id, "index": 2, "version": 1},
                         link_error=[celery_app.signature(ON_STEP_FAILED, args=(run.id, 2), immutable=True)],
                         ).apply_async(task_id="t2")

    run = client.wait(run.id)
    assert run.status == "compensated"
    assert effects_of(run.id) == expected_after_failure("create_booking", "send_whatsapp")


def test_worker_died_after_its_failure_began_the_compensation_the_redelivered_step_lets_its_errback_finish(client):
    """A linear saga's step failing in its own task records its failure and begins the compensation in one
    statement, then publishes the undos itself. If its worker dies between the two, the step's message is
    delivered again: it finds the step failed, so its errback fires and publishes the undos from SQL."""
    run = _crashed_run(client, "create_booking", completed=3, failed=False)
    store = get_store()
    store.claim_step(run.id, 3, "t3:0", [], 60)
    assert store.fail_and_compensate(run.id, 3, "t3:0", "ValueError: boom") == (True, [2, 1, 0])
    assert client.get(run.id).status == "compensating"  # committed; nothing published: the worker died
    celery_app.signature("create_booking.add_calendar", args=({},),
                         kwargs={"run_id": run.id, "index": 3, "version": 1},
                         link_error=[celery_app.signature(ON_STEP_FAILED, args=(run.id, 3), immutable=True)],
                         ).apply_async(task_id="t3")  # the redelivery

    run = _quiet(client, client.wait(run.id).id)
    assert run.status == "compensated"
    assert effects_of(run.id) == expected_after_failure("create_booking", "add_calendar")
    assert kinds(run, "run_compensated") == [("run_compensated", None)]
    assert len(kinds(run, "compensation_started")) == 3 and len(kinds(run, "step_failed")) == 1


def test_worker_died_before_publishing_compensations_the_redelivered_errback_publishes_them(client):
    run = _crashed_run(client, "create_booking", completed=3, failed=True)
    assert get_store().begin_compensation(run.id, 3, "lost") == [2, 1, 0]  # committed, then the worker died
    celery_app.signature(ON_STEP_FAILED, args=(run.id, 3), immutable=True).apply_async()  # the redelivery

    run = client.wait(run.id)
    assert run.status == "compensated"
    assert effects_of(run.id) == expected_after_failure("create_booking", "add_calendar")
    assert kinds(run, "run_compensated") == [("run_compensated", None)]
