"""The Celery tasks that execute sagas: one task per step and per compensation, plus the generic tasks
(on_step_failed, on_compensation_failed; finish and finish_compensation, which the recovery sweeper
publishes when only the finishing of a run is left; recover, the sweeper itself).

Every task first *claims* its work in SQL (a compare-and-set, see store/repository.py). A delivery that
loses the claim is a duplicate and stops with ``Ignore``: no errback, no chain continuation, nothing
recorded twice. A delivery that finds its step already done carries the stored result on, so a chain
interrupted between commit and publish can be re-driven.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from celery import Task
from celery.exceptions import Ignore, Retry
from celery.signals import worker_init
from sqlalchemy.exc import InterfaceError, OperationalError

from sagaflow import alerts, branches, inbound, recovery, waits
from sagaflow.app import celery_app, get_settings, get_store
from sagaflow.compiler import (
    FINISH,
    FINISH_COMPENSATION,
    HARD_LIMIT_GRACE,
    ON_COMPENSATION_FAILED,
    ON_PLAIN_FAILED,
    ON_STEP_FAILED,
    RECOVER,
    compensation_task_name,
    compile_compensation,
    compile_run,
    step_task_name,
)
from sagaflow.definition import RetryPolicy, Saga, Step, StepContext, StepKind, registry
from sagaflow.errors import AlreadyFailed, InvalidInput, LeaseLost, SagaflowError, NonRetryableError, ResultNotSerializable, SagaCancelled
from sagaflow.store import ClaimOutcome, RunStatus
from sagaflow.inbound import MessageRefused
from sagaflow.safejson import ensure_json

log = logging.getLogger("sagaflow.runtime")

LOST_STEP = ("the step's worker process was lost or hit its hard time limit before it could record an error; "
             "check the worker's log")
LEASE_MARGIN = 2.0  # seconds a lease outlives the hard time limit

LOST_COMPENSATION = ("the compensation's worker process was lost or hit its hard time limit; check the worker's "
                     "log, fix the cause, then `sagaflow retry <run_id>`")


LOST_PLAIN = ("a step of this plain run (compensation off by policy) failed, and its worker was lost or could not "
              "record the error; check the worker's log")


# Connection lost, server restarting, connections terminated: worth trying again, for about 25 minutes.
DB_OUTAGE = (OperationalError, InterfaceError)
DB_RETRY = RetryPolicy(max_attempts=50, initial_interval=0.5, backoff=2.0, max_interval=30.0)


class GuardedTask(Task):
    """Base of every sagaflow task: its messages pass a depth check in the worker's main process before they
    are decoded and pickled for the pool (sagaflow/inbound.py)."""

    abstract = True
    Strategy = "sagaflow.inbound:strategy"


class GenericTask(GuardedTask):
    """Base of the generic tasks (errbacks, finish, the sweeper): a refused message is dropped, logged."""

    abstract = True

    def before_start(self, task_id, args, kwargs):
        reason = inbound.refused(self.request)
        if reason is not None:
            run_id = kwargs.get("run_id") if isinstance(kwargs, dict) else None
            if run_id is None and args and isinstance(args[0], str):
                run_id = args[0]
            log.error("message_dropped", extra={"task": self.name, "task_id": task_id, "run_id": run_id,
                                                "reason": reason})
            raise Ignore()


@worker_init.connect
def _guard_transport(**_):
    inbound.guard_redis_transport(inbound.message_depth_limit(get_settings().json_max_depth))


GENERIC_TASK = dict(base=GenericTask, bind=True, acks_late=True, ignore_result=True, autoretry_for=DB_OUTAGE,
                    retry_backoff=True, retry_backoff_max=30, max_retries=DB_RETRY.max_attempts)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class FailedForGood:
    """The action (or compensation) failed and the failure is recorded: raise it to fire the errback.
    Raised outside the outage handler, so an action's own database error is never mistaken for ours."""

    exc: Exception


