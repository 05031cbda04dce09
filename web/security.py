"""Who may change state, and from where.

The JSON API (machines): with SAGAFLOW_API_TOKEN set, every state-changing request carries
``Authorization: Bearer <token>``, compared in constant time; else 401.

The status page (people in a browser): its cancel and retry buttons are HTML forms posted to the page's
own routes, never to the API, because a browser cannot add a bearer header to a form. Those routes check:
  1. cross-site request forgery, twice: the request's Origin (or Referer) must be this site, and the form
     must carry the random value of the ``sagaflow_csrf`` cookie (double submit: another site can neither
     read that cookie nor set the field to it). The cookie is SameSite=Strict as well, so a cross-site post
     arrives without it. No server secret is needed, so every gunicorn worker and every restart agrees.
  2. with a token set, an operator session: /login takes the token once and sets ``sagaflow_operator`` =
     "<issued>.<HMAC-SHA256(token, issued)>", HttpOnly, SameSite=Strict, valid OPERATOR_SESSION seconds.
     Any worker can check it (the key is the token), and changing the token logs everyone out.
Reading (GET) needs neither: the token guards changes, as the API does.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlsplit

from flask import current_app, request

CSRF_COOKIE = "sagaflow_csrf"
CSRF_FIELD = "csrf_token"
OPERATOR_COOKIE = "sagaflow_operator"
OPERATOR_SESSION = 12 * 3600  # seconds an operator login lasts


def api_token() -> str:
    return current_app.config["SAGAFLOW"].api_token


def bearer_ok() -> bool:
    """True when no token is configured, or the request carries it as a bearer token."""
    token = api_token()
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def same_origin() -> bool:
    """False when the browser says the request comes from another site (Origin, else Referer). Absent
    both (curl, a service), True: such clients are not a browser acting on someone's behalf.
    Only host[:port] is compared, so a proxy that terminates TLS in front of the app does not matter."""
    for header in ("Origin", "Referer"):
        value = request.headers.get(header)
        if value:
            if value == "null":
                return False
            return urlsplit(value).netloc.lower() == request.host.lower()
    return True


# ---------------------------------------------------------------------------------------------- CSRF


def csrf_value() -> str:
    """This browser's CSRF value: the cookie's, or a new one that ``set_cookies`` will store."""
    value = request.cookies.get(CSRF_COOKIE, "")
    if len(value) < 32:
        value = getattr(request, "_sagaflow_new_csrf", None) or secrets.token_urlsafe(32)
        request._sagaflow_new_csrf = value
    return value


def csrf_ok() -> bool:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    field = request.form.get(CSRF_FIELD, "")
    return len(cookie) >= 32 and hmac.compare_digest(cookie.encode(), field.encode()) and same_origin()


def _cookie_options() -> dict:
    return dict(httponly=True, samesite="Strict", secure=request.is_secure, path="/")


def set_cookies(response):
    """After a page request: store the CSRF value this page's forms were given."""
    new = getattr(request, "_sagaflow_new_csrf", None)
    if new:
        response.set_cookie(CSRF_COOKIE, new, **_cookie_options())
    return response


# ---------------------------------------------------------------------------------------------- operator


def _sign(token: str, issued: str) -> str:
    return hmac.new(token.encode(), f"sagaflow-operator:{issued}".encode(), hashlib.sha256).hexdigest()


def operator_cookie_value(now: float | None = None) -> str:
    issued = str(int(now if now is not None else time.time()))
    return f"{issued}.{_sign(api_token(), issued)}"


def is_operator() -> bool:
    """May this browser cancel and retry? Anyone may when no token is set."""
    token = api_token()
    if not token:
        return True
    issued, _, signature = request.cookies.get(OPERATOR_COOKIE, "").partition(".")
    if not issued.isdigit() or not hmac.compare_digest(signature.encode(), _sign(token, issued).encode()):
        return False
    return 0 <= time.time() - int(issued) <= OPERATOR_SESSION


def token_matches(given: str) -> bool:
    token = api_token()
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def login(response):
    response.set_cookie(OPERATOR_COOKIE, operator_cookie_value(), max_age=OPERATOR_SESSION, **_cookie_options())
    return response


def logout(response):
    response.delete_cookie(OPERATOR_COOKIE, path="/", httponly=True, samesite="Strict", secure=request.is_secure)
    return response


def safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go back to after login; anything else (another host, //host, a scheme) -> default."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    return default if parts.scheme or parts.netloc else target
