"""Best-effort, non-atomic and pivot steps on a real prefork worker, Redis and PostgreSQL: what happened
outside (example_effects, each effect exactly once, in order) and what sagaflow recorded."""

from __future__ import annotations

import json

import pytest

from sagaflow import InvalidTransition, Saga
from sagaflow.errors import DefinitionError
from sagaflow.model.definition import registry
from sagaflow.store import tables as t
from sagaflow.tasks.effects import effects_of
from tests.helpers import kinds, wait_for
from tests.sagas_flags import blocked_file
from tests.web_client import call

pytestmark = pytest.mark.integration


def alerts_for(settings, run_id):
    path = settings.home / "alerts.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [a for a in map(json.loads, lines) if a["run_id"] == run_id]


# ---------------------------------------------------------------------------------------------- best-effort

def test_a_best_effort_step_that_keeps_failing_is_recorded_and_the_run_goes_on(client):
    run = client.wait(client.start("flags_best_effort", {"flaky": {"analytics": 10}}).id)

    assert run.status == "succeeded", run
    assert effects_of(run.id) == [("do", "record"), ("do", "confirm")]  # no undo at all
    step = run.step("analytics")
    assert (step.status, step.attempts, step.result) == ("failed_best_effort", 3, None)
    assert "TransientFailure" in step.error
    assert run.step("confirm").result == {"step": "confirm", "saw": {"record": True, "analytics": False}}
    assert kinds(run, "step_retried", "step_failed_best_effort", "step_failed") == [
        ("step_retried", "analytics"), ("step_retried", "analytics"), ("step_failed_best_effort", "analytics")]
    event = next(e for e in run.events if e.kind == "step_failed_best_effort")
    assert "TransientFailure" in event.detail["error"]
    assert kinds(run)[-1] == ("run_succeeded", None)


def test_a_failed_best_effort_step_is_not_compensated_when_a_later_step_fails(client):
    run = client.wait(client.start("flags_best_effort", {"fail_at": "analytics", "flaky": {}}).id)
    assert run.status == "succeeded" and run.step("analytics").attempts == 1  # non-retryable: at once

    run = client.wait(client.start("flags_best_effort", {"flaky": {"analytics": 10},
                                                         "fail_at": "confirm"}).id)
    assert run.status == "compensated", run
    assert effects_of(run.id) == [("do", "record"), ("undo", "record")]
    assert run.step("analytics").status == "failed_best_effort"
    assert kinds(run, "compensation_succeeded") == [("compensation_succeeded", "record")]


def test_a_best_effort_last_step_that_fails_still_ends_the_run_succeeded(client):
    run = client.wait(client.start("flags_best_effort_last", {"fail_at": "learn"}).id)

    assert run.status == "succeeded", run
    assert effects_of(run.id) == [("do", "book")]
    assert run.step("learn").status == "failed_best_effort"
    assert kinds(run)[-2:] == [("step_failed_best_effort", "learn"), ("run_succeeded", None)]


def test_a_best_effort_step_that_succeeds_is_an_ordinary_step(client):
    run = client.wait(client.start("flags_best_effort", {}).id)
    assert run.status == "succeeded"
    assert effects_of(run.id) == [("do", "record"), ("do", "analytics"), ("do", "confirm")]


# ---------------------------------------------------------------------------------------------- non-atomic

def test_a_non_atomic_step_that_fails_is_compensated_first_then_the_earlier_steps(client):
    run = client.wait(client.start("flags_non_atomic", {"fail_after_effect": "transfer"}).id)

    assert run.status == "compensated", run
    assert effects_of(run.id) == [("do", "reserve"), ("do", "notify"), ("do", "transfer"),
                                  ("undo", "transfer"), ("undo", "reserve")]
    assert kinds(run, "compensation_succeeded") == [("compensation_succeeded", "transfer"),
                                                    ("compensation_succeeded", "reserve")]
    statuses = {s.name: s.status for s in run.steps}
    assert statuses == {"reserve": "compensated", "notify": "succeeded", "transfer": "compensated",
                        "close": "skipped"}
    assert run.step("transfer").compensation_attempts == 1


