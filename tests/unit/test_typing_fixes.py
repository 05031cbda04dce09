"""Bugs mypy found (optional values used without a check), each with the behaviour it now has."""

import pytest

from sagaflow.model.definition import Saga


def test_the_errback_of_an_unknown_steps_compensation_records_nothing(store):
    # The step's row was read back and used without a check: an errback naming no step (a run deleted, or
    # never created here) raised AttributeError on None instead of saying that nothing changed.
    assert store.mark_compensation_failed("no-such-run", 0, "lost") is False


def test_calling_a_gate_step_directly_says_it_has_no_action():
    # Step.__call__ (for tests calling a decorated step) called the action, which a gate has not (None):
    # "'NoneType' object is not callable".
    saga = Saga("typing_gate_probe")
    gate = saga.gate("approve", signal="ok", timeout=10)
    with pytest.raises(TypeError, match="step 'approve' is a gate step: it has no action to call"):
        gate(None)
