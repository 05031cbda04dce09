"""Map steps (issue 18): an action once per item of a list computed from the context, a bounded number at
once, each item with its own idempotency key, retries and lease; results in item order; compensation per
completed item, then the earlier steps. Real worker, real broker and database."""

from __future__ import annotations

import json
import signal
import time

import pytest
from sqlalchemy import select

from sagaflow.app import celery_app, get_store
from sagaflow.store import tables
from sagaflow.tasks.effects import effects_of
from tests.conftest import ARTIFACTS
from tests.helpers import wait_for
from tests.sagas_maps import KILL_QUEUE, effects, keys, message_sizes
from tests.workers import start_worker, stop_worker

pytestmark = pytest.mark.integration


def _items(run_id: str) -> dict[int, dict]:
    m = tables.map_items.c
    with get_store().engine.connect() as conn:
        return {r.item: dict(status=r.status, attempts=r.attempts, error=r.error, finished_at=r.finished_at)
                for r in conn.execute(select(m.item, m.status, m.attempts, m.error, m.finished_at)
                                      .where(m.run_id == run_id))}


def test_a_map_runs_each_item_once_with_its_own_key_and_collects_results_in_item_order(client):
    items = list(range(12))
    run = client.wait(client.start("map_orders", {"items": items, "flaky_items": [3, 7]}).id, timeout=60)
    assert run.status == "succeeded", run.step("charge").error
    charge = run.step("charge")
    assert charge.result == [{"item": n, "doubled": 2 * n} for n in items]  # item order, not completion order
    assert sorted(i for k, _, i in effects(run.id) if k == "do") == items  # each item once
    assert sorted(keys(run.id)) == sorted(f"{run.id}:charge:{n}" for n in items)
    rows = _items(run.id)
    assert {n: r["attempts"] for n, r in rows.items() if r["attempts"] != 1} == {3: 2, 7: 2}  # its own retries
    assert run.step("confirm").result == {"charged": 12}
    started = [e for e in run.events if e.kind == "map_started"]
    assert [e.detail for e in started] == [{"items": 12, "concurrency": 5}]


def test_fifty_items_where_item_37_fails_every_completed_item_is_undone_once_then_the_earlier_steps(client):
    # Items 35 and 36 are in flight when 37 fails (the window is 5, and they sleep in two of the worker's four
    # processes) and finish after it: late successes, undone too.
    sleeps = {"35": 2.0, "36": 2.0}
    run = client.start("map_orders", {"items": list(range(50)), "fail_items": [37], "sleep_items": sleeps})
    run = client.wait(run.id, timeout=90)
    assert run.status == "compensated", run.status
    done = [i for k, _, i in effects(run.id) if k == "do"]
    undone = [i for k, _, i in effects(run.id) if k == "undo"]
    assert 37 not in done
    assert sorted(done) == sorted(set(done))  # each item ran once
    assert sorted(undone) == sorted(done)  # every completed item undone, once
    rows = _items(run.id)
    late = {n for n in done if rows[n]["finished_at"] > rows[37]["finished_at"]}
    assert {35, 36} <= late  # completed after the failure, and undone
    assert rows[37]["status"] == "failed" and "item 37 failed on purpose" in rows[37]["error"]
    assert {r["status"] for n, r in rows.items() if n in done} == {"compensated"}
    assert {r["status"] for n, r in rows.items() if n not in done and n != 37} <= {"skipped"}
    assert len(done) < 45  # the window stopped: the later items never ran
    charge = run.step("charge")
    assert charge.status == "compensated" and "item 37 failed" in (charge.error or "")
    # then the earlier steps, in reverse order: after the last item's undo comes reserve's
    assert effects_of(run.id) == [("do", "reserve"), ("undo", "reserve")]
    kinds = [(e.kind, e.step) for e in run.events]
    last_item_undo = max(i for i, k in enumerate(kinds) if k == ("compensation_succeeded", "charge"))
    assert kinds.index(("compensation_succeeded", "reserve")) > last_item_undo
    assert run.step("confirm").status == "skipped"


def test_a_later_steps_failure_undoes_every_item_of_the_map(client):
    run = client.wait(client.start("map_orders", {"items": [1, 2, 3], "fail_at": "confirm"}).id, timeout=60)
    assert run.status == "compensated"
    assert sorted(i for k, _, i in effects(run.id) if k == "undo") == [0, 1, 2]
    assert effects_of(run.id)[-1] == ("undo", "reserve")


def test_a_map_over_ten_thousand_no_op_items_completes_with_bounded_messages(client):
    items = [f"item-{n:05d}" for n in range(10_000)]
    list_size = len(json.dumps(items))
    started = time.monotonic()
    run = client.wait(client.start("map_noop", {"items": items}).id, timeout=580)
    took = time.monotonic() - started
    assert run.status == "succeeded", (run.status, run.step("each").error)
    assert run.step("count").result == {"count": 10_000}
    sizes = message_sizes(run.id)
    item_sizes = [size for name, size in sizes if name.endswith(".item")]
    biggest = max(size for _, size in sizes)
    total = sum(size for _, size in sizes)
    print(f"\nmap of 10,000 no-op items: {took:.1f} s, {len(sizes)} messages, {total} bytes in all; "
          f"largest {biggest} bytes (the list is {list_size} bytes); largest item message {max(item_sizes)} bytes")
    assert len(item_sizes) >= 10_000
    assert max(item_sizes) < 2_000  # an item's message names its item by index: no list in it
    # No message carries the list more than once (the start message carries it once, as the input).
    assert biggest < 2 * list_size
    # Had each item's message carried the list, the total would be list_size * 10,000.
    assert total < 5 * list_size + 2_000 * len(sizes)
    with get_store().engine.connect() as conn:
        m = tables.map_items.c
        assert {r.status for r in conn.execute(select(m.status).where(m.run_id == run.id).distinct())} == {"succeeded"}


