"""The store's transitions for best-effort, non-atomic and pivot steps and for plain runs (policy), on SQLite
and PostgreSQL (the transactional store: sagas with step flags never take the fast path). A loser of each
race changes nothing."""

import datetime as dt

import pytest
from sqlalchemy import func, select

from sagaflow import InvalidTransition
from sagaflow.model import ClaimOutcome as C
from sagaflow.model import StepSpec
from sagaflow.store import tables as t


def specs(*steps):
    """("name", {flags}) -> StepSpec, every step with a compensation unless has_compensation=False."""
    return [StepSpec(name, flags.pop("has_compensation", True), **flags) for name, flags in steps]


def new_run(store, steps, run_id="r1"):
    store.create_run(run_id, "s", 1, {"x": 1}, steps)
    return store.transactional


def complete(store, idx, token=None, result=None):
    token = token or f"t{idx}:0"
    assert store.claim_step("r1", idx, token, [], 60).outcome is C.CLAIMED
    assert store.complete_step("r1", idx, token, result if result is not None else {"i": idx})


def make_quiet(store):
    """As if nothing had moved for years: the sweeper's stall timeout has passed."""
    long_ago = dt.datetime(2020, 1, 1)
    with store.engine.begin() as conn:
        conn.execute(t.runs.update().values(updated_at=long_ago))
        conn.execute(t.steps.update().where(t.steps.c.finished_at.is_not(None)).values(finished_at=long_ago))


def kinds(store, run_id="r1"):
    return [(e.kind, e.step) for e in store.get_run(run_id).events]


# ---------------------------------------------------------------------------------------------- best-effort

BEST_EFFORT = specs(("a", {}), ("b", {"best_effort": True}), ("c", {}))


def test_a_best_effort_failure_is_recorded_and_the_run_stays_running(store):
    s = new_run(store, BEST_EFFORT)
    complete(s, 0)
    assert s.claim_step("r1", 1, "t1:0", [], 60).outcome is C.CLAIMED
    assert s.fail_best_effort("r1", 1, "t1:0", "ValueError: no analytics") == "running"
    assert s.fail_best_effort("r1", 1, "t1:0", "again") is None  # the holder recorded it: a duplicate loses
    run = s.get_run("r1")
    assert run.status == "running"
    assert run.step("b").status == "failed_best_effort" and run.step("b").error == "ValueError: no analytics"
    assert kinds(s)[-1] == ("step_failed_best_effort", "b")
    # A redelivery of the step finds it done, with no result: it carries None on.
    claim = s.claim_step("r1", 1, "other:0", [], 60)
    assert claim.outcome is C.DONE and claim.result is None


def test_a_best_effort_last_step_that_fails_finishes_the_run(store):
    s = new_run(store, specs(("a", {}), ("b", {"best_effort": True})))
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    assert s.fail_best_effort("r1", 1, "t1:0", "boom", finish=True) == "succeeded"
    assert kinds(s)[-2:] == [("step_failed_best_effort", "b"), ("run_succeeded", None)]


def test_a_best_effort_last_step_that_fails_after_a_cancel_leaves_the_run_to_compensate(store):
    s = new_run(store, specs(("a", {}), ("b", {"best_effort": True})))
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.request_cancel("r1")
    assert s.fail_best_effort("r1", 1, "t1:0", "boom", finish=True) == "running"
    assert s.begin_compensation("r1", 1, "lost") == [0]  # the best-effort step is never undone


def test_a_failed_best_effort_step_is_never_compensated(store):
    s = new_run(store, BEST_EFFORT)
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_best_effort("r1", 1, "t1:0", "boom")
    s.claim_step("r1", 2, "t2:0", [], 60)
    s.fail_step("r1", 2, "t2:0", "c failed")
    assert s.begin_compensation("r1", 2, "lost") == [0]


def test_a_best_effort_step_whose_worker_was_lost_lets_the_run_go_on_once(store):
    s = new_run(store, BEST_EFFORT)
    complete(s, 0, result={"a": 1})
    s.claim_step("r1", 1, "t1:0", [], 60)
    assert s.best_effort_lost("r1", 1, "lost") == ("resume", {"a": {"a": 1}, "b": None})
    assert s.best_effort_lost("r1", 1, "lost") == ("done", None)  # the hard time limit's second errback
    assert s.get_run("r1").step("b").status == "failed_best_effort"


