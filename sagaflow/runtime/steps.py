"""The bodies of the per-saga tasks: a step (``<saga>.<step>``) and a compensation
(``<saga>.<step>.compensate``).

Both begin with the same prologue (``claim``): the definition, the store, the delivery's tokens and lease,
and the *claim* in SQL (a compare-and-set, see store/claims.py). A delivery that loses the claim is a
duplicate and stops with ``Ignore``: no errback, no chain continuation, nothing recorded twice. A delivery
that finds its step already done carries the stored result on, so a chain interrupted between commit and
publish can be re-driven. A message the worker refused (sagaflow/inbound.py: its arguments were cut) fails
the step or compensation for good without running it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from celery.exceptions import Ignore, Retry

from sagaflow import inbound
from sagaflow.app import get_settings, get_store
from sagaflow.errors import (
    AlreadyFailed,
    InvalidInput,
    LeaseLost,
    NonRetryableError,
    ResultNotSerializable,
    SagaCancelled,
)
from sagaflow.inbound import MessageRefused
from sagaflow.model import ClaimOutcome, RunStatus
from sagaflow.model.definition import Saga, Step, StepContext, StepKind, registry
from sagaflow.runtime import branches, limits, maps, publish, timers, waits
from sagaflow.runtime.base import SagaTask
from sagaflow.runtime.outcomes import DB_OUTAGE, FailedForGood, cancelled, describe, traceback_text
from sagaflow.safejson import ensure_json

if TYPE_CHECKING:
    from sagaflow.model.outcomes import Claim
    from sagaflow.store import Store

log = logging.getLogger("sagaflow.runtime")


def store_for(saga: Saga):
    """The linear fast path for plain linear sagas; repository.py's transactions for the rest (gates, child
    steps, parallel groups, step flags), whose transitions decide more than the fast statements do."""
    store = get_store()
    return store if saga.linear else store.transactional


@dataclass(frozen=True)
class Claimed:
    """What the prologue found: the step's definition, its store, this delivery's tokens and lease, and the
    claim's outcome. ``phase``: "step" or "compensation" (the prefix of the log events)."""

    task: SagaTask
    phase: str
    saga: Saga
    step: Step
    store: Store
    run_id: str
    index: int
    token: str
    earlier_tokens: list
    lease: float
    claim: Claim

    @property
    def fields(self) -> dict:
        return {"run_id": self.run_id, "step": self.step.name}

    def duplicate(self):
        log.info(f"{self.phase}_duplicate_ignored", extra={**self.fields, "outcome": self.claim.outcome.value})
        raise Ignore()

    def fail(self, exc: Exception, give_up: Callable[[str, str | None], bool]) -> FailedForGood:
        """Record ``exc`` as this step's (or compensation's) failure for good, without retries."""
        if give_up(describe(exc), traceback_text(exc)):
            log.warning(f"{self.phase}_failed", extra={**self.fields, "attempt": self.claim.attempt,
                                                       "error": describe(exc)})
            return FailedForGood(exc)
        raise Ignore()

    def context(self, **more) -> StepContext:
        assert self.claim.input is not None  # a CLAIMED claim carries its run's input (saga_runs.input is NOT NULL)
        return StepContext(run_id=self.run_id, saga=self.saga.name, step=self.step.name, input=self.claim.input,
                           attempt=self.claim.attempt, idempotency_key=f"{self.run_id}:{self.step.name}", **more)

    def heartbeat(self, stop_on_cancel: bool):
        return self.task.heartbeat(self.run_id, self.index, self.token, self.lease, stop_on_cancel)


def claim(task: SagaTask, phase: str, run_id: str, index: int, version: int) -> Claimed:
    """The shared prologue of a step and a compensation."""
    saga, step = task.definition(version)
    store = store_for(saga)
    token, earlier_tokens = task.tokens()
    lease = task.lease_seconds(step)
    claim_in_sql = store.claim_step if phase == "step" else store.claim_compensation
    outcome = claim_in_sql(run_id, index, token, earlier_tokens, lease)
    return Claimed(task, phase, saga, step, store, run_id, index, token, earlier_tokens, lease, outcome)


