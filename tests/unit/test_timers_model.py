"""Time as a step, without a worker: the sleep step's definition (Python and YAML), cron checks and the ticks a
sweep fires (catch-up), delayed-start arguments, the visibility-timeout check with a 3-hour retry policy, and
the store's timers on SQLite and PostgreSQL (their compare-and-sets, at a given ``now``)."""

from __future__ import annotations

import datetime as dt

import pytest

from sagaflow import DefinitionError, InvalidInput, RetryPolicy, Saga, Sleep, Step, StepKind
from sagaflow.client import start_time
from sagaflow.config.settings import Settings
from sagaflow.errors import SagaflowError
from sagaflow.model.declarative import HandlerRegistry, SagaFileError, parse_saga_file
from sagaflow.model.definition import registry
from sagaflow.model.schedule import CatchUp, check_catchup, check_cron, due_ticks, tick_key
from sagaflow.model.snapshots import StepSpec
from sagaflow.runtime import check_visibility_timeout

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


def noop(ctx):
    return None


# ---------------------------------------------------------------------------------------------- definitions


def test_a_sleep_step_in_both_python_forms():
    saga = Saga("sleepy_def", register=False)
    saga.step(noop, name="a")
    step = saga.sleep("cool_off", 3600)
    assert step.kind is StepKind.SLEEP and step.seconds == 3600 and step.action is None
    plain = Saga("sleepy_plain", steps=[Step("a", noop), Sleep("wait", lambda ctx: 5), Step("b", noop)],
                 register=False)
    assert [s.kind.value for s in plain.steps] == ["action", "sleep", "action"]
    assert not plain.linear  # a sleep needs the transactional store
    assert StepSpec.of(plain.steps[1]).kind == "sleep"


@pytest.mark.parametrize("seconds", [0, -1, "5", None, True, float("inf"), 10**10])
def test_a_bad_sleep_duration_is_refused(seconds):
    with pytest.raises(DefinitionError, match="seconds must be a number > 0"):
        Sleep("nap", seconds)


def test_a_sleep_cannot_be_in_a_parallel_group_nor_take_a_timeout():
    saga = Saga("sleepy_group", register=False)
    with pytest.raises(DefinitionError, match="cannot be in a parallel group"):
        with saga.parallel():
            saga.step(noop, name="a")
            saga.sleep("nap", 5)
    with pytest.raises(DefinitionError, match="a sleep has no timeout"):
        Step("nap", None, kind="sleep", seconds=5, timeout=3)
    with pytest.raises(DefinitionError, match="only a sleep step sleeps"):
        Step("a", noop, seconds=5)


def test_a_sleep_step_in_a_saga_file(tmp_path):
    text = """
sagas:
  - name: yaml_sleepy
    steps:
      - {action: yaml_noop}
      - {sleep: cool_off, seconds: 86400}
"""
    handlers = HandlerRegistry()
    handlers.register("yaml_noop", noop)
    saga, = parse_saga_file(tmp_path / "s.yaml", text, handlers=handlers)
    assert saga.steps[1].kind is StepKind.SLEEP and saga.steps[1].seconds == 86400
    with pytest.raises(SagaFileError, match="seconds must be a number > 0"):
        parse_saga_file(tmp_path / "s.yaml", text.replace("86400", "-1"), handlers=handlers)
    with pytest.raises(SagaFileError, match="seconds"):
        parse_saga_file(tmp_path / "s.yaml", text.replace(", seconds: 86400", ""), handlers=handlers)


def test_a_three_hour_retry_delay_passes_the_visibility_timeout_check():
    saga = Saga("hours_apart", steps=[Step("a", noop, retry=RetryPolicy(max_attempts=2, initial_interval=3 * 3600,
                                                                         kind="fixed", max_interval=3 * 3600))])
    try:
        base = Settings.from_env({"SAGAFLOW_BROKER_URL": "redis://localhost:6379/0"})
        check_visibility_timeout(base)  # the long delay waits in SQL, not in the broker
        with pytest.raises(SagaflowError, match="step hours_apart.a"):
            check_visibility_timeout(base.with_(durable_retry_after=4 * 3600))  # kept as a countdown: refused
    finally:
        registry.remove(saga.name)


# ---------------------------------------------------------------------------------------------- schedules


def test_cron_expressions_are_checked():
    assert check_cron("0  2 * * *") == "0 2 * * *"
    assert check_cron("* * * * * *") == "* * * * * *"  # six fields: seconds last
    for bad in ("", "61 * * * *", "every day", None, "* * *"):
        with pytest.raises(InvalidInput):
            check_cron(bad)
    assert check_catchup("once") is CatchUp.ONCE
    with pytest.raises(InvalidInput, match="catchup must be"):
        check_catchup("all")