def test_a_lost_best_effort_step_after_a_cancel_is_left_to_the_compensation(store):
    s = new_run(store, BEST_EFFORT)
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.request_cancel("r1")
    assert s.best_effort_lost("r1", 1, "lost") is None


def test_the_recovery_plan_counts_a_best_effort_failure_as_done(store):
    s = new_run(store, BEST_EFFORT)
    complete(s, 0, result={"a": 1})
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_best_effort("r1", 1, "t1:0", "boom")
    make_quiet(s)
    [(run_id, seen)] = s.stalled_runs(60)
    recovery = s.take_over_stalled(run_id, seen, 60)
    assert (recovery.action, recovery.index, recovery.results) == ("resume", 2, {"a": {"a": 1}, "b": None})


# ---------------------------------------------------------------------------------------------- non-atomic

NON_ATOMIC = specs(("a", {}), ("n", {"non_atomic": True}), ("c", {}))


def test_a_failed_non_atomic_step_is_compensated_first_then_the_earlier_steps(store):
    s = new_run(store, NON_ATOMIC)
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_step("r1", 1, "t1:0", "half done")
    assert s.begin_compensation("r1", 1, "lost") == [1, 0]
    claim = s.claim_compensation("r1", 1, "u1:0", [], 60)  # from failed, because it is non-atomic
    assert claim.outcome is C.CLAIMED and claim.attempt == 1 and claim.round_attempt == 1
    assert s.claim_compensation("r1", 1, "u1-dup:0", [], 60).outcome is C.BUSY
    assert s.complete_compensation("r1", 1, "u1:0") == "compensating"
    assert s.claim_compensation("r1", 1, "late:0", [], 60).outcome is C.DONE  # never undone twice
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    assert s.complete_compensation("r1", 0, "u0:0") == "compensated"
    assert [k for k in kinds(s) if k[0] == "compensation_succeeded"] == [("compensation_succeeded", "n"),
                                                                         ("compensation_succeeded", "a")]


def test_a_non_atomic_step_whose_worker_was_lost_is_compensated_too(store):
    s = new_run(store, NON_ATOMIC)
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    assert s.begin_compensation("r1", 1, "lost") == [1, 0]
    assert s.get_run("r1").step("n").status == "failed"


def test_an_ordinary_failed_step_is_still_not_compensated(store):
    s = new_run(store, specs(("a", {}), ("b", {"best_effort": False}), ("n", {"non_atomic": True})))
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_step("r1", 1, "t1:0", "boom")
    assert s.begin_compensation("r1", 1, "lost") == [0]
    assert s.claim_compensation("r1", 1, "u1:0", [], 60).outcome is C.BUSY


def test_a_non_atomic_undo_that_failed_is_retried_from_failed(store):
    s = new_run(store, NON_ATOMIC)
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_step("r1", 1, "t1:0", "half done")
    s.begin_compensation("r1", 1, "lost")
    s.claim_compensation("r1", 1, "u1:0", [], 60)
    s.fail_compensation("r1", 1, "u1:0", "undo failed")
    assert s.mark_compensation_failed("r1", 1, "lost")
    assert s.request_retry("r1") == [1, 0]
    assert s.get_run("r1").step("n").status == "failed"  # it never succeeded
    claim = s.claim_compensation("r1", 1, "u1b:0", [], 60)
    assert claim.outcome is C.CLAIMED and claim.attempt == 2 and claim.round_attempt == 1


def test_a_stalled_compensation_includes_the_failed_non_atomic_step(store):
    s = new_run(store, NON_ATOMIC)
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_step("r1", 1, "t1:0", "half done")
    s.begin_compensation("r1", 1, "lost")
    make_quiet(s)
    [(run_id, seen)] = s.stalled_runs(60)
    recovery = s.take_over_stalled(run_id, seen, 60)
    assert (recovery.action, recovery.indexes) == ("compensate", (1, 0))


# ---------------------------------------------------------------------------------------------- pivot

PIVOT = specs(("a", {}), ("p", {"pivot": True, "has_compensation": False}), ("c", {}), ("d", {}))


