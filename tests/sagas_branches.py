"""Sagas for the tests of branches (the test worker imports this module: SAGAFLOW_IMPORTS).

Every action and undo records its effect (tasks/effects.py), with the usual knobs (fail_at, sleep, flaky,
fail_compensation), plus:
  fail_branches: ["<step>", ...]   those steps fail with a non-retryable error (several at once)
  barrier: true                    each branch, running, waits (up to 10 s) until every sibling of its group
                                   has started, and fails if one never does: as each waits for the others,
                                   every pair ran at the same time at some instant (proof of overlap)
"""

import time

from sagaflow import NonRetryableError, Parallel, RetryPolicy, Saga, Step, StepContext
from sagaflow.app import get_store
from sagaflow.tasks.effects import ExampleFailure, _sleep, do, undo
from tests.sagas import ignore_soft_time_limit

FAST = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=1.0)


def _wait_for_siblings(ctx: StepContext) -> None:
    run = get_store().get_run(ctx.run_id)
    me = run.step(ctx.step)
    siblings = [s.name for s in run.steps if s.group == me.group and s.name != ctx.step]
    deadline = time.monotonic() + 10
    while True:
        run = get_store().get_run(ctx.run_id)
        # A sibling that started may have finished already: it waited, running, until this branch started.
        if all(run.step(name).status != "pending" for name in siblings):
            return
        if time.monotonic() > deadline:
            raise NonRetryableError(f"{ctx.step}: the siblings never ran at the same time as this branch")
        time.sleep(0.02)


def act(ctx: StepContext):
    if ctx.input.get("barrier") and get_store().get_run(ctx.run_id).step(ctx.step).group is not None:
        _wait_for_siblings(ctx)
    if ctx.step in ctx.input.get("fail_branches", ()):
        _sleep(ctx)  # the "sleep" knob, as do() applies it
        raise ExampleFailure(f"{ctx.step} failed on purpose (fail_branches)")
    do(ctx)
    return {"step": ctx.step, "saw": sorted(ctx.results)}


def _step(name: str, **options) -> Step:
    return Step(name, act, undo, retry=FAST, compensation_retry=FAST, **options)


# prepare -> (left | right) -> after
par_join = Saga("par_join", [_step("prepare"), Parallel(_step("left"), _step("right")), _step("after")])

# A group that ends the saga: the join finishes the run.
par_last = Saga("par_last", [_step("first"), Parallel(_step("a"), _step("b"), _step("c"))])

# A group that starts the saga, with a member that has no compensation.
par_first = Saga("par_first", [Parallel(_step("x"), Step("y", act, retry=FAST)), _step("z")])

# For the crash tests: the faults queue (only the worker a test kills and its rescuer run it) and 3 s time
# limits, so a dead holder's lease (3 + 5 + 2 s) runs out within seconds.
_fault = dict(timeout=3, queue="faults")
par_faults = Saga("par_faults", [_step("book", **_fault), Parallel(_step("left", **_fault), _step("right", **_fault)),
                                 _step("notify", **_fault)])


def _stubborn(ctx: StepContext):
    """Ignores its soft time limit: the prefork pool kills it at the hard limit (timeout + 5 s), and Celery
    fires its errback twice (celery-facts.md 1.2). It records no effect."""
    return ignore_soft_time_limit()


# prepare -> (stubborn | quick) -> after: a branch lost at its hard time limit, while the run is live or after
# the other branch failed.
par_hard = Saga("par_hard", [_step("prepare"),
                             Parallel(Step("stubborn", _stubborn, undo, retry=RetryPolicy(max_attempts=1), timeout=1),
                                      _step("quick")),
                             _step("after")])


# prepare -> (patient | doomed) -> after: patient waits 1.5 s before its retry (flaky), doomed fails meanwhile.
SLOW_RETRY = RetryPolicy(max_attempts=3, initial_interval=1.5, jitter=False)
par_retry = Saga("par_retry", [_step("prepare"),
                               Parallel(Step("patient", act, undo, retry=SLOW_RETRY, compensation_retry=FAST),
                                        _step("doomed")),
                               _step("after")])


# prepare -> (maybe, best-effort | sure) -> after: a best-effort branch that gives up still lets the group join.
par_best = Saga("par_best", [_step("prepare"), Parallel(_step("maybe", best_effort=True), _step("sure")),
                             _step("after")])
