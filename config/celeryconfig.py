"""The Celery settings sagaflow runs with (see shared celery-facts.md, section 4: lose nothing, tolerate
duplicates). Every transition in SQL is guarded, so a duplicate delivery is harmless; a lost one is not."""

from __future__ import annotations

from sagaflow.config.settings import Settings


def celery_settings(settings: Settings) -> dict:
    transport = {
        # A message whose worker died comes back after this long; it must exceed the longest retry
        # countdown plus the longest step, or a waiting retry is delivered twice.
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        # Run priorities (client.start(priority=), runtime/publish.py): on Redis one list per priority, all ten.
        "priority_steps": list(range(10)),
    }
    quorum = {}
    if settings.rabbitmq_quorum and settings.effective_broker_url.startswith(("amqp", "pyamqp")):
        # Quorum queues (replicated, survive a node's loss). Every queue sagaflow declares is one, the steps'
        # own queues too (created when first used); retries with a countdown go through RabbitMQ's native
        # delayed delivery, which needs topic exchanges; QoS becomes per consumer (Celery detects it).
        quorum = {
            "task_default_queue_type": "quorum",
            "task_create_missing_queue_type": "quorum",
            "task_default_exchange_type": "topic",
            "task_create_missing_queue_exchange_type": "topic",
            "worker_detect_quorum_queues": True,
            "broker_transport_options": {**transport, "confirm_publish": True},
        }
    priority = {}
    if settings.rabbitmq_priority and not settings.rabbitmq_quorum:
        # RabbitMQ serves by priority only in a queue declared with x-max-priority (classic queues). A queue
        # declared earlier without it must be deleted first: RabbitMQ refuses to change its arguments.
        priority = {"task_queue_max_priority": 9, "task_default_priority": 0}
    return {
        **priority,
        "broker_url": settings.effective_broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # No result backend: step results travel in the chain's messages and are stored in SQL.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": True,  # failures go to errbacks, never a requeue loop
        "task_reject_on_worker_lost": False,
        "task_retry_on_worker_lost": True,  # a killed pool child's task is retried, bounded by max_retries
        # A worker reserves prefetch x concurrency messages, those running included (SAGAFLOW_PREFETCH, default 1:
        # measured best, and no reserved message waits behind a long step; a higher value wants long steps on a
        # queue of their own, served with 1).
        "worker_prefetch_multiplier": settings.prefetch,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": 30.0,
        # Events off unless SAGAFLOW_TASK_EVENTS: each costs a message per task state. Flower shows every step
        # and compensation all the same: while it runs it tells the workers to send events (enable_events).
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "worker_hijack_root_logger": False,
        # A message that fails while the worker receives it is dropped, logged, instead of ending the worker
        # (sagaflow/inbound.py; the depth of every message is checked there too).
        "worker_consumer": "sagaflow.inbound:Consumer",
        # The recovery sweeper (sagaflow/runtime/recovery.py). Beat only schedules it: any worker runs it, and
        # several at once are safe. Expires so a backlog of sweeps never piles up behind a stopped worker.
        "beat_schedule": {
            "sagaflow-recover": {
                "task": "sagaflow.recover",
                "schedule": float(settings.recovery_interval),
                "kwargs": {"stall_timeout": settings.stall_timeout},  # the scheduler's setting decides
                "options": {"expires": float(settings.recovery_interval)},
            },
        },
        "beat_schedule_filename": str(settings.home / "celerybeat-schedule"),
        "enable_utc": True,
        **quorum,
    }
