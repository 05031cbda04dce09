"""The recovery sweeper: moves on runs that stalled, from what SQL records.

A run stalls when the process holding one of its steps died (its lease expires: a SIGKILLed worker, a
lost machine) or when a message was lost (a broker restarted without persistence, a crash between a commit
and a publish, a start whose publish failed). Redis would redeliver an unacked message only after the
visibility timeout (hours), and a lost message never. The sweeper finds such runs, takes each over with a
compare-and-set (so two sweepers, or a sweeper and a live worker, never re-drive the same stall twice) and
publishes what SQL says comes next. Claims make any duplicate message harmless.

Run by every worker's main process (runtime/liveness.py: one at a time across the deployment, through a
SQL lease) every SAGAFLOW_RECOVERY_INTERVAL seconds; optionally by the beat task ``sagaflow.recover``; and
by ``sagaflow recover``. A claim whose worker stopped heartbeating for SAGAFLOW_WORKER_DEAD_AFTER seconds
counts as dead whatever its lease, so a killed worker costs seconds, not the step's time limit.
"""

from __future__ import annotations

import datetime as dt
import logging

from sagaflow.app import get_settings, get_store
from sagaflow.errors import InvalidTransition
from sagaflow.model import Recovery, clock
from sagaflow.model.definition import Saga, registry
from sagaflow.runtime import limits, publish, timers, waits
from sagaflow.runtime.outcomes import describe

log = logging.getLogger("sagaflow.recovery")


def recover_stalled(stall_timeout: float | None = None, limit: int = 500, *,
                    now: dt.datetime | None = None) -> list[Recovery]:
    """Re-drive every run stalled for ``stall_timeout`` seconds (default SAGAFLOW_STALL_TIMEOUT), and fire the
    timers due; returns what this caller moved on. ``now``: the clock the timers are read against (sleeps,
    long retry delays, delayed starts, schedules; default the real clock): a test passes a later time to fire
    a three-day sleep at once. Stall detection and leases keep the real clock."""
    store = get_store()
    settings = get_settings()
    stall = settings.stall_timeout if stall_timeout is None else stall_timeout
    dead_after = settings.worker_dead_after
    recovered = waits.sweep(store, stall)  # gates past their deadline, child runs' unheard ends
    recovered += timers.sweep(store, now)  # sleeps and retry waits due, schedules' ticks, delayed starts
    cancel_past_deadline(store)  # runs live past their own deadline (Saga(deadline=), start(deadline=))
    promote_waiters()  # limits: slots freed by an end or a death nobody reported go to the runs in line
    prune_by_retention(store)  # SAGAFLOW_RETENTION: old ended runs (off by default)
    compact_metrics(store)  # the counter log into one row per series: a /metrics scrape reads little
    # Only the sagas registered here: a sweeper that cannot compile a saga must not take its runs over.
    sagas = sorted({saga.name for saga in registry.all()})
    for run_id, seen in store.stalled_runs(stall, limit, dead_after=dead_after, sagas=sagas):
        recovery = store.take_over_stalled(run_id, seen, stall, dead_after=dead_after)
        if recovery is None:  # another sweeper won, or the run moved meanwhile
            continue
        try:
            redrive(recovery)
        except Exception as exc:  # noqa: BLE001 - the run stays stalled, so a later sweep tries again
            log.error("run_recovery_failed", extra={
                "run_id": run_id, "action": recovery.action, "error": describe(exc),
                "next": f"the next sweep retries in {stall} s; check the broker and that this process "
                        f"registers saga {recovery.saga!r} version {recovery.version}"})
            continue
        log.warning("run_recovered", extra={"run_id": run_id, "action": recovery.action,
                                            "step": recovery.index, "revoked": ",".join(recovery.revoked)})
        recovered.append(recovery)
    return recovered


