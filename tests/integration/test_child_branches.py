"""Child steps as branches of a parallel group, on a real worker, Redis and PostgreSQL (tests/sagas_signals.py):
kids (k_open -> three child runs of child_booking at once -> k_total). The step after the group gets every
child's results; one child's failure undoes the other children, then the parent's earlier steps; a later
failure undoes every child, then the earlier steps; a child still running when its sibling fails is undone
once it ends (a late branch), and the steps before the group wait for it; a cancel of the parent cancels
the children it waits for. Every effect happens once (tasks/effects.py), so the effect lists below are exact."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from sagaflow.app import get_store
from sagaflow.model import RunStatus
from sagaflow.runtime import waits
from sagaflow.store.engine import utcnow
from sagaflow.store.guards import set_run_status
from sagaflow.tasks.effects import example_effects
from tests.helpers import kinds, wait_for

pytestmark = pytest.mark.integration

KIDS = ("kid_a", "kid_b", "kid_c")
CHILD_DONE = [("do", "c_reserve"), ("do", "c_charge")]
CHILD_UNDONE = [("undo", "c_charge"), ("undo", "c_reserve")]


def effects(run_id: str) -> list[tuple[str, str]]:
    e = example_effects.c
    with get_store().engine.connect() as conn:
        return [(r.kind, r.step) for r in conn.execute(
            select(e.kind, e.step).where(e.run_id == run_id).order_by(e.id))]


def effect_ids(*run_ids: str) -> dict[tuple[str, str, str], int]:
    """(run id, kind, step) -> the effect's id: its place in the one order every effect happened in."""
    e = example_effects.c
    with get_store().engine.connect() as conn:
        return {(r.run_id, r.kind, r.step): r.id for r in conn.execute(
            select(e.id, e.run_id, e.kind, e.step).where(e.run_id.in_(run_ids)))}


def children(client, run, names=KIDS) -> dict:
    return {name: client.get(run.step(name).child_run_id) for name in names}


def child_of(client, run_id: str, step: str) -> str:
    return wait_for(lambda: client.get(run_id).step(step).child_run_id, what=f"the child run of {step}")


def test_three_children_that_succeed_give_the_step_after_the_group_all_their_results(client):
    run = client.wait(client.start("kids", {}).id)
    kids = children(client, run)

    assert run.status == "succeeded", run
    assert [(s.name, s.status) for s in run.steps] == [("k_open", "succeeded")] + [
        (name, "succeeded") for name in KIDS] + [("k_total", "succeeded")]
    assert run.step("k_total").result == {"charged": ["12A"] * 3, "orders": [run.id[:8]] * 3}
    for name, child in kids.items():
        assert child.status == "succeeded"
        assert (child.parent_run_id, child.parent_step) == (run.id, run.steps.index(run.step(name)))
        assert child.idempotency_key == f"child:{run.id}:{name}"
        assert run.step(name).result == {"c_reserve": {"seat": "12A", "input": child.input},
                                         "c_charge": {"charged": "12A"}}
        assert effects(child.id) == CHILD_DONE
    assert sorted(run.children) == sorted(c.id for c in kids.values())
    assert len({c.id for c in kids.values()}) == 3
    assert effects(run.id) == [("do", "k_open"), ("do", "k_total")]
    assert len(kinds(run, "group_joined")) == 1
    assert kinds(run)[-1] == ("run_succeeded", None)