class SagaTask(GuardedTask):
    """Base of the per-saga tasks. The saga and step are bound when the task is declared."""

    abstract = True
    acks_late = True
    ignore_result = True
    # Bounds retries after a pool child is lost (task_retry_on_worker_lost); the step's RetryPolicy
    # governs ordinary retries.
    max_retries = 10
    default_retry_delay = 1  # that retry's countdown; Celery's default of 180 s would stall the run
    # Expected outcomes: recorded in SQL and logged by us, no traceback in the worker log.
    throws = (SagaCancelled, NonRetryableError)
    saga_name: str = ""
    step_name: str = ""

    def definition(self, version: int) -> tuple[Saga, Step]:
        saga = registry.get(self.saga_name, version)
        return saga, next(s for s in saga.steps if s.name == self.step_name)

    def tokens(self) -> tuple[str, list[str]]:
        """This delivery's claim token, and those of the earlier retries of the same task."""
        retries = self.request.retries or 0
        return f"{self.request.id}:{retries}", [f"{self.request.id}:{k}" for k in range(retries)]

    @contextmanager
    def database_outage_retries(self):
        """The state store was unreachable: deliver the whole task again later. An outage is not the
        step's failure and must not compensate the run. The claim token makes the redelivery safe."""
        try:
            yield
        except DB_OUTAGE as exc:
            retries = self.request.retries or 0
            delay = DB_RETRY.delay(retries + 1)
            log.warning("database_unreachable",
                        extra={"task": self.name, "retry_in": round(delay, 3), "error": describe(exc)})
            raise self.retry(exc=exc, countdown=delay, max_retries=DB_RETRY.max_attempts)

    def retry_or_give_up(self, exc: Exception, claim, policy: RetryPolicy, phase: str, fields: dict, *,
                         note_retry: Callable[[str, float], bool], give_up: Callable[[str], bool]) -> FailedForGood:
        """The action (phase "step") or compensation raised: schedule a retry if the policy allows, else
        record the failure. The policy counts executions recorded in SQL (per operator-retry round), not
        Celery retries, so a retry after a database outage or a lost process spends none of its budget.
        A delivery that no longer holds the claim records nothing and stops."""
        error = describe(exc)
        attempt = claim.round_attempt
        if policy.allows_retry(exc, attempt):
            delay = policy.delay(attempt)
            if note_retry(error, delay):
                log.info(f"{phase}_retried", extra={**fields, "attempt": attempt, "retry_in": round(delay, 3)})
                raise self.retry(exc=exc, countdown=delay, max_retries=self.request.retries + 1)
            raise Ignore()
        if give_up(error):
            log.warning(f"{phase}_failed", extra={**fields, "attempt": claim.attempt, "error": error})
            return FailedForGood(exc)
        raise Ignore()

    def lease_seconds(self, step: Step) -> float:
        """How long a claim counts as alive without a heartbeat: past the hard time limit by a margin, so a
        step killed at its limit is handled by its errback, not by the recovery sweeper."""
        if step.lease:
            return step.lease
        timeout = step.timeout if step.kind is not StepKind.GATE else None  # a gate's is its deadline
        return (timeout or get_settings().default_step_timeout) + HARD_LIMIT_GRACE + LEASE_MARGIN

    def heartbeat(self, run_id: str, index: int, token: str, lease: float, stop_on_cancel: bool):
        def beat() -> None:
            try:
                held, cancel = get_store().extend_lease(run_id, index, token, lease)
            except DB_OUTAGE as exc:  # a missed beat is not fatal: the lease has some time left
                log.warning("heartbeat_not_recorded", extra={"run_id": run_id, "error": describe(exc)})
                return
            if not held:
                raise LeaseLost(f"run {run_id}: another delivery took over step {index} after its lease expired")
            if cancel and stop_on_cancel:
                raise SagaCancelled(f"run {run_id} was cancelled while the step ran")

        return beat


