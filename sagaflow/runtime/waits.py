"""Steps that wait, holding no worker: approval gates (for a signal) and child steps (for a child run).

The step task claims a gate or child step like any step (runtime/steps.py), then hands it here:

- **Gate.** In one transaction with the run row locked (Store.wait_for_signal): a signal delivered early
  passes the gate at once (its payload is the step's result); else the step and the run go ``waiting``
  with a deadline, and the task ends with ``Ignore``, publishing nothing. ``signal()`` (client.signal, the
  API, the CLI) records the signal once and, when the gate waits for it, passes it and publishes the chain
  from the next step (results read from SQL). The recovery sweeper (``sweep``) fails gates past their
  deadline and publishes the errback, so the completed steps are compensated.
- **Child step.** The child run is recorded with its parent link in the same transaction that makes the
  step wait (Store.start_child), then its chain is published. Whenever a run that has a parent ends
  (``publish.run_ended``, called wherever the runtime sees a run become final, fast path included), the task
  ``sagaflow.child_finished`` moves the parent on: the child's results become the step's result, or its
  failure fails the step. The sweeper re-publishes that message when it was lost.
- **Undoing a child step** (``compensate_child``, from the step's compensation task): the child run goes
  ``succeeded -> compensating`` and its completed steps are undone, latest first. The parent's compensation
  chain stops at the child step meanwhile (Ignore); the child's end revokes the step's claim and publishes
  the parent's compensations again from that step (Store.child_ended), whose task now finds the child undone
  and goes on with the parent's earlier steps. A child whose undo failed for good leaves the parent in
  ``compensation_failed`` too; an operator's retry of the parent retries the child's undo first.

Cancelling a waiting run (``cancel``): at a gate, the gate fails and the compensation begins at once; at a
child step, the child is cancelled (it compensates), and its end then compensates the parent.
"""

from __future__ import annotations

import logging
import uuid

from celery.exceptions import Ignore

from sagaflow.app import get_settings
from sagaflow.errors import (
    InvalidInput,
    InvalidTransition,
    NonRetryableError,
    UnknownSaga,
)
from sagaflow.model import Recovery, StepSpec, WaitOutcome
from sagaflow.model.definition import NAME_PATTERN, StepContext, StepKind, registry
from sagaflow.runtime import branches, maps, publish
from sagaflow.runtime.outcomes import FailedForGood, cancelled
from sagaflow.safejson import ensure_json

log = logging.getLogger("sagaflow.waits")


class ChildNotStarted(NonRetryableError):
    """A child step could not start its child run: unknown saga, or an input that is not a JSON object."""


# ---------------------------------------------------------------------------------------------- publishing
# What a wait transition decided (WaitOutcome.action), one function each. "waiting", "none", "lost",
# "cancelled" and "failed" publish nothing here: whoever got them acts on them itself.


def _continue(outcome: WaitOutcome) -> None:
    publish.chain_from(registry.get(outcome.saga, outcome.version), outcome.run_id, start=outcome.index + 1,
                       results=outcome.results)


def _errback(outcome: WaitOutcome) -> None:
    publish.errback(outcome.run_id, outcome.index, outcome.saga, outcome.version)


def _compensate(outcome: WaitOutcome) -> None:
    if outcome.indexes:
        publish.compensations(registry.get(outcome.saga, outcome.version), outcome.run_id, outcome.indexes)


def _finished(outcome: WaitOutcome) -> None:
    log.info(f"run_{outcome.status}", extra={"run_id": outcome.run_id})
    publish.run_ended(outcome.run_id, outcome.saga)


PUBLISH = {"continue": _continue, "errback": _errback, "compensate": _compensate}
ENDED = {"finished": _finished}


def act(outcome: WaitOutcome) -> None:
    """Publish what a wait transition decided. A publish that fails leaves the run without a lease and
    without progress: the recovery sweeper re-drives it from SQL after SAGAFLOW_STALL_TIMEOUT."""
    kind = getattr(outcome.action, "value", outcome.action)  # a plain string today; maybe an enum member later
    if kind in PUBLISH:
        fields = {"run_id": outcome.run_id, "action": outcome.action, "step": outcome.index}
        with publish.or_log(log, "wait_outcome_not_published", fields,
                            next="the recovery sweeper re-drives the run after SAGAFLOW_STALL_TIMEOUT; "
                                 "check the broker"):
            PUBLISH[kind](outcome)
    elif kind in ENDED:
        ENDED[kind](outcome)


# ---------------------------------------------------------------------------------------------- forward


