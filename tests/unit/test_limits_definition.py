"""Limits in a definition: Saga(max_concurrent_runs=), Step(concurrency=, rate_limit=), in Python and YAML,
with one clear error for each bad value; and a harness run showing each limit at work in one process."""

from __future__ import annotations

import textwrap
import threading
import time

import pytest

from sagaflow import DefinitionError, RetryPolicy, Saga, SagaFileError, Step
from sagaflow.model.declarative import HandlerRegistry, load_saga_file
from sagaflow.model.definition import RateLimit, Registry
from sagaflow.testing import SagaHarness


def act(ctx):
    return 1


def test_limits_in_python():
    saga = Saga("lim_py", [Step("a", act, concurrency=3, rate_limit="10/s")], max_concurrent_runs=2, register=False)
    assert saga.max_concurrent_runs == 2
    assert saga.steps[0].concurrency == 3 and saga.steps[0].rate_limit == RateLimit(10, 1.0)
    assert str(RateLimit.parse("100/m", "x")) == "100/m" and RateLimit.parse("5/h", "x").period == 3600


@pytest.mark.parametrize("options,message", [
    ({"concurrency": 0}, "concurrency must be an integer >= 1"),
    ({"concurrency": True}, "concurrency must be an integer >= 1"),
    ({"concurrency": 2.5}, "concurrency must be an integer >= 1"),
    ({"rate_limit": "10/d"}, "rate_limit must look like"),
    ({"rate_limit": "0/s"}, "rate_limit must look like"),
    ({"rate_limit": 10}, "rate_limit must look like"),
])
def test_bad_step_limits_are_refused(options, message):
    with pytest.raises(DefinitionError, match=message):
        Step("a", act, **options)


def test_bad_saga_limit_and_limits_where_they_cannot_hold_are_refused():
    with pytest.raises(DefinitionError, match="max_concurrent_runs must be an integer >= 1"):
        Saga("lim_bad", [Step("a", act)], max_concurrent_runs=0, register=False)
    with pytest.raises(DefinitionError, match="only an action step takes concurrency"):
        Step("g", None, kind="gate", signal="go", timeout=5, concurrency=1)
    saga = Saga("lim_par", register=False)
    with pytest.raises(DefinitionError, match="parallel group takes no concurrency"):
        with saga.parallel():
            saga.step(act, name="x", concurrency=2)


def test_limits_in_yaml(tmp_path):
    handlers = HandlerRegistry()
    handlers.register("act", act)
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""
        sagas:
          - name: lim_yaml
            max_concurrent_runs: 4
            steps:
              - {action: act, concurrency: 2, rate_limit: "10/s"}
    """))
    (saga,) = load_saga_file(path, handlers=handlers, registry=Registry())
    assert saga.max_concurrent_runs == 4
    assert (saga.steps[0].concurrency, str(saga.steps[0].rate_limit)) == (2, "10/s")
    path.write_text(textwrap.dedent("""
        sagas:
          - name: lim_yaml
            steps:
              - {action: act, rate_limit: "ten per second"}
    """))
    with pytest.raises(SagaFileError, match=r"s.yaml:5: .*rate_limit must look like"):
        load_saga_file(path, handlers=handlers, registry=Registry())


# ---------------------------------------------------------------------------------------------- in the harness

LOCK = threading.Lock()
ACTIVE = [0, 0]  # now, most
ORDER: list[int] = []

narrow = Saga("lim_narrow")


@narrow.step()
def first(ctx):
    return 1


@narrow.step(concurrency=2)
def squeeze(ctx):
    with LOCK:
        ACTIVE[0] += 1
        ACTIVE[1] = max(ACTIVE)
    time.sleep(0.05)
    with LOCK:
        ACTIVE[0] -= 1
    return 1


one_run = Saga("lim_one_run", max_concurrent_runs=1)


@one_run.step()
def only(ctx):
    ORDER.append(ctx.input["n"])
    time.sleep(0.2)
    return 1


def test_in_the_harness_a_concurrency_holds_and_runs_queue_in_the_order_they_started():
    with SagaHarness(concurrency=6) as harness:
        runs = [harness.wait(i) for i in [harness.start("lim_narrow", {}) for _ in range(8)]]
        assert {r.status for r in runs} == {"succeeded"} and ACTIVE[1] == 2
        assert any("step_queued" in [e.kind for e in r.events] for r in runs)
        ids = [harness.start("lim_one_run", {"n": n}) for n in range(5)]
        limit = time.monotonic() + 10
        while harness.get(ids[3]).status != "queued" and time.monotonic() < limit:
            time.sleep(0.01)
        assert harness.cancel(ids[3]).status == "cancelled"  # a queued run ends at once
        runs = [harness.wait(i) for i in ids]
        assert [r.status for r in runs] == ["succeeded"] * 3 + ["cancelled", "succeeded"]
        assert ORDER == [0, 1, 2, 4]


flaky_narrow = Saga("lim_flaky")


@flaky_narrow.step(concurrency=1, retry=RetryPolicy(max_attempts=3, initial_interval=30, backoff=1.0,
                                                     max_interval=30))
def wobble(ctx):
    return ctx.attempt


def test_in_the_harness_a_retried_step_keeps_its_slot_and_the_line_still_moves():
    with SagaHarness(concurrency=4) as harness:
        harness.fail_times("wobble", 1)
        runs = [harness.wait(i) for i in [harness.start("lim_flaky", {}) for _ in range(4)]]
        assert [r.status for r in runs] == ["succeeded"] * 4
        assert [r.steps[0].result for r in runs] == [2] * 4  # each failed once, retried, went through
        assert not [e for r in runs for e in r.events if e.kind == "run_recovered"]  # the sweeper had no part