# ---------------------------------------------------------------------------------------------- a step


def run_step(self: SagaTask, results: dict, *, run_id: str, index: int, version: int,
             window_end: bool = False, branch: bool = False, plain: bool = False, input: dict | None = None) -> dict:
    """``window_end``: publish the next chain once this step's result is committed. ``branch``: a step of a
    parallel group, published on its own (compiler.Fanout). ``plain``: a run that policy switched to a plain
    chain (no claims, no step rows), with the run's ``input`` in the message."""
    if plain:
        plain_results = _run_plain_step(self, results, run_id, index, version, input or {},
                                        inbound.refused(self.request))
        if window_end:
            _next_window(run_id, version, self.saga_name, index + 1, plain_results, plain=True, input=input)
        return plain_results
    with self.database_outage_retries():
        saga, step = self.definition(version)
        slot = limits.enter(self, saga, step, run_id, index)  # over a limit: the delivery ends here (queued)
        retrying = False
        begun: list[list[int] | None] = []  # a linear saga's failure began its compensation (_give_up)
        try:
            outcome = _run_step(self, results, run_id, index, version, inbound.refused(self.request), slot, begun)
        except Retry:
            # A retry keeps the step's slot: its next delivery finds it held (the step stays claimed
            # meanwhile, so a waiter handed the slot could not run it) and gives it back at its end.
            retrying = True
            raise
        finally:
            if not retrying:
                limits.leave(slot)
    if isinstance(outcome, FailedForGood):
        if begun and begun[0] is not None:
            _compensate_here(self, saga, run_id, begun[0])
        raise outcome.exc  # -> link_error -> on_step_failed, unless _compensate_here published the undos
    if window_end:
        _next_window(run_id, version, self.saga_name, index + 1, outcome)
    return outcome


def _compensate_here(self: SagaTask, saga: Saga, run_id: str, todo: list[int]) -> None:
    """The step's failure began the run's compensation in the same statement (``todo``: the steps to undo,
    latest first): publish the undos from this task and drop the step's errback, one task hop less than
    on_step_failed would take. If the broker refuses, the errback stays and re-drives them from SQL
    (``compensations_to_redrive``), as it does for a redelivered errback; the sweeper after it."""
    fields = {"run_id": run_id, "steps": len(todo)}
    try:
        if todo:
            publish.compensations(saga, run_id, todo)
    except Exception as exc:  # noqa: BLE001 - committed in SQL: the errback (or the sweeper) publishes them
        log.error("compensation_not_published", extra={**fields, "error": describe(exc),
                                                       "next": "the step's errback re-drives it from SQL"})
        return
    self.request.errbacks = None  # Celery calls a failed task's errbacks from this same request
    log.info("compensation_begun", extra=fields)
    if not todo:  # nothing to undo: the run ended with the failure
        publish.run_ended(run_id, saga.name)


def _next_window(run_id: str, version: int, saga_name: str, start: int, results: dict, *,
                 plain: bool = False, input: dict | None = None) -> None:
    """The step that ends a chain window committed its result: publish the next window. If the broker
    refuses, the run holds no lease and stops moving: the recovery sweeper re-drives it from SQL."""
    # the step's success is recorded; never fire its errback now
    with publish.or_log(log, "chain_window_not_published", {"run_id": run_id, "from_step": start},
                        next="the recovery sweeper re-drives the run after SAGAFLOW_STALL_TIMEOUT"):
        publish.chain_from(registry.get(saga_name, version), run_id, start=start, results=results, plain=plain,
                           input=input)


