"""Who may change (and, optionally, read) state, and from where.

Hosts: the app answers only to the Host names in SAGAFLOW_ALLOWED_HOSTS (default: the loopback names), so
a web page a developer visits cannot reach their ``sagaflow web`` through a rebound DNS name (400).

The JSON API (machines): with SAGAFLOW_API_TOKEN set, every state-changing request carries
``Authorization: Bearer <token>``, compared in constant time; else 401. With SAGAFLOW_API_READ_PROTECTED
reads need it too (API GETs, /metrics), or an operator login (a person following a link).

The status page (people in a browser): its cancel and retry buttons are HTML forms posted to the page's
own routes, never to the API, because a browser cannot add a bearer header to a form. Those routes check:
  1. cross-site request forgery, twice: the request's Origin (or Referer) must be this site, and the form
     must carry the random value of the CSRF cookie (double submit: another site can neither read that
     cookie nor set the field to it). The cookie is SameSite=Strict as well, so a cross-site post arrives
     without it. No server secret is needed, so every gunicorn worker and every restart agrees.
  2. with a token set, an operator session: /login takes the token once, records a session row (random
     id, 12 hours) and sets the operator cookie = "<id>.<HMAC-SHA256(token, id)>", HttpOnly,
     SameSite=Strict. Logout deletes the row, so a copied cookie dies with it; changing the token logs
     everyone out (the HMAC no longer matches).
Over https (request.is_secure, which believes X-Forwarded-Proto only from SAGAFLOW_TRUSTED_PROXIES) the
cookies are Secure and named with the ``__Host-`` prefix; on plain http (a laptop) they are neither.

Failed logins and wrong bearer tokens are counted per client address in SQL (every process agrees):
past FAILURE_LIMIT in FAILURE_WINDOW seconds, 429 with Retry-After, and each failure is logged at WARNING.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import unicodedata
from urllib.parse import quote, urlsplit

from flask import current_app, g, request

from sagaflow.client import SagaClient
from sagaflow.errors import InvalidInput
from sagaflow.model.events import REASON_CHARS, Origin
from sagaflow.safejson import check_text

log = logging.getLogger("sagaflow.web")

CSRF_COOKIE = "sagaflow_csrf"
CSRF_FIELD = "csrf_token"
OPERATOR_COOKIE = "sagaflow_operator"
OPERATOR_SESSION = 12 * 3600  # seconds an operator login lasts
FAILURE_LIMIT = 10  # failed logins / wrong tokens per client address ...
FAILURE_WINDOW = 300  # ... per this many seconds, then 429
LOOPBACK = ("localhost", "127.0.0.1", "[::1]", "::1")


def _settings():
    return current_app.config["SAGAFLOW"]


def api_token() -> str:
    return _settings().api_token


def _client() -> SagaClient:
    """Operator sessions and failure counts live in the database (every web process sees the same): the
    client records and reads them (sagaflow/store/sessions.py holds their SQL)."""
    return SagaClient()


# ---------------------------------------------------------------------------------------------- hosts


def host_name(host: str) -> str:
    """The name part of a Host header value (no port), lower case: "[::1]:8000" -> "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    name, sep, port = host.rpartition(":")
    return name.rstrip(".") if sep and port.isdigit() and port.isascii() else host.rstrip(".")


def host_allowed(host: str) -> bool:
    allowed = _settings().allowed_hosts
    return "*" in allowed or (bool(host) and host_name(host) in allowed)


def exposed_without_token(settings) -> bool:
    """True when the app answers to names beyond loopback and nothing guards it."""
    return not settings.api_token and any(h not in LOOPBACK for h in settings.allowed_hosts)


def check_run_id(run_id: str) -> str:
    """A run id from a URL: 1..36 characters, no NUL, no lone surrogate (as the client requires)."""
    if not 1 <= len(run_id) <= 36:
        raise InvalidInput(f"a run id is 1 to 36 characters, got {len(run_id)}")
    return check_text(run_id, "the run id")


# ---------------------------------------------------------------------------------------------- origin


def same_origin() -> bool:
    """False when the browser says the request comes from another site (Origin, else Referer). Absent
    both (curl, a service), True: such clients are not a browser acting on someone's behalf.
    The request's Host was checked against SAGAFLOW_ALLOWED_HOSTS before this runs, and the Origin's
    host[:port] must equal it, so a page on another name never passes (a proxy that terminates TLS in
    front of the app does not matter: the scheme is not compared)."""
    for header in ("Origin", "Referer"):
        value = request.headers.get(header)
        if value:
            if value == "null":
                return False
            try:
                parts = urlsplit(value)
            except ValueError:
                return False
            return (parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()
                    and host_allowed(parts.netloc))
    return True


# ---------------------------------------------------------------------------------------------- throttling


def client_address() -> str:
    return (request.remote_addr or "unknown")[:100]


def origin(source: str, reason: str | None = None) -> Origin:
    """Who asks, as the operator events record it: from the page, "page login" (an operator session; with no
    SAGAFLOW_API_TOKEN set, "page (no token set)"); from the API, "api token" (or "api (no token set)"); and
    the client's address. ``reason``: the operator's optional reason (InvalidInput when too long)."""
    token = bool(api_token())
    if source == "page":
        actor = "page login" if token else "page (no token set)"
    else:
        actor = "api token" if token else "api (no token set)"
    if reason is not None:
        reason = reason.strip()
        if len(reason) > REASON_CHARS:
            raise InvalidInput(f"the reason is at most {REASON_CHARS} characters, got {len(reason)}")
        check_text(reason, "the reason")
    return Origin(actor=actor, source=source, client=client_address(), reason=reason or None)


