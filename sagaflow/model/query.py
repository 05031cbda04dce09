"""What an operator types to find runs or bound their age, parsed the same way by the HTTP API and the CLI:
a point in time (ISO 8601) and a duration (``90s``, ``15m``, ``12h``, ``30d``). Bad text is InvalidInput
with a message that says what is expected."""

from __future__ import annotations

import datetime as dt
import re

from sagaflow.errors import InvalidInput

# 2026-12-01, 2026-12-01T10:00, ...:00.123456, with Z or an offset (Python's own parser takes much more).
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
                   r"([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:?[0-9]{2})?)?")
_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, name: str) -> dt.datetime:
    """``2026-12-01`` (midnight UTC), ``2026-12-01T10:00``, ``...+02:00`` or ``...Z``: an aware datetime;
    a time without a zone is UTC."""
    shown = text if len(text) <= 40 else text[:40] + "..."
    try:
        value = dt.datetime.fromisoformat(text) if isinstance(text, str) and _TIME.fullmatch(text) else None
    except ValueError:
        value = None
    if value is None:
        raise InvalidInput(f"{name} must be an ISO 8601 date or time (2026-12-01, 2026-12-01T10:00:00Z), "
                           f"got {shown!r}")
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def parse_duration(text: str, name: str) -> dt.timedelta:
    """``90s``, ``15m``, ``12h`` or ``30d``: a positive whole number and one unit."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        shown = str(text) if len(str(text)) <= 40 else str(text)[:40] + "..."
        raise InvalidInput(f"{name} must be a duration such as 90s, 15m, 12h or 30d, got {shown!r}")
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
