"""Structured logs: one logfmt line per record (``level=info event=step_succeeded run_id=... step=...``).

Code logs with ``log.info("step_succeeded", extra={"run_id": ..., "step": ...})``: the message is the event
name and every extra field becomes a key. Quiet by default (WARNING); SAGAFLOW_LOG_LEVEL=INFO shows every
transition.

Library code only names its loggers (``sagaflow.*``): no handler, no ``propagate=False``, so a host
application's ``logging.basicConfig``/``dictConfig`` receives every record. The entry points (the CLI, the
worker, the web app) call :func:`setup_logging`, which sets the ``sagaflow`` logger's level and, only when
nobody configured logging yet (the root logger has no handler), gives the root logger one stderr handler in
SAGAFLOW_LOG_FORMAT: ``logfmt`` (default) or ``json`` (one object per line).

Values come from outside (a request path, a run's input, a step's error), so a record is always one line
that says what it holds: a value with a space, ``=``, a quote, a backslash or a control character is quoted,
its quotes and backslashes escaped and every control character written as an escape (``\\r``, ``\\x00``,
``\\x1b``, ``\\u2028``...). A reader decodes a quoted value with those backslash escapes (``\\xNN``,
``\\uNNNN``, ``\\n``, ``\\r``, ``\\t``, ``\\"``, ``\\\\``); an unquoted value is taken as it stands.
:func:`escape_controls` is the same escaping of controls for any text shown to a person.
"""

from __future__ import annotations

import json
import logging
import re

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# What must never reach a log line or a terminal raw: C0 controls (NUL, TAB, LF, CR, ESC...), DEL, the C1
# controls (U+0080..U+009F: NEL, CSI...), the Unicode line and paragraph separators (str.splitlines and
# many log viewers break lines there), and lone surrogates (they cannot be written as UTF-8 at all).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``): one
    line, and nothing a terminal would act on. Backslashes are left as they are (for people, not parsers)."""
    return CONTROL.sub(lambda m: _escape_char(m.group()), text)


_QUOTED = re.compile('[\\\\"]|' + CONTROL.pattern)
_NEEDS_QUOTES = re.compile('[ "=\\\\]|' + CONTROL.pattern)
_KEY_BAD = re.compile('[ "=\\\\]|' + CONTROL.pattern)


def _quote(value) -> str:
    text = str(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        text = '"' + _QUOTED.sub(lambda m: "\\" + m.group() if m.group() in '\\"' else _escape_char(m.group()),
                                 text) + '"'
    return text


def _key(key) -> str:
    """Keys come from code, but a record's ``extra`` could be built from data: a key never breaks the line
    or forges another field (space, ``=``, quote, backslash and controls become ``\\xNN``)."""
    return _KEY_BAD.sub(lambda m: _escape_char(m.group()), str(key)) or '""'


class _SagaflowHandler(logging.StreamHandler):
    """The stderr handler setup_logging installs on the root logger, so a second call does not add another."""


def _fields(formatter: logging.Formatter, record: logging.LogRecord) -> dict:
    """The fields of one record, the same for every format: time, level, logger, event, then the extras."""
    fields = {
        "ts": formatter.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
    return fields


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(self, record)
        line = " ".join(f"{_key(k)}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the same fields as the logfmt lines (ASCII, so controls are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(self, record)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str, ensure_ascii=True)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = {"logfmt": LogfmtFormatter, "json": JsonFormatter}


def setup_logging(level: str = "WARNING", fmt: str = "logfmt") -> None:
    """For entry points only (the CLI, the worker, the web app). Sets the ``sagaflow`` logger's level; when the
    process has no logging configuration yet (no handler on the root logger), adds one stderr handler in
    ``fmt`` to the root logger. A host that configured logging itself is left alone: its handlers receive
    sagaflow's records through propagation. Idempotent. A level or format that is not known is a ValueError
    naming SAGAFLOW_LOG_LEVEL or SAGAFLOW_LOG_FORMAT."""
    if isinstance(level, str) and level.upper() not in logging.getLevelNamesMapping():
        raise ValueError(f"SAGAFLOW_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"SAGAFLOW_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {fmt!r}")
    logger = logging.getLogger("sagaflow")
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _SagaflowHandler)]
    if ours:
        for handler in ours:  # the format may have changed (configure() again)
            handler.setFormatter(FORMATS[fmt]())
        return
    if root.handlers:
        return  # the host configured logging: its choice
    handler = _SagaflowHandler()
    handler.setFormatter(FORMATS[fmt]())
    root.addHandler(handler)
