"""The store's transitions for gates, signals and child runs (Store: "waits" section), on SQLite and
PostgreSQL: wait, signal in both orders, the timeout's compare-and-set, duplicates, cancel, a child's end."""

import time

import pytest
from sqlalchemy import update

from sagaflow.errors import InvalidTransition, UnknownRun
from sagaflow.model import ClaimOutcome, StepSpec
from sagaflow.store import tables as t

GATED = [StepSpec("a", True), StepSpec("approve", False, kind="gate", signal="ok"), StepSpec("b", True)]
GATE_LAST = [StepSpec("a", True), StepSpec("approve", False, kind="gate", signal="ok")]


def at_gate(store, steps=GATED, run_id="r1"):
    """A run whose step a succeeded and whose gate (index 1) is claimed by token g:0."""
    store = store.transactional
    store.create_run(run_id, "s", 1, {"x": 1}, steps)
    assert store.claim_step(run_id, 0, "a:0", [], 60).outcome is ClaimOutcome.CLAIMED
    assert store.complete_step(run_id, 0, "a:0", {"a": 1})
    assert store.claim_step(run_id, 1, "g:0", [], 60).outcome is ClaimOutcome.CLAIMED
    return store


def kinds(run):
    return [e.kind for e in run.events]


def test_a_gate_without_its_signal_waits_holding_no_lease_and_the_signal_passes_it(store):
    store = at_gate(store)
    waited = store.wait_for_signal("r1", 1, "g:0", 30)
    assert waited.action == "waiting"
    run = store.get_run("r1")
    assert run.status == "waiting" and run.step("approve").status == "waiting"
    assert run.step("approve").deadline_at is not None
    assert kinds(run)[-1] == "run_waiting" and run.events[-1].detail["signal"] == "ok"
    assert store.stalled_runs(0) == []  # a waiting run is not stalled
    assert store.claim_step("r1", 1, "dup:0", [], 60).outcome is ClaimOutcome.GONE  # a redelivery stops

    passed = store.deliver_signal("r1", "ok", {"by": "ann"})
    assert (passed.action, passed.index, passed.results) == ("continue", 1, {"a": {"a": 1}, "approve": {"by": "ann"}})
    run = store.get_run("r1")
    assert run.status == "running"
    assert (run.step("approve").status, run.step("approve").result) == ("succeeded", {"by": "ann"})
    assert kinds(run)[-2:] == ["signal_received", "step_succeeded"]


def test_a_signal_before_the_gate_is_kept_and_taken_when_the_run_gets_there(store):
    store = store.transactional
    store.create_run("r1", "s", 1, {}, GATED)
    assert store.deliver_signal("r1", "ok", [1, 2]).action == "none"
    assert store.get_run("r1").status == "pending"
    at = store.claim_step("r1", 0, "a:0", [], 60)
    assert at.outcome is ClaimOutcome.CLAIMED
    store.complete_step("r1", 0, "a:0", None)
    store.claim_step("r1", 1, "g:0", [], 60)
    passed = store.wait_for_signal("r1", 1, "g:0", 30)
    assert (passed.action, passed.result) == ("continue", [1, 2])
    run = store.get_run("r1")
    assert run.status == "running" and run.step("approve").status == "succeeded"
    assert "run_waiting" not in kinds(run)


def test_a_gate_that_is_the_last_step_finishes_the_run_in_both_orders(store):
    store = at_gate(store, GATE_LAST)
    store.wait_for_signal("r1", 1, "g:0", 30)
    assert store.deliver_signal("r1", "ok", None).action == "finished"
    assert store.get_run("r1").status == "succeeded"

    store = at_gate(store, GATE_LAST, run_id="r2")
    store.deliver_signal("r2", "ok", 5)
    assert store.wait_for_signal("r2", 1, "g:0", 30).action == "finished"
    run = store.get_run("r2")
    assert run.status == "succeeded" and kinds(run)[-1] == "run_succeeded"


def test_bad_signals_are_refused_and_change_nothing(store):
    store = at_gate(store)
    store.wait_for_signal("r1", 1, "g:0", 30)
    with pytest.raises(UnknownRun):
        store.deliver_signal("nope", "ok", None)
    with pytest.raises(InvalidTransition, match="no gate for signal 'other'"):
        store.deliver_signal("r1", "other", None)
    before = store.get_run("r1")
    assert before.status == "waiting"
    store.deliver_signal("r1", "ok", 1)
    after_first = store.get_run("r1")
    with pytest.raises(InvalidTransition, match="already delivered"):
        store.deliver_signal("r1", "ok", 2)
    assert store.get_run("r1") == after_first  # nothing changed: same status, result, events
    assert after_first.step("approve").result == 1


def test_a_final_run_takes_no_signal(store):
    store = at_gate(store, GATE_LAST)
    store.wait_for_signal("r1", 1, "g:0", 30)
    store.deliver_signal("r1", "ok", None)
    with pytest.raises(InvalidTransition, match="is succeeded"):
        store.deliver_signal("r1", "ok", None)


