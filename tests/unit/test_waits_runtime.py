"""Gates and child steps, with no broker: a gate's timeout is its deadline (not a time limit, not a
lease, not a worry for the visibility timeout); child steps always count as compensable; only sagas that
some child step names pay a read to find their parent when they end."""

from __future__ import annotations

import pytest

from sagaflow import Saga, Step
from sagaflow.app import celery_app
from sagaflow.config.settings import Settings
from sagaflow.model import StepSpec
from sagaflow.model.definition import registry
from sagaflow.runtime import check_visibility_timeout
from sagaflow.runtime.compiler import compile_run


def noop(ctx):
    return None


@pytest.fixture
def day_gate():
    saga = Saga("t_day_gate", [Step("a", noop)])
    saga.gate("approve", signal="ok", timeout=86400)
    saga.child("sub", saga="t_day_gate_child")
    saga.step(noop, name="b")
    child = Saga("t_day_gate_child", [Step("x", noop)])
    yield saga
    registry.remove(saga.name)
    registry.remove(child.name)


def test_a_day_long_gate_sets_no_time_limit_and_does_not_trip_the_visibility_check(day_gate):
    links = compile_run(celery_app, day_gate, "r").tasks
    gate = links[-1]
    assert gate.task == "t_day_gate.approve" and gate.kwargs["window_end"] is True
    assert "time_limit" not in gate.options and "soft_time_limit" not in gate.options
    check_visibility_timeout(Settings.from_env({"SAGAFLOW_BROKER_URL": "redis://localhost:6379/0"}))


def test_child_steps_always_have_a_compensation_and_only_child_sagas_look_for_a_parent(day_gate, monkeypatch):
    from sagaflow.runtime import publish

    specs = [StepSpec.of(s) for s in day_gate.steps]
    assert [(s.name, s.kind, s.has_compensation) for s in specs] == [
        ("a", "action", False), ("approve", "gate", False), ("sub", "child", True), ("b", "action", False)]
    assert "t_day_gate_child" in publish._child_sagas()

    reads = []

    class Store:
        def parent_of(self, run_id):
            reads.append(run_id)
            return None

    monkeypatch.setattr(publish, "get_store", lambda: Store())
    publish.run_ended("r1", "t_day_gate")  # no child step names this saga: no read
    publish.run_ended("r2", "t_day_gate_child")
    publish.run_ended("r3")  # saga unknown to the caller: read
    assert reads == ["r2", "r3"]
