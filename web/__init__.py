"""The Flask app: the JSON API (/api), the status page (/, /runs/<id>), Prometheus metrics (/metrics) and a
health check (/healthz) that the deployment (docker-compose, a load balancer) can probe.

    gunicorn 'sagaflow.web:create_app()'          or          sagaflow web
"""

from __future__ import annotations

import io
import logging

from flask import Flask, abort, jsonify, redirect, render_template, request, url_for
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from sagaflow.app import celery_app, configure, load_sagas
from sagaflow.client import SagaClient
from sagaflow.errors import InvalidInput

log = logging.getLogger("sagaflow.web")

# The page loads its own script and stylesheet only: an injected inline script or style would not run even
# if escaping failed somewhere.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
JSON_PATHS = ("/api/", "/metrics", "/healthz")
OPEN_PATHS = ("/healthz", "/static/", "/login", "/logout", "/favicon.ico")  # never behind the read login
BODY_REFUSED = "sagaflow.body_refused"
DRAIN_LIMIT = 4 * 1024 * 1024  # bytes of a refused body read and dropped, so the client sees the 413


class BodyLimit:
    """WSGI middleware: read the request body before Flask does, at most ``limit`` bytes plus one, from
    the stream itself, whether the client sent a Content-Length or chunks. Flask then gets the body as a
    plain buffer of known length; a longer body is never parsed (Werkzeug would cut a chunked body at the
    limit and hand over the prefix), it is marked for a 413 instead."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ, start_response):
        stream = environ.get("wsgi.input") or io.BytesIO()
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        declared = environ.get("CONTENT_LENGTH", "").strip()
        body = b""
        if chunked:
            if environ.get("wsgi.input_terminated"):  # the server decodes the chunks and ends the stream
                body = _read(stream, self.limit + 1)
                if len(body) > self.limit:
                    environ[BODY_REFUSED] = 413
                    _read(stream, DRAIN_LIMIT, keep=False)
                    body = b""
            else:
                environ[BODY_REFUSED] = 411
        elif declared:
            if not (declared.isascii() and declared.isdigit()):
                environ[BODY_REFUSED] = 400
            elif int(declared) > self.limit:
                environ[BODY_REFUSED] = 413
                if int(declared) <= DRAIN_LIMIT:
                    _read(stream, int(declared), keep=False)
            else:
                body = _read(stream, int(declared))
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ.pop("wsgi.input_terminated", None)
        return self.app(environ, start_response)


def _read(stream, size: int, keep: bool = True) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = stream.read(min(size - got, 64 * 1024))
        if not chunk:
            break
        got += len(chunk)
        if keep:
            parts.append(chunk)
    return b"".join(parts)


def create_app(settings=None) -> Flask:
    settings = configure(settings)
    load_sagas(settings)  # the API starts and shows sagas by name: Python modules and saga files alike
    app = Flask(__name__)
    app.config["SAGAFLOW"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.api_max_body
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False
    app.wsgi_app = BodyLimit(app.wsgi_app, settings.api_max_body)
    if settings.trusted_proxies:
        # Believe X-Forwarded-For (the client address: throttling, logs) and X-Forwarded-Proto (https: Secure
        # cookies) from this many proxies in front, and from nobody else.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    _log_to_stderr(settings)
    from sagaflow.web import security

    if security.exposed_without_token(settings):
        log.warning("web_exposed_without_token", extra={
            "allowed_hosts": ",".join(settings.allowed_hosts),
            "hint": "anyone who reaches these names can start, cancel and retry runs: set SAGAFLOW_API_TOKEN"})

    from sagaflow.web.api import api
    from sagaflow.web.metrics import metrics
    from sagaflow.web.pages import pages

    app.register_blueprint(api)
    app.register_blueprint(pages)
    app.register_blueprint(metrics)

    def _refuse(status: int, message: str, headers: dict | None = None):
        if request.path.startswith(JSON_PATHS):
            response = jsonify(error=message)
        else:
            response = app.make_response(render_template("error.html", code=status, message=message))
        response.status_code = status
        response.headers.update(headers or {})
        return response

    @app.before_request
    def guard():
        """Before any route: the body, the Host, a bearer token that was sent, reading, the run id."""
        refused = request.environ.get(BODY_REFUSED)
        if refused == 411:
            return _refuse(411, "a chunked body needs a server that ends the stream; send Content-Length")
        if refused:
            abort(refused)
        # /healthz answers any Host: probes often use an address (a pod IP), and it tells nothing.
        if not security.host_allowed(request.host) and request.path != "/healthz":
            shown = request.headers.get("Host", "")[:100]
            return _refuse(400, f"the Host header {shown!r} is not one of SAGAFLOW_ALLOWED_HOSTS")
        if settings.api_token and security.bearer_given():
            wait = security.throttled()
            if wait:
                return _refuse(429, f"too many failed logins or wrong tokens from this address; try again in "
                                    f"{wait} s", {"Retry-After": str(wait)})
            if not security.bearer_ok():
                security.auth_failed("auth_failed")
                return _refuse(401, "wrong token: send 'Authorization: Bearer <SAGAFLOW_API_TOKEN>'",
                               {"WWW-Authenticate": 'Bearer realm="sagaflow"'})
        if request.method in ("GET", "HEAD") and not request.path.startswith(OPEN_PATHS) \
                and not security.may_read():
            if request.path.startswith(JSON_PATHS):
                return _refuse(401, "reading needs the token (SAGAFLOW_API_READ_PROTECTED): send "
                                    "'Authorization: Bearer <SAGAFLOW_API_TOKEN>' or log in",
                               {"WWW-Authenticate": 'Bearer realm="sagaflow"'})
            return redirect(url_for("pages.login", next=request.full_path.rstrip("?")), 303)
        run_id = (request.view_args or {}).get("run_id")
        if run_id is not None:
            try:
                security.check_run_id(run_id)
            except InvalidInput as exc:
                return _refuse(400, str(exc))
        return None

    @app.get("/healthz")
    def healthz():
        """Open to anyone (load balancers): "ok" or "unavailable" per dependency, the reason only in the log."""
        checks = {}
        try:
            SagaClient().ping()
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            log.warning("healthz_failed", extra={"dependency": "database", "error": type(exc).__name__})
            checks["database"] = "unavailable"
        try:
            with celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            log.warning("healthz_failed", extra={"dependency": "broker", "error": type(exc).__name__})
            checks["broker"] = "unavailable"
        healthy = all(v == "ok" for v in checks.values())
        return jsonify(status="ok" if healthy else "unavailable", **checks), 200 if healthy else 503

    @app.after_request
    def headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if request.path.startswith(JSON_PATHS):
            message = exc.description
            if exc.code == 405:
                message = f"{request.method} is not allowed on {request.path}"
            elif exc.code == 413:
                message = f"the request body is over the limit of {settings.api_max_body} bytes (SAGAFLOW_API_MAX_BODY)"
            elif exc.code == 400 and request.environ.get(BODY_REFUSED) == 400:
                message = "the Content-Length header is not a number"
            elif exc.code == 404:
                message = f"no such endpoint: {request.path}"
            response = jsonify(error=message)
            response.status_code = exc.code
            if exc.code == 405 and getattr(exc, "valid_methods", None):
                response.headers["Allow"] = ", ".join(exc.valid_methods)
            return response
        return render_template("error.html", code=exc.code, message=exc.description), exc.code

    @app.errorhandler(InvalidInput)
    def invalid_input(exc: InvalidInput):
        # Every route maps the bad input it expects; this is the net under them: a 400, never a 500.
        return _refuse(400, str(exc))

    @app.errorhandler(OperationalError)
    def database_down(exc: OperationalError):
        log.warning("database_unreachable", extra={"path": request.path, "error": str(exc.orig)})
        message = "the database is unreachable; try again shortly"
        if request.path.startswith(JSON_PATHS):
            return jsonify(error=message), 503
        return render_template("error.html", code=503, message=message.capitalize() + "."), 503

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("web_request_failed", extra={"path": request.path})
        if request.path.startswith(JSON_PATHS):
            return jsonify(error=f"internal error: {type(exc).__name__}; see the web server's log"), 500
        return render_template("error.html", code=500, message="Internal error; see the web server's log."), 500

    return app


def _log_to_stderr(settings) -> None:
    """Under gunicorn nothing else sets up sagaflow's logs: the web app is an entry point, so it configures
    output as the CLI does (sagaflow.logs.setup_logging: left alone when the host configured logging)."""
    from sagaflow.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