def past_deadline(store, run_id="r1", idx=1):
    import datetime as dt

    with store.engine.begin() as conn:
        conn.execute(update(t.steps).where(t.steps.c.run_id == run_id, t.steps.c.idx == idx)
                     .values(deadline_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))


def test_a_gate_past_its_deadline_times_out_once_and_a_late_signal_does_not_pass_it(store):
    store = at_gate(store)
    store.wait_for_signal("r1", 1, "g:0", 30)
    assert store.expired_gates() == []
    assert store.time_out_gate("r1", 1, "too early") is None  # the deadline has not passed
    past_deadline(store)
    assert [(g.run_id, g.idx, g.signal, g.saga) for g in store.expired_gates()] == [("r1", 1, "ok", "s")]
    first = store.time_out_gate("r1", 1, "no signal 'ok' within 30 s")
    assert (first.action, first.index, first.saga, first.version) == ("errback", 1, "s", 1)
    assert store.time_out_gate("r1", 1, "again") is None  # a second sweeper: nothing
    run = store.get_run("r1")
    assert run.status == "running"
    assert (run.step("approve").status, run.step("approve").error) == ("failed", "no signal 'ok' within 30 s")
    assert kinds(run).count("step_failed") == 1
    assert store.expired_gates() == []
    # A signal that comes late is kept (the run is not final yet) but passes nothing.
    assert store.deliver_signal("r1", "ok", None).action == "none"
    assert store.get_run("r1").step("approve").status == "failed"
    assert store.begin_compensation("r1", 1, "lost") == [0]


def test_a_signal_racing_the_timeout_wins_or_loses_as_a_whole(store):
    store = at_gate(store)
    store.wait_for_signal("r1", 1, "g:0", 30)
    past_deadline(store)
    assert store.deliver_signal("r1", "ok", 1).action == "continue"  # the sweeper has not come yet
    assert store.time_out_gate("r1", 1, "late") is None
    assert store.get_run("r1").step("approve").status == "succeeded"


def test_a_cancel_at_a_waiting_gate_fails_it_and_hands_back_the_errback(store):
    store = at_gate(store)
    store.wait_for_signal("r1", 1, "g:0", 30)
    with pytest.raises(UnknownRun):
        store.cancel_waiting("nope")
    outcomes = store.cancel_waiting("r1")
    assert [(o.action, o.index) for o in outcomes] == [("errback", 1)]
    run = store.get_run("r1")
    assert (run.status, run.cancel_requested) == ("running", True)
    assert run.step("approve").error == "cancelled while waiting for signal 'ok'"
    assert store.cancel_waiting("r1") is None  # not waiting any more
    assert store.begin_compensation("r1", 1, "lost") == [0]
    store.claim_compensation("r1", 0, "c:0", [], 60)
    assert store.complete_compensation("r1", 0, "c:0") == "cancelled"


def test_a_cancel_between_the_claim_and_the_wait_fails_the_gate(store):
    store = at_gate(store)
    store.request_cancel("r1")
    assert store.wait_for_signal("r1", 1, "g:0", 30).action == "cancelled"
    assert store.get_run("r1").step("approve").status == "failed"


def test_a_duplicate_gate_delivery_is_lost(store):
    store = at_gate(store)
    assert store.wait_for_signal("r1", 1, "other:0", 30).action == "lost"
    assert store.get_run("r1").step("approve").status == "running"


CHILD_STEPS = [StepSpec("a", True), StepSpec("sub", True, kind="child"), StepSpec("b", True)]
CHILD_SAGA = [StepSpec("x", True), StepSpec("y", False)]


def parent_waiting(store):
    store = store.transactional
    store.create_run("p", "parent", 1, {"x": 1}, CHILD_STEPS)
    store.claim_step("p", 0, "a:0", [], 60)
    store.complete_step("p", 0, "a:0", {"a": 1})
    store.claim_step("p", 1, "c:0", [], 60)
    outcome = store.start_child("p", 1, "c:0", "c1", "child", 1, {"y": 2}, CHILD_SAGA)
    assert (outcome.action, outcome.child_run_id) == ("waiting", "c1")
    return store


def finish_child(store, child_id="c1"):
    for i, token in enumerate(("x:0", "y:0")):
        assert store.claim_step(child_id, i, token, [], 60).outcome is ClaimOutcome.CLAIMED
    store.complete_step(child_id, 0, "x:0", {"x": 1})
    assert store.complete_last_step(child_id, 1, "y:0", {"y": 2}) == "succeeded"


def test_a_child_step_records_the_child_once_and_its_success_moves_the_parent_on(store):
    store = parent_waiting(store)
    parent, child = store.get_run("p"), store.get_run("c1")
    assert (parent.status, parent.step("sub").status, parent.step("sub").child_run_id) == ("waiting", "waiting", "c1")
    assert parent.children == ("c1",)
    assert (child.parent_run_id, child.parent_step, child.idempotency_key, child.input) == ("p", 1, "child:p:sub",
                                                                                             {"y": 2})
    assert store.child_ended("c1").action == "none"  # not ended yet
    finish_child(store)
    ended = store.child_ended("c1")
    assert (ended.action, ended.run_id, ended.index) == ("continue", "p", 1)
    assert ended.results == {"a": {"a": 1}, "sub": {"x": {"x": 1}, "y": {"y": 2}}}
    assert store.get_run("p").status == "running"
    assert store.child_ended("c1").action == "none"  # a duplicate


