"""What JSON may enter sagaflow, checked once at every entry: run input, step results, signal payloads,
child inputs, HTTP bodies, CLI options. Also the rule for the plain strings that name things (run ids,
idempotency keys).

Why limits at all: a value nested a few hundred levels deep passes ``json.dumps`` but makes the worker's main
process die pickling it for its pool (``RecursionError``), on every worker that takes the message, and makes
every page that lists the run answer 500. A lone surrogate or a NUL in a string is stored, then cannot be
encoded as UTF-8 when shown. So depth, size and strings are checked *before* anything is written or
published, without recursion (the check must not fail the way it guards against).

Every refusal is ``InvalidInput`` (a ``ValueError``) naming the limit and its setting.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from sagaflow.errors import InvalidInput

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class JsonLimits:
    """``max_depth``: nesting of arrays and objects (a scalar is depth 0, ``[]`` depth 1).
    ``max_bytes``: the size of the value as compact UTF-8 JSON."""

    max_depth: int = DEFAULT_MAX_DEPTH
    max_bytes: int = DEFAULT_MAX_BYTES


DEFAULT_LIMITS = JsonLimits()

# A lone surrogate (U+D800..U+DFFF) or a NUL: Python strings can hold them, UTF-8 and PostgreSQL cannot.
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def check_text(value: str, what: str) -> str:
    """Refuse a string with a NUL or a lone surrogate: it cannot be stored or shown."""
    found = _BAD_CHARS.search(value)
    if found:
        kind = "a NUL character" if found.group() == "\x00" else "a lone surrogate (not valid Unicode)"
        raise InvalidInput(f"{what} contains {kind} at position {found.start()}")
    return value


def ensure_json(value: Any, what: str, limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """``value`` as plain JSON data (tuples become lists), or ``InvalidInput`` naming ``what``: not JSON
    (a set, an object, NaN or an infinity), nested deeper than ``limits.max_depth``, larger than
    ``limits.max_bytes``, or holding a string with a NUL or a lone surrogate (keys included)."""
    _walk(value, what, limits)
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not JSON-serializable: {exc}") from None
    _check_size(len(text.encode("utf-8")), what, limits)  # _walk refused lone surrogates
    return json.loads(text)


def loads(raw: bytes | str, what: str, limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """Parse JSON text under the same limits: bytes must be UTF-8. The nesting is measured on the text
    before parsing, so a body of a million brackets is refused, not parsed."""
    if isinstance(raw, bytes):
        _check_size(len(raw), what, limits)
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    else:
        _check_size(len(raw.encode("utf-8", "surrogatepass")), what, limits)
    depth = text_depth(raw)
    if depth > limits.max_depth:
        raise _too_deep(what, limits)
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as exc:  # JSONDecodeError, and NaN/Infinity from _refuse_constant
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    _walk(value, what, limits)  # "\ud800" escapes and "\u0000" decode to the strings refused here
    return value


def text_depth(text: str) -> int:
    """The deepest nesting of brackets outside strings in JSON text (linear; no parsing, no recursion)."""
    stripped = _STRINGS.sub("", text)
    depth = deepest = 0
    for bracket in _BRACKETS.findall(stripped):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _walk(value: Any, what: str, limits: JsonLimits) -> None:
    """Depth, strings and numbers of a Python value, with an explicit stack (no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            check_text(item, what)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidInput(f"{what} is not JSON-serializable: {item} is not a JSON number")
        elif isinstance(item, (dict, list, tuple)):
            if depth + 1 > limits.max_depth:
                raise _too_deep(what, limits)
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str):
                        check_text(key, what)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _too_deep(what: str, limits: JsonLimits) -> InvalidInput:
    return InvalidInput(f"{what} is nested deeper than {limits.max_depth} levels of arrays and objects "
                        f"(SAGAFLOW_JSON_MAX_DEPTH)")


def _check_size(size: int, what: str, limits: JsonLimits) -> None:
    if size > limits.max_bytes:
        raise InvalidInput(f"{what} is {size} bytes of JSON, over the limit of {limits.max_bytes} "
                           f"(SAGAFLOW_JSON_MAX_BYTES)")