def past_pivot(store):
    s = new_run(store, PIVOT)
    complete(s, 0)
    complete(s, 1)
    return s


def test_a_failure_before_the_pivot_succeeded_is_not_handled_as_stuck(store):
    s = new_run(store, PIVOT)
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_step("r1", 1, "t1:0", "pivot failed")
    assert s.stop_past_pivot("r1", 1, "lost") is None
    assert s.get_run("r1").status == "running"
    assert s.begin_compensation("r1", 1, "lost") == [0]


def test_a_failure_after_the_pivot_leaves_the_run_stuck_once_with_nothing_compensated(store):
    s = past_pivot(store)
    s.claim_step("r1", 2, "t2:0", [], 60)
    s.fail_step("r1", 2, "t2:0", "ValueError: partner down")
    assert s.stop_past_pivot("r1", 2, "lost") is True
    assert s.stop_past_pivot("r1", 2, "lost") is False  # a duplicate errback
    run = s.get_run("r1")
    assert run.status == "stuck" and run.is_final and run.finished_at is not None
    assert "'c'" in run.error and "'p'" in run.error and "partner down" in run.error
    assert [(st.name, st.status) for st in run.steps] == [("a", "succeeded"), ("p", "succeeded"),
                                                          ("c", "failed"), ("d", "pending")]
    assert kinds(s)[-1] == ("run_stuck", "c")
    assert s.begin_compensation("r1", 2, "lost") is None  # and nothing can start compensating it


def test_a_lost_step_after_the_pivot_is_recorded_failed_and_the_run_stuck(store):
    s = past_pivot(store)
    s.claim_step("r1", 2, "t2:0", [], 60)
    assert s.stop_past_pivot("r1", 2, "worker lost") is True
    assert s.get_run("r1").step("c").error == "worker lost"


def test_a_stalled_run_past_its_pivot_goes_forward_never_compensates(store):
    s = past_pivot(store)
    s.claim_step("r1", 2, "t2:0", [], 0.01)  # its worker dies: the lease runs out
    import time

    time.sleep(0.05)
    [(run_id, seen)] = s.stalled_runs(60)
    recovery = s.take_over_stalled(run_id, seen, 60)
    assert (recovery.action, recovery.index, recovery.revoked) == ("resume", 2, ("c",))
    # A failure recorded whose errback was lost: the sweeper publishes the errback, which goes stuck.
    s.claim_step("r1", 2, "t2:1", [], 60)
    s.fail_step("r1", 2, "t2:1", "boom")
    make_quiet(s)
    [(run_id, seen)] = s.stalled_runs(60)
    assert s.take_over_stalled(run_id, seen, 60).action == "errback"
    assert s.stop_past_pivot("r1", 2, "lost") is True
    assert s.stalled_runs(0) == []  # stuck waits for an operator, not for the sweeper


def test_retry_of_a_stuck_run_resumes_from_the_failed_step_with_a_new_round_of_attempts(store):
    s = past_pivot(store)
    for attempt in range(2):
        s.claim_step("r1", 2, f"t2:{attempt}", [f"t2:{k}" for k in range(attempt)], 60)
        if attempt == 0:
            s.retry_step("r1", 2, "t2:0", "boom", 0.1, 60)
    s.fail_step("r1", 2, "t2:1", "boom")
    s.stop_past_pivot("r1", 2, "lost")
    assert s.request_forward_retry("r1") == (2, {"a": {"i": 0}, "p": {"i": 1}})
    assert s.request_forward_retry("r1") is None  # not stuck any more
    run = s.get_run("r1")
    assert run.status == "running" and run.error is None and run.finished_at is None
    assert run.step("c").status == "pending" and run.step("c").attempts == 2
    claim = s.claim_step("r1", 2, "again:0", [], 60)
    assert claim.outcome is C.CLAIMED and claim.attempt == 3 and claim.round_attempt == 1
    s.retry_step("r1", 2, "again:0", "still", 0.1, 60)
    assert s.claim_step("r1", 2, "again:1", ["again:0"], 60).round_attempt == 2
    with pytest.raises(InvalidTransition, match="compensation_failed or stuck"):
        s.request_retry("r1")