def enter(task, store, saga, step, run_id: str, index: int, token: str, claim, results: dict, lease: float,
          give_up=None):
    """A gate or child step claimed by ``token``. Returns the results to carry on (the gate passed), a
    outcomes.FailedForGood (into the errback), or raises Ignore (the run waits: nothing continues).
    ``give_up(error, traceback)``: how the step records a failure for good (default: Store.fail_step)."""
    if step.kind is StepKind.GATE:
        return _enter_gate(store, saga, step, run_id, index, token, results)
    if give_up is None:
        def give_up(error, trace=None):
            return store.fail_step(run_id, index, token, error, trace)
    return _start_child(task, store, saga, step, run_id, index, token, claim, results, lease, give_up)


def _enter_gate(store, saga, step, run_id, index, token, results):
    fields = {"run_id": run_id, "step": step.name, "signal": step.signal}
    outcome = store.wait_for_signal(run_id, index, token, step.timeout)
    if outcome.action == "lost":
        log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the gate"})
        raise Ignore()
    if outcome.action == "cancelled":
        return cancelled(run_id, f"at the gate for signal {step.signal!r}")
    if outcome.action == "waiting":
        log.info("run_waiting", extra={**fields, "timeout": step.timeout})
        raise Ignore()
    log.info("gate_passed", extra={**fields, "signal_was_early": True})
    if outcome.action == "finished":
        act(outcome)
    elif outcome.action == "errback":  # the last step passed, but a cancel came in meanwhile
        return cancelled(run_id, "before it finished")
    return {**results, step.name: outcome.result}


def child_run_input(step, ctx: StepContext, default: dict):
    """The child saga (its latest version) and the checked input of a child run that ``step`` starts:
    ``step.child_input(ctx)``, else ``default``. ChildNotStarted: an unknown saga, or an input that is not
    a JSON object."""
    what = "child step" if step.kind is StepKind.CHILD else "map"
    try:
        child_saga = registry.get(step.child_saga)
    except UnknownSaga as exc:
        raise ChildNotStarted(f"{what} {step.name!r}: {exc}; register that saga in every worker") from None
    data = step.child_input(ctx) if step.child_input is not None else default
    if not isinstance(data, dict):
        raise ChildNotStarted(f"{what} {step.name!r}: the child's input must be a JSON object (a dict), "
                              f"got {type(data).__name__}")
    try:
        data = ensure_json(data, f"the input of {what} {step.name!r}'s child", get_settings().json_limits)
    except InvalidInput as exc:
        raise ChildNotStarted(str(exc)) from None
    return child_saga, data


def start_item_child(store, saga, step, run_id: str, index: int, item: int, token: str, child_saga, data: dict,
                     concurrency: int, lease: float) -> None:
    """Item ``item`` of a map of child runs, claimed by ``token``: record its child run (Store.start_item_child)
    and publish the child's chain. The item then waits, holding no worker; its child's end moves it
    (child_finished). A map that began failing meanwhile skips the item instead (its map decides)."""
    fields = {"run_id": run_id, "step": step.name, "item": item, "child_saga": child_saga.name}
    outcome = store.start_item_child(run_id, index, item, token, str(uuid.uuid4()), child_saga.name,
                                     child_saga.version, data, [StepSpec.of(s) for s in child_saga.steps],
                                     concurrency, lease)
    if outcome.action == "lost":
        log.warning("map_item_duplicate_ignored", extra={**fields, "reason": "another delivery holds the item"})
        return
    if outcome.action == "map":
        log.info("map_item_skipped", extra={**fields, "reason": "the map is failing or was cancelled"})
        maps.follow(saga, step, run_id, index, outcome.map)
        return
    fields["child_run_id"] = outcome.child_run_id
    with publish.or_log(log, "child_not_published", fields,  # the child is recorded (pending)
                        next="the child stays pending; the recovery sweeper starts it after SAGAFLOW_STALL_TIMEOUT"):
        publish.chain_from(child_saga, outcome.child_run_id)
    log.info("map_item_waiting", extra=fields)


def undo_item_child(store, step, run_id: str, index: int, item: int, token: str, fresh: bool) -> None:
    """Within a map's undo: undo item ``item``'s child run (Store.compensate_item_child). Returns once it is
    undone (or there was nothing to undo); raises Ignore while its undo runs (its end hands the map's undo
    back: child_finished), NonRetryableError when it cannot be undone (the map's undo fails for good: an
    operator's retry of the parent retries the child's undo)."""
    outcome = store.compensate_item_child(run_id, index, item, token, fresh)
    fields = {"run_id": run_id, "step": step.name, "item": item, "child_run_id": outcome.child_run_id}
    if outcome.action == "finished":
        log.info("child_undone", extra=fields)
        return
    if outcome.action == "failed":
        raise NonRetryableError(outcome.error)
    if outcome.action == "compensate":
        with publish.or_log(log, "child_compensation_not_published", fields):  # the sweeper re-drives it
            publish.compensations(registry.get(outcome.saga, outcome.version), outcome.run_id, outcome.indexes)
        log.info("child_compensation_begun", extra={**fields, "steps": len(outcome.indexes)})
    raise Ignore()  # lost, waiting, or compensating: the child's end publishes the map's undo again


