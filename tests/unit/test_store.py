"""The guarded transitions, on SQLite with no broker: who wins a claim, and what a loser changes (nothing)."""

import time

import pytest

from sagaflow import InvalidTransition, UnknownRun
from sagaflow.model import ClaimOutcome as C

STEPS = [("a", True), ("b", True), ("c", False)]


def new_run(store, run_id="r1", key=None):
    run, created = store.create_run(run_id, "s", 1, {"x": 1}, STEPS, key)
    return run


def test_create_run_writes_run_steps_and_first_event(store):
    run = new_run(store)
    assert run.status == "pending" and run.input == {"x": 1}
    assert [(s.name, s.status) for s in run.steps] == [("a", "pending"), ("b", "pending"), ("c", "pending")]
    assert [e.kind for e in run.events] == ["run_started"]


def test_the_snapshot_create_run_returns_is_what_was_stored(store):
    run, created = store.create_run("r1", "s", 1, {"x": [1, "a"]}, STEPS, "key-1")
    assert created and run == store.get_run("r1")


def test_idempotency_key_returns_the_existing_run(store):
    first = new_run(store, "r1", key="k")
    again, created = store.create_run("r2", "s", 1, {}, STEPS, "k")
    assert not created and again.id == first.id
    with pytest.raises(UnknownRun):
        store.get_run("r2")


def test_first_claim_wins_and_a_duplicate_is_busy(store):
    new_run(store)
    claim = store.claim_step("r1", 0, "t0:0", [], 60)
    assert claim.outcome is C.CLAIMED and claim.attempt == 1 and claim.input == {"x": 1}
    assert store.get_run("r1").status == "running"
    assert store.claim_step("r1", 0, "t0:0", [], 60).outcome is C.BUSY  # same message, holder alive
    assert store.claim_step("r1", 0, "other:0", [], 60).outcome is C.BUSY  # another copy of the chain
    assert [e.kind for e in store.get_run("r1").events].count("step_started") == 1


def test_a_scheduled_retry_takes_the_claim_over_from_its_previous_attempt(store):
    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 60)
    assert store.retry_step("r1", 0, "t0:0", "boom", 0.1, 60)
    claim = store.claim_step("r1", 0, "t0:1", ["t0:0"], 60)
    assert claim.outcome is C.CLAIMED and claim.attempt == 2
    assert store.claim_step("r1", 0, "t0:1", ["t0:0"], 60).outcome is C.BUSY  # the retry delivered twice
    assert not store.retry_step("r1", 0, "t0:0", "stale", 0.1, 60)  # the old attempt lost its claim


def test_a_retry_takes_over_even_when_an_earlier_retry_never_claimed(store):
    # Retry 1 died before it could claim (database down) and was retried itself as retry 2.
    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 60)
    claim = store.claim_step("r1", 0, "t0:2", ["t0:0", "t0:1"], 60)
    assert claim.outcome is C.CLAIMED and claim.attempt == 2
    assert store.claim_step("r1", 0, "t0:1", ["t0:0"], 60).outcome is C.BUSY  # an older retry, late


def test_a_redelivery_takes_over_only_after_the_lease_expired(store):
    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 0.2)
    assert store.claim_step("r1", 0, "t0:0", [], 60).outcome is C.BUSY
    time.sleep(0.3)
    claim = store.claim_step("r1", 0, "t0:0", [], 60)
    assert claim.outcome is C.CLAIMED and claim.attempt == 2


def test_result_is_recorded_once_and_a_duplicate_carries_it_on(store):
    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 60)
    assert store.complete_step("r1", 0, "t0:0", {"id": 7})
    assert not store.complete_step("r1", 0, "t0:0", {"id": 8})
    dup = store.claim_step("r1", 0, "t0:0", [], 60)
    assert dup.outcome is C.DONE and dup.result == {"id": 7}
    run = store.get_run("r1")
    assert run.step("a").result == {"id": 7} and run.step("a").task_id == "t0"
    assert [e.kind for e in run.events].count("step_succeeded") == 1


def _two_done_third_claimed(store) -> None:
    new_run(store)
    for i, tok in enumerate(["a:0", "b:0"]):
        store.claim_step("r1", i, tok, [], 60)
        store.complete_step("r1", i, tok, i)
    store.claim_step("r1", 2, "c:0", [], 60)