def test_a_non_atomic_step_that_fails_after_retries_is_compensated_even_with_no_effect(client):
    run = client.wait(client.start("flags_non_atomic", {"flaky": {"transfer": 10}}).id)

    assert run.status == "compensated", run
    assert run.step("transfer").attempts == 3
    # Its compensation ran (it cannot know how far the step got), then the earlier undo.
    assert effects_of(run.id) == [("do", "reserve"), ("do", "notify"), ("undo", "transfer"), ("undo", "reserve")]


def test_an_ordinary_step_failing_after_a_non_atomic_one_undoes_it_once(client):
    run = client.wait(client.start("flags_non_atomic", {"fail_at": "close"}).id)

    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "reserve"), ("do", "notify"), ("do", "transfer"),
                                  ("undo", "transfer"), ("undo", "reserve")]


def test_a_non_atomic_step_without_a_compensation_is_refused_at_start_and_nothing_is_written(client):
    saga = Saga("flags_non_atomic_bare")

    @saga.step(non_atomic=True)
    def move(ctx):
        return None

    try:
        with client.store.engine.connect() as conn:
            before = conn.execute(t.runs.select().with_only_columns(t.runs.c.id)).all()
        with pytest.raises(DefinitionError, match="'move': non_atomic=True needs a compensation"):
            client.start("flags_non_atomic_bare", {})
        with client.store.engine.connect() as conn:
            assert conn.execute(t.runs.select().with_only_columns(t.runs.c.id)).all() == before
    finally:
        registry.remove("flags_non_atomic_bare")


# ---------------------------------------------------------------------------------------------- pivot

def test_a_failure_before_the_pivot_compensates(client):
    run = client.wait(client.start("flags_pivot", {"fail_at": "charge"}).id)

    assert run.status == "compensated", run
    assert effects_of(run.id) == [("do", "hold"), ("undo", "hold")]


def test_a_failure_after_the_pivot_retries_then_leaves_the_run_stuck_with_an_alert(client, settings):
    run = client.start("flags_pivot", {"blocked": "ship"})
    blocked_file(run.id).touch()
    run = client.wait(run.id)

    assert run.status == "stuck", run
    assert effects_of(run.id) == [("do", "hold"), ("do", "charge")]  # nothing undone
    assert [(s.name, s.status) for s in run.steps] == [("hold", "succeeded"), ("charge", "succeeded"),
                                                       ("ship", "failed"), ("receipt", "pending")]
    assert run.step("ship").attempts == 3
    assert "'ship'" in run.error and "'charge'" in run.error and "blocked" in run.error
    assert kinds(run)[-1] == ("run_stuck", "ship")
    assert not kinds(run, "compensation_started")
    # The alert follows the commit that made the run stuck (as for compensation_failed): wait for it.
    wait_for(lambda: alerts_for(settings, run.id), what="the alert hook")
    assert alerts_for(settings, run.id) == [{"run_id": run.id, "status": "stuck", "error": run.error}]
    from tests.conftest import ARTIFACTS

    assert any(f"run_id={run.id}" in line and "event=run_stuck" in line and "sagaflow retry" in line
               for line in (ARTIFACTS / "worker.log").read_text().splitlines())

    # The operator fixes the cause and retries: the run goes forward from the failed step and succeeds.
    blocked_file(run.id).unlink()
    retried = client.retry(run.id)
    assert retried.status in ("running", "succeeded")
    run = client.wait(run.id)

    assert run.status == "succeeded", run
    assert run.error is None
    assert effects_of(run.id) == [("do", "hold"), ("do", "charge"), ("do", "ship"), ("do", "receipt")]
    assert run.step("ship").attempts == 4  # the count keeps growing; the policy started a new round
    assert run.step("receipt").result["saw"] == {"hold": True, "charge": True, "ship": True}
    assert ("retry_requested", "ship") in kinds(run)
    assert len(alerts_for(settings, run.id)) == 1
    with pytest.raises(InvalidTransition):
        client.retry(run.id)


