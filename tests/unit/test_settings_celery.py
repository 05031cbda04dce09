"""Settings (issue 15) that cost nothing when nobody watches: task events off unless SAGAFLOW_TASK_EVENTS,
and the prefetch multiplier as SAGAFLOW_PREFETCH; both reach the Celery settings and a worker's environment."""

from __future__ import annotations

import pytest

from sagaflow.config.celeryconfig import celery_settings
from sagaflow.config.settings import PREFETCH_DEFAULT, Settings


def test_events_are_off_and_prefetch_is_the_measured_default_when_nothing_is_set():
    conf = celery_settings(Settings.from_env({}))
    assert conf["worker_send_task_events"] is False and conf["task_send_sent_event"] is False
    assert conf["worker_prefetch_multiplier"] == PREFETCH_DEFAULT


def test_task_events_and_prefetch_are_settings_that_a_worker_inherits():
    settings = Settings.from_env({"SAGAFLOW_TASK_EVENTS": "1", "SAGAFLOW_PREFETCH": "1"})
    conf = celery_settings(settings)
    assert conf["worker_send_task_events"] is True and conf["task_send_sent_event"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert Settings.from_env(settings.as_env()) == settings


@pytest.mark.parametrize("name,value,message", [
    ("SAGAFLOW_PREFETCH", "0", "SAGAFLOW_PREFETCH must be a positive integer, got 0"),
    ("SAGAFLOW_PREFETCH", "many", "SAGAFLOW_PREFETCH must be an integer, got 'many'"),
    ("SAGAFLOW_TASK_EVENTS", "maybe", r"SAGAFLOW_TASK_EVENTS must be 1 or 0 \(true/false\), got 'maybe'"),
])
def test_a_bad_value_is_one_line_naming_the_setting(name, value, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({name: value})
