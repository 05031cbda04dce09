"""Retry kinds on a real worker: the countdown Celery waits is the one the step's policy gives."""

from __future__ import annotations

import pytest

from sagaflow.tasks.effects import effects_of
from tests.helpers import kinds

pytestmark = pytest.mark.integration


def test_a_fixed_delay_step_is_retried_after_the_same_delay_each_time_then_succeeds(client):
    run = client.wait(client.start("fixed_retry", {"flaky": {"poll_partner": 2}}).id)

    assert run.status == "succeeded", run
    assert run.step("poll_partner").attempts == 3
    retries = [e for e in run.events if e.kind == "step_retried"]
    assert [(e.step, e.detail["attempt"], e.detail["retry_in"]) for e in retries] == [
        ("poll_partner", 1, 0.3), ("poll_partner", 2, 0.3)]
    # Celery held each retry back for its countdown: the next attempt started no sooner.
    started = [e.at for e in run.events if e.kind == "step_started" and e.step == "poll_partner"]
    assert len(started) == 3
    for retried, next_start in zip(retries, started[1:], strict=True):
        assert (next_start - retried.at).total_seconds() >= 0.25
    assert effects_of(run.id) == [("do", "poll_partner"), ("do", "confirm")]
    assert kinds(run)[-1] == ("run_succeeded", None)
