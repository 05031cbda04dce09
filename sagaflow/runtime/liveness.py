"""Worker liveness and the sweeper in every worker, on Celery's worker signals (main process only).

- ``worker_init`` (the main process, before the pool forks): the worker's id (``<node name>:<pid>``) is
  set as this process's current worker, which every pool child inherits, so each claim names it
  (store/workers.py); its first heartbeat is written before any task can run.
- ``worker_ready``: a daemon thread starts that moves the heartbeat every few seconds
  (SAGAFLOW_WORKER_DEAD_AFTER / 5), SQL only; and on the worker's own timer (its main loop, where publishing
  is safe on every transport: from another thread it hangs on RabbitMQ), every SAGAFLOW_RECOVERY_INTERVAL
  seconds, the worker offers to sweep: the SQL lease ``sweeper`` lets one worker of the whole deployment win
  (the holder renews it while it lives), and the winner runs ``recovery.recover_stalled``. Two hundred
  workers mean two hundred one-row UPDATEs per interval and one sweep. A holder that dies loses the lease
  after two intervals, and another worker sweeps.
- ``worker_shutdown`` (a clean stop): the thread stops, the row is deleted, the lease released.

A claim whose worker missed its heartbeats for SAGAFLOW_WORKER_DEAD_AFTER seconds is dead at once,
whatever its lease: a SIGKILLed worker costs about that plus one interval, with no beat process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
import time

from celery.signals import worker_init, worker_ready, worker_shutdown

from sagaflow.app import get_settings, get_store
from sagaflow.model.definition import registry
from sagaflow.runtime import recovery
from sagaflow.runtime.outcomes import describe
from sagaflow.store.workers import current_worker, set_current_worker

log = logging.getLogger("sagaflow.liveness")

SWEEPER_LEASE = "sweeper"

_stop = threading.Event()
_thread: threading.Thread | None = None
_forgotten_at = 0.0


def heartbeat_interval(dead_after: float) -> float:
    """Five heartbeats per dead_after: a worker is declared dead only after missing about four in a row."""
    return max(0.5, dead_after / 5)


def sweeper_lease() -> str:
    """The lease's name: one per set of registered sagas, so workers that register the same sagas (the
    usual deployment: one image) sweep one at a time, and a worker with other sagas sweeps its own runs
    under its own lease (a sweeper re-drives only the sagas it can compile)."""
    names = ",".join(sorted({saga.name for saga in registry.all()}))
    return f"{SWEEPER_LEASE}:{hashlib.sha1(names.encode()).hexdigest()[:16]}"


def sweep_once(holder: str, interval: float, now: dt.datetime | None = None) -> int | None:
    """Offer to sweep: when ``holder`` wins (or keeps) the sweeper lease, sweep and return how many runs
    were re-driven; None when another worker holds it. Any caller may use it (the tests: fifty at once).
    ``now``: the timers' clock (recovery.recover_stalled); the worker's own sweeps pass none."""
    store = get_store()
    if not store.take_lease(sweeper_lease(), holder, 2 * interval):
        return None
    global _forgotten_at
    recovered = recovery.recover_stalled(now=now)
    keep = max(60.0, 4 * get_settings().worker_dead_after)
    if time.monotonic() - _forgotten_at > keep:  # the rows of long-dead workers, now and then
        _forgotten_at = time.monotonic()
        store.forget_dead_workers(keep)
    return len(recovered)


def _beat(worker_id: str, hostname: str, queues: str) -> None:
    """The heartbeat thread: SQL only. (Publishing from a thread of the worker's main process hangs on
    RabbitMQ, so the sweep, which publishes, runs on the worker's own timer: _sweep.)"""
    beat_every = heartbeat_interval(get_settings().worker_dead_after)
    while not _stop.wait(beat_every):
        try:
            get_store().heartbeat(worker_id, hostname, os.getpid(), queues)
        except Exception as exc:  # noqa: BLE001 - a database outage: the next beat tries again
            log.warning("worker_heartbeat_failed", extra={"worker": worker_id, "error": describe(exc),
                                                          "next": f"tried again in {beat_every} s"})


def _sweep(worker_id: str) -> None:
    """On the worker's timer (its main loop), every SAGAFLOW_RECOVERY_INTERVAL seconds."""
    interval = float(get_settings().recovery_interval)
    try:
        count = sweep_once(worker_id, interval)
    except Exception as exc:  # noqa: BLE001 - the next interval tries again
        log.error("worker_sweep_failed", extra={"worker": worker_id, "error": describe(exc),
                                                "next": f"tried again in {interval} s"})
        return
    if count:
        log.info("worker_swept", extra={"worker": worker_id, "recovered": count})


def _queues(sender) -> str:
    try:
        return ",".join(sorted(sender.app.amqp.queues.consume_from or sender.app.amqp.queues))
    except Exception:  # noqa: BLE001 - only shown on the status page
        return ""


@worker_init.connect
def _register(sender=None, **_):
    hostname = getattr(sender, "hostname", None) or os.uname().nodename
    worker_id = f"{hostname}:{os.getpid()}"
    set_current_worker(worker_id)
    try:
        get_store().heartbeat(worker_id, hostname, os.getpid(), _queues(sender))
    except Exception as exc:  # noqa: BLE001 - the heartbeat thread retries; claims fall back to the lease
        log.warning("worker_heartbeat_failed", extra={"worker": worker_id, "error": describe(exc)})
    log.info("worker_registered", extra={"worker": worker_id})


@worker_ready.connect
def _start_heartbeats(sender=None, **_):
    global _thread
    worker_id = current_worker()
    if worker_id is None or (_thread is not None and _thread.is_alive()):
        return
    hostname, queues = worker_id.rsplit(":", 1)[0], ""
    controller = getattr(sender, "controller", None)
    if controller is not None:
        queues = _queues(controller)
    _stop.clear()
    _thread = threading.Thread(target=_beat, args=(worker_id, hostname, queues), name="sagaflow-heartbeat",
                               daemon=True)
    _thread.start()
    settings = get_settings()
    timer = getattr(sender, "timer", None)
    if settings.worker_sweeps and timer is not None:
        timer.call_repeatedly(float(settings.recovery_interval), _sweep, (worker_id,))


@worker_shutdown.connect
def _unregister(**_):
    worker_id = current_worker()
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=10)
    if worker_id is None:
        return
    try:
        store = get_store()
        store.remove_worker(worker_id)
        store.release_lease(sweeper_lease(), worker_id)
    except Exception as exc:  # noqa: BLE001 - its row ages out; the sweeper treats its claims as dead
        log.warning("worker_unregister_failed", extra={"worker": worker_id, "error": describe(exc)})
    log.info("worker_unregistered", extra={"worker": worker_id})
