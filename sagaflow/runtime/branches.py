"""Parallel branches: what a step of a parallel group does after its action, on top of the ordinary step
(runtime/steps.py claims, runs, retries it like any step).

No Celery group or chord (celery-facts.md section 3): each branch is its own message (compiler.Fanout),
records its own outcome in SQL, and the decisions about its group are made from SQL with the run row locked
(Store.complete_branch, fail_branch, stop_branch, settle_lost_branch):

- success, run live: the branch that completes the group (every member done) joins it, and only it
  publishes what follows: the steps after the group (their results read from SQL), or nothing when the group
  ends the saga (the join finished the run). A duplicate of a done branch finds it DONE and publishes
  nothing; a crash between the join's commit and its publish leaves a run that no longer moves, which the
  recovery sweeper resumes after the group, from SQL.
- success, run compensating (a sibling failed meanwhile): the branch is "late": it records its success
  and publishes its own undo; the run cannot end its compensation while a branch still runs.
- failure for good: the first branch of the group to fail fires the errback (compensation); a branch
  failing after that records its failure and fires none.
- a retry of a branch that finds the run compensating records the branch as failed (it never succeeded).
- compensation order: the group's branches first, then the steps before the group, latest first. While a
  branch still runs, the undos of the steps before the group wait (hold_back); the transition that settles
  the group (the late branch's end, or the last undo of the group) releases them.
"""

from __future__ import annotations

import logging
from typing import Callable

from celery.exceptions import Ignore

from sagaflow.app import get_store
from sagaflow.model.definition import Saga, Step, registry
from sagaflow.runtime import publish
from sagaflow.runtime.outcomes import LOST_STEP, FailedForGood, cancelled, describe

log = logging.getLogger("sagaflow.branches")


def give_up(store, run_id: str, index: int, token: str, fields: dict) -> Callable[[str, str | None], bool]:
    """The branch's ``give_up`` for SagaTask.retry_or_give_up: record the failure; True when the errback
    must fire, else stop quietly (Ignore): one errback per group failure."""

    def record(error: str, trace: str | None = None) -> bool:
        outcome = store.fail_branch(run_id, index, token, error, trace)
        if outcome is None:
            return False
        if outcome.decision == "quiet":
            log.warning("branch_failed_quietly", extra={
                **fields, "error": error,
                "reason": "the run is compensating already, or a sibling branch failed first and fires the errback"})
            _after_late_end(run_id, index, outcome, fields)
            raise Ignore()
        return True

    return record


def record_success(saga: Saga, step: Step, store, run_id: str, index: int, token: str, value, results: dict,
                   fields: dict) -> dict | FailedForGood:
    """The branch's action returned ``value``: record it and do what its group's state says."""
    outcome = store.complete_branch(run_id, index, token, value)
    if outcome is None:
        log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the step"})
        raise Ignore()
    return follow(saga, step, run_id, index, outcome, {**results, step.name: value}, fields)


def give_up_best_effort(saga: Saga, step: Step, store, run_id: str, index: int, token: str, exc: Exception,
                        results: dict, fields: dict) -> dict | FailedForGood:
    """A best-effort branch failed for good: recorded ``failed_best_effort`` (never undone, no errback); it
    counts as done for its group's join."""
    error = describe(exc)
    if store.fail_best_effort(run_id, index, token, error) is None:
        log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the step"})
        raise Ignore()
    log.warning("step_failed_best_effort", extra={**fields, "error": error,
                                                  "next": "nothing: the step is best-effort, the group goes on"})
    outcome = store.join_after_best_effort(run_id, index)
    if outcome is None:
        raise Ignore()
    return follow(saga, step, run_id, index, outcome, {**results, step.name: None}, fields)


