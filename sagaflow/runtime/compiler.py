"""Definition + run -> Celery canvas. Pure: builds signatures by task name, publishes nothing.

Forward:  chain(<saga>.<step_0>, ..., <saga>.<step_n-1>)
          each link with link_error = sagaflow.on_step_failed.si(run_id, index) (a linear saga's step that
          fails in its own task publishes the compensations itself and drops it: runtime/steps.py)
Backward: chain(<saga>.<step_k>.compensate, ..., <saga>.<step_0>.compensate)
          each compensation with link_error = sagaflow.on_compensation_failed.si(run_id, index)

A chain stops early, and its last link (marked ``window_end``) publishes what comes next once its result is
committed, at: every CHAIN_WINDOW steps; a gate or a child step (it may wait: whoever ends the wait
publishes the rest from SQL); the step before a parallel group. A group is no chain and no chord
(celery-facts.md section 3): each branch is published as its own message (``Fanout``), records its outcome
in SQL, and the branch that completes the group publishes the rest.

Every message the runtime sends is built here; runtime/publish.py sends them.

The last step's completion finishes the run, and the last undo's the compensation, in the same SQL
statement (store/fastpath.py): no extra task per run. sagaflow.finish and sagaflow.finish_compensation
remain for the recovery sweeper, which publishes them alone when only the finishing is left.

Errbacks are immutable signatures of bind=True tasks, so Celery sends them as messages (visible in
Flower) instead of calling them inside the failing process, where an exception would be swallowed.
"""

from __future__ import annotations

from celery import Celery, chain
from celery.canvas import Signature

from sagaflow.model.definition import Saga, Step, StepKind

FINISH = "sagaflow.finish"
ON_STEP_FAILED = "sagaflow.on_step_failed"
FINISH_COMPENSATION = "sagaflow.finish_compensation"
ON_COMPENSATION_FAILED = "sagaflow.on_compensation_failed"
ON_PLAIN_FAILED = "sagaflow.on_plain_failed"  # the errback of a plain run (policy: compensation off)
RECOVER = "sagaflow.recover"  # the recovery sweeper, scheduled by beat
CHILD_FINISHED = "sagaflow.child_finished"  # a child run ended: move its parent on (runtime/waits.py)
CHAIN_WINDOW = 8  # steps per published chain (compile_run)
HARD_LIMIT_GRACE = 5.0  # seconds between the soft time limit (exception in the step) and the hard kill


def step_task_name(saga: Saga, step: Step) -> str:
    return f"{saga.name}.{step.name}"


def compensation_task_name(saga: Saga, step: Step) -> str:
    return f"{saga.name}.{step.name}.compensate"


def item_task_name(saga: Saga, step: Step) -> str:
    """A map step's item: ``<saga>.<step>.item`` (runtime/maps.py)."""
    return f"{saga.name}.{step.name}.item"


def _limits(step: Step, compensation: bool = False) -> dict:
    """The message's time limits (and queue). An undo has its own limit with ``compensation_timeout``; without
    one it reuses the action's ``timeout``."""
    options: dict = {}
    timeout = step.timeout if step.kind is not StepKind.GATE else None  # a gate's timeout is its deadline
    if compensation and getattr(step, "compensation_timeout", None):
        timeout = step.compensation_timeout
    if timeout:
        options.update(soft_time_limit=timeout, time_limit=timeout + HARD_LIMIT_GRACE)
    if step.queue:
        options["queue"] = step.queue
    return options


def step_errback(app: Celery, run_id: str, index: int, saga: str, version: int) -> Signature:
    """``sagaflow.on_step_failed`` for step ``index``: the link_error of every forward link, and the message the
    runtime publishes itself when a step fails outside a chain (a gate's deadline, a lost branch...). The
    saga's name and version ride along, so the errback compiles the compensations without reading the run."""
    return app.signature(ON_STEP_FAILED, args=(run_id, index), kwargs={"saga": saga, "version": version},
                         immutable=True)


def _on_step_failed(app: Celery, saga: Saga, run_id: str, index: int) -> Signature:
    return step_errback(app, run_id, index, saga.name, saga.version)


def compensation_errback(app: Celery, run_id: str, index: int) -> Signature:
    """``sagaflow.on_compensation_failed`` for step ``index``: the link_error of every compensation, and the
    message the recovery sweeper publishes again when an undo gave up and that errback was lost."""
    return app.signature(ON_COMPENSATION_FAILED, args=(run_id, index), immutable=True)


def finish_compensation(app: Celery, run_id: str) -> Signature:
    return app.signature(FINISH_COMPENSATION, args=(run_id,), immutable=True)


