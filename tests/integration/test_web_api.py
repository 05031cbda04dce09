"""The JSON API contract over real HTTP, against a real worker, Redis and PostgreSQL: start, list, filter,
detail, cancel, retry, every error code (and that a refused request changes nothing), and the token rule."""

from __future__ import annotations

import uuid

import pytest

from sagaflow.app import get_store
from sagaflow.model.definition import registry
from tests.helpers import wait_for
from tests.integration.conftest import WEB_MAX_BODY, WEB_TOKEN
from tests.web_client import call

pytestmark = pytest.mark.integration

STEP_FIELDS = {"name", "status", "attempts", "result", "error", "started_at", "finished_at", "task_id", "flower_url"}
EVENT_FIELDS = {"kind", "step", "at", "detail"}


def run_count() -> int:
    return get_store().list_runs(limit=1)[1]


def start(web_url, saga="create_booking", input=None, **extra):
    answer = call("POST", f"{web_url}/api/runs", {"saga": saga, "input": input or {}, **extra})
    assert answer.status == 202, answer.text
    return answer.json


# ---------------------------------------------------------------------------------------------- start, detail


def test_start_returns_202_with_the_run_and_the_detail_has_steps_and_events(web_url, client):
    answer = call("POST", f"{web_url}/api/runs", {"saga": "create_booking", "input": {"customer": "c1"}})

    assert answer.status == 202
    run = answer.json
    assert answer.headers["Location"] == f"/api/runs/{run['id']}"
    assert (run["saga"], run["status"], run["input"]) == ("create_booking", "pending", {"customer": "c1"})
    assert [s["name"] for s in run["steps"]] == [s.name for s in registry.get("create_booking").steps]

    client.wait(run["id"])
    detail = call("GET", f"{web_url}/api/runs/{run['id']}")
    assert detail.status == 200
    data = detail.json
    assert data["status"] == "succeeded" and data["finished_at"] and data["duration_seconds"] > 0
    for step in data["steps"]:
        assert STEP_FIELDS <= set(step)
        assert (step["status"], step["attempts"]) == ("succeeded", 1)
        assert step["started_at"] <= step["finished_at"]
        assert step["flower_url"] == f"http://127.0.0.1:5555/task/{step['task_id']}"
    assert data["steps"][0]["result"] == {"invoice_id": f"inv-{run['id'][:8]}", "customer": "c1"}
    assert all(EVENT_FIELDS <= set(e) for e in data["events"])
    assert data["events"][0]["kind"] == "run_started" and data["events"][-1]["kind"] == "run_succeeded"


def test_the_detail_of_a_failed_run_shows_the_error_and_the_compensations(web_url, client):
    run = start(web_url, input={"fail_at": "send_whatsapp"})
    client.wait(run["id"])

    data = call("GET", f"{web_url}/api/runs/{run['id']}").json
    assert data["status"] == "compensated"
    assert [(s["name"], s["status"]) for s in data["steps"]] == [
        ("create_invoice", "compensated"), ("send_email", "compensated"), ("send_whatsapp", "failed"),
        ("add_calendar", "skipped")]
    assert "send_whatsapp failed on purpose" in data["steps"][2]["error"]
    assert data["steps"][0]["compensation_flower_url"].endswith(data["steps"][0]["compensation_task_id"])
    undone = [(e["kind"], e["step"]) for e in data["events"] if e["kind"] == "compensation_succeeded"]
    assert undone == [("compensation_succeeded", "send_email"), ("compensation_succeeded", "create_invoice")]


def test_the_same_idempotency_key_returns_the_same_run(web_url, client):
    key = f"order-{uuid.uuid4()}"
    first = start(web_url, input={"customer": "c2"}, idempotency_key=key)
    before = run_count()
    second = start(web_url, input={"customer": "other"}, idempotency_key=key)

    assert second["id"] == first["id"] and second["input"] == {"customer": "c2"}
    assert run_count() == before
    client.wait(first["id"])


# ---------------------------------------------------------------------------------------------- list