def best_effort_branch_lost(store, saga: Saga, run_id: str, index: int) -> None:
    """on_step_failed recorded a lost best-effort branch as ``failed_best_effort``: join as it would have."""
    step = saga.steps[index]
    fields = {"run_id": run_id, "step": step.name}
    outcome = store.join_after_best_effort(run_id, index)
    if outcome is None:
        return
    followed = follow(saga, step, run_id, index, outcome, {}, fields)
    if isinstance(followed, FailedForGood):  # a cancel came in: compensate, as the branch's errback would
        publish.errback(run_id, index, saga.name, saga.version)


# What a branch's end decided (BranchOutcome.decision), one function each: publish the steps after the group,
# the branch's own undo, the undos it released; or return a cancel into the errback. Each returns what the
# branch's task returns.


def _cancelled(saga: Saga, step: Step, run_id: str, index: int, outcome, results: dict, fields: dict):
    return cancelled(run_id, f"while branch {step.name!r} ran")


def _joined(saga: Saga, step: Step, run_id: str, index: int, outcome, results: dict, fields: dict):
    log.info("group_joined", extra={**fields, "next_step": saga.steps[outcome.next_index].name})
    with publish.or_log(log, "group_continuation_not_published", fields,
                        next="the recovery sweeper resumes the run after SAGAFLOW_STALL_TIMEOUT"):
        publish.chain_from(saga, run_id, start=outcome.next_index, results=outcome.results)
    return results


def _finished(saga: Saga, step: Step, run_id: str, index: int, outcome, results: dict, fields: dict):
    log.info("run_succeeded", extra=fields)
    publish.run_ended(run_id, saga.name)  # a child run: tell its parent
    return results


def _late(saga: Saga, step: Step, run_id: str, index: int, outcome, results: dict, fields: dict):
    log.warning("branch_ended_late", extra={**fields, "compensate": outcome.compensate})
    _after_late_end(run_id, index, outcome, fields, saga)
    return results


def _recorded(saga: Saga, step: Step, run_id: str, index: int, outcome, results: dict, fields: dict):
    log.warning("branch_ended_late", extra={**fields, "compensate": False,
                                                "reason": "the run waits for an operator"})
    return results


def _waiting(saga: Saga, step: Step, run_id: str, index: int, outcome, results: dict, fields: dict):
    log.info("branch_done", extra={**fields, "group": "waiting for the other branches"})
    return results


FOLLOW = {"cancelled": _cancelled, "joined": _joined, "finished": _finished, "late": _late,
          "recorded": _recorded, "waiting": _waiting}


def follow(saga: Saga, step: Step, run_id: str, index: int, outcome, results: dict, fields: dict):
    """Do what a branch's end decided (BranchOutcome); an unknown decision is treated as "waiting"."""
    act = FOLLOW.get(_kind(outcome.decision), _waiting)
    return act(saga, step, run_id, index, outcome, results, fields)


def _kind(value) -> str:
    return getattr(value, "value", value)  # a plain string today; an enum member once the model has one


def stop_waiting_branch(store, run_id: str, index: int, token: str, earlier_tokens, fields: dict) -> None:
    """A branch's delivery found the run no longer live (claim GONE)."""
    outcome = store.stop_branch(run_id, index, token, earlier_tokens)
    if outcome is not None:
        log.warning("branch_stopped", extra={**fields, "reason": "the run began compensating"})
        _after_late_end(run_id, index, outcome, fields)


def errback_of_late_branch(store, run_id: str, index: int, saga: str | None, version: int | None) -> bool:
    """on_step_failed found the compensation begun already. If the errback is a branch's whose process was
    lost after that (still marked running), record it failed and maybe end the compensation: True, and the
    errback does nothing more."""
    if saga is None:
        return False
    definition = registry.get(saga, version)
    if index >= len(definition.steps) or definition.steps[index].group is None:
        return False
    outcome = store.settle_lost_branch(run_id, index, LOST_STEP)
    if outcome is None:
        return False
    fields = {"run_id": run_id, "step": definition.steps[index].name}
    log.warning("branch_lost_late", extra=fields)
    _after_late_end(run_id, index, outcome, fields, definition)
    return True