def _two_done_third_failed(store, error: str) -> None:
    _two_done_third_claimed(store)
    store.fail_step("r1", 2, "c:0", error)


def test_compensation_begins_once_and_undoes_completed_compensable_steps_latest_first(store):
    _two_done_third_failed(store, "ValueError: no")

    assert store.begin_compensation("r1", 2, "lost") == [1, 0]
    assert store.begin_compensation("r1", 2, "lost") is None  # the duplicate errback
    run = store.get_run("r1")
    assert run.status == "compensating" and run.step("c").error == "ValueError: no"


def test_a_step_failing_in_its_own_task_begins_the_compensation_in_the_same_transition(store):
    _two_done_third_claimed(store)

    assert store.fail_and_compensate("r1", 2, "other:0", "ValueError: no") == (False, None)  # not its holder
    assert store.get_run("r1").status == "running" and store.get_run("r1").step("c").status == "running"
    assert store.fail_and_compensate("r1", 2, "c:0", "ValueError: no", "Traceback: ...") == (True, [1, 0])
    assert store.fail_and_compensate("r1", 2, "c:0", "ValueError: no") == (False, None)  # once
    assert store.begin_compensation("r1", 2, "lost") is None  # a redelivered errback finds it begun
    # Its worker died before publishing the undos: the step's redelivery is told it failed (its errback
    # re-drives them); a duplicate of an earlier step's message is told nothing.
    again = store.claim_step("r1", 2, "c:0", [], 60)
    assert again.outcome is C.FAILED and again.error == "ValueError: no"
    assert store.claim_step("r1", 1, "b:0", [], 60).outcome is C.GONE
    run = store.get_run("r1")
    assert run.status == "compensating" and run.step("c").status == "failed"
    assert run.step("c").error == "ValueError: no"
    failed = [e for e in run.events if e.kind == "step_failed"]
    assert len(failed) == 1 and failed[0].step == "c" and failed[0].detail["traceback"] == "Traceback: ..."


def test_a_first_step_failing_in_its_own_task_ends_the_run_at_once_and_skips_the_rest(store):
    new_run(store)
    store.claim_step("r1", 0, "a:0", [], 60)
    assert store.fail_and_compensate("r1", 0, "a:0", "ValueError: no") == (True, [])
    run = store.get_run("r1")
    assert run.status == "compensated" and run.finished_at is not None
    assert [s.status for s in run.steps] == ["failed", "skipped", "skipped"]
    assert [e.kind for e in run.events][-2:] == ["step_failed", "run_compensated"]


def test_a_step_failing_after_its_run_left_running_is_recorded_and_left_to_the_errback(store):
    new_run(store)
    store.claim_step("r1", 0, "a:0", [], 60)
    store.complete_step("r1", 0, "a:0", 0)
    store.claim_step("r1", 1, "b:0", [], 60)
    assert store.begin_compensation("r1", 1, "lost") == [0]  # e.g. a deadline's errback got there first
    assert store.fail_and_compensate("r1", 1, "b:0", "ValueError: late") == (False, None)  # no longer held
    run = store.get_run("r1")
    assert run.status == "compensating" and run.step("b").error == "lost"


def test_an_errback_for_a_step_still_marked_running_records_it_lost_and_skips_the_rest(store):
    new_run(store)
    store.claim_step("r1", 0, "a:0", [], 60)
    assert store.begin_compensation("r1", 0, "the worker was lost") == []
    run = store.get_run("r1")
    assert run.status == "compensated"
    assert [(s.status, s.error) for s in run.steps] == [("failed", "the worker was lost"), ("skipped", None),
                                                         ("skipped", None)]


def test_the_last_step_finishes_the_run_in_the_same_transition(store):
    new_run(store)
    for i, tok in enumerate(["a:0", "b:0"]):
        store.claim_step("r1", i, tok, [], 60)
        assert store.complete_step("r1", i, tok, i)
    store.claim_step("r1", 2, "c:0", [], 60)
    assert store.complete_last_step("r1", 2, "c:0", {"done": True}) == "succeeded"
    run = store.get_run("r1")
    assert run.status == "succeeded" and run.finished_at is not None and run.step("c").result == {"done": True}
    assert [e.kind for e in run.events][-2:] == ["step_succeeded", "run_succeeded"]
    assert store.complete_last_step("r1", 2, "c:0", {"again": 1}) is None  # a late duplicate changes nothing
    assert store.finish_run("r1") is C.GONE


