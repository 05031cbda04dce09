"""The JSON API under /api: a contract that code outside this repository relies on (README, "HTTP API").

Every error is ``{"error": "..."}`` with its status code, and a refused request changes nothing:
400 bad input (unknown saga, input not an object, malformed JSON, JSON deeper or larger than
SAGAFLOW_JSON_MAX_DEPTH/_BYTES, a NUL or lone surrogate, a bad query parameter or run id, a Host not in
SAGAFLOW_ALLOWED_HOSTS), 401 missing or wrong token (reads too, with SAGAFLOW_API_READ_PROTECTED), 403 a
browser request from another site, 404 unknown run, 405 wrong method, 409 the run's status does not allow it,
413 body over SAGAFLOW_API_MAX_BODY (chunked or not), 415 a body that is not JSON, 429 too many wrong tokens
from this address (Retry-After), 503 broker down.

``GET /api/runs`` searches with ``since``/``until`` (ISO 8601), ``idempotency_key`` and ``input.<field>=<value>``
(docs/operating.md); ``POST /api/runs/<id>/restart`` (a final run, optional ``{"input": ...}``) and
``POST /api/runs/<id>/resolve`` (``{"note": ...}`` required) are the operator's. ``POST /api/runs`` takes
``at`` (ISO 8601) or ``delay`` (seconds) for a delayed start. ``/api/schedules``: list (GET), add (POST
``{"name", "saga", "cron", "input", "catchup", "paused"}``, 201); ``/api/schedules/<name>``: GET, DELETE (204);
``POST /api/schedules/<name>/pause`` and ``/resume``.

A list item carries ``input_preview`` (at most 200 characters of the input's compact JSON) and
``input_truncated`` instead of the input; ``GET /api/runs/<id>`` has the whole of it.
"""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify, request, url_for

from sagaflow import safejson
from sagaflow.client import INPUT_FIELD, SagaClient
from sagaflow.errors import (
    BrokerUnavailable,
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    UnknownRun,
    UnknownSaga,
    UnknownSchedule,
)
from sagaflow.model.definition import NAME_PATTERN, registry
from sagaflow.model.policy import PolicyError
from sagaflow.model.query import parse_time
from sagaflow.model.status import RunStatus, compensation_rate, counts_by_status
from sagaflow.web import security
from sagaflow.web.present import run_json, run_list_json, saga_json

api = Blueprint("api", __name__, url_prefix="/api")

START_FIELDS = ("saga", "input", "idempotency_key", "at", "delay")
SCHEDULE_FIELDS = ("name", "saga", "cron", "input", "catchup", "paused")
LIST_PARAMS = ("status", "saga", "limit", "offset", "since", "until", "idempotency_key")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_OFFSET = 10**12  # far past any real table, far inside a 64-bit OFFSET
_DIGITS = re.compile(r"[0-9]{1,13}")  # ASCII only: str.isdigit() takes "²" and "٣"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@api.errorhandler(ApiError)
def _api_error(exc: ApiError):
    return jsonify(error=exc.message), exc.status, exc.headers


@api.before_request
def _guard_changes():
    if request.method in SAFE_METHODS:
        return
    if not security.same_origin():
        raise ApiError(403, "cross-site request refused: call the API from a service, or use the status page")
    if not security.bearer_ok():
        raise ApiError(401, "missing or wrong token: send 'Authorization: Bearer <SAGAFLOW_API_TOKEN>'",
                       {"WWW-Authenticate": 'Bearer realm="sagaflow"'})
    body = request.get_data(cache=True)  # over SAGAFLOW_API_MAX_BODY: 413, raised here
    if (body or request.content_type) and not request.is_json:
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), got "
                            f"{request.content_type or 'no Content-Type'}")


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _client() -> SagaClient:
    return SagaClient()


def _flower() -> str:
    return current_app.config["SAGAFLOW"].flower_url


def parse_json(raw: bytes, what: str):
    """JSON text from a request, under SAGAFLOW_JSON_MAX_DEPTH / _MAX_BYTES, UTF-8 only, no NUL or lone
    surrogate in any string: InvalidInput otherwise (the caller makes it a 400)."""
    limits = current_app.config["SAGAFLOW"].json_limits
    try:
        return safejson.loads(raw, what, limits)
    except InvalidInput as exc:
        message = str(exc)
        if message.startswith((f"{what} is not valid JSON", f"{what} is not UTF-8")):
            message = f"malformed JSON: {message}"
        raise InvalidInput(message) from None


def _json_body() -> dict:
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise ApiError(400, "malformed JSON: the body is empty; send a JSON object")
    try:
        body = parse_json(raw, "the request body")
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_json_type(body)}")
    return body


# ---------------------------------------------------------------------------------------------- runs


