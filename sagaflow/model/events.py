"""The kinds of event a run's history records (saga_events.kind), one name each.

Every event the store writes and every read that picks events by kind (stats, the status page's timeline,
the metrics) names its kind here; the stored text is the member's value, unchanged since these were bare
strings, so rows written before and after read the same. tests/unit/test_model.py fails if a bare string
naming a kind comes back in the store, the stats or the faces.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class EventKind(str, Enum):
    # a run
    RUN_STARTED = "run_started"
    RUN_SUCCEEDED = "run_succeeded"
    RUN_COMPENSATED = "run_compensated"
    RUN_CANCELLED = "run_cancelled"
    RUN_COMPENSATION_FAILED = "run_compensation_failed"
    RUN_FAILED = "run_failed"  # read by the stats; no transition writes it today (a plain run records no events)
    RUN_STUCK = "run_stuck"
    RUN_WAITING = "run_waiting"  # at a gate, a sleep, a long retry delay or a child step
    RUN_SCHEDULED = "run_scheduled"  # a delayed start (detail: start_at; a schedule's tick: schedule, tick)
    TIMER_FIRED = "timer_fired"  # the sweeper found a time due (detail: timer = sleep | retry | start, due)
    RUN_RECOVERED = "run_recovered"  # the sweeper re-drove it
    RUN_RESOLVED = "run_resolved"  # an operator settled it by hand (detail: the note)
    RUN_RESTARTED = "run_restarted"  # on the old run: a new run restarts it (detail: new_run_id)
    RESTARTED_FROM = "restarted_from"  # on the new run: the run it restarts, the version it runs
    DEADLINE_PASSED = "deadline_passed"  # the sweeper found it live at its deadline and cancels it
    RUN_QUEUED = "run_queued"  # over its saga's max_concurrent_runs: waits for a slot (store/limits.py)
    STEP_QUEUED = "step_queued"  # over its step's concurrency or rate_limit: waits, holding no worker
    # a step, forward
    STEP_STARTED = "step_started"
    STEP_SUCCEEDED = "step_succeeded"
    STEP_RETRIED = "step_retried"
    STEP_FAILED = "step_failed"
    STEP_FAILED_BEST_EFFORT = "step_failed_best_effort"
    # a step's compensation
    COMPENSATION_STARTED = "compensation_started"
    COMPENSATION_SUCCEEDED = "compensation_succeeded"
    COMPENSATION_RETRIED = "compensation_retried"
    COMPENSATION_FAILED = "compensation_failed"
    COMPENSATION_REQUESTED = "compensation_requested"  # a child run, by its parent's compensation
    # an operator or a parent
    CANCEL_REQUESTED = "cancel_requested"
    CANCEL_OVERRULED = "cancel_overruled"  # past the pivot
    RETRY_REQUESTED = "retry_requested"
    SIGNAL_RECEIVED = "signal_received"
    # parallel groups
    GROUP_JOINED = "group_joined"
    MAP_STARTED = "map_started"  # a map step computed its items (detail: how many, the concurrency)
    MAP_ITEM_FAILED = "map_item_failed"  # an item of a map step failed for good (detail: its index, the error)
    UNDOS_HELD = "undos_held"
    UNDOS_RELEASED = "undos_released"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def run_ended(cls, status) -> "EventKind":
        """The event of a run's final status (a RunStatus or its value): run_succeeded, run_compensated..."""
        return cls(f"run_{getattr(status, 'value', status)}")


# The final run status each end event records (the stats count ends by these).
RUN_END_EVENTS = (EventKind.RUN_SUCCEEDED, EventKind.RUN_COMPENSATED, EventKind.RUN_CANCELLED,
                  EventKind.RUN_COMPENSATION_FAILED, EventKind.RUN_FAILED, EventKind.RUN_STUCK,
                  EventKind.RUN_RESOLVED)
# The outcomes of a step and of its compensation that the metrics count.
STEP_OUTCOME_EVENTS = (EventKind.STEP_SUCCEEDED, EventKind.STEP_FAILED, EventKind.STEP_RETRIED,
                       EventKind.COMPENSATION_SUCCEEDED, EventKind.COMPENSATION_FAILED,
                       EventKind.COMPENSATION_RETRIED)
COMPENSATION_ENDS = (EventKind.COMPENSATION_SUCCEEDED, EventKind.COMPENSATION_FAILED)


# ---------------------------------------------------------------------------------------------- who asked

ORIGIN_TEXT_CHARS = 200  # of an actor or a client address
REASON_CHARS = 2000  # of an operator's reason
SOURCES = ("page", "api", "cli", "client")
ORIGIN_KEYS = ("actor", "source", "client", "reason")  # what an operator event's detail adds


@dataclass(frozen=True)
class Origin:
    """Who asked for an operator event (cancel_requested, retry_requested, signal_received, run_resolved,
    run_restarted): ``actor`` (the API token's name or "page login", the CLI's OS user), ``source`` (one of
    SOURCES), ``client`` (the HTTP client's address) and an optional ``reason``. Recorded in the event's
    detail beside its own keys; empty values are left out, each is cut to a bounded length."""

    actor: str | None = None
    source: str | None = "client"
    client: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.source is not None and self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")

    def detail(self) -> dict:
        found = {"actor": self.actor, "source": self.source, "client": self.client}
        detail = {k: str(v)[:ORIGIN_TEXT_CHARS] for k, v in found.items() if v}
        if self.reason is not None and str(self.reason).strip():
            detail["reason"] = str(self.reason).strip()[:REASON_CHARS]
        return detail
