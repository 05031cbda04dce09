"""sagaflow: sagas (ordered steps, each undone by its compensation if a later step fails) on Celery,
with their state in SQL."""

from sagaflow.definition import Parallel, RetryKind, RetryPolicy, Saga, Step, StepContext, StepKind, registry
from sagaflow.declarative import SagaFileError, handler
from sagaflow.errors import (
    BrokerUnavailable,
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    NonRetryableError,
    ResultNotSerializable,
    SagaCancelled,
    SagaflowError,
    UnknownRun,
    UnknownSaga,
)
from sagaflow.store import Run, RunStatus, StepStatus

from sagaflow import runtime  # noqa: E402,F401  (declares the Celery tasks of every registered saga)
from sagaflow.client import SagaClient  # noqa: E402

__all__ = [
    "BrokerUnavailable", "DefinitionError", "InvalidInput", "InvalidTransition", "NonRetryableError", "Parallel",
    "ResultNotSerializable", "RetryKind", "RetryPolicy", "Run", "RunStatus", "Saga", "SagaCancelled", "SagaClient",
    "SagaFileError", "SagaflowError", "Step", "StepContext", "StepKind", "StepStatus", "UnknownRun", "UnknownSaga", "handler",
    "registry",
]