def test_a_cancel_before_the_last_step_completes_leaves_the_run_to_its_errback(store):
    _two_done_third_claimed(store)
    store.request_cancel("r1")
    assert store.complete_last_step("r1", 2, "c:0", 2) == "running"  # recorded, but not finished
    assert store.begin_compensation("r1", 2, "lost") == [1, 0]  # "c" has no compensation (STEPS)
    store.claim_compensation("r1", 1, "u1:0", [], 60)
    assert store.complete_compensation("r1", 1, "u1:0") == "compensating"
    store.claim_compensation("r1", 0, "u0:0", [], 60)
    assert store.complete_compensation("r1", 0, "u0:0") == "cancelled"
    assert [e.kind for e in store.get_run("r1").events][-1] == "run_cancelled"


def _to_compensating(store):
    new_run(store)
    store.claim_step("r1", 0, "a:0", [], 60)
    store.complete_step("r1", 0, "a:0", {"v": 1})
    store.claim_step("r1", 1, "b:0", [], 60)
    store.fail_step("r1", 1, "b:0", "no")
    assert store.begin_compensation("r1", 1, "lost") == [0]


def test_compensation_claims_follow_the_same_rules(store):
    _to_compensating(store)
    claim = store.claim_compensation("r1", 0, "u:0", [], 60)
    assert claim.outcome is C.CLAIMED and claim.result == {"v": 1} and claim.attempt == 1
    assert store.claim_compensation("r1", 0, "u:0", [], 60).outcome is C.BUSY
    assert store.complete_compensation("r1", 0, "u:0") == "compensated"  # the last undo ends the run
    assert [e.kind for e in store.get_run("r1").events][-2:] == ["compensation_succeeded", "run_compensated"]
    assert not store.finish_compensation("r1")
    assert store.claim_compensation("r1", 0, "u:0", [], 60).outcome is C.GONE  # a late duplicate
    assert store.complete_compensation("r1", 0, "u:0") is None


def test_compensation_failed_waits_for_retry_which_resumes_it(store):
    _to_compensating(store)
    store.claim_compensation("r1", 0, "u:0", [], 60)
    assert store.fail_compensation("r1", 0, "u:0", "IOError: down")
    assert store.mark_compensation_failed("r1", 0, "lost")
    assert not store.mark_compensation_failed("r1", 0, "lost")  # duplicate errback
    run = store.get_run("r1")
    assert run.status == "compensation_failed" and "IOError: down" in run.error

    assert store.request_retry("r1") == [0]
    with pytest.raises(InvalidTransition, match="only runs in compensation_failed"):
        store.request_retry("r1")
    claim = store.claim_compensation("r1", 0, "v:0", [], 60)
    assert claim.outcome is C.CLAIMED and claim.attempt == 2  # attempts add up across rounds...
    assert claim.round_attempt == 1  # ...but the retry policy starts afresh
    assert store.retry_compensation("r1", 0, "v:0", "again", 0.1, 60)
    assert store.claim_compensation("r1", 0, "v:1", ["v:0"], 60).round_attempt == 2


def test_cancel_is_a_flag_that_the_next_claim_obeys(store):
    new_run(store)
    assert store.request_cancel("r1").cancel_requested
    assert store.request_cancel("r1").cancel_requested  # idempotent
    assert store.claim_step("r1", 0, "a:0", [], 60).outcome is C.CANCELLED
    assert store.begin_compensation("r1", 0, "lost") == []
    assert store.get_run("r1").status == "cancelled"
    with pytest.raises(InvalidTransition, match="is cancelled"):
        store.request_cancel("r1")


def test_finish_obeys_a_late_cancel(store):
    new_run(store)
    store.claim_step("r1", 0, "a:0", [], 60)
    store.request_cancel("r1")
    assert store.finish_run("r1") is C.CANCELLED
    assert store.get_run("r1").status == "running"


