"""sagaflow.testing: a saga through the real runtime in one process (in-memory broker, a worker thread,
SQLite), with faults injected by step and a clock the harness moves. Its outcomes on the example sagas are
compared with a real worker's in tests/integration/test_harness_matches_worker.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from sagaflow import RetryPolicy, Saga, SagaflowError
from sagaflow.model import clock
from sagaflow.runtime import steps
from sagaflow.tasks.effects import effects_of
from sagaflow.testing import InjectedFailure, SagaHarness

CALLS: list[tuple] = []
LOCK = threading.Lock()


def note(*what) -> None:
    with LOCK:
        CALLS.append(what)


hourly = Saga("harness_retries", version=1)


# Ten-minute retry delays (the one-hour case runs in a process of its own, below: a registered step with an
# hour's delay would fail the broker checks of later tests, which read every registered saga).
@hourly.step(retry=RetryPolicy(max_attempts=3, initial_interval=600, backoff=1.0, max_interval=600))
def charge(ctx):
    note("charge", ctx.attempt)
    return {"charged": ctx.input.get("amount", 0)}


@charge.compensation
def refund(ctx):
    note("refund", ctx.result["charged"])


@hourly.step()
def ship(ctx):
    note("ship")
    return {"shipped": True}


approval = Saga("harness_approval", version=1)


@approval.step()
def reserve(ctx):
    note("reserve")
    return 1


@reserve.compensation
def release(ctx):
    note("release")


approval.gate("approved", signal="approve", timeout=3600)


@approval.step()
def deliver(ctx):
    note("deliver")
    return 1


late = Saga("harness_late", version=1, deadline=600)


@late.step()
def first(ctx):
    return 1


@first.compensation
def undo_first(ctx):
    note("undo_first")


late.gate("never", signal="nothing", timeout=86400)


# First, before the module's harness starts: one harness at a time per process.
def test_the_harness_puts_the_clock_and_the_interceptor_back():
    before_clock, before = clock.current(), steps.intercept(None)
    steps.intercept(before)
    with SagaHarness() as h:
        assert clock.current() is h.clock
        with pytest.raises(SagaflowError, match="one SagaHarness at a time"):
            SagaHarness().__enter__()
    assert clock.current() is before_clock
    assert steps.intercept(before) is before


@pytest.fixture(scope="module")
def running():
    with SagaHarness(imports=["sagaflow.tasks"]) as h:
        yield h


@pytest.fixture
def harness(running):
    running.clear_faults()
    CALLS.clear()
    return running


def test_a_run_succeeds_and_returns_the_clients_run(harness):
    run = harness.run("create_booking", {"customer": "ada"})
    assert run.status == "succeeded"
    assert [s.status for s in run.steps] == ["succeeded"] * 4
    assert run == harness.client.get(run.id)  # the same Run the client returns
    assert effects_of(run.id) == [("do", s.name) for s in run.steps]


def test_fail_compensates_the_completed_steps_in_reverse(harness):
    harness.fail("send_whatsapp")
    run = harness.run("create_booking", {})
    assert run.status == "compensated"
    assert [s.status for s in run.steps] == ["compensated", "compensated", "failed", "skipped"]
    assert InjectedFailure.__name__ in (run.steps[2].error or "")
    assert effects_of(run.id) == [("do", "create_invoice"), ("do", "send_email"),
                                  ("undo", "send_email"), ("undo", "create_invoice")]


def test_retry_delays_pass_at_once(harness):
    harness.fail_times("charge", 2)
    started, skipped = time.monotonic(), harness.clock.skipped
    run = harness.run("harness_retries", {"amount": 5})
    assert run.status == "succeeded"
    assert CALLS == [("charge", 3), ("ship",)]
    # two delays of five to ten minutes (equal jitter) passed on the harness's clock: each retry's next
    # attempt started at least its delay after it (the clock may also have moved for other runs meanwhile)
    events = list(run.events)
    retries = [(i, e) for i, e in enumerate(events) if e.kind == "step_retried"]
    for i, retried in retries:
        following = next(e for e in events[i + 1:] if e.kind == "step_started")
        assert (following.at - retried.at).total_seconds() >= retried.detail["retry_in"]
    assert harness.clock.skipped - skipped >= sum(e.detail["retry_in"] for _, e in retries) - 1
    assert time.monotonic() - started < 60  # far below: no real waiting (not a timing benchmark)
    assert [e.kind for e in run.events].count("step_retried") == 2


ONE_HOUR = """
import json, time
from sagaflow import RetryPolicy, Saga
from sagaflow.testing import SagaHarness