def test_a_failed_child_fails_the_parent_step(store):
    store = parent_waiting(store)
    store.claim_step("c1", 0, "x:0", [], 60)
    store.fail_step("c1", 0, "x:0", "boom")
    assert store.begin_compensation("c1", 0, "lost") == []  # nothing to undo: compensated at once
    ended = store.child_ended("c1")
    assert (ended.action, ended.index) == ("errback", 1)
    step = store.get_run("p").step("sub")
    assert step.status == "failed" and "child run c1 (saga 'child') ended compensated" in step.error
    assert store.begin_compensation("p", 1, "lost") == [0]


def test_undoing_a_child_step_compensates_the_child_then_wakes_the_parent(store):
    store = parent_waiting(store)
    finish_child(store)
    store.child_ended("c1")
    store.claim_step("p", 2, "b:0", [], 60)
    store.fail_step("p", 2, "b:0", "later failure")
    assert store.begin_compensation("p", 2, "lost") == [1, 0]
    claim = store.claim_compensation("p", 1, "u:0", [], 60)
    assert claim.round_attempt == 1
    begun = store.compensate_child("p", 1, "u:0", fresh=True)
    assert (begun.action, begun.run_id, begun.indexes) == ("compensate", "c1", (0,))
    assert store.get_run("c1").status == "compensating"
    assert store.compensate_child("p", 1, "u:0", fresh=False).action == "waiting"
    assert store.child_ended("c1").action == "none"  # still undoing
    store.claim_compensation("c1", 0, "cx:0", [], 60)
    assert store.complete_compensation("c1", 0, "cx:0") == "compensated"
    woken = store.child_ended("c1")
    assert (woken.action, woken.run_id, woken.indexes) == ("compensate", "p", (1, 0))
    again = store.claim_compensation("p", 1, "u2:0", [], 60)  # the claim was revoked: the new chain takes it
    assert again.outcome is ClaimOutcome.CLAIMED
    assert store.compensate_child("p", 1, "u2:0", fresh=again.round_attempt == 1).action == "finished"
    assert store.complete_compensation("p", 1, "u2:0") == "compensating"


def test_cancelling_a_parent_that_waits_for_its_child_cancels_the_child(store):
    store = parent_waiting(store)
    assert store.cancel_waiting("p") == []
    parent, child = store.get_run("p"), store.get_run("c1")
    assert (parent.status, parent.cancel_requested) == ("waiting", True)
    assert (child.status, child.cancel_requested) == ("pending", True)
    assert store.cancel_waiting("p") == []  # twice: nothing more
    assert [e.kind for e in store.get_run("p").events].count("cancel_requested") == 1
    assert store.claim_step("c1", 0, "x:0", [], 60).outcome is ClaimOutcome.CANCELLED


def test_a_child_step_reached_after_a_cancel_creates_no_child(store):
    store = store.transactional
    store.create_run("p", "parent", 1, {}, CHILD_STEPS)
    store.claim_step("p", 0, "a:0", [], 60)
    store.complete_step("p", 0, "a:0", 1)
    store.claim_step("p", 1, "c:0", [], 60)
    store.request_cancel("p")
    assert store.start_child("p", 1, "c:0", "c1", "child", 1, {}, CHILD_SAGA).action == "cancelled"
    assert store.get_run("p").children == ()


def test_an_unheard_child_end_is_found_by_the_sweeper(store):
    store = parent_waiting(store)
    finish_child(store)
    time.sleep(0.05)
    assert store.unreported_children(0.01) == ["c1"]
    store.child_ended("c1")
    assert store.unreported_children(0.01) == []


def test_a_signal_and_the_gate_racing_never_leave_the_gate_waiting_and_one_of_two_signals_wins(store):
    """Both transactions lock the run row first: whichever commits second sees the other's work."""
    from concurrent.futures import ThreadPoolExecutor

    store = store.transactional
    with ThreadPoolExecutor(3) as pool:
        for n in range(15):
            run_id = f"race{n}"
            at_gate(store, run_id=run_id)

            def signal(payload, run_id=run_id):  # bound now: called only within this iteration anyway
                try:
                    return store.deliver_signal(run_id, "ok", payload).action
                except InvalidTransition:
                    return "refused"

            gate = pool.submit(store.wait_for_signal, run_id, 1, "g:0", 30)
            signals = [pool.submit(signal, p) for p in (1, 2)]
            answers = sorted(f.result() for f in signals)
            gate_action = gate.result().action
            run = store.get_run(run_id)
            assert answers[-1] == "refused" and answers[0] in ("continue", "none"), answers
            assert run.step("approve").status == "succeeded", (gate_action, answers)
            assert run.status == "running"
            assert (gate_action == "continue") == (answers[0] == "none")  # exactly one of them passed the gate
