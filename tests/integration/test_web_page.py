"""The status page in headless Chromium (Debian's, driven by Playwright), against the app served on a real
port, a real worker, Redis and PostgreSQL; and the page's form routes (CSRF, operator login) over HTTP."""

from __future__ import annotations

import re
import urllib.parse

import pytest

from tests.conftest import ARTIFACTS
from tests.integration.conftest import WEB_TOKEN
from tests.web_client import call

pytestmark = pytest.mark.integration

# Chromium and the page fixture (one browser per session) live in tests/integration/conftest.py.


def timeline(page) -> list[tuple[str, str, str]]:
    rows = page.locator("#timeline tbody tr[data-kind]")
    return [(r.get_attribute("data-kind"), r.get_attribute("data-step"), r.get_attribute("data-status"))
            for r in rows.all()]


# ---------------------------------------------------------------------------------------------- list


def test_the_list_shows_a_run_started_over_the_api_and_refreshes_itself(page, web_url, client):
    started = call("POST", f"{web_url}/api/runs", {"saga": "collect_payment", "input": {"amount": 5}}).json
    client.wait(started["id"])

    page.goto(f"{web_url}/")
    row = page.locator(f"tr[data-run-id='{started['id']}']")
    assert row.is_visible()
    assert "collect_payment" in row.inner_text() and "succeeded" in row.inner_text()
    assert re.search(r"ago", row.inner_text())
    assert page.locator(".counts a[data-status='succeeded'] b").inner_text().isdigit()

    # Filters: picking a status applies it at once (the page's script submits the form).
    page.select_option("select[name=status]", "succeeded")
    page.wait_for_url(re.compile(r"status=succeeded"))
    assert page.locator(f"tr[data-run-id='{started['id']}']").is_visible()
    page.select_option("select[name=saga]", "create_booking")
    page.wait_for_url(re.compile(r"saga=create_booking"))
    assert page.locator(f"tr[data-run-id='{started['id']}']").count() == 0

    # A run started after the page loaded shows up without a reload.
    page.goto(f"{web_url}/?saga=collect_payment")
    later = call("POST", f"{web_url}/api/runs", {"saga": "collect_payment", "input": {}}).json
    page.locator(f"tr[data-run-id='{later['id']}']").wait_for(timeout=15000)
    client.wait(later["id"])
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "run-list.png"))
    assert not page.console_errors, page.console_errors


# ---------------------------------------------------------------------------------------------- detail


def test_the_detail_page_shows_the_steps_and_compensations_of_a_failed_run_in_order(page, web_url, client):
    run = client.wait(client.start("create_booking", {"fail_at": "add_calendar", "flaky": {"send_email": 1}}).id)
    assert run.status == "compensated"

    page.goto(f"{web_url}/runs/{run.id}")
    assert page.locator("#run-status").inner_text() == "compensated"
    assert timeline(page) == [
        ("step", "create_invoice", "succeeded"),
        ("step", "send_email", "succeeded"),
        ("step", "send_whatsapp", "succeeded"),
        ("step", "add_calendar", "failed"),
        ("compensation", "send_whatsapp", "compensated"),
        ("compensation", "send_email", "compensated"),
        ("compensation", "create_invoice", "compensated"),
    ]
    text = page.locator("#timeline").inner_text()
    assert "add_calendar failed on purpose" in text  # the error, visible
    assert "attempt 1: TransientFailure" in text  # the retried attempt of send_email, and why
    send_email = page.locator("#timeline tr[data-kind=step][data-step=send_email]")
    assert send_email.locator("td.num").first.inner_text() == "2"  # attempts
    assert page.locator("#timeline tr[data-kind=compensation] .undo-mark").count() == 3
    # No Flower listens at SAGAFLOW_FLOWER_URL here: no link to it, the task id with the reason instead
    # (test_flower.py checks the link where Flower knows the task).
    task = page.locator("#timeline tr[data-kind=step][data-step=create_invoice] td").last
    assert task.locator("a").count() == 0
    assert run.step("create_invoice").task_id[:8] in task.inner_text()
    assert "Flower did not answer" in task.locator("span").first.get_attribute("title")
    # Bars: each starts no earlier than the one before it.
    lefts = [float(x) for x in
             page.locator("#timeline rect.bar").evaluate_all("els => els.map(e => e.getAttribute('x'))")]
    assert lefts == sorted(lefts)
    assert not page.locator("#cancel-button").count() and not page.locator("#retry-button").count()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "run-detail.png"), full_page=True)
    assert not page.console_errors, page.console_errors


