"""Approval gates and signals on a real worker, Redis and PostgreSQL: a gate waits holding no worker, its
signal (in either order) passes it, its deadline compensates the run (the recovery sweeper), a cancel while
waiting undoes what completed; bad signals are refused and change nothing, over the client and over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sagaflow import InvalidInput, InvalidTransition, UnknownRun
from sagaflow.runtime.recovery import recover_stalled
from sagaflow.tasks.effects import effects_of
from tests.conftest import ROOT
from tests.helpers import kinds, wait_for
from tests.integration.conftest import WEB_TOKEN
from tests.web_client import call

pytestmark = pytest.mark.integration


def waiting(client, run_id: str, step: str = "approve"):
    return wait_for(lambda: (lambda r: r if r.status == "waiting" and r.step(step).status == "waiting" else None)(
        client.get(run_id)), what=f"run {run_id} to wait at {step}")


def test_a_signalled_gate_passes_with_the_payload_as_its_result_and_later_steps_see_it(client):
    run = client.start("approval", {})
    run = waiting(client, run.id)
    assert effects_of(run.id) == [("do", "reserve")]  # charge waits for the gate
    assert run.step("approve").deadline_at is not None
    assert kinds(run)[-1] == ("run_waiting", "approve")

    signalled = client.signal(run.id, "approved", {"by": "ann"})
    assert signalled.step("approve").status == "succeeded"
    run = client.wait(run.id)

    assert run.status == "succeeded"
    assert run.step("approve").result == {"by": "ann"}
    assert run.step("charge").result == {"approved_by": "ann", "reserved": {"reserved": True}}
    assert effects_of(run.id) == [("do", "reserve"), ("do", "charge")]
    assert kinds(run, "signal_received", "step_succeeded", "run_succeeded") == [
        ("step_succeeded", "reserve"), ("signal_received", "approve"), ("step_succeeded", "approve"),
        ("step_succeeded", "charge"), ("run_succeeded", None)]


def test_a_signal_sent_before_the_run_reaches_its_gate_is_taken_there(client):
    run = client.start("approval", {"sleep": {"reserve": 0.5}})
    client.signal(run.id, "approved", {"by": "early"})  # the run is still pending or at reserve
    run = client.wait(run.id)

    assert run.status == "succeeded"
    assert run.step("charge").result["approved_by"] == "early"
    assert ("run_waiting", "approve") not in kinds(run)
    assert effects_of(run.id) == [("do", "reserve"), ("do", "charge")]


def test_a_gate_that_is_the_last_step_finishes_the_run_when_signalled(client):
    run = waiting(client, client.start("approval_last", {}).id, "publish")
    client.signal(run.id, "go")  # no payload: null
    run = client.wait(run.id)
    assert run.status == "succeeded" and run.step("publish").result is None
    assert effects_of(run.id) == [("do", "draft")]


def test_a_gate_past_its_deadline_fails_and_the_run_is_compensated_each_undo_once(client):
    run = waiting(client, client.start("approval_quick", {}).id, "sign_off")
    # The beat task does this every SAGAFLOW_RECOVERY_INTERVAL; here the test process sweeps.
    wait_for(lambda: any(r.run_id == run.id and r.action == "gate_timeout" for r in recover_stalled(600)),
             what="the sweeper to time the gate out")
    assert not any(r.run_id == run.id for r in recover_stalled(600))  # once
    run = client.wait(run.id)

    assert run.status == "compensated"
    assert run.step("sign_off").status == "failed"
    assert run.step("sign_off").error == "no signal 'signed' within 1 s"
    assert run.step("ship").status == "skipped"
    assert effects_of(run.id) == [("do", "hold"), ("undo", "hold")]
    assert kinds(run)[-1] == ("run_compensated", None)
    with pytest.raises(InvalidTransition, match="is compensated"):
        client.signal(run.id, "signed")  # too late: the run is final


def test_the_beat_sweeper_times_a_gate_out_on_its_own(settings, client):
    from tests.workers import start_worker, stop_worker

    sweeper = start_worker(settings, "gate-sweeper", concurrency=1, log_name="gate-sweeper.log",
                           args=("-Q", "gate-sweeper-none", "--beat"),
                           env={"SAGAFLOW_RECOVERY_INTERVAL": "1"})
    try:
        run = client.start("approval_quick", {})
        run = client.wait(run.id, timeout=30)
    finally:
        stop_worker(sweeper)
    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "hold"), ("undo", "hold")]


def test_cancel_while_waiting_fails_the_gate_and_undoes_what_completed(client):
    run = waiting(client, client.start("approval", {}).id)
    cancelled = client.cancel(run.id)
    assert cancelled.cancel_requested
    run = client.wait(run.id)

    assert run.status == "cancelled"
    assert run.step("approve").error == "cancelled while waiting for signal 'approved'"
    assert run.step("charge").status == "skipped"
    assert effects_of(run.id) == [("do", "reserve"), ("undo", "reserve")]
    assert kinds(run, "cancel_requested", "run_cancelled") == [("cancel_requested", None), ("run_cancelled", None)]
    with pytest.raises(InvalidTransition):
        client.cancel(run.id)


def test_a_failure_after_the_gate_compensates_every_completed_step_once(client):
    run = waiting(client, client.start("approval", {"fail_at": "charge"}).id)
    client.signal(run.id, "approved", {"by": "bob"})
    run = client.wait(run.id)
    assert run.status == "compensated"
    assert effects_of(run.id) == [("do", "reserve"), ("undo", "reserve")]  # the gate has no undo of its own
    assert run.step("approve").status == "succeeded"


def test_bad_signals_are_refused_and_change_nothing(client):
    run = waiting(client, client.start("approval", {}).id)
    with pytest.raises(UnknownRun):
        client.signal("no-such-run", "approved")
    with pytest.raises(InvalidInput, match="must be an identifier"):
        client.signal(run.id, "not a name")
    with pytest.raises(InvalidInput, match="not JSON-serializable"):
        client.signal(run.id, "approved", {"when": object()})
    with pytest.raises(InvalidTransition, match="no gate for signal 'rejected'"):
        client.signal(run.id, "rejected")
    assert client.get(run.id) == run  # nothing changed

    client.signal(run.id, "approved", {"by": "ann"})
    after = client.wait(run.id)
    with pytest.raises(InvalidTransition, match="is succeeded"):
        client.signal(run.id, "approved", {"by": "eve"})
    assert client.get(run.id) == after


def test_a_duplicate_signal_is_refused_while_the_run_still_waits(client):
    run = client.start("approval", {"sleep": {"reserve": 1.0}})
    client.signal(run.id, "approved", {"by": "ann"})
    with pytest.raises(InvalidTransition, match="already delivered"):
        client.signal(run.id, "approved", {"by": "eve"})
    run = client.wait(run.id)
    assert run.step("charge").result["approved_by"] == "ann"


# ---------------------------------------------------------------------------------------------- HTTP


def test_the_signal_endpoint_answers_202_then_409_for_a_duplicate(web_url, client):
    run = waiting(client, client.start("approval", {"sleep": {"charge": 1}}).id)  # not final at the 2nd signal
    answer = call("POST", f"{web_url}/api/runs/{run.id}/signals/approved", {"by": "http"})
    assert answer.status == 202, answer.text
    assert answer.json["id"] == run.id
    again = call("POST", f"{web_url}/api/runs/{run.id}/signals/approved", {"by": "other"})
    assert again.status == 409 and "already delivered" in again.json["error"]
    run = client.wait(run.id)
    assert run.step("charge").result["approved_by"] == "http"
    final = call("POST", f"{web_url}/api/runs/{run.id}/signals/approved")
    assert final.status == 409 and "is succeeded" in final.json["error"]


def test_the_signal_endpoint_takes_an_empty_body_as_no_payload(web_url, client):
    run = waiting(client, client.start("approval_last", {}).id, "publish")
    answer = call("POST", f"{web_url}/api/runs/{run.id}/signals/go")
    assert answer.status == 202, answer.text
    assert client.wait(run.id).status == "succeeded"


def test_the_signal_endpoint_refuses_bad_requests_and_changes_nothing(web_url, web_token_url, client):
    run = waiting(client, client.start("approval", {}).id)
    url = f"{web_url}/api/runs/{run.id}/signals/approved"
    cases = [
        (call("POST", f"{web_url}/api/runs/no-such-run/signals/approved", {}), 404, "unknown run id"),
        (call("POST", url, raw=b"{not json", headers={"Content-Type": "application/json"}), 400, "malformed JSON"),
        (call("POST", url, raw=b"NaN", headers={"Content-Type": "application/json"}), 400, "not JSON"),
        (call("POST", f"{web_url}/api/runs/{run.id}/signals/bad-name", {}), 400, "must be an identifier"),
        (call("POST", f"{web_url}/api/runs/{run.id}/signals/rejected", {}), 409, "no gate for signal"),
        (call("POST", url, raw=b"1", headers={"Content-Type": "text/plain"}), 415, "must be JSON"),
        (call("POST", url, {}, headers={"Origin": "http://evil.example"}), 403, "cross-site"),
        (call("POST", f"{web_token_url}/api/runs/{run.id}/signals/approved", {}), 401, "token"),
        (call("GET", url), 405, None),
    ]
    for answer, status, message in cases:
        assert answer.status == status, (status, answer.text)
        if message:
            assert message in answer.json["error"]
    assert client.get(run.id) == run  # nothing changed
    ok = call("POST", f"{web_token_url}/api/runs/{run.id}/signals/approved", {"by": "tok"}, token=WEB_TOKEN)
    assert ok.status == 202
    assert client.wait(run.id).status == "succeeded"


# ---------------------------------------------------------------------------------------------- CLI


def test_the_signal_command(settings, client):
    env = {**os.environ, **settings.as_env(), "SAGAFLOW_LOG_LEVEL": "WARNING"}
    # not final at the 2nd signal: three CLI processes start meanwhile, slow on a loaded machine
    run = waiting(client, client.start("approval", {"sleep": {"charge": 10}}).id)

    def sagaflow(*args):
        return subprocess.run([sys.executable, "-m", "sagaflow", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    bad = sagaflow("signal", run.id, "approved", "--payload", "{nope")
    assert bad.returncode != 0 and "not valid JSON" in bad.stderr
    done = sagaflow("signal", run.id, "approved", "--payload", '{"by": "cli"}')
    assert done.returncode == 0, done.stderr
    again = sagaflow("signal", run.id, "approved")
    assert again.returncode != 0 and "already delivered" in again.stderr and "Traceback" not in again.stderr
    assert client.wait(run.id).step("charge").result["approved_by"] == "cli"