def test_list_is_newest_first_filters_by_status_and_saga_and_pages(web_url, client):
    ok = [start(web_url, "collect_payment", {"amount": i}) for i in range(2)]
    failed = start(web_url, "collect_payment", {"fail_at": "create_invoice"})
    for run in (*ok, failed):
        client.wait(run["id"])

    page = call("GET", f"{web_url}/api/runs?saga=collect_payment&limit=3").json
    assert [r["id"] for r in page["items"]] == [failed["id"], ok[1]["id"], ok[0]["id"]]  # newest first
    assert page["total"] >= 3 and page["limit"] == 3 and page["offset"] == 0
    assert "steps" not in page["items"][0]

    compensated = call("GET", f"{web_url}/api/runs?saga=collect_payment&status=compensated&limit=1000").json
    assert failed["id"] in [r["id"] for r in compensated["items"]]
    assert all(r["saga"] == "collect_payment" and r["status"] == "compensated" for r in compensated["items"])
    assert compensated["total"] == len(compensated["items"])

    second = call("GET", f"{web_url}/api/runs?saga=collect_payment&limit=1&offset=1").json
    assert second["items"][0]["id"] == ok[1]["id"] and second["total"] == page["total"]
    everything = call("GET", f"{web_url}/api/runs").json
    assert everything["total"] == run_count() and len(everything["items"]) == min(50, everything["total"])


# ---------------------------------------------------------------------------------------------- cancel, retry


def test_cancel_a_slow_run_is_202_then_409_once_it_is_over(web_url, client):
    run = start(web_url, input={"sleep": {"send_email": 1.5}})
    wait_for(lambda: client.get(run["id"]).step("send_email").status == "running", what="send_email to start")

    answer = call("POST", f"{web_url}/api/runs/{run['id']}/cancel")
    assert answer.status == 202 and answer.json["cancel_requested"] is True
    assert client.wait(run["id"]).status == "cancelled"

    again = call("POST", f"{web_url}/api/runs/{run['id']}/cancel")
    assert again.status == 409
    assert again.json == {"error": f"run {run['id']} is cancelled: only pending or running runs can be cancelled"}
    retry = call("POST", f"{web_url}/api/runs/{run['id']}/retry")
    assert retry.status == 409 and "only runs in compensation_failed or stuck can be retried" in retry.json["error"]


def test_retry_resumes_a_run_in_compensation_failed(web_url, client):
    run = start(web_url, input={"fail_at": "add_calendar", "fail_compensation": {"send_email": 4}})
    assert client.wait(run["id"]).status == "compensation_failed"
    assert call("POST", f"{web_url}/api/runs/{run['id']}/cancel").status == 409

    answer = call("POST", f"{web_url}/api/runs/{run['id']}/retry")
    assert answer.status == 202 and answer.json["status"] in ("compensating", "compensated")
    assert client.wait(run["id"]).status == "compensated"


# ---------------------------------------------------------------------------------------------- errors


BAD_STARTS = [
    # (what, raw body, content type, status, error contains)
    ("unknown saga", b'{"saga": "nope"}', "application/json", 400, "unknown saga 'nope'"),
    ("no saga", b'{"input": {}}', "application/json", 400, "saga is required"),
    ("saga not a string", b'{"saga": 3}', "application/json", 400, "saga is required"),
    ("input an array", b'{"saga": "create_booking", "input": [1]}', "application/json", 400,
     "input must be a JSON object, got array"),
    ("input a string", b'{"saga": "create_booking", "input": "x"}', "application/json", 400,
     "input must be a JSON object, got string"),
    ("input with NaN", b'{"saga": "create_booking", "input": {"a": NaN}}', "application/json", 400,
     "NaN is not JSON"),
    ("unknown field", b'{"saga": "create_booking", "inputs": {}}', "application/json", 400,
     "unknown field(s) inputs"),
    ("bad idempotency key", b'{"saga": "create_booking", "idempotency_key": 5}', "application/json", 400,
     "idempotency_key must be a non-empty string"),
    ("malformed JSON", b'{"saga": ', "application/json", 400, "malformed JSON"),
    ("not UTF-8", b'{"saga": "\xff"}', "application/json", 400, "malformed JSON"),
    ("empty body", b"", "application/json", 400, "malformed JSON: the body is empty"),
    ("body an array", b"[]", "application/json", 400, "the body must be a JSON object, got array"),
    ("text body", b"saga=create_booking", "text/plain", 415, "the body must be JSON"),
    ("form body", b"saga=create_booking", "application/x-www-form-urlencoded", 415, "the body must be JSON"),
    ("too large", b'{"saga": "create_booking", "input": {"pad": "' + b"x" * WEB_MAX_BODY + b'"}}',
     "application/json", 413, f"over the limit of {WEB_MAX_BODY} bytes"),
]