def cancel_past_deadline(store, limit: int = 500) -> list[str]:
    """Cancel each run still pending, running or waiting past its deadline: a ``deadline_passed`` event,
    then the operator's cancel path (the run stops before its next step and compensates). One sweeper wins
    each deadline; a run past its pivot cannot be cancelled and goes on (logged). Returns the runs cancelled."""
    cancelled = []
    for run_id, deadline_at in store.passed_deadlines(limit):
        if not store.take_deadline(run_id, deadline_at):
            continue
        try:
            waits.cancel(store, run_id)
        except InvalidTransition as exc:  # past its pivot, or it ended meanwhile
            log.warning("deadline_not_cancelled", extra={"run_id": run_id, "deadline": deadline_at.isoformat(),
                                                         "error": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - the broker refused a waiting run's errback: logged, go on
            log.error("deadline_cancel_failed", extra={"run_id": run_id, "error": describe(exc)})
            continue
        log.warning("deadline_passed", extra={"run_id": run_id, "deadline": deadline_at.isoformat()})
        cancelled.append(run_id)
    return cancelled


def promote_waiters() -> int:
    """Give the free slots of every limit that has a line to its earliest waiters (runtime/limits.py). A
    failure is logged and the sweep goes on."""
    try:
        return limits.promote_all()
    except Exception as exc:  # noqa: BLE001 - never stops the recovery sweep
        log.error("limits_promote_failed", extra={"error": describe(exc)})
        return 0


def prune_by_retention(store) -> int:
    """With SAGAFLOW_RETENTION set, delete the runs that ended longer ago than that (store/retention.py:
    short batches; the metrics keep their counts). A failure is logged and the sweep goes on."""
    seconds = get_settings().retention
    if not seconds:
        return 0
    cutoff = clock.now() - dt.timedelta(seconds=seconds)
    try:
        result = store.prune(cutoff)
    except Exception as exc:  # noqa: BLE001 - retention must never stop the recovery sweep
        log.error("retention_prune_failed", extra={"cutoff": cutoff.isoformat(), "error": describe(exc)})
        return 0
    if result.runs:
        log.info("retention_pruned", extra={"runs": result.runs, "cutoff": cutoff.isoformat()})
    return result.runs


def compact_metrics(store) -> int:
    """Move the counter log the transitions append to into one row per series (store/counters.py), so a
    /metrics scrape reads two small tables. A failure is logged; the scrape then reads a longer log (still
    exact) until the next pass."""
    try:
        return store.compact_counters()
    except Exception as exc:  # noqa: BLE001 - never stops the recovery sweep
        log.error("metrics_compact_failed", extra={"error": describe(exc)})
        return 0


# What the sweeper's take-over decided (Recovery.action), one function each.


def _resume(saga: Saga, recovery: Recovery) -> None:  # "resume", and "finish": the finish task alone
    publish.chain_from(saga, recovery.run_id, start=recovery.index, results=recovery.results)


def _errback(saga: Saga, recovery: Recovery) -> None:
    publish.errback(recovery.run_id, recovery.index, recovery.saga, recovery.version)


def _compensate(saga: Saga, recovery: Recovery) -> None:
    if recovery.indexes:
        publish.compensations(saga, recovery.run_id, recovery.indexes)
    else:  # every undo is done: only the run's end is left
        publish.finish_compensation(recovery.run_id)


def _compensation_errback(saga: Saga, recovery: Recovery) -> None:
    """An undo gave up and its errback was lost: publish it again (the run ends compensation_failed)."""
    publish.compensation_errback(recovery.run_id, recovery.index)


def _wait(saga: Saga, recovery: Recovery) -> None:
    """A gate or child step waits: its signal, deadline or child moves it."""


REDRIVE = {"resume": _resume, "finish": _resume, "errback": _errback, "compensate": _compensate,
           "compensation_errback": _compensation_errback, "wait": _wait}


def redrive(recovery: Recovery) -> None:
    """Publish what the take-over decided; raises if the broker refuses (or the saga is not registered here)."""
    saga = registry.get(recovery.saga, recovery.version)
    REDRIVE[getattr(recovery.action, "value", recovery.action)](saga, recovery)