def _give_up(work: Claimed, begun: list) -> Callable[[str, str | None], bool]:
    """How a step records its failure for good: a parallel branch fires one errback per group failure
    (sagaflow/runtime/branches.py); a step of a linear saga fails its row and begins the compensation at
    once, appending the steps to undo to ``begun`` for run_step to publish (store fail_and_compensate); any
    other step fails its row, and its errback begins the compensation."""
    if work.step.group is not None:
        return branches.give_up(work.store, work.run_id, work.index, work.token, work.fields)
    if work.saga.linear:
        def fail_and_compensate(error: str, trace: str | None = None) -> bool:
            held, todo = work.store.fail_and_compensate(work.run_id, work.index, work.token, error, trace)
            begun.append(todo)
            return held

        return fail_and_compensate

    def give_up(error: str, trace: str | None = None) -> bool:
        return work.store.fail_step(work.run_id, work.index, work.token, error, trace)

    return give_up


def _run_step(self: SagaTask, results: dict, run_id: str, index: int, version: int,
              refused: str | None, slot: limits.Slot | None, begun: list) -> dict | FailedForGood:
    """``refused``: the worker refused this message (sagaflow/inbound.py): its arguments were cut, so the step
    fails for good without running, and the run compensates. ``slot``: the step's slot under its concurrency
    (runtime/limits.py), given back at the end if this delivery claims the step. ``begun``: see _give_up."""
    work = claim(self, "step", run_id, index, version)
    if slot is not None and work.claim.outcome is ClaimOutcome.CLAIMED:
        slot.claimed = True
    saga, step, store, fields, outcome = work.saga, work.step, work.store, work.fields, work.claim.outcome
    if outcome is ClaimOutcome.CANCELLED:
        log.info("step_cancelled", extra=fields)
        raise SagaCancelled(f"run {run_id} was cancelled before step {step.name!r}")
    if outcome is ClaimOutcome.DONE:
        if refused is not None:  # its results were cut: never carry them on (the sweeper re-drives from SQL)
            log.error("message_dropped", extra={**fields, "reason": refused, "outcome": outcome.value})
            raise Ignore()
        log.info("step_already_done", extra=fields)
        return {**results, step.name: work.claim.result}
    if outcome is ClaimOutcome.FAILED:
        return FailedForGood(AlreadyFailed(f"step {step.name!r} already failed: {work.claim.error}"))
    if outcome is ClaimOutcome.GONE and step.group is not None:
        branches.stop_waiting_branch(store, run_id, index, work.token, work.earlier_tokens, fields)
    if outcome is not ClaimOutcome.CLAIMED:
        work.duplicate()
    give_up = _give_up(work, begun)
    if refused is not None:
        return work.fail(MessageRefused(refused), give_up)
    if step.kind is StepKind.SLEEP:  # a durable timer (runtime/timers.py)
        return timers.enter_sleep(store, saga, step, run_id, index, work.token, work.claim, results)
    if step.kind is StepKind.MAP:  # its items move the run on (runtime/maps.py)
        return maps.enter(self, store, saga, step, run_id, index, work.token, work.claim, results, work.lease)
    if step.kind is not StepKind.ACTION:  # a gate or a child step: it may wait (runtime/waits.py)
        return waits.enter(self, store, saga, step, run_id, index, work.token, work.claim, results, work.lease,
                           give_up)

    # Step flags: past the pivot a cancel is never acted on (the saga can no longer be undone).
    past_pivot = any(s.pivot for s in saga.steps[:index])
    policy = saga.retry_policy(index)
    ctx = work.context(results=dict(results), _heartbeat=work.heartbeat(stop_on_cancel=not past_pivot))
    try:
        value = call_action(step, ctx)
    except (Retry, Ignore):
        raise
    except LeaseLost as exc:
        log.warning("step_lease_lost", extra=fields)
        raise Ignore() from exc
    except SagaCancelled as exc:  # from ctx.heartbeat(): no retry, compensate
        if give_up(describe(exc), None):
            return FailedForGood(exc)
        raise Ignore() from exc
    except Exception as exc:
        if step.best_effort and not policy.allows_retry(exc, work.claim.round_attempt):
            if step.group is not None:  # a best-effort branch: done for its group's join
                return branches.give_up_best_effort(saga, step, store, run_id, index, work.token, exc, results,
                                                    fields)
            return _give_up_best_effort(work, exc, results)
        return self.retry_or_give_up(
            exc, work.claim, policy, "step", fields,
            note_retry=lambda error, delay, trace: store.retry_step(run_id, index, work.token, error, delay,
                                                                    work.lease, trace),
            give_up=give_up,
            # A long delay waits in SQL, not in the broker (runtime/timers.py); a parallel branch waits as a
            # countdown: its run keeps running for the other branches.
            wait=None if step.group is not None else
            lambda delay: timers.wait_retry(store.transactional, run_id, index, work.token, delay, fields),
        )
    if step.group is not None:  # records the result, joins the group or undoes a late branch
        return branches.record_success(saga, step, store, run_id, index, work.token, value, results, fields)
    if index < len(saga.steps) - 1:
        if not store.complete_step(run_id, index, work.token, value):
            log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the step"})
            raise Ignore()
        log.info("step_succeeded", extra=fields)
        return {**results, step.name: value}
    status = store.complete_last_step(run_id, index, work.token, value)  # finishes the run too
    if status is None:
        log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the step"})
        raise Ignore()
    return _last_step_ended(work, status, {**results, step.name: value})


