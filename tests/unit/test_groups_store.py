"""The transitions of parallel branches (Store.complete_branch, fail_branch, stop_branch, settle_lost_branch
and the guard that keeps a compensation open while a branch runs), on SQLite and PostgreSQL, with no broker.

The run: prepare (0) -> [left (1) | right (2)] -> after (3); ``last`` runs: first (0) -> [a (1) | b (2)]."""

import time

from sagaflow.model import ClaimOutcome as C
from sagaflow.model import StepSpec

GROUPED = [StepSpec("prepare", True), StepSpec("left", True, group=1), StepSpec("right", True, group=1),
           StepSpec("after", True)]
GROUP_LAST = [StepSpec("first", True), StepSpec("a", True, group=1), StepSpec("b", False, group=1)]
STALL = 60.0


def store_of(store):
    return store.transactional  # what the runtime gives non-linear sagas


def started(store, steps=GROUPED, run_id="r1"):
    """A run whose first step succeeded and whose branches 1 and 2 are both claimed (running)."""
    s = store_of(store)
    s.create_run(run_id, "par", 1, {"x": 1}, steps)
    assert s.claim_step(run_id, 0, "t0:0", [], 60).outcome is C.CLAIMED
    assert s.complete_step(run_id, 0, "t0:0", {"p": 0})
    assert s.claim_step(run_id, 1, "t1:0", [], 60).outcome is C.CLAIMED
    assert s.claim_step(run_id, 2, "t2:0", [], 60).outcome is C.CLAIMED
    return s


def statuses(store, run_id="r1"):
    run = store.get_run(run_id)
    return run.status, [st.status for st in run.steps]


def kinds(store, run_id="r1"):
    return [(e.kind, e.step) for e in store.get_run(run_id).events]


def test_create_run_records_each_branch_group(store):
    s = store_of(store)
    run, _ = s.create_run("r1", "par", 1, {}, GROUPED)
    assert [st.group for st in run.steps] == [None, 1, 1, None]
    assert [st.group for st in s.get_run("r1").steps] == [None, 1, 1, None]


def test_only_the_branch_that_completes_the_group_joins_it_with_every_result(store):
    s = started(store)
    first = s.complete_branch("r1", 2, "t2:0", {"r": 2})
    assert first.decision == "waiting"
    second = s.complete_branch("r1", 1, "t1:0", {"l": 1})
    assert second.decision == "joined" and second.next_index == 3
    assert second.results == {"prepare": {"p": 0}, "left": {"l": 1}, "right": {"r": 2}}
    assert kinds(s).count(("group_joined", "left")) == 1
    assert statuses(s) == ("running", ["succeeded", "succeeded", "succeeded", "pending"])


def test_a_duplicate_of_a_done_branch_finds_it_done_and_decides_nothing(store):
    s = started(store)
    s.complete_branch("r1", 1, "t1:0", {"l": 1})
    s.complete_branch("r1", 2, "t2:0", {"r": 2})
    assert s.complete_branch("r1", 1, "t1:0", {"l": "again"}) is None  # the same delivery, twice
    claim = s.claim_step("r1", 1, "dup:0", [], 60)  # a redelivered copy of the message
    assert claim.outcome is C.DONE and claim.result == {"l": 1}
    assert [k for k in kinds(s) if k[0] == "group_joined"] == [("group_joined", "right")]


def test_a_group_that_ends_the_saga_finishes_the_run_at_the_join(store):
    s = started(store, GROUP_LAST)
    assert s.complete_branch("r1", 1, "t1:0", {}).decision == "waiting"
    assert s.complete_branch("r1", 2, "t2:0", {}).decision == "finished"
    assert statuses(s) == ("succeeded", ["succeeded"] * 3)
    assert kinds(s)[-2:] == [("group_joined", "b"), ("run_succeeded", None)]


