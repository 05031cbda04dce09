"""A linear saga's step that fails for good in its own task publishes its run's undos itself and drops its
errback (runtime/steps.py ``_compensate_here``); when the broker refuses them the errback stays, to
re-drive them from SQL. The broker is a stub here: the real worker runs the same path in the integration
tests (test_sagas.py, test_flower.py, test_duplicates_and_bad_input.py)."""

import logging
from types import SimpleNamespace

import pytest

from sagaflow.runtime import publish, steps


@pytest.fixture
def sent(monkeypatch):
    sent = {"undos": [], "ended": []}
    monkeypatch.setattr(publish, "compensations", lambda saga, run_id, todo: sent["undos"].append((run_id, todo)))
    monkeypatch.setattr(publish, "run_ended", lambda run_id, saga=None: sent["ended"].append((run_id, saga)))
    return sent


def _task():
    return SimpleNamespace(request=SimpleNamespace(errbacks=[{"task": "sagaflow.on_step_failed"}]))


def test_the_undos_are_published_and_the_errback_dropped(sent):
    task = _task()
    steps._compensate_here(task, SimpleNamespace(name="s"), "r1", [2, 1, 0])
    assert sent == {"undos": [("r1", [2, 1, 0])], "ended": []}
    assert task.request.errbacks is None


def test_with_nothing_to_undo_the_run_ended_with_the_failure(sent):
    task = _task()
    steps._compensate_here(task, SimpleNamespace(name="s"), "r1", [])
    assert sent == {"undos": [], "ended": [("r1", "s")]}  # a parent run is told
    assert task.request.errbacks is None


def test_a_broker_that_refuses_the_undos_leaves_the_errback_to_re_drive_them(monkeypatch, caplog):
    def refuse(saga, run_id, todo):
        raise ConnectionError("broker down")

    monkeypatch.setattr(publish, "compensations", refuse)
    task = _task()
    with caplog.at_level(logging.ERROR, logger="sagaflow.runtime"):
        steps._compensate_here(task, SimpleNamespace(name="s"), "r1", [0])
    assert task.request.errbacks == [{"task": "sagaflow.on_step_failed"}]
    record = next(r for r in caplog.records if r.getMessage() == "compensation_not_published")
    assert record.run_id == "r1" and "errback" in record.next
