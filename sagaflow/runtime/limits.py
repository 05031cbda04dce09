"""The runtime's side of the limits across workers (store/limits.py decides, in SQL).

Before a step claims (runtime/steps.py), ``enter`` asks for what the definition limits: the run's slot at
its first step (``Saga(max_concurrent_runs=)``), a start under the step's ``rate_limit``, a slot under its
``concurrency``. Over a limit, the delivery ends and holds no worker process: a run or step over a slot
limit waits in line (``queued``) and is published again when a slot frees (``promote``: by the step that
releases it, by the end of a run, or by the sweeper when a holder died); a step over its rate limit is
scheduled again (a countdown, the message kept by the broker or the worker's timer, never a pool process)
for when the window has room. After the step's delivery, ``leave`` gives its slot back and publishes the
waiters that got one.

A step with no limit costs nothing here: no statement, no read.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from celery.exceptions import Ignore

from sagaflow.app import get_settings, get_store
from sagaflow.errors import UnknownSaga
from sagaflow.model.definition import Saga, Step, registry
from sagaflow.model.outcomes import SlotOutcome
from sagaflow.runtime import publish
from sagaflow.runtime.compiler import HARD_LIMIT_GRACE
from sagaflow.runtime.outcomes import DB_OUTAGE, LEASE_MARGIN, describe
from sagaflow.store.limits import RUN_SLOT, run_key, step_key

log = logging.getLogger("sagaflow.limits")


@dataclass
class Slot:
    """A step's slot under its concurrency, held by this delivery (``fresh``: acquired by it) or reserved
    for it. ``claimed``: this delivery claimed the step, so it gives the slot back at its end."""

    key: str
    capacity: int
    run_id: str
    index: int
    lease: float
    fresh: bool
    claimed: bool = False


def limited(saga: Saga, step: Step, index: int) -> bool:
    return bool(step.concurrency or step.rate_limit or (index == 0 and saga.max_concurrent_runs))


def slot_lease(step: Step) -> float:
    """How long a slot reserved for a waiter (or held by a step) counts without its holder renewing it: the
    step's lease (SagaTask.lease_seconds)."""
    if step.lease:
        return step.lease
    return (step.timeout or get_settings().default_step_timeout) + HARD_LIMIT_GRACE + LEASE_MARGIN


def enter(task, saga: Saga, step: Step, run_id: str, index: int) -> Slot | None:
    """Ask for the run's slot (first step), a rate start and a concurrency slot. Raises Ignore when the
    step waits in line, a Celery Retry (a countdown) when it waits for its rate window."""
    if not limited(saga, step, index):
        return None
    store = get_store()
    dead_after = get_settings().worker_dead_after
    fields = {"run_id": run_id, "step": step.name}
    lease = slot_lease(step)
    if index == 0 and saga.max_concurrent_runs:
        key = run_key(saga.name)
        outcome = store.acquire_slot(key, saga.max_concurrent_runs, run_id, RUN_SLOT, saga.name, saga.version,
                                     lease, dead_after)
        if outcome is SlotOutcome.QUEUED:
            log.info("run_queued", extra={**fields, "limit": key, "max_concurrent_runs": saga.max_concurrent_runs})
            raise Ignore()
    if step.rate_limit:
        key = step_key(saga.name, step.name)
        wait = store.take_rate(key, step.rate_limit.count, step.rate_limit.period, run_id, index,
                               queued=bool(task.request.retries))  # only a retry can have waited
        if wait > 0:
            # Spread the waiters over the next window, so they do not all come back at the same instant.
            wait += random.uniform(0, step.rate_limit.period / step.rate_limit.count)
            store.queue_step_for_rate(run_id, index, key, wait)
            log.info("step_rate_limited", extra={**fields, "rate_limit": str(step.rate_limit),
                                                 "retry_in": round(wait, 3)})
            raise task.retry(countdown=wait, max_retries=(task.request.retries or 0) + 1)
    if step.concurrency:
        key = step_key(saga.name, step.name)
        outcome = store.acquire_slot(key, step.concurrency, run_id, index, saga.name, saga.version, lease,
                                     dead_after)
        if outcome is SlotOutcome.QUEUED:
            log.info("step_queued", extra={**fields, "limit": key, "concurrency": step.concurrency})
            raise Ignore()
        return Slot(key, step.concurrency, run_id, index, lease, fresh=outcome is SlotOutcome.GRANTED)
    return None


def leave(slot: Slot | None) -> None:
    """The step's delivery ended: give its slot back (unless another delivery of the step holds it) and
    publish the waiters that got a slot. A database outage here leaves the slot to its lease."""
    if slot is None or not (slot.fresh or slot.claimed):
        return
    try:
        promoted = get_store().release_slot(slot.key, slot.capacity, slot.run_id, slot.index, slot.lease,
                                            get_settings().worker_dead_after)
    except DB_OUTAGE as exc:
        log.warning("slot_not_released", extra={"run_id": slot.run_id, "limit": slot.key, "error": describe(exc),
                                                "next": "the slot frees itself when its lease runs out"})
        return
    publish.promoted(promoted)


def promote_all() -> int:
    """Part of every recovery sweep: give the free slots of every limit with a line (a run ended unheard, a
    holder died) to its earliest waiters. Returns how many were published."""
    if not any(saga.max_concurrent_runs or any(step.concurrency for step in saga.steps) for saga in registry.all()):
        return 0  # no slot limit registered here: no read
    store = get_store()
    dead_after = get_settings().worker_dead_after
    count = 0
    for key, saga_name, version, index in store.waiting_keys():
        try:
            saga = registry.get(saga_name, version)
        except UnknownSaga:
            continue  # another deployment's saga: its own workers promote it
        if key.startswith("run:"):
            capacity, lease = saga.max_concurrent_runs, 0.0  # a run's slot lives with the run, not a lease
        else:
            step = saga.steps[index] if 0 <= index < len(saga.steps) else None
            capacity, lease = (step.concurrency, slot_lease(step)) if step is not None else (None, 0.0)
        if not capacity:  # the limit was lifted: everyone in line goes
            capacity = 1_000_000
        promoted = store.promote(key, capacity, lease, dead_after)
        publish.promoted(promoted)
        count += len(promoted)
    return count
