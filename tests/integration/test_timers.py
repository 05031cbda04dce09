"""Time as a step (issue 18) on a real worker, Redis and PostgreSQL: durable sleeps (across a worker kill and
restart; three days, by moving the sweeper's clock; cancelled midway), a three-hour retry delay kept in SQL,
delayed starts, and schedules fired once per tick by several sweepers at once.

The sweeper's clock is moved by passing ``now`` to the sweep this test process runs
(``recover_stalled(now=...)``); the worker under test keeps the real clock (its own sweeps fire nothing
early)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import select

from sagaflow import InvalidInput, InvalidTransition, UnknownSchedule
from sagaflow.app import get_store
from sagaflow.runtime import timers
from sagaflow.runtime.recovery import recover_stalled
from sagaflow.store import tables as t
from sagaflow.tasks.effects import effects_of
from tests.conftest import ROOT
from tests.helpers import kinds, wait_for
from tests.web_client import call
from tests.workers import start_worker, stop_worker

pytestmark = pytest.mark.integration


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def waiting_at(client, run_id: str, step: str, timeout: float = 30):
    return wait_for(lambda: (lambda r: r if r.status == "waiting" and r.step(step).status == "waiting" else None)(
        client.get(run_id)), timeout=timeout, what=f"run {run_id} to wait at {step}")


def fired(recoveries, run_id: str, action: str = "timer_fired") -> bool:
    return any(r.run_id == run_id and r.action == action for r in recoveries)


# ---------------------------------------------------------------------------------------------- sleeps


def test_a_sleep_waits_holding_no_worker_and_the_sweeper_moves_the_run_on_when_due(client):
    run = client.start("nap", {"seconds": 1})
    run = waiting_at(client, run.id, "cool_off")
    sleeping = run.step("cool_off")
    assert sleeping.kind == "sleep" and sleeping.deadline_at is not None
    assert effects_of(run.id) == [("do", "reserve")]
    assert kinds(run)[-1] == ("run_waiting", "cool_off")

    run = client.wait(run.id, timeout=60)  # the worker's own sweep (every SAGAFLOW_RECOVERY_INTERVAL) wakes it
    assert run.status == "succeeded"
    assert run.step("cool_off").result == {"slept_until": sleeping.deadline_at.isoformat()}
    assert run.step("ship").started_at >= sleeping.deadline_at  # both from the database's clock
    assert effects_of(run.id) == [("do", "reserve"), ("do", "ship")]
    assert kinds(run, "run_waiting", "timer_fired", "step_succeeded") == [
        ("step_succeeded", "reserve"), ("run_waiting", "cool_off"), ("timer_fired", "cool_off"),
        ("step_succeeded", "cool_off"), ("step_succeeded", "ship")]


def test_a_five_second_sleep_survives_a_worker_kill_and_restart(settings, client):
    """The run's steps run on queue "timers", served by one worker that is SIGKILLed while the run sleeps
    and started again once the sleep is over: the sleep fires (the session worker sweeps), and the next
    step, waiting in the broker meanwhile, runs on the new worker."""
    doomed = start_worker(settings, "timers1", concurrency=1, log_name="timers1.log", args=("-Q", "timers"))
    try:
        run = client.start("nap_queued", {})
        run = waiting_at(client, run.id, "cool_off")
        until = run.step("cool_off").deadline_at
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        wait_for(lambda: utcnow() > until + dt.timedelta(seconds=1), timeout=30, what="the sleep to be over")
        assert client.get(run.id).step("ship").status == "pending"  # nothing ran it: no worker serves "timers"
    finally:
        stop_worker(doomed)
    again = start_worker(settings, "timers2", concurrency=1, log_name="timers2.log", args=("-Q", "timers"))
    try:
        run = client.wait(run.id, timeout=60)
    finally:
        stop_worker(again)
    assert run.status == "succeeded"
    assert run.step("ship").started_at >= until
    assert effects_of(run.id) == [("do", "reserve"), ("do", "ship")]


def test_a_three_day_sleep_fires_when_the_sweepers_clock_is_moved_and_only_then(client):
    run = waiting_at(client, client.start("nap_long", {}).id, "three_days")
    until = run.step("three_days").deadline_at
    assert until - utcnow() > dt.timedelta(days=2, hours=23)

    assert not fired(recover_stalled(), run.id)  # the real clock: not due
    assert not fired(recover_stalled(now=until - dt.timedelta(seconds=1)), run.id)
    assert fired(recover_stalled(now=until + dt.timedelta(seconds=1)), run.id)
    assert not fired(recover_stalled(now=until + dt.timedelta(seconds=2)), run.id)  # once

    run = client.wait(run.id, timeout=30)
    assert run.status == "succeeded"
    assert effects_of(run.id) == [("do", "reserve"), ("do", "ship")]


def test_cancel_during_a_sleep_compensates_at_once(client):
    run = waiting_at(client, client.start("nap", {"seconds": 3600}).id, "cool_off")
    client.cancel(run.id)
    run = client.wait(run.id, timeout=30)  # long before the hour is out

    assert run.status == "cancelled"
    assert run.step("cool_off").status == "failed" and run.step("cool_off").error == "cancelled during the sleep"
    assert run.step("ship").status in ("pending", "skipped")
    assert effects_of(run.id) == [("do", "reserve"), ("undo", "reserve")]
    assert not fired(recover_stalled(now=utcnow() + dt.timedelta(hours=2)), run.id)  # the timer is gone


# ---------------------------------------------------------------------------------------------- long retries


def test_a_three_hour_retry_delay_is_accepted_kept_in_sql_and_fires_when_due(client):
    run = client.start("patient", {"flaky": {"charge": 1}})  # charge fails its first attempt
    run = waiting_at(client, run.id, "charge")
    until = run.step("charge").deadline_at
    assert dt.timedelta(hours=2, minutes=59) < until - utcnow() <= dt.timedelta(hours=3)
    assert run.step("charge").attempts == 1
    assert ("step_retried", "charge") in kinds(run)

    assert not fired(recover_stalled(), run.id)
    assert fired(recover_stalled(now=until + dt.timedelta(seconds=1)), run.id)
    run = client.wait(run.id, timeout=30)

    assert run.status == "succeeded"
    assert run.step("charge").attempts == 2
    assert effects_of(run.id) == [("do", "reserve"), ("do", "charge")]
    assert kinds(run, "step_retried", "run_waiting", "timer_fired", "step_started")[-4:] == [
        ("step_retried", "charge"), ("run_waiting", "charge"), ("timer_fired", "charge"), ("step_started", "charge")]


def test_cancel_during_a_long_retry_delay_compensates_at_once(client):
    run = waiting_at(client, client.start("patient", {"flaky": {"charge": 1}}).id, "charge")
    client.cancel(run.id)
    run = client.wait(run.id, timeout=30)
    assert run.status == "cancelled"
    assert run.step("charge").error == "cancelled while waiting to retry"
    assert effects_of(run.id) == [("do", "reserve"), ("undo", "reserve")]


def _undone_once_in_reverse(run_id: str) -> None:
    """Every action that took effect is undone exactly once, latest first, after all of them."""
    effects = effects_of(run_id)
    done = [name for kind, name in effects if kind == "do"]
    assert effects == [("do", n) for n in done] + [("undo", n) for n in reversed(done)], effects


def test_a_deadline_passing_during_a_long_retry_delay_compensates_once(client):
    """The run's deadline passes while its step waits three hours in SQL to retry: the deadline cancels the
    waiting run, the undo runs once, and the retry's timer is gone (a sweep three hours on fires nothing)."""
    run = waiting_at(client, client.start("patient", {"flaky": {"charge": 1}}, deadline=3).id, "charge")
    until = run.step("charge").deadline_at
    run = client.wait(run.id, timeout=60)  # the worker's own sweep finds the deadline passed
    assert run.status == "cancelled"
    assert ("deadline_passed", None) in kinds(run)
    assert run.step("charge").attempts == 1
    assert not fired(recover_stalled(now=until + dt.timedelta(seconds=1)), run.id)
    time.sleep(1)  # anything published late would have run by now
    assert effects_of(run.id) == [("do", "reserve"), ("undo", "reserve")]


