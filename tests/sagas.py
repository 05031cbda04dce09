"""Sagas that exist only for the tests (the worker imports this module too: SAGAFLOW_IMPORTS)."""

import time

from sagaflow import NonRetryableError, RetryPolicy, Saga, Step, StepContext
from sagaflow.app import get_store
from sagaflow.tasks.effects import do, undo

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


def ignore_soft_time_limit(seconds: float = 30) -> dict:
    """Misbehave on purpose: sleep through the soft time limit, so the prefork pool kills the process at the
    hard limit (and Celery fires the errback twice, celery-facts.md 1.2)."""
    from billiard.exceptions import SoftTimeLimitExceeded

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            pass
    return {}


@hard_limit.step(retry=RetryPolicy(max_attempts=1), timeout=1)
def stubborn(ctx: StepContext):
    return ignore_soft_time_limit()


# For the crash tests: its own queue, so only the worker a test kills and restarts runs its steps, and a
# short time limit, so a dead holder's lease (timeout + 5 s grace + 2 s) runs out within seconds.
faults = Saga("faults")


@faults.step(retry=FAST, compensation_retry=FAST, timeout=3, queue="faults")
def book(ctx: StepContext):
    do(ctx)
    return {"booked": True}


@book.compensation
def unbook(ctx: StepContext):
    undo(ctx)


@faults.step(retry=FAST, compensation_retry=FAST, timeout=3, queue="faults")
def charge(ctx: StepContext):
    do(ctx)
    return {"charged": True}


@charge.compensation
def refund(ctx: StepContext):
    undo(ctx)


@faults.step(retry=FAST, compensation_retry=FAST, timeout=3, queue="faults")
def notify(ctx: StepContext):
    do(ctx)
    return {"notified": True}


# A long step that stays alive past its lease by heartbeating.
long_running = Saga("long_running")


@long_running.step(retry=RetryPolicy(max_attempts=1), timeout=20, lease=1, queue="faults")
def crunch(ctx: StepContext):
    for _ in range(int(ctx.input.get("beats", 6))):
        time.sleep(0.5)
        ctx.heartbeat()
    do(ctx)
    return {"crunched": True}


def record_alert(run) -> None:
    """SAGAFLOW_ALERT_HOOK of the test workers: append the alert to a file under SAGAFLOW_HOME."""
    import json

    from sagaflow.app import get_settings

    with open(get_settings().home / "alerts.jsonl", "a") as f:
        f.write(json.dumps({"run_id": run.id, "status": run.status, "error": run.error}) + "\n")


# A step with a fixed-delay policy and no jitter: every retry waits exactly the same, whatever the attempt.
FIXED = RetryPolicy(kind="fixed", max_attempts=4, initial_interval=0.3, max_interval=5.0, jitter=False)
fixed_retry = Saga("fixed_retry")


@fixed_retry.step(retry=FIXED)
def poll_partner(ctx: StepContext):
    do(ctx)
    return {"partner": "ready"}


@poll_partner.compensation
def forget_partner(ctx: StepContext):
    undo(ctx)


@fixed_retry.step(retry=FAST)
def confirm(ctx: StepContext):
    do(ctx)
    return {"confirmed": True}


# Two versions of one saga, both registered in the worker (v1 first, as a deploy that adds v2 keeps v1
# for the runs still in flight). Steps that share a name run a different function in each version, and
# each function checks it is handed a run of its own version, so a v1 run that executed (or compensated)
# a v2 step fails loudly instead of passing by accident.
#   v1: reserve (undo) -> notify -> charge (undo)
#   v2: check_fraud -> reserve (undo) -> notify (undo) -> charge (undo) -> receipt
def _versioned(version: int):
    def action(ctx: StepContext):
        do(ctx)
        return {"version": version, "step": ctx.step}

    def compensation(ctx: StepContext):
        if ctx.result.get("version") != version:
            raise NonRetryableError(f"version {version} compensation of {ctx.step} got {ctx.result}")
        undo(ctx)

    return action, compensation


