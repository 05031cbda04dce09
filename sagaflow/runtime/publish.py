"""The only place that sends Celery messages: it turns what the store decided into messages.

The store decides (a guarded transition, committed) and returns an outcome; the runtime reads the outcome and
calls one of these functions. Each one raises when the broker refuses, which is what a caller that must
answer for it wants (the client's ``start`` deletes the run again; an errback is delivered again; the sweeper
tries at its next sweep). A caller whose transition is already committed and must not fail wraps the call in
``or_log(...)``: the refusal is logged (``<what>_not_published``) and the recovery sweeper re-drives the run
from SQL after SAGAFLOW_STALL_TIMEOUT.

The messages themselves are built by the compiler (runtime/compiler.py), which publishes nothing.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

from celery import Celery
from celery.signals import task_postrun, task_prerun

from sagaflow.app import celery_app, get_settings, get_store
from sagaflow.model.definition import Saga, registry
from sagaflow.model.outcomes import Promoted
from sagaflow.runtime import compiler
from sagaflow.runtime.outcomes import describe
from sagaflow.store.limits import run_key

log = logging.getLogger("sagaflow.publish")


@contextmanager
def or_log(logger: logging.Logger, event: str, fields: dict, next: str | None = None) -> Iterator[None]:
    """Run the block that publishes; if it raises, log ``event`` with ``fields``, the error and what happens
    ``next``, and go on: what the block publishes follows a transition that is committed already."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - committed in SQL: the sweeper re-drives the run from there
        extra = {**fields, "error": describe(exc)}
        if next is not None:
            extra["next"] = next
        logger.error(event, extra=extra)


# ---------------------------------------------------------------------------------------------- priority
#
# A run's priority (client.start(priority=0..9), 9 served first; none given: 0) rides on every message of
# the run: the first chain is published with it, and every message a task publishes while it runs (the next
# window, the compensations its errback publishes, a retry, the link errbacks stamped on each link) takes
# the priority of the message that task came in with. Redis serves the *lowest* number first (kombu's
# priority steps, SAGAFLOW's transport options give it all ten), RabbitMQ the highest (a queue declared with
# x-max-priority: SAGAFLOW_RABBITMQ_PRIORITY): ``broker_priority`` maps one onto the other. The run's row
# keeps its priority too (saga_runs.priority): a message for a run published anywhere but inside that run's
# own task (the sweeper's re-drives and timers, an operator's retry or signal, a queued run given its slot
# when another run ends, a parent moved on by its child's end) reads it there.

PRIORITIES = range(10)
DEFAULT_PRIORITY = 0
_current = threading.local()


def _redis(app: Celery) -> bool:
    return str(app.conf.broker_url or "").startswith(("redis", "rediss", "sentinel"))


def broker_priority(priority: int, app: Celery | None = None) -> int:
    return 9 - priority if _redis(app or celery_app) else priority


def sagaflow_priority(value, app: Celery | None = None) -> int | None:
    """The run priority a delivered message's broker priority stands for (None: it carried none)."""
    if not isinstance(value, int) or value not in PRIORITIES:
        return None
    return 9 - value if _redis(app or celery_app) else value


@task_prerun.connect
def _priority_of_the_delivery(sender=None, task=None, args=None, kwargs=None, **_):
    request = getattr(task, "request", None)
    info = getattr(request, "delivery_info", None) or {}
    _current.value = sagaflow_priority(info.get("priority"), getattr(task, "app", None))
    # The run the task works for: kwargs run_id (steps, compensations, finish), else its first argument
    # (the errbacks: run id and step; child_finished: the child's id, so the parent's priority is read).
    run_id = (kwargs or {}).get("run_id")
    if run_id is None and args and isinstance(args[0], str):
        run_id = args[0]
    _current.run_id = run_id


@task_postrun.connect
def _priority_done(**_):
    _current.value = None
    _current.run_id = None


