"""Kept for the runtime (and sagaflow/app.py) until they import sagaflow.model: declarative sagas moved to
sagaflow/model/declarative.py."""

from sagaflow.model.declarative import (
    HandlerRegistry,
    SagaFileError,
    handler,
    handlers,
    load_saga_file,
    load_saga_files,
    parse_saga_file,
)

__all__ = ["HandlerRegistry", "SagaFileError", "handler", "handlers", "load_saga_file", "load_saga_files",
           "parse_saga_file"]