def test_a_cancel_seen_by_a_completing_branch_is_raised_into_the_errback(store):
    s = started(store)
    s.request_cancel("r1")
    assert s.complete_branch("r1", 1, "t1:0", {}).decision == "cancelled"
    assert statuses(s)[1][1] == "succeeded"  # recorded: it will be undone
    assert s.claim_step("r1", 2, "t2:1", ["t2:0"], 60).outcome is C.CANCELLED  # its retry stops


def test_the_first_branch_to_fail_fires_the_errback_a_second_one_stays_quiet(store):
    s = started(store)
    assert s.fail_branch("r1", 1, "t1:0", "boom").decision == "errback"
    assert s.fail_branch("r1", 2, "t2:0", "bang").decision == "quiet"
    assert s.fail_branch("r1", 2, "t2:0", "again") is None  # no longer held
    assert s.begin_compensation("r1", 1, "lost") == [0]
    assert s.begin_compensation("r1", 2, "lost") is None  # had it fired anyway: a no-op
    assert statuses(s) == ("compensating", ["succeeded", "failed", "failed", "skipped"])


def test_a_failure_compensates_the_completed_branch_first_then_the_earlier_steps(store):
    s = started(store)
    s.complete_branch("r1", 2, "t2:0", {"r": 2})
    assert s.fail_branch("r1", 1, "t1:0", "boom").decision == "errback"
    assert s.begin_compensation("r1", 1, "lost") == [2, 0]


def test_a_branch_still_running_keeps_the_compensation_open_and_is_undone_when_it_succeeds_late(store):
    s = started(store)
    assert s.fail_branch("r1", 1, "t1:0", "boom").decision == "errback"
    assert s.begin_compensation("r1", 1, "lost") == [0]  # right still runs: neither failed nor skipped
    assert statuses(s) == ("compensating", ["succeeded", "failed", "running", "skipped"])
    assert s.claim_compensation("r1", 0, "u0:0", [], 60).outcome is C.CLAIMED
    assert s.complete_compensation("r1", 0, "u0:0") == "compensating"  # the last undo so far: not the end
    assert not s.finish_compensation("r1")  # nor by the sweeper's finish task
    late = s.complete_branch("r1", 2, "t2:0", {"r": 2})
    assert late.decision == "late" and late.compensate
    assert s.claim_compensation("r1", 2, "u2:0", [], 60).outcome is C.CLAIMED
    assert s.complete_compensation("r1", 2, "u2:0") == "compensated"
    assert statuses(s) == ("compensated", ["compensated", "failed", "compensated", "skipped"])
    assert ("step_succeeded", "right") in kinds(s)
    assert s.get_run("r1").events[-1].kind == "run_compensated"


def test_a_late_branch_without_compensation_ends_the_compensation_itself(store):
    s = started(store, GROUP_LAST)
    s.fail_branch("r1", 1, "t1:0", "boom")
    assert s.begin_compensation("r1", 1, "lost") == [0]
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    assert s.complete_compensation("r1", 0, "u0:0") == "compensating"
    late = s.complete_branch("r1", 2, "t2:0", {})
    assert late.decision == "late" and not late.compensate
    assert statuses(s) == ("compensated", ["compensated", "failed", "succeeded"])


def test_a_late_branch_failure_is_recorded_quietly_and_ends_the_compensation(store):
    s = started(store)
    s.fail_branch("r1", 1, "t1:0", "boom")
    assert s.begin_compensation("r1", 1, "lost") == [0]
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    s.complete_compensation("r1", 0, "u0:0")
    assert s.fail_branch("r1", 2, "t2:0", "late boom").decision == "quiet"
    assert statuses(s) == ("compensated", ["compensated", "failed", "failed", "skipped"])


def test_nothing_to_undo_yet_and_a_branch_running_the_errback_leaves_the_run_compensating(store):
    s = store_of(store)
    s.create_run("r1", "par", 1, {}, [StepSpec("a", True, group=0), StepSpec("b", True, group=0)])
    s.claim_step("r1", 0, "t0:0", [], 60)
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_branch("r1", 0, "t0:0", "boom")
    assert s.begin_compensation("r1", 0, "lost") == []
    assert statuses(s) == ("compensating", ["failed", "running"])
    assert s.complete_branch("r1", 1, "t1:0", {}).compensate
    s.claim_compensation("r1", 1, "u1:0", [], 60)
    assert s.complete_compensation("r1", 1, "u1:0") == "compensated"


