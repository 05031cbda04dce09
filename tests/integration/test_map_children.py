"""Maps whose items are child runs (issue 18), on a real worker, Redis and PostgreSQL: map_kids and
map_kids_cancel (tests/sagas_signals.py), map_kids_yaml (tests/sagas_maps.yaml). One child run per item, at most
``concurrency`` at once; the step after the map gets the children's results in item order; a child that fails
fails the map, whose undo compensates every child that succeeded (latest first), then the earlier steps; a
cancel of the parent cancels the children it waits for. Every effect happens once (tasks/effects.py), so the
effect lists below are exact."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from sagaflow.app import get_store
from sagaflow.model import RunStatus
from sagaflow.runtime import waits
from sagaflow.store import tables as t
from sagaflow.store.engine import utcnow
from sagaflow.store.guards import set_run_status
from tests.helpers import kinds, wait_for
from tests.integration.test_child_branches import CHILD_DONE, CHILD_UNDONE, effect_ids, effects

pytestmark = pytest.mark.integration


def item_children(run_id: str, step: int) -> list[str | None]:
    """The child run of each item of map step ``step``, in item order."""
    m = t.map_items.c
    with get_store().engine.connect() as conn:
        return list(conn.execute(select(m.child_run_id).where(m.run_id == run_id, m.idx == step)
                                 .order_by(m.item)).scalars())


def test_a_map_of_child_runs_gives_the_step_after_it_the_children_s_results_in_item_order(client):
    run = client.wait(client.start("map_kids_yaml", {"ids": ["a", "b", "c", "d"]}).id)

    assert run.status == "succeeded", run
    kids = [client.get(c) for c in item_children(run.id, 1)]
    assert [k.status for k in kids] == ["succeeded"] * 4
    # Each child's input is its item and the item's index; the step after the map sees them in item order.
    assert run.step("total").result == {"inputs": [{"item": x, "index": i} for i, x in enumerate("abcd")],
                                        "charged": ["12A"] * 4}
    assert run.step("quotes").result == [{"c_reserve": {"seat": "12A", "input": {"item": x, "index": i}},
                                          "c_charge": {"charged": "12A"}} for i, x in enumerate("abcd")]
    for i, kid in enumerate(kids):
        assert (kid.parent_run_id, kid.parent_step, kid.parent_item) == (run.id, 1, i)
        assert kid.idempotency_key == f"child:{run.id}:quotes:{i}"
        assert effects(kid.id) == CHILD_DONE
    assert len({k.id for k in kids}) == 4
    assert kinds(run)[-1] == ("run_succeeded", None)


def test_one_child_fails_the_others_are_compensated_once_each_then_the_earlier_steps_in_order(client):
    # All three children start at once (concurrency 3); item 1's child fails at c_charge. Items 0 and 2 end
    # before or after that failure (a late success): either way each is undone once.
    run = client.wait(client.start("map_kids", {"items": [{}, {"fail_at": "c_charge"}, {}]}).id)
    kids = [client.get(c) for c in item_children(run.id, 2)]

    assert run.status == "compensated", run
    assert [k.status for k in kids] == ["compensated"] * 3
    assert effects(kids[0].id) == effects(kids[2].id) == CHILD_DONE + CHILD_UNDONE
    assert effects(kids[1].id) == [("do", "c_reserve"), ("undo", "c_reserve")]
    for kid in (kids[0], kids[2]):  # one request to undo each child that succeeded
        assert kinds(kid, "compensation_requested") == [("compensation_requested", None)]
    assert kinds(kids[1], "compensation_requested") == []
    assert f"child run {kids[1].id} (saga 'child_booking') ended compensated" in run.step("mk_quotes").error
    assert run.step("mk_total").status == "skipped"
    # The parent's earlier steps are undone after every child, latest first.
    assert effects(run.id) == [("do", "mk_open"), ("do", "mk_second"), ("undo", "mk_second"), ("undo", "mk_open")]
    order = effect_ids(run.id, *(k.id for k in kids))
    assert all(order[(run.id, "undo", "mk_second")] > order[(k.id, "undo", "c_reserve")] for k in kids)
    # The children that succeeded were undone one after the other, the latest to succeed first.
    done_0, done_2 = order[(kids[0].id, "do", "c_charge")], order[(kids[2].id, "do", "c_charge")]
    later, earlier = (kids[0], kids[2]) if done_0 > done_2 else (kids[2], kids[0])
    assert order[(later.id, "undo", "c_reserve")] < order[(earlier.id, "undo", "c_charge")]
    assert kinds(run)[-1] == ("run_compensated", None)
    # A duplicate report of each child's end (a redelivered child_finished) changes nothing.
    before = [(e.kind, e.step) for e in client.get(run.id).events]
    for kid in kids:
        waits.child_finished(get_store(), kid.id)
    assert [(e.kind, e.step) for e in client.get(run.id).events] == before


def test_a_failure_after_the_map_compensates_every_child_then_the_earlier_steps(client):
    run = client.wait(client.start("map_kids", {"fail_at": "mk_total"}).id)
    kids = [client.get(c) for c in item_children(run.id, 2)]

    assert run.status == "compensated", run
    for kid in kids:
        assert kid.status == "compensated" and effects(kid.id) == CHILD_DONE + CHILD_UNDONE
        assert kid.input["order"] == run.id[:8]
    assert effects(run.id) == [("do", "mk_open"), ("do", "mk_second"), ("undo", "mk_second"), ("undo", "mk_open")]
    order = effect_ids(run.id, *(k.id for k in kids))
    assert all(order[(run.id, "undo", "mk_second")] > order[(k.id, "undo", "c_reserve")] for k in kids)


def _gated_children(client, run_id: str) -> list[str]:
    def ready():
        kids = item_children(run_id, 1)
        return kids if len(kids) == 3 and all(kids) and all(client.get(k).status == "waiting" for k in kids) \
            else None

    return wait_for(ready, what="three children waiting at their gates")


def test_cancelling_the_parent_while_its_children_run_cancels_them_then_the_parent(client):
    run = client.start("map_kids_cancel", {})
    kids = _gated_children(client, run.id)
    assert client.get(run.id).status == "running"  # its items wait for their children, holding no worker
    # However long the children take (here: the map step's lease ran out), the sweeper leaves the run alone:
    # the children's ends move it.
    store = get_store()
    s = t.steps.c
    with store.engine.begin() as conn:
        conn.execute(update(t.steps).where(s.run_id == run.id, s.idx == 1).values(lease_expires_at=utcnow()))
    assert run.id not in [rid for rid, _ in store.stalled_runs(0)]

    client.cancel(run.id)
    run = client.wait(run.id)

    assert run.status == "cancelled", run
    assert [client.get(k).status for k in kids] == ["cancelled"] * 3
    for kid in kids:
        assert effects(kid) == [("do", "reserve"), ("undo", "reserve")]
        assert ("cancel_requested", None) in kinds(client.get(kid))
    assert effects(run.id) == [("do", "mk_open"), ("undo", "mk_open")]
    order = effect_ids(run.id, *kids)
    assert all(order[(run.id, "undo", "mk_open")] > order[(k, "undo", "reserve")] for k in kids)


def test_a_lost_report_of_a_map_item_s_child_end_is_sent_again_by_the_sweeper(client):
    """The child ended but its parent never heard (the child_finished message lost): unreported_children
    finds the item still waiting for it, and the sweeper re-sends the child's end."""
    run = client.start("map_kids_cancel", {})
    kids = _gated_children(client, run.id)
    store = get_store()
    # The state a lost report leaves: the child ended (here by a transition in SQL, which sends no message)
    # while its parent's item still waits for it.
    with store.engine.begin() as conn:
        assert set_run_status(conn, kids[0], RunStatus.WAITING, RunStatus.COMPENSATED, utcnow(), finished_at=utcnow())
    assert kids[0] in store.unreported_children(0)
    assert "child_finished" in [r.action for r in waits.sweep(store, 0) if r.run_id == kids[0]]
    # The item failed: the map stops and waits for the other two children, which the test ends.
    wait_for(lambda: kids[0] not in store.unreported_children(0), what="the parent to hear of it")
    for kid in kids[1:]:
        client.signal(kid, "approved", {"by": "test"})
    run = client.wait(run.id)
    assert run.status == "compensated", run
    assert f"child run {kids[0]}" in run.step("mk_gated").error
    for kid in kids[1:]:  # both succeeded after the failure (late): each is undone
        assert client.get(kid).status == "compensated"
        assert effects(kid) == [("do", "reserve"), ("do", "charge"), ("undo", "charge"), ("undo", "reserve")]
    assert effects(run.id) == [("do", "mk_open"), ("undo", "mk_open")]