def store_for(saga: Saga):
    """The linear fast path for plain linear sagas; repository.py's transactions for the rest (gates, child
    steps, parallel groups, step flags), whose transitions decide more than the fast statements do."""
    store = get_store()
    return store if saga.linear else store.transactional


def run_step(self: SagaTask, results: dict, *, run_id: str, index: int, version: int,
             window_end: bool = False, branch: bool = False, plain: bool = False, input: dict | None = None) -> dict:
    """``window_end``: publish the next chain once this step's result is committed. ``branch``: a step of a
    parallel group, published on its own (compiler.Fanout). ``plain``: a run that policy switched to a plain
    chain (no claims, no step rows), with the run's ``input`` in the message."""
    if plain:
        outcome = _run_plain_step(self, results, run_id, index, version, input or {}, inbound.refused(self.request))
        if window_end:
            publish_next_window(run_id, version, self.saga_name, index + 1, outcome, plain=True, input=input)
        return outcome
    with self.database_outage_retries():
        outcome = _run_step(self, results, run_id, index, version, inbound.refused(self.request))
    if isinstance(outcome, FailedForGood):
        raise outcome.exc  # -> link_error -> on_step_failed
    if window_end:
        publish_next_window(run_id, version, self.saga_name, index + 1, outcome)
    return outcome


def publish_next_window(run_id: str, version: int, saga_name: str, start: int, results: dict, *,
                        plain: bool = False, input: dict | None = None) -> None:
    """The step that ends a chain window committed its result: publish the next window. If the broker
    refuses, the run holds no lease and stops moving: the recovery sweeper re-drives it from SQL."""
    try:
        compile_run(celery_app, registry.get(saga_name, version), run_id, start=start, results=results,
                    plain=plain, input=input).apply_async()
    except Exception as exc:  # noqa: BLE001 - the step's success is recorded; never fire its errback now
        log.error("chain_window_not_published",
                  extra={"run_id": run_id, "from_step": start, "error": describe(exc),
                         "next": "the recovery sweeper re-drives the run after SAGAFLOW_STALL_TIMEOUT"})


def run_compensation(self: SagaTask, *, run_id: str, index: int, version: int) -> None:
    with self.database_outage_retries():
        outcome = _run_compensation(self, run_id, index, version, inbound.refused(self.request))
    if isinstance(outcome, FailedForGood):
        raise outcome.exc  # -> link_error -> on_compensation_failed