def test_a_pending_branch_is_skipped_and_its_late_delivery_does_nothing(store):
    s = store_of(store)
    s.create_run("r1", "par", 1, {}, GROUPED)
    s.claim_step("r1", 0, "t0:0", [], 60)
    s.complete_step("r1", 0, "t0:0", {})
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_branch("r1", 1, "t1:0", "boom")
    assert s.begin_compensation("r1", 1, "lost") == [0]
    assert statuses(s)[1] == ["succeeded", "failed", "skipped", "skipped"]
    assert s.claim_step("r1", 2, "t2:0", [], 60).outcome is C.GONE
    assert not s.stop_branch("r1", 2, "t2:0", [])
    assert statuses(s)[1] == ["succeeded", "failed", "skipped", "skipped"]


def test_a_branch_waiting_for_its_retry_is_stopped_when_the_retry_finds_the_run_compensating(store):
    s = started(store)
    assert s.retry_step("r1", 2, "t2:0", "flaky", 0.1, 60)
    s.fail_branch("r1", 1, "t1:0", "boom")
    s.begin_compensation("r1", 1, "lost")
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    assert s.complete_compensation("r1", 0, "u0:0") == "compensating"  # right waits for its retry
    assert not s.stop_branch("r1", 2, "other:0", [])  # not its retry: a duplicate, changes nothing
    assert s.claim_step("r1", 2, "t2:1", ["t2:0"], 60).outcome is C.GONE
    assert s.stop_branch("r1", 2, "t2:1", ["t2:0"])
    assert statuses(s) == ("compensated", ["compensated", "failed", "failed", "skipped"])


def test_the_errback_of_a_branch_lost_after_the_compensation_began_settles_it(store):
    s = started(store)
    s.fail_branch("r1", 1, "t1:0", "boom")
    s.begin_compensation("r1", 1, "lost")
    assert not s.settle_lost_branch("r1", 1, "lost")  # not running: nothing to settle
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    s.complete_compensation("r1", 0, "u0:0")
    assert s.settle_lost_branch("r1", 2, "lost at its hard time limit")
    assert statuses(s) == ("compensated", ["compensated", "failed", "failed", "skipped"])
    assert s.get_run("r1").step("right").error == "lost at its hard time limit"


def test_settling_a_lost_branch_does_nothing_while_the_run_is_live(store):
    s = started(store)
    assert not s.settle_lost_branch("r1", 2, "lost")
    assert statuses(s)[1][2] == "running"


def test_a_group_whose_slow_branch_is_alive_is_not_stalled(store):
    s = started(store)
    s.complete_branch("r1", 1, "t1:0", {"l": 1})
    time.sleep(0.05)
    assert s.stalled_runs(0.01) == []  # right's holder is alive (lease 60 s)


def test_a_dead_branch_is_re_driven_with_its_group_and_the_join_happens_once(store):
    s = store_of(store)
    s.create_run("r1", "par", 1, {}, GROUPED)
    s.claim_step("r1", 0, "t0:0", [], 60)
    s.complete_step("r1", 0, "t0:0", {"p": 0})
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.claim_step("r1", 2, "t2:0", [], 0.05)
    s.complete_branch("r1", 1, "t1:0", {"l": 1})
    time.sleep(0.1)
    seen = dict(s.stalled_runs(STALL))["r1"]
    recovery = s.take_over_stalled("r1", seen, STALL)
    assert (recovery.action, recovery.index, recovery.revoked) == ("resume", 2, ("right",))
    assert s.claim_step("r1", 1, "new1:0", [], 60).outcome is C.DONE  # the re-published group's done branch
    assert s.claim_step("r1", 2, "new2:0", [], 60).outcome is C.CLAIMED
    assert s.complete_branch("r1", 2, "new2:0", {"r": 2}).decision == "joined"
    assert not s.complete_branch("r1", 2, "t2:0", {"r": "dead"})  # the dead holder, late