def throttled() -> int:
    """Seconds this client must wait before its credentials are checked again (0: go ahead)."""
    return _client().auth_retry_after(client_address(), FAILURE_LIMIT, FAILURE_WINDOW)


def auth_failed(event: str) -> None:
    """Count and log a failed login or a wrong bearer token (never the text that was tried)."""
    failures = _client().record_auth_failure(client_address(), FAILURE_WINDOW)
    log.warning(event, extra={"client": client_address(), "path": request.path, "failures": failures,
                              "limit": FAILURE_LIMIT, "window_seconds": FAILURE_WINDOW})


# ---------------------------------------------------------------------------------------------- bearer


def bearer_given() -> bool:
    return bool(request.headers.get("Authorization", "").strip())


def bearer_ok() -> bool:
    """True when no token is configured, or the request carries it as a bearer token."""
    token = api_token()
    if not token:
        return True
    return _bearer_matches(token)


def _bearer_matches(token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode())


# ---------------------------------------------------------------------------------------------- cookies


def cookie_name(base: str) -> str:
    """``__Host-<base>`` over https: the browser then insists on Secure, path=/ and no Domain, so a
    sibling subdomain cannot plant it. Plain http on a laptop keeps the bare name (no Secure there)."""
    return f"__Host-{base}" if request.is_secure else base


def _cookie_options() -> dict:
    return dict(httponly=True, samesite="Strict", secure=request.is_secure, path="/")


def csrf_value() -> str:
    """This browser's CSRF value: the cookie's, or a new one that ``set_cookies`` will store."""
    value = request.cookies.get(cookie_name(CSRF_COOKIE), "")
    if len(value) < 32:
        value = getattr(request, "_sagaflow_new_csrf", None) or secrets.token_urlsafe(32)
        request._sagaflow_new_csrf = value
    return value


def csrf_ok() -> bool:
    cookie = request.cookies.get(cookie_name(CSRF_COOKIE), "")
    field = request.form.get(CSRF_FIELD, "")
    return (len(cookie) >= 32 and hmac.compare_digest(cookie.encode("utf-8", "surrogateescape"),
                                                      field.encode("utf-8", "surrogateescape"))
            and same_origin())


def set_cookies(response):
    """After a page request: store the CSRF value this page's forms were given."""
    new = getattr(request, "_sagaflow_new_csrf", None)
    if new:
        response.set_cookie(cookie_name(CSRF_COOKIE), new, **_cookie_options())
    return response


# ---------------------------------------------------------------------------------------------- operator


def _sign(token: str, session_id: str) -> str:
    return hmac.new(token.encode(), f"sagaflow-operator-session:{session_id}".encode(), hashlib.sha256).hexdigest()


def _session_id() -> str | None:
    """The session id of a well-signed operator cookie (not yet checked against the database)."""
    token = api_token()
    session_id, _, signature = request.cookies.get(cookie_name(OPERATOR_COOKIE), "").partition(".")
    if not token or not session_id or len(session_id) > 64:
        return None
    if not hmac.compare_digest(signature.encode("utf-8", "surrogateescape"), _sign(token, session_id).encode()):
        return None
    return session_id


def is_operator() -> bool:
    """May this browser cancel and retry (and, with reads protected, read)? Anyone may when no token is
    set. Asked once per request (the page's layout asks too)."""
    if not api_token():
        return True
    if "sagaflow_operator" not in g:
        session_id = _session_id()
        g.sagaflow_operator = session_id is not None and _client().operator_session_alive(session_id)
    return g.sagaflow_operator


def may_read() -> bool:
    """With SAGAFLOW_API_READ_PROTECTED: the bearer token or an operator login; else anyone."""
    if not _settings().api_read_protected or not api_token():
        return True
    return _bearer_matches(api_token()) or is_operator()


def token_matches(given: str) -> bool:
    token = api_token()
    return bool(token) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())


def login(response):
    session_id = secrets.token_urlsafe(32)
    client = _client()
    client.open_operator_session(session_id, OPERATOR_SESSION)
    client.clear_auth_failures(client_address())
    value = f"{session_id}.{_sign(api_token(), session_id)}"
    response.set_cookie(cookie_name(OPERATOR_COOKIE), value, max_age=OPERATOR_SESSION, **_cookie_options())
    return response


def logout(response):
    session_id = _session_id()
    if session_id is not None:
        _client().close_operator_session(session_id)
    response.delete_cookie(cookie_name(OPERATOR_COOKIE), path="/", httponly=True, samesite="Strict",
                           secure=request.is_secure)
    return response


def safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go back to after login; anything else (another host, //host, a scheme, a control
    character) -> default. Non-ASCII is percent-encoded: it goes into a Location header."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in target):
        return default
    try:
        parts = urlsplit(target)
    except ValueError:
        return default
    if parts.scheme or parts.netloc:
        return default
    return quote(target, safe="/?&=%#:@!$'()*+,;~-._[]")