@api.post("/runs")
def start_run():
    body = _json_body()
    unknown = sorted(set(body) - set(START_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}: expected {', '.join(START_FIELDS)}")
    saga = body.get("saga")
    if not isinstance(saga, str) or not saga:
        raise ApiError(400, "saga is required: the name of a registered saga as a string (GET /api/sagas)")
    data = body.get("input")
    if data is None:
        data = {}  # absent or null: an empty input
    if not isinstance(data, dict):
        raise ApiError(400, f"input must be a JSON object, got {_json_type(data)}")
    key = body.get("idempotency_key")
    try:
        # A delayed start: "at" (ISO 8601; no zone means UTC) or "delay" (seconds); the run is scheduled.
        at = body.get("at")
        if at is not None and not isinstance(at, str):
            raise InvalidInput(f"at must be an ISO 8601 time as a string, got {_json_type(at)}")
        run = _client().start(saga, data, idempotency_key=key, at=parse_time(at, "at") if at is not None else None,
                              delay=body.get("delay"))
    except (UnknownSaga, InvalidInput) as exc:
        raise ApiError(400, str(exc)) from None
    except (BrokerUnavailable, PolicyError, DefinitionError) as exc:
        # PolicyError / DefinitionError: the server's policy file or saga definition refuses runs of this
        # saga until fixed (the message says what to fix).
        raise ApiError(503, str(exc)) from None
    return jsonify(run_json(run, _flower())), 202, {"Location": url_for("api.get_run", run_id=run.id)}


@api.get("/runs")
def list_runs():
    try:
        filters = search_args(request.args)
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None
    status = request.args.get("status") or None
    if status is not None and status not in {s.value for s in RunStatus}:
        raise ApiError(400, f"unknown status {status!r} (one of: {', '.join(s.value for s in RunStatus)})")
    saga = request.args.get("saga") or None
    if saga is not None and not NAME_PATTERN.match(saga):
        raise ApiError(400, f"saga must be a saga name (letters, digits, underscore), got {saga!r}")
    try:
        limit = int_arg("limit", 50, 1, 1000)
        offset = int_arg("offset", 0, 0, MAX_OFFSET)
        page = _client().list(status=status, saga=saga, limit=limit, offset=offset, **filters)
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None
    # Each item shows a short preview of its input, never the whole of it (up to SAGAFLOW_JSON_MAX_BYTES
    # per run): the run's own endpoint has it.
    # total_is_exact false: a search matched more runs than it counts (at least ``total``; the page says "N+")
    return jsonify(items=[run_list_json(r) for r in page], total=page.total, total_is_exact=page.total_is_exact,
                   limit=limit, offset=offset)


def search_args(args) -> dict:
    """The search filters of a query string (the API's and the status page's): ``since``, ``until`` (ISO
    8601), ``idempotency_key``, ``input.<field>=<value>``; an unknown parameter or a field name that is not
    1-100 letters, digits, '_' or '-' is InvalidInput. Empty values are no filter."""
    unknown = sorted(k for k in args if k not in LIST_PARAMS and not k.startswith("input."))
    if unknown:
        raise InvalidInput(f"unknown parameter(s) {', '.join(unknown)}: expected {', '.join(LIST_PARAMS)} "
                           f"or input.<field>")
    filters: dict = {}
    for name in ("since", "until"):
        if args.get(name):
            filters[name] = parse_time(args[name], name)
    if args.get("idempotency_key"):
        filters["idempotency_key"] = args["idempotency_key"]
    fields = {}
    for key in args:
        if key.startswith("input."):
            field = key[len("input."):]
            if not INPUT_FIELD.fullmatch(field):
                raise InvalidInput(f"input.<field>: the field is 1 to 100 letters, digits, '_' or '-' (a "
                                   f"top-level input field), got {key!r:.80}")
            if args.get(key) != "":
                fields[field] = args[key]
    if fields:
        filters["input"] = fields
    return filters


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """A whole number from the query string: ASCII digits within low..high, else InvalidInput."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise InvalidInput(f"{name} must be an integer {low}..{high}, got {shown!r}")
    return int(raw)


@api.get("/runs/<run_id>")
def get_run(run_id: str):
    try:
        return jsonify(run_json(_client().get(run_id), _flower()))
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None
    except UnknownRun as exc:
        raise ApiError(404, str(exc)) from None


@api.post("/runs/<run_id>/cancel")
def cancel_run(run_id: str):
    return _act(run_id, lambda run_id: _client().cancel(run_id, by=_origin()))


@api.post("/runs/<run_id>/retry")
def retry_run(run_id: str):
    return _act(run_id, lambda run_id: _client().retry(run_id, by=_origin()))


@api.post("/runs/<run_id>/restart")
def restart_run(run_id: str):
    """A new run of a final run's saga (202, the new run; 409 when the run is not final). Optional body
    ``{"input": {...}}``: the new run's input instead of the old one's."""
    data = None
    if request.get_data(cache=True).strip():
        body = _json_body()
        unknown = sorted(set(body) - {"input"})
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}: expected input")
        data = body.get("input")
        if data is not None and not isinstance(data, dict):
            raise ApiError(400, f"input must be a JSON object, got {_json_type(data)}")
    try:
        return _act(run_id, lambda run_id: _client().restart(run_id, data, by=_origin()))
    except ApiError:
        raise
    except (UnknownSaga, PolicyError, DefinitionError) as exc:
        raise ApiError(503 if not isinstance(exc, UnknownSaga) else 409, str(exc)) from None


@api.post("/runs/<run_id>/resolve")
def resolve_run(run_id: str):
    """Settle a compensation_failed or stuck run by hand: ``{"note": "..."}`` (required: 400 without)."""
    body = _json_body() if request.get_data(cache=True).strip() else {}
    unknown = sorted(set(body) - {"note"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}: expected note")
    note = body.get("note")
    if not isinstance(note, str) or not note.strip():
        raise ApiError(400, "a note is required: {\"note\": \"how the run was settled\"}")
    return _act(run_id, lambda run_id: _client().resolve(run_id, note, by=_origin()))


@api.post("/runs/<run_id>/signals/<name>")
def signal_run(run_id: str, name: str):
    """Deliver a signal: the JSON body (optional; any JSON value) is the payload, the gate's result."""
    if not NAME_PATTERN.match(name):
        raise ApiError(400, f"signal name {name!r} must be an identifier (letters, digits, underscore)")
    raw = request.get_data(cache=True)
    payload = None
    if raw.strip():
        try:
            payload = parse_json(raw, "the signal payload")
        except InvalidInput as exc:
            raise ApiError(400, str(exc)) from None
    return _act(run_id, lambda run_id: _client().signal(run_id, name, payload, by=_origin()))


def _origin():
    """Who asks (the operator event records it): the API token, the client's address, and ``?reason=``."""
    return security.origin("api", request.args.get("reason"))


def _act(run_id: str, action):
    try:
        run = action(run_id)
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None
    except UnknownRun as exc:
        raise ApiError(404, str(exc)) from None
    except InvalidTransition as exc:
        raise ApiError(409, str(exc)) from None
    except BrokerUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    return jsonify(run_json(run, _flower())), 202


# ---------------------------------------------------------------------------------------------- schedules


def _schedule_act(action, *args, status: int = 200):
    try:
        item = action(*args)
    except (InvalidInput, UnknownSaga) as exc:
        raise ApiError(400, str(exc)) from None
    except UnknownSchedule as exc:
        raise ApiError(404, str(exc)) from None
    except InvalidTransition as exc:
        raise ApiError(409, str(exc)) from None
    return (jsonify(item.to_dict()), status) if item is not None else ("", 204)


@api.get("/schedules")
def list_schedules():
    return jsonify(items=[item.to_dict() for item in _client().schedules()])


@api.post("/schedules")
def add_schedule():
    body = _json_body()
    unknown = sorted(set(body) - set(SCHEDULE_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}: expected {', '.join(SCHEDULE_FIELDS)}")
    for field in ("name", "saga", "cron"):
        if not isinstance(body.get(field), str):
            raise ApiError(400, f"{field} is required, as a string")
    return _schedule_act(lambda: _client().add_schedule(body["name"], body["saga"], body["cron"], body.get("input"),
                                                        catchup=body.get("catchup"),
                                                        paused=body.get("paused", False)), status=201)


@api.get("/schedules/<name>")
def get_schedule(name: str):
    return _schedule_act(_client().schedule, name)


@api.post("/schedules/<name>/pause")
def pause_schedule(name: str):
    return _schedule_act(_client().pause_schedule, name)


@api.post("/schedules/<name>/resume")
def resume_schedule(name: str):
    return _schedule_act(_client().resume_schedule, name)


@api.delete("/schedules/<name>")
def remove_schedule(name: str):
    return _schedule_act(_client().remove_schedule, name)


# ---------------------------------------------------------------------------------------------- the rest


@api.get("/sagas")
def list_sagas():
    return jsonify(items=[saga_json(s) for s in registry.all()])


@api.get("/workers")
def list_workers():
    if request.args:
        raise ApiError(400, f"/api/workers takes no parameters, got {', '.join(sorted(request.args))}")
    return jsonify(items=[{**w, "started_at": w["started_at"].isoformat(),
                           "heartbeat_at": w["heartbeat_at"].isoformat()} for w in _client().workers()])


@api.get("/stats")
def get_stats():
    if request.args:
        raise ApiError(400, f"/api/stats takes no parameters, got {', '.join(sorted(request.args))}")
    client = _client()
    counts = client.run_counts()
    by_saga: dict[str, dict[str, int]] = {}
    for (saga, status), n in sorted(counts.items()):
        by_saga.setdefault(saga, {})[status] = n
    durations: dict[str, dict[str, dict]] = {}
    for (saga, step), entry in sorted(client.step_duration_percentiles().items()):
        durations.setdefault(saga, {})[step] = entry
    return jsonify(
        total=sum(counts.values()),
        by_status=counts_by_status(counts),
        by_saga=by_saga,
        compensation_rate=compensation_rate(counts),
        step_duration_seconds=durations,
    )