def hold_back(store, run_id: str, todo: list[int], saga: str | None, version: int | None) -> list[int]:
    """on_step_failed is about to publish ``todo``: in a saga with groups, keep back the undos of the steps
    before the group while a branch of it still runs (Store.hold_back)."""
    if saga is None or registry.get(saga, version).linear or not todo:
        return todo
    now = store.hold_back(run_id, todo)
    if now != todo:
        log.info("undos_held", extra={"run_id": run_id, "held": len(todo) - len(now),
                                      "until": "every branch of the group ended and was undone"})
    return now


def after_undo(store, saga: Saga, step: Step, run_id: str) -> None:
    """A branch's undo completed and the run still compensates: release the undos that waited for its
    group, if it was the last thing they waited for."""
    if step.group is not None:
        _release(run_id, store.release_held_undos(run_id), {"run_id": run_id, "step": step.name}, saga)


def _after_late_end(run_id: str, index: int, outcome, fields: dict, saga: Saga | None = None) -> None:
    """A branch ended after the compensation began: publish its own undo (it succeeded, or a non-atomic
    branch failed), or the undos its end released."""
    if outcome.compensate:
        _publish_undos(saga or _saga_of(run_id), run_id, [index], fields)
    _release(run_id, outcome.release, fields, saga)


def _release(run_id: str, indexes, fields: dict, saga: Saga | None = None) -> None:
    if not indexes:
        return
    log.info("undos_released", extra={**fields, "steps": len(indexes)})
    _publish_undos(saga or _saga_of(run_id), run_id, list(indexes), fields)


def _saga_of(run_id: str) -> Saga:
    run = get_store().get_run(run_id, history=False)
    return registry.get(run.saga, run.saga_version)


def _publish_undos(saga: Saga, run_id: str, indexes: list[int], fields: dict) -> None:
    with publish.or_log(log, "compensation_not_published", fields,
                        next="the recovery sweeper re-drives the compensation after SAGAFLOW_STALL_TIMEOUT"):
        publish.compensations(saga, run_id, indexes)


# ---------------------------------------------------------------------------------------------- child branches


def child_branch_ended(outcome) -> None:
    """The child run of a child step that is a branch ended, and its group decided (Store.child_ended ->
    end_child_branch, a WaitOutcome carrying the BranchOutcome): publish what follows, as an action branch's
    own task would after its action: the steps after the group, the errback (the first failure of the
    group, or a cancel), the branch's own undo (a late success: the undo undoes its child), or the undos its
    end released. Duplicates decide nothing (the store moved the step once)."""
    saga = registry.get(outcome.saga, outcome.version)
    step = saga.steps[outcome.index]
    fields = {"run_id": outcome.run_id, "step": step.name, "child_run_id": outcome.child_run_id}
    branch = outcome.branch
    decision = _kind(branch.decision)
    if decision == "errback":
        log.warning("step_failed", extra={**fields, "error": outcome.error})
        _errback(saga, outcome.run_id, outcome.index, fields)
    elif decision in ("quiet", "stopped", "lost"):
        log.warning("branch_failed_quietly", extra={
            **fields, "error": outcome.error,
            "reason": "the run is compensating already, or a sibling branch failed first and fires the errback"})
        _after_late_end(outcome.run_id, outcome.index, branch, fields, saga)
    elif isinstance(follow(saga, step, outcome.run_id, outcome.index, branch, {}, fields), FailedForGood):
        _errback(saga, outcome.run_id, outcome.index, fields)  # a cancel came in: compensate


def _errback(saga: Saga, run_id: str, index: int, fields: dict) -> None:
    with publish.or_log(log, "errback_not_published", fields,
                        next="the recovery sweeper publishes it again after SAGAFLOW_STALL_TIMEOUT"):
        publish.errback(run_id, index, saga.name, saga.version)