def _give_up_best_effort(work: Claimed, exc: Exception, results: dict) -> dict | FailedForGood:
    """A best-effort step failed for good: record it (``failed_best_effort``) and go on with the next step,
    its result None. Never compensated; no errback. As the last step it finishes the run (``succeeded``)."""
    error = describe(exc)
    last = work.index == len(work.saga.steps) - 1
    status = work.store.fail_best_effort(work.run_id, work.index, work.token, error, finish=last)
    if status is None:
        log.warning("step_result_dropped", extra={**work.fields, "reason": "another delivery holds the step"})
        raise Ignore()
    log.warning("step_failed_best_effort", extra={**work.fields, "attempt": work.claim.attempt, "error": error,
                                                  "next": "nothing: the step is best-effort, the run goes on"})
    results = {**results, work.step.name: None}
    return _last_step_ended(work, status, results) if last else results


def _last_step_ended(work: Claimed, status: str, results: dict) -> dict | FailedForGood:
    """The last step's transition committed, leaving the run in ``status``: the run succeeded (tell a
    parent), or a cancel came in (compensate every step, this one included), or an errback moved the run on
    meanwhile (it owns the run now)."""
    if status == RunStatus.RUNNING.value and any(s.pivot for s in work.saga.steps):
        status = work.store.finish_past_pivot(work.run_id) or status  # step flags: past the pivot a cancel is overruled
    if status == RunStatus.RUNNING.value:
        return cancelled(work.run_id, "before it finished")
    if status != RunStatus.SUCCEEDED.value:
        log.warning("step_result_late", extra={**work.fields, "run_status": status})
        raise Ignore()
    log.info("run_succeeded", extra=work.fields)
    publish.run_ended(work.run_id, work.saga.name)
    return results


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
            raise self.retry(exc=exc, countdown=delay, max_retries=self.request.retries + 1) from exc
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


# Around every call of an action or a compensation: None (the call itself), or sagaflow.testing's fault
# injector, called as ``interceptor(phase, ctx, call)`` with phase "step" or "compensation"; it returns what
# the call returns or raises in its place.
Interceptor = Callable[[str, StepContext, Callable[[StepContext], object]], object]
_interceptor: Interceptor | None = None


def intercept(interceptor: Interceptor | None) -> Interceptor | None:
    """Put ``interceptor`` around every action and compensation of this process (None: remove it); returns the
    one it replaces."""
    global _interceptor
    previous, _interceptor = _interceptor, interceptor
    return previous


def _invoke(phase: str, call: Callable[[StepContext], object], ctx: StepContext):
    return call(ctx) if _interceptor is None else _interceptor(phase, ctx, call)


def call_action(step: Step, ctx: StepContext):
    """The step's action, and its result as JSON data (ResultNotSerializable if it is not JSON)."""
    assert step.action is not None  # only action steps get here (gates and child steps have none)
    value = _invoke("step", step.action, ctx)
    try:
        return ensure_json(value, f"the result of step {step.name!r}", get_settings().json_limits)
    except InvalidInput as exc:
        raise ResultNotSerializable(f"{exc}; return a dict, list, str, number, bool or None") from None


