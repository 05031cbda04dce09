"""The status page: server-rendered HTML (Jinja, autoescaped), a little static JS and CSS, no CDN.

  /                 runs, newest first; filters by status and saga; counts at the top; refreshes itself
  /workers          the live workers (heartbeats in SQL) and the steps each holds
  /runs/<id>        the run's timeline: every action and compensation as a bar, in time order
  POST /runs/<id>/cancel, /retry, /resolve, /restart   the buttons (CSRF-checked; operator login with a token)
  /login, /logout   only when SAGAFLOW_API_TOKEN is set (see web/security.py)
"""

from __future__ import annotations

from types import SimpleNamespace

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for

from sagaflow.client import INPUT_FIELD, SagaClient
from sagaflow.errors import BrokerUnavailable, InvalidInput, InvalidTransition, UnknownRun, UnknownSaga
from sagaflow.model.definition import NAME_PATTERN, registry
from sagaflow.model.events import EventKind
from sagaflow.model.query import parse_time
from sagaflow.model.status import (
    HELD_STEP_STATUSES,
    WAITING_FOR_SOMEONE_RUN_STATUSES,
    RunStatus,
    StepStatus,
    counts_by_status,
)
from sagaflow.web import security
from sagaflow.web.api import MAX_OFFSET, int_arg, parse_json
from sagaflow.web.flower import FlowerAsker
from sagaflow.web.present import (
    PRETTY_CHARS,
    TimeAxis,
    age,
    awaiting_undo,
    capped_json,
    capped_text,
    duration,
    human_seconds,
    now,
    operator_events,
    run_json,
    timeline,
)

pages = Blueprint("pages", __name__)

PAGE_SIZE = 50
NOTICES = {  # ?done=... after a redirect: fixed texts, never echoed from the request
    "cancel": "Cancel requested: the run stops before its next step and undoes what completed.",
    "retry": "Retry requested: the run resumes where it stopped.",
    "signal": "Signal delivered: the run goes on past its gate.",
    "resolve": "Resolved by hand: the run is final, its note is in the history.",
    "restart": "Restarted: this is the new run.",
    "login": "Logged in: you can cancel and retry runs.",
    "logout": "Logged out.",
}


@pages.app_template_global()
def csrf_token() -> str:
    return security.csrf_value()


@pages.app_context_processor
def _common():
    settings = current_app.config["SAGAFLOW"]
    return {"token_required": bool(settings.api_token), "operator": security.is_operator(),
            "read_protected": settings.api_read_protected,
            "flower_url": settings.flower_url, "human_seconds": human_seconds, "age": age, "cap": capped_text}


@pages.after_app_request
def _cookies(response):
    return security.set_cookies(response)


def _settings():
    return current_app.config["SAGAFLOW"]


def _page_error(status: int, message: str):
    return render_template("error.html", code=status, message=message), status


# ---------------------------------------------------------------------------------------------- list


@pages.get("/")
def runs():
    status = request.args.get("status") or None
    saga = request.args.get("saga") or None
    if status is not None and status not in {s.value for s in RunStatus}:
        return _page_error(400, f"Unknown status {status!r}.")
    if saga is not None and not NAME_PATTERN.match(saga):
        return _page_error(400, f"{saga!r} is not a saga name.")
    search = {name: request.args.get(name, "").strip() for name in ("q", "key", "since", "until")}
    try:
        offset = int_arg("offset", 0, 0, MAX_OFFSET)
        filters = _search_filters(search)
    except InvalidInput as exc:
        return _page_error(400, f"{exc}.")
    client = SagaClient()
    try:
        page = client.list(status=status, saga=saga, limit=PAGE_SIZE, offset=offset, **filters)
    except InvalidInput as exc:
        return _page_error(400, f"{exc}.")
    counts = client.run_counts()
    scoped = {k: n for k, n in counts.items() if saga is None or k[0] == saga}
    saga_names = sorted({s.name for s in registry.all()} | {name for name, _ in counts})
    keep = {k: v for k, v in search.items() if v}  # the search stays in every link of the page
    attention = client.attention() if offset == 0 else []
    marks = client.step_marks([r.id for r in page] + [r.id for r in attention])
    return render_template(
        "runs.html", runs=page, total=page.total, total_exact=page.total_is_exact, status=status, saga=saga,
        offset=offset, page_size=PAGE_SIZE,
        by_status=counts_by_status(scoped), all_count=sum(scoped.values()), statuses=[s.value for s in RunStatus],
        saga_names=saga_names, duration=duration, search=search, keep=keep, searching=bool(keep),
        attention=attention, marks=marks, waited=_waited, now=now(),
    )


def _waited(run, mark) -> float | None:
    """Seconds a run has waited for an operator (or at its gate): since its step failed or began to wait,
    else since the run last changed."""
    waits = run.status in {s.value for s in WAITING_FOR_SOMEONE_RUN_STATUSES}
    if not waits and not (run.deadline_at and run.is_live):
        return None
    since = (mark.since if mark is not None else None) or run.finished_at or run.updated_at
    return max((now() - since).total_seconds(), 0.0)


