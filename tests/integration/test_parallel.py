"""Parallel branches on a real prefork worker, Redis and PostgreSQL (sagas in tests/sagas_branches.py):
the branches of a group overlap, the step after the join runs once with every result, and failures, late
branches, cancels, duplicates and a killed worker still end with each effect and undo exactly once."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from sagaflow.app import celery_app
from sagaflow.model.definition import registry
from sagaflow.runtime.compiler import compile_run
from sagaflow.tasks.effects import effects_of
from tests.helpers import kinds, wait_for

pytestmark = pytest.mark.integration


def statuses(run) -> dict:
    return {s.name: s.status for s in run.steps}


def test_the_branches_overlap_and_the_step_after_the_join_runs_once_with_both_results(client):
    run = client.wait(client.start("par_join", {"barrier": True}).id)

    assert run.status == "succeeded", [(s.name, s.status, s.error) for s in run.steps]
    effects = effects_of(run.id)
    assert effects[0] == ("do", "prepare") and effects[-1] == ("do", "after")
    assert sorted(effects[1:3]) == [("do", "left"), ("do", "right")] and len(effects) == 4
    left, right = run.step("left"), run.step("right")
    assert left.started_at < right.finished_at and right.started_at < left.finished_at  # they overlapped
    assert run.step("after").result == {"step": "after", "saw": ["left", "prepare", "right"]}
    assert kinds(run, "step_started").count(("step_started", "after")) == 1
    assert len(kinds(run, "group_joined")) == 1
    assert [s.group for s in run.steps] == [None, 1, 1, None]


def test_a_group_that_ends_the_saga_finishes_the_run_at_the_join(client):
    run = client.wait(client.start("par_last", {"barrier": True}).id)

    assert run.status == "succeeded"
    assert Counter(effects_of(run.id)) == Counter([("do", n) for n in ("first", "a", "b", "c")])
    assert effects_of(run.id)[0] == ("do", "first")
    assert kinds(run)[-1] == ("run_succeeded", None) and len(kinds(run, "group_joined")) == 1


def test_one_branch_fails_the_completed_branch_then_the_earlier_step_are_undone_once_each(client):
    run = client.wait(client.start("par_join", {"fail_at": "left", "sleep": {"left": 0.5}}).id)

    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "prepare"), ("do", "right"), ("undo", "right"), ("undo", "prepare")]
    assert statuses(run) == {"prepare": "compensated", "left": "failed", "right": "compensated", "after": "skipped"}
    assert kinds(run, "step_failed") == [("step_failed", "left")]
    assert kinds(run)[-1] == ("run_compensated", None)


def test_a_slow_branch_that_succeeds_after_the_other_failed_is_undone_first_and_the_run_ends_after_it(client):
    run = client.start("par_join", {"fail_at": "left", "sleep": {"right": 2.5}})
    wait_for(lambda: ("undos_held", None) in kinds(client.get(run.id)), what="the undo of prepare to wait")
    meanwhile = client.get(run.id)
    assert meanwhile.status == "compensating"  # not compensated while right still runs
    assert meanwhile.step("right").status == "running" and meanwhile.step("left").status == "failed"
    assert meanwhile.step("prepare").status == "succeeded"  # its undo waits for the group

    run = client.wait(run.id)
    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "prepare"), ("do", "right"), ("undo", "right"), ("undo", "prepare")]
    assert statuses(run) == {"prepare": "compensated", "left": "failed", "right": "compensated", "after": "skipped"}
    late = [e for e in run.events if e.kind == "step_succeeded" and e.step == "right"]
    assert len(late) == 1 and late[0].detail["late"] is True
    assert run.finished_at >= run.step("right").compensated_at
    assert kinds(run, "run_compensated") == [("run_compensated", None)]


def test_a_slow_branch_that_fails_after_the_other_failed_ends_the_run_without_a_second_errback(client):
    run = client.wait(client.start("par_join", {"fail_branches": ["left", "right"], "sleep": {"right": 1.5}}).id)

    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "prepare"), ("undo", "prepare")]
    assert statuses(run) == {"prepare": "compensated", "left": "failed", "right": "failed", "after": "skipped"}
    assert kinds(run, "run_compensated") == [("run_compensated", None)]
    assert run.events[-1].kind == "run_compensated"


def test_both_branches_failing_at_once_compensate_once(client):
    run = client.wait(client.start("par_join", {"fail_branches": ["left", "right"], "barrier": True}).id)

    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "prepare"), ("undo", "prepare")]
    assert statuses(run) == {"prepare": "compensated", "left": "failed", "right": "failed", "after": "skipped"}
    assert Counter(kinds(run, "step_failed")) == Counter([("step_failed", "left"), ("step_failed", "right")])
    time.sleep(1)  # let any second errback arrive: it must change nothing
    again = client.get(run.id)
    assert kinds(again, "compensation_started") == [("compensation_started", "prepare")]
    assert effects_of(run.id) == [("do", "prepare"), ("undo", "prepare")]


def test_a_branch_without_compensation_and_a_group_that_starts_the_saga(client):
    run = client.wait(client.start("par_first", {"fail_at": "z"}).id)

    assert run.status == "compensated"
    assert Counter(effects_of(run.id)) == Counter([("do", "x"), ("do", "y"), ("undo", "x")])
    assert effects_of(run.id)[-1] == ("undo", "x")
    assert statuses(run) == {"x": "compensated", "y": "succeeded", "z": "failed"}


def test_cancel_during_a_group_undoes_every_branch_and_the_step_before(client):
    run = client.start("par_join", {"sleep": {"left": 1.0, "right": 1.5}})
    wait_for(lambda: all(s.status == "running" for s in client.get(run.id).steps[1:3]), what="both branches")
    client.cancel(run.id)

    run = client.wait(run.id)
    assert run.status == "cancelled"
    effects = effects_of(run.id)
    assert Counter(effects) == Counter([("do", "prepare"), ("do", "left"), ("do", "right"),
                                        ("undo", "left"), ("undo", "right"), ("undo", "prepare")])
    assert effects.index(("do", "left")) < effects.index(("undo", "left"))
    assert effects.index(("do", "right")) < effects.index(("undo", "right"))
    assert effects.index(("undo", "left")) < effects.index(("undo", "prepare"))  # the group's undos first
    assert effects.index(("undo", "right")) < effects.index(("undo", "prepare"))
    assert statuses(run) == {"prepare": "compensated", "left": "compensated", "right": "compensated",
                             "after": "skipped"}
    assert kinds(run)[-1] == ("run_cancelled", None)


def test_duplicate_deliveries_of_the_branches_do_not_run_the_continuation_twice(client):
    saga = registry.get("par_join")
    run = client.start("par_join", {"sleep": {"left": 1.0, "right": 1.0}})
    wait_for(lambda: client.get(run.id).step("left").status == "running", what="left to start")
    results = {"prepare": client.get(run.id).step("prepare").result}
    compile_run(celery_app, saga, run.id, start=1, results=results).apply_async()  # while they run

    run = client.wait(run.id)
    assert run.status == "succeeded"
    compile_run(celery_app, saga, run.id, start=2, results=results).apply_async()  # after they are done
    time.sleep(1.5)

    run = client.get(run.id)
    assert run.status == "succeeded"
    assert Counter(effects_of(run.id)) == Counter([("do", n) for n in ("prepare", "left", "right", "after")])
    assert kinds(run, "step_started").count(("step_started", "after")) == 1
    assert len(kinds(run, "group_joined")) == 1
    assert run.step("left").attempts == 1 and run.step("right").attempts == 1


def test_the_research_example_requests_information_after_both_branches(client):
    ok = client.wait(client.start("request_data", {"study": "s-1"}).id)
    assert ok.status == "succeeded"
    effects = effects_of(ok.id)
    assert sorted(effects[:2]) == [("do", "identify_data_owners"), ("do", "select_samples")]
    assert effects[2:] == [("do", "request_information")]
    assert set(ok.step("request_information").result["owners"]) and ok.step("request_information").result["samples"]

    failed = client.wait(client.start("request_data", {"fail_at": "request_information"}).id)
    assert failed.status == "compensated"
    effects = effects_of(failed.id)
    assert sorted(effects[:2]) == [("do", "identify_data_owners"), ("do", "select_samples")]
    assert effects[2:] == [("undo", "identify_data_owners"), ("undo", "select_samples")]  # reverse definition


def test_a_worker_killed_during_a_group_is_recovered_and_joins_once(settings):
    from sagaflow import SagaClient
    from tests.integration.test_faults import fault_worker, rescue

    client = SagaClient()
    doomed = fault_worker(settings, "doomed-par")
    run = client.start("par_faults", {"sleep": {"left": 2.5, "right": 2.5}})
    wait_for(lambda: all(s.status == "running" for s in client.get(run.id).steps[1:3]), timeout=30,
             what="both branches to start")
    run = rescue(settings, client, doomed, run.id, "rescuer-par")

    assert run.status == "succeeded", [(s.name, s.status, s.error) for s in run.steps]
    effects = effects_of(run.id)
    assert effects[0] == ("do", "book") and effects[-1] == ("do", "notify")
    assert sorted(effects[1:3]) == [("do", "left"), ("do", "right")] and len(effects) == 4
    assert ("run_recovered", None) in kinds(run)
    assert len(kinds(run, "group_joined")) == 1
    assert run.step("left").attempts == 2 and run.step("right").attempts == 2


def test_a_branch_killed_at_its_hard_time_limit_compensates_the_other_branch_once(client):
    run = client.wait(client.start("par_hard", {}).id, timeout=60)

    assert run.status == "compensated"
    assert "hard time limit" in run.step("stubborn").error and run.step("stubborn").status == "failed"
    assert effects_of(run.id) == [("do", "prepare"), ("do", "quick"), ("undo", "quick"), ("undo", "prepare")]
    time.sleep(1)  # the second errback of the hard limit: it must change nothing
    again = client.get(run.id)
    assert Counter(kinds(again, "compensation_started")) == Counter([("compensation_started", "quick"),
                                                                     ("compensation_started", "prepare")])
    assert effects_of(run.id) == [("do", "prepare"), ("do", "quick"), ("undo", "quick"), ("undo", "prepare")]


def test_a_branch_lost_after_the_other_failed_is_recorded_failed_and_releases_the_undo_before_it(client):
    # The barrier: quick fails only once stubborn runs (with the pool still busy from the test before,
    # stubborn's message could otherwise wait, be skipped, and the scenario would not happen).
    run = client.start("par_hard", {"fail_at": "quick", "barrier": True})
    wait_for(lambda: ("undos_held", None) in kinds(client.get(run.id)), what="the undo of prepare to wait")
    meanwhile = client.get(run.id)
    assert meanwhile.status == "compensating" and meanwhile.step("stubborn").status == "running"
    assert meanwhile.step("prepare").status == "succeeded"

    run = client.wait(run.id, timeout=60)
    assert run.status == "compensated"
    stubborn = run.step("stubborn")
    assert stubborn.status == "failed" and "hard time limit" in stubborn.error
    assert [e.detail.get("late") for e in run.events if e.kind == "step_failed" and e.step == "stubborn"] == [True]
    assert effects_of(run.id) == [("do", "prepare"), ("undo", "prepare")]
    time.sleep(1)
    assert client.get(run.id).events[-1].kind == "run_compensated"


def test_a_branch_waiting_for_its_retry_when_the_other_fails_is_stopped_by_its_retry(client):
    run = client.start("par_retry", {"flaky": {"patient": 1}, "fail_at": "doomed", "sleep": {"doomed": 0.3}})
    wait_for(lambda: ("undos_held", None) in kinds(client.get(run.id)), what="the undo of prepare to wait")
    assert client.get(run.id).step("patient").status == "running"  # between its attempts

    run = client.wait(run.id)
    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "prepare"), ("undo", "prepare")]
    patient = run.step("patient")
    assert patient.status == "failed" and "began compensating" in patient.error and patient.attempts == 1
    assert statuses(run) == {"prepare": "compensated", "patient": "failed", "doomed": "failed", "after": "skipped"}


def test_a_best_effort_branch_that_fails_lets_the_group_join_and_is_never_undone(client):
    run = client.wait(client.start("par_best", {"fail_at": "maybe", "sleep": {"sure": 0.3}}).id)
    assert run.status == "succeeded", [(s.name, s.status, s.error) for s in run.steps]
    assert statuses(run) == {"prepare": "succeeded", "maybe": "failed_best_effort", "sure": "succeeded",
                             "after": "succeeded"}
    assert run.step("after").result == {"step": "after", "saw": ["maybe", "prepare", "sure"]}
    assert effects_of(run.id) == [("do", "prepare"), ("do", "sure"), ("do", "after")]
    assert len(kinds(run, "group_joined")) == 1

    failed = client.wait(client.start("par_best", {"fail_at": "after"}).id)
    assert failed.status == "compensated"
    assert Counter(effects_of(failed.id)) == Counter([("do", "prepare"), ("do", "maybe"), ("do", "sure"),
                                                      ("undo", "sure"), ("undo", "maybe"), ("undo", "prepare")])
    assert effects_of(failed.id)[-1] == ("undo", "prepare")