@pytest.mark.parametrize("what,raw,content_type,status,message", BAD_STARTS, ids=[c[0] for c in BAD_STARTS])
def test_a_bad_start_gets_a_clear_json_error_and_changes_nothing(web_url, what, raw, content_type, status, message):
    before = run_count()
    answer = call("POST", f"{web_url}/api/runs", raw=raw, headers={"Content-Type": content_type})

    assert answer.status == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert message in answer.json["error"]
    assert set(answer.json) == {"error"}
    assert run_count() == before


BAD_REQUESTS = [
    ("GET", "/api/runs?status=bogus", 400, "unknown status 'bogus'"),
    ("GET", "/api/runs?limit=0", 400, "limit must be an integer 1..1000"),
    ("GET", "/api/runs?limit=1001", 400, "limit must be an integer 1..1000"),
    ("GET", "/api/runs?limit=ten", 400, "limit must be an integer"),
    ("GET", "/api/runs?offset=-1", 400, "offset must be an integer 0.."),
    ("GET", "/api/runs?saga=a-b", 400, "saga must be a saga name"),
    ("GET", "/api/runs?stauts=failed", 400, "unknown parameter(s) stauts"),
    ("GET", "/api/stats?saga=x", 400, "takes no parameters"),
    ("GET", "/api/runs/00000000-0000-0000-0000-000000000000", 404, "unknown run id"),
    ("POST", "/api/runs/00000000-0000-0000-0000-000000000000/cancel", 404, "unknown run id"),
    ("POST", "/api/runs/no-such-run/retry", 404, "unknown run id 'no-such-run'"),
    ("GET", "/api/nothing-here", 404, "no such endpoint"),
    ("PUT", "/api/runs", 405, "PUT is not allowed on /api/runs"),
    ("DELETE", "/api/runs/00000000-0000-0000-0000-000000000000", 405, "DELETE is not allowed"),
    ("GET", "/api/runs/00000000-0000-0000-0000-000000000000/cancel", 405, "GET is not allowed"),
    ("POST", "/api/stats", 405, "POST is not allowed"),
]


@pytest.mark.parametrize("method,path,status,message", BAD_REQUESTS, ids=[f"{m} {p}" for m, p, *_ in BAD_REQUESTS])
def test_bad_requests_get_the_right_code_and_a_json_error(web_url, method, path, status, message):
    before = run_count()
    answer = call(method, f"{web_url}{path}")

    assert answer.status == status, answer.text
    assert message in answer.json["error"]
    assert run_count() == before


def test_cancel_with_a_non_json_body_is_415_and_changes_nothing(web_url, client):
    run = start(web_url, input={"sleep": {"create_invoice": 1.0}})
    answer = call("POST", f"{web_url}/api/runs/{run['id']}/cancel", raw=b"x=1",
                  headers={"Content-Type": "application/x-www-form-urlencoded"})

    assert answer.status == 415
    assert client.get(run["id"]).cancel_requested is False
    client.wait(run["id"])


