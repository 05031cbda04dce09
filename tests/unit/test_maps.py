"""Map steps (issue 18) without a broker: the definition (Python and YAML) refuses bad maps with a clear error,
and the store's transitions (store/maps.py) keep the window, end the map in item order, and fail it only once
nothing is in flight, on SQLite and PostgreSQL."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sagaflow import DefinitionError, Map, Parallel, Saga, SagaFileError, Step, StepKind
from sagaflow.model import ClaimOutcome as C
from sagaflow.model import StepSpec
from sagaflow.model.declarative import HandlerRegistry, items_at
from sagaflow.runtime.compiler import map_items, segment_end
from sagaflow.runtime.maps import MapItemsRefused, compute_items
from tests.helpers import load_yaml_sagas

# ---------------------------------------------------------------------------------------------- definitions


def act(ctx):
    return ctx.item


def test_a_map_step_in_python_records_its_items_and_concurrency():
    saga = Saga("m_py", register=False)

    @saga.map(items=lambda ctx: ctx.input["xs"], concurrency=3)
    def each(ctx):
        return ctx.item

    @each.compensation
    def undo_each(ctx):
        return None

    assert each.kind is StepKind.MAP and each.map_concurrency == 3 and not saga.linear
    assert StepSpec.of(each).non_atomic and StepSpec.of(each).kind == "map"  # a failed map undoes its items
    assert segment_end(saga, 0) == 1  # the map ends its chain: its items move the run on


@pytest.mark.parametrize("concurrency", [0, -1, 1.5, True, "3", None])
def test_a_concurrency_below_one_or_not_an_integer_is_refused(concurrency):
    with pytest.raises(DefinitionError, match="concurrency must be an integer >= 1"):
        Map("each", act, lambda ctx: [], concurrency=concurrency)


def test_items_that_are_not_a_function_are_refused():
    with pytest.raises(DefinitionError, match=r"map 'each': items must be callable \(ctx -> list\), got \[1, 2\]"):
        Map("each", act, [1, 2])  # type: ignore[arg-type]


def test_a_map_cannot_be_in_a_parallel_group_nor_best_effort():
    with pytest.raises(DefinitionError, match="maps and pivots run alone"):
        Saga("m_par", [Parallel(Step("a", act), Map("each", act, lambda ctx: []))], register=False)
    with pytest.raises(DefinitionError, match="cannot be best_effort"):
        Map("each", act, lambda ctx: [], best_effort=True)
    with pytest.raises(DefinitionError, match="only a map step takes items"):
        Step("plain", act, items=lambda ctx: [])


def _ctx(**fields):
    return SimpleNamespace(input={}, results={}, **fields)


def test_items_computed_at_run_time_must_be_a_list_of_json_values():
    step = Map("each", act, lambda ctx: ctx.input["xs"])
    with pytest.raises(MapItemsRefused, match=r"map 'each': items must return a list, got dict"):
        compute_items(step, SimpleNamespace(input={"xs": {"a": 1}}, results={}))
    assert compute_items(step, SimpleNamespace(input={"xs": [1, "b", None]}, results={})) == [1, "b", None]


def test_an_items_message_names_the_item_by_index_only():
    saga = Saga("m_msg", [Step("a", act), Map("each", act, lambda ctx: [])], register=False)
    from celery import Celery

    fanout = map_items(Celery(set_as_current=False), saga, "r1", 1, [0, 7])
    assert [sig.task for sig in fanout.tasks] == ["m_msg.each.item"] * 2
    assert [sig.kwargs for sig in fanout.tasks] == [{"run_id": "r1", "index": 1, "item": n, "version": 1}
                                                     for n in (0, 7)]
    assert all(sig.args == () for sig in fanout.tasks)


# ---------------------------------------------------------------------------------------------- YAML


@pytest.fixture
def hreg():
    reg = HandlerRegistry()
    reg.register("act", act)
    reg.register("undo", act)
    return reg


def test_a_map_in_yaml(tmp_path, hreg):
    [saga] = load_yaml_sagas(tmp_path, hreg, """
        sagas:
          - name: m_yaml
            defaults: {timeout: 30}
            steps:
              - {action: act}
              - {map: each, action: act, compensation: undo, items: results.act.ids, concurrency: 4, lease: 5}
        """)
    step = saga.steps[1]
    assert step.kind is StepKind.MAP and step.map_concurrency == 4 and step.timeout == 30 and step.lease == 5
    assert step.items(SimpleNamespace(input={}, results={"act": {"ids": [3, 4]}})) == [3, 4]
    with pytest.raises(LookupError, match="items path 'results.act.ids': the run's context has nothing at 'ids'"):
        step.items(SimpleNamespace(input={}, results={"act": {}}))


@pytest.mark.parametrize("entry, message", [
    ("{map: each, action: act, items: input.xs, concurrency: 0}",
     r"sagas.yaml:4: .*concurrency must be an integer >= 1"),
    ("{map: each, action: act, items: input.xs, concurrency: many}", "concurrency must be an integer >= 1"),
    ("{map: each, action: act, items: xs}", r"items must be a path into the context"),
    ("{map: each, action: act, items: [1, 2]}", r"items must be a path into the context"),
    ("{map: each, action: act}", "a map step needs the key 'items'"),
    ("{map: each, action: act, items: input.xs, width: 3}", "unknown key 'width' in a map step"),
    ("{map: each, action: nope, items: input.xs}", "unknown handler 'nope'"),
])
def test_a_bad_map_in_yaml_is_refused_naming_the_line(tmp_path, hreg, entry, message):
    with pytest.raises(SagaFileError, match=message):
        load_yaml_sagas(tmp_path, hreg, f"""
            sagas:
              - name: m_bad
                steps:
                  - {entry}
            """)


def test_items_at_reads_input_and_list_positions():
    items = items_at("input.orders.0.lines")
    assert items(SimpleNamespace(input={"orders": [{"lines": [1, 2]}]}, results={})) == [1, 2]


# ---------------------------------------------------------------------------------------------- the store

SPECS = [StepSpec("before", True), StepSpec("each", True, kind="map", non_atomic=True), StepSpec("after", False)]
LEASE = 60.0


def mapping(store, items, concurrency=2, run_id="r1"):
    """A run whose first step succeeded and whose map step (1) holds its items, first window handed out."""
    s = store.transactional
    s.create_run(run_id, "maps", 1, {"x": 1}, SPECS)
    assert s.claim_step(run_id, 0, "t0:0", [], LEASE).outcome is C.CLAIMED
    assert s.complete_step(run_id, 0, "t0:0", {"b": 0})
    assert s.claim_step(run_id, 1, "tm:0", [], LEASE).outcome is C.CLAIMED
    assert not s.map_has_items(run_id, 1)
    outcome = s.start_map(run_id, 1, "tm:0", items, concurrency, LEASE)
    assert s.map_has_items(run_id, 1) == bool(items)
    return s, outcome


def run_item(s, n, result=None, concurrency=2, token=None):
    token = token or f"i{n}:0"
    claim = s.claim_item("r1", 1, n, token, [], LEASE, concurrency)
    assert claim.outcome is C.CLAIMED, claim
    return claim, s.complete_item("r1", 1, n, token, result, concurrency, LEASE)


def test_the_window_refills_as_items_end_and_the_last_one_ends_the_map_in_item_order(store):
    s, first = mapping(store, ["a", "b", "c", "d", "e"])
    assert (first.decision, first.items) == ("dispatch", (0, 1))
    claim, outcome = run_item(s, 1, "B")
    assert (claim.value, claim.attempt, claim.input) == ("b", 1, {"x": 1})
    assert (outcome.decision, outcome.items) == ("dispatch", (2,))  # one ended: one more handed out
    assert run_item(s, 2, 2)[1].items == (3,)
    assert run_item(s, 0, 0)[1].items == (4,)
    assert run_item(s, 3, 3)[1].decision == "waiting"  # nothing left to hand out; item 4 runs
    _, last = run_item(s, 4, "E")
    assert last.decision == "done" and last.next_index == 2
    assert last.results == {"before": {"b": 0}, "each": [0, "B", 2, 3, "E"]}
    assert s.get_run("r1").step("each").status == "succeeded"


def test_a_duplicate_item_delivery_after_it_completed_changes_nothing(store):
    s, _ = mapping(store, ["a", "b", "c", "d"])
    run_item(s, 0, "A")
    assert s.claim_item("r1", 1, 0, "other:0", [], LEASE, 2).outcome is C.DONE
    assert s.claim_item("r1", 1, 3, "early:0", [], LEASE, 2).outcome is C.GONE  # not handed out yet
    assert s.claim_item("r1", 1, 1, "i1:0", [], LEASE, 2).outcome is C.CLAIMED
    assert s.claim_item("r1", 1, 1, "dup:0", [], LEASE, 2).outcome is C.BUSY  # held by a live delivery
    assert s.complete_item("r1", 1, 0, "i0:0", "again", 2, LEASE) is None


def test_a_failed_item_stops_the_window_and_the_map_fails_once_nothing_is_in_flight(store):
    s, _ = mapping(store, list(range(6)), concurrency=3)
    for n in (0, 1, 2):
        assert s.claim_item("r1", 1, n, f"i{n}:0", [], LEASE, 3).outcome is C.CLAIMED
    failed = s.fail_item("r1", 1, 1, "i1:0", "ValueError: no", 3, LEASE)
    assert failed.decision == "waiting"  # items 0 and 2 still run
    late = s.complete_item("r1", 1, 0, "i0:0", "late", 3, LEASE)
    assert late.decision == "waiting"
    end = s.complete_item("r1", 1, 2, "i2:0", "late too", 3, LEASE)
    assert end.decision == "failed"
    run = s.get_run("r1")
    assert run.step("each").status == "failed" and run.step("each").error == "item 1 failed: ValueError: no"
    # the late successes are there to undo, latest completed first; the rest never ran
    assert [n for n, _, _ in s.items_to_undo("r1", 1)] == [2, 0]
    summary = s.map_summary("r1")[1]
    assert summary["counts"] == {"succeeded": 2, "failed": 1, "skipped": 3} and summary["total"] == 6
    assert s.item_undone("r1", 1, 2) and not s.item_undone("r1", 1, 2)  # once


def test_an_item_handed_out_after_the_failure_is_skipped_and_may_end_the_map(store):
    s, _ = mapping(store, list(range(4)), concurrency=2)
    assert s.claim_item("r1", 1, 0, "i0:0", [], LEASE, 2).outcome is C.CLAIMED
    assert s.fail_item("r1", 1, 0, "i0:0", "boom", 2, LEASE).decision == "waiting"  # item 1 is handed out
    skipped = s.claim_item("r1", 1, 1, "i1:0", [], LEASE, 2)
    assert skipped.outcome is C.GONE and skipped.after.decision == "failed"


def test_a_cancel_fails_the_map_when_its_items_end(store):
    s, _ = mapping(store, list(range(3)), concurrency=1)
    assert s.claim_item("r1", 1, 0, "i0:0", [], LEASE, 1).outcome is C.CLAIMED
    s.request_cancel("r1")
    assert s.complete_item("r1", 1, 0, "i0:0", 0, 1, LEASE).decision == "failed"
    assert "cancelled" in s.get_run("r1").step("each").error


def test_a_re_driven_map_republishes_what_was_lost_and_inserts_nothing_twice(store):
    s, _ = mapping(store, list(range(4)), concurrency=2)
    assert s.claim_item("r1", 1, 0, "i0:0", [], 0.0, 2).outcome is C.CLAIMED  # its lease runs out at once
    # the sweeper took the step back; a new delivery of the map step claims it
    from sqlalchemy import update

    from sagaflow.store import tables as t
    with s.engine.begin() as conn:
        conn.execute(update(t.steps).where(t.steps.c.run_id == "r1", t.steps.c.idx == 1).values(claim=None))
    assert s.claim_step("r1", 1, "tm2:0", [], LEASE).outcome is C.CLAIMED
    again = s.start_map("r1", 1, "tm2:0", None, 2, LEASE)
    assert (again.decision, again.items) == ("dispatch", (0, 1))  # the lost running one, the unclaimed one
    assert s.map_summary("r1")[1]["total"] == 4


def test_an_empty_list_ends_the_map_at_once(store):
    s, outcome = mapping(store, [])
    assert outcome.decision == "done" and outcome.results["each"] == []


# ---------------------------------------------------------------------------------------------- the page


def test_the_status_page_shows_a_maps_counts_and_its_first_items_capped(app_and_store):
    from sagaflow.web.pages import MAP_ITEMS_SHOWN

    app, store = app_and_store
    s = store.transactional
    s.create_run("m-page", "maps", 1, {}, [StepSpec("each", True, kind="map", non_atomic=True)])
    assert s.claim_step("m-page", 0, "tm:0", [], LEASE).outcome is C.CLAIMED
    s.start_map("m-page", 0, "tm:0", list(range(250)), 3, LEASE)
    for n in (0, 1, 2):
        assert s.claim_item("m-page", 0, n, f"i{n}:0", [], LEASE, 3).outcome is C.CLAIMED
    s.complete_item("m-page", 0, 0, "i0:0", 0, 3, LEASE)
    s.complete_item("m-page", 0, 2, "i2:0", 2, 3, LEASE)  # hands out 3 and 4
    assert s.claim_item("m-page", 0, 3, "i3:0", [], LEASE, 3).outcome is C.CLAIMED  # still running
    s.fail_item("m-page", 0, 1, "i1:0", "ValueError: item one is bad", 3, LEASE)

    page = app.test_client().get("/runs/m-page").get_data(as_text=True)
    assert "map: 250 items" in page
    for count in ('data-status="succeeded">2 done', 'data-status="failed">1 failed',
                  'data-status="running">1 running', 'data-status="dispatched">1 queued',
                  'data-status="pending">245 pending'):
        assert count in page
    assert "Items of map each" in page and f"the first {MAP_ITEMS_SHOWN} shown" in page
    assert page.count('<tr data-item="') == MAP_ITEMS_SHOWN
    assert "ValueError: item one is bad" in page


# ---------------------------------------------------------------------------------------------- the harness

harness_map = Saga("harness_map")
UNDONE: list[int] = []


@harness_map.map(items=lambda ctx: ctx.input["xs"], concurrency=2)
def square(ctx):
    if ctx.item == ctx.input.get("bad"):
        from sagaflow import NonRetryableError

        raise NonRetryableError(f"item {ctx.item_index} is bad")
    return ctx.item * ctx.item


@square.compensation
def unsquare(ctx):
    UNDONE.append(ctx.item_index)


def test_a_map_runs_in_the_testing_harness_as_on_a_worker():
    from sagaflow.testing import SagaHarness

    with SagaHarness() as harness:
        run = harness.run("harness_map", {"xs": [3, 1, 2]})
        assert run.status == "succeeded" and run.step("square").result == [9, 1, 4]
        UNDONE.clear()
        failed = harness.run("harness_map", {"xs": [3, 1, 2, 5, 6], "bad": 5})
        assert failed.status == "compensated" and "item 3 failed" in failed.step("square").error
        # every item that completed (before item 3 failed, or beside it: a late success) is undone, once
        from sagaflow.app import get_store

        items = get_store().map_summary(failed.id)[0]["items"]
        completed = {it["item"] for it in items if it["status"] == "compensated"}
        assert completed and sorted(UNDONE) == sorted(completed) and 3 not in completed
        assert {it["status"] for it in items} <= {"compensated", "failed", "skipped"}


def test_a_forward_retry_of_a_map_past_its_pivot_runs_its_failed_and_skipped_items_again(store):
    s = store.transactional
    s.create_run("r1", "maps", 1, {}, [StepSpec("commit", False, pivot=True),
                                       StepSpec("each", False, kind="map", non_atomic=True)])
    assert s.claim_step("r1", 0, "t0:0", [], LEASE).outcome is C.CLAIMED
    assert s.complete_step("r1", 0, "t0:0", None)
    assert s.claim_step("r1", 1, "tm:0", [], LEASE).outcome is C.CLAIMED
    s.start_map("r1", 1, "tm:0", [0, 1, 2], 2, LEASE)
    run_item(s, 0, "zero")
    assert s.claim_item("r1", 1, 1, "i1:0", [], LEASE, 2).outcome is C.CLAIMED
    assert s.fail_item("r1", 1, 1, "i1:0", "boom", 2, LEASE).decision == "waiting"  # item 2 handed out
    assert s.claim_item("r1", 1, 2, "i2:0", [], LEASE, 2).after.decision == "failed"  # skipped: the map fails
    assert s.stop_past_pivot("r1", 1, "lost") is not None and s.get_run("r1").status == "stuck"
    assert s.request_forward_retry("r1")[0] == 1
    assert s.map_summary("r1")[1]["counts"] == {"succeeded": 1, "pending": 2}
    assert s.claim_step("r1", 1, "tm2:0", [], LEASE).outcome is C.CLAIMED
    again = s.start_map("r1", 1, "tm2:0", None, 2, LEASE)
    assert (again.decision, again.items) == ("dispatch", (1, 2))
    assert s.claim_item("r1", 1, 1, "j1:0", [], LEASE, 2).attempt == 1  # a new round of its retry policy
