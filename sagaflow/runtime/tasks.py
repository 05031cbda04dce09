"""The Celery tasks that execute sagas: one task per step and per compensation (their bodies in
runtime/steps.py), plus the generic tasks: on_step_failed, on_compensation_failed, on_plain_failed (the
errbacks); finish and finish_compensation, which the recovery sweeper publishes when only the finishing of a
run is left; child_finished (a child run ended: move its parent on); recover, the sweeper itself.

The task names are a wire contract (messages in flight, Flower, the bench): they are spelled in
runtime/compiler.py and never change.
"""

from __future__ import annotations

import logging
from typing import Callable

from sagaflow import alerts
from sagaflow.app import celery_app, get_settings, get_store
from sagaflow.errors import SagaCancelled, SagaflowError
from sagaflow.model import ClaimOutcome, RunStatus
from sagaflow.model.definition import Saga, StepKind, registry
from sagaflow.runtime import branches, liveness, publish, recovery, waits  # noqa: F401 - liveness: worker signals
from sagaflow.runtime.base import GENERIC_TASK, SagaTask
from sagaflow.runtime.compiler import (
    CHILD_FINISHED,
    FINISH,
    FINISH_COMPENSATION,
    HARD_LIMIT_GRACE,
    ON_COMPENSATION_FAILED,
    ON_PLAIN_FAILED,
    ON_STEP_FAILED,
    RECOVER,
    compensation_task_name,
    item_task_name,
    step_task_name,
)
from sagaflow.runtime.outcomes import DB_OUTAGE, DB_RETRY, LOST_COMPENSATION, LOST_PLAIN, LOST_STEP
from sagaflow.runtime.steps import run_compensation, run_item, run_step

log = logging.getLogger("sagaflow.runtime")


def declare_tasks(saga: Saga) -> None:
    """Registry listener: declare ``<saga>.<step>`` and ``<saga>.<step>.compensate`` Celery tasks.

    A step without a timeout gets SAGAFLOW_DEFAULT_STEP_TIMEOUT as its time limit here, on the worker's
    side; a step's own timeout travels in its messages (compiler.py) and takes precedence."""
    default = get_settings().default_step_timeout
    for step in saga.steps:
        wanted: list[tuple[str, Callable]] = [(step_task_name(saga, step), run_step)]
        if step.compensate is not None or step.runs_children:
            wanted.append((compensation_task_name(saga, step), run_compensation))
        if step.kind is StepKind.MAP:
            wanted.append((item_task_name(saga, step), run_item))
        for name, body in wanted:
            if name not in celery_app.tasks:
                celery_app.task(name=name, bind=True, base=SagaTask, saga_name=saga.name, step_name=step.name,
                                soft_time_limit=default, time_limit=default + HARD_LIMIT_GRACE,
                                shared=False)(body)


registry.listen(declare_tasks)


def _ended(run_id: str, event: str | None, saga: str | None = None) -> None:
    """A generic task saw the run end: log ``event`` (if any) and tell a parent run."""
    if event is not None:
        log.info(event, extra={"run_id": run_id})
    publish.run_ended(run_id, saga)


@celery_app.task(name=FINISH, throws=(SagaCancelled,), **GENERIC_TASK)
def finish(self, results: dict, *, run_id: str) -> None:
    outcome = get_store().finish_run(run_id)
    if outcome is ClaimOutcome.CANCELLED:
        # Step flags: past the pivot the cancel is overruled and the run finishes (None: no pivot succeeded).
        if get_store().transactional.finish_past_pivot(run_id) != RunStatus.SUCCEEDED.value:
            raise SagaCancelled(f"run {run_id} was cancelled before it finished")
        outcome = ClaimOutcome.CLAIMED
    if outcome is ClaimOutcome.CLAIMED:
        _ended(run_id, "run_succeeded")


@celery_app.task(name=ON_STEP_FAILED, **GENERIC_TASK)
def on_step_failed(self, run_id: str, index: int, saga: str | None = None, version: int | None = None) -> None:
    """Errback of every forward link: compensate the steps SQL records as completed, latest first."""
    store = get_store()
    if saga is not None and not registry.get(saga, version).linear:
        store = store.transactional
        if _step_flags_errback(store, registry.get(saga, version), run_id, index):
            return
    todo = store.begin_compensation(run_id, index, LOST_STEP)
    if todo is None:
        if branches.errback_of_late_branch(store, run_id, index, saga, version):
            return  # a branch lost after the compensation began: recorded, nothing to re-publish
        # Another errback began it. Were we redelivered because the worker died before publishing the
        # compensations? Re-publish from where they stand: claims make a second chain harmless.
        todo = store.compensations_to_redrive(run_id)
        if todo is None:
            return
        if not todo:
            if store.finish_compensation(run_id):
                _ended(run_id, None, saga)
            return
        log.info("compensation_redriven", extra={"run_id": run_id, "steps": len(todo)})
    else:
        log.info("compensation_begun", extra={"run_id": run_id, "steps": len(todo)})
        if not todo:  # nothing to undo: the run ended at once
            _ended(run_id, None, saga)
            return
    todo = branches.hold_back(store, run_id, todo, saga, version)  # a group's branches first
    if todo:
        publish.compensations_of(run_id, todo, saga, version)


