"""How runs are shown: the API's JSON, Flower links, and the timeline of the status page."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from urllib.parse import quote

from sagaflow.model.definition import Saga
from sagaflow.model.events import COMPENSATION_ENDS, EventKind
from sagaflow.model.snapshots import Run, StepState
from sagaflow.model.status import HELD_STEP_STATUSES, UNDOING_RUN_STATUSES, StepStatus

S = StepStatus
# How a started step's bar is coloured: its own status, or "succeeded" for one that went on to be undone.
STEP_BAR_STATUSES = (S.RUNNING, S.FAILED, S.SKIPPED, S.PENDING, S.WAITING, S.FAILED_BEST_EFFORT)
FAILED_STEP = (S.FAILED, S.FAILED_BEST_EFFORT)  # its error is shown on its bar
OPEN_STEP = (S.RUNNING, S.WAITING)  # its bar has no end yet


def flower_link(flower_url: str, task_id: str | None) -> str | None:
    """Flower's page for a Celery task (``SAGAFLOW_FLOWER_URL`` + ``/task/<id>``), or None."""
    if not flower_url or not task_id:
        return None
    return f"{flower_url}/task/{quote(task_id, safe='')}"


def step_json(step: StepState, flower_url: str) -> dict:
    data = step.to_dict()
    data["flower_url"] = flower_link(flower_url, step.task_id)
    data["compensation_flower_url"] = flower_link(flower_url, step.compensation_task_id)
    return data


def run_json(run: Run, flower_url: str = "", history: bool = True) -> dict:
    data = run.to_dict(history=False)
    data["duration_seconds"] = duration(run)
    if history:
        data["steps"] = [step_json(s, flower_url) for s in run.steps]
        data["events"] = [e.to_dict() for e in run.events]
    return data


PREVIEW_CHARS = 200  # of a run's input in a list item (compact JSON text)
PRETTY_CHARS = 16 * 1024  # of any JSON value the run page pretty-prints
TEXT_CHARS = 4 * 1024  # of an error message or an event detail shown on the run page


_UNSHOWABLE = re.compile("[\ud800-\udfff\x00]")  # cannot be sent as UTF-8 / in HTML: shown as escapes


def showable(text: str) -> str:
    """``text`` with lone surrogates and NULs written as ``\\uXXXX``: a value stored before the input
    checks must not make its page fail to encode."""
    return _UNSHOWABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def run_list_json(run: Run) -> dict:
    """A run as a list item: no steps or events, and instead of the input a preview of at most
    PREVIEW_CHARS characters of its compact JSON, with ``input_truncated`` saying whether it was cut."""
    data = run_json(run, history=False)
    text, truncated = capped_json(data.pop("input", None), PREVIEW_CHARS, indent=None)
    data["input_preview"] = text
    data["input_truncated"] = truncated
    return data


def capped_json(value, limit: int = PRETTY_CHARS, indent: int | None = 2) -> tuple[str, bool]:
    """JSON text of ``value``, at most ``limit`` characters, and whether it was cut. Encoded piece by piece
    and stopped at the limit, so a value whose indentation would swell it (deep, wide input) costs no more
    than the limit."""
    encoder = json.JSONEncoder(indent=indent, ensure_ascii=False, sort_keys=True, default=str,
                               separators=(",", ": ") if indent is not None else (",", ":"))
    parts, size = [], 0
    try:
        for piece in encoder.iterencode(value):
            parts.append(piece)
            size += len(piece)
            if size > limit:
                return showable("".join(parts)[:limit]), True
    except (ValueError, RecursionError):  # not JSON after all (stored before the checks): say so
        return "(not shown: not plain JSON)", True
    return showable("".join(parts)), False


def capped_text(value, limit: int = TEXT_CHARS) -> str:
    """A message or detail as shown on the page: at most ``limit`` characters (JSON for anything not a
    string: never ``str()`` of a nested value, which recurses)."""
    text = showable(value) if isinstance(value, str) else capped_json(value, limit + 1, indent=None)[0]
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def saga_json(saga: Saga) -> dict:
    return {
        "name": saga.name,
        "version": saga.version,
        "steps": [
            {"name": s.name, "kind": str(s.kind), "has_compensation": s.compensate is not None or s.runs_children,
             "timeout": s.timeout, "queue": s.queue, "max_attempts": s.retry.max_attempts,
             "compensation_max_attempts": s.compensation_retry.max_attempts if s.compensate else None,
             "best_effort": s.best_effort, "non_atomic": s.non_atomic, "pivot": s.pivot, "group": s.group,
             "signal": s.signal, "payload_required": s.payload_required, "child_saga": s.child_saga}
            for s in saga.steps
        ],
    }


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def duration(run: Run) -> float | None:
    """Seconds from creation to the final status (or to now, for a live run)."""
    end = run.finished_at or (None if run.is_final else now())
    return round((end - run.created_at).total_seconds(), 3) if end else None


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"


