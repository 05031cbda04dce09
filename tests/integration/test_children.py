"""Child sagas on a real worker, Redis and PostgreSQL: trip (p_book -> booking: a child run of the linear
child_booking -> p_confirm). The child's success carries its results into the parent; its failure
compensates the parent; the parent's later failure undoes the child's steps (each once, latest first)
before the parent's earlier ones; a cancel of the waiting parent cancels the child first."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from sagaflow.app import get_store
from sagaflow.tasks.effects import example_effects
from tests.helpers import kinds, wait_for

pytestmark = pytest.mark.integration


def effects(*run_ids: str) -> list[tuple[str, str]]:
    """[(kind, step)] of these runs together, in the order they happened."""
    e = example_effects.c
    with get_store().engine.connect() as conn:
        return [(r.kind, r.step) for r in conn.execute(
            select(e.kind, e.step).where(e.run_id.in_(run_ids)).order_by(e.id))]


def child_of(client, run_id: str, step_name: str = "booking"):
    step = wait_for(lambda: (lambda s: s if s.child_run_id else None)(client.get(run_id).step(step_name)),
                    what="the child run to be recorded")
    return step.child_run_id


def test_a_child_that_succeeds_gives_the_parent_its_results(client):
    run = client.start("trip", {"child": {"class": "economy"}})
    run = client.wait(run.id)
    child = client.get(run.step("booking").child_run_id)

    assert run.status == "succeeded" and child.status == "succeeded"
    assert (child.parent_run_id, child.parent_step, child.idempotency_key) == (run.id, 1, f"child:{run.id}:booking")
    assert run.children == (child.id,)
    assert child.input == {"class": "economy", "trip": run.id[:8]}
    assert run.step("booking").result == {"c_reserve": {"seat": "12A", "input": child.input},
                                          "c_charge": {"charged": "12A"}}
    assert run.step("p_confirm").result == {"seat": "12A"}
    assert effects(run.id, child.id) == [("do", "p_book"), ("do", "c_reserve"), ("do", "c_charge"),
                                         ("do", "p_confirm")]
    assert ("run_waiting", "booking") in kinds(run)
    data = run.to_dict()
    assert data["children"] == [child.id] and data["steps"][1]["child_run_id"] == child.id
    assert child.to_dict()["parent_run_id"] == run.id


def test_a_child_that_fails_fails_the_step_and_the_parent_compensates_its_earlier_steps(client):
    run = client.wait(client.start("trip", {"child": {"fail_at": "c_charge"}}).id)
    child = client.get(run.step("booking").child_run_id)

    assert child.status == "compensated"
    assert run.status == "compensated"
    assert run.step("booking").status == "failed"
    assert f"child run {child.id} (saga 'child_booking') ended compensated" in run.step("booking").error
    assert run.step("p_confirm").status == "skipped"
    assert effects(run.id, child.id) == [("do", "p_book"), ("do", "c_reserve"), ("undo", "c_reserve"),
                                         ("undo", "p_book")]


def test_a_later_failure_of_the_parent_undoes_the_child_steps_once_in_order_then_the_parent_steps(client):
    run = client.wait(client.start("trip", {"fail_at": "p_confirm"}).id)
    child = client.get(run.step("booking").child_run_id)

    assert run.status == "compensated", run
    assert child.status == "compensated"
    assert run.step("booking").status == "compensated"
    assert [s.status for s in child.steps] == ["compensated", "compensated"]
    assert effects(run.id, child.id) == [
        ("do", "p_book"), ("do", "c_reserve"), ("do", "c_charge"),
        ("undo", "c_charge"), ("undo", "c_reserve"), ("undo", "p_book")]
    assert kinds(child, "compensation_requested") == [("compensation_requested", None)]
    assert kinds(child)[-1] == ("run_compensated", None)
    assert kinds(run)[-1] == ("run_compensated", None)



def test_a_child_step_s_own_compensation_runs_after_the_child_is_undone(client):
    run = client.wait(client.start("trip_undo", {"fail_at": "t_confirm"}).id)
    child = client.get(run.step("t_booking").child_run_id)

    assert (run.status, child.status) == ("compensated", "compensated")
    assert effects(run.id, child.id) == [
        ("do", "t_book"), ("do", "c_reserve"), ("do", "c_charge"),
        ("undo", "c_charge"), ("undo", "c_reserve"), ("undo", "t_booking"), ("undo", "t_book")]


def test_a_child_whose_undo_fails_leaves_the_parent_waiting_for_an_operator_whose_retry_finishes_both(client):
    # 3 undo attempts a round (FAST): 4 failures of c_reserve's undo outlast the first round only.
    run = client.wait(client.start("trip", {"fail_at": "p_confirm",
                                            "child": {"fail_compensation": {"c_reserve": 4}}}).id)
    child = client.get(run.step("booking").child_run_id)

    assert child.status == "compensation_failed"
    assert run.status == "compensation_failed"
    assert run.step("booking").status == "compensation_failed"
    assert child.id in run.step("booking").compensation_error
    assert run.step("p_book").status == "succeeded"  # not undone: the parent's compensation stopped there
    assert effects(run.id, child.id) == [("do", "p_book"), ("do", "c_reserve"), ("do", "c_charge"),
                                         ("undo", "c_charge")]

    client.retry(run.id)  # the operator fixed the cause: retry the parent (it retries the child's undo too)
    run = client.wait(run.id)
    child = client.get(child.id)

    assert (run.status, child.status) == ("compensated", "compensated")
    assert effects(run.id, child.id) == [
        ("do", "p_book"), ("do", "c_reserve"), ("do", "c_charge"),
        ("undo", "c_charge"), ("undo", "c_reserve"), ("undo", "p_book")]


def test_cancelling_the_parent_while_its_child_runs_cancels_the_child_then_the_parent(client):
    run = client.start("trip", {"child": {"sleep": {"c_charge": 2}}})
    child_id = child_of(client, run.id)
    wait_for(lambda: client.get(child_id).step("c_charge").status == "running", what="the child to be in c_charge")
    assert client.get(run.id).status == "waiting"
    client.cancel(run.id)
    run = client.wait(run.id, timeout=60)
    child = client.get(child_id)

    assert child.status == "cancelled"
    assert run.status == "cancelled"
    assert "ended cancelled" in run.step("booking").error
    assert run.step("p_confirm").status == "skipped"
    assert effects(run.id, child.id) == [("do", "p_book"), ("do", "c_reserve"), ("do", "c_charge"),
                                         ("undo", "c_charge"), ("undo", "c_reserve"), ("undo", "p_book")]


def test_a_lost_child_end_is_announced_again_by_the_sweeper(client):
    from sqlalchemy import update

    from sagaflow.runtime import waits
    from sagaflow.store import tables as t

    run = client.start("trip", {"child": {"sleep": {"c_charge": 1}}})
    child_id = child_of(client, run.id)
    # Make the parent miss the child's end: hide the parent link until the child has finished.
    store = get_store()
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == child_id).values(parent_run_id=None))
    child = client.wait(child_id)
    assert child.status == "succeeded"
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == child_id).values(parent_run_id=run.id))
    assert client.get(run.id).status == "waiting"  # the message went nowhere
    found = waits.sweep(store, 0)
    assert (child_id, "child_finished") in [(r.run_id, r.action) for r in found]
    run = client.wait(run.id)
    assert run.status == "succeeded"
    assert effects(run.id, child_id) == [("do", "p_book"), ("do", "c_reserve"), ("do", "c_charge"),
                                         ("do", "p_confirm")]


def test_a_child_waiting_at_its_gate_goes_on_when_signalled_and_so_does_its_parent(client):
    run = client.start("trip_approval", {})
    child_id = child_of(client, run.id, "approval_run")
    wait_for(lambda: client.get(child_id).status == "waiting", what="the child to wait at its gate")
    assert client.get(run.id).status == "waiting"
    client.signal(child_id, "approved", {"by": "ann"})
    run = client.wait(run.id)

    assert run.status == "succeeded"
    assert run.step("approval_run").result["charge"]["approved_by"] == "ann"
    assert effects(run.id, child_id) == [("do", "a_book"), ("do", "reserve"), ("do", "charge")]


def test_cancelling_a_parent_whose_child_waits_at_a_gate_cancels_both_and_undoes_everything_once(client):
    run = client.start("trip_approval", {})
    child_id = child_of(client, run.id, "approval_run")
    wait_for(lambda: client.get(child_id).status == "waiting", what="the child to wait at its gate")
    client.cancel(run.id)
    run = client.wait(run.id)
    child = client.get(child_id)

    assert (run.status, child.status) == ("cancelled", "cancelled")
    assert child.step("approve").error == "cancelled while waiting for signal 'approved'"
    assert effects(run.id, child_id) == [("do", "a_book"), ("do", "reserve"), ("undo", "reserve"), ("undo", "a_book")]
