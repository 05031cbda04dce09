"""Issue 17: a status page an on-call operator can trust. Headless Chromium (Playwright) against the app on a
real port, a real worker, Redis and PostgreSQL: forms that survive the refresh, confirmations that show what
is sent, a refused empty payload, who did what, retry rounds, tracebacks, a stale page that says so, 420 px.
The screenshots of the list and of each kind of run are saved for the README (docs/images/)."""

from __future__ import annotations

import re
import time
import urllib.parse

import pytest

from sagaflow import Origin
from sagaflow.errors import InvalidInput
from tests.conftest import ARTIFACTS, ROOT
from tests.integration import test_web_page as shared
from tests.integration.conftest import serve
from tests.web_client import call

pytestmark = pytest.mark.integration

IMAGES = ROOT / "docs" / "images"
timeline, _csrf, _post_form = shared.timeline, shared._csrf, shared._post_form


def shoot(tab, name: str, full_page: bool = True) -> None:
    """A screenshot for the README (docs/images/) and the CI artifacts."""
    for folder in (IMAGES, ARTIFACTS):
        folder.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(folder / f"{name}.png"), full_page=full_page)


def wait_for(check, timeout: float = 30.0, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def waiting(client, run_id: str):
    return wait_for(lambda: (run := client.get(run_id)).status == "waiting" and run, what=f"run {run_id} to wait")


# ---------------------------------------------------------------------------------------------- the gate form


def test_a_payload_typed_at_a_gate_survives_the_refresh_and_is_sent_with_who_sent_it(page, web_url, client):
    run = client.start("approval_signed", {})
    waiting(client, run.id)
    page.goto(f"{web_url}/runs/{run.id}")
    assert page.locator("#live").get_attribute("data-refresh") == "2"
    assert page.locator("#signal-payload").get_attribute("required") is not None  # the saga requires one
    page.click("#signal-payload")
    page.keyboard.type('{"by": "ops-anna", "ticket": "OPS-17"')  # half typed: the operator is still at it
    page.fill("#signal-reason", "customer called back")
    page.click("#signal-payload")
    page.keyboard.press("End")
    duration_before = page.locator(".facts").inner_text()
    # Past two refreshes: the page did refresh (its "so far" moved on), the text and the focus are intact.
    page.wait_for_timeout(5000)
    assert page.locator(".facts").inner_text() != duration_before
    assert page.input_value("#signal-payload") == '{"by": "ops-anna", "ticket": "OPS-17"'
    assert page.evaluate("document.activeElement.id") == "signal-payload"
    page.keyboard.type("}")  # the caret is where it was
    assert page.input_value("#signal-payload") == '{"by": "ops-anna", "ticket": "OPS-17"}'
    shoot(page, "run-waiting-gate")

    # The confirmation shows what will be sent; declining sends nothing.
    page.click("#signal-button")
    assert page.dialogs, "no confirmation"
    assert '{"by": "ops-anna", "ticket": "OPS-17"}' in page.dialogs[-1]
    assert "customer called back" in page.dialogs[-1]
    assert client.get(run.id).status == "waiting"
    page.accept_dialogs = True
    with page.expect_navigation():
        page.click("#signal-button")
    assert "Signal delivered" in page.locator(".notice").inner_text()
    final = client.wait(run.id)
    assert final.status == "succeeded"
    assert final.step("countersign").result == {"by": "ops-anna", "ticket": "OPS-17"}
    assert final.step("pay_out").result == {"signed_by": "ops-anna"}
    received = next(e for e in final.events if e.kind == "signal_received")
    assert received.detail["actor"] == "page (no token set)" and received.detail["source"] == "page"
    assert received.detail["client"] == "127.0.0.1" and received.detail["reason"] == "customer called back"
    page.goto(f"{web_url}/runs/{run.id}")
    audit = page.locator("#audit li[data-kind=signal_received]").inner_text()
    assert "page (no token set)" in audit and "via page" in audit and "customer called back" in audit
    assert not page.console_errors, page.console_errors


def test_an_empty_payload_is_refused_where_the_saga_requires_one(web_url, client):
    run = client.start("approval_signed", {})
    waiting(client, run.id)
    cookie, token = _csrf(f"{web_url}/runs/{run.id}")
    empty = _post_form(f"{web_url}/runs/{run.id}/signals/countersigned", {"csrf_token": token, "payload": "  "},
                       cookie, origin=web_url)
    assert empty.status == 400 and "requires a payload" in empty.text
    api = call("POST", f"{web_url}/api/runs/{run.id}/signals/countersigned")
    assert api.status == 400 and "gate 'countersign' requires a payload" in api.json["error"]
    with pytest.raises(InvalidInput, match="requires a payload"):
        client.signal(run.id, "countersigned")
    assert client.get(run.id).status == "waiting"  # nothing changed
    assert not [e for e in client.get(run.id).events if e.kind == "signal_received"]
    # The API and the client record who asked too (the reason from ?reason=).
    done = call("POST", f"{web_url}/api/runs/{run.id}/signals/countersigned?reason=" +
                urllib.parse.quote("approved on the phone"), {"by": "api-bot"})
    assert done.status == 202
    event = next(e for e in client.wait(run.id).events if e.kind == "signal_received")
    assert event.detail["source"] == "api" and event.detail["actor"] == "api (no token set)"
    assert event.detail["reason"] == "approved on the phone"


# ---------------------------------------------------------------------------------------------- the timeline


def test_retry_rounds_stay_apart_and_the_step_still_to_undo_is_marked(page, web_url, client):
    run = client.wait(client.start("create_booking", {"fail_at": "add_calendar",
                                                      "fail_compensation": {"send_email": 10}}).id)
    assert run.status == "compensation_failed"
    client.retry(run.id, by=Origin(actor="ops-ben", source="cli", reason="mail server is back"))
    again = wait_for(lambda: (r := client.get(run.id)).status == "compensation_failed"
                     and r.step("send_email").compensation_attempts == 6 and r, what="the second round to fail")
    assert again.step("create_invoice").status == "succeeded"  # never undone: the undo before it failed

    page.goto(f"{web_url}/runs/{run.id}")
    rows = timeline(page)
    assert rows.count(("compensation", "send_email", "compensation_failed")) == 2
    assert ("compensation", "create_invoice", "awaiting_undo") in rows
    assert ("compensation", "send_whatsapp", "compensated") in rows
    rounds = page.locator("#timeline tr[data-kind=compensation][data-step=send_email]")
    first, second = rounds.nth(0), rounds.nth(1)
    assert first.get_attribute("data-round") == "1" and second.get_attribute("data-round") == "2"
    assert first.locator("td.num").first.inner_text().startswith("3")
    assert "#1" in first.locator("td.num").first.inner_text() and "#4" in second.locator("td.num").first.inner_text()

    def errors_after(row) -> str:
        return row.locator("xpath=following-sibling::tr[1]").inner_text()

    one, two = errors_after(first), errors_after(second)
    assert "fault on attempt 1" in one and "fault on attempt 2" in one and "failed (attempt 3)" in one
    assert "attempt 4" not in one
    assert "fault on attempt 4" in two and "fault on attempt 5" in two and "failed (attempt 6)" in two
    assert "attempt 1:" not in two
    audit = page.locator("#audit li[data-kind=retry_requested]").inner_text()
    assert "ops-ben" in audit and "via cli" in audit and "mail server is back" in audit
    shoot(page, "run-compensation-failed")


def test_a_programming_errors_traceback_is_on_the_page_with_file_and_line(page, web_url, client):
    run = client.wait(client.start("buggy", {"order": "o-17"}).id)
    assert run.status == "compensated"
    failed = next(e for e in run.events if e.kind == "step_failed")
    assert "AttributeError" in failed.detail["error"] and "_read_customer" in failed.detail["traceback"]
    page.goto(f"{web_url}/runs/{run.id}")
    trace = page.locator("#timeline details.traceback").first
    where = trace.locator("summary").inner_text()
    assert re.search(r"sagas\.py:\d+ in _read_customer", where), where
    assert not trace.locator("pre").is_visible()  # collapsed until asked for
    trace.locator("summary").click()
    assert "return record.get(\"customer\")" in trace.locator("pre").inner_text()
    shoot(page, "run-traceback")


def test_a_time_limit_error_names_the_limit(client):
    run = client.wait(client.start("too_slow", {}).id, timeout=60)
    error = run.step("dawdle").error
    assert "SoftTimeLimitExceeded" in error and "time limit of 1 s" in error, error


# ---------------------------------------------------------------------------------------------- staleness, width


def test_a_stopped_server_shows_the_stale_notice_within_two_refreshes(page, settings, client):
    from sagaflow.web import create_app

    url, stop = serve(create_app(settings))
    run = client.start("approval", {})
    waiting(client, run.id)
    page.goto(f"{url}/runs/{run.id}")
    assert page.locator("#stale-notice").count() == 0
    page.wait_for_timeout(2500)  # one refresh that worked
    assert page.locator("#stale-notice").count() == 0
    stop()
    notice = page.locator("#stale-notice")
    notice.wait_for(timeout=2 * 2000 + 1500)  # two refresh periods, and the fetch's own time
    assert "Updates failed since" in notice.inner_text() and "out of date" in notice.inner_text()
    client.signal(run.id, "approved", {"by": "cleanup"})


@pytest.mark.parametrize("width", [420])
def test_the_list_and_a_run_page_fit_a_phone_without_horizontal_scroll(browser, web_url, client, width):
    run = client.wait(client.start("create_booking", {"fail_at": "add_calendar"}).id)
    context = browser.new_context(viewport={"width": width, "height": 900})
    phone = context.new_page()
    try:
        for path, name in (("/", "list-phone"), (f"/runs/{run.id}", "run-phone")):
            phone.goto(f"{web_url}{path}")
            fits = phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            assert fits, (path, phone.evaluate("[document.documentElement.scrollWidth, window.innerWidth]"))
            shoot(phone, name)
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------- pictures


def test_screenshots_of_the_list_and_each_kind_of_run(page, web_url, client):
    ok = client.wait(client.start("create_booking", {"customer": "c-17"}).id)
    undone = client.wait(client.start("create_booking", {"fail_at": "add_calendar", "flaky": {"send_email": 1}}).id)
    branches = client.wait(client.start("trip", {}).id)
    running = client.start("create_booking", {"sleep": {"send_email": 4}})
    wait_for(lambda: client.get(running.id).step("send_email").status == "running", what="the slow step to start")
    page.goto(f"{web_url}/")
    shoot(page, "run-list", full_page=False)
    for run, name in ((ok, "run-succeeded"), (undone, "run-compensated"), (branches, "run-parent-child"),
                      (running, "run-running")):
        page.goto(f"{web_url}/runs/{run.id}")
        shoot(page, name)
    page.goto(f"{web_url}/runs/{running.id}")
    if page.locator(".running-facts").count():
        facts = page.locator(".running-facts").first.inner_text()
        assert "running for" in facts and "time limit" in facts
    client.wait(running.id)


# ---------------------------------------------------------------------------------------------- the list


def test_the_list_puts_what_needs_attention_on_top_and_opens_a_run_by_prefix_or_key(page, web_url, client):
    broken = client.wait(client.start("create_booking", {"fail_at": "add_calendar",
                                                         "fail_compensation": {"send_email": 10}}).id)
    assert broken.status == "compensation_failed"
    gate = client.start("approval", {}, idempotency_key=f"order-{broken.id[:6]}")
    waiting(client, gate.id)
    ok = client.wait(client.start("create_booking", {}).id)
    undone = client.wait(client.start("create_booking", {"fail_at": "add_calendar"}).id)

    page.goto(f"{web_url}/")
    band = page.locator("#attention")
    failed_item = band.locator(f"li[data-run-id='{broken.id}']").inner_text()
    assert "compensation_failed" in failed_item and "send_email" in failed_item
    assert "fault on attempt 3" in failed_item and "waiting" in failed_item
    gate_item = band.locator(f"li[data-run-id='{gate.id}']").inner_text()
    assert "approve" in gate_item and "waiting" in gate_item
    assert band.locator(f"li[data-run-id='{ok.id}']").count() == 0
    # In the list: the failed step and its error; compensated and succeeded look different.
    row = page.locator(f"tr[data-run-id='{undone.id}']")
    assert "add_calendar" in row.locator("td.failure").inner_text()
    assert "failed on purpose" in row.locator("td.failure").inner_text()

    def colour(run_id):
        return page.locator(f"tr[data-run-id='{run_id}'] .badge").evaluate("e => getComputedStyle(e).color")

    assert colour(ok.id) != colour(undone.id)
    assert "waiting" in page.locator(f"tr[data-run-id='{gate.id}']").inner_text()
    shoot(page, "run-list-attention", full_page=False)

    # The list's 8-character id opens the run; so do the jump box's prefix and idempotency key.
    page.goto(f"{web_url}/runs/{ok.id[:8]}")
    assert page.url.endswith(f"/runs/{ok.id}")
    page.goto(f"{web_url}/")
    page.fill("#jump-to", f"order-{broken.id[:6]}")
    with page.expect_navigation():
        page.press("#jump-to", "Enter")
    assert page.url.endswith(f"/runs/{gate.id}")
    assert call("GET", f"{web_url}/go?to=ffffffff-no").status == 404
    client.signal(gate.id, "approved", {"by": "cleanup"})


def test_the_cli_records_the_os_user_and_the_reason(settings, client):
    import getpass
    import os
    import subprocess
    import sys

    run = client.start("approval", {})
    waiting(client, run.id)
    env = {**os.environ, **settings.as_env(), "SAGAFLOW_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-m", "sagaflow", "cancel", run.id, "--reason", "duplicate order"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    event = next(e for e in client.wait(run.id).events if e.kind == "cancel_requested")
    assert event.detail == {"actor": getpass.getuser(), "source": "cli", "reason": "duplicate order"}
