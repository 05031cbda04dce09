"""Every error sagaflow raises on purpose. Callers catch these; the API maps them to HTTP codes."""


class SagaflowError(Exception):
    """Base class of sagaflow's own errors."""


class DefinitionError(SagaflowError):
    """A saga or step definition is invalid (bad name, duplicate step, missing action...)."""


class UnknownSaga(SagaflowError, LookupError):
    """No saga of that name (and version) is registered in this process."""


class InvalidInput(SagaflowError, ValueError):
    """A run's input is not a JSON object, or an argument is malformed."""


class UnknownRun(SagaflowError, LookupError):
    """No run with that id exists."""


class UnknownSchedule(SagaflowError, LookupError):
    """No schedule of that name exists."""


class InvalidTransition(SagaflowError):
    """The run's status does not allow the operation (cancel a finished run, retry a running one)."""


class NonRetryableError(SagaflowError):
    """Raise this (or a subclass) from an action to fail the step at once, with no retry."""


class ResultNotSerializable(NonRetryableError, TypeError):
    """An action returned a value that cannot be stored as JSON: the step fails, and is not retried."""


class AlreadyFailed(NonRetryableError):
    """A redelivered task whose failure was already recorded: raised again so its errback fires, in case
    the worker died before the first errback was published."""


class SagaCancelled(SagaflowError):
    """Raised inside a step task when its run was cancelled: stops the chain and starts compensation."""


class LeaseLost(SagaflowError):
    """Raised by ``ctx.heartbeat()`` when this delivery no longer holds its step: its lease expired and the
    recovery sweeper gave the step to another delivery. Stop: the other delivery does the work."""


class BrokerUnavailable(SagaflowError):
    """The broker cannot be reached: nothing can be published."""


class SchemaMissing(SagaflowError):
    """The database has no sagaflow tables yet."""