def _search_filters(search: dict) -> dict:
    """The page's search box: ``field=value`` terms (space-separated) are input fields; since, until and
    the idempotency key have their own fields. InvalidInput for a term that is not ``field=value``."""
    filters: dict = {}
    fields = {}
    for term in search["q"].split():
        field, sep, value = term.partition("=")
        if not sep or not INPUT_FIELD.fullmatch(field):
            raise InvalidInput(f"search terms are field=value (a top-level input field: letters, digits, '_' "
                               f"or '-'), got {term!r:.80}")
        fields[field] = value
    if fields:
        filters["input"] = fields
    if search["key"]:
        filters["idempotency_key"] = search["key"]
    for name in ("since", "until"):
        if search[name]:
            filters[name] = parse_time(search[name], name)
    return filters


@pages.get("/workers")
def workers():
    """Live workers: each worker main process heartbeating in SQL, with the steps its pool holds."""
    return render_template("workers.html", workers=SagaClient().workers(),
                           dead_after=_settings().worker_dead_after)


# ---------------------------------------------------------------------------------------------- detail


def _render_run(run_id: str, status_code: int = 200, error: str | None = None):
    try:
        run = SagaClient().get(run_id)
    except InvalidInput as exc:
        return _page_error(400, f"{exc}.")
    except UnknownRun:
        found = SagaClient().find(run_id) if request.method == "GET" else []
        if len(found) == 1:
            return redirect(url_for("pages.run_detail", run_id=found[0]), 303)
        if found:
            return render_template("found.html", text=run_id, found=found)
        return _page_error(404, f"There is no run with id {run_id!r}.")
    bars, not_started = timeline(run, _settings().flower_url)
    asker = FlowerAsker(_settings().flower_url)
    cancel_event = next((e for e in reversed(run.events) if e.kind == EventKind.CANCEL_REQUESTED), None)
    notice = NOTICES.get(request.args.get("done", ""))
    return render_template(
        "run.html", run=run, bars=bars, not_started=not_started, duration=duration(run),
        input_json=capped_json(run.input), raw_url=url_for("api.get_run", run_id=run.id),
        # What the run allows is the model's rule (sagaflow/model/status.py), not the page's.
        data=run_json(run), live=run.is_live, notice=notice, error=error,
        can_cancel=run.can_cancel, can_retry=run.can_retry, can_resolve=run.can_resolve,
        can_restart=run.can_restart, pretty=_pretty,
        past_pivot=run.past_pivot, waiting=[s for s in run.steps if s.status == StepStatus.WAITING],
        required_signals=_required_signals(run), awaiting=awaiting_undo(run), audit=operator_events(run),
        running=_running(run), flower_state=lambda bar: asker.state(bar.task_id if bar.flower_url else None),
        pauses=TimeAxis(bars, run.finished_at).pauses if bars else [],
        cancel_event=cancel_event, cancel_waits_for=[s.name for s in run.steps if s.status == StepStatus.RUNNING],
        maps=_maps(run),
    ), status_code


MAP_ITEMS_SHOWN = 100  # items listed per map step; a longer map shows its counts and the first ones


def _maps(run) -> dict:
    """For each map step, by name: its items' counts (done, failed, running...) and the first items."""
    if not any(s.kind == "map" for s in run.steps):
        return {}
    found = SagaClient().map_items(run.id, MAP_ITEMS_SHOWN)
    return {s.name: {**found[s.index], "shown": MAP_ITEMS_SHOWN} for s in run.steps if s.index in found}


def _running(run) -> dict:
    """For each running step or undo: elapsed seconds, its time limit, lease expiry, worker and the worker's
    last heartbeat (saga_workers)."""
    held = [s for s in run.steps if s.status in {h.value for h in HELD_STEP_STATUSES}]
    if not held:
        return {}
    heartbeats = {w["id"]: w["heartbeat_at"] for w in SagaClient().workers()}
    try:
        definition = {s.name: s for s in registry.get(run.saga, run.saga_version).steps}
    except UnknownSaga:
        definition = {}
    default = _settings().default_step_timeout
    facts = {}
    for s in held:
        step = definition.get(s.name)
        undoing = s.status == StepStatus.COMPENSATING
        limit = None
        if step is not None:
            limit = ((step.compensation_timeout or step.timeout) if undoing else step.timeout) or default
        started = s.started_at if not undoing else None
        if undoing:
            started = next((e.at for e in reversed(run.events)
                            if e.kind == EventKind.COMPENSATION_STARTED and e.step == s.name), None)
        elapsed = (now() - started).total_seconds() if started else None
        lease_left = None
        if s.lease_expires_at:
            left = (s.lease_expires_at - now()).total_seconds()
            lease_left = f"in {human_seconds(left)}" if left >= 0 else f"expired {human_seconds(-left)} ago"
        facts[s.name] = SimpleNamespace(elapsed=elapsed, limit=limit, lease=s.lease_expires_at,
                                        lease_left=lease_left, worker=s.worker, heartbeat=heartbeats.get(s.worker))
    return facts


