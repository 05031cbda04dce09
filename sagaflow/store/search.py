"""The WHERE clause of a run search (status, saga, start time, idempotency key, input fields), written so
that PostgreSQL answers it from indexes: ``created_at`` and the key have B-tree indexes, and the input a GIN
index on ``(input::jsonb) jsonb_path_ops`` (migration 0004) that serves the containment operator ``@>``.

An input field compares by JSON equality, except that a string value also matches a number, a boolean or
null written the same way (``{"order": "17"}`` finds ``{"order": 17}``): the HTTP API and the CLI pass
every value as text."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import String, and_, cast, func, literal, or_
from sqlalchemy.dialects.postgresql import JSONB

from sagaflow.store import tables as t


def _alternatives(value) -> list:
    """The JSON values a field may hold to match ``value``."""
    if not isinstance(value, str):
        return [value]
    found: list = [value]
    try:
        parsed = json.loads(value)
    except ValueError:
        return found
    if parsed is None or isinstance(parsed, (bool, int, float)):
        found.append(parsed)
    return found


def _pg_field(field: str, value):
    doc = cast(t.runs.c.input, JSONB)
    return or_(*(doc.op("@>")(cast(literal(json.dumps({field: v}), String), JSONB)) for v in _alternatives(value)))


def _sqlite_field(field: str, value):
    path = "$." + json.dumps(field)  # a quoted key: any characters
    extracted = func.json_extract(t.runs.c.input, path)
    kind = func.json_type(t.runs.c.input, path)
    options = []
    for v in _alternatives(value):
        if v is None:
            options.append(kind == "null")
        elif isinstance(v, bool):
            options.append(kind == ("true" if v else "false"))
        elif isinstance(v, (int, float)):
            options.append(and_(kind.in_(("integer", "real")), extracted == v))
        elif isinstance(v, str):
            options.append(and_(kind == "text", extracted == v))
        else:  # an object or array: compare the minified JSON texts
            options.append(and_(kind.in_(("object", "array")),
                                extracted == func.json(json.dumps(v, separators=(",", ":")))))
    return or_(*options)


def search_conditions(dialect: str, *, status: str | None = None, saga: str | None = None,
                      since: dt.datetime | None = None, until: dt.datetime | None = None,
                      idempotency_key: str | None = None, input: dict | None = None) -> list:
    r = t.runs.c
    conditions = []
    if status:
        conditions.append(r.status == status)
    if saga:
        conditions.append(r.saga == saga)
    if since is not None:
        conditions.append(r.created_at >= since)
    if until is not None:
        conditions.append(r.created_at < until)
    if idempotency_key is not None:
        conditions.append(r.idempotency_key == idempotency_key)
    for field, value in (input or {}).items():
        conditions.append(_pg_field(field, value) if dialect == "postgresql" else _sqlite_field(field, value))
    return conditions