def test_every_on_time_tick_fires_once_and_the_next_tick_follows():
    ticks, following = due_ticks("* * * * * *", T0, T0 + dt.timedelta(seconds=4), 60, CatchUp.SKIP)
    assert ticks == [T0 + dt.timedelta(seconds=k) for k in range(5)]
    assert following == T0 + dt.timedelta(seconds=5)
    assert due_ticks("0 2 * * *", T0, T0 - dt.timedelta(seconds=1), 60, CatchUp.SKIP) == ([], T0)
    assert tick_key("nightly", T0) == "schedule:nightly:2026-12-06T12:00:00Z"


def test_missed_ticks_are_skipped_or_run_once():
    next_fire = dt.datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # three nights missed
    skipped, following = due_ticks("0 2 * * *", next_fire, T0, 60, CatchUp.SKIP)
    assert skipped == [] and following == dt.datetime(2026, 12, 7, 2, 0, tzinfo=UTC)
    once, following = due_ticks("0 2 * * *", next_fire, T0, 60, CatchUp.ONCE)
    assert once == [dt.datetime(2026, 12, 6, 2, 0, tzinfo=UTC)] and following == dt.datetime(2026, 12, 7, 2, 0,
                                                                                             tzinfo=UTC)


# ---------------------------------------------------------------------------------------------- delayed starts


def test_a_delayed_start_time():
    assert start_time(None, None) is None
    now = dt.datetime.now(UTC)
    assert dt.timedelta(seconds=59) < start_time(None, 60) - now < dt.timedelta(seconds=61)
    later = now + dt.timedelta(hours=1)
    assert start_time(later.astimezone(dt.timezone(dt.timedelta(hours=2))), None) == later
    for at, delay in ((None, 0), (None, True), (now.replace(tzinfo=None), None), (now - dt.timedelta(1), None),
                      (later, 5)):
        with pytest.raises(InvalidInput):
            start_time(at, delay)


# ---------------------------------------------------------------------------------------------- the store


def _sleeping_run(store, run_id="r-sleep"):
    store.create_run(run_id, "s", 1, {}, [StepSpec("a", True), StepSpec("nap", False, kind="sleep"),
                                          StepSpec("b", False)])
    for idx in (0, 1):
        assert store.claim_step(run_id, idx, f"t{idx}:0", [], 30).attempt == 1
        if idx == 0:
            assert store.complete_step(run_id, 0, "t0:0", {"a": 1})
    assert store.start_sleep(run_id, 1, "t1:0", 3600).action == "waiting"
    return store.get_run(run_id)


def test_a_sleep_fires_once_at_its_time_and_not_before(store):
    run = _sleeping_run(store)
    until = run.step("nap").deadline_at
    assert run.status == "waiting" and run.step("nap").status == "waiting"
    assert store.due_timers(until - dt.timedelta(seconds=1)) == []
    assert [row.run_id for row in store.due_timers(until)] == [run.id]
    assert store.fire_timer(run.id, 1, until - dt.timedelta(seconds=1)) is None
    outcome = store.fire_timer(run.id, 1, until)
    assert outcome.action == "continue" and outcome.results == {"a": {"a": 1}, "nap": {"slept_until":
                                                                                       until.isoformat()}}
    assert store.fire_timer(run.id, 1, until) is None  # a second sweeper: nothing
    assert store.get_run(run.id).status == "running"


def test_cancel_during_a_sleep_fails_it_and_hands_back_the_errback(store):
    run = _sleeping_run(store, "r-cancel")
    outcomes = store.cancel_waiting(run.id)
    assert [(o.action, o.index) for o in outcomes] == [("errback", 1)]
    assert store.get_run(run.id).step("nap").error == "cancelled during the sleep"
    assert store.fire_timer(run.id, 1, dt.datetime.now(UTC) + dt.timedelta(days=1)) is None


def test_a_scheduled_run_is_released_once_when_due_or_cancelled_before(store):
    at = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    run, created = store.create_run("r-later", "s", 1, {}, [StepSpec("a", False)], start_at=at)
    assert created and run.status == "scheduled" and run.start_at is not None
    assert store.due_starts(at - dt.timedelta(seconds=1)) == []
    assert not store.release_scheduled(run.id, at - dt.timedelta(seconds=1))
    assert store.release_scheduled(run.id, at) and not store.release_scheduled(run.id, at)
    assert store.get_run(run.id).status == "pending"
    assert not store.cancel_scheduled(run.id)  # pending: the ordinary cancel handles it
    other, _ = store.create_run("r-later-2", "s", 1, {}, [StepSpec("a", False)], start_at=at)
    assert store.cancel_scheduled(other.id)
    cancelled = store.get_run(other.id)
    assert cancelled.status == "cancelled" and cancelled.step("a").status == "skipped"
    assert not store.release_scheduled(other.id, at)