def test_three_children_one_fails_the_other_two_children_are_compensated_then_the_parent(client):
    # kid_a's child is slow (its c_charge sleeps), so it is most likely still running when kid_b fails: a late
    # branch; kid_c is whatever the race makes it. The outcome is the same either way.
    run = client.wait(client.start("kids", {"kids": {"kid_a": {"sleep": {"c_charge": 1}},
                                                     "kid_b": {"fail_at": "c_charge"}}}).id)
    kids = children(client, run)

    assert run.status == "compensated", run
    assert {name: c.status for name, c in kids.items()} == {name: "compensated" for name in KIDS}
    assert run.step("kid_b").status == "failed"
    assert f"child run {kids['kid_b'].id} (saga 'child_booking') ended compensated" in run.step("kid_b").error
    assert (run.step("kid_a").status, run.step("kid_c").status) == ("compensated", "compensated")
    assert run.step("k_total").status == "skipped"
    # Each child undid its own steps once, latest first; the failed child undid the one step it did.
    assert effects(kids["kid_a"].id) == CHILD_DONE + CHILD_UNDONE
    assert effects(kids["kid_c"].id) == CHILD_DONE + CHILD_UNDONE
    assert effects(kids["kid_b"].id) == [("do", "c_reserve"), ("undo", "c_reserve")]
    assert effects(run.id) == [("do", "k_open"), ("undo", "k_open")]
    # The parent's own undo came after every child's undo.
    order = effect_ids(run.id, *(c.id for c in kids.values()))
    assert all(order[(run.id, "undo", "k_open")] > order[(c.id, "undo", "c_reserve")] for c in kids.values())
    # One errback for the group, one request to undo each child that succeeded, each child undone once.
    for name in ("kid_a", "kid_c"):
        assert kinds(kids[name], "compensation_requested") == [("compensation_requested", None)]
        assert kinds(run, "compensation_succeeded").count(("compensation_succeeded", name)) == 1
    assert kinds(kids["kid_b"], "compensation_requested") == []
    assert kinds(run)[-1] == ("run_compensated", None)
    # A duplicate report of each child's end (a redelivered child_finished) changes nothing.
    before = [(e.kind, e.step) for e in client.get(run.id).events]
    for child in kids.values():
        waits.child_finished(get_store(), child.id)
    assert [(e.kind, e.step) for e in client.get(run.id).events] == before
    assert effects(run.id) == [("do", "k_open"), ("undo", "k_open")]


def test_a_failure_after_the_group_compensates_all_three_children_then_the_earlier_steps(client):
    run = client.wait(client.start("kids", {"fail_at": "k_total"}).id)
    kids = children(client, run)

    assert run.status == "compensated", run
    assert [s.status for s in run.steps] == ["compensated", "compensated", "compensated", "compensated", "failed"]
    for child in kids.values():
        assert child.status == "compensated"
        assert effects(child.id) == CHILD_DONE + CHILD_UNDONE
        assert kinds(child, "compensation_requested") == [("compensation_requested", None)]
    assert effects(run.id) == [("do", "k_open"), ("undo", "k_open")]
    order = effect_ids(run.id, *(c.id for c in kids.values()))
    assert all(order[(run.id, "undo", "k_open")] > order[(c.id, "undo", "c_reserve")] for c in kids.values())
    # The group is undone latest branch first, as a linear saga's steps are.
    undone = [step for kind, step in kinds(run, "compensation_succeeded")]
    assert undone == ["kid_c", "kid_b", "kid_a", "k_open"]


def test_a_child_still_running_when_its_sibling_fails_is_undone_once_it_ends_before_the_earlier_steps(client):
    """kids_late: gated and failing wait at their children's gates; plain succeeds. The failing child, signalled,
    fails: the parent compensates plain's child at once, but k_open (before the group) waits for gated, which
    is still running. Once gated's child succeeds (late), it is undone, then k_open."""
    run = client.start("kids_late", {})
    gated, failing = child_of(client, run.id, "gated"), child_of(client, run.id, "failing")
    wait_for(lambda: client.get(gated).status == "waiting" and client.get(failing).status == "waiting"
             and client.get(run.id).step("plain").status == "succeeded", what="both gates reached, plain done")
    assert client.get(run.id).status == "running"  # it waits for two branches, holding no worker

    client.signal(failing, "approved", {"by": "test"})
    plain = client.get(run.id).step("plain").child_run_id
    wait_for(lambda: client.get(plain).status == "compensated", what="plain's child undone")
    wait_for(lambda: client.get(run.id).step("plain").status == "compensated", what="the plain branch undone")
    now = client.get(run.id)
    assert now.status == "compensating"
    assert (now.step("gated").status, now.step("failing").status) == ("waiting", "failed")
    assert now.step("k_open").status == "succeeded"  # held until the group settles
    assert ("undos_held", None) in kinds(now)
    assert client.get(gated).status == "waiting"  # the late child is left to end, not cancelled

    client.signal(gated, "approved", {"by": "test"})
    run = client.wait(run.id)

    assert run.status == "compensated", run
    assert (client.get(gated).status, client.get(failing).status, client.get(plain).status) == (
        "compensated", "compensated", "compensated")
    assert effects(gated) == [("do", "reserve"), ("do", "charge"), ("undo", "charge"), ("undo", "reserve")]
    assert effects(failing) == [("do", "reserve"), ("undo", "reserve")]
    assert effects(run.id) == [("do", "k_open"), ("undo", "k_open")]
    order = effect_ids(run.id, gated, failing, plain)
    assert order[(run.id, "undo", "k_open")] > order[(gated, "undo", "reserve")]
    assert [e.detail.get("late") for e in run.events if e.kind == "step_succeeded" and e.step == "gated"] == [True]
    assert kinds(run, "undos_released") == [("undos_released", None)]
    assert [k for k, s in kinds(run) if k == "compensation_succeeded"] == ["compensation_succeeded"] * 3