@pytest.mark.parametrize("first", ["timer", "deadline"])
def test_a_deadline_and_the_retry_timer_due_together_end_the_run_once(client, first):
    """The harness once saw an undo run twice when its moved clock made a retry timer and the run's deadline
    due together. On a real worker, with this process's sweep and the worker's own racing for both, in
    either order: the run ends once, cancelled with every effect undone once in reverse order, or succeeded
    when the retried step finished before the cancel reached it; never an undo twice."""
    from sagaflow.runtime.recovery import cancel_past_deadline

    for _ in range(3):
        run = waiting_at(client, client.start("patient", {"flaky": {"charge": 1}}, deadline=3600).id, "charge")
        until = run.step("charge").deadline_at
        with get_store().engine.begin() as conn:  # the deadline has just passed (the test cannot wait an hour)
            conn.execute(t.runs.update().where(t.runs.c.id == run.id).values(deadline_at=utcnow()))
        if first == "deadline":
            cancel_past_deadline(get_store())
        timers.sweep(get_store(), until + dt.timedelta(seconds=1))
        cancel_past_deadline(get_store())
        run = client.wait(run.id, timeout=60)
        assert run.status in ("cancelled", "succeeded"), run.status
        if first == "deadline":  # the waiting run was cancelled before the timer was due: it found nothing
            assert run.status == "cancelled" and ("timer_fired", "charge") not in kinds(run)
        time.sleep(1)  # a second undo, if one were published, would have run by now
        if run.status == "succeeded":
            assert effects_of(run.id) == [("do", "reserve"), ("do", "charge")]
        else:
            _undone_once_in_reverse(run.id)
        assert not fired(recover_stalled(now=until + dt.timedelta(seconds=2)), run.id)


