"""The saga runtime on a real worker, Redis and PostgreSQL: outcomes checked in example_effects (what
happened outside) and in the event history (what sagaflow recorded)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from sagaflow import InvalidTransition
from sagaflow.model.definition import registry
from sagaflow.tasks.effects import effects_of
from tests.helpers import child_pids, expected_after_failure, kinds, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = ["create_booking", "collect_payment", "data_ingest"]
FAILURE_CASES = [(saga, step.name) for saga in EXAMPLES for step in registry.get(saga).steps]


@pytest.mark.parametrize("saga", EXAMPLES)
def test_success_runs_every_step_once_in_order(client, saga):
    run = client.wait(client.start(saga, {"customer": "c1"}).id)
    names = [s.name for s in registry.get(saga).steps]

    assert run.status == "succeeded"
    assert [(s.name, s.status, s.attempts) for s in run.steps] == [(n, "succeeded", 1) for n in names]
    assert effects_of(run.id) == [("do", n) for n in names]
    assert kinds(run, "step_succeeded") == [("step_succeeded", n) for n in names]
    assert kinds(run)[0] == ("run_started", None) and kinds(run)[-1] == ("run_succeeded", None)
    assert all(s.task_id for s in run.steps)
    assert run.steps[-1].result is not None or saga == "collect_payment"


@pytest.mark.parametrize("saga,failed", FAILURE_CASES)
def test_failure_at_each_step_compensates_completed_steps_in_reverse_once(client, saga, failed):
    run = client.wait(client.start(saga, {"fail_at": failed}).id)
    expected = expected_after_failure(saga, failed)

    assert run.status == "compensated", run
    assert effects_of(run.id) == expected
    undone = [step for kind, step in expected if kind == "undo"]
    assert kinds(run, "compensation_succeeded") == [("compensation_succeeded", s) for s in undone]
    assert kinds(run, "step_failed") == [("step_failed", failed)]
    assert kinds(run)[-1] == ("run_compensated", None)
    statuses = {s.name: s.status for s in run.steps}
    assert statuses[failed] == "failed"
    assert all(statuses[s] == "compensated" for s in undone)
    names = [s.name for s in run.steps]
    assert all(statuses[n] == "skipped" for n in names[names.index(failed) + 1:])
    assert run.step(failed).attempts == 1  # non-retryable: no retry


def test_flaky_step_retries_with_backoff_then_succeeds(client):
    run = client.wait(client.start("create_booking", {"flaky": {"send_email": 2}}).id)

    assert run.status == "succeeded"
    assert run.step("send_email").attempts == 3
    retries = [e for e in run.events if e.kind == "step_retried"]
    assert [(e.step, e.detail["attempt"]) for e in retries] == [("send_email", 1), ("send_email", 2)]
    # STEP_RETRY: 0.1 s then 0.2 s, each with equal jitter (between half and all of it).
    assert 0.05 <= retries[0].detail["retry_in"] <= 0.1
    assert 0.1 <= retries[1].detail["retry_in"] <= 0.2
    assert "TransientFailure" in retries[0].detail["error"]
    assert effects_of(run.id).count(("do", "send_email")) == 1


def test_step_that_keeps_failing_gives_up_after_max_attempts_and_compensates(client):
    run = client.wait(client.start("create_booking", {"flaky": {"send_whatsapp": 10}}).id)

    assert run.status == "compensated"
    assert run.step("send_whatsapp").attempts == 3
    assert "TransientFailure" in run.step("send_whatsapp").error
    assert effects_of(run.id) == expected_after_failure("create_booking", "send_whatsapp")


def test_compensation_that_fails_a_few_times_is_retried(client):
    run = client.wait(client.start("create_booking", {"fail_at": "add_calendar",
                                                      "fail_compensation": {"send_email": 2}}).id)

    assert run.status == "compensated"
    assert run.step("send_email").compensation_attempts == 3
    assert kinds(run, "compensation_retried") == [("compensation_retried", "send_email")] * 2
    assert effects_of(run.id) == expected_after_failure("create_booking", "add_calendar")


def test_compensation_that_keeps_failing_waits_for_an_operator_then_retry_finishes_it(client, settings):
    # COMPENSATION_RETRY allows 3 attempts a round: 4 failures outlast the first round, not the second.
    run = client.wait(client.start("create_booking", {"fail_at": "add_calendar",
                                                      "fail_compensation": {"send_email": 4}}).id)

    assert run.status == "compensation_failed"
    assert "send_email" in run.error
    assert run.step("send_email").status == "compensation_failed"
    assert run.step("create_invoice").status == "succeeded"  # not undone yet: the chain stopped
    assert effects_of(run.id) == [("do", "create_invoice"), ("do", "send_email"), ("do", "send_whatsapp"),
                                  ("undo", "send_whatsapp")]
    assert kinds(run)[-1] == ("run_compensation_failed", "send_email")
    # The errback writes the alert after it commits the run's status, so the file may lag the status a moment.
    alert_file = settings.home / "alerts.jsonl"

    def alerts_of_run():
        lines = alert_file.read_text().splitlines() if alert_file.exists() else []
        return [a for a in map(json.loads, lines) if a["run_id"] == run.id]

    assert wait_for(alerts_of_run, what="the alert hook's line") == [
        {"run_id": run.id, "status": "compensation_failed", "error": run.error}]  # the alert hook, once

    client.retry(run.id)
    run = client.wait(run.id)

    assert run.status == "compensated"
    assert run.error is None
    assert run.step("send_email").compensation_attempts == 5
    assert effects_of(run.id) == expected_after_failure("create_booking", "add_calendar")
    with pytest.raises(InvalidTransition):
        client.retry(run.id)


def test_idempotent_start_returns_the_first_run_and_runs_nothing_twice(client):
    first = client.start("collect_payment", {"amount": 5}, idempotency_key="order-17")
    second = client.start("collect_payment", {"amount": 5}, idempotency_key="order-17")

    assert second.id == first.id
    run = client.wait(first.id)
    assert run.status == "succeeded"
    assert effects_of(run.id) == [("do", s.name) for s in run.steps]
    assert client.start("collect_payment", {"amount": 5}, idempotency_key="order-17").id == first.id
    assert len([r for r in client.list(saga="collect_payment", limit=1000) if r.idempotency_key == "order-17"]) == 1


def test_step_result_is_committed_before_the_next_step_is_published(client):
    run = client.wait(client.start("commit_order", {}).id)

    assert run.status == "succeeded", run.steps
    assert run.step("second").result == {"seen": run.step("first").result}


def test_cancel_while_a_slow_step_runs_stops_and_undoes_completed_steps(client):
    run = client.start("create_booking", {"sleep": {"send_email": 1.5}})
    wait_for(lambda: client.get(run.id).step("send_email").status == "running", what="send_email to start")

    cancelled = client.cancel(run.id)
    assert cancelled.cancel_requested
    assert client.cancel(run.id).cancel_requested  # asking twice is harmless

    run = client.wait(run.id)
    assert run.status == "cancelled"
    assert effects_of(run.id) == [("do", "create_invoice"), ("do", "send_email"),
                                  ("undo", "send_email"), ("undo", "create_invoice")]
    assert [s.status for s in run.steps] == ["compensated", "compensated", "skipped", "skipped"]
    assert kinds(run, "cancel_requested", "run_cancelled") == [("cancel_requested", None), ("run_cancelled", None)]
    with pytest.raises(InvalidTransition):
        client.cancel(run.id)


def test_cancel_after_the_last_step_but_before_finish_still_cancels(client):
    run = client.start("data_ingest", {"sleep": {"expose": 1.0}})
    wait_for(lambda: client.get(run.id).step("expose").status == "running", what="expose to start")
    client.cancel(run.id)

    run = client.wait(run.id)
    assert run.status == "cancelled"
    assert [k for k, _ in effects_of(run.id)] == ["do"] * 4 + ["undo"] * 4


def test_a_step_returning_non_json_fails_once_with_a_clear_error(client):
    run = client.wait(client.start("bad_result", {}).id)

    assert run.status == "compensated"
    step = run.step("returns_object")
    assert step.status == "failed" and step.attempts == 1
    assert "not JSON-serializable" in step.error and "returns_object" in step.error
    assert effects_of(run.id) == [("do", "prepare"), ("undo", "prepare")]


def test_a_pool_child_killed_mid_step_is_retried_and_the_run_completes(client, worker):
    # task_retry_on_worker_lost re-sends the step with retries+1; its claim token takes the step over.
    run = client.start("create_booking", {"sleep": {"send_email": 2.0}})
    wait_for(lambda: client.get(run.id).step("send_email").status == "running", what="send_email to start")
    for pid in child_pids(worker.pid):
        os.kill(pid, signal.SIGKILL)

    run = client.wait(run.id, timeout=60)
    assert run.status == "succeeded"
    assert run.step("send_email").attempts == 2
    assert effects_of(run.id) == [("do", s.name) for s in run.steps]


def test_a_step_killed_at_its_hard_time_limit_is_compensated_once(client):
    run = client.wait(client.start("hard_limit", {}).id, timeout=60)

    assert run.status == "compensated"
    step = run.step("stubborn")
    assert step.status == "failed" and "hard time limit" in step.error
    assert effects_of(run.id) == [("do", "reserve"), ("undo", "reserve")]
    time.sleep(1)  # let the second errback arrive: it must change nothing
    again = client.get(run.id)
    assert kinds(again, "compensation_started", "run_compensated") == [
        ("compensation_started", "reserve"), ("run_compensated", None)]
    assert effects_of(run.id) == [("do", "reserve"), ("undo", "reserve")]


def test_a_saga_longer_than_a_chain_window_runs_every_step_once_and_compensates_across_windows(client):
    ok = client.wait(client.start("long_saga", {}).id, timeout=60)
    assert ok.status == "succeeded"
    assert effects_of(ok.id) == [("do", f"l{i}") for i in range(20)]
    assert ok.step("l19").result == {"i": 19}

    failed = client.wait(client.start("long_saga", {"fail_at": "l17"}).id, timeout=60)
    assert failed.status == "compensated"
    assert effects_of(failed.id) == ([("do", f"l{i}") for i in range(17)]
                                     + [("undo", f"l{i}") for i in range(16, -1, -1)])