def test_cancelling_the_parent_while_its_children_run_cancels_them_then_the_parent(client):
    run = client.start("kids_cancel", {})
    gate_1, gate_2 = child_of(client, run.id, "gate_1"), child_of(client, run.id, "gate_2")
    sleepy = child_of(client, run.id, "sleepy")
    wait_for(lambda: client.get(gate_1).status == "waiting" and client.get(gate_2).status == "waiting"
             and client.get(sleepy).step("c_charge").status == "running", what="the children under way")
    assert client.get(run.id).status == "running"

    client.cancel(run.id)
    run = client.wait(run.id)

    assert run.status == "cancelled", run
    assert [client.get(c).status for c in (gate_1, gate_2, sleepy)] == ["cancelled"] * 3
    assert effects(gate_1) == effects(gate_2) == [("do", "reserve"), ("undo", "reserve")]
    assert effects(sleepy) == CHILD_DONE + CHILD_UNDONE
    assert effects(run.id) == [("do", "k_open"), ("undo", "k_open")]
    assert [run.step(n).status for n in ("gate_1", "gate_2", "sleepy")] == ["failed"] * 3
    order = effect_ids(run.id, gate_1, gate_2, sleepy)
    assert all(order[(run.id, "undo", "k_open")] > order[(c, "undo", "reserve" if c != sleepy else "c_reserve")]
               for c in (gate_1, gate_2, sleepy))
    for child in (gate_1, gate_2, sleepy):
        assert ("cancel_requested", None) in kinds(client.get(child))


def test_the_yaml_form_runs_children_in_parallel_and_undoes_them_after_a_later_failure(client):
    ok = client.wait(client.start("kids_yaml", {}).id)
    assert ok.status == "succeeded", ok
    assert ok.step("y_total").result == {"saw": ["k_open", "y_a", "y_b"]}
    assert ok.step("y_a").result["c_charge"] == {"charged": "12A"}

    run = client.wait(client.start("kids_yaml", {"fail_at": "y_total"}).id)
    kids = children(client, run, ("y_a", "y_b"))
    assert run.status == "compensated", run
    for child in kids.values():
        assert child.status == "compensated" and effects(child.id) == CHILD_DONE + CHILD_UNDONE
    assert effects(run.id) == [("do", "k_open"), ("undo", "k_open")]


def test_a_lost_report_of_a_child_branch_s_end_is_sent_again_by_the_sweeper(client):
    """The child ended but its parent never heard (the child_finished message lost): unreported_children
    finds the branch still waiting and the sweeper re-sends the child's end."""
    run = client.start("kids_late", {})
    gated = child_of(client, run.id, "gated")
    failing = child_of(client, run.id, "failing")
    wait_for(lambda: client.get(gated).status == "waiting" and client.get(failing).status == "waiting",
             what="both gates reached")
    store = get_store()
    # The state a lost report leaves: the child ended (here by a transition in SQL, which sends no message)
    # while its parent's branch still waits for it.
    with store.engine.begin() as conn:
        assert set_run_status(conn, gated, RunStatus.WAITING, RunStatus.COMPENSATED, utcnow(), finished_at=utcnow())
    assert gated in store.unreported_children(0)
    # The sweeper's part that tells parents (recover_stalled runs it first), alone: no other run is touched.
    assert "child_finished" in [r.action for r in waits.sweep(store, 0) if r.run_id == gated]
    wait_for(lambda: client.get(run.id).step("gated").status == "failed", what="the parent to hear of it")
    client.signal(failing, "approved", {"by": "test"})
    run = client.wait(run.id)
    assert run.status == "compensated", run
    assert effects(run.id) == [("do", "k_open"), ("undo", "k_open")]