# ---------------------------------------------------------------------------------------------- delayed starts


def test_a_delayed_start_runs_at_its_time(client):
    run = client.start("tick", {}, delay=2)
    assert run.status == "scheduled" and run.start_at is not None
    assert effects_of(run.id) == []
    run = client.wait(run.id, timeout=60)  # the worker's own sweep starts it
    assert run.status == "succeeded"
    assert run.step("note").started_at >= run.start_at
    assert kinds(run)[:3] == [("run_started", None), ("run_scheduled", None), ("timer_fired", None)]


def test_a_start_a_day_ahead_waits_for_the_moved_clock(client):
    at = utcnow() + dt.timedelta(days=1)
    run = client.start("tick", {}, at=at)
    assert run.status == "scheduled" and abs(run.start_at - at) < dt.timedelta(milliseconds=1)
    assert not fired(recover_stalled(now=at - dt.timedelta(seconds=1)), run.id, "run_started")
    assert client.get(run.id).status == "scheduled"
    assert fired(recover_stalled(now=at + dt.timedelta(seconds=1)), run.id, "run_started")
    assert client.wait(run.id, timeout=30).status == "succeeded"


def test_cancel_of_a_scheduled_run_cancels_it_before_anything_runs(client):
    run = client.start("tick", {}, delay=3600)
    cancelled = client.cancel(run.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert not fired(recover_stalled(now=utcnow() + dt.timedelta(hours=2)), run.id, "run_started")
    assert client.get(run.id).status == "cancelled" and effects_of(run.id) == []
    with pytest.raises(InvalidTransition):
        client.cancel(run.id)


@pytest.mark.parametrize("kwargs, error", [
    ({"delay": 0}, "delay is a number of seconds > 0"),
    ({"delay": "soon"}, "delay is a number of seconds > 0"),
    ({"at": dt.datetime(2030, 1, 1)}, "at must be a datetime with a time zone"),
    ({"at": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)}, "is not in the future"),
    ({"delay": 5, "at": dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)}, "give at or delay, not both"),
])
def test_a_bad_delayed_start_is_refused_and_records_nothing(client, kwargs, error):
    before = client.list(saga="tick", limit=1).total
    with pytest.raises(InvalidInput, match=error):
        client.start("tick", {}, **kwargs)
    assert client.list(saga="tick", limit=1).total == before


# ---------------------------------------------------------------------------------------------- schedules


def schedule_runs(name: str) -> list[tuple[str, str]]:
    r = t.runs.c
    with get_store().engine.connect() as conn:
        rows = conn.execute(select(r.idempotency_key, r.id).where(r.idempotency_key.like(f"schedule:{name}:%"))
                            .order_by(r.idempotency_key)).all()
    return [(row.idempotency_key, row.id) for row in rows]