def test_a_stuck_run_retried_before_the_cause_is_fixed_goes_stuck_again(client, settings):
    run = client.start("flags_pivot", {"blocked": "receipt"})
    blocked_file(run.id).touch()
    run = client.wait(run.id)
    assert run.status == "stuck"

    client.retry(run.id)
    run = client.wait(run.id)

    assert run.status == "stuck"
    assert run.step("receipt").attempts == 6  # a full new round of 3
    assert kinds(run, "run_stuck") == [("run_stuck", "receipt")] * 2
    wait_for(lambda: len(alerts_for(settings, run.id)) == 2, what="the second alert")
    assert effects_of(run.id) == [("do", "hold"), ("do", "charge"), ("do", "ship")]
    blocked_file(run.id).unlink()


def test_cancel_after_the_pivot_is_refused_through_the_client_and_the_api(client, web_url):
    run = client.start("flags_pivot", {"sleep": {"ship": 3}})
    wait_for(lambda: client.get(run.id).step("charge").status == "succeeded", what="the pivot to succeed")

    with pytest.raises(InvalidTransition, match="pivot step 'charge'.*can no\\s+longer be undone"):
        client.cancel(run.id)
    answer = call("POST", f"{web_url}/api/runs/{run.id}/cancel")
    assert answer.status == 409 and "can no longer be undone" in answer.json["error"]

    run = client.wait(run.id)
    assert run.status == "succeeded" and not run.cancel_requested
    assert effects_of(run.id) == [("do", "hold"), ("do", "charge"), ("do", "ship"), ("do", "receipt")]
    assert not kinds(run, "cancel_requested")


def test_a_cancel_requested_while_the_pivot_runs_is_overruled_and_nothing_is_half_undone(client):
    run = client.start("flags_pivot", {"sleep": {"charge": 2}})
    wait_for(lambda: client.get(run.id).step("charge").status == "running", what="the pivot to start")

    client.cancel(run.id)  # accepted: the pivot has not succeeded yet
    run = client.wait(run.id)

    # The pivot succeeded before the cancel took effect: the run went forward, and says so.
    assert run.status == "succeeded", run
    assert effects_of(run.id) == [("do", "hold"), ("do", "charge"), ("do", "ship"), ("do", "receipt")]
    assert kinds(run, "cancel_requested", "cancel_overruled") == [("cancel_requested", None),
                                                                 ("cancel_overruled", None)]
    assert not run.cancel_requested


def test_a_cancel_before_the_pivot_compensates(client):
    run = client.start("flags_pivot", {"sleep": {"hold": 2}})
    wait_for(lambda: client.get(run.id).step("hold").status == "running", what="the first step to start")
    client.cancel(run.id)
    run = client.wait(run.id)

    assert run.status == "cancelled"
    assert effects_of(run.id) == [("do", "hold"), ("undo", "hold")]


# ---------------------------------------------------------------------------------------------- lost workers

def test_a_best_effort_step_killed_at_its_hard_limit_lets_the_run_go_on_once(client):
    # The hard time limit fires the errback twice: the run goes on once, nothing is undone.
    run = client.wait(client.start("flags_lost_best_effort", {}).id, timeout=60)

    assert run.status == "succeeded", run
    assert effects_of(run.id) == [("do", "prep"), ("do", "hang"), ("do", "after")]
    assert run.step("hang").status == "failed_best_effort" and "lost" in run.step("hang").error
    assert kinds(run, "step_failed_best_effort") == [("step_failed_best_effort", "hang")]
    assert kinds(run, "step_started").count(("step_started", "after")) == 1


def test_a_non_atomic_step_killed_at_its_hard_limit_is_undone_first_exactly_once(client):
    run = client.wait(client.start("flags_lost_non_atomic", {}).id, timeout=60)

    assert run.status == "compensated", run
    assert effects_of(run.id) == [("do", "setup"), ("do", "partial"), ("undo", "partial"), ("undo", "setup")]
    assert kinds(run, "compensation_started") == [("compensation_started", "partial"),
                                                  ("compensation_started", "setup")]
    assert run.step("partial").status == "compensated" and run.step("never").status == "skipped"