# ---------------------------------------------------------------------------------------------- a map's item


def run_item(self: SagaTask, *, run_id: str, index: int, item: int, version: int) -> None:
    """``<saga>.<step>.item``: one item of a map step (runtime/maps.py, store/maps.py)."""
    with self.database_outage_retries():
        _run_item(self, run_id, index, item, version, inbound.refused(self.request))


LOST_ITEM = ("the item's worker process was lost, or hit its hard time limit, on every attempt its retry policy "
             "allows; check the worker's log")


def _run_item(self: SagaTask, run_id: str, index: int, item: int, version: int, refused: str | None) -> None:
    saga, step = self.definition(version)
    store = get_store().transactional
    token, earlier_tokens = self.tokens()
    lease = self.lease_seconds(step)
    width = step.map_concurrency or 1
    fields = {"run_id": run_id, "step": step.name, "item": item}
    claimed = store.claim_item(run_id, index, item, token, earlier_tokens, lease, width)
    if claimed.outcome is not ClaimOutcome.CLAIMED:
        if claimed.after is not None:
            log.info("map_item_skipped", extra={**fields, "reason": "the map is failing or was cancelled"})
            maps.follow(saga, step, run_id, index, claimed.after)
        else:
            log.info("map_item_duplicate_ignored", extra={**fields, "outcome": claimed.outcome.value})
        raise Ignore()

    def beat() -> None:
        held, cancel = store.extend_item_lease(run_id, index, item, token, lease)
        if not held:
            raise LeaseLost(f"run {run_id}: another delivery took over item {item} of {step.name!r}")
        if cancel:
            raise SagaCancelled(f"run {run_id} was cancelled while item {item} of {step.name!r} ran")

    def give_up(exc: Exception) -> None:
        error = describe(exc, self.soft_limit())
        log.warning("map_item_failed", extra={**fields, "attempt": claimed.attempt, "error": error})
        maps.follow(saga, step, run_id, index, store.fail_item(run_id, index, item, token, error, width, lease))

    ctx = StepContext(run_id=run_id, saga=saga.name, step=step.name, input=claimed.input or {},
                      attempt=claimed.attempt, idempotency_key=f"{run_id}:{step.name}:{item}", item=claimed.value,
                      item_index=item, _heartbeat=beat)
    try:
        if refused is not None:  # the worker cut this message's arguments (sagaflow/inbound.py): never run it
            raise MessageRefused(refused)
        if claimed.attempt > step.retry.max_attempts:  # every earlier attempt was lost (killed, hard limit)
            raise NonRetryableError(LOST_ITEM)
        if step.child_saga is not None:  # a map of child runs: the item's child run is its work
            child_saga, child_input = waits.child_run_input(step, ctx, {"item": claimed.value, "index": item})
        else:
            value = call_action(step, ctx)
    except (Retry, Ignore):
        raise
    except LeaseLost as exc:
        log.warning("map_item_lease_lost", extra=fields)
        raise Ignore() from exc
    except Exception as exc:
        policy = step.retry
        if not isinstance(exc, (SagaCancelled, MessageRefused)) and policy.allows_retry(exc, claimed.attempt):
            delay = policy.delay(claimed.attempt)
            if not store.retry_item(run_id, index, item, token, describe(exc), delay, lease):
                raise Ignore() from exc
            log.info("map_item_retried", extra={**fields, "attempt": claimed.attempt, "retry_in": round(delay, 3)})
            raise self.retry(exc=exc, countdown=delay, max_retries=self.request.retries + 1) from exc
        give_up(exc)
        return
    if step.child_saga is not None:
        waits.start_item_child(store, saga, step, run_id, index, item, token, child_saga, child_input, width,
                               lease)
        raise Ignore()  # the item waits for its child, holding no worker: the child's end moves it
    maps.follow(saga, step, run_id, index, store.complete_item(run_id, index, item, token, value, width, lease))


