"""Sagas that exist only for the tests (the worker imports this module too: SAGAFLOW_IMPORTS)."""

import time

from sagaflow import RetryPolicy, Saga, StepContext
from sagaflow.app import get_store

from tasks.effects import do, undo

FAST = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=1.0)

# A step that returns something JSON cannot hold: the step must fail, once, with a clear error.
bad_result = Saga("bad_result")


@bad_result.step(retry=FAST)
def prepare(ctx: StepContext):
    do(ctx)
    return {"ok": True}


@prepare.compensation
def unprepare(ctx: StepContext):
    undo(ctx)


@bad_result.step(retry=FAST)
def returns_object(ctx: StepContext):
    return {"when": object()}


# The second step reads SQL to check the first step's result was committed before it was published.
commit_order = Saga("commit_order")


@commit_order.step(retry=FAST)
def first(ctx: StepContext):
    return {"token": ctx.run_id[:6]}


@commit_order.step(retry=RetryPolicy(max_attempts=1))
def second(ctx: StepContext):
    stored = get_store().get_run(ctx.run_id).step("first")
    if stored.status != "succeeded" or stored.result != ctx.results["first"]:
        raise AssertionError(f"first step not committed before second ran: {stored}")
    return {"seen": stored.result}


# A step that ignores its soft time limit: the prefork pool kills it at the hard limit (timeout + 5 s),
# and Celery fires its errback twice (celery-facts.md 1.2). It must still be compensated exactly once.
hard_limit = Saga("hard_limit")


@hard_limit.step(retry=FAST)
def reserve(ctx: StepContext):
    do(ctx)
    return {"reserved": True}


@reserve.compensation
def release(ctx: StepContext):
    undo(ctx)


@hard_limit.step(retry=RetryPolicy(max_attempts=1), timeout=1)
def stubborn(ctx: StepContext):
    from billiard.exceptions import SoftTimeLimitExceeded

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            pass  # misbehaving on purpose
    return {}


# A step whose error message is whatever the input says: the status page must show it as text.
echo_error = Saga("echo_error")


@echo_error.step(retry=FAST)
def say(ctx: StepContext):
    from sagaflow import NonRetryableError

    raise NonRetryableError(str(ctx.input.get("message", "")))
