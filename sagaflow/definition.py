"""Kept for the runtime until it imports sagaflow.model: saga definitions moved to sagaflow/model/definition.py."""

from sagaflow.model.definition import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_FORWARD_RETRY,
    DEFAULT_RETRY,
    NAME_PATTERN,
    Action,
    ChildInput,
    Parallel,
    Registry,
    RetryKind,
    RetryPolicy,
    Saga,
    Step,
    StepContext,
    StepKind,
    registry,
)

__all__ = [
    "Action", "ChildInput", "DEFAULT_COMPENSATION_RETRY", "DEFAULT_FORWARD_RETRY", "DEFAULT_RETRY", "NAME_PATTERN",
    "Parallel", "Registry", "RetryKind", "RetryPolicy", "Saga", "Step", "StepContext", "StepKind", "registry",
]