def _run_step(self: SagaTask, results: dict, run_id: str, index: int, version: int,
              refused: str | None = None) -> dict | FailedForGood:
    """``refused``: the worker refused this message (sagaflow/inbound.py): its arguments were cut, so the step
    fails for good without running, and the run compensates."""
    saga, step = self.definition(version)
    store = store_for(saga)
    token, earlier_tokens = self.tokens()
    lease = self.lease_seconds(step)
    fields = {"run_id": run_id, "step": step.name}
    claim = store.claim_step(run_id, index, token, earlier_tokens, lease)
    if claim.outcome is ClaimOutcome.CANCELLED:
        log.info("step_cancelled", extra=fields)
        raise SagaCancelled(f"run {run_id} was cancelled before step {step.name!r}")
    if claim.outcome is ClaimOutcome.DONE:
        if refused is not None:  # its results were cut: never carry them on (the sweeper re-drives from SQL)
            log.error("message_dropped", extra={**fields, "reason": refused, "outcome": claim.outcome.value})
            raise Ignore()
        log.info("step_already_done", extra=fields)
        return {**results, step.name: claim.result}
    if claim.outcome is ClaimOutcome.FAILED:
        return FailedForGood(AlreadyFailed(f"step {step.name!r} already failed: {claim.error}"))
    if claim.outcome is ClaimOutcome.GONE and step.group is not None:
        branches.stop_waiting_branch(store, run_id, index, token, earlier_tokens, fields)
    if claim.outcome is not ClaimOutcome.CLAIMED:
        log.info("step_duplicate_ignored", extra={**fields, "outcome": claim.outcome.value})
        raise Ignore()
    if refused is not None:
        exc = MessageRefused(refused)
        failed = (branches.give_up(store, run_id, index, token, fields) if step.group is not None
                  else lambda error: store.fail_step(run_id, index, token, error))
        if failed(describe(exc)):
            log.warning("step_failed", extra={**fields, "attempt": claim.attempt, "error": describe(exc)})
            return FailedForGood(exc)
        raise Ignore()
    if step.kind is not StepKind.ACTION:  # a gate or a child step: it may wait (sagaflow/waits.py)
        return waits.enter(self, store, saga, step, run_id, index, token, claim, results, lease)

    # Step flags: past the pivot a cancel is never acted on (the saga can no longer be undone).
    past_pivot = any(s.pivot for s in saga.steps[:index])
    policy = saga.retry_policy(index)
    ctx = StepContext(run_id=run_id, saga=saga.name, step=step.name, input=claim.input, attempt=claim.attempt,
                      idempotency_key=f"{run_id}:{step.name}", results=dict(results),
                      _heartbeat=self.heartbeat(run_id, index, token, lease, stop_on_cancel=not past_pivot))
    if step.group is not None:  # a parallel branch: one errback per group failure (sagaflow/branches.py)
        give_up = branches.give_up(store, run_id, index, token, fields)
    else:
        def give_up(error: str) -> bool:
            return store.fail_step(run_id, index, token, error)
    try:
        value = call_action(step, ctx)
    except (Retry, Ignore):
        raise
    except LeaseLost:
        log.warning("step_lease_lost", extra=fields)
        raise Ignore()
    except SagaCancelled as exc:  # from ctx.heartbeat(): no retry, compensate
        if give_up(describe(exc)):
            return FailedForGood(exc)
        raise Ignore()
    except Exception as exc:
        if step.best_effort and not policy.allows_retry(exc, claim.round_attempt):
            if step.group is not None:  # a best-effort branch: done for its group's join
                return branches.give_up_best_effort(saga, step, store, run_id, index, token, exc, results, fields)
            return _give_up_best_effort(store, saga, step, run_id, index, token, exc, claim, results, fields)
        return self.retry_or_give_up(
            exc, claim, policy, "step", fields,
            note_retry=lambda error, delay: store.retry_step(run_id, index, token, error, delay, lease),
            give_up=give_up,
        )
    if step.group is not None:  # records the result, joins the group or undoes a late branch
        return branches.record_success(saga, step, store, run_id, index, token, value, results, fields)
    if index < len(saga.steps) - 1:
        if not store.complete_step(run_id, index, token, value):
            log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the step"})
            raise Ignore()
        log.info("step_succeeded", extra=fields)
        return {**results, step.name: value}
    status = store.complete_last_step(run_id, index, token, value)  # finishes the run too
    if status is None:
        log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the step"})
        raise Ignore()
    if status == RunStatus.RUNNING.value and any(s.pivot for s in saga.steps):
        status = store.finish_past_pivot(run_id) or status  # step flags: past the pivot a cancel is overruled
    if status == RunStatus.RUNNING.value:  # a cancel came in: undo every step, this one included
        return FailedForGood(SagaCancelled(f"run {run_id} was cancelled before it finished"))
    if status != RunStatus.SUCCEEDED.value:  # an errback moved the run on meanwhile: it owns it now
        log.warning("step_result_late", extra={**fields, "run_status": status})
        raise Ignore()
    log.info("run_succeeded", extra=fields)
    waits.run_ended(run_id, saga.name)
    return {**results, step.name: value}


