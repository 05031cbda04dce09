"""The Flask app: for now a health check that the deployment (docker-compose, a load balancer) can probe.
The JSON API and the status page build on this factory."""

from __future__ import annotations

from flask import Flask, jsonify
from sqlalchemy import text
from werkzeug.exceptions import HTTPException

from sagaflow.app import celery_app, configure, get_store, load_sagas


def create_app(settings=None) -> Flask:
    settings = configure(settings)
    load_sagas(settings)  # the API starts and shows sagas by name: Python modules and saga files alike
    app = Flask(__name__)
    app.config["SAGAFLOW"] = settings

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

    @app.errorhandler(HTTPException)
    def json_error(exc: HTTPException):
        return jsonify(error=exc.description), exc.code

    return app
