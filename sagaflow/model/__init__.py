"""sagaflow's model: what a saga is and what a run is, as plain values, with the rules that go with them.

    status.py       RunStatus, StepStatus; final, live, cancellable, retryable; can_cancel, can_retry
    events.py       EventKind: the kinds of event a run's history records
    outcomes.py     what the store's transitions decide (ClaimOutcome, Claim, BranchOutcome, Recovery,
                    WaitOutcome), for the runtime to act on
    snapshots.py    Run, StepState, Event (frozen, ``from_row``) and StepSpec
    definition.py   Saga, Step, Parallel, RetryPolicy, StepContext, the registry
    declarative.py  sagas from YAML files, and the handlers they name
    policy.py       compensation on or off per saga (given the settings by its caller)
    schedule.py     Schedule, cron checks and the ticks due (croniter), the catch-up policy

Imports nothing of sagaflow but ``sagaflow.errors``: the store, the runtime and the faces import the model,
never the other way round (tests/unit/test_model.py checks).
"""

from sagaflow.model.events import EventKind, Origin
from sagaflow.model.outcomes import BranchOutcome, Claim, ClaimOutcome, Recovery, WaitOutcome
from sagaflow.model.snapshots import Event, Run, StepSpec, StepState
from sagaflow.model.status import (
    CANCELLABLE_RUN_STATUSES,
    FINAL_RUN_STATUSES,
    LIVE_RUN_STATUSES,
    RETRYABLE_RUN_STATUSES,
    RunStatus,
    StepStatus,
    can_cancel,
    can_retry,
    is_live,
)

__all__ = [
    "BranchOutcome", "CANCELLABLE_RUN_STATUSES", "Claim", "ClaimOutcome", "Event", "EventKind", "FINAL_RUN_STATUSES",
    "LIVE_RUN_STATUSES", "Origin", "RETRYABLE_RUN_STATUSES", "Recovery", "Run", "RunStatus", "StepSpec", "StepState",
    "StepStatus", "WaitOutcome", "can_cancel", "can_retry", "is_live",
]