def test_a_join_whose_continuation_was_lost_is_resumed_after_the_group(store):
    s = started(store)
    s.complete_branch("r1", 1, "t1:0", {"l": 1})
    s.complete_branch("r1", 2, "t2:0", {"r": 2})  # joined; say its publish never happened
    time.sleep(0.05)
    seen = dict(s.stalled_runs(0.01))["r1"]
    recovery = s.take_over_stalled("r1", seen, 0.01)
    assert (recovery.action, recovery.index) == ("resume", 3)
    assert recovery.results == {"prepare": {"p": 0}, "left": {"l": 1}, "right": {"r": 2}}


def test_a_compensating_run_whose_late_branch_died_is_settled_by_the_sweeper(store):
    s = store_of(store)
    s.create_run("r1", "par", 1, {}, GROUPED)
    s.claim_step("r1", 0, "t0:0", [], 60)
    s.complete_step("r1", 0, "t0:0", {})
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.claim_step("r1", 2, "t2:0", [], 0.05)
    s.fail_branch("r1", 1, "t1:0", "boom")
    s.begin_compensation("r1", 1, "lost")
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    s.complete_compensation("r1", 0, "u0:0")
    time.sleep(0.1)
    assert statuses(s)[0] == "compensating"
    seen = dict(s.stalled_runs(STALL))["r1"]
    recovery = s.take_over_stalled("r1", seen, STALL)
    assert (recovery.action, recovery.indexes) == ("compensate", ())  # finish_compensation next
    assert s.get_run("r1").step("right").status == "failed"
    assert s.finish_compensation("r1")
    assert statuses(s) == ("compensated", ["compensated", "failed", "failed", "skipped"])


def test_a_compensating_run_whose_late_branch_succeeded_but_did_not_publish_its_undo_is_re_driven(store):
    s = started(store)
    s.fail_branch("r1", 1, "t1:0", "boom")
    s.begin_compensation("r1", 1, "lost")
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    s.complete_compensation("r1", 0, "u0:0")
    s.complete_branch("r1", 2, "t2:0", {})  # late; say its undo's publish was lost
    time.sleep(0.05)
    seen = dict(s.stalled_runs(0.01))["r1"]
    recovery = s.take_over_stalled("r1", seen, 0.01)
    assert (recovery.action, recovery.indexes) == ("compensate", (2,))
    assert not s.finish_compensation("r1")  # the undo is still to do


def test_a_linear_run_finishes_its_compensation_as_before(store):
    s = store_of(store)
    s.create_run("r1", "lin", 1, {}, [StepSpec("a", True), StepSpec("b", True)])
    s.claim_step("r1", 0, "t0:0", [], 60)
    s.complete_step("r1", 0, "t0:0", {})
    s.claim_step("r1", 1, "t1:0", [], 60)
    s.fail_step("r1", 1, "t1:0", "boom")
    assert s.begin_compensation("r1", 1, "lost") == [0]
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    assert s.complete_compensation("r1", 0, "u0:0") == "compensated"


def test_the_undos_before_the_group_wait_until_the_late_branch_is_undone(store):
    s = started(store)
    s.fail_branch("r1", 1, "t1:0", "boom")
    todo = s.begin_compensation("r1", 1, "lost")
    assert todo == [0]
    assert s.hold_back("r1", todo) == []  # right still runs: prepare waits
    assert ("undos_held", None) in kinds(s)
    assert s.release_held_undos("r1") == []  # not settled yet
    late = s.complete_branch("r1", 2, "t2:0", {"r": 2})
    assert late.decision == "late" and late.compensate and late.release == ()
    s.claim_compensation("r1", 2, "u2:0", [], 60)
    assert s.complete_compensation("r1", 2, "u2:0") == "compensating"  # prepare is still to undo
    assert s.release_held_undos("r1") == [0]
    assert s.release_held_undos("r1") == []  # handed out once
    s.claim_compensation("r1", 0, "u0:0", [], 60)
    assert s.complete_compensation("r1", 0, "u0:0") == "compensated"
    assert [k for k in kinds(s) if k[0] in ("undos_held", "undos_released", "compensation_succeeded")] == [
        ("undos_held", None), ("compensation_succeeded", "right"), ("undos_released", None),
        ("compensation_succeeded", "prepare")]