def test_input_and_errors_holding_markup_are_shown_as_text_and_never_run(page, web_url, client):
    payload = "<script>window.__xss = 1; alert('xss')</script>"
    image = "<img src=x onerror=\"window.__xss = 2; alert('xss')\">"
    run = client.wait(client.start("echo_error", {"message": f"{payload} {image}", "customer": payload}).id)
    assert run.status == "compensated"

    for url in (f"{web_url}/runs/{run.id}", f"{web_url}/?saga=echo_error"):
        page.goto(url)
        page.wait_for_timeout(300)
        assert page.evaluate("window.__xss") is None
        assert page.dialogs == []
        assert "<script>window.__xss" not in page.content()  # the DOM holds text, not an element
    page.goto(f"{web_url}/runs/{run.id}")
    assert payload in page.locator("#run-input").inner_text()
    assert f"{payload} {image}" in page.locator("#timeline").inner_text()
    assert page.locator("#timeline img").count() == 0


# ---------------------------------------------------------------------------------------------- actions


def test_the_cancel_button_cancels_a_slow_run_after_an_operator_login(page, web_token_url, client):
    run = client.start("create_booking", {"sleep": {"create_invoice": 2.5}})
    page.goto(f"{web_token_url}/runs/{run.id}")

    # With SAGAFLOW_API_TOKEN set, the buttons need an operator login.
    assert page.locator("#cancel-button").count() == 0
    assert "Log in to cancel" in page.locator(".actions").inner_text()
    page.click("#login-link")
    page.fill("input[name=token]", "wrong")
    page.click("form.login button")
    assert "Wrong token" in page.locator(".error").inner_text()
    page.fill("input[name=token]", WEB_TOKEN)
    page.click("form.login button")
    page.wait_for_url(re.compile(rf"/runs/{run.id}\?done=login"))

    # Declining the confirmation changes nothing.
    page.click("#cancel-button")
    assert page.dialogs and "Cancel this run?" in page.dialogs[-1]
    assert client.get(run.id).cancel_requested is False

    page.accept_dialogs = True
    with page.expect_navigation():
        page.click("#cancel-button")
    assert "Cancel requested" in page.locator(".notice").inner_text()
    assert client.get(run.id).cancel_requested is True
    page.locator("#run-status", has_text="cancelled").wait_for(timeout=20000)  # the page refreshed itself
    assert client.wait(run.id).status == "cancelled"
    assert ("compensation", "create_invoice", "compensated") in timeline(page)


# ---------------------------------------------------------------------------------------------- forms over HTTP


def _csrf(page_url: str) -> tuple[str, str]:
    """(cookie header, form value) as a browser gets them from a page with a form."""
    answer = call("GET", page_url)
    value = re.search(r'name="csrf_token" value="([^"]+)"', answer.text).group(1)
    set_cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    cookie = set_cookie.split(";")[0]
    assert cookie == f"sagaflow_csrf={value}"
    return cookie, value


def _post_form(url: str, fields: dict, cookie: str = "", origin: str | None = None):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie:
        headers["Cookie"] = cookie
    if origin:
        headers["Origin"] = origin
    return call("POST", url, raw=urllib.parse.urlencode(fields).encode(), headers=headers)


def test_the_page_forms_refuse_cross_site_requests(web_url, client):
    run = client.start("create_booking", {"sleep": {"create_invoice": 1.5}})
    target = f"{web_url}/runs/{run.id}/cancel"
    cookie, token = _csrf(f"{web_url}/runs/{run.id}")

    assert _post_form(target, {}).status == 403  # no cookie, no field
    assert _post_form(target, {"csrf_token": token}).status == 403  # field without its cookie
    assert _post_form(target, {"csrf_token": "x" * 43}, cookie).status == 403  # a guessed value
    assert _post_form(target, {"csrf_token": token}, cookie, origin="http://evil.example").status == 403
    assert client.get(run.id).cancel_requested is False

    done = _post_form(target, {"csrf_token": token}, cookie, origin=web_url)
    assert done.status == 303 and done.headers["Location"].endswith(f"/runs/{run.id}?done=cancel")
    assert client.get(run.id).cancel_requested is True
    client.wait(run.id)
    late = _post_form(target, {"csrf_token": token}, cookie, origin=web_url)
    assert late.status == 409 and "only pending or running runs can be cancelled" in late.text


