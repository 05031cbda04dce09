"""What a worker does with a task message it cannot handle: too deeply nested to decode or pickle whole, or
malformed so that Celery's main process raises while receiving it.

Entry checks (sagaflow/safejson.py) keep deep values out of the messages sagaflow publishes, but a message can
come from elsewhere: an older sagaflow, a direct publish, a result stored before the limit existed. Celery's
worker decodes each message in its *main* process and pickles the decoded arguments for its prefork pool:
pickling fails at about 450 levels of nesting (``RecursionError``, "Unrecoverable error": the main process
exits, the message goes back to the queue and kills the next worker too), and JSON decoding at about 990
(Celery logs "Can't decode message body" and drops the message; in the Redis transport's own envelope,
a header that deep kills the worker and loses the message).

So, in the worker's main process, before anything is decoded:

- ``strategy``, the Celery task strategy of every sagaflow task (``Task.Strategy``), measures the nesting of
  the raw JSON body and of the headers without recursion. Above ``message_depth_limit`` it cuts what is nested
  deeper (each such array or object becomes ``null``), marks the message with the header ``sagaflow_refused``
  (the reason) and logs ``message_refused`` (ERROR) naming the task, its id and the run. The message then goes
  the ordinary way, cheap to decode and pickle;
- ``guard_redis_transport`` does the same for a Redis envelope that JSON cannot decode for its depth (and logs
  and skips one that is not JSON at all);
- ``Consumer`` (Celery's ``worker_consumer``) catches whatever else a message makes the main process raise
  while receiving it (a task name that is a list, a body that is not ``[args, kwargs, embed]``...): logged as
  ``message_dropped`` and acknowledged, where Celery would exit ("Unrecoverable error").

In the pool, the task reads the mark (``refused``) and never uses the cut arguments: a step or compensation
claims its row and fails for good (``MessageRefused``, not retried), so the run compensates, or lands in
``compensation_failed``, through the ordinary SQL-guarded path; a generic task (errbacks, finish, the
sweeper) logs ``message_dropped`` and is acknowledged. Nothing is redelivered forever, nothing stays queued.

Cost on the hot path (measured on the 2-core CI machine): a message with no more brackets than the limit is
passed on after counting them (about 2 us with its headers); a longer one is measured properly, at about the
cost of decoding it once more (about 25 us for a 3 KB chain window, 25 ms for 1 MB with 60,000 brackets).
"""

from __future__ import annotations

import logging
import re
from itertools import accumulate
from queue import Empty

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.strategy import default as default_strategy

from sagaflow.errors import NonRetryableError

log = logging.getLogger("sagaflow.inbound")

HEADER = "sagaflow_refused"
# A message nests its values two levels down ([args, kwargs, embed]); the chain and errback signatures that
# ride along take about 7. The allowance covers both, so every message sagaflow publishes passes.
ENVELOPE_DEPTH = 10
# Above this, the main process cannot pickle the arguments for its pool (about 450 levels on CPython 3.11
# with the default recursion limit), whatever SAGAFLOW_JSON_MAX_DEPTH says.
HARD_MAX_DEPTH = 256


class MessageRefused(NonRetryableError):
    """The worker refused the task message: it was nested too deeply to handle (sagaflow/inbound.py)."""


def message_depth_limit(max_depth: int) -> int:
    """The deepest message a worker handles, for a value limit of ``max_depth`` (SAGAFLOW_JSON_MAX_DEPTH)."""
    return min(max_depth + ENVELOPE_DEPTH, HARD_MAX_DEPTH)


def refused(request) -> str | None:
    """The reason this delivery was refused (``request``: a task's ``self.request``), or None."""
    return getattr(request, HEADER, None)


# ------------------------------------------------------------------------------------- measuring JSON text

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
for _c in b"[{":
    _STEP[_c] = 1
for _c in b"]}":
    _STEP[_c] = -1


def text_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, brackets inside strings ignored. Linear, at C
    speed where it matters (no parsing, no recursion)."""
    # Without a backslash every quote opens or closes a string: what lies outside them is every other piece.
    outside = _STRING.sub(b"", raw) if b"\\" in raw else b"".join(raw.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def too_deep(raw: bytes, limit: int) -> bool:
    if raw.count(b"[") + raw.count(b"{") <= limit:  # cannot nest deeper than it has brackets
        return False
    return text_depth(raw) > limit


def prune_text(raw: bytes, limit: int) -> bytes:
    """JSON text with every array or object nested deeper than ``limit`` replaced by ``null``."""
    out = []
    pos: int | None = 0  # where the text still to copy starts; None while inside a cut subtree
    depth = 0
    for token in _TOKEN.finditer(raw):
        char = raw[token.start()]
        if char == 0x22:  # a string: copied (or cut) with the text around it
            continue
        if char in b"[{":
            depth += 1
            if depth == limit + 1:
                out.append(raw[pos:token.start()])
                out.append(b"null")
                pos = None
        else:
            if depth == limit + 1:
                pos = token.end()
            depth -= 1
    if pos is not None:
        out.append(raw[pos:])
    return b"".join(out)


def value_depth(value, limit: int) -> int:
    """Nesting of a decoded value, measured without recursion; stops counting once past ``limit``."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, (list, tuple)):
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth) for child in item)
    return deepest


# --------------------------------------------------------------------------------------- the task strategy

