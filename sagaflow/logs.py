"""Structured logs: one logfmt line per record (``level=info event=step_succeeded run_id=... step=...``).

Code logs with ``log.info("step_succeeded", extra={"run_id": ..., "step": ...})``: the message is the event
name and every extra field becomes a key. Quiet by default (WARNING); SAGAFLOW_LOG_LEVEL=INFO shows every
transition.
"""

from __future__ import annotations

import logging

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _quote(value) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        line = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


def setup_logging(level: str = "WARNING") -> None:
    """Send sagaflow's records to stderr as logfmt (idempotent)."""
    logger = logging.getLogger("sagaflow")
    logger.setLevel(level)
    if not any(getattr(h, "_sagaflow", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(LogfmtFormatter())
        handler._sagaflow = True
        logger.addHandler(handler)
    logger.propagate = False
