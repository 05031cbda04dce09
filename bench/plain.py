"""The baseline: a plain Celery chain of the same no-op steps, no state store.

    chain(plain.step(s0), ..., plain.step(s3), plain.done)
    every link with link_error = plain.undo.si(run_id, index, phase)
    plain.undo applies chain(plain.compensate(k-1), ..., plain.compensate(0), plain.compensated)

The worker runs with exactly sagaflow's Celery settings (config/celeryconfig.py: acks_late, prefetch 1,
events on, no result backend), on its own queue, so it can stay up beside the sagaflow worker.

Why the errback is a task that applies the compensation chain (as sagaflow's on_step_failed does) rather
than the chain itself set as link_error ("inline", kept as an option): an inline chain travels inside every
step's message, k compensation signatures for step k, so a 64-step chain's first message is ~390 KB and a
run serializes megabytes. That would make the baseline slow on long chains and flatter sagaflow. With a
task, the baseline differs from sagaflow only by what sagaflow adds: the state store and its runtime.
On the failure path the inline form saves one message hop; `--plain-errback inline` measures it.

Every run's outcome is checked, without a store: the results travel along the chain, and the last task
(plain.done, or plain.compensated at the end of the compensations) records in the bench's Redis db whether
the run did what it should (every step ran, in order; or every compensation, in reverse order) and when.
That is one Redis write per run.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery, chain

from sagaflow.config.celeryconfig import celery_settings
from sagaflow.config.settings import Settings

QUEUE = "bench_plain"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"

app = Celery("bench_plain")


def configure(redis_url: str) -> None:
    settings = Settings.from_env({"SAGAFLOW_BROKER_URL": redis_url})
    app.conf.update(celery_settings(settings))
    app.conf.update(task_default_queue=QUEUE, broker_url=redis_url)
    app.conf.bench_redis_url = redis_url


configure(os.environ.get("BENCH_REDIS_URL") or DEFAULT_REDIS_URL)

_redis: redis.Redis | None = None


def outcomes() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.bench_redis_url)
    return _redis


def outcome_key(phase: str) -> str:
    return f"bench:plain:{phase}"


def record(phase: str, run_id: str, ok: bool) -> None:
    """One hash field per run: "<1|0> <unix time of completion>"."""
    outcomes().hset(outcome_key(phase), run_id, f"{int(ok)} {time.time():.6f}")


class PlainFailure(Exception):
    """W2's planned failure. Plain tasks have no retry policy: the errback fires at once."""


# throws: an expected failure is logged without a traceback, as sagaflow's NonRetryableError is.
@app.task(name="plain.step")
def step(results: dict, *, run_id: str, index: int) -> dict:
    return {**results, f"s{index}": None}


@app.task(name="plain.fail", throws=(PlainFailure,))
def fail(results: dict, *, run_id: str, index: int) -> dict:
    raise PlainFailure(f"planned failure of s{index}")


@app.task(name="plain.done")
def done(results: dict, *, run_id: str, steps: int, phase: str) -> None:
    record(phase, run_id, list(results) == [f"s{i}" for i in range(steps)])


@app.task(name="plain.undo", bind=True)
def undo(self, run_id: str, index: int, phase: str) -> None:
    compensation_chain(run_id, index, phase).apply_async()


@app.task(name="plain.compensate")
def compensate(done: list, *, run_id: str, index: int) -> list:
    return [*done, index]


@app.task(name="plain.compensated")
def compensated(done: list, *, run_id: str, expected: list, phase: str) -> None:
    record(phase, run_id, done == expected)


def compensation_chain(run_id: str, failed_index: int, phase: str):
    """Undo steps failed_index-1 .. 0, latest first; the list of undone indexes travels along the chain
    and plain.compensated checks it."""
    order = list(range(failed_index - 1, -1, -1))
    end = app.signature("plain.compensated", kwargs={"run_id": run_id, "expected": order, "phase": phase})
    if not order:
        return end.clone(args=([],)).set(immutable=True)
    links = [app.signature("plain.compensate", args=([],), kwargs={"run_id": run_id, "index": order[0]},
                           immutable=True)]
    links += [app.signature("plain.compensate", kwargs={"run_id": run_id, "index": i}) for i in order[1:]]
    return chain(*links, end)


def build_chain(run_id: str, steps: int, phase: str, fail_at: int | None = None, errback: str = "task"):
    """The plain run: ``steps`` no-op links (the one at ``fail_at`` raises), then plain.done."""

    def on_error(index: int):
        if errback == "inline":
            return compensation_chain(run_id, index, phase)
        return app.signature("plain.undo", args=(run_id, index, phase), immutable=True)

    links = [
        app.signature("plain.fail" if i == fail_at else "plain.step", args=({},) if i == 0 else (),
                      kwargs={"run_id": run_id, "index": i}, link_error=[on_error(i)])
        for i in range(steps)
    ]
    links.append(app.signature("plain.done", kwargs={"run_id": run_id, "steps": steps, "phase": phase},
                               link_error=[on_error(steps)]))
    return chain(*links)
