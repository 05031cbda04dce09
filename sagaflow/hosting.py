"""Sagas on your own Celery app: ``sagaflow.install(app)``.

    # proj/celery.py
    from celery import Celery
    import sagaflow

    app = Celery("proj", broker="redis://localhost:6379/0")
    app.config_from_object("proj.celeryconfig")   # your TLS, Sentinel, routes...
    sagaflow.install(app)

Then ``celery -A proj worker`` runs your tasks and every saga in SAGAFLOW_IMPORTS, and
``SAGAFLOW_CELERY_APP=proj.celery:app`` makes ``sagaflow worker``, ``sagaflow flower``, ``sagaflow web`` and the
client use that app. ``install``:

- binds sagaflow's tasks (the generic ones, and every saga step's, including sagas registered later) to the app;
- sets the Celery settings sagaflow needs to lose nothing (``REQUIRED``) and its defaults (events for Flower,
  the message guard, the visibility timeout...) where the app leaves them unset;
- connects the startup checks to Celery's ``worker_init`` signal, for this app and sagaflow's own: a setting
  that contradicts ``REQUIRED``, a visibility timeout too short for the registered sagas, a saga that cannot
  run, an alert hook that does not load. A failed check stops the worker with one line naming the setting.
"""

from __future__ import annotations

import sys

from celery import Celery
from celery.signals import worker_init

from sagaflow import alerts
from sagaflow.app import celery_app, get_settings, host_app, set_host_app
from sagaflow.config.celeryconfig import celery_settings
from sagaflow.errors import SagaflowError
from sagaflow.model.definition import registry
from sagaflow.runtime.tasks import check_visibility_timeout

# Without these, a message can be lost (celery-facts.md, section 4): acknowledged only after the step committed,
# a failure acknowledged (its errback compensates), a killed child's task retried, JSON on the wire.
REQUIRED = {
    "task_acks_late": True,
    "task_acks_on_failure_or_timeout": True,
    "task_reject_on_worker_lost": False,
    "task_retry_on_worker_lost": True,
    "task_serializer": "json",
    "task_always_eager": False,
}
# sagaflow's choices, applied only where the app leaves the setting unset.
DEFAULTS = ("worker_prefetch_multiplier", "worker_send_task_events", "task_send_sent_event", "worker_consumer",
            "worker_cancel_long_running_tasks_on_connection_loss", "task_ignore_result",
            "broker_connection_retry_on_startup")


def _user_set(app: Celery, key: str) -> bool:
    """Whether the app's own configuration names ``key``: Celery(...) keywords, conf.update, or its config
    object or module (config_from_object, which the app's loader holds once the configuration is loaded)."""
    conf = app.conf
    conf.get(key)  # loads the configuration (config_from_object is lazy)
    preconf = getattr(app, "_preconf", None) or {}
    auto = getattr(app, "_preconf_set_by_auto", None) or set()
    loaded = getattr(app.loader, "conf", None) or {}
    return key in conf.changes or (key in preconf and key not in auto) or key in loaded


def _bind_tasks(host: Celery) -> None:
    """Bind every task sagaflow declared (on its own app) to ``host`` and register it there."""
    for name, task in list(celery_app.tasks.items()):
        if name.startswith("celery."):
            continue
        if type(task)._app is not host:
            type(task).bind(host)
        if host.tasks.get(name) is not task:
            host.tasks.register(task)


def install(app: Celery) -> Celery:
    """Run sagaflow's sagas on ``app`` (see the module's docstring). Idempotent; returns ``app``."""
    if app is celery_app:
        return app
    settings = get_settings()
    wanted = celery_settings(settings)
    changes = {}
    for key, value in REQUIRED.items():
        if not _user_set(app, key):
            changes[key] = value
    if not _user_set(app, "accept_content"):
        changes["accept_content"] = ["json"]
    for key in DEFAULTS:
        if not _user_set(app, key):
            changes[key] = wanted[key]
    # The recovery sweeper's schedule, beside the app's own entries, for `celery -A proj beat`.
    changes["beat_schedule"] = {**wanted["beat_schedule"], **(app.conf.beat_schedule or {})}
    transport = dict(app.conf.broker_transport_options or {})
    transport.setdefault("visibility_timeout", settings.visibility_timeout)
    changes["broker_transport_options"] = transport
    if not _user_set(app, "broker_url") and not app.conf.broker_url:
        changes["broker_url"] = settings.effective_broker_url
    app.conf.update(changes)
    set_host_app(app)
    _bind_tasks(app)
    registry.listen(lambda _saga: _bind_tasks(app))  # sagas registered later (SAGAFLOW_IMPORTS at worker start)
    return app


def contradictions(app: Celery) -> list[str]:
    """One line per setting of ``app`` that contradicts what sagaflow needs."""
    found = []
    for key, value in REQUIRED.items():
        if app.conf.get(key) != value:
            found.append(f"Celery setting {key}={app.conf.get(key)!r} contradicts sagaflow, which needs {value!r} "
                         f"to lose nothing (remove it from your Celery configuration)")
    if "json" not in (app.conf.accept_content or ()):
        found.append(f"Celery setting accept_content={app.conf.accept_content!r} must include 'json' "
                     f"(sagaflow's messages are JSON)")
    return found


def check_worker(app: Celery) -> None:
    """The startup checks, for a worker of ``app``; raises SagaflowError with one line."""
    problems = contradictions(app)
    if problems:
        raise SagaflowError(problems[0])
    settings = get_settings()
    transport = app.conf.broker_transport_options or {}
    effective = settings.with_(broker_url=app.conf.broker_url or settings.broker_url,
                               visibility_timeout=int(transport.get("visibility_timeout",
                                                                    settings.visibility_timeout)))
    check_visibility_timeout(effective)
    for saga in registry.all():
        saga.check_runnable()
    alerts.load_hook(settings.alert_hook)


@worker_init.connect
def _check_at_worker_start(sender=None, **_):
    app = getattr(sender, "app", None)
    if app is None or not (app is celery_app or app is host_app()):
        return
    try:
        check_worker(app)
    except (SagaflowError, ImportError, ValueError) as exc:
        # Celery logs and swallows a receiver's Exception; SystemExit stops the worker.
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

