"""The Celery app and the process-wide settings and store, configured once from the environment.

``celery -A sagaflow.app worker`` works as well as ``sagaflow worker``; both load the sagas (the modules
named in SAGAFLOW_IMPORTS, then the files in SAGAFLOW_SAGA_FILES: ``load_sagas``) so every saga's tasks are
declared before the worker consumes.

A team's own Celery app can run the sagas instead (``sagaflow.install(app)``, sagaflow/hosting.py): its tasks
are then bound to that app, sagaflow's own ``celery_app`` publishes through that app's broker settings, and
``SAGAFLOW_CELERY_APP=module:attribute`` makes the CLI, the web app and the client import it
(``celery_app_for_commands``).
"""

from __future__ import annotations

import importlib
import threading
import types

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
_host: Celery | None = None  # the team's own Celery app, once sagaflow.install(app) ran

# What sagaflow's own app copies from a host app, so that a message sagaflow publishes (a group's, through
# its app's producer pool) goes to the same broker, with the same TLS and transport options.
MIRRORED = ("broker_url", "broker_read_url", "broker_write_url", "broker_transport", "broker_transport_options",
            "broker_use_ssl", "broker_login_method", "broker_connection_timeout", "broker_heartbeat",
            "broker_failover_strategy", "task_routes", "task_default_queue", "task_default_exchange",
            "task_default_routing_key", "task_queues", "task_create_missing_queues")


def _celery_config(module_name: str) -> dict:
    """The lower-case settings of SAGAFLOW_CELERY_CONFIG's module (Celery's config_from_object format)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"SAGAFLOW_CELERY_CONFIG: cannot import {module_name!r} ({exc})") from None
    return {k: v for k, v in vars(module).items()
            if k.islower() and not k.startswith("_") and not isinstance(v, types.ModuleType)}


def _mirror_host(host: Celery) -> None:
    celery_app.conf.update({key: host.conf[key] for key in MIRRORED})
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


def set_host_app(host: Celery) -> None:
    """Record the team's app (sagaflow.install calls this): sagaflow's own app publishes to its broker."""
    global _host
    _host = host
    _mirror_host(host)


def host_app() -> Celery | None:
    return _host


def celery_app_for_commands(settings: Settings | None = None) -> Celery:
    """The app `sagaflow worker`, `flower` and the client use: SAGAFLOW_CELERY_APP's (imported now, and it must
    call sagaflow.install), else sagaflow's own. Raises ValueError naming the setting."""
    settings = settings or get_settings()
    if not settings.celery_app:
        return _host or celery_app
    module_name, _, attribute = settings.celery_app.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"SAGAFLOW_CELERY_APP: cannot import {module_name!r} ({exc}); run from the project "
                         f"folder or fix SAGAFLOW_CELERY_APP") from None
    app = getattr(module, attribute, None)
    if not isinstance(app, Celery):
        raise ValueError(f"SAGAFLOW_CELERY_APP: {settings.celery_app} is not a Celery app")
    if app is not _host and app is not celery_app:
        raise ValueError(f"SAGAFLOW_CELERY_APP: {settings.celery_app} does not call sagaflow.install({attribute}) "
                         f"after it is created")
    return app


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
        extra = _celery_config(_settings.celery_config) if _settings.celery_config else {}
        wanted = celery_settings(_settings)
        if "broker_transport_options" in extra:  # the user's options (Sentinel...) beside the visibility timeout
            extra["broker_transport_options"] = {**wanted["broker_transport_options"],
                                                 **extra["broker_transport_options"]}
        celery_app.conf.update({**wanted, **extra})
        celery_app.conf.imports = _settings.imports
        if _host is not None:
            _mirror_host(_host)
        return _settings


def get_settings() -> Settings:
    return _settings or configure()


def load_sagas(settings: Settings | None = None) -> None:
    """Register every saga these settings name: import the modules in SAGAFLOW_IMPORTS (their Python sagas
    and their handlers register themselves), then load the files in SAGAFLOW_SAGA_FILES, whose steps name
    those handlers. Safe to call again: modules import once and an unchanged file loads once.

    Workers call it through Celery's import step (below); the CLI, the web app and ``SagaClient.from_env``
    call it directly. Raises ImportError, ValueError (SAGAFLOW_CELERY_APP), or DefinitionError
    (``SagaFileError``) for an invalid file."""
    settings = settings or get_settings()
    celery_app_for_commands(settings)  # SAGAFLOW_CELERY_APP's module installs sagaflow on the team's app
    for module in settings.imports:
        importlib.import_module(module)
    if settings.saga_files:
        load_saga_files(settings.saga_files)


@import_modules.connect
def _load_sagas_with_celery_imports(sender=None, **_):
    # Celery sends this from loader.import_default_modules, in the worker (and beat) before it imports
    # conf.imports, and in each pool child started by spawn. Loading here too means
    # `celery -A sagaflow.app worker` sees the declarative sagas as well as `sagaflow worker`.
    if sender is celery_app or (sender is not None and sender is _host):
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
    # The worker is an entry point: it configures output unless the host configured logging itself.
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)


try:
    configure()
except ValueError:  # an invalid SAGAFLOW_* value: raised again, naming it, where the settings are first used
    pass            # (get_settings); the CLI prints it as one line instead of a traceback at import