def current_priority() -> int:
    """The priority of what this process publishes now: the running task's, else the default."""
    value = getattr(_current, "value", None)
    return DEFAULT_PRIORITY if value is None else value


@contextmanager
def priority(value: int | None, run_id: str | None = None) -> Iterator[None]:
    """Publish at ``value`` inside the block (client.start: the new run's priority, for ``run_id``)."""
    previous = (getattr(_current, "value", None), getattr(_current, "run_id", None))
    _current.value, _current.run_id = value, run_id
    try:
        yield
    finally:
        _current.value, _current.run_id = previous


def priority_of(run_id: str | None) -> int:
    """What a message for ``run_id`` goes at: inside that run's own task (or its start), the priority it came
    with, read from nothing; anywhere else the run's own, from its row (one read, off the hot path). A read
    that fails gives the default: priority orders work, it never holds any back."""
    if run_id is None or getattr(_current, "run_id", None) == run_id:
        return current_priority()
    try:
        return get_store().run_priority(run_id)
    except Exception as exc:  # noqa: BLE001 - the message still goes, at the default priority
        log.warning("priority_not_read", extra={"run_id": run_id, "error": describe(exc)})
        return DEFAULT_PRIORITY


def _stamped(canvas, app: Celery, run_id: str | None = None):
    """Set the priority of ``run_id`` on every message of ``canvas``: each link, and each link's errbacks."""
    value = broker_priority(priority_of(run_id), app)
    for signature in getattr(canvas, "tasks", None) or [canvas]:
        # A Signature is a dict; a link or errback may also be a plain dict (a deserialized signature).
        options = signature.setdefault("options", {})
        options["priority"] = value
        for errback in options.get("link_error") or ():
            if isinstance(errback, dict):
                errback.setdefault("options", {})["priority"] = value
    return canvas


# ---------------------------------------------------------------------------------------------- messages


def start(saga: Saga, run_id: str, *, plain: bool = False, input: dict | None = None,
          app: Celery | None = None, priority_: int | None = None, producer=None) -> None:
    """A new run's first chain, at priority ``priority_`` (None: the default). Raises when the broker refuses
    (the client deletes the run again). ``producer``: a kombu producer to send on (client.start_many's one
    connection for its batch); None: one from the app's pool."""
    with priority(priority_, run_id):
        if plain:
            chain_from(saga, run_id, plain=True, input=input, app=app, producer=producer)
        else:
            chain_from(saga, run_id, app=app, producer=producer)


def chain_from(saga: Saga, run_id: str, start: int = 0, results: dict | None = None, *, plain: bool = False,
               input: dict | None = None, app: Celery | None = None, producer=None) -> None:
    """The forward chain of ``run_id`` from step ``start`` (compiler.compile_run): the next window, the steps
    after a joined group, a resumed run, a gate passed; ``start == len(saga.steps)``: the finish task."""
    app = app or celery_app
    canvas = _stamped(compiler.compile_run(app, saga, run_id, start=start, results=results, plain=plain,
                                           input=input), app, run_id)
    if producer is None:
        canvas.apply_async()
    else:
        canvas.apply_async(producer=producer)


def map_items(saga: Saga, run_id: str, index: int, items, app: Celery | None = None) -> None:
    """One message per item of a map step (compiler.map_items): its window refilled, or items re-driven."""
    if not items:
        return
    app = app or celery_app
    _stamped(compiler.map_items(app, saga, run_id, index, items), app, run_id).apply_async()


def compensations(saga: Saga, run_id: str, indexes, app: Celery | None = None) -> None:
    """The compensations ``indexes`` of ``run_id``, in that order (latest completed first)."""
    app = app or celery_app
    _stamped(compiler.compile_compensation(app, saga, run_id, list(indexes)), app, run_id).apply_async()


def compensations_of(run_id: str, indexes, saga: str | None = None, version: int | None = None,
                     app: Celery | None = None) -> None:
    """``compensations`` when only the run id is known (an operator's retry): the saga is read from SQL."""
    if saga is None or version is None:
        run = get_store().get_run(run_id, history=False)
        saga, version = run.saga, run.saga_version
    compensations(registry.get(saga, version), run_id, indexes, app=app)


