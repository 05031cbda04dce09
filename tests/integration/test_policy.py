"""Compensation switched off by policy, on a real prefork worker, Redis and PostgreSQL: the run is a plain
Celery chain of the same steps, whose only trace in SQL is the run row."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import func, select

import sagaflow.app
from sagaflow import InvalidTransition
from sagaflow.store import tables as t
from sagaflow.tasks.effects import effects_of
from tests.helpers import kinds

pytestmark = pytest.mark.integration


@pytest.fixture
def policy(settings, tmp_path, monkeypatch):
    """A policy file for the client (this process decides at start), and a way to change the environment's
    switches; the worker needs neither: the run's mode travels in its messages."""
    path = tmp_path / "policy.yaml"

    def use(text: str | None = None, **env_settings):
        if text is not None:
            old = path.stat().st_mtime_ns if path.exists() else 0
            path.write_text(text)
            os.utime(path, ns=(old + 2_000_000_000,) * 2)  # an edit a moment later
        monkeypatch.setattr(sagaflow.app, "_settings",
                            settings.with_(policy_file=path, policy_file_required=True, **env_settings))

    use("default: on\n")
    return use


def rows(client, run_id):
    """(run rows, step rows, event rows) of the run."""
    with client.store.engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(table).where(column == run_id)).scalar()
                     for table, column in ((t.runs, t.runs.c.id), (t.steps, t.steps.c.run_id),
                                           (t.events, t.events.c.run_id)))


def test_off_by_policy_a_run_is_a_plain_chain_that_succeeds_with_only_its_run_row(client, policy):
    policy("sagas:\n  create_booking: {compensation: off}\n")
    started = client.start("create_booking", {"customer": "c1", "flaky": {"send_email": 2}})
    assert started.mode == "plain"
    run = client.wait(started.id)

    assert (run.status, run.mode, run.error) == ("succeeded", "plain", None)
    assert run.finished_at is not None
    assert run.steps == () and run.events == ()
    assert rows(client, run.id) == (1, 0, 0)
    # Every action once, in order; the flaky one retried by Celery with its own policy.
    assert effects_of(run.id) == [("do", "create_invoice"), ("do", "send_email"), ("do", "send_whatsapp"),
                                  ("do", "add_calendar")]


def test_off_by_policy_a_failure_ends_the_run_failed_and_nothing_is_undone(client, policy):
    policy("sagas:\n  create_booking: {compensation: off}\n")
    run = client.wait(client.start("create_booking", {"fail_at": "send_whatsapp"}).id)

    assert run.status == "failed" and run.mode == "plain"
    assert "send_whatsapp" in run.error and "ExampleFailure" in run.error
    assert effects_of(run.id) == [("do", "create_invoice"), ("do", "send_email")]  # no undo
    assert rows(client, run.id) == (1, 0, 0)
    with pytest.raises(InvalidTransition):
        client.retry(run.id)


def test_a_plain_run_cannot_be_cancelled(client, policy):
    policy("sagas:\n  create_booking: {compensation: off}\n")
    run = client.start("create_booking", {"sleep": {"create_invoice": 1}})
    with pytest.raises(InvalidTransition, match="plain Celery chain"):
        client.cancel(run.id)
    assert client.wait(run.id).status == "succeeded"


def test_an_edit_of_the_policy_file_applies_to_the_next_start_without_a_restart(client, policy):
    first = client.wait(client.start("flags_policy", {}).id)
    assert first.mode == "saga" and first.status == "succeeded" and len(first.steps) == 3

    policy("sagas:\n  flags_policy: {compensation: off}\n")  # the same file, edited
    second = client.wait(client.start("flags_policy", {"fail_at": "fund"}).id)
    assert (second.mode, second.status) == ("plain", "failed")
    assert effects_of(second.id) == [("do", "open_account")]

    policy("default: on\n")
    third = client.wait(client.start("flags_policy", {"fail_at": "fund"}).id)
    assert (third.mode, third.status) == ("saga", "compensated")
    assert effects_of(third.id) == [("do", "open_account"), ("undo", "open_account")]
    assert kinds(third)[-1] == ("run_compensated", None)


def test_the_environment_switches_and_the_file_entries_that_override_them(client, policy):
    policy("sagas:\n  flags_policy: {compensation: on}\n", saga_enabled=False)
    assert client.start("create_booking", {}).mode == "plain"  # SAGAFLOW_SAGA_ENABLED=false: off for all
    kept = client.wait(client.start("flags_policy", {"fail_at": "welcome"}).id)  # ...but the file's entry wins
    assert (kept.mode, kept.status) == ("saga", "compensated")
    assert effects_of(kept.id) == [("do", "open_account"), ("do", "fund"), ("undo", "fund"),
                                   ("undo", "open_account")]

    policy("default: on\n", saga_operations=("flags_policy",))  # SAGAFLOW_SAGA_OPERATIONS=flags_policy
    assert client.start("flags_policy", {}).mode == "saga"
    plain = client.wait(client.start("create_booking", {}).id)
    assert (plain.mode, plain.status) == ("plain", "succeeded")


def test_a_malformed_policy_file_refuses_new_runs_until_fixed_and_writes_nothing(client, policy, settings):
    from sagaflow.model.policy import PolicyError

    # A fresh file name: this process never had a good policy from it.
    bad = settings.home / "never-good-policy.yaml"
    bad.write_text("default: sometimes\n")
    sagaflow.app._settings = sagaflow.app._settings.with_(policy_file=bad)
    with client.store.engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(t.runs)).scalar()
    with pytest.raises(PolicyError, match=f"{bad}.*default: must be on or off"):
        client.start("create_booking", {})
    with client.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.runs)).scalar() == before


def test_a_plain_run_whose_worker_is_lost_is_marked_failed_by_its_errback(client, policy):
    # The step is killed at its hard time limit before it can record anything: the errback
    # (sagaflow.on_plain_failed, fired twice by Celery here) marks the run failed, once.
    policy("sagas:\n  flags_lost_non_atomic: {compensation: off}\n")
    run = client.wait(client.start("flags_lost_non_atomic", {}).id, timeout=60)

    assert (run.status, run.mode) == ("failed", "plain")
    assert "worker was lost" in run.error
    assert effects_of(run.id) == [("do", "setup"), ("do", "partial")]  # nothing undone, nothing after
    assert rows(client, run.id) == (1, 0, 0)