def test_a_duplicate_delivery_of_a_completed_item_does_not_run_it_again(client):
    run = client.wait(client.start("map_orders", {"items": [10, 20, 30]}).id, timeout=60)
    assert run.status == "succeeded"
    before = effects(run.id)
    log = ARTIFACTS / "worker.log"
    seen = log.read_text().count("map_item_duplicate_ignored") if log.exists() else 0
    celery_app.signature("map_orders.charge.item", kwargs={"run_id": run.id, "index": 1, "item": 1,
                                                           "version": 1}).apply_async()
    wait_for(lambda: log.read_text().count("map_item_duplicate_ignored") > seen, timeout=30,
             what="the duplicate item delivery to be ignored")
    assert effects(run.id) == before
    assert _items(run.id)[1]["attempts"] == 1


def test_items_that_are_not_a_list_fail_the_map_with_a_clear_error(client):
    run = client.wait(client.start("map_from_result", {"ids": {"a": 1}}).id, timeout=60)
    assert run.status == "compensated"
    assert "items must return a list, got dict" in run.step("visit").error
    assert _items(run.id) == {}


def test_a_map_over_an_earlier_steps_result_and_an_empty_list(client):
    run = client.wait(client.start("map_from_result", {"ids": [5, 6, 7]}).id, timeout=60)
    assert run.status == "succeeded"
    assert run.step("visit").result == [{"item": n, "doubled": 2 * n} for n in (5, 6, 7)]
    empty = client.wait(client.start("map_from_result", {"ids": []}).id, timeout=60)
    assert empty.status == "succeeded" and empty.step("visit").result == []


def test_a_cancel_during_a_map_stops_it_and_undoes_the_completed_items(client):
    run = client.start("map_orders", {"items": list(range(30)), "sleep": 0.3})
    wait_for(lambda: len([k for k, _, _ in effects(run.id) if k == "do"]) >= 3, timeout=30, what="items to run")
    client.cancel(run.id)
    run = client.wait(run.id, timeout=60)
    assert run.status == "cancelled"
    done = sorted(i for k, _, i in effects(run.id) if k == "do")
    assert sorted(i for k, _, i in effects(run.id) if k == "undo") == done
    assert len(done) < 30


def test_items_of_a_killed_worker_are_re_driven_through_the_maps_lease(settings, client):
    """A worker that runs the map's items (on their own queue) is SIGKILLed mid-item: no item moves, the
    map step's lease (4 s) runs out, the sweeper resumes the run at the map, and its new delivery re-publishes
    the items whose lease ran out; a new worker runs them. Every item completes, each recorded once."""
    imports = ",".join(dict.fromkeys((*settings.imports, "tests.sagas_maps")))
    doomed = start_worker(settings, "mapdoomed", concurrency=2, log_name="mapdoomed.log", args=("-Q", KILL_QUEUE),
                          env={"SAGAFLOW_IMPORTS": imports})
    rescuer = None
    try:
        run = client.start("map_kill", {"items": list(range(8)), "sleep": 2.0})
        wait_for(lambda: any(r["status"] == "running" for r in _items(run.id).values()), timeout=30,
                 what="an item to run")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        rescuer = start_worker(settings, "maprescuer", concurrency=2, log_name="maprescuer.log",
                               args=("-Q", KILL_QUEUE), env={"SAGAFLOW_IMPORTS": imports})
        run = client.wait(run.id, timeout=120)
        assert run.status == "succeeded", run.status
        done = [i for k, _, i in effects(run.id) if k == "do"]
        assert sorted(done) == list(range(8))  # each item once: the killed one never recorded its effect
        assert any(e.kind == "run_recovered" for e in run.events)
        assert max(r["attempts"] for r in _items(run.id).values()) >= 2  # the killed item ran again
    finally:
        stop_worker(doomed)
        if rescuer is not None:
            stop_worker(rescuer)


def test_a_map_written_in_yaml_runs_and_compensates_its_items(client):
    run = client.wait(client.start("map_yaml", {"ids": [4, 5, 6, 7]}).id, timeout=60)
    assert run.status == "succeeded"
    assert run.step("visit").result == [{"item": n, "doubled": 2 * n} for n in (4, 5, 6, 7)]
    failed = client.wait(client.start("map_yaml", {"ids": [4, 5, 6, 7], "fail_items": [2]}).id, timeout=60)
    assert failed.status == "compensated" and "item 2 failed" in failed.step("visit").error
    done = sorted(i for k, _, i in effects(failed.id) if k == "do")
    assert 2 not in done and sorted(i for k, _, i in effects(failed.id) if k == "undo") == done


def test_an_item_lost_on_every_attempt_its_policy_allows_fails_for_good_instead_of_looping(client):
    """As if item 9 had been killed on each of its 3 attempts (FAST allows 3): its next claim fails it."""
    from sqlalchemy import update

    run = client.start("map_orders", {"items": list(range(10)), "sleep": 0.5})
    m = tables.map_items.c
    wait_for(lambda: 9 in _items(run.id), timeout=30, what="the map's items")
    with get_store().engine.begin() as conn:
        moved = conn.execute(update(tables.map_items).where(m.run_id == run.id, m.item == 9, m.status == "pending")
                             .values(attempts=3)).rowcount
    assert moved == 1
    run = client.wait(run.id, timeout=60)
    assert run.status == "compensated"
    assert "lost" in _items(run.id)[9]["error"] and "item 9 failed" in run.step("charge").error
    assert 9 not in [i for k, _, i in effects(run.id) if k == "do"]