def child_finished(app: Celery, child_run_id: str) -> Signature:
    return app.signature(CHILD_FINISHED, args=(child_run_id,), immutable=True)


class Fanout:
    """The branches of a parallel group, each published as its own message (no Celery group or chord)."""

    def __init__(self, branches: list[Signature]) -> None:
        self.tasks = branches

    def apply_async(self, **options) -> None:
        for branch in self.tasks:
            branch.apply_async(**options)


def map_items(app: Celery, saga: Saga, run_id: str, index: int, items) -> Fanout:
    """The messages of a map step's ``items`` (their indexes), one each. A message names its item by index
    only: the item itself is read from SQL, so no message carries the list. No errback: an item records its
    own failure, and a lost one is re-driven through its map's lease (store/maps.py)."""
    step = saga.steps[index]
    return Fanout([
        app.signature(item_task_name(saga, step), kwargs={"run_id": run_id, "index": index, "item": item,
                                                          "version": saga.version},
                      immutable=True, **_limits(step))
        for item in items
    ])


def segment_end(saga: Saga, start: int, window: int = CHAIN_WINDOW) -> int:
    """The index after the last step of the chain that starts at ``start`` (not a group's first step)."""
    end = min(len(saga.steps), start + window)
    for index in range(start, end):
        step = saga.steps[index]
        if step.group is not None:
            return index  # the group is published by the step before it
        if step.kind is not StepKind.ACTION:
            return index + 1  # a gate or child step may wait: it ends the chain
    return end


def _on_plain_failed(app: Celery, run_id: str, index: int) -> Signature:
    return app.signature(ON_PLAIN_FAILED, args=(run_id, index), immutable=True)


def compile_run(app: Celery, saga: Saga, run_id: str, start: int = 0, results: dict | None = None,
                window: int = CHAIN_WINDOW, *, plain: bool = False, input: dict | None = None) -> Signature | Fanout:
    """The forward chain from step ``start`` (the recovery sweeper resumes a run there, with the results
    of the steps before it read from SQL), ``window`` steps at most (see segment_end): the chain's last
    step, marked ``window_end``, publishes the next one once its result is committed. A Celery chain carries
    every remaining link in each message; windows keep a long saga's messages, and its cost per step, flat.
    From a parallel group's first step: its branches (Fanout). From ``start == len(saga.steps)``: the finish
    task alone.

    ``plain``: the run's compensation is off by policy (sagaflow/model/policy.py): the same step tasks with
    ``plain=True`` and the run's ``input`` in their kwargs (they read nothing from SQL), each with the
    errback ``sagaflow.on_plain_failed``. No gates, child steps or groups there (policy refuses them)."""
    n = len(saga.steps)
    if start == n:
        return app.signature(FINISH, args=(results or {},), kwargs={"run_id": run_id},
                             link_error=[_on_step_failed(app, saga, run_id, n)])
    first = saga.steps[start]
    if first.group is not None:
        return Fanout([
            app.signature(step_task_name(saga, saga.steps[index]), args=(results or {},),
                          kwargs={"run_id": run_id, "index": index, "version": saga.version, "branch": True},
                          link_error=[_on_step_failed(app, saga, run_id, index)], **_limits(saga.steps[index]))
            for index in saga.groups()[first.group]
        ])
    links = []
    end = segment_end(saga, start, window)
    for index, step in enumerate(saga.steps[start:end], start):
        # The first link gets the results so far; later links receive the previous link's return.
        args = (results or {},) if index == start else ()
        kwargs = {"run_id": run_id, "index": index, "version": saga.version}
        if index == end - 1 < n - 1:
            kwargs["window_end"] = True
        if plain:
            kwargs.update(plain=True, input=input or {})
        errback = _on_plain_failed(app, run_id, index) if plain else _on_step_failed(app, saga, run_id, index)
        links.append(
            app.signature(step_task_name(saga, step), args=args, kwargs=kwargs, link_error=[errback],
                          **_limits(step))
        )
    return chain(*links)


def compile_compensation(app: Celery, saga: Saga, run_id: str, indexes: list[int]) -> Signature:
    """``indexes`` in the order to undo them (latest completed first)."""
    links = []
    for index in indexes:
        step = saga.steps[index]
        links.append(
            app.signature(compensation_task_name(saga, step),
                          kwargs={"run_id": run_id, "index": index, "version": saga.version},
                          immutable=True,
                          link_error=[compensation_errback(app, run_id, index)],
                          **_limits(step, compensation=True))
        )
    return chain(*links)