def test_a_schedule_firing_each_second_with_three_sweepers_starts_one_run_per_tick(client):
    client.add_schedule("every_second", "tick", "* * * * * *", {"from": "schedule"})
    errors: list[BaseException] = []
    stop = threading.Event()

    def sweeper():
        while not stop.is_set():
            try:
                timers.sweep(get_store())  # the real clock; no sweeper lease: all three sweep at once
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            time.sleep(0.1)

    threads = [threading.Thread(target=sweeper, name=f"sweeper-{i}") for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    client.pause_schedule("every_second")
    stop.set()
    for thread in threads:
        thread.join(30)
    client.remove_schedule("every_second")

    assert errors == []
    runs = schedule_runs("every_second")
    ticks = [dt.datetime.fromisoformat(key.split(":", 2)[2].replace("Z", "+00:00")) for key, _ in runs]
    assert len(runs) >= 4, runs  # about five seconds of ticks
    assert len({key for key, _ in runs}) == len(runs)  # one run per tick
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert gaps == [dt.timedelta(seconds=1)] * (len(ticks) - 1)  # none missed
    for _, run_id in runs:
        run = client.wait(run_id, timeout=60)
        assert run.status == "succeeded" and run.input == {"from": "schedule"}
        assert ("run_scheduled", None) in kinds(run)


def test_a_paused_schedule_fires_nothing(client):
    client.add_schedule("paused_one", "tick", "* * * * * *", paused=True)
    later = utcnow() + dt.timedelta(seconds=30)
    recover_stalled(now=later)
    assert schedule_runs("paused_one") == []
    client.resume_schedule("paused_one")
    client.pause_schedule("paused_one")
    recover_stalled(now=later)
    assert schedule_runs("paused_one") == []
    assert client.schedule("paused_one").paused
    client.remove_schedule("paused_one")
    with pytest.raises(UnknownSchedule):
        client.schedule("paused_one")


def test_a_nightly_schedule_fires_once_per_tick_at_the_moved_clock(client):
    schedule = client.add_schedule("nightly", "tick", "0 2 * * *", {"n": 1})
    first = schedule.next_fire_at
    assert (first.hour, first.minute, first.second) == (2, 0, 0)
    for _ in range(2):  # twice at the same moment: one run
        recover_stalled(now=first + dt.timedelta(seconds=1))
    runs = schedule_runs("nightly")
    assert [key for key, _ in runs] == [f"schedule:nightly:{first.strftime('%Y-%m-%dT%H:%M:%SZ')}"]
    assert client.schedule("nightly").next_fire_at == first + dt.timedelta(days=1)
    client.remove_schedule("nightly")
    assert client.wait(runs[0][1], timeout=30).status == "succeeded"


def test_missed_ticks_are_skipped_or_run_once_as_the_schedule_says(client):
    for policy in ("skip", "once"):
        schedule = client.add_schedule(f"missed_{policy}", "tick", "0 * * * *", catchup=policy)
        recover_stalled(now=schedule.next_fire_at + dt.timedelta(hours=5, minutes=30))  # five ticks missed
    skipped, once = schedule_runs("missed_skip"), schedule_runs("missed_once")
    assert skipped == [] and len(once) == 1
    for policy in ("skip", "once"):
        client.remove_schedule(f"missed_{policy}")


@pytest.mark.parametrize("args, error", [
    (("bad name", "tick", "* * * * *"), "schedule name"),
    (("x1", "tick", "61 * * * *"), "is not valid"),
    (("x1", "tick", ""), "cron must be a cron expression"),
    (("x1", "tick", "* * * * *", [1]), "input must be a JSON object"),
])
def test_a_bad_schedule_is_refused_and_records_nothing(client, args, error):
    with pytest.raises(InvalidInput, match=error):
        client.add_schedule(*args)
    assert [s.name for s in client.schedules() if s.name == "x1"] == []


# ---------------------------------------------------------------------------------------------- the faces


def test_the_status_page_shows_a_sleep_until_when_and_a_scheduled_run(client, web_url):
    run = waiting_at(client, client.start("nap", {"seconds": 3600}).id, "cool_off")
    until = run.step("cool_off").deadline_at
    page = call("GET", f"{web_url}/runs/{run.id}")
    assert page.status == 200
    assert "Sleeping at cool_off" in page.text and until.strftime("%Y-%m-%d %H:%M:%S") in page.text
    client.cancel(run.id)

    later = client.start("tick", {}, delay=3600)
    page = call("GET", f"{web_url}/runs/{later.id}")
    assert "Scheduled: starts at" in page.text and later.start_at.strftime("%Y-%m-%d %H:%M:%S") in page.text
    listing = call("GET", f"{web_url}/?status=scheduled")
    assert listing.status == 200 and later.id[:8] in listing.text
    client.cancel(later.id)


def test_delayed_starts_and_schedules_over_http(client, web_url):
    answer = call("POST", f"{web_url}/api/runs", {"saga": "tick", "delay": 3600})
    assert answer.status == 202 and answer.json["status"] == "scheduled", answer.text
    client.cancel(answer.json["id"])
    at = (utcnow() + dt.timedelta(hours=1)).isoformat()
    later = call("POST", f"{web_url}/api/runs", {"saga": "tick", "at": at}).json
    assert later["status"] == "scheduled" and later["start_at"] is not None
    client.cancel(later["id"])  # a run left scheduled would count as live in other tests' totals
    bad = call("POST", f"{web_url}/api/runs", {"saga": "tick", "delay": -1})
    assert bad.status == 400 and "delay" in bad.json["error"]

    added = call("POST", f"{web_url}/api/schedules", {"name": "http_nightly", "saga": "tick", "cron": "0 2 * * *",
                                                      "input": {"a": 1}, "catchup": "once"})
    assert added.status == 201, added.text
    assert added.json["catchup"] == "once" and added.json["paused"] is False
    assert call("POST", f"{web_url}/api/schedules", {"name": "http_nightly", "saga": "tick",
                                                     "cron": "0 2 * * *"}).status == 409
    assert call("POST", f"{web_url}/api/schedules", {"name": "x", "saga": "tick", "cron": "nope"}).status == 400
    assert call("POST", f"{web_url}/api/schedules", {"name": "x", "saga": "nosuch", "cron": "* * * * *"}).status == 400
    assert "http_nightly" in [s["name"] for s in call("GET", f"{web_url}/api/schedules").json["items"]]
    assert call("POST", f"{web_url}/api/schedules/http_nightly/pause").json["paused"] is True
    assert call("POST", f"{web_url}/api/schedules/http_nightly/resume").json["paused"] is False
    assert call("DELETE", f"{web_url}/api/schedules/http_nightly").status == 204
    assert call("GET", f"{web_url}/api/schedules/http_nightly").status == 404


def test_the_schedule_and_delayed_start_commands(settings, client):
    env = {**os.environ, **settings.as_env(), "SAGAFLOW_LOG_LEVEL": "WARNING"}

    def sagaflow(*args):
        return subprocess.run([sys.executable, "-m", "sagaflow", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    added = sagaflow("schedule", "add", "cli_nightly", "--saga", "tick", "--cron", "0 2 * * *", "--input", '{"a": 1}')
    assert added.returncode == 0, added.stderr
    assert "cli_nightly" in sagaflow("schedule", "list").stdout
    assert "paused" in sagaflow("schedule", "pause", "cli_nightly").stdout
    assert "next" in sagaflow("schedule", "resume", "cli_nightly").stdout
    bad = sagaflow("schedule", "add", "cli_bad", "--saga", "tick", "--cron", "99 * * * *")
    assert bad.returncode != 0 and "is not valid" in bad.stderr and "Traceback" not in bad.stderr
    assert sagaflow("schedule", "remove", "cli_nightly").returncode == 0
    gone = sagaflow("schedule", "pause", "cli_nightly")
    assert gone.returncode != 0 and "unknown schedule" in gone.stderr

    later = sagaflow("start", "tick", "--delay", "3600", "--json")
    assert later.returncode == 0, later.stderr
    run_id = json.loads(later.stdout)["id"]
    assert client.get(run_id).status == "scheduled"
    shown = sagaflow("status", run_id)
    assert "starts at" in shown.stdout
    client.cancel(run_id)
