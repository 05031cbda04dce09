"""Peer: celery-saga 0.1.1 (pip install celery-saga), the same no-op steps, as its README has a user write them.

Each step and each compensation is a Celery task declared with ``saga_task(app, compensate=...)``; a saga is
``Saga(name).add_step(task)``, started with ``.run(queue=...)``. celery-saga keeps a run's whole state as one
JSON document in Redis (``RedisSagaBackend``) and rewrites it at each transition; its orchestration tasks
(``celery_saga.start``, ``run_step``, ``complete``, ``on_error``, ``run_compensation``...) run the user's step
tasks in-process (``task.apply``). W2's 4th step raises, so ``on_error`` chains the compensations of the 3
steps before it, latest first, and the run ends ``compensated``.

The worker runs with the same settings as the plain baseline: Celery's defaults plus ``task_acks_late``, on its
own queue. Its tasks are ``shared_task``s, bound to ``current_app``: the harness makes this app current
before each start (cheap), the worker has it current anyway.

Outcome check: every run's document ends ``completed`` with each step ``success``, or (W2) ``compensated``
with the 4th step ``failed`` and the 3 before it ``compensated``. celery-saga records no order of the
compensations; it chains them latest first by construction (executor.saga_on_error).
"""

from __future__ import annotations

import os

from celery import Celery
from celery_saga import Saga, saga_task
from celery_saga.backends.redis import RedisSagaBackend
from celery_saga.executor import set_default_backend

from bench.plain import DEFAULT_REDIS_URL

QUEUE = "bench_celery_saga"
STEPS = 4

app = Celery("bench_celery_saga", set_as_current=False)


class PeerFailure(Exception):
    """W2's planned failure."""


def configure(redis_url: str) -> None:
    app.conf.update(broker_url=redis_url, task_acks_late=True, task_default_queue=QUEUE,
                    broker_connection_retry_on_startup=True)
    set_default_backend(RedisSagaBackend(url=redis_url))


configure(os.environ.get("BENCH_REDIS_URL") or DEFAULT_REDIS_URL)


def _undo(index: int):
    def undo(compensation_data=None):
        return None

    return saga_task(app, name=f"peer.undo_s{index}")(undo)


def _step(index: int, undo, fail: bool = False):
    def step(**context):
        if fail:
            raise PeerFailure(f"planned failure of s{index}")
        return None

    return saga_task(app, name=f"peer.s{index}{'_fail' if fail else ''}", compensate=undo)(step)


UNDO = [_undo(i) for i in range(STEPS)]
STEP = [_step(i, UNDO[i]) for i in range(STEPS)]
FAIL_LAST = _step(STEPS - 1, UNDO[STEPS - 1], fail=True)


def saga(fail_at: int | None) -> Saga:
    """W1 (every step succeeds) or W2 (the step at ``fail_at``, the last, fails)."""
    s = Saga("bench_w2" if fail_at is not None else "bench_w1")
    for i in range(STEPS):
        s.add_step(FAIL_LAST if i == fail_at else STEP[i])
    return s


W1, W2 = saga(None), saga(STEPS - 1)


def start(fail_at: int | None) -> str:
    app.set_current()
    return (W2 if fail_at is not None else W1).run(queue=QUEUE).saga_id
