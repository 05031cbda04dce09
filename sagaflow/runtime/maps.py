"""Map steps: what the map step's own delivery does (compute its items, hand out the first window), and what
follows an item's end (refill the window, publish the steps after the map, fire the map's errback). The item
task's body is in runtime/steps.py with the other per-saga task bodies (``run_item``); every decision is the
store's (store/maps.py), taken under the run lock; this module turns those decisions into messages.

- Each item is its own message (``<saga>.<step>.item``), naming the item by its index: the item itself is
  read from SQL at its claim, so no message carries the list (the map step's own message carries the
  results so far once, as any step's does).
- At most ``concurrency`` items are in flight; each item that ends hands out the next ones, in item order.
- An item that fails for good stops the window; the map fails once nothing of it is in flight, and its
  errback compensates: the map's undo runs once per completed item (late successes included), latest
  completed first, then the earlier steps, latest first.
- A lost item (its worker died, its message was lost) is re-driven when its map's lease runs out: the
  sweeper resumes the run at the map step, whose new delivery re-publishes what was lost.
- A map of child runs (``child=``): an item's task starts the item's child run instead of calling an action
  (runtime/waits.py ``start_item_child``) and ends; the child's end moves the item (Store.child_ended, which
  decides as an item's own end does, with ``window``), and the map's undo compensates each child that
  succeeded, one after the other (runtime/waits.py ``undo_item_child``).
"""

from __future__ import annotations

import logging

from celery.exceptions import Ignore

from sagaflow.app import get_settings
from sagaflow.errors import InvalidInput
from sagaflow.model.definition import Saga, Step, StepContext, registry
from sagaflow.model.outcomes import MapOutcome
from sagaflow.runtime import publish
from sagaflow.runtime.base import lease_seconds
from sagaflow.runtime.outcomes import FailedForGood, describe, traceback_text
from sagaflow.safejson import ensure_json

log = logging.getLogger("sagaflow.maps")

MAX_ITEMS = 100_000  # items of one map step: a longer list is refused (the map step fails)


class MapItemsRefused(InvalidInput):
    """A map step's ``items`` did not return a list of JSON values (or returned too many)."""


def compute_items(step: Step, ctx: StepContext) -> list:
    """The map's items, checked: a list of at most MAX_ITEMS JSON values."""
    assert step.items is not None  # a map step always has one (definition.check_map)
    items = step.items(ctx)
    if not isinstance(items, list):
        raise MapItemsRefused(f"map {step.name!r}: items must return a list, got {type(items).__name__} "
                              f"({items!r:.80})")
    if len(items) > MAX_ITEMS:
        raise MapItemsRefused(f"map {step.name!r}: items returned {len(items)} items, more than {MAX_ITEMS}")
    return ensure_json(items, f"the items of map {step.name!r}", get_settings().json_limits)


def enter(task, store, saga: Saga, step: Step, run_id: str, index: int, token: str, claim, results: dict,
          lease: float):
    """The map step's delivery holds the step: compute its items (the first time), hand out the first
    window and re-drive what an earlier delivery lost. Returns a FailedForGood when the items are refused
    (the errback compensates), else ends the delivery (Ignore): the items move the run on."""
    fields = {"run_id": run_id, "step": step.name}
    items = None
    if not store.map_has_items(run_id, index):
        ctx = StepContext(run_id=run_id, saga=saga.name, step=step.name, input=claim.input, attempt=claim.attempt,
                          idempotency_key=f"{run_id}:{step.name}", results=dict(results))
        try:
            items = compute_items(step, ctx)
        except Exception as exc:  # noqa: BLE001 - the map step fails for good, with the reason recorded
            if store.fail_step(run_id, index, token, describe(exc), traceback_text(exc)):
                log.warning("map_items_refused", extra={**fields, "error": describe(exc)})
                return FailedForGood(exc)
            raise Ignore() from exc
    outcome = store.start_map(run_id, index, token, items, step.map_concurrency, lease)
    if outcome is None:
        raise Ignore()
    if items is not None:
        log.info("map_started", extra={**fields, "items": len(items), "concurrency": step.map_concurrency})
    else:
        log.warning("map_redriven", extra={**fields, "items": len(outcome.items)})
    follow(saga, step, run_id, index, outcome)
    raise Ignore()


def window(saga: str, version: int, index: int) -> tuple[int, float]:
    """The map step's concurrency and an item's lease, for a transition decided outside an item's task (a
    map item's child ended: Store.child_ended)."""
    step = registry.get(saga, version).steps[index]
    return step.map_concurrency or 1, lease_seconds(step)


def follow(saga: Saga, step: Step, run_id: str, index: int, outcome: MapOutcome | None) -> None:
    """Publish what a map's transition decided (MapOutcome). A refused publish is logged: the map's lease
    runs out (or the run stays still) and the recovery sweeper re-drives it from SQL."""
    if outcome is None:
        return
    fields = {"run_id": run_id, "step": step.name}
    decision = outcome.decision
    with publish.or_log(log, "map_not_published", {**fields, "decision": decision},
                        next="the recovery sweeper re-drives the map after its lease or SAGAFLOW_STALL_TIMEOUT"):
        if decision == "dispatch":
            publish.map_items(saga, run_id, index, outcome.items)
        elif decision == "done":
            assert outcome.next_index is not None
            log.info("map_succeeded", extra={**fields, "next_step": saga.steps[outcome.next_index].name})
            publish.chain_from(saga, run_id, start=outcome.next_index, results=outcome.results)
        elif decision == "finished":
            log.info("run_succeeded", extra=fields)
            publish.run_ended(run_id, saga.name)
        elif decision == "failed":
            log.warning("map_failed", extra={**fields, "next": "compensate its completed items, then the run"})
            publish.errback(run_id, index, saga.name, saga.version)