_v1, _undo_v1 = _versioned(1)
_v2, _undo_v2 = _versioned(2)
versioned_v1 = Saga("versioned", version=1, steps=[
    Step("reserve", _v1, _undo_v1, retry=FAST),
    Step("notify", _v1, retry=FAST),
    Step("charge", _v1, _undo_v1, retry=FAST),
])
versioned_v2 = Saga("versioned", version=2, steps=[
    Step("check_fraud", _v2, retry=FAST),
    Step("reserve", _v2, _undo_v2, retry=FAST),
    Step("notify", _v2, _undo_v2, retry=FAST),
    Step("charge", _v2, _undo_v2, retry=FAST),
    Step("receipt", _v2, retry=FAST),
])
# A step whose error message is whatever the input says: the status page must show it as text.
echo_error = Saga("echo_error")


@echo_error.step(retry=FAST)
def say(ctx: StepContext):
    from sagaflow import NonRetryableError

    raise NonRetryableError(str(ctx.input.get("message", "")))


def _long_step(i: int):
    def action(ctx: StepContext):
        do(ctx)
        return {"i": i}

    return Step(f"l{i}", action, undo, retry=FAST, compensation_retry=FAST)


# Longer than a chain window (compiler.CHAIN_WINDOW): published window by window.
long_saga = Saga("long_saga", [_long_step(i) for i in range(20)])


# Hostile input (tests/integration/test_hostile_input.py): a step that returns a value nested ``depth`` deep
# (600 by default: deeper than a prefork worker can pickle for its pool), after a step that has an undo.
def _nested(depth: int):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


deep_result = Saga("deep_result")


@deep_result.step(retry=FAST)
def stage(ctx: StepContext):
    do(ctx)
    return {"staged": True}


@stage.compensation
def unstage(ctx: StepContext):
    undo(ctx)


@deep_result.step(retry=FAST)
def nest(ctx: StepContext):
    do(ctx)
    return {"tree": _nested(int(ctx.input.get("depth", 600)))}


# Two plain steps, the first with an undo: the raw messages of the hostile-input tests target the second.
two_steps = Saga("two_steps")


@two_steps.step(retry=FAST, compensation_retry=FAST)
def open_account(ctx: StepContext):
    do(ctx)
    return {"opened": True}


@open_account.compensation
def close_account(ctx: StepContext):
    undo(ctx)


@two_steps.step(retry=FAST)
def welcome(ctx: StepContext):
    do(ctx)
    return {"welcomed": True}


# Deadlines (tests/integration/test_operator.py): a run may take 2 s; its first step sleeps ``sleep`` s, its
# undo ``undo_sleep`` s under its own time limit (compensation_timeout), and ``after`` fails on demand.
deadline_saga = Saga("deadline_saga", deadline=2)


@deadline_saga.step(timeout=15, compensation_timeout=1.5, compensation_retry=RetryPolicy(max_attempts=1))
def slow(ctx: StepContext):
    time.sleep(float(ctx.input.get("sleep", 10)))
    return {"slept": True}


@slow.compensation
def unslow(ctx: StepContext):
    time.sleep(float(ctx.input.get("undo_sleep", 0)))


@deadline_saga.step(retry=RetryPolicy(max_attempts=1))
def after(ctx: StepContext):
    if ctx.input.get("fail"):
        from sagaflow import NonRetryableError

        raise NonRetryableError("after failed on purpose")
    return {"after": True}


# A programming error (the status page shows its traceback, file and line) and a step past its time limit.
buggy = Saga("buggy")


def _read_customer(record):
    return record.get("customer")  # a str has no .get: AttributeError, as a real bug would


@buggy.step(retry=RetryPolicy(max_attempts=1))
def parse_order(ctx: StepContext):
    return {"customer": _read_customer(str(ctx.input.get("order", "o-1")))}


too_slow = Saga("too_slow")


@too_slow.step(retry=RetryPolicy(max_attempts=1), timeout=1)
def dawdle(ctx: StepContext):
    time.sleep(3)
    return {}
