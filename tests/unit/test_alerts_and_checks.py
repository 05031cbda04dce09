"""The alert hook and the visibility-timeout check, with no broker."""

import logging

import pytest

from sagaflow import (
    alerts,
    tasks,  # noqa: F401  the example sagas, with 10 s time limits
)
from sagaflow.config.settings import Settings
from sagaflow.errors import SagaflowError
from sagaflow.runtime import check_visibility_timeout

CALLS = []


def good_hook(run):
    CALLS.append(run.id)


def broken_hook(run):
    raise RuntimeError("pager down")


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "must look like"),
    ("missing.module:fn", "cannot be loaded"),
    ("tests.unit.test_alerts_and_checks:nope", "cannot be loaded"),
    ("tests.unit.test_alerts_and_checks:CALLS", "not callable"),
])
def test_a_bad_hook_setting_says_what_is_wrong(spec, message):
    with pytest.raises(SagaflowError, match=message):
        alerts.load_hook(spec)


def test_the_alert_is_logged_then_the_hook_is_called_and_a_failing_hook_is_only_logged(store, caplog):
    CALLS.clear()
    store.create_run("r1", "s", 1, {}, [("a", True)])
    run = store.get_run("r1")
    with caplog.at_level(logging.ERROR, logger="sagaflow.alerts"):
        alerts.compensation_failed(run, "tests.unit.test_alerts_and_checks:good_hook")
        alerts.compensation_failed(run, "tests.unit.test_alerts_and_checks:broken_hook")
    assert CALLS == ["r1"]
    events = [r.msg for r in caplog.records]
    assert events == ["run_compensation_failed", "run_compensation_failed", "alert_hook_failed"]
    assert "sagaflow retry r1" in caplog.records[0].next


def test_the_worker_refuses_a_visibility_timeout_below_the_longest_wait():
    base = Settings.from_env({"SAGAFLOW_BROKER_URL": "redis://localhost:6379/0"})
    check_visibility_timeout(base)  # 7200 s is plenty
    with pytest.raises(SagaflowError, match="SAGAFLOW_VISIBILITY_TIMEOUT=200 s is not above"):
        check_visibility_timeout(base.with_(visibility_timeout=200))  # the default 300 s timeout alone
    check_visibility_timeout(base.with_(visibility_timeout=200, broker_url="amqp://guest@localhost//"))


def test_the_visibility_check_counts_a_compensation_time_limit_longer_than_the_step_s():
    from sagaflow import Saga, Step

    saga = Saga("long_undo_check", [Step("a", lambda ctx: None, lambda ctx: None, timeout=10,
                                         compensation_timeout=5000)])
    try:
        base = Settings.from_env({"SAGAFLOW_BROKER_URL": "redis://localhost:6379/0"})
        with pytest.raises(SagaflowError, match="step long_undo_check.a"):
            check_visibility_timeout(base.with_(visibility_timeout=4000))
        check_visibility_timeout(base.with_(visibility_timeout=6000))
    finally:
        from sagaflow.model.definition import registry

        registry.remove(saga.name)