def errback(run_id: str, index: int, saga: str, version: int) -> None:
    """``sagaflow.on_step_failed`` for step ``index``, outside a chain: it begins the compensation."""
    _stamped(compiler.step_errback(celery_app, run_id, index, saga, version), celery_app, run_id).apply_async()


def compensation_errback(run_id: str, index: int) -> None:
    """``sagaflow.on_compensation_failed`` for step ``index``: its undo gave up; the run ends
    compensation_failed (the sweeper, when the errback the compensation fired was lost)."""
    _stamped(compiler.compensation_errback(celery_app, run_id, index), celery_app, run_id).apply_async()


def finish_compensation(run_id: str) -> None:
    """``sagaflow.finish_compensation``: every undo is done, only the run's end is left (the sweeper)."""
    _stamped(compiler.finish_compensation(celery_app, run_id), celery_app, run_id).apply_async()


def child_finished(child_run_id: str) -> None:
    """``sagaflow.child_finished``: a child run ended; its parent moves on."""
    _stamped(compiler.child_finished(celery_app, child_run_id), celery_app, child_run_id).apply_async()


def _child_sagas() -> set[str]:
    return {step.child_saga for saga in registry.all() for step in saga.steps
            if step.runs_children and step.child_saga is not None}  # a child step, or a map of child runs


def run_ended(run_id: str, saga: str | None = None) -> None:
    """A run reached a final status (or finished undoing): if it is a child run, tell its parent. ``saga``
    given and never named by a child step in this process: no parent to tell, and no read (the linear
    fast path stays as it was). Never raises: the transition is committed; a lost message is re-published
    by the sweeper (runtime/waits.py ``sweep``)."""
    _free_run_slot(run_id, saga)
    if saga is not None and saga not in _child_sagas():
        return
    fields = {"run_id": run_id}
    parent = None
    with or_log(log, "child_finished_not_published", fields,
                next="the recovery sweeper tells the parent after SAGAFLOW_STALL_TIMEOUT"):
        parent = get_store().parent_of(run_id)
        if parent is not None:
            child_finished(run_id)
            log.info("child_finished_published", extra={"run_id": run_id, "parent_run_id": parent})


def promoted(waiters: list[Promoted]) -> None:
    """The chain of each run or step that got a slot under a limit (store/limits.py), from its step. One the
    broker refuses is re-driven by the recovery sweeper (its run is live and nothing moves it). Never
    raises: the slot is reserved in SQL already."""
    for waiter in waiters:
        fields = {"run_id": waiter.run_id, "from_step": waiter.index}
        with or_log(log, "queued_not_published", fields,
                    next="the recovery sweeper re-drives the run after SAGAFLOW_STALL_TIMEOUT"):
            chain_from(registry.get(waiter.saga, waiter.version), waiter.run_id, start=waiter.index,
                       results=waiter.results)
            log.info("slot_handed_over", extra=fields)


def _free_run_slot(run_id: str, saga: str | None) -> None:
    """A run ended: if its saga has max_concurrent_runs, its slot is free; the earliest queued run gets it.
    No read at all when no registered saga has that limit. Never raises (the sweeper promotes what this
    misses: runtime/limits.py promote_all)."""
    limits = {s.name: s.max_concurrent_runs for s in registry.all() if s.max_concurrent_runs}
    if not limits or (saga is not None and saga not in limits):
        return
    waiters: list[Promoted] = []
    with or_log(log, "slot_not_promoted", {"run_id": run_id},
                next="the recovery sweeper promotes the next queued run"):
        store = get_store()
        name = saga if saga is not None else store.get_run(run_id, history=False).saga
        if name in limits:
            waiters = store.promote(run_key(name), limits[name], 0.0, get_settings().worker_dead_after)
    promoted(waiters)
