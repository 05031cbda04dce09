"""The Flask app: the JSON API (/api), the status page (/, /runs/<id>), Prometheus metrics (/metrics) and a
health check (/healthz) that the deployment (docker-compose, a load balancer) can probe.

    gunicorn 'web:create_app()'          or          sagaflow web
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template, request
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from sagaflow.app import celery_app, configure, get_store, load_sagas

log = logging.getLogger("sagaflow.web")

# The page loads its own script and stylesheet only: an injected inline script or style would not run even
# if escaping failed somewhere.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
JSON_PATHS = ("/api/", "/metrics", "/healthz")


def create_app(settings=None) -> Flask:
    settings = configure(settings)
    load_sagas(settings)  # the API starts and shows sagas by name: Python modules and saga files alike
    app = Flask(__name__)
    app.config["SAGAFLOW"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.api_max_body
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False

    from web.api import api
    from web.metrics import metrics
    from web.pages import pages

    app.register_blueprint(api)
    app.register_blueprint(pages)
    app.register_blueprint(metrics)

    @app.get("/healthz")
    def healthz():
        checks = {}
        try:
            with get_store().engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            with celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["broker"] = f"error: {type(exc).__name__}"
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
            elif exc.code == 404:
                message = f"no such endpoint: {request.path}"
            response = jsonify(error=message)
            response.status_code = exc.code
            if exc.code == 405 and getattr(exc, "valid_methods", None):
                response.headers["Allow"] = ", ".join(exc.valid_methods)
            return response
        return render_template("error.html", code=exc.code, message=exc.description), exc.code

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