def _give_up_best_effort(store, saga: Saga, step: Step, run_id: str, index: int, token: str, exc: Exception,
                         claim, results: dict, fields: dict) -> dict | FailedForGood:
    """A best-effort step failed for good: record it (``failed_best_effort``) and go on with the next step,
    its result None. Never compensated; no errback. As the last step it finishes the run (``succeeded``)."""
    error = describe(exc)
    last = index == len(saga.steps) - 1
    status = store.fail_best_effort(run_id, index, token, error, finish=last)
    if status is None:
        log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the step"})
        raise Ignore()
    log.warning("step_failed_best_effort", extra={**fields, "attempt": claim.attempt, "error": error,
                                                  "next": "nothing: the step is best-effort, the run goes on"})
    if last and status == RunStatus.RUNNING.value and any(s.pivot for s in saga.steps):
        status = store.finish_past_pivot(run_id) or status
    if last and status == RunStatus.RUNNING.value:  # a cancel came in: compensate, as for any last step
        return FailedForGood(SagaCancelled(f"run {run_id} was cancelled before it finished"))
    if last and status != RunStatus.SUCCEEDED.value:
        log.warning("step_result_late", extra={**fields, "run_status": status})
        raise Ignore()
    if last:
        log.info("run_succeeded", extra=fields)
        waits.run_ended(run_id, saga.name)
    return {**results, step.name: None}


def _run_plain_step(self: SagaTask, results: dict, run_id: str, index: int, version: int, input: dict,
                    refused: str | None = None) -> dict:
    """A step of a plain run (policy: compensation off): the action with its retry policy as Celery retries,
    no claim and no SQL, except the run row at the end: the last step marks it ``succeeded``; a final
    failure marks it ``failed`` with its error, then raises (errback ``sagaflow.on_plain_failed``, which
    covers a worker lost before it could record anything). Nothing is ever compensated."""
    saga, step = self.definition(version)
    attempt = (self.request.retries or 0) + 1
    fields = {"run_id": run_id, "step": step.name, "mode": "plain"}
    ctx = StepContext(run_id=run_id, saga=saga.name, step=step.name, input=input, attempt=attempt,
                      idempotency_key=f"{run_id}:{step.name}", results=dict(results))
    try:
        if refused is not None:  # the worker cut this message's arguments (sagaflow/inbound.py): never run it
            raise MessageRefused(refused)
        value = call_action(step, ctx)
    except (Retry, Ignore):
        raise
    except Exception as exc:
        if step.retry.allows_retry(exc, attempt):
            delay = step.retry.delay(attempt)
            log.info("step_retried", extra={**fields, "attempt": attempt, "retry_in": round(delay, 3)})
            raise self.retry(exc=exc, countdown=delay, max_retries=self.request.retries + 1)
        if not step.best_effort or isinstance(exc, MessageRefused):
            error = describe(exc)
            log.warning("step_failed", extra={**fields, "attempt": attempt, "error": error})
            try:
                get_store().fail_plain_run(run_id, f"step {step.name!r} failed: {error}")
            except DB_OUTAGE as db_exc:  # the errback tries again
                log.warning("database_unreachable", extra={**fields, "error": describe(db_exc)})
            raise
        log.warning("step_failed_best_effort", extra={**fields, "attempt": attempt, "error": describe(exc),
                                                      "next": "nothing: the step is best-effort, the run goes on"})
        value = None
    results = {**results, step.name: value}
    if index == len(saga.steps) - 1:
        with self.database_outage_retries():
            get_store().finish_plain_run(run_id)
        log.info("run_succeeded", extra=fields)
    return results


def call_action(step: Step, ctx: StepContext):
    """The step's action, and its result as JSON data (ResultNotSerializable if it is not JSON)."""
    value = step.action(ctx)
    try:
        return ensure_json(value, f"the result of step {step.name!r}", get_settings().json_limits)
    except InvalidInput as exc:
        raise ResultNotSerializable(f"{exc}; return a dict, list, str, number, bool or None") from None