def age(when: dt.datetime) -> str:
    return human_seconds(max((now() - when).total_seconds(), 0.0)) + " ago"


# ---------------------------------------------------------------------------------------------- timeline


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


@dataclass
class BarError:
    """An error under a bar: its text, and the traceback recorded with that attempt (if any)."""

    text: str
    traceback: str | None = None

    @property
    def where(self) -> str | None:
        """``file:line in function`` of the innermost frame of the traceback."""
        frames = _FRAME.findall(self.traceback or "")
        if not frames:
            return None
        path, line, function = frames[-1]
        short = "/".join(path.replace("\\", "/").split("/")[-2:])
        return f"{short}:{line} in {function}"


@dataclass
class Bar:
    """One action or compensation (one round of it) of a run, placed on the run's time axis (left and width
    in percent)."""

    kind: str  # "step" or "compensation"
    index: int
    name: str
    status: str
    attempts: int
    start: dt.datetime
    end: dt.datetime | None  # None: still going
    errors: list[BarError]
    task_id: str | None
    flower_url: str | None
    left: float = 0.0
    width: float = 0.0
    round: int = 1  # a compensation's round: 2 and on after an operator's retry
    rounds: int = 1  # how many rounds the compensation had
    first_attempt: int | None = None  # the attempts of this round, by their numbers
    last_attempt: int | None = None
    group: int | None = None  # a parallel group's first step index
    step: StepState | None = None

    @property
    def seconds(self) -> float | None:
        return (self.end - self.start).total_seconds() if self.end else None

    @property
    def held(self) -> bool:
        """Still held by a worker: the page shows its elapsed time, lease and worker."""
        return self.end is None and self.status in {s.value for s in HELD_STEP_STATUSES}


class _Round:
    def __init__(self, start: dt.datetime) -> None:
        self.start = start
        self.end: dt.datetime | None = None
        self.status = S.COMPENSATING.value
        self.attempts: list[int] = []
        self.errors: list[BarError] = []


def _error(detail: dict | None, prefix: str) -> BarError:
    detail = detail or {}
    return BarError(f"{prefix}{detail.get('error')}", detail.get("traceback"))


def timeline(run: Run, flower_url: str = "") -> tuple[list[Bar], list[StepState]]:
    """The bars in time order, and the steps that never started (shown after them). A compensation has one
    bar per round (an operator's retry starts a new one), each with its own attempts and errors."""
    bars: list[Bar] = []
    step_errors: dict[str | None, list[BarError]] = {}
    comp_rounds: dict[str | None, list[_Round]] = {}
    for e in run.events:
        detail = e.detail or {}
        if e.kind == EventKind.STEP_RETRIED and detail.get("error"):
            step_errors.setdefault(e.step, []).append(_error(detail, f"attempt {detail.get('attempt')}: "))
        elif e.kind in (EventKind.STEP_FAILED, EventKind.STEP_FAILED_BEST_EFFORT) and detail.get("error"):
            step_errors.setdefault(e.step, []).append(_error(detail, "failed: "))
        elif e.kind == EventKind.COMPENSATION_STARTED:
            rounds = comp_rounds.setdefault(e.step, [])
            if not rounds or rounds[-1].end is not None:
                rounds.append(_Round(e.at))
            if isinstance(detail.get("attempt"), int):
                rounds[-1].attempts.append(detail["attempt"])
        elif e.kind == EventKind.COMPENSATION_RETRIED and comp_rounds.get(e.step):
            current = comp_rounds[e.step][-1]
            current.errors.append(_error(detail, f"attempt {detail.get('attempt')}: "))
        elif e.kind in COMPENSATION_ENDS and comp_rounds.get(e.step) and comp_rounds[e.step][-1].end is None:
            current = comp_rounds[e.step][-1]
            current.end = e.at
            if e.kind == EventKind.COMPENSATION_SUCCEEDED:
                current.status = S.COMPENSATED.value
            else:
                current.status = S.COMPENSATION_FAILED.value
                last = f" (attempt {max(current.attempts)})" if current.attempts else ""
                current.errors.append(_error(detail, f"failed{last}: "))
    not_started = []
    for s in run.steps:
        if s.started_at is None:
            not_started.append(s)
            continue
        step_status = s.status if s.status in STEP_BAR_STATUSES else S.SUCCEEDED.value
        errors = list(step_errors.get(s.name, []))
        if s.error and s.status in FAILED_STEP and not any(e.text.startswith("failed: ") for e in errors):
            errors.append(BarError(f"failed: {s.error}"))  # recorded without an event (a plain run)
        bars.append(Bar("step", s.index, s.name, step_status, s.attempts, s.started_at,
                        s.finished_at if s.status not in OPEN_STEP else None, errors, s.task_id,
                        flower_link(flower_url, s.task_id), group=s.group, step=s))
        rounds = comp_rounds.get(s.name, [])
        for n, r in enumerate(rounds, start=1):
            first, last = (min(r.attempts), max(r.attempts)) if r.attempts else (None, None)
            count = last - first + 1 if first is not None and last is not None else s.compensation_attempts
            bars.append(Bar("compensation", s.index, s.name, r.status, count, r.start, r.end, r.errors,
                            s.compensation_task_id, flower_link(flower_url, s.compensation_task_id), round=n,
                            rounds=len(rounds), first_attempt=first, last_attempt=last, group=s.group, step=s))
    bars.sort(key=lambda b: (b.start, 0 if b.kind == "step" else 1, b.index if b.kind == "step" else -b.index))
    if bars:
        axis = TimeAxis(bars, run.finished_at)
        for b in bars:
            b.left = axis.at(b.start)
            b.width = round(max(axis.at(b.end or now()) - b.left, 0.4), 2)
            b.left = min(b.left, 100 - b.width)
    return bars, not_started