def strategy(task, app, consumer, **kwargs):
    """Celery's default strategy behind a depth check of each message (see the module's docstring)."""
    from sagaflow.app import get_settings

    handle = default_strategy(task, app, consumer, **kwargs)
    limit = message_depth_limit(get_settings().json_max_depth)

    def task_message_handler(message, body, ack, reject, callbacks, **options):
        try:
            if body is None:
                check_message(message, limit)
            elif value_depth(body, limit) > limit:  # protocol 1: decoded before any strategy runs
                _log_refused(message.headers or {}, body.get("kwargs") if isinstance(body, dict) else None,
                             f"a protocol 1 message nested deeper than {limit} levels", "dropped")
                message.ack()
                return None
        except Exception:  # noqa: BLE001 - the check must never be what kills the worker
            log.exception("message_check_failed", extra={"task": task.name})
        return handle(message, body, ack, reject, callbacks, **options)

    return task_message_handler


def check_message(message, limit: int) -> None:
    """Mark and cut a protocol 2 message (raw JSON body) that is nested deeper than ``limit``."""
    reasons = []
    headers = message.headers
    if isinstance(headers, dict) and value_depth(headers, limit) > limit:
        for key, value in list(headers.items()):
            if value_depth(value, limit) > limit:
                headers[key] = None
                reasons.append(f"its header {key!r}")
    raw = message.body
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if isinstance(raw, bytes) and "json" in (message.content_type or "") and too_deep(raw, limit):
        message.body = prune_text(raw, limit)
        message._decoded_cache = None
        reasons.append("its arguments")
    if reasons:
        reason = (f"the task message was refused: {' and '.join(reasons)} nested deeper than {limit} levels "
                  f"(SAGAFLOW_JSON_MAX_DEPTH plus {ENVELOPE_DEPTH} for the message itself, at most "
                  f"{HARD_MAX_DEPTH})")
        headers[HEADER] = reason
        kwargs = None
        try:
            kwargs = message.decode()[1]
        except Exception:  # noqa: BLE001 - Celery reports an undecodable body on its own
            pass
        _log_refused(headers, kwargs, reason, "the task fails without running (a step: the run compensates)")


def _log_refused(headers: dict, kwargs, reason: str, next_: str) -> None:
    run_id = kwargs.get("run_id") if isinstance(kwargs, dict) else None
    log.error("message_refused", extra={
        "task": _short(headers.get("task")), "task_id": _short(headers.get("id")),
        "run_id": _short(run_id), "reason": reason, "next": next_,
    })


def _short(value):
    return value if value is None or (isinstance(value, str) and len(value) <= 200) else repr(value)[:200]


# ------------------------------------------------------------------------------------------ the consumer

class Consumer(CeleryConsumer):
    """Celery's consumer (``worker_consumer``), but a message that makes the main process raise while it is
    received (before a task runs) is dropped, logged, instead of ending the worker: Celery lets such an error
    out of its event loop ("Unrecoverable error"), and the message, back in the queue, ends the next worker
    too. Seen with shallow messages: a header ``task`` or ``id`` that is a list, a ``timelimit`` that is not a
    pair, a body that is not ``[args, kwargs, embed]``. Connection and channel errors still go to Celery,
    which reconnects."""

    def create_task_handler(self, *args, **kwargs):
        handle = super().create_task_handler(*args, **kwargs)
        recoverable = tuple(self.connection_errors) + tuple(self.channel_errors)

        def on_task_received(message):
            try:
                return handle(message)
            except recoverable:
                raise
            except Exception as exc:  # noqa: BLE001 - nothing a message holds may end the worker
                drop_message(message, f"the worker could not receive it: {type(exc).__name__}: {exc}")
                return None

        return on_task_received


def drop_message(message, reason: str) -> None:
    """Log why, and acknowledge the message so no worker gets it again."""
    headers = message.headers if isinstance(getattr(message, "headers", None), dict) else {}
    log.error("message_dropped", extra={"task": _short(headers.get("task")), "task_id": _short(headers.get("id")),
                                        "reason": reason[:500], "next": "acknowledged: no worker gets it again"})
    try:
        if not message.acknowledged:
            message.ack()
    except Exception as exc:  # noqa: BLE001
        log.error("message_not_acknowledged", extra={"task_id": _short(headers.get("id")), "error": repr(exc)[:200]})


# ---------------------------------------------------------------------------------- the Redis transport

def guard_redis_transport(limit: int) -> None:
    """kombu's Redis transport decodes each envelope (headers, properties, the base64 body) with ``json.loads``
    in the worker's main process, outside Celery's error handling: an envelope too deep to decode, or not JSON
    at all, kills the worker (the popped message is lost). Decode a deep one cut to ``limit`` levels and mark it,
    so the task strategy and the task refuse it like any other; log one that is not JSON and go on (``Empty``:
    what the transport raises when there is no message)."""
    import kombu.transport.redis as transport

    if getattr(transport.loads, "sagaflow_guard", False):
        return
    original = transport.loads

    def loads(text, *args, **kwargs):
        try:
            return original(text, *args, **kwargs)
        except ValueError as exc:  # not JSON at all: the item is off the list already; nothing can deliver it
            log.error("message_dropped", extra={"reason": f"the broker's envelope is not JSON: {exc}",
                                                "envelope": repr(text[:200]), "next": "nothing: it is lost"})
            raise Empty() from None
        except RecursionError:
            raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
            envelope = original(prune_text(raw, limit).decode("utf-8", "surrogatepass"), *args, **kwargs)
            reason = (f"the task message was refused: its envelope was nested deeper than JSON can decode "
                      f"(cut to {limit} levels)")
            if isinstance(envelope, dict) and isinstance(envelope.get("headers"), dict):
                envelope["headers"][HEADER] = reason
                _log_refused(envelope["headers"], None, reason, "the task fails without running")
            else:
                _log_refused({}, None, reason, "restored cut")
            return envelope

    loads.sagaflow_guard = True  # type: ignore[attr-defined]  # mypy has no function attributes
    transport.loads = loads  # type: ignore[assignment]  # kombu types it by its 4 parameters; this forwards them all