def _required_signals(run) -> set[str]:
    """The signals whose gates declare ``payload_required`` (the form marks the payload required)."""
    try:
        saga = registry.get(run.saga, run.saga_version)
    except UnknownSaga:
        return set()
    return {s.signal for s in saga.steps if s.signal and s.payload_required}


def _pretty(value, limit: int = PRETTY_CHARS // 4) -> tuple[str, bool]:
    """(pretty JSON, cut?): the page shows at most ``limit`` characters and links to the raw JSON."""
    return capped_json(value, limit)


@pages.get("/runs/<run_id>")
def run_detail(run_id: str):
    """A run by its id; a shorter id (the list's 8 characters) or an idempotency key opens the one run it
    names, or lists the runs it names."""
    return _render_run(run_id)


@pages.get("/go")
def go():
    """The list's jump box: an id, an id prefix or an idempotency key."""
    text = request.args.get("to", "").strip()
    if not text:
        return redirect(url_for("pages.runs"), 303)
    try:
        found = SagaClient().find(text)
    except InvalidInput as exc:
        return _page_error(400, f"{exc}.")
    if len(found) == 1:
        return redirect(url_for("pages.run_detail", run_id=found[0]), 303)
    if not found:
        return _page_error(404, f"No run has an id starting with {text!r} or the idempotency key {text!r}.")
    return render_template("found.html", text=text, found=found)


@pages.post("/runs/<run_id>/cancel")
def cancel(run_id: str):
    return _act(run_id, "cancel", lambda client: client.cancel(run_id, by=_origin()))


@pages.post("/runs/<run_id>/retry")
def retry(run_id: str):
    return _act(run_id, "retry", lambda client: client.retry(run_id, by=_origin()))


@pages.post("/runs/<run_id>/resolve")
def resolve(run_id: str):
    return _act(run_id, "resolve", lambda client: client.resolve(run_id, request.form.get("note", ""),
                                                                    by=_origin()))


@pages.post("/runs/<run_id>/restart")
def restart(run_id: str):
    """The new run's page, once started (its restarted_from links back)."""
    started = []
    answer = _act(run_id, "restart", lambda client: started.append(client.restart(run_id, by=_origin())))
    if started:  # it succeeded: _act answered with a redirect to the old run
        return redirect(url_for("pages.run_detail", run_id=started[0].id, done="restart"), 303)
    return answer


@pages.post("/runs/<run_id>/signals/<name>")
def signal(run_id: str, name: str):
    """An operator approves at a gate: the form's optional JSON payload becomes the gate's result."""
    def deliver(client):
        text = request.form.get("payload", "").strip()
        try:
            payload = parse_json(text, "the payload") if text else None
        except InvalidInput as exc:
            what = "is not JSON" if str(exc).startswith("malformed JSON") else "is refused"
            raise InvalidInput(f"The payload {what} ({exc}): leave it empty or fix it.") from None
        client.signal(run_id, name, payload, by=_origin())

    return _act(run_id, "signal", deliver)


def _origin():
    """Who asks: "page login", the browser's address, and the form's optional reason."""
    return security.origin("page", request.form.get("reason"))


def _act(run_id: str, what: str, action):
    if not security.csrf_ok():
        return _page_error(403, "This form is out of date or was sent from another site. Reload the page and "
                                "try again.")
    back = url_for("pages.run_detail", run_id=run_id)
    if not security.is_operator():
        return redirect(url_for("pages.login", next=back), 303)
    try:
        action(SagaClient())
    except UnknownRun:
        return _page_error(404, f"There is no run with id {run_id!r}.")
    except InvalidInput as exc:
        return _render_run(run_id, 400, error=str(exc))
    except (InvalidTransition, BrokerUnavailable) as exc:
        return _render_run(run_id, 409 if isinstance(exc, InvalidTransition) else 503, error=str(exc))
    return redirect(url_for("pages.run_detail", run_id=run_id, done=what), 303)


# ---------------------------------------------------------------------------------------------- login


@pages.route("/login", methods=["GET", "POST"])
def login():
    if not _settings().api_token:
        abort(404)  # nothing to log in to: anyone may act
    target = security.safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("login.html", next=target, error=None)
    if not security.csrf_ok():
        return _page_error(403, "This form is out of date or was sent from another site. Reload the page and "
                                "try again.")
    wait = security.throttled()
    if wait:
        return (render_template("login.html", next=target,
                                error=f"Too many failed logins from this address: try again in {wait} s."),
                429, {"Retry-After": str(wait)})
    if not security.token_matches(request.form.get("token", "")):
        security.auth_failed("login_failed")
        return render_template("login.html", next=target, error="Wrong token."), 401
    sep = "&" if "?" in target else "?"
    return security.login(redirect(f"{target}{sep}done=login", 303))


@pages.post("/logout")
def logout():
    if not security.csrf_ok():
        return _page_error(403, "This form is out of date or was sent from another site.")
    return security.logout(redirect(url_for("pages.runs", done="logout"), 303))