class TimeAxis:
    """Where a moment falls on the run's time axis, in percent. A long pause with nothing running (a gate
    waiting for hours, a retry's backoff) is drawn short, so the bars around it stay readable: a gap over
    PAUSE_SHARE of the run and over PAUSE_MIN seconds counts as PAUSE_DRAWN of the run's busy time."""

    PAUSE_SHARE, PAUSE_MIN, PAUSE_DRAWN = 0.2, 5.0, 0.1

    def __init__(self, bars: list[Bar], finished_at: dt.datetime | None) -> None:
        spans = sorted((b.start, b.end or now()) for b in bars)
        t0 = spans[0][0]
        t1 = max([end for _, end in spans] + [finished_at or t0])
        total = max((t1 - t0).total_seconds(), 0.001)
        merged: list[list[dt.datetime]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        gaps = [(a[1], b[0]) for a, b in zip(merged, merged[1:], strict=False)]
        if finished_at and finished_at > merged[-1][1]:
            gaps.append((merged[-1][1], finished_at))
        self.pauses = [(a, b) for a, b in gaps
                       if (b - a).total_seconds() > max(self.PAUSE_MIN, self.PAUSE_SHARE * total)]
        busy = total - sum((b - a).total_seconds() for a, b in self.pauses)
        self.drawn = max(busy * self.PAUSE_DRAWN, 0.001)  # seconds each long pause counts as
        self.t0 = t0
        self.length = max(busy + self.drawn * len(self.pauses), 0.001)

    def at(self, moment: dt.datetime) -> float:
        seconds = (moment - self.t0).total_seconds()
        for a, b in self.pauses:
            if moment >= b:
                seconds -= (b - a).total_seconds() - self.drawn
            elif moment > a:
                seconds -= (moment - a).total_seconds() * (1 - self.drawn / (b - a).total_seconds())
        return round(min(max(seconds / self.length * 100, 0.0), 100.0), 2)


AWAITING_UNDO = "awaiting_undo"


def awaiting_undo(run: Run) -> list[StepState]:
    """The completed steps a compensating or compensation_failed run has still to undo, latest first."""
    if run.status not in {s.value for s in UNDOING_RUN_STATUSES}:
        return []
    todo = [s for s in run.steps if s.has_compensation and s.status == S.SUCCEEDED.value]
    return sorted(todo, key=lambda s: -s.index)


def operator_events(run: Run) -> list:
    """The events an operator (or a parent run) caused, with who asked: for the timeline's audit list."""
    kinds = (EventKind.CANCEL_REQUESTED, EventKind.RETRY_REQUESTED, EventKind.SIGNAL_RECEIVED,
             EventKind.RUN_RESOLVED, EventKind.RUN_RESTARTED, EventKind.DEADLINE_PASSED, EventKind.CANCEL_OVERRULED)
    return [e for e in run.events if e.kind in kinds]