def _run_compensation(self: SagaTask, run_id: str, index: int, version: int,
                      refused: str | None = None) -> FailedForGood | None:
    """``refused``: the worker refused this message (sagaflow/inbound.py): the compensation fails for good
    without running (``compensation_failed``: an operator's ``sagaflow retry`` publishes a sound message)."""
    saga, step = self.definition(version)
    store = store_for(saga)
    token, earlier_tokens = self.tokens()
    lease = self.lease_seconds(step)
    fields = {"run_id": run_id, "step": step.name}
    claim = store.claim_compensation(run_id, index, token, earlier_tokens, lease)
    if claim.outcome is ClaimOutcome.DONE:
        return None
    if claim.outcome is ClaimOutcome.FAILED:
        return FailedForGood(AlreadyFailed(f"compensation of {step.name!r} already failed: {claim.error}"))
    if claim.outcome is not ClaimOutcome.CLAIMED:
        log.info("compensation_duplicate_ignored", extra={**fields, "outcome": claim.outcome.value})
        raise Ignore()
    if refused is not None:
        exc = MessageRefused(refused)
        if store.fail_compensation(run_id, index, token, describe(exc)):
            log.warning("compensation_failed", extra={**fields, "attempt": claim.attempt, "error": describe(exc)})
            return FailedForGood(exc)
        raise Ignore()
    if step.kind is StepKind.CHILD:  # undo the child run first (sagaflow/waits.py)
        failed = waits.compensate_child(self, store, saga, step, run_id, index, token, claim, lease)
        if failed is not None:
            return failed

    ctx = StepContext(run_id=run_id, saga=saga.name, step=step.name, input=claim.input, attempt=claim.attempt,
                      idempotency_key=f"{run_id}:{step.name}", result=claim.result,
                      _heartbeat=self.heartbeat(run_id, index, token, lease, stop_on_cancel=False))
    try:
        if step.compensate is not None:  # a child step may have none of its own
            step.compensate(ctx)
    except (Retry, Ignore):
        raise
    except LeaseLost:
        log.warning("compensation_lease_lost", extra=fields)
        raise Ignore()
    except Exception as exc:
        return self.retry_or_give_up(
            exc, claim, step.compensation_retry, "compensation", fields,
            note_retry=lambda error, delay: store.retry_compensation(run_id, index, token, error, delay, lease),
            give_up=lambda error: store.fail_compensation(run_id, index, token, error),
        )
    status = store.complete_compensation(run_id, index, token)  # the last undo ends the run too
    if status is None:
        raise Ignore()
    log.info("compensation_succeeded", extra=fields)
    if status in (RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value):
        log.info(f"run_{status}", extra={"run_id": run_id})
        waits.run_ended(run_id, saga.name)
    elif status == RunStatus.COMPENSATING.value:
        branches.after_undo(store, saga, step, run_id)  # the undos that waited for a parallel group
    return None


def declare_tasks(saga: Saga) -> None:
    """Registry listener: declare ``<saga>.<step>`` and ``<saga>.<step>.compensate`` Celery tasks.

    A step without a timeout gets SAGAFLOW_DEFAULT_STEP_TIMEOUT as its time limit here, on the worker's
    side; a step's own timeout travels in its messages (compiler.py) and takes precedence."""
    default = get_settings().default_step_timeout
    for step in saga.steps:
        wanted = [(step_task_name(saga, step), run_step)]
        if step.compensate is not None or step.kind is StepKind.CHILD:
            wanted.append((compensation_task_name(saga, step), run_compensation))
        for name, body in wanted:
            if name not in celery_app.tasks:
                celery_app.task(name=name, bind=True, base=SagaTask, saga_name=saga.name, step_name=step.name,
                                soft_time_limit=default, time_limit=default + HARD_LIMIT_GRACE,
                                shared=False)(body)


registry.listen(declare_tasks)


