"""Time as a step: sleeps, retry delays longer than the broker should hold a message, delayed starts and
schedules. Every one is a time kept in SQL (store/timers.py, store/schedules.py); none holds a worker or a
message while it waits. The recovery sweeper (runtime/recovery.py, in every worker, one at a time) calls
``sweep`` with its ``now`` each SAGAFLOW_RECOVERY_INTERVAL seconds, so a timer fires within one interval of
its time, and a worker kill, a broker restart or a redeploy in between changes nothing.

- **Sleep** (``saga.sleep("cool_off", seconds)``): the step task claims the step like any other, then hands
  it here (``enter_sleep``): the step and the run go ``waiting`` with the wake-up time, the task ends. When
  due, the sweeper passes the step and publishes the chain from the next step.
- **Long retry delay**: a step whose retry delay is at least SAGAFLOW_DURABLE_RETRY_AFTER seconds does not
  wait as a Celery countdown (which on Redis must stay below the visibility timeout): the retry is recorded,
  then the step waits in SQL (``wait_retry``); when due, the sweeper sets it pending and publishes the chain
  from it, and the next delivery claims it as the next attempt.
- **Delayed start** (``client.start(..., at=/delay=)``): the run is recorded ``scheduled``; when due the
  sweeper moves it to pending and publishes its first step.
- **Schedules**: each due tick inserts a ``scheduled`` run (idempotency key ``schedule:<name>:<tick>``),
  which the same sweep then starts.

``now`` is the sweeper's clock, a parameter: a test moves it to fire a three-day sleep at once, while the
worker under test keeps the real clock. Cancelling a sleeping or retry-waiting run fails the waiting step and
compensates at once (runtime/waits.py ``cancel``); a scheduled run is cancelled before it starts.
"""

from __future__ import annotations

import datetime as dt
import logging

from celery.exceptions import Ignore

from sagaflow.app import get_settings
from sagaflow.errors import DefinitionError, NonRetryableError, UnknownSaga
from sagaflow.model import Recovery, StepSpec, WaitOutcome, clock, policy
from sagaflow.model.definition import StepContext, check_sleep_seconds, registry
from sagaflow.model.schedule import CatchUp, due_ticks
from sagaflow.runtime import publish, waits
from sagaflow.runtime.outcomes import FailedForGood, cancelled, describe

log = logging.getLogger("sagaflow.timers")


def schedule_grace(recovery_interval: float) -> float:
    """How old a tick may be when a sweep sees it and still count as on time (fired, whatever the catch-up
    policy): a few sweep intervals, at least a minute. Older ticks were missed while nothing swept."""
    return max(60.0, 3 * float(recovery_interval))


# ---------------------------------------------------------------------------------------------- a step waits


def enter_sleep(store, saga, step, run_id: str, index: int, token: str, claim, results: dict):
    """A sleep step claimed by ``token``: record its wake-up time. Returns an outcomes.FailedForGood (a cancel
    came in: into the errback) or raises Ignore (the run sleeps: nothing continues now)."""
    fields = {"run_id": run_id, "step": step.name}
    seconds = step.seconds
    if callable(seconds):
        ctx = StepContext(run_id=run_id, saga=saga.name, step=step.name, input=claim.input, attempt=claim.attempt,
                          idempotency_key=f"{run_id}:{step.name}", results=dict(results))
        try:
            seconds = check_sleep_seconds(seconds(ctx), f"sleep {step.name!r}")
        except DefinitionError as exc:  # the run's data gave a bad duration: the step fails, the run compensates
            if store.fail_step(run_id, index, token, str(exc)):
                log.warning("step_failed", extra={**fields, "error": str(exc)})
                return FailedForGood(NonRetryableError(str(exc)))
            raise Ignore() from None
    outcome = store.start_sleep(run_id, index, token, float(seconds))
    if outcome.action == "cancelled":
        return cancelled(run_id, f"at the sleep {step.name!r}")
    if outcome.action == "waiting":
        log.info("run_sleeping", extra={**fields, "seconds": seconds})
    else:
        log.warning("step_result_dropped", extra={**fields, "reason": "another delivery holds the sleep"})
    raise Ignore()


def wait_retry(store, run_id: str, index: int, token: str, delay: float, fields: dict):
    """After a retry was recorded: the step waits ``delay`` seconds in SQL instead of as a Celery countdown.
    Returns an outcomes.FailedForGood (a cancel came in) or raises Ignore."""
    outcome = store.wait_retry(run_id, index, token, delay)
    if outcome.action == "cancelled":
        return cancelled(run_id, "while the step waited to retry")
    if outcome.action == "waiting":
        log.info("step_retry_waits", extra={**fields, "retry_in": round(delay, 3), "kept_in": "sql"})
    raise Ignore()