def _step_flags_errback(store, definition: Saga, run_id: str, index: int) -> bool:
    """on_step_failed for sagas with step flags; True when handled here (nothing to compensate).

    - A best-effort step whose worker was lost: recorded as ``failed_best_effort``, and the run goes on.
    - Past the pivot: the run goes ``stuck`` (nothing undone) and an operator is alerted."""
    if index < len(definition.steps) and definition.steps[index].best_effort:
        outcome = store.best_effort_lost(run_id, index, LOST_STEP)
        if outcome is not None:
            action, results = outcome
            if action == "resume":
                log.warning("step_failed_best_effort", extra={
                    "run_id": run_id, "step": definition.steps[index].name, "error": LOST_STEP,
                    "next": "nothing: the step is best-effort, the run goes on"})
                if definition.steps[index].group is not None:  # a parallel branch: its group's join decides
                    branches.best_effort_branch_lost(store, definition, run_id, index)
                else:
                    publish.chain_from(definition, run_id, start=index + 1, results=results)
            return True
    if any(s.pivot for s in definition.steps):
        stuck = store.stop_past_pivot(run_id, index, LOST_STEP)
        if stuck is not None:
            if stuck:
                alerts.run_stuck(store.get_run(run_id), get_settings().alert_hook)
            return True
    return False


@celery_app.task(name=ON_PLAIN_FAILED, **GENERIC_TASK)
def on_plain_failed(self, run_id: str, index: int) -> None:
    """Errback of a plain run's steps: the run is ``failed`` (nothing is undone). The step that gave up
    recorded its own error already; this covers a worker lost before it could (hard time limit, dead
    process, the database unreachable then)."""
    if get_store().fail_plain_run(run_id, LOST_PLAIN):
        log.warning("run_failed", extra={"run_id": run_id, "index": index, "error": LOST_PLAIN})


@celery_app.task(name=ON_COMPENSATION_FAILED, **GENERIC_TASK)
def on_compensation_failed(self, run_id: str, index: int) -> None:
    store = get_store()
    if store.mark_compensation_failed(run_id, index, LOST_COMPENSATION):
        alerts.compensation_failed(store.get_run(run_id), get_settings().alert_hook)
        _ended(run_id, None)


@celery_app.task(name=RECOVER, **GENERIC_TASK)
def recover(self, stall_timeout: float | None = None) -> int:
    """The beat task: re-drive stalled runs (runtime/recovery.py)."""
    return len(recovery.recover_stalled(stall_timeout))


@celery_app.task(name=FINISH_COMPENSATION, **GENERIC_TASK)
def finish_compensation(self, run_id: str) -> None:
    if get_store().finish_compensation(run_id):
        _ended(run_id, "run_compensated")


@celery_app.task(name=CHILD_FINISHED, bind=True, acks_late=True, ignore_result=True, autoretry_for=DB_OUTAGE,
                 retry_backoff=True, retry_backoff_max=30, max_retries=50)
def child_finished(self, child_run_id: str) -> None:
    """A child run ended (or finished undoing): move its parent on (runtime/waits.py)."""
    waits.child_finished(get_store(), child_run_id)


def check_visibility_timeout(settings) -> None:
    """On Redis, a message unacked for longer than the visibility timeout is delivered again, and a retry
    waits unacked in its worker for its whole countdown: the timeout must exceed the longest countdown plus
    the longest time limit (of an action or of its compensation, whichever is longer), or waiting retries
    run twice (celery-facts.md, section 4). Checked at worker start, against every registered saga."""
    url = settings.effective_broker_url
    if url.startswith("redis"):
        limit, name = settings.visibility_timeout, "SAGAFLOW_VISIBILITY_TIMEOUT"
        harm = "a waiting retry would be delivered twice"
    elif url.startswith(("amqp", "pyamqp")):
        # RabbitMQ redelivers on a dropped connection, not after a timeout; but it closes the channel of a
        # consumer that holds a delivery unacked past its consumer_timeout (30 min by default), which a
        # long step or a long retry countdown does (acks_late).
        limit, name = settings.rabbitmq_consumer_timeout, "SAGAFLOW_RABBITMQ_CONSUMER_TIMEOUT"
        harm = ("RabbitMQ would close the worker's channel (consumer_timeout) and deliver the step again; "
                "raise consumer_timeout in rabbitmq.conf and set SAGAFLOW_RABBITMQ_CONSUMER_TIMEOUT to it")
    else:
        return
    grace = HARD_LIMIT_GRACE
    worst = settings.default_step_timeout + grace + DB_RETRY.max_interval
    where = "a database-outage retry of a step with the default timeout"
    for saga in registry.all():
        for step in saga.steps:
            timeout = step.timeout if step.kind is not StepKind.GATE else None  # a gate's is its deadline
            # A step retry delay of SAGAFLOW_DURABLE_RETRY_AFTER or more waits in SQL (runtime/timers.py),
            # except in a parallel group, where it stays a countdown.
            retry = step.retry.max_interval
            if step.group is None:
                retry = min(retry, settings.durable_retry_after)
            action = (timeout or settings.default_step_timeout) + grace + max(retry, DB_RETRY.max_interval)
            # the undo's own limit (compensation_timeout), or the action's when it has none
            undo = (step.compensation_timeout or timeout or settings.default_step_timeout) + grace + max(
                step.compensation_retry.max_interval, DB_RETRY.max_interval)
            wait = max(action, undo)
            if wait > worst:
                worst, where = wait, f"step {saga.name}.{step.name}"
    if limit <= worst:
        raise SagaflowError(
            f"{name}={limit} s is not above {worst:.0f} s, the longest "
            f"time limit plus retry delay ({where}): {harm}. Raise "
            f"{name}, or lower that step's timeout or max_interval"
        )
