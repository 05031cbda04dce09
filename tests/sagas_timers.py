"""Sagas for the tests of time as a step (issue 18): sleeps, long retry delays, delayed starts, schedules.
The test worker imports this module (SAGAFLOW_IMPORTS). Every action and undo records its effect once
(tasks/effects.py), with the usual knobs (fail_at, flaky, sleep) read from the run's input."""

from sagaflow import RetryPolicy, Saga, Sleep, Step, StepContext
from sagaflow.tasks.effects import do, undo

FAST = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=0.5)
# Three hours between attempts: far above the broker's redelivery window, so the wait is kept in SQL.
THREE_HOURS = RetryPolicy(max_attempts=2, initial_interval=3 * 3600, kind="fixed", max_interval=3 * 3600,
                          jitter=False)


def _do(ctx: StepContext):
    do(ctx)
    return {"step": ctx.step}


# reserve -> cool_off (a sleep of input["seconds"], default 5) -> ship
nap = Saga("nap")


@nap.step(retry=FAST, compensation_retry=FAST)
def reserve(ctx: StepContext):
    return _do(ctx)


@reserve.compensation
def release(ctx: StepContext):
    undo(ctx)


nap.sleep("cool_off", lambda ctx: ctx.input.get("seconds", 5))


@nap.step(retry=FAST, compensation_retry=FAST)
def ship(ctx: StepContext):
    return _do(ctx)


@ship.compensation
def unship(ctx: StepContext):
    undo(ctx)


# The same shape in the plain form, with a fixed sleep of three days.
nap_long = Saga("nap_long", steps=[
    Step("reserve", _do, undo, retry=FAST, compensation_retry=FAST),
    Sleep("three_days", 3 * 24 * 3600),
    Step("ship", _do, undo, retry=FAST, compensation_retry=FAST),
])

# A five-second sleep whose steps run on their own queue "timers": a worker the test kills and restarts.

nap_queued = Saga("nap_queued", steps=[
    Step("reserve", _do, undo, retry=FAST, compensation_retry=FAST, queue="timers"),
    Sleep("cool_off", 5),
    Step("ship", _do, undo, retry=FAST, compensation_retry=FAST, queue="timers"),
])

# reserve -> charge (fails its first attempt with input {"flaky": {"charge": 1}}; the retry waits 3 hours)
patient = Saga("patient", steps=[
    Step("reserve", _do, undo, retry=FAST, compensation_retry=FAST),
    Step("charge", _do, undo, retry=THREE_HOURS, compensation_retry=FAST),
])

# One quick step: the runs schedules and delayed starts start.
tick = Saga("tick", steps=[Step("note", _do)])
