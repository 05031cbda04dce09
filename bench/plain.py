"""The baselines: a plain Celery chain of the same no-op steps, no state store, on two Celery apps.

    chain(plain.step(s0), ..., plain.step(s3), plain.done)
    every link with link_error = plain.undo.si(run_id, index, phase)
    plain.undo applies chain(plain.compensate(k-1), ..., plain.compensate(0), plain.compensated)

``app`` (queue bench_plain) is the honest denominator: Celery's own defaults plus ``task_acks_late`` (which
any saga needs: a step whose worker dies must come back), i.e. what a user who picks a plain chain instead
of sagaflow would run: prefetch 4, no task events, no result backend. ``same_app`` (queue bench_plain_same)
runs with exactly sagaflow's Celery settings (config/celeryconfig.py), so the difference between the two
rows is what sagaflow's settings cost a chain, and the difference to sagaflow is what sagaflow itself adds.
Both register the same tasks, under the same names, each on its own queue, so their workers stay up beside
the sagaflow worker.

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

QUEUE = "bench_plain"  # Celery's defaults + acks_late
SAME_QUEUE = "bench_plain_same"  # sagaflow's Celery settings
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"

# set_as_current=False: the bench process holds several apps (sagaflow's, these, celery-saga's); none of
# them must become the one `current_app` resolves to by accident.
app = Celery("bench_plain", set_as_current=False)
same_app = Celery("bench_plain_same", set_as_current=False)
_redis_url = DEFAULT_REDIS_URL


def defaults_settings(redis_url: str) -> dict:
    """Celery's defaults, plus acks_late and the bench's broker and queue (nothing else is set)."""
    return {"broker_url": redis_url, "task_acks_late": True, "task_default_queue": QUEUE,
            "broker_connection_retry_on_startup": True}


def configure(redis_url: str, env: dict | None = None) -> None:
    """Both apps on this Redis db. ``same_app`` takes sagaflow's settings from ``env`` (default: the SAGAFLOW_*
    variables of this process, which the bench hands to every worker it starts), so the publisher (the
    harness) and the worker agree, e.g. on SAGAFLOW_TASK_EVENTS (sent events are the publisher's)."""
    global _redis_url, _redis
    if redis_url != _redis_url:
        _redis = None
    _redis_url = redis_url
    app.conf.update(defaults_settings(redis_url))
    env = {k: v for k, v in (os.environ if env is None else env).items() if k.startswith("SAGAFLOW_")}
    settings = Settings.from_env({**env, "SAGAFLOW_BROKER_URL": redis_url})
    same_app.conf.update(celery_settings(settings))
    same_app.conf.update(task_default_queue=SAME_QUEUE, broker_url=redis_url)


_redis: redis.Redis | None = None


def outcomes() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(_redis_url)
    return _redis


def outcome_key(phase: str) -> str:
    return f"bench:plain:{phase}"


def record(phase: str, run_id: str, ok: bool) -> None:
    """One hash field per run: "<1|0> <unix time of completion>"."""
    outcomes().hset(outcome_key(phase), run_id, f"{int(ok)} {time.time():.6f}")


class PlainFailure(Exception):
    """W2's planned failure. Plain tasks have no retry policy: the errback fires at once."""


def _step(results: dict, *, run_id: str, index: int) -> dict:
    return {**results, f"s{index}": None}


def _fail(results: dict, *, run_id: str, index: int) -> dict:
    raise PlainFailure(f"planned failure of s{index}")


def _done(results: dict, *, run_id: str, steps: int, phase: str) -> None:
    record(phase, run_id, list(results) == [f"s{i}" for i in range(steps)])


def _undo(self, run_id: str, index: int, phase: str) -> None:
    compensation_chain(run_id, index, phase, self.app).apply_async()


def _compensate(done: list, *, run_id: str, index: int) -> list:
    return [*done, index]


def _compensated(done: list, *, run_id: str, expected: list, phase: str) -> None:
    record(phase, run_id, done == expected)


def _register(a: Celery) -> tuple:
    # throws: an expected failure is logged without a traceback, as sagaflow's NonRetryableError is.
    return (a.task(name="plain.step")(_step), a.task(name="plain.fail", throws=(PlainFailure,))(_fail),
            a.task(name="plain.done")(_done), a.task(name="plain.undo", bind=True)(_undo),
            a.task(name="plain.compensate")(_compensate), a.task(name="plain.compensated")(_compensated))


step, fail, done, undo, compensate, compensated = _register(app)
_register(same_app)
configure(os.environ.get("BENCH_REDIS_URL") or DEFAULT_REDIS_URL)


def compensation_chain(run_id: str, failed_index: int, phase: str, on: Celery = app):
    """Undo steps failed_index-1 .. 0, latest first; the list of undone indexes travels along the chain
    and plain.compensated checks it."""
    order = list(range(failed_index - 1, -1, -1))
    end = on.signature("plain.compensated", kwargs={"run_id": run_id, "expected": order, "phase": phase})
    if not order:
        return end.clone(args=([],)).set(immutable=True)
    links = [on.signature("plain.compensate", args=([],), kwargs={"run_id": run_id, "index": order[0]},
                          immutable=True)]
    links += [on.signature("plain.compensate", kwargs={"run_id": run_id, "index": i}) for i in order[1:]]
    return chain(*links, end)


def build_chain(run_id: str, steps: int, phase: str, fail_at: int | None = None, errback: str = "task",
                on: Celery = app):
    """The plain run: ``steps`` no-op links (the one at ``fail_at`` raises), then plain.done."""

    def on_error(index: int):
        if errback == "inline":
            return compensation_chain(run_id, index, phase, on)
        return on.signature("plain.undo", args=(run_id, index, phase), immutable=True)

    links = [
        on.signature("plain.fail" if i == fail_at else "plain.step", args=({},) if i == 0 else (),
                     kwargs={"run_id": run_id, "index": i}, link_error=[on_error(i)])
        for i in range(steps)
    ]
    links.append(on.signature("plain.done", kwargs={"run_id": run_id, "steps": steps, "phase": phase},
                              link_error=[on_error(steps)]))
    return chain(*links)
