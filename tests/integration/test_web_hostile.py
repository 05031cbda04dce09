"""Hostile input never breaks the web app (issue 11): every request that used to answer 500 now gets its
4xx and changes nothing; bodies are cut at the limit from the stream (chunked too); the Host header is
checked (DNS rebinding); reads can be protected; failed logins are throttled and logged; logout revokes the
session. Over real HTTP against the app on a real port, a real worker, Redis and PostgreSQL."""

from __future__ import annotations

import http.client
import json
import logging
import re
import urllib.parse
import uuid

import pytest

from sagaflow.app import get_store
from tests.integration.conftest import WEB_MAX_BODY, WEB_TOKEN, serve
from tests.web_client import call

pytestmark = pytest.mark.integration


def run_count() -> int:
    return get_store().list_runs(limit=1)[1]


def raw_request(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                chunks: list[bytes] | None = None):
    """One request with full control of the headers (Host) and the framing (chunked): (status, headers,
    body)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        if chunks is not None:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for chunk in chunks:
                conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- no more 500s


HOSTILE_API = [
    # (method, path, body, status, error contains)
    ("GET", "/api/runs/a%00b", None, 400, "the run id contains a NUL character"),
    ("POST", "/api/runs/a%00b/cancel", None, 400, "NUL"),
    ("POST", "/api/runs/a%00b/retry", None, 400, "NUL"),
    ("POST", "/api/runs/a%00b/signals/approved", None, 400, "NUL"),
    ("GET", f"/api/runs/{'x' * 37}", None, 400, "a run id is 1 to 36 characters"),
    ("POST", "/api/runs", b'{"saga": "create_booking", "idempotency_key": "a\\u0000b"}', 400, "NUL"),
    ("POST", "/api/runs", b'{"saga": "create_booking", "idempotency_key": "a\\ud800b"}', 400, "lone surrogate"),
    ("POST", "/api/runs", b'{"saga": "create_booking", "input": {"name": "\\udfff"}}', 400, "lone surrogate"),
    ("POST", "/api/runs", b'{"saga": "create_booking", "input": {"k\\u0000": 1}}', 400, "NUL"),
    ("GET", "/api/runs?limit=%C2%B2", None, 400, "limit must be an integer 1..1000, got '²'"),
    ("GET", "/api/runs?limit=%D9%A3", None, 400, "limit must be an integer 1..1000"),
    ("GET", "/api/runs?offset=9223372036854775808", None, 400, "offset must be an integer 0.."),
    ("GET", "/api/runs?offset=%EF%BC%91", None, 400, "offset must be an integer 0.."),  # fullwidth 1
    ("POST", "/api/runs", b'{"saga": "create_booking", "input": ' + b"[" * 600 + b"]" * 600 + b"}", 400,
     "nested deeper than 64 levels of arrays and objects (SAGAFLOW_JSON_MAX_DEPTH)"),
    ("POST", "/api/runs", b"[" * (WEB_MAX_BODY - 1), 400, "SAGAFLOW_JSON_MAX_DEPTH"),  # 100,000: test_web_guards
    ("POST", "/api/runs/whatever/signals/approved", b"[" * 5000 + b"]" * 5000, 400, "SAGAFLOW_JSON_MAX_DEPTH"),
    ("POST", "/api/runs", "{\"saga\": \"create_booking\"}".encode("utf-16"), 400, "malformed JSON: the request "
                                                                             "body is not UTF-8"),
    ("POST", "/api/runs", "{\"saga\": \"create_booking\"}".encode("utf-16-le"), 400, "malformed JSON"),
]


@pytest.mark.parametrize("method,path,body,status,message", HOSTILE_API, ids=[f"{m} {p[:40]} {b and b[:30]}"
                                                                              for m, p, b, *_ in HOSTILE_API])
def test_hostile_api_requests_get_a_json_4xx_and_change_nothing(web_url, method, path, body, status, message):
    before = run_count()
    got, headers, data = raw_request(web_url, method, path, body,
                                     {"Content-Type": "application/json"} if body is not None else {})
    assert got == status, data[:500]
    assert headers["Content-Type"] == "application/json"
    assert message in json.loads(data)["error"]
    assert run_count() == before


HOSTILE_PAGES = [
    ("/runs/a%00b", 400, "NUL"),
    (f"/runs/{'x' * 40}", 400, "1 to 36 characters"),
    ("/?offset=%C2%B2", 400, "offset must be an integer"),
    ("/?offset=9223372036854775808", 400, "offset must be an integer"),
    ("/?offset=-1", 400, "offset must be an integer"),
]


@pytest.mark.parametrize("path,status,message", HOSTILE_PAGES, ids=[p for p, *_ in HOSTILE_PAGES])
def test_hostile_page_requests_get_an_html_error_page(web_url, path, status, message):
    before = run_count()
    answer = call("GET", f"{web_url}{path}")
    assert answer.status == status
    assert answer.headers["Content-Type"].startswith("text/html") and message in answer.text
    assert run_count() == before


def _csrf(base: str, path: str = "/") -> tuple[str, str]:
    answer = call("GET", f"{base}{path}")
    value = re.search(r'name="csrf_token" value="([^"]+)"', answer.text).group(1)
    return answer.headers["Set-Cookie"].split(";")[0], value


def _post_form(url: str, fields: dict, cookie: str = "", headers: dict | None = None):
    headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    if cookie:
        headers["Cookie"] = cookie
    return call("POST", url, raw=urllib.parse.urlencode(fields).encode(), headers=headers)


def test_the_page_forms_refuse_a_nul_run_id_and_a_deep_signal_payload(web_url, client):
    from tests.helpers import wait_for

    run = client.start("approval", {})
    wait_for(lambda: client.get(run.id).status == "waiting", what="the gate to wait")
    cookie, token = _csrf(web_url, f"/runs/{run.id}")
    before = run_count()
    for action in ("cancel", "retry", "signals/approved"):
        answer = _post_form(f"{web_url}/runs/a%00b/{action}", {"csrf_token": token}, cookie)
        assert answer.status == 400 and "NUL" in answer.text, action
    deep = _post_form(f"{web_url}/runs/{run.id}/signals/approved",
                      {"csrf_token": token, "payload": "[" * 1000 + "]" * 1000}, cookie)
    assert deep.status == 400 and "SAGAFLOW_JSON_MAX_DEPTH" in deep.text
    assert client.get(run.id).status == "waiting" and run_count() == before
    client.signal(run.id, "approved", None)
    client.wait(run.id)


def test_login_next_with_control_characters_falls_back_to_the_list(web_token_url):
    answer = call("GET", f"{web_token_url}/login?next=/runs/x%0D%0ASet-Cookie:%20a=b")
    assert answer.status == 200
    assert 'name="next" value="/"' in answer.text


# ---------------------------------------------------------------------------------------------- sizes


def test_a_chunked_body_over_the_limit_is_413_not_cut_and_parsed(web_url):
    before = run_count()
    # A valid JSON prefix up to the limit, then more: cut at the limit it would have been "accepted".
    prefix = b'{"saga": "create_booking", "input": {"pad": "' + b"x" * (WEB_MAX_BODY - 100) + b'"}}'
    chunks = [prefix, b" " * 8192, b" " * 8192]
    status, headers, data = raw_request(web_url, "POST", "/api/runs", headers={"Content-Type": "application/json"},
                                        chunks=chunks)
    assert status == 413, data[:300]
    assert f"over the limit of {WEB_MAX_BODY} bytes (SAGAFLOW_API_MAX_BODY)" in json.loads(data)["error"]
    assert run_count() == before

    # The same framing under the limit is read whole.
    status, _, data = raw_request(web_url, "POST", "/api/runs", headers={"Content-Type": "application/json"},
                                  chunks=[b'{"saga": "create_booking", ', b'"input": {"customer": "chunked"}}'])
    assert status == 202, data
    assert json.loads(data)["input"] == {"customer": "chunked"}


def test_the_list_carries_a_short_input_preview_and_the_detail_the_whole_input(web_url, client):
    big = {"customer": "c-big", "notes": "n" * 10_000}
    run = call("POST", f"{web_url}/api/runs", {"saga": "create_booking", "input": big}).json
    small = call("POST", f"{web_url}/api/runs", {"saga": "create_booking", "input": {"customer": "c-small"}}).json

    items = {r["id"]: r for r in call("GET", f"{web_url}/api/runs?limit=5").json["items"]}
    assert "input" not in items[run["id"]]
    assert items[run["id"]]["input_truncated"] is True and len(items[run["id"]]["input_preview"]) <= 200
    assert items[run["id"]]["input_preview"].startswith('{"customer":"c-big","notes":"nnn')
    assert items[small["id"]]["input_truncated"] is False
    assert json.loads(items[small["id"]]["input_preview"]) == {"customer": "c-small"}
    assert call("GET", f"{web_url}/api/runs/{run['id']}").json["input"] == big
    client.wait(run["id"])
    client.wait(small["id"])


def test_the_run_page_caps_what_it_pretty_prints_and_links_the_raw_json(web_url, client):
    deep = [0] * 3000
    for _ in range(60):  # within the depth limit, but indented 60 levels deep it would be ~800 KB of text
        deep = [deep]
    run = call("POST", f"{web_url}/api/runs", {"saga": "create_booking", "input": {"deep": deep}}).json
    client.wait(run["id"])

    page = call("GET", f"{web_url}/runs/{run['id']}")
    assert page.status == 200
    assert len(page.body) < 100_000
    assert 'id="input-truncated"' in page.text and f'href="/api/runs/{run["id"]}"' in page.text
    assert call("GET", f"{web_url}/api/runs/{run['id']}").json["input"] == {"deep": deep}


def test_a_run_stored_before_the_limits_still_shows_on_the_pages(web_url):
    """Input nested deeper than the limit, written straight to SQL as an older sagaflow could have."""
    from sagaflow.model import StepSpec

    deep: object = "bottom"
    for _ in range(200):
        deep = {"k": deep}
    run_id = f"old-{uuid.uuid4().hex[:12]}"
    from sqlalchemy import update

    from sagaflow.store import tables as t

    store = get_store()
    store.create_run(run_id, "create_booking", 1, {"deep": deep}, [StepSpec("create_invoice", True)])
    with store.engine.begin() as conn:  # never published: mark it over, so no test waits for it
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(status="failed",
                                                                        finished_at=t.runs.c.updated_at))

    assert call("GET", f"{web_url}/runs/{run_id}").status == 200
    assert call("GET", f"{web_url}/").status == 200
    assert call("GET", f"{web_url}/api/runs?limit=5").status == 200
    assert call("GET", f"{web_url}/api/runs/{run_id}").status == 200


# ---------------------------------------------------------------------------------------------- hosts


@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/api/runs"), ("POST", "/api/runs"),
                                         ("GET", "/metrics")])
def test_another_host_header_is_refused_with_or_without_a_matching_origin(web_url, method, path):
    before = run_count()
    body = json.dumps({"saga": "create_booking"}).encode() if method == "POST" else None
    for extra in ({}, {"Origin": "http://attacker.example"}, {"Origin": "http://attacker.example:1234"}):
        headers = {"Host": "attacker.example", "Content-Type": "application/json", **extra}
        status, _, data = raw_request(web_url, method, path, body, headers)
        assert status == 400, (extra, data[:200])
        assert b"SAGAFLOW_ALLOWED_HOSTS" in data
    assert run_count() == before
    assert raw_request(web_url, "GET", "/healthz", headers={"Host": "10.1.2.3:8000"})[0] == 200  # probes by address
    # The loopback names of the default setting answer.
    port = urllib.parse.urlsplit(web_url).port
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        assert raw_request(web_url, "GET", "/api/sagas", headers={"Host": host})[0] == 200, host


def test_the_origin_must_be_the_validated_host(web_url, client):
    port = urllib.parse.urlsplit(web_url).port
    before = run_count()
    headers = {"Host": f"localhost:{port}", "Content-Type": "application/json",
               "Origin": "http://attacker.example"}
    body = json.dumps({"saga": "create_booking"}).encode()
    assert raw_request(web_url, "POST", "/api/runs", body, headers)[0] == 403
    assert run_count() == before
    headers["Origin"] = f"http://localhost:{port}"
    status, _, data = raw_request(web_url, "POST", "/api/runs", body, headers)
    assert status == 202
    client.wait(json.loads(data)["id"])


# ---------------------------------------------------------------------------------------------- reads, logins


@pytest.fixture(scope="module")
def guarded_url(settings, worker):
    """Token, reads protected, one trusted proxy (so each test can be its own client address)."""
    from sagaflow.web import create_app

    url, stop = serve(create_app(settings.with_(api_token=WEB_TOKEN, api_read_protected=True, trusted_proxies=1,
                                                api_max_body=WEB_MAX_BODY)))
    yield url
    stop()


def _address() -> dict:
    """A client address of its own (X-Forwarded-For, believed from the one trusted proxy)."""
    n = uuid.uuid4().int
    return {"X-Forwarded-For": f"198.51.{n % 250}.{n // 250 % 250 + 1}"}


def _login(url: str, headers: dict) -> tuple[str, str]:
    """Log in as an operator; returns the Cookie header value (CSRF and operator cookies) and the CSRF
    value for forms."""
    page = call("GET", f"{url}/login", headers=headers)
    csrf_cookie = page.headers["Set-Cookie"].split(";")[0]
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    login = _post_form(f"{url}/login", {"csrf_token": token, "token": WEB_TOKEN}, csrf_cookie, headers)
    assert login.status == 303, login.text
    return f"{csrf_cookie}; {login.headers['Set-Cookie'].split(';')[0]}", token


def test_with_reads_protected_list_detail_page_and_metrics_need_the_token_or_a_login(guarded_url, client):
    url = guarded_url
    run = client.wait(client.start("create_booking", {"customer": "private"}).id)
    me = _address()
    for path in ("/api/runs", f"/api/runs/{run.id}", "/api/stats", "/api/sagas", "/metrics"):
        refused = call("GET", f"{url}{path}", headers=me)
        assert refused.status == 401 and "private" not in refused.text, path
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert call("GET", f"{url}{path}", headers=me, token=WEB_TOKEN).status == 200, path
    for path in ("/", f"/runs/{run.id}"):
        refused = call("GET", f"{url}{path}", headers=me)
        assert refused.status == 303 and "/login?next=" in refused.headers["Location"], path
        assert "private" not in refused.text
    health = call("GET", f"{url}/healthz", headers=me)
    assert health.status == 200 and health.json == {"status": "ok", "database": "ok", "broker": "ok"}
    assert call("GET", f"{url}/static/sagaflow.css", headers=me).status == 200

    cookie, _ = _login(url, me)
    page = call("GET", f"{url}/runs/{run.id}", headers={**me, "Cookie": cookie})
    assert page.status == 200 and "private" in page.text
    assert call("GET", f"{url}/", headers={**me, "Cookie": cookie}).status == 200
    assert call("GET", f"{url}/api/runs/{run.id}", headers={**me, "Cookie": cookie}).json["input"] == {
        "customer": "private"}
    assert call("GET", f"{url}/metrics", headers={**me, "Cookie": cookie}).status == 200


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def web_warnings():
    handler = _Records()
    logger = logging.getLogger("sagaflow.web")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def test_twenty_failed_logins_from_one_address_are_throttled_and_logged(guarded_url, web_warnings):
    url = guarded_url
    me = _address()
    client_ip = me["X-Forwarded-For"]
    page = call("GET", f"{url}/login", headers=me)
    csrf_cookie = page.headers["Set-Cookie"].split(";")[0]
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)

    statuses = []
    for n in range(20):
        answer = _post_form(f"{url}/login", {"csrf_token": token, "token": f"guess-{n}"}, csrf_cookie, me)
        statuses.append(answer.status)
    assert statuses == [401] * 10 + [429] * 10
    assert 1 <= int(answer.headers["Retry-After"]) <= 301
    # Throttled means the right token is not even checked now, from this address ...
    right = _post_form(f"{url}/login", {"csrf_token": token, "token": WEB_TOKEN}, csrf_cookie, me)
    assert right.status == 429 and "sagaflow_operator" not in right.headers.get("Set-Cookie", "")
    # ... and bearer tokens from it neither; another address is unaffected.
    assert call("GET", f"{url}/api/sagas", headers=me, token=WEB_TOKEN).status == 429
    assert call("GET", f"{url}/api/sagas", headers=_address(), token=WEB_TOKEN).status == 200

    failed = [r for r in web_warnings if r.getMessage() == "login_failed"]
    assert len(failed) == 10
    assert all(r.levelno == logging.WARNING and r.client == client_ip for r in failed)
    assert not any("guess-" in str(vars(r)) for r in web_warnings)  # never the text that was tried


def test_wrong_bearer_tokens_are_throttled_and_logged(guarded_url, web_warnings):
    me = _address()
    statuses = [call("GET", f"{guarded_url}/api/runs", headers=me, token=f"wrong-{n}").status for n in range(12)]
    assert statuses == [401] * 10 + [429] * 2
    failed = [r for r in web_warnings if r.getMessage() == "auth_failed"]
    assert len(failed) == 10 and all("wrong-" not in str(vars(r)) for r in failed)


def test_a_copied_operator_cookie_is_refused_after_logout(guarded_url):
    url = guarded_url
    me = _address()
    cookie, csrf = _login(url, me)
    assert call("GET", f"{url}/", headers={**me, "Cookie": cookie}).status == 200
    copied = cookie

    out = _post_form(f"{url}/logout", {"csrf_token": csrf}, cookie, me)
    assert out.status == 303
    again = call("GET", f"{url}/", headers={**me, "Cookie": copied})
    assert again.status == 303 and "/login" in again.headers["Location"]
    assert call("GET", f"{url}/api/runs", headers={**me, "Cookie": copied}).status == 401


def test_behind_a_trusted_tls_proxy_cookies_are_secure_with_the_host_prefix(guarded_url, web_token_url):
    me = _address()
    over_tls = call("GET", f"{guarded_url}/login", headers={**me, "X-Forwarded-Proto": "https"})
    set_cookie = over_tls.headers["Set-Cookie"]
    assert set_cookie.startswith("__Host-sagaflow_csrf=") and "Secure" in set_cookie and "Path=/" in set_cookie
    cookie = set_cookie.split(";")[0]
    token = re.search(r'name="csrf_token" value="([^"]+)"', over_tls.text).group(1)
    login = _post_form(f"{guarded_url}/login", {"csrf_token": token, "token": WEB_TOKEN}, cookie,
                       {**me, "X-Forwarded-Proto": "https"})
    assert login.status == 303
    operator = login.headers["Set-Cookie"]
    assert operator.startswith("__Host-sagaflow_operator=") and "Secure" in operator
    tls = {**me, "X-Forwarded-Proto": "https", "Cookie": f"{cookie}; {operator.split(';')[0]}"}
    assert call("GET", f"{guarded_url}/", headers=tls).status == 200  # read back under its prefixed name

    plain = call("GET", f"{guarded_url}/login", headers=me).headers["Set-Cookie"]
    assert plain.startswith("sagaflow_csrf=") and "Secure" not in plain
    # An app that trusts no proxy ignores the header: plain http stays plain.
    untrusted = call("GET", f"{web_token_url}/login", headers={"X-Forwarded-Proto": "https"}).headers["Set-Cookie"]
    assert untrusted.startswith("sagaflow_csrf=") and "Secure" not in untrusted
