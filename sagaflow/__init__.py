"""sagaflow: sagas (ordered steps, each undone by its compensation if a later step fails) on Celery,
with their state in SQL."""

from importlib.metadata import version as _distribution_version

# The installed distribution's version (pyproject.toml's, via pip install): one place to bump it.
__version__ = _distribution_version("sagaflow")

from sagaflow import runtime  # noqa: E402,F401  (declares the Celery tasks of every registered saga)
from sagaflow.client import SagaClient  # noqa: E402
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
    UnknownSchedule,
)
from sagaflow.hosting import install  # noqa: E402
from sagaflow.model.declarative import SagaFileError, handler
from sagaflow.model.definition import (
    Map,
    Parallel,
    RetryKind,
    RetryPolicy,
    Saga,
    Sleep,
    Step,
    StepContext,
    StepKind,
    registry,
)
from sagaflow.model.events import EventKind, Origin
from sagaflow.model.snapshots import Run
from sagaflow.model.status import RunStatus, StepStatus

__all__ = [
    "install",
    "BrokerUnavailable", "DefinitionError", "EventKind", "InvalidInput", "InvalidTransition", "NonRetryableError",
    "Map", "Origin",
    "Parallel", "ResultNotSerializable", "RetryKind", "RetryPolicy", "Run", "RunStatus", "Saga", "SagaCancelled",
    "SagaClient", "SagaFileError", "SagaflowError", "Sleep", "Step", "StepContext", "StepKind", "StepStatus",
    "UnknownRun", "UnknownSaga", "UnknownSchedule", "__version__", "handler", "registry",
]