def _start_child(task, store, saga, step, run_id, index, token, claim, results, lease, give_up):
    """Start the child run of a child step (a branch of a parallel group too: ``give_up`` records its
    failure to start as its group wants, one errback per group failure)."""
    fields = {"run_id": run_id, "step": step.name, "child_saga": step.child_saga}
    ctx = StepContext(run_id=run_id, saga=saga.name, step=step.name, input=claim.input, attempt=claim.attempt,
                      idempotency_key=f"{run_id}:{step.name}", results=dict(results))
    try:
        child_saga, data = child_run_input(step, ctx, claim.input)
    except Exception as exc:
        return task.retry_or_give_up(
            exc, claim, step.retry, "step", fields,
            note_retry=lambda error, delay, trace: store.retry_step(run_id, index, token, error, delay, lease, trace),
            give_up=give_up,
        )
    outcome = store.start_child(run_id, index, token, str(uuid.uuid4()), child_saga.name, child_saga.version, data,
                                [StepSpec.of(s) for s in child_saga.steps])
    if outcome.action == "lost":
        log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the child step"})
        raise Ignore()
    if outcome.action == "cancelled":
        return cancelled(run_id, "before its child run started")
    fields["child_run_id"] = outcome.child_run_id
    with publish.or_log(log, "child_not_published", fields,  # the child is recorded (pending)
                        next="the child stays pending; the recovery sweeper starts it after SAGAFLOW_STALL_TIMEOUT"):
        publish.chain_from(child_saga, outcome.child_run_id)
    log.info("run_waiting", extra=fields)
    raise Ignore()


def child_finished(store, child_run_id: str) -> None:
    """The task ``sagaflow.child_finished``: a child run ended (or finished undoing): move its parent on
    (Store.child_ended) and publish what that decided. Duplicates change nothing."""
    outcome = store.transactional.child_ended(child_run_id, maps.window)
    if outcome.action == "none":
        log.info("child_finished_ignored", extra={"run_id": child_run_id})
        return
    log.info("child_finished", extra={"run_id": outcome.run_id, "child_run_id": child_run_id,
                                      "action": outcome.action, "step": outcome.index})
    if outcome.action == "branch":  # a child branch of a parallel group: its group decided
        branches.child_branch_ended(outcome)
        return
    if outcome.action == "map":  # a map item's child: its map decided, as for any item's end
        saga = registry.get(outcome.saga, outcome.version)
        if outcome.error is not None:
            log.warning("map_item_failed", extra={"run_id": outcome.run_id, "step": saga.steps[outcome.index].name,
                                                  "child_run_id": child_run_id, "error": outcome.error})
        maps.follow(saga, saga.steps[outcome.index], outcome.run_id, outcome.index, outcome.map)
        return
    act(outcome)


# ---------------------------------------------------------------------------------------------- backward


def compensate_child(task, store, saga, step, run_id: str, index: int, token: str, claim, lease: float):
    """The compensation task of a child step, claimed by ``token``: undo the child run first. Returns None
    once the child is undone (the caller runs the step's own compensation, if any, and completes the step),
    a outcomes.FailedForGood (into on_compensation_failed), or raises Ignore (waiting for the child's undo;
    its end publishes this compensation again)."""
    fields = {"run_id": run_id, "step": step.name}
    outcome = store.compensate_child(run_id, index, token, fresh=claim.round_attempt == 1)
    fields["child_run_id"] = outcome.child_run_id
    if outcome.action == "lost":
        raise Ignore()
    if outcome.action == "finished":
        log.info("child_undone", extra=fields)
        return None
    if outcome.action == "failed":
        if store.fail_compensation(run_id, index, token, outcome.error):
            log.warning("compensation_failed", extra={**fields, "error": outcome.error})
            return FailedForGood(NonRetryableError(outcome.error))
        raise Ignore()
    if outcome.action == "compensate":
        with publish.or_log(log, "child_compensation_not_published", fields):  # the sweeper re-drives it
            publish.compensations(registry.get(outcome.saga, outcome.version), outcome.run_id, outcome.indexes)
        log.info("child_compensation_begun", extra={**fields, "steps": len(outcome.indexes)})
    raise Ignore()  # the parent's compensation goes on when the child's undo ends (child_finished)


# ---------------------------------------------------------------------------------------------- operators


