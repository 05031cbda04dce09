"""The Celery app and the process-wide settings and store, configured once from the environment.

``celery -A sagaflow.app worker`` works as well as ``sagaflow worker``; both import the modules named in
SAGAFLOW_IMPORTS so every saga's tasks are declared before the worker consumes.
"""

from __future__ import annotations

import threading

from celery import Celery
from celery.signals import after_setup_logger, worker_process_init

from config.celeryconfig import celery_settings
from config.settings import Settings
from sagaflow.logs import setup_logging
from sagaflow.store import Store

celery_app = Celery("sagaflow")
app = celery_app  # the name `celery -A sagaflow.app` looks for

_lock = threading.Lock()
_settings: Settings | None = None
_store: Store | None = None


def configure(settings: Settings | None = None) -> Settings:
    """Use these settings (default: from the environment) for the Celery app and the store. Call it before
    the first publish: Celery keeps the broker connection pool it opened first."""
    global _settings, _store
    with _lock:
        _settings = settings or Settings.from_env()
        if _store is not None:
            _store.dispose()
            _store = None
        celery_app.conf.update(celery_settings(_settings))
        celery_app.conf.imports = _settings.imports
        return _settings


def get_settings() -> Settings:
    return _settings or configure()


def get_store() -> Store:
    global _store
    settings = get_settings()
    with _lock:
        if _store is None:
            _store = Store(settings.database_url)
        return _store


@worker_process_init.connect
def _fresh_connections_after_fork(**_):
    # A pooled connection inherited from the parent must not be shared by two processes.
    if _store is not None:
        _store.dispose(close=False)


@after_setup_logger.connect
def _structured_logs(**_):
    setup_logging(get_settings().log_level)


configure()
