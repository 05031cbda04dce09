"""State of runs, steps and events in SQL: tables, guarded transitions and migrations. The values it takes
and returns (statuses, snapshots, outcomes, event kinds) are the model's (sagaflow/model/)."""

from sagaflow.store.repository import Store

# Kept for the runtime until it imports sagaflow.model: these names moved there.
from sagaflow.model.outcomes import BranchOutcome, Claim, ClaimOutcome, Recovery, WaitOutcome
from sagaflow.model.snapshots import Event, Run, StepSpec, StepState
from sagaflow.model.status import FINAL_RUN_STATUSES, RunStatus, StepStatus

__all__ = [
    "BranchOutcome", "Claim", "ClaimOutcome", "Event", "FINAL_RUN_STATUSES", "Recovery", "Run", "RunStatus",
    "StepSpec", "StepState", "StepStatus", "Store", "WaitOutcome",
]