def signal(store, run_id: str, name: str, payload=None, origin: dict | None = None):
    """Deliver signal ``name`` (payload: any JSON value) to a run; returns the run. Refused, changing
    nothing: a bad name or payload (InvalidInput), an unknown run (UnknownRun), a final run, a saga with no
    gate for ``name``, a second delivery (InvalidTransition)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidInput(f"signal name {name!r} must be an identifier (letters, digits, underscore)")
    payload = ensure_json(payload, f"the payload of signal {name!r}", get_settings().json_limits)
    if payload is None:
        required = required_payload_gate(store.get_run(run_id, history=False), name)
        if required is not None:
            raise InvalidInput(f"gate {required!r} requires a payload with signal {name!r}: send a JSON value "
                               f"(for example {{\"by\": \"<your name>\"}})")
    outcome = store.transactional.deliver_signal(run_id, name, payload, origin)
    log.info("signal_received", extra={"run_id": run_id, "signal": name, "action": outcome.action})
    act(outcome)
    return store.get_run(run_id)


def required_payload_gate(run, name: str) -> str | None:
    """The name of the run's gate that waits for signal ``name`` and declares ``payload_required``, or None
    (also when the run's saga version is not registered here: the store then judges alone)."""
    try:
        saga = registry.get(run.saga, run.saga_version)
    except UnknownSaga:
        return None
    return next((s.name for s in saga.steps if s.signal == name and getattr(s, "payload_required", False)), None)


def cancel(store, run_id: str, origin: dict | None = None):
    """client.cancel: a scheduled run (store/timers.py) or a run queued for its saga's slot (store/limits.py)
    is cancelled at once; a pending or running run through Store.request_cancel; a waiting one (gate, sleep,
    long retry delay, child) here."""
    if store.cancel_scheduled(run_id):
        log.info("scheduled_run_cancelled", extra={"run_id": run_id})
        return store.get_run(run_id)
    if store.cancel_queued_run(run_id):
        log.info("queued_run_cancelled", extra={"run_id": run_id})
        return store.get_run(run_id)
    try:
        run = store.request_cancel(run_id, origin)
        _leave_step_queue(store, run)
        _cancel_child_branches(store, run)
        return run
    except InvalidTransition:
        outcomes = store.transactional.cancel_waiting(run_id, origin)
        if outcomes is None:  # not waiting either: the run is final or compensating
            raise
    for outcome in outcomes:
        log.info("waiting_run_cancelled", extra={"run_id": outcome.run_id, "step": outcome.index})
        act(outcome)
    return store.get_run(run_id)


def _cancel_child_branches(store, run) -> None:
    """A cancelled running run whose parallel child branches wait for their child runs: cancel those
    children (each compensates itself and its end fails its branch), so the run compensates without waiting
    for their work."""
    for outcome in store.transactional.cancel_child_branches(run.id):
        log.info("waiting_run_cancelled", extra={"run_id": outcome.run_id, "step": outcome.index})
        act(outcome)


def _leave_step_queue(store, run) -> None:
    """A cancelled run whose step waits in a limit's line: publish the step now, so that its claim meets
    the cancel and the run compensates without waiting for a slot."""
    index = store.leave_step_queue(run.id)
    if index is None:
        return
    with publish.or_log(log, "cancel_not_published", {"run_id": run.id, "step": index},
                        next="the recovery sweeper re-drives the run after SAGAFLOW_STALL_TIMEOUT"):
        publish.chain_from(registry.get(run.saga, run.saga_version), run.id, start=index, results={})


# ---------------------------------------------------------------------------------------------- the sweeper


def sweep(store, stall_timeout: float) -> list[Recovery]:
    """Part of every recovery sweep: fail the gates past their deadline (each one's errback compensates its
    run), and tell parents of child runs that ended over ``stall_timeout`` seconds ago unheard."""
    done = []
    for gate in store.expired_gates():
        try:
            timeout = registry.get(gate.saga, gate.saga_version).steps[gate.idx].timeout
            error = f"no signal {gate.signal!r} within {timeout:g} s"
        except (UnknownSaga, IndexError):
            error = f"no signal {gate.signal!r} before the deadline {gate.deadline_at.isoformat()}"
        outcome = store.transactional.time_out_gate(gate.run_id, gate.idx, error)
        if outcome is None:  # signalled, cancelled, or another sweeper got there first
            continue
        log.warning("gate_timed_out", extra={"run_id": gate.run_id, "step": gate.name, "error": error})
        act(outcome)
        done.append(Recovery(run_id=gate.run_id, saga=gate.saga, version=gate.saga_version, action="gate_timeout",
                             index=gate.idx))
    for child_id in store.unreported_children(stall_timeout):
        sent = False
        with publish.or_log(log, "child_finished_not_published", {"run_id": child_id}):  # the next sweep tries again
            publish.child_finished(child_id)
            sent = True
        if not sent:
            continue
        log.warning("child_end_redriven", extra={"run_id": child_id})
        run = store.get_run(child_id, history=False)
        done.append(Recovery(run_id=child_id, saga=run.saga, version=run.saga_version, action="child_finished"))
    return done