def test_unknown_run_everywhere(store):
    with pytest.raises(UnknownRun):
        store.get_run("x")
    with pytest.raises(UnknownRun):
        store.request_cancel("x")
    with pytest.raises(UnknownRun):
        store.request_retry("x")
    assert store.claim_step("x", 0, "t:0", [], 60).outcome is C.GONE


def test_list_filters_and_counts(store):
    for i in range(3):
        new_run(store, f"r{i}")
    store.request_cancel("r1")
    runs, total = store.list_runs(limit=2)
    assert total == 3 and [r.id for r in runs] == ["r2", "r1"]
    assert store.list_runs(status="pending", saga="s")[1] == 3
    assert store.list_runs(saga="other")[1] == 0


def test_a_duplicate_never_acts_on_a_cancel_while_the_holder_runs(store):
    # If the duplicate reported CANCELLED, its errback would mark the running step failed, and the
    # holder's effect would never be undone. It must back off; the next step's claim sees the cancel.
    new_run(store)
    store.claim_step("r1", 0, "a:0", [], 60)
    store.request_cancel("r1")
    assert store.claim_step("r1", 0, "a:0", [], 60).outcome is C.BUSY
    assert store.claim_step("r1", 0, "copy:0", [], 60).outcome is C.BUSY
    assert store.complete_step("r1", 0, "a:0", {"v": 1})
    assert store.claim_step("r1", 0, "copy:0", [], 60).outcome is C.DONE
    assert store.claim_step("r1", 1, "b:0", [], 60).outcome is C.CANCELLED
    assert store.begin_compensation("r1", 1, "lost") == [0]


def test_a_cancel_seen_by_a_waiting_retry_fails_that_step_with_the_reason(store):
    new_run(store)
    store.claim_step("r1", 0, "a:0", [], 60)
    store.retry_step("r1", 0, "a:0", "TimeoutError: slow", 5, 60)
    store.request_cancel("r1")
    assert store.claim_step("r1", 0, "a:1", ["a:0"], 60).outcome is C.CANCELLED
    step = store.get_run("r1").step("a")
    assert step.status == "failed" and "cancelled" in step.error
    assert store.begin_compensation("r1", 0, "lost") == []
    assert store.get_run("r1").step("a").error == step.error  # not overwritten as "lost"


def test_a_redelivery_of_a_step_recorded_failed_reports_it_so_the_errback_fires_again(store):
    # The worker died after recording the failure, before the errback was published.
    new_run(store)
    store.claim_step("r1", 0, "a:0", [], 60)
    store.fail_step("r1", 0, "a:0", "ValueError: no")
    claim = store.claim_step("r1", 0, "a:0", [], 60)
    assert claim.outcome is C.FAILED and claim.error == "ValueError: no"
    store.begin_compensation("r1", 0, "lost")
    assert store.claim_step("r1", 0, "a:0", [], 60).outcome is C.GONE  # once compensating: nothing to do


def test_a_redelivery_of_a_compensation_recorded_failed_reports_it(store):
    _to_compensating(store)
    store.claim_compensation("r1", 0, "u:0", [], 60)
    store.fail_compensation("r1", 0, "u:0", "IOError: down")
    assert store.claim_compensation("r1", 0, "u:0", [], 60).outcome is C.FAILED


def test_compensations_still_to_do_include_the_one_in_progress_so_a_redrive_keeps_the_order(store):
    _two_done_third_failed(store, "no")
    assert store.begin_compensation("r1", 2, "lost") == [1, 0]
    assert store.compensations_to_redrive("r1") == [1, 0]  # the chain was never published
    store.claim_compensation("r1", 1, "u1:0", [], 60)
    assert store.compensations_to_redrive("r1") == [1, 0]  # 1 is in progress: a re-drive starts there
    assert store.complete_compensation("r1", 1, "u1:0") == "compensating"
    assert store.compensations_to_redrive("r1") == [0]
    store.claim_compensation("r1", 0, "u0:0", [], 60)
    assert store.complete_compensation("r1", 0, "u0:0") == "compensated"
    assert store.compensations_to_redrive("r1") is None  # final: nothing to re-drive
