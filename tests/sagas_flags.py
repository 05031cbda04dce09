"""Sagas for the tests of step flags and policy (the test worker imports this module: SAGAFLOW_IMPORTS).

Every action and compensation records its effect with sagaflow.tasks.effects (do/undo), so the tests check in SQL
that each effect happened exactly once, in order. The knobs of sagaflow.tasks.effects apply (fail_at, flaky, sleep,
fail_compensation), plus:
  fail_after_effect: "<step>"  the step records its effect, then fails (a non-atomic step's partial work)
  blocked: "<step>"            the step fails (retryably) while the file SAGAFLOW_HOME/blocked-<run_id>
                               exists; the test deletes it to "fix the cause"
"""

from sagaflow import RetryPolicy, Saga, StepContext
from sagaflow.app import get_settings
from sagaflow.tasks.effects import ExampleFailure, TransientFailure, do, undo
from tests.sagas import ignore_soft_time_limit

FAST = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=0.5)


def blocked_file(run_id: str):
    return get_settings().home / f"blocked-{run_id}"


def act(ctx: StepContext):
    if ctx.input.get("blocked") == ctx.step and blocked_file(ctx.run_id).exists():
        raise TransientFailure(f"{ctx.step}: blocked until {blocked_file(ctx.run_id)} is removed")
    do(ctx)
    if ctx.input.get("fail_after_effect") == ctx.step:
        raise ExampleFailure(f"{ctx.step} failed half way, after its effect (fail_after_effect)")
    # What this step saw of the earlier steps: a best-effort failure shows as None.
    return {"step": ctx.step, "saw": {name: value is not None for name, value in ctx.results.items()}}


# ---------------------------------------------------------------------------------------------- best-effort

# record -> analytics (best-effort, with an undo that must never run) -> confirm
best_effort = Saga("flags_best_effort")


@best_effort.step(retry=FAST, compensation_retry=FAST)
def record(ctx):
    return act(ctx)


@record.compensation
def unrecord(ctx):
    undo(ctx)


@best_effort.step(retry=FAST, compensation_retry=FAST, best_effort=True)
def analytics(ctx):
    return act(ctx)


@analytics.compensation
def unanalytics(ctx):
    undo(ctx)


@best_effort.step(retry=FAST, compensation_retry=FAST)
def confirm(ctx):
    return act(ctx)


@confirm.compensation
def unconfirm(ctx):
    undo(ctx)


# book -> learn (best-effort, last)
best_effort_last = Saga("flags_best_effort_last")


@best_effort_last.step(retry=FAST, compensation_retry=FAST)
def book(ctx):
    return act(ctx)


@book.compensation
def unbook(ctx):
    undo(ctx)


@best_effort_last.step(retry=FAST, best_effort=True)
def learn(ctx):
    return act(ctx)


# ---------------------------------------------------------------------------------------------- non-atomic

# reserve -> notify (no undo) -> transfer (non-atomic: may move part of the money) -> close
non_atomic = Saga("flags_non_atomic")


@non_atomic.step(retry=FAST, compensation_retry=FAST)
def reserve(ctx):
    return act(ctx)


@reserve.compensation
def unreserve(ctx):
    undo(ctx)


@non_atomic.step(retry=FAST)
def notify(ctx):
    return act(ctx)


@non_atomic.step(retry=FAST, compensation_retry=FAST, non_atomic=True)
def transfer(ctx):
    return act(ctx)


@transfer.compensation
def reverse_transfer(ctx):
    undo(ctx)  # a real one would look up what part of the transfer happened, by ctx.idempotency_key


@non_atomic.step(retry=FAST, compensation_retry=FAST)
def close(ctx):
    return act(ctx)


@close.compensation
def reopen(ctx):
    undo(ctx)


# ---------------------------------------------------------------------------------------------- pivot

# hold -> charge (pivot: the point of no return) -> ship -> receipt
pivot = Saga("flags_pivot")


@pivot.step(retry=FAST, compensation_retry=FAST)
def hold(ctx):
    return act(ctx)


@hold.compensation
def release(ctx):
    undo(ctx)


@pivot.step(retry=FAST, pivot=True)
def charge(ctx):
    return act(ctx)


@pivot.step(retry=FAST, compensation_retry=FAST)
def ship(ctx):
    return act(ctx)


@ship.compensation
def unship(ctx):  # never runs: past the pivot nothing is undone
    undo(ctx)


@pivot.step(retry=FAST)
def receipt(ctx):
    return act(ctx)


# A linear saga (the fast path) for the policy tests: compensation switched on and off by policy.
policy_saga = Saga("flags_policy")


@policy_saga.step(retry=FAST, compensation_retry=FAST)
def open_account(ctx):
    return act(ctx)


@open_account.compensation
def close_account(ctx):
    undo(ctx)


@policy_saga.step(retry=FAST, compensation_retry=FAST)
def fund(ctx):
    return act(ctx)


@fund.compensation
def unfund(ctx):
    undo(ctx)


@policy_saga.step(retry=FAST)
def welcome(ctx):
    return act(ctx)


# ---------------------------------------------------------------------------------------------- lost workers

def _stubborn(ctx: StepContext):
    """Records its effect, then ignores its soft time limit: the pool kills it at the hard limit (timeout +
    5 s), and Celery fires its errback twice (celery-facts.md 1.2)."""
    do(ctx)
    return ignore_soft_time_limit()


# prep -> hang (best-effort, killed at its hard limit) -> after
lost_best_effort = Saga("flags_lost_best_effort")


@lost_best_effort.step(retry=FAST, compensation_retry=FAST)
def prep(ctx):
    return act(ctx)


@prep.compensation
def unprep(ctx):
    undo(ctx)


@lost_best_effort.step(retry=RetryPolicy(max_attempts=1), timeout=1, best_effort=True)
def hang(ctx):
    return _stubborn(ctx)


@lost_best_effort.step(retry=FAST)
def after(ctx):
    return act(ctx)


# setup -> partial (non-atomic, killed at its hard limit after its effect) -> never
lost_non_atomic = Saga("flags_lost_non_atomic")


@lost_non_atomic.step(retry=FAST, compensation_retry=FAST)
def setup(ctx):
    return act(ctx)


@setup.compensation
def teardown(ctx):
    undo(ctx)


@lost_non_atomic.step(retry=RetryPolicy(max_attempts=1), compensation_retry=FAST, timeout=1, non_atomic=True)
def partial(ctx):
    return _stubborn(ctx)


@partial.compensation
def unpartial(ctx):
    undo(ctx)


@lost_non_atomic.step(retry=FAST)
def never(ctx):
    return act(ctx)
