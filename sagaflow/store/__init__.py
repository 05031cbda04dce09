"""State of runs, steps and events in SQL: tables, snapshots, guarded transitions and migrations."""

from sagaflow.store.models import FINAL_RUN_STATUSES, Event, Run, RunStatus, StepSpec, StepState, StepStatus
from sagaflow.store.repository import BranchOutcome, Claim, ClaimOutcome, Recovery, Store, WaitOutcome

__all__ = [
    "BranchOutcome", "Claim", "ClaimOutcome", "Event", "FINAL_RUN_STATUSES", "Recovery", "Run", "RunStatus", "StepSpec", "StepState", "StepStatus", "Store", "WaitOutcome",
]