@celery_app.task(name=FINISH, throws=(SagaCancelled,), **GENERIC_TASK)
def finish(self, results: dict, *, run_id: str) -> None:
    outcome = get_store().finish_run(run_id)
    if outcome is ClaimOutcome.CANCELLED:
        # Step flags: past the pivot the cancel is overruled and the run finishes (None: no pivot succeeded).
        if get_store().transactional.finish_past_pivot(run_id) == RunStatus.SUCCEEDED.value:
            log.info("run_succeeded", extra={"run_id": run_id})
            waits.run_ended(run_id)
            return
        raise SagaCancelled(f"run {run_id} was cancelled before it finished")
    if outcome is ClaimOutcome.CLAIMED:
        log.info("run_succeeded", extra={"run_id": run_id})
        waits.run_ended(run_id)


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
                waits.run_ended(run_id, saga)
            return
        log.info("compensation_redriven", extra={"run_id": run_id, "steps": len(todo)})
    else:
        log.info("compensation_begun", extra={"run_id": run_id, "steps": len(todo)})
    if not todo:  # nothing to undo: the run ended at once
        waits.run_ended(run_id, saga)
    todo = branches.hold_back(store, run_id, todo, saga, version)  # a group's branches first
    if todo:
        publish_compensation(run_id, todo, saga, version)


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
                    compile_run(celery_app, definition, run_id, start=index + 1, results=results).apply_async()
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
        waits.run_ended(run_id)


@celery_app.task(name=RECOVER, **GENERIC_TASK)
def recover(self, stall_timeout: float | None = None) -> int:
    """The beat task: re-drive stalled runs (sagaflow/recovery.py)."""
    return len(recovery.recover_stalled(stall_timeout))


@celery_app.task(name=FINISH_COMPENSATION, **GENERIC_TASK)
def finish_compensation(self, run_id: str) -> None:
    if get_store().finish_compensation(run_id):
        log.info("run_compensated", extra={"run_id": run_id})
        waits.run_ended(run_id)


def check_visibility_timeout(settings) -> None:
    """On Redis, a message unacked for longer than the visibility timeout is delivered again, and a retry
    waits unacked in its worker for its whole countdown: the timeout must exceed the longest countdown plus
    the longest time limit, or waiting retries run twice (celery-facts.md, section 4). Checked at worker
    start, against every registered saga."""
    if not settings.effective_broker_url.startswith("redis"):
        return  # RabbitMQ redelivers on a dropped connection, not after a timeout
    grace = HARD_LIMIT_GRACE
    worst = settings.default_step_timeout + grace + DB_RETRY.max_interval
    where = "a database-outage retry of a step with the default timeout"
    for saga in registry.all():
        for step in saga.steps:
            timeout = step.timeout if step.kind is not StepKind.GATE else None  # a gate's is its deadline
            wait = (timeout or settings.default_step_timeout) + grace + max(
                step.retry.max_interval, step.compensation_retry.max_interval, DB_RETRY.max_interval)
            if wait > worst:
                worst, where = wait, f"step {saga.name}.{step.name}"
    if settings.visibility_timeout <= worst:
        raise SagaflowError(
            f"SAGAFLOW_VISIBILITY_TIMEOUT={settings.visibility_timeout} s is not above {worst:.0f} s, the longest "
            f"time limit plus retry delay ({where}): a waiting retry would be delivered twice. Raise "
            f"SAGAFLOW_VISIBILITY_TIMEOUT, or lower that step's timeout or max_interval"
        )


def publish_compensation(run_id: str, indexes: list[int], saga: str | None = None, version: int | None = None) -> None:
    if saga is None or version is None:  # not given by the caller (recovery, an operator's retry): read it
        run = get_store().get_run(run_id, history=False)
        saga, version = run.saga, run.saga_version
    compile_compensation(celery_app, registry.get(saga, version), run_id, indexes).apply_async()