def _undo_items(work: Claimed, ctx: StepContext) -> None:
    """A map step's undo: its compensation once per completed item, latest completed first, each recorded as
    it is done, so a retry or a redelivery of the undo goes on where it stopped (store/maps.py). A map of
    child runs undoes each item's child first, one at a time (runtime/waits.py ``undo_item_child``: the
    delivery ends while the child compensates, and the child's end publishes this undo again)."""
    store, step, run_id, index = work.store, work.step, work.run_id, work.index
    for item, value, result in store.items_to_undo(run_id, index):
        if step.child_saga is not None:
            waits.undo_item_child(store, step, run_id, index, item, work.token, fresh=work.claim.round_attempt == 1)
        if step.compensate is not None:
            _invoke("compensation", step.compensate,
                    replace(ctx, item=value, item_index=item, result=result,
                            idempotency_key=f"{ctx.idempotency_key}:{item}"))
        store.item_undone(run_id, index, item)
        ctx.heartbeat()  # a long list: keep the undo's claim alive


# ---------------------------------------------------------------------------------------------- a compensation


def run_compensation(self: SagaTask, *, run_id: str, index: int, version: int) -> None:
    with self.database_outage_retries():
        outcome = _run_compensation(self, run_id, index, version, inbound.refused(self.request))
    if isinstance(outcome, FailedForGood):
        raise outcome.exc  # -> link_error -> on_compensation_failed


def _run_compensation(self: SagaTask, run_id: str, index: int, version: int,
                      refused: str | None = None) -> FailedForGood | None:
    """``refused``: the worker refused this message (sagaflow/inbound.py): the compensation fails for good
    without running (``compensation_failed``: an operator's ``sagaflow retry`` publishes a sound message)."""
    work = claim(self, "compensation", run_id, index, version)
    saga, step, store, fields, outcome = work.saga, work.step, work.store, work.fields, work.claim.outcome
    if outcome is ClaimOutcome.DONE:
        return None
    if outcome is ClaimOutcome.FAILED:
        return FailedForGood(AlreadyFailed(f"compensation of {step.name!r} already failed: {work.claim.error}"))
    if outcome is not ClaimOutcome.CLAIMED:
        work.duplicate()

    def give_up(error: str, trace: str | None = None) -> bool:
        return store.fail_compensation(run_id, index, work.token, error, trace)

    if refused is not None:
        return work.fail(MessageRefused(refused), give_up)
    if step.kind is StepKind.CHILD:  # undo the child run first (runtime/waits.py)
        failed = waits.compensate_child(self, store, saga, step, run_id, index, work.token, work.claim, work.lease)
        if failed is not None:
            return failed

    ctx = work.context(result=work.claim.result, _heartbeat=work.heartbeat(stop_on_cancel=False))
    try:
        if step.kind is StepKind.MAP:
            _undo_items(work, ctx)
        elif step.compensate is not None:  # a child step may have none of its own
            _invoke("compensation", step.compensate, ctx)
    except (Retry, Ignore):
        raise
    except LeaseLost as exc:
        log.warning("compensation_lease_lost", extra=fields)
        raise Ignore() from exc
    except Exception as exc:
        return self.retry_or_give_up(
            exc, work.claim, step.compensation_retry, "compensation", fields,
            note_retry=lambda error, delay, trace: store.retry_compensation(run_id, index, work.token, error,
                                                                            delay, work.lease, trace),
            give_up=give_up,
        )
    status = store.complete_compensation(run_id, index, work.token)  # the last undo ends the run too
    if status is None:
        raise Ignore()
    log.info("compensation_succeeded", extra=fields)
    if status in (RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value):
        log.info(f"run_{status}", extra={"run_id": run_id})
        publish.run_ended(run_id, saga.name)
    elif status == RunStatus.COMPENSATING.value:
        branches.after_undo(store, saga, step, run_id)  # the undos that waited for a parallel group
    return None