def test_with_a_token_the_forms_need_an_operator_session(web_token_url, client):
    run = client.start("create_booking", {"sleep": {"create_invoice": 1.5}})
    cookie, token = _csrf(f"{web_token_url}/login")

    refused = _post_form(f"{web_token_url}/runs/{run.id}/cancel", {"csrf_token": token}, cookie)
    assert refused.status == 303 and "/login?next=" in refused.headers["Location"]
    assert client.get(run.id).cancel_requested is False

    bad = _post_form(f"{web_token_url}/login", {"csrf_token": token, "token": "nope"}, cookie)
    assert bad.status == 401
    login = _post_form(f"{web_token_url}/login", {"csrf_token": token, "token": WEB_TOKEN,
                                                  "next": "https://evil.example/"}, cookie)
    assert login.status == 303 and login.headers["Location"] == "/?done=login"  # never off-site
    operator = login.headers["Set-Cookie"].split(";")[0]
    assert WEB_TOKEN not in operator and "HttpOnly" in login.headers["Set-Cookie"]

    forged = operator.rsplit(".", 1)[0] + "." + "0" * 64
    assert _post_form(f"{web_token_url}/runs/{run.id}/cancel", {"csrf_token": token},
                      f"{cookie}; {forged}").status == 303
    assert client.get(run.id).cancel_requested is False
    done = _post_form(f"{web_token_url}/runs/{run.id}/cancel", {"csrf_token": token}, f"{cookie}; {operator}")
    assert done.status == 303 and done.headers["Location"].endswith("?done=cancel")
    assert client.wait(run.id).status == "cancelled"


def test_pages_send_a_strict_content_security_policy_and_clear_errors(web_url):
    answer = call("GET", f"{web_url}/")
    assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert call("GET", f"{web_url}/runs/no-such-run").status == 404
    bad = call("GET", f"{web_url}/?status=%3Cb%3Ebogus")
    assert bad.status == 400 and "&#39;&lt;b&gt;bogus&#39;" in bad.text
    assert call("GET", f"{web_url}/static/sagaflow.js").status == 200
    assert call("GET", f"{web_url}/login").status == 404  # no token: nothing to log in to


# ---------------------------------------------------------------------------------------------- issue-5 shapes

def _wait_for_status(client, run_id: str, status: str, timeout: float = 20.0):
    import time

    deadline = time.monotonic() + timeout
    while (run := client.get(run_id)).status != status:
        assert time.monotonic() < deadline, f"run {run_id} is {run.status}, not {status}"
        time.sleep(0.05)
    return run


def test_an_operator_approves_a_waiting_gate_from_the_page(page, web_url, client):
    run = client.start("approval", {})
    _wait_for_status(client, run.id, "waiting")
    page.goto(f"{web_url}/runs/{run.id}")
    box = page.locator("#waiting-approve")
    assert "Waiting at gate approve" in box.inner_text() and "approved" in box.inner_text()
    assert page.locator("#run-status").inner_text() == "waiting"
    page.fill("#signal-payload", '{"by": "ops-anna"}')
    page.screenshot(path=str(ARTIFACTS / "run-waiting-gate.png"), full_page=True)
    page.accept_dialogs = True
    with page.expect_navigation():
        page.click("#signal-button")
    assert "Signal delivered" in page.locator(".notice").inner_text()
    final = client.wait(run.id)
    assert final.status == "succeeded" and final.step("charge").result["approved_by"] == "ops-anna"
    assert final.step("approve").result == {"by": "ops-anna"}


def test_the_signal_form_refuses_a_bad_payload_and_a_signal_the_run_does_not_wait_for(web_url, client):
    run = client.start("approval", {})
    _wait_for_status(client, run.id, "waiting")
    cookie, token = _csrf(f"{web_url}/runs/{run.id}")
    bad = _post_form(f"{web_url}/runs/{run.id}/signals/approved", {"csrf_token": token, "payload": "{nope"},
                     cookie, origin=web_url)
    assert bad.status == 400 and "The payload is not JSON" in bad.text
    other = _post_form(f"{web_url}/runs/{run.id}/signals/rejected", {"csrf_token": token}, cookie, origin=web_url)
    assert other.status == 409
    assert client.get(run.id).status == "waiting"  # nothing changed
    forged = _post_form(f"{web_url}/runs/{run.id}/signals/approved", {"csrf_token": "x" * 43}, cookie,
                        origin=web_url)
    assert forged.status == 403 and client.get(run.id).status == "waiting"
    done = _post_form(f"{web_url}/runs/{run.id}/signals/approved", {"csrf_token": token}, cookie, origin=web_url)
    assert done.status == 303 and done.headers["Location"].endswith("?done=signal")
    assert client.wait(run.id).status == "succeeded"


def test_parent_and_child_pages_link_to_each_other(page, web_url, client):
    run = client.wait(client.start("trip", {}).id)
    child_id = run.children[0]
    page.goto(f"{web_url}/runs/{run.id}")
    assert page.locator(f'a.child-link[href="/runs/{child_id}"]').count() == 1
    page.goto(f"{web_url}/runs/{child_id}")
    page.locator("#parent-link").click()
    page.wait_for_url(re.compile(rf"/runs/{run.id}$"))
