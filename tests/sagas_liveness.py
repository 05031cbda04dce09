"""The saga of the worker-liveness tests (tests/integration/test_liveness.py): three steps on their own queue
with NO time limit of their own, so each has the default one (SAGAFLOW_DEFAULT_STEP_TIMEOUT, 300 s) and a
dead holder's lease would run for minutes: only worker liveness can recover it in seconds."""

from sagaflow import RetryPolicy, Saga, StepContext
from sagaflow.tasks.effects import do, undo

QUEUE = "liveness"
FAST = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=1.0)

liveness = Saga("liveness")


@liveness.step(retry=FAST, compensation_retry=FAST, queue=QUEUE)
def reserve(ctx: StepContext):
    do(ctx)
    return {"reserved": True}


@reserve.compensation
def unreserve(ctx: StepContext):
    undo(ctx)


@liveness.step(retry=FAST, compensation_retry=FAST, queue=QUEUE)
def pay(ctx: StepContext):
    do(ctx)
    return {"paid": True}


@pay.compensation
def refund(ctx: StepContext):
    undo(ctx)


@liveness.step(retry=FAST, compensation_retry=FAST, queue=QUEUE)
def ship(ctx: StepContext):
    do(ctx)
    return {"shipped": True}


# Several workers, several queues (tests/integration/test_liveness.py): each step and its compensation run on
# the step's queue; errbacks and the sweeper on the default one. Each action returns the node that ran it.
routed = Saga("routed")


def _node() -> str:
    from celery import current_task

    return current_task.request.hostname


@routed.step(retry=FAST, compensation_retry=FAST, queue="route_a")
def alpha(ctx: StepContext):
    do(ctx)
    return {"node": _node()}


@alpha.compensation
def unalpha(ctx: StepContext):
    undo(ctx)


@routed.step(retry=FAST, compensation_retry=FAST, queue="route_b")
def beta(ctx: StepContext):
    do(ctx)
    return {"node": _node()}


@beta.compensation
def unbeta(ctx: StepContext):
    undo(ctx)


@routed.step(retry=FAST, compensation_retry=FAST, queue="route_c")
def gamma(ctx: StepContext):
    do(ctx)
    return {"node": _node()}
