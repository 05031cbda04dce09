"""The Celery app and the process-wide settings and store, configured once from the environment.

``celery -A sagaflow.app worker`` works as well as ``sagaflow worker``; both load the sagas (the modules
named in SAGAFLOW_IMPORTS, then the files in SAGAFLOW_SAGA_FILES: ``load_sagas``) so every saga's tasks are
declared before the worker consumes.
"""

from __future__ import annotations

import importlib
import threading

from celery import Celery
from celery.signals import after_setup_logger, import_modules, worker_process_init

from sagaflow.config.celeryconfig import celery_settings
from sagaflow.config.settings import Settings
from sagaflow.logs import setup_logging
from sagaflow.model.declarative import load_saga_files
from sagaflow.store import Store

celery_app = Celery("sagaflow")
app = celery_app  # the name `celery -A sagaflow.app` looks for

_lock = threading.Lock()
_settings: Settings | None = None
_store: Store | None = None


def configure(settings: Settings | None = None) -> Settings:
    """Use these settings (default: from the environment) for the Celery app and the store."""
    global _settings, _store
    with _lock:
        previous = _settings
        _settings = settings or Settings.from_env()
        if _store is not None:
            _store.dispose()
            _store = None
        if previous is not None and previous.effective_broker_url != _settings.effective_broker_url:
            # Celery caches the broker connection pool and the producer pool it opened first, and would go on
            # publishing to the old broker. Dropping both (what Celery.close() does for the first) makes the
            # next publish open pools for the new URL; kombu keys its pools by connection.
            celery_app._pool = None
            celery_app.amqp._producer_pool = None
        celery_app.conf.update(celery_settings(_settings))
        celery_app.conf.imports = _settings.imports
        return _settings


def get_settings() -> Settings:
    return _settings or configure()


def load_sagas(settings: Settings | None = None) -> None:
    """Register every saga these settings name: import the modules in SAGAFLOW_IMPORTS (their Python sagas
    and their handlers register themselves), then load the files in SAGAFLOW_SAGA_FILES, whose steps name
    those handlers. Safe to call again: modules import once and an unchanged file loads once.

    Workers call it through Celery's import step (below); the CLI, the web app and ``SagaClient.from_env``
    call it directly. Raises ImportError, or DefinitionError (``SagaFileError``) for an invalid file."""
    settings = settings or get_settings()
    for module in settings.imports:
        importlib.import_module(module)
    if settings.saga_files:
        load_saga_files(settings.saga_files)


@import_modules.connect
def _load_sagas_with_celery_imports(sender=None, **_):
    # Celery sends this from loader.import_default_modules, in the worker (and beat) before it imports
    # conf.imports, and in each pool child started by spawn. Loading here too means
    # `celery -A sagaflow.app worker` sees the declarative sagas as well as `sagaflow worker`.
    if sender is celery_app:
        load_sagas()


def get_store() -> Store:
    global _store
    settings = get_settings()
    with _lock:
        if _store is None:
            _store = Store(settings.database_url, prepared_statements=settings.prepared_statements)
        return _store


@worker_process_init.connect
def _fresh_connections_after_fork(**_):
    # A pooled connection inherited from the parent must not be shared by two processes.
    if _store is not None:
        _store.dispose(close=False)


@after_setup_logger.connect
def _structured_logs(**_):
    setup_logging(get_settings().log_level)


try:
    configure()
except ValueError:  # an invalid SAGAFLOW_* value: raised again, naming it, where the settings are first used
    pass            # (get_settings); the CLI prints it as one line instead of a traceback at import
