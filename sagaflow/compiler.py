"""Definition + run -> Celery canvas. Pure: builds signatures by task name, publishes nothing.

Forward:  chain(<saga>.<step_0>, ..., <saga>.<step_n-1>)
          each link with link_error = sagaflow.on_step_failed.si(run_id, index)
Backward: chain(<saga>.<step_k>.compensate, ..., <saga>.<step_0>.compensate)
          each compensation with link_error = sagaflow.on_compensation_failed.si(run_id, index)

The last step's completion finishes the run, and the last undo's the compensation, in the same SQL
statement (store/fastpath.py): no extra task per run. sagaflow.finish and sagaflow.finish_compensation
remain for the recovery sweeper, which publishes them alone when only the finishing is left.

Errbacks are immutable signatures of bind=True tasks, so Celery sends them as messages (visible in
Flower) instead of calling them inside the failing process, where an exception would be swallowed.
"""

from __future__ import annotations

from celery import Celery, chain
from celery.canvas import Signature

from sagaflow.definition import Saga, Step

FINISH = "sagaflow.finish"
ON_STEP_FAILED = "sagaflow.on_step_failed"
FINISH_COMPENSATION = "sagaflow.finish_compensation"
ON_COMPENSATION_FAILED = "sagaflow.on_compensation_failed"
RECOVER = "sagaflow.recover"  # the recovery sweeper, scheduled by beat
CHAIN_WINDOW = 8  # steps per published chain (compile_run)
HARD_LIMIT_GRACE = 5.0  # seconds between the soft time limit (exception in the step) and the hard kill


def step_task_name(saga: Saga, step: Step) -> str:
    return f"{saga.name}.{step.name}"


def compensation_task_name(saga: Saga, step: Step) -> str:
    return f"{saga.name}.{step.name}.compensate"


def _limits(step: Step) -> dict:
    options = {}
    if step.timeout:
        options.update(soft_time_limit=step.timeout, time_limit=step.timeout + HARD_LIMIT_GRACE)
    if step.queue:
        options["queue"] = step.queue
    return options


def _on_step_failed(app: Celery, saga: Saga, run_id: str, index: int) -> Signature:
    # The saga's name and version ride along, so the errback compiles the compensations without reading
    # the run back.
    return app.signature(ON_STEP_FAILED, args=(run_id, index), kwargs={"saga": saga.name, "version": saga.version},
                         immutable=True)


def compile_run(app: Celery, saga: Saga, run_id: str, start: int = 0, results: dict | None = None,
                window: int = CHAIN_WINDOW) -> Signature:
    """The forward chain from step ``start`` (the recovery sweeper resumes a run there, with the results
    of the steps before it read from SQL), ``window`` steps at most: the window's last step, marked
    ``window_end``, publishes the next window once its result is committed. A Celery chain carries every
    remaining link in each message; windows keep a long saga's messages, and its cost per step, flat.
    From ``start == len(saga.steps)``: the finish task alone."""
    n = len(saga.steps)
    if start == n:
        return app.signature(FINISH, args=(results or {},), kwargs={"run_id": run_id},
                             link_error=[_on_step_failed(app, saga, run_id, n)])
    links = []
    end = min(n, start + window)
    for index, step in enumerate(saga.steps[start:end], start):
        # The first link gets the results so far; later links receive the previous link's return.
        args = (results or {},) if index == start else ()
        kwargs = {"run_id": run_id, "index": index, "version": saga.version}
        if index == end - 1 < n - 1:
            kwargs["window_end"] = True
        links.append(
            app.signature(step_task_name(saga, step), args=args, kwargs=kwargs,
                          link_error=[_on_step_failed(app, saga, run_id, index)],
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
                          link_error=[app.signature(ON_COMPENSATION_FAILED, args=(run_id, index), immutable=True)],
                          **_limits(step))
        )
    return chain(*links)
