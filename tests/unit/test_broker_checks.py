"""Broker settings checked at worker start: RabbitMQ's consumer_timeout against the longest step plus retry
delay (as the Redis visibility timeout is), and the quorum-queue option's Celery settings."""

import pytest

from sagaflow.config.celeryconfig import celery_settings
from sagaflow.config.settings import Settings
from sagaflow.errors import SagaflowError
from sagaflow.runtime import check_visibility_timeout

AMQP = "amqp://guest:guest@localhost:5672//"


def test_rabbitmq_consumer_timeout_below_the_longest_wait_is_refused_with_what_to_change():
    base = Settings.from_env({"SAGAFLOW_BROKER_URL": AMQP})
    assert base.rabbitmq_consumer_timeout == 1800  # RabbitMQ's own default, 30 min
    check_visibility_timeout(base)
    with pytest.raises(SagaflowError, match="SAGAFLOW_RABBITMQ_CONSUMER_TIMEOUT=200 s is not above") as err:
        check_visibility_timeout(base.with_(rabbitmq_consumer_timeout=200))  # the default 300 s step alone
    assert "consumer_timeout in rabbitmq.conf" in str(err.value)
    check_visibility_timeout(base.with_(rabbitmq_consumer_timeout=200, broker_url="redis://localhost/0"))


def test_bad_rabbitmq_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="SAGAFLOW_RABBITMQ_CONSUMER_TIMEOUT must be a positive integer"):
        Settings.from_env({"SAGAFLOW_RABBITMQ_CONSUMER_TIMEOUT": "0"})
    with pytest.raises(ValueError, match="SAGAFLOW_RABBITMQ_QUORUM"):
        Settings.from_env({"SAGAFLOW_RABBITMQ_QUORUM": "maybe"})
    with pytest.raises(ValueError, match="SAGAFLOW_WORKER_DEAD_AFTER"):
        Settings.from_env({"SAGAFLOW_WORKER_DEAD_AFTER": "-1"})


def test_quorum_queues_only_on_rabbitmq_and_only_when_asked():
    on = Settings.from_env({"SAGAFLOW_BROKER_URL": AMQP, "SAGAFLOW_RABBITMQ_QUORUM": "true"})
    conf = celery_settings(on)
    assert conf["task_default_queue_type"] == "quorum" and conf["task_create_missing_queue_type"] == "quorum"
    assert conf["broker_transport_options"]["confirm_publish"] is True
    assert "task_default_queue_type" not in celery_settings(on.with_(rabbitmq_quorum=False))
    assert "task_default_queue_type" not in celery_settings(on.with_(broker_url="redis://localhost/0"))
    round_trip = Settings.from_env(on.as_env())
    assert (round_trip.rabbitmq_quorum, round_trip.worker_dead_after) == (True, 15)