def test_cancel_is_refused_once_the_pivot_succeeded_and_nothing_is_written(store):
    s = past_pivot(store)
    before = len(s.get_run("r1").events)
    with pytest.raises(InvalidTransition, match="pivot step 'p'.*no\\s+longer be undone"):
        s.request_cancel("r1")
    run = s.get_run("r1")
    assert not run.cancel_requested and len(run.events) == before


def test_a_cancel_accepted_before_the_pivot_succeeded_is_overruled_after_it(store):
    s = new_run(store, PIVOT)
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.request_cancel("r1")  # the pivot is running: accepted
    assert s.complete_step("r1", 1, "t1:0", {"p": 1})
    claim = s.claim_step("r1", 2, "t2:0", [], 60)  # the next step notices it: past the pivot, overruled
    assert claim.outcome is C.CLAIMED
    run = s.get_run("r1")
    assert not run.cancel_requested and run.status == "running"
    assert ("cancel_overruled", None) in kinds(s)


def test_a_cancel_noticed_by_the_pivot_itself_compensates_as_usual(store):
    s = new_run(store, PIVOT)
    complete(s, 0)
    s.request_cancel("r1")
    assert s.claim_step("r1", 1, "t1:0", [], 60).outcome is C.CANCELLED
    assert s.stop_past_pivot("r1", 1, "lost") is None
    assert s.begin_compensation("r1", 1, "lost") == [0]


def test_a_pivot_as_last_step_finishes_despite_a_cancel_that_came_in_while_it_ran(store):
    s = new_run(store, specs(("a", {}), ("p", {"pivot": True})))
    complete(s, 0)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.request_cancel("r1")
    assert s.complete_last_step("r1", 1, "t1:0", {}) == "running"
    assert s.finish_past_pivot("r1") == "succeeded"
    assert kinds(s)[-2:] == [("cancel_overruled", None), ("run_succeeded", None)]


def test_finish_past_pivot_does_nothing_before_the_pivot(store):
    s = new_run(store, PIVOT)
    complete(s, 0)
    s.request_cancel("r1")
    assert s.finish_past_pivot("r1") is None
    assert s.get_run("r1").cancel_requested


# ---------------------------------------------------------------------------------------------- plain runs

def count(store, table):
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def test_a_plain_run_is_the_run_row_alone_and_ends_with_one_update(store):
    run, created = store.create_run("r1", "s", 1, {"x": 1}, specs(("a", {}), ("b", {})), mode="plain")
    assert created and run.mode == "plain" and run.steps == () and run.events == ()
    assert run == store.get_run("r1")
    assert (count(store, t.runs), count(store, t.steps), count(store, t.events)) == (1, 0, 0)
    assert store.finish_plain_run("r1")
    assert not store.finish_plain_run("r1") and not store.fail_plain_run("r1", "late")  # final: guarded
    run = store.get_run("r1")
    assert run.status == "succeeded" and run.finished_at is not None and run.error is None
    assert (count(store, t.steps), count(store, t.events)) == (0, 0)


def test_a_plain_run_that_fails_records_the_error_once(store):
    store.create_run("r1", "s", 1, {}, specs(("a", {})), mode="plain")
    assert store.fail_plain_run("r1", "step 'a' failed: boom")
    assert not store.fail_plain_run("r1", "lost")  # the errback after the step recorded it
    run = store.get_run("r1")
    assert (run.status, run.error) == ("failed", "step 'a' failed: boom")


def test_a_plain_run_keeps_its_idempotency_key(store):
    store.create_run("r1", "s", 1, {}, [], "k", mode="plain")
    again, created = store.create_run("r2", "s", 1, {}, [], "k", mode="plain")
    assert not created and again.id == "r1"


def test_a_plain_run_cannot_be_cancelled_and_is_never_re_driven(store):
    store.create_run("r1", "s", 1, {}, specs(("a", {})), mode="plain")
    with pytest.raises(InvalidTransition, match="plain Celery chain"):
        store.request_cancel("r1")
    make_quiet(store)
    assert store.stalled_runs(60) == []
    assert store.finish_plain_run("r1")


def test_only_plain_runs_are_ended_by_the_plain_transitions(store):
    store.create_run("r1", "s", 1, {}, specs(("a", {})))
    assert not store.finish_plain_run("r1") and not store.fail_plain_run("r1", "x")
    assert store.get_run("r1").status == "pending"
