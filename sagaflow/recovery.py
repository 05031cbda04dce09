"""The recovery sweeper: moves on runs that stalled, from what SQL records.

A run stalls when the process holding one of its steps died (its lease expires: a SIGKILLed worker, a
lost machine) or when a message was lost (a broker restarted without persistence, a crash between a commit
and a publish, a start whose publish failed). Redis would redeliver an unacked message only after the
visibility timeout (hours), and a lost message never. The sweeper finds such runs, takes each over with a
compare-and-set (so two sweepers, or a sweeper and a live worker, never re-drive the same stall twice) and
publishes what SQL says comes next. Claims make any duplicate message harmless.

Run by the beat task ``sagaflow.recover`` every SAGAFLOW_RECOVERY_INTERVAL seconds, and by
``sagaflow recover``.
"""

from __future__ import annotations

import logging

from sagaflow.app import celery_app, get_settings, get_store
from sagaflow.compiler import FINISH_COMPENSATION, ON_STEP_FAILED, compile_compensation, compile_run
from sagaflow.definition import registry
from sagaflow import waits
from sagaflow.store import Recovery

log = logging.getLogger("sagaflow.recovery")


def recover_stalled(stall_timeout: float | None = None, limit: int = 500) -> list[Recovery]:
    """Re-drive every run stalled for ``stall_timeout`` seconds (default SAGAFLOW_STALL_TIMEOUT); returns
    what this caller re-drove."""
    store = get_store()
    stall = get_settings().stall_timeout if stall_timeout is None else stall_timeout
    recovered = waits.sweep(store, stall)  # gates past their deadline, child runs' unheard ends
    for run_id, seen in store.stalled_runs(stall, limit):
        recovery = store.take_over_stalled(run_id, seen, stall)
        if recovery is None:  # another sweeper won, or the run moved meanwhile
            continue
        try:
            publish(recovery)
        except Exception as exc:  # noqa: BLE001 - the run stays stalled, so a later sweep tries again
            log.error("run_recovery_failed", extra={
                "run_id": run_id, "action": recovery.action, "error": f"{type(exc).__name__}: {exc}",
                "next": f"the next sweep retries in {stall} s; check the broker and that this process "
                        f"registers saga {recovery.saga!r} version {recovery.version}"})
            continue
        log.warning("run_recovered", extra={"run_id": run_id, "action": recovery.action,
                                            "step": recovery.index, "revoked": ",".join(recovery.revoked)})
        recovered.append(recovery)
    return recovered


def publish(recovery: Recovery) -> None:
    saga = registry.get(recovery.saga, recovery.version)
    run_id = recovery.run_id
    if recovery.action == "wait":  # a gate or child step waits: its signal, deadline or child moves it
        return
    if recovery.action in ("resume", "finish"):
        compile_run(celery_app, saga, run_id, start=recovery.index, results=recovery.results).apply_async()
    elif recovery.action == "errback":
        celery_app.signature(ON_STEP_FAILED, args=(run_id, recovery.index),
                             kwargs={"saga": recovery.saga, "version": recovery.version}, immutable=True).apply_async()
    elif recovery.indexes:
        compile_compensation(celery_app, saga, run_id, list(recovery.indexes)).apply_async()
    else:
        celery_app.signature(FINISH_COMPENSATION, args=(run_id,), immutable=True).apply_async()