def test_a_late_failure_releases_the_undos_that_waited(store):
    s = started(store)
    s.fail_branch("r1", 1, "t1:0", "boom")
    assert s.hold_back("r1", s.begin_compensation("r1", 1, "lost")) == []
    outcome = s.fail_branch("r1", 2, "t2:0", "late boom")
    assert (outcome.decision, outcome.release) == ("quiet", (0,))
    assert statuses(s) == ("compensating", ["succeeded", "failed", "failed", "skipped"])


def test_a_completed_branch_is_undone_first_and_its_undo_releases_the_rest_when_the_late_one_failed(store):
    s = started(store, [*GROUPED[:3], StepSpec("third", True, group=1), GROUPED[3]])
    s.claim_step("r1", 3, "t3:0", [], 60)
    s.complete_branch("r1", 3, "t3:0", {})
    s.fail_branch("r1", 1, "t1:0", "boom")
    todo = s.begin_compensation("r1", 1, "lost")
    assert todo == [3, 0] and s.hold_back("r1", todo) == [3]
    stopped = s.fail_branch("r1", 2, "t2:0", "late boom")
    assert stopped.release == ()  # third's undo is still to do: it releases
    s.claim_compensation("r1", 3, "u3:0", [], 60)
    assert s.complete_compensation("r1", 3, "u3:0") == "compensating"
    assert s.release_held_undos("r1") == [0]


def test_nothing_is_held_when_no_branch_runs(store):
    s = started(store)
    s.complete_branch("r1", 2, "t2:0", {})
    s.fail_branch("r1", 1, "t1:0", "boom")
    todo = s.begin_compensation("r1", 1, "lost")
    assert s.hold_back("r1", todo) == todo == [2, 0]
    s.claim_compensation("r1", 2, "u2:0", [], 60)
    s.complete_compensation("r1", 2, "u2:0")
    assert s.release_held_undos("r1") == []  # the chain goes on to prepare by itself
    assert all(k[0] != "undos_held" for k in kinds(s))


def test_a_best_effort_branch_that_gave_up_counts_as_done_for_the_join_once(store):
    s = started(store, [StepSpec("prepare", True), StepSpec("maybe", True, group=1, best_effort=True),
                        StepSpec("sure", True, group=1), StepSpec("after", True)])
    assert s.complete_branch("r1", 2, "t2:0", {"s": 2}).decision == "waiting"
    assert s.fail_best_effort("r1", 1, "t1:0", "meh") is not None
    joined = s.join_after_best_effort("r1", 1)
    assert joined.decision == "joined" and joined.next_index == 3
    assert joined.results == {"prepare": {"p": 0}, "maybe": None, "sure": {"s": 2}}
    assert s.join_after_best_effort("r1", 1).decision == "waiting"  # asked again: joined once only
    assert s.join_after_best_effort("r1", 2) is None  # not a best-effort branch that gave up
    assert len([k for k in kinds(s) if k[0] == "group_joined"]) == 1


def test_a_sibling_completing_after_a_best_effort_branch_gave_up_joins_and_the_late_decision_is_a_no_op(store):
    s = started(store, [StepSpec("prepare", True), StepSpec("maybe", True, group=1, best_effort=True),
                        StepSpec("sure", True, group=1), StepSpec("after", True)])
    s.fail_best_effort("r1", 1, "t1:0", "meh")  # its worker dies before it decides
    assert s.complete_branch("r1", 2, "t2:0", {"s": 2}).decision == "joined"
    assert s.join_after_best_effort("r1", 1).decision == "waiting"
