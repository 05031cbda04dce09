"""The statuses of runs and steps, and the rules of what each allows: which are final, which are live (the
page refreshes), which an operator may cancel or retry. Faces (web/, cli/) ask these rules; none keeps
its own list of statuses. The store's guarded transitions enforce the same rules in SQL (a cancel or a
retry that loses is refused there whatever a page showed)."""

from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    SUCCEEDED = "succeeded"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    WAITING = "waiting"  # at a gate (for a signal) or a child step (for the child run): holds no worker
    STUCK = "stuck"  # a step after the pivot failed for good: waits for an operator (client.retry)
    RESOLVED = "resolved"  # an operator settled a compensation_failed or stuck run by hand (client.resolve)
    # A delayed start (client.start(at=/delay=), or a schedule's tick): recorded, no step published yet; the
    # sweeper moves it scheduled -> pending and publishes its first step when due. A cancel moves it
    # scheduled -> cancelled at once (nothing ran, nothing to undo). No other transition leaves it.
    SCHEDULED = "scheduled"
    QUEUED = "queued"  # over its saga's max_concurrent_runs: waits for a slot, holding no worker

    def __str__(self) -> str:
        return self.value


# compensation_failed and stuck are final for the runtime but wait for an operator (client.retry).
FINAL_RUN_STATUSES = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.COMPENSATED, RunStatus.COMPENSATION_FAILED, RunStatus.CANCELLED, RunStatus.FAILED,
     RunStatus.STUCK, RunStatus.RESOLVED}
)


class StepStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    SKIPPED = "skipped"
    WAITING = "waiting"  # a gate waiting for its signal, a child step for its child run, a sleep or a long
    # retry delay for its time (deadline_at: when the sweeper moves it on)
    FAILED_BEST_EFFORT = "failed_best_effort"  # a best-effort step failed for good; the run went on
    QUEUED = "queued"  # over its concurrency or rate_limit: waits for a slot, holding no worker

    def __str__(self) -> str:
        return self.value


# Not final: the page showing such a run refreshes itself.
LIVE_RUN_STATUSES = frozenset({RunStatus.PENDING, RunStatus.RUNNING, RunStatus.COMPENSATING, RunStatus.WAITING,
                               RunStatus.SCHEDULED, RunStatus.QUEUED})
# A cancel may be asked of these (the run stops before its next step, or its gate, sleep or child is failed; a
# scheduled or queued run is cancelled at once).
CANCELLABLE_RUN_STATUSES = frozenset({RunStatus.PENDING, RunStatus.RUNNING, RunStatus.WAITING, RunStatus.SCHEDULED,
                                      RunStatus.QUEUED})
# The guarded moves out of ``scheduled`` (store/timers.py enforces them in SQL): released when due, or cancelled.
SCHEDULED_TRANSITIONS = {RunStatus.SCHEDULED: frozenset({RunStatus.PENDING, RunStatus.CANCELLED})}
# An operator retry resumes these: the compensations where they stopped, or the step after the pivot.
RETRYABLE_RUN_STATUSES = frozenset({RunStatus.COMPENSATION_FAILED, RunStatus.STUCK})
# An operator may settle these by hand (client.resolve): they move to resolved, nothing is published.
RESOLVABLE_RUN_STATUSES = RETRYABLE_RUN_STATUSES
# A run in these waits for someone (an operator, or a gate's signal): the status page shows how long.
WAITING_FOR_SOMEONE_RUN_STATUSES = frozenset({RunStatus.COMPENSATION_FAILED, RunStatus.STUCK, RunStatus.WAITING})
# A run in these has completed steps still to undo ("awaiting undo" on the page).
UNDOING_RUN_STATUSES = frozenset({RunStatus.COMPENSATING, RunStatus.COMPENSATION_FAILED})
# A step in these is held by a worker (its action, or its undo, runs): the page shows its lease and worker.
HELD_STEP_STATUSES = frozenset({StepStatus.RUNNING, StepStatus.COMPENSATING})


def is_live(status: str) -> bool:
    """The run is not final yet (a page showing it refreshes)."""
    return status in LIVE_RUN_STATUSES


def past_pivot(run) -> str | None:
    """The name of the run's pivot step if it succeeded (no cancel is taken past it), else None. Needs the
    run's steps (a snapshot read with its history)."""
    return next((s.name for s in run.steps if s.pivot and s.status == StepStatus.SUCCEEDED), None)


def can_cancel(run) -> bool:
    """A cancel may be asked: the run is pending, running or waiting, no cancel was asked yet, and it is not
    past its pivot."""
    return run.status in CANCELLABLE_RUN_STATUSES and not run.cancel_requested and past_pivot(run) is None


def can_retry(run) -> bool:
    """An operator retry applies: compensation_failed (resume the undos) or stuck (the step after the pivot)."""
    return run.status in RETRYABLE_RUN_STATUSES


def can_resolve(run) -> bool:
    """An operator may settle the run by hand, with a note: compensation_failed or stuck."""
    return run.status in RESOLVABLE_RUN_STATUSES


def can_restart(run) -> bool:
    """A new run of the same saga may be started from this one: it is final (whatever the outcome)."""
    return run.status in FINAL_RUN_STATUSES


def cancel_pending(run) -> bool:
    """A cancel was asked and the run has not acted on it yet."""
    return bool(run.cancel_requested) and run.status in CANCELLABLE_RUN_STATUSES


def counts_by_status(counts: dict[tuple[str, str], int]) -> dict[str, int]:
    """{(saga, status): n} -> every run status (zeros included, in the order of RunStatus) -> count."""
    totals = {s.value: 0 for s in RunStatus}
    for (_, status), n in counts.items():
        totals[status] = totals.get(status, 0) + n
    return totals


def compensation_rate(counts: dict[tuple[str, str], int]) -> float | None:
    """Of the runs that reached a final status, the share a failed step sent back (compensated, or
    compensation_failed); None before any run finished. Cancelled runs count as finished, not as failures."""
    final = {s.value for s in FINAL_RUN_STATUSES}
    finished = sum(n for (_, status), n in counts.items() if status in final)
    failed = sum(n for (_, status), n in counts.items()
                 if status in (RunStatus.COMPENSATED.value, RunStatus.COMPENSATION_FAILED.value))
    return round(failed / finished, 4) if finished else None