# ---------------------------------------------------------------------------------------------- the sweeper


def _act(outcome: WaitOutcome) -> None:
    if outcome.action == "resume":  # a retry wait is over: the chain from the step itself
        with publish.or_log(log, "timer_not_published", {"run_id": outcome.run_id, "step": outcome.index},
                            next="the recovery sweeper re-drives the run after SAGAFLOW_STALL_TIMEOUT"):
            publish.chain_from(registry.get(outcome.saga, outcome.version), outcome.run_id, start=outcome.index,
                               results=outcome.results)
    else:
        waits.act(outcome)


def sweep(store, now: dt.datetime | None = None) -> list[Recovery]:
    """Fire every timer due at ``now`` (default: model/clock.py's, the wall clock unless sagaflow.testing
    moves it): sleeps and retry waits, schedules' ticks, delayed starts. Returns what it moved on. Only the
    sagas registered here (a sweeper moves on only what it can compile); one sweeper wins each timer and
    each tick."""
    now = now or clock.now()
    done: list[Recovery] = []
    for part in (fire_timers, fire_schedules, start_due):  # schedules before starts: a tick starts this sweep
        try:
            done += part(store, now)
        except Exception as exc:  # noqa: BLE001 - never stops the recovery sweep; the next sweep tries again
            log.error("timers_sweep_failed", extra={"part": part.__name__, "error": describe(exc)})
    return done


def fire_timers(store, now: dt.datetime) -> list[Recovery]:
    done = []
    for timer in store.due_timers(now):
        try:
            registry.get(timer.saga, timer.saga_version)
        except UnknownSaga:
            continue
        outcome = store.transactional.fire_timer(timer.run_id, timer.idx, now)
        if outcome is None:  # cancelled, or another sweeper fired it first
            continue
        log.info("timer_went_off", extra={"run_id": timer.run_id, "step": timer.name,
                                          "due": timer.deadline_at.isoformat(),
                                          "timer": "sleep" if timer.kind == "sleep" else "retry"})
        _act(outcome)
        done.append(Recovery(run_id=timer.run_id, saga=timer.saga, version=timer.saga_version, action="timer_fired",
                             index=timer.idx))
    return done


def fire_schedules(store, now: dt.datetime) -> list[Recovery]:
    settings = get_settings()
    grace = schedule_grace(settings.recovery_interval)
    done = []
    for schedule in store.due_schedules(now):
        try:
            definition = registry.get(schedule.saga)
            mode = policy.mode_for(definition, settings)
        except Exception as exc:  # noqa: BLE001 - an unknown saga or a bad policy: the next sweep tries again
            log.error("schedule_not_fired", extra={"schedule": schedule.name, "saga": schedule.saga,
                                                   "error": describe(exc)})
            continue
        ticks, following = due_ticks(schedule.cron, schedule.next_fire_at, now, grace, CatchUp(schedule.catchup))
        created = store.fire_schedule(schedule, ticks, following, definition.version,
                                      [StepSpec.of(s) for s in definition.steps], mode)
        if created:
            log.info("schedule_fired", extra={"schedule": schedule.name, "runs": len(created),
                                              "next": following.isoformat()})
        done += [Recovery(run_id=run_id, saga=definition.name, version=definition.version, action="schedule_fired")
                 for run_id in created]
    return done


def start_due(store, now: dt.datetime) -> list[Recovery]:
    done = []
    for run in store.due_starts(now):
        try:
            definition = registry.get(run.saga, run.saga_version)
        except UnknownSaga:
            continue
        if not store.release_scheduled(run.id, now):  # cancelled, or another sweeper started it
            continue
        if run.deadline_at is None and definition.deadline is not None:
            store.set_deadline(run.id, clock.now() + dt.timedelta(seconds=definition.deadline))
        with publish.or_log(log, "scheduled_run_not_published", {"run_id": run.id},
                            next="the run is pending: the recovery sweeper starts it after SAGAFLOW_STALL_TIMEOUT"):
            publish.start(definition, run.id, plain=run.mode == policy.PLAIN, input=run.input)
        log.info("run_started_when_due", extra={"run_id": run.id, "saga": run.saga})
        done.append(Recovery(run_id=run.id, saga=run.saga, version=run.saga_version, action="run_started"))
    return done