saga = Saga("one_hour", version=1)

@saga.step(retry=RetryPolicy(max_attempts=2, initial_interval=3600, backoff=1.0, max_interval=3600, jitter=False))
def call(ctx):
    return ctx.attempt

with SagaHarness() as harness:
    harness.fail_times("call", 1)
    started = time.monotonic()
    run = harness.run("one_hour", {})
    print(json.dumps({"status": run.status, "wall": time.monotonic() - started, "skipped": harness.clock.skipped,
                      "result": run.steps[0].result}))
"""


def test_a_one_hour_retry_delay_passes_in_well_under_a_minute(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", ONE_HOUR], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["status"] == "succeeded" and found["result"] == 2
    # the harness's clock passed the hour: moved on (to the retry's time, kept in SQL) plus the wall time
    assert found["skipped"] + found["wall"] >= 3600
    assert found["wall"] < 60  # an hour of retry delay, not waited (a generous bound: not a timing benchmark)


def test_fail_times_past_the_policy_fails_the_step(harness):
    harness.fail_times("charge", 5)
    run = harness.run("harness_retries", {})
    assert run.status == "compensated"
    assert run.steps[0].status == "failed" and CALLS == []


def test_fail_compensation_a_few_times_then_it_works(harness):
    harness.fail("ship").fail_compensation("charge", times=1)
    run = harness.run("harness_retries", {"amount": 7})
    assert run.status == "compensated"
    assert ("refund", 7) in CALLS
    assert [e.kind for e in run.events].count("compensation_retried") == 1


def test_fail_compensation_for_good_needs_an_operator(harness):
    harness.fail("ship").fail_compensation("charge")
    run = harness.run("harness_retries", {})
    assert run.status == "compensation_failed"
    assert ("refund", 0) not in CALLS


def test_deliver_twice_records_each_effect_once(harness):
    harness.deliver_twice("send_email").deliver_twice("create_invoice")
    run = harness.run("create_booking", {})
    assert run.status == "succeeded"
    assert harness.redelivered == {(run.id, "send_email"), (run.id, "create_invoice")}
    assert effects_of(run.id) == [("do", s.name) for s in run.steps]
    kinds = [e.kind for e in run.events]
    assert kinds.count("step_succeeded") == 4 and kinds.count("run_succeeded") == 1


def test_a_gate_timeout_passes_at_once_and_compensates(harness):
    run = harness.run("harness_approval", {})
    assert run.status == "compensated"
    assert CALLS == [("reserve",), ("release",)]


def test_a_gate_waits_for_its_signal_without_skipping_time(harness):
    run_id = harness.start("harness_approval", {})
    assert harness.wait(run_id, skip_time=False).status == "waiting"
    harness.signal(run_id, "approve", {"by": "ann"})
    assert harness.wait(run_id).status == "succeeded"
    assert CALLS == [("reserve",), ("deliver",)]


def test_a_run_deadline_passes_at_once_and_cancels(harness):
    run = harness.run("harness_late", {})
    assert run.status == "cancelled"
    assert "deadline_passed" in [e.kind for e in run.events]
    assert CALLS == [("undo_first",)]


def test_bad_arguments_are_refused_and_change_nothing(harness):
    with pytest.raises(ValueError, match="times"):
        harness.fail_times("charge", 0)
    with pytest.raises(ValueError, match="step name"):
        harness.fail("")
    with pytest.raises(ValueError, match="concurrency"):
        SagaHarness(concurrency=0)
    with pytest.raises(ValueError, match="moves forward"):
        harness.clock.advance(-1)
    run = harness.run("harness_retries", {})
    assert run.status == "succeeded"