def test_a_browser_request_from_another_site_is_refused(web_url, client):
    run = start(web_url, input={"sleep": {"create_invoice": 1.0}})
    before = run_count()
    evil = {"Origin": "http://evil.example"}

    assert call("POST", f"{web_url}/api/runs/{run['id']}/cancel", headers=evil).status == 403
    assert call("POST", f"{web_url}/api/runs", {"saga": "create_booking"}, headers=evil).status == 403
    assert client.get(run["id"]).cancel_requested is False and run_count() == before
    same = call("GET", f"{web_url}/api/runs/{run['id']}", headers=evil)  # reading is not a change
    assert same.status == 200
    client.wait(run["id"])


# ---------------------------------------------------------------------------------------------- the token


def test_with_a_token_every_change_needs_the_bearer_header(web_token_url, client):
    url = web_token_url
    before = run_count()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {WEB_TOKEN}"},
                    {"Authorization": f"Bearer {WEB_TOKEN}x"}):
        answer = call("POST", f"{url}/api/runs", {"saga": "create_booking"}, headers=headers)
        assert answer.status == 401, headers
        assert "Bearer" in answer.json["error"] and answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert run_count() == before

    started = call("POST", f"{url}/api/runs", {"saga": "create_booking", "input": {"sleep": {"create_invoice": 1}}},
                   token=WEB_TOKEN)
    assert started.status == 202
    run_id = started.json["id"]
    assert call("POST", f"{url}/api/runs/{run_id}/cancel").status == 401
    assert call("POST", f"{url}/api/runs/{run_id}/retry").status == 401
    assert client.get(run_id).cancel_requested is False

    # Reading needs no token.
    assert call("GET", f"{url}/api/runs/{run_id}").status == 200
    assert call("GET", f"{url}/api/runs").status == 200
    assert call("GET", f"{url}/api/stats").status == 200

    assert call("POST", f"{url}/api/runs/{run_id}/cancel", token=WEB_TOKEN).status == 202
    assert client.wait(run_id).status == "cancelled"
    assert call("POST", f"{url}/api/runs/{run_id}/retry", token=WEB_TOKEN).status == 409


# ---------------------------------------------------------------------------------------------- sagas, stats, health


def test_sagas_lists_every_registered_definition_and_its_steps(web_url):
    sagas = {s["name"]: s for s in call("GET", f"{web_url}/api/sagas").json["items"]}

    assert {"create_booking", "collect_payment", "data_ingest"} <= set(sagas)
    payment = sagas["collect_payment"]
    assert payment["version"] == 1
    assert [(s["name"], s["has_compensation"]) for s in payment["steps"]] == [
        ("process_payment", True), ("create_invoice", True), ("send_receipt", False), ("log_analytics", False)]


def test_stats_counts_runs_by_status_and_saga_and_gives_duration_percentiles(web_url, client):
    client.wait(start(web_url, "data_ingest")["id"])
    client.wait(start(web_url, "data_ingest", {"fail_at": "embed"})["id"])
    wait_for(lambda: not client.list(status="running").total and not client.list(status="pending").total
             and not client.list(status="compensating").total, what="every run to settle")

    data = call("GET", f"{web_url}/api/stats").json
    assert data["total"] == run_count() == sum(data["by_status"].values())
    assert data["by_status"]["compensated"] == client.list(status="compensated").total
    assert data["by_saga"]["data_ingest"]["succeeded"] == client.list(saga="data_ingest", status="succeeded").total
    final = sum(n for s, n in data["by_status"].items()
                if s not in ("pending", "running", "compensating", "waiting", "scheduled"))
    failed = data["by_status"]["compensated"] + data["by_status"]["compensation_failed"]
    assert data["compensation_rate"] == pytest.approx(failed / final, abs=1e-4)
    ingest = data["step_duration_seconds"]["data_ingest"]["ingest"]
    assert ingest["count"] >= 2
    assert 0 <= ingest["p50"] <= ingest["p90"] <= ingest["p99"] <= ingest["max"]


def test_healthz_checks_the_database_and_the_broker(web_url):
    answer = call("GET", f"{web_url}/healthz")
    assert answer.status == 200
    assert answer.json == {"status": "ok", "database": "ok", "broker": "ok"}
