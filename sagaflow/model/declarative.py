"""Declarative sagas: a YAML file names the steps' actions and compensations by *handler* name.

Code registers plain functions under a name:

    from sagaflow import handler

    @handler("ingest")
    def ingest_upload(ctx): ...

    @handler                        # registered as "delete_uploaded_file"
    def delete_uploaded_file(ctx): ...

and a file (SAGAFLOW_SAGA_FILES) assembles sagas from those names:

    sagas:
      - name: ingest_document
        version: 1
        defaults: {retry: {kind: exponential, max_attempts: 3}, timeout: 60}
        steps:
          - {action: ingest, compensation: delete_uploaded_file, retry: {kind: fixed, initial_interval: 0.5}}
          - {name: publish, action: expose}

The whole file is checked before anything is registered: unknown keys, wrong types, duplicate keys,
duplicate step names, a (name, version) that is already registered, and handlers nobody registered are
refused with a ``SagaFileError`` that names the file, the line, the saga, the step and the handler.
A valid file registers its sagas in the ordinary registry, so the compiler and runtime treat them exactly
like sagas written in Python. Loading the same file again is a no-op.
"""

from __future__ import annotations

import difflib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from sagaflow.errors import DefinitionError, UnknownSaga
from sagaflow.model.definition import (
    NAME_PATTERN,
    Action,
    Parallel,
    Registry,
    RetryPolicy,
    Saga,
    Step,
)
from sagaflow.model.definition import (
    registry as default_registry,
)

# ---------------------------------------------------------------------------------------------- handlers


class HandlerRegistry:
    """Functions that saga files may name, by handler name."""

    def __init__(self) -> None:
        self._handlers: dict[str, Action] = {}

    def register(self, name: str, fn: Action) -> Action:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise DefinitionError(f"handler name {name!r} must be an identifier (letters, digits, underscore)")
        if not callable(fn):
            raise DefinitionError(f"handler {name!r} must be callable, got {fn!r}")
        existing = self._handlers.get(name)
        if existing is not None and existing is not fn and not _same_function(existing, fn):
            raise DefinitionError(
                f"handler {name!r} is already registered by {_where(existing)}; {_where(fn)} cannot take the name"
            )
        self._handlers[name] = fn
        return fn

    def get(self, name: str) -> Action | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def remove(self, name: str) -> None:
        """Forget a handler (for tests)."""
        self._handlers.pop(name, None)


def _where(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _same_function(a: Any, b: Any) -> bool:
    # The same function defined again (its module reloaded, say): not a clash. Two lambdas are never "the same".
    qualname = getattr(a, "__qualname__", None)
    return qualname is not None and "<lambda>" not in qualname and _where(a) == _where(b)


handlers = HandlerRegistry()


def handler(name: str | Callable | None = None, *, registry: HandlerRegistry | None = None):
    """Decorator: register a function under a handler name, for saga files to name.

    ``@handler`` uses the function's own name; ``@handler("ingest")`` gives another. The function is
    returned unchanged, so it stays usable in Python sagas too.
    """
    target = registry or handlers
    if callable(name):
        return target.register(name.__name__, name)

    def register(fn: Action) -> Action:
        return target.register(name if isinstance(name, str) and name else getattr(fn, "__name__", ""), fn)

    return register


# ---------------------------------------------------------------------------------------------- errors


class SagaFileError(DefinitionError):
    """A saga file is invalid. The message names the file and, where they are known, the line, the saga,
    the step and the handler; the same facts are attributes for callers that want them."""

    def __init__(self, problem: str, *, path: str | Path, line: int | None = None, saga: str | None = None,
                 version: int | None = None, step: str | None = None, handler: str | None = None) -> None:
        self.problem = problem
        self.path = str(path)
        self.line = line
        self.saga = saga
        self.version = version
        self.step = step
        self.handler = handler
        where = self.path + (f":{line}" if line else "")
        context = []
        if saga is not None:
            context.append(f"saga {saga!r}" + (f" version {version}" if version is not None else ""))
        if step is not None:
            context.append(f"step {step!r}")
        super().__init__(f"{where}: {', '.join(context) + ': ' if context else ''}{problem}")


# ---------------------------------------------------------------------------------------------- YAML with lines


class _Map(dict):
    """A YAML mapping that remembers the line of itself and of each of its keys."""

    line: int = 0
    key_lines: dict


class _List(list):
    """A YAML list that remembers the line of itself and of each item (scalars have no lines of their own)."""

    line: int = 0
    item_lines: list


class _BadKey(Exception):
    """A key that repeats, or that is not a string, with its line."""

    def __init__(self, problem: str, line: int) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, line


class _Loader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) that records lines and refuses duplicate keys, which plain PyYAML
    silently resolves by keeping the last one: a second `retry:` would quietly win."""


def _key(loader: _Loader, key_node: yaml.Node) -> tuple[str, int]:
    key = loader.construct_object(key_node, deep=True)
    line = key_node.start_mark.line + 1
    if not isinstance(key, str):
        raise _BadKey(f"keys must be strings, got {_type_name(key)} {key!r}", line)
    return key, line


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    own: set[str] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with `<<: *anchor` may be overridden by the mapping's own keys
        key, line = _key(loader, key_node)
        if key in own:
            raise _BadKey(f"duplicate key {key!r}", line)
        own.add(key)
    loader.flatten_mapping(node)  # merged keys first, then the mapping's own: the later one wins
    result = _Map()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key, line = _key(loader, key_node)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_list(loader: _Loader, node: yaml.SequenceNode) -> _List:
    result = _List(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_list)


# ---------------------------------------------------------------------------------------------- schema

FILE_KEYS = {"sagas"}
SAGA_KEYS = {"name", "version", "description", "defaults", "steps", "deadline", "max_concurrent_runs"}
STEP_OPTIONS = {"retry", "compensation_retry", "timeout", "compensation_timeout", "lease", "queue"}
STEP_FLAGS = ("best_effort", "non_atomic", "pivot")
STEP_LIMITS = ("concurrency", "rate_limit")  # a step's own: not in defaults (a shared limit is the step's)
STEP_KEYS = {"name", "action", "compensation", "description", *STEP_FLAGS, *STEP_LIMITS} | STEP_OPTIONS
GATE_KEYS = {"gate", "signal", "timeout", "compensation", "description", "payload_required"}
CHILD_KEYS = {"child", "saga", "compensation", "description"}
SLEEP_KEYS = {"sleep", "seconds", "compensation", "description"}
MAP_KEYS = {"map", "action", "child", "compensation", "items", "concurrency", "description"} | STEP_OPTIONS
RETRY_KEYS = {"kind", "max_attempts", "initial_interval", "backoff", "increment", "max_interval", "jitter"}
RETRY_NUMBERS = {"initial_interval", "backoff", "increment", "max_interval"}


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", _Map: "a mapping", list: "a list", _List: "a list", str: "a string",
            bool: "a boolean", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _Where:
    """Where the checker is in the file, to name it in errors."""

    path: str
    saga: str | None = None
    version: int | None = None
    step: str | None = None

    def error(self, problem: str, line: int | None, handler: str | None = None) -> SagaFileError:
        return SagaFileError(problem, path=self.path, line=line, saga=self.saga, version=self.version,
                             step=self.step, handler=handler)


def _line(mapping: Any, key: str | None = None) -> int | None:
    if isinstance(mapping, _Map):
        if key is not None and key in mapping.key_lines:
            return mapping.key_lines[key]
        return mapping.line
    return getattr(mapping, "line", None)


def _check_keys(mapping: Any, allowed: set[str], required: Iterable[str], what: str, where: _Where,
                line: int | None = None) -> None:
    """``line``: where the value is, for a value that is not a mapping (a scalar knows no line)."""
    if not isinstance(mapping, dict):
        raise where.error(f"{what} must be a mapping, got {_type_name(mapping)}", _line(mapping) or line)
    for key in mapping:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            raise where.error(
                f"unknown key {key!r} in {what}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; allowed: {', '.join(sorted(allowed))}", _line(mapping, key))
    for key in required:
        if key not in mapping:
            raise where.error(f"{what} needs the key {key!r}", _line(mapping))


def _retry(spec: Any, key: str, parent: _Map, where: _Where) -> RetryPolicy | None:
    if spec is None:
        return None
    _check_keys(spec, RETRY_KEYS, (), f"{key!r}", where, _line(parent, key))
    for name, value in spec.items():
        line = _line(spec, name)
        if name in RETRY_NUMBERS and not _is_number(value):
            raise where.error(f"{key}.{name} must be a number, got {_type_name(value)} {value!r}", line)
        if name == "max_attempts" and (isinstance(value, bool) or not isinstance(value, int)):
            raise where.error(f"{key}.max_attempts must be an integer, got {_type_name(value)} {value!r}", line)
        if name == "jitter" and not isinstance(value, bool):
            raise where.error(f"{key}.jitter must be true or false, got {_type_name(value)} {value!r}", line)
        if name == "kind" and not isinstance(value, str):
            raise where.error(f"{key}.kind must be a string, got {_type_name(value)} {value!r}", line)
    try:
        return RetryPolicy(**spec)
    except DefinitionError as exc:
        raise where.error(f"{key}: {exc}", _line(parent, key)) from None


def _options(spec: _Map, where: _Where) -> dict:
    """retry, compensation_retry, timeout, compensation_timeout, lease and queue of a step (or of a saga's
    defaults), checked."""
    options: dict = {}
    for key in ("retry", "compensation_retry"):
        if key in spec:
            options[key] = _retry(spec[key], key, spec, where)
    for key in ("timeout", "compensation_timeout", "lease"):
        if key in spec:
            value = spec[key]
            if value is not None and (not _is_number(value) or value <= 0):
                raise where.error(f"{key} must be a number of seconds > 0, got {_type_name(value)} {value!r}",
                                  _line(spec, key))
            options[key] = value
    if "queue" in spec:
        value = spec["queue"]
        if value is not None and (not isinstance(value, str) or not value):
            raise where.error(f"queue must be a non-empty string, got {_type_name(value)} {value!r}",
                              _line(spec, "queue"))
        options["queue"] = value
    return options


def _handler(spec: _Map, key: str, handlers: HandlerRegistry, where: _Where) -> Action | None:
    name = spec.get(key)
    if name is None and key == "compensation":
        return None
    line = _line(spec, key)
    if not isinstance(name, str) or not name:
        raise where.error(f"{key} must be a handler name (a string), got {_type_name(name)} {name!r}", line)
    fn = handlers.get(name)
    if fn is not None:
        return fn
    known = handlers.names()
    hint = difflib.get_close_matches(name, known, n=1)
    if known:
        listing = f"registered handlers: {', '.join(known)}"
    else:
        listing = "no handlers are registered: the modules in SAGAFLOW_IMPORTS register them with @handler"
    raise where.error(
        f"unknown handler {name!r} for the {key}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; {listing}", line, handler=name)


def _step(spec: Any, line: int | None, defaults: dict, handlers: HandlerRegistry, where: _Where) -> Step:
    if isinstance(spec, dict) and isinstance(spec.get("name", spec.get("action")), str):
        where.step = spec.get("name", spec.get("action"))  # name the step in errors about its keys
    _check_keys(spec, STEP_KEYS, ("action",), "a step", where, line)
    if "name" not in spec and not isinstance(spec["action"], str):
        _handler(spec, "action", handlers, where)  # raises: the action must be a handler name
    name = spec.get("name", spec["action"])
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise where.error(f"step name must be an identifier (letters, digits, underscore), got {name!r}",
                          _line(spec, "name" if "name" in spec else "action"))
    where.step = name
    if "description" in spec and not isinstance(spec["description"], str):
        raise where.error(f"description must be a string, got {_type_name(spec['description'])}",
                          _line(spec, "description"))
    action = _handler(spec, "action", handlers, where)
    compensation = _handler(spec, "compensation", handlers, where)
    options = {**defaults, **_options(spec, where)}
    for flag in STEP_FLAGS:
        if flag in spec:
            if not isinstance(spec[flag], bool):
                raise where.error(f"{flag} must be true or false, got {_type_name(spec[flag])} {spec[flag]!r}",
                                  _line(spec, flag))
            options[flag] = spec[flag]
    for key in STEP_LIMITS:
        if key in spec:
            options[key] = spec[key]  # checked by Step (the error names the line)
    try:
        return Step(name, action, compensation, **options)
    except DefinitionError as exc:
        raise where.error(str(exc), _line(spec)) from None


def _waiting_step(spec: Any, line: int | None, handlers: HandlerRegistry, where: _Where) -> Step:
    """``{gate: name, signal: ..., timeout: seconds}``, ``{child: name, saga: ...}`` or ``{sleep: name,
    seconds: ...}``: a step that waits."""
    kind = "gate" if "gate" in spec else "sleep" if "sleep" in spec else "child"
    where.step = spec[kind] if isinstance(spec[kind], str) else None
    keys = {"gate": (GATE_KEYS, ("gate", "signal", "timeout")), "child": (CHILD_KEYS, ("child", "saga")),
            "sleep": (SLEEP_KEYS, ("sleep", "seconds"))}[kind]
    _check_keys(spec, keys[0], keys[1], f"a {kind} step", where, line)
    name = spec[kind]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise where.error(f"{kind} must be the step's name (an identifier), got {name!r}", _line(spec, kind))
    compensation = _handler(spec, "compensation", handlers, where)
    try:
        if kind == "gate":
            return Step(name, None, compensation, kind="gate", signal=spec["signal"], timeout=spec["timeout"],
                        payload_required=spec.get("payload_required", False))
        if kind == "sleep":
            return Step(name, None, compensation, kind="sleep", seconds=spec["seconds"])
        return Step(name, None, compensation, kind="child", child_saga=spec["saga"])
    except DefinitionError as exc:
        raise where.error(str(exc), _line(spec)) from None


def items_at(path: str) -> Callable[[Any], list]:
    """A map's ``items`` written as a path into the context: ``input.<key>...`` (the run's input) or
    ``results.<step>.<key>...`` (an earlier step's result); a number picks from a list. The function raises
    LookupError, naming the path, when the run's context has nothing there."""
    parts = path.split(".") if isinstance(path, str) else []
    if len(parts) < 2 or parts[0] not in ("input", "results") or any(not p for p in parts) \
            or (parts[0] == "results" and not NAME_PATTERN.match(parts[1])):
        raise DefinitionError(f"items must be a path into the context, \"input.<key>...\" or "
                              f"\"results.<step>...\", got {path!r}")

    def items(ctx) -> list:
        value: Any = ctx.input if parts[0] == "input" else ctx.results
        for part in parts[1:]:
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise LookupError(f"items path {path!r}: the run's context has nothing at {part!r}")
        return value

    items.__qualname__ = f"items_at({path!r})"
    return items


def _map_step(spec: Any, line: int | None, defaults: dict, handlers: HandlerRegistry, where: _Where) -> Step:
    """``{map: name, action: handler, items: input.<key>, concurrency: 10, compensation: handler}``, or
    ``{map: name, child: <saga>, items: ...}``: one child run of that saga per item, its input
    ``{"item": <item>, "index": <i>}``."""
    where.step = spec["map"] if isinstance(spec["map"], str) else None
    _check_keys(spec, MAP_KEYS, ("map", "items"), "a map step", where, line)
    name = spec["map"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise where.error(f"map must be the step's name (an identifier), got {name!r}", _line(spec, "map"))
    if ("action" in spec) == ("child" in spec):
        raise where.error(f"map {name!r}: a map has either an action (a handler run once per item) or a child "
                          f"(a saga run once per item), never both and never neither",
                          _line(spec, "child" if "child" in spec else None))
    child = spec.get("child")
    if child is not None and (not isinstance(child, str) or not NAME_PATTERN.match(child)):
        raise where.error(f"map {name!r}: child must be a saga name, got {child!r}", _line(spec, "child"))
    action = _handler(spec, "action", handlers, where) if child is None else None
    compensation = _handler(spec, "compensation", handlers, where)
    options = {**defaults, **_options(spec, where)}
    try:
        items = items_at(spec["items"])
    except DefinitionError as exc:
        raise where.error(str(exc), _line(spec, "items")) from None
    try:
        return Step(name, action, compensation, kind="map", items=items, child_saga=child,
                    map_concurrency=spec.get("concurrency", 10), **options)
    except DefinitionError as exc:
        raise where.error(str(exc), _line(spec, "concurrency" if "concurrency" in spec else None)) from None


def _steps(specs: Any, lines, defaults: dict, handlers: HandlerRegistry, where: _Where, step_lines: dict, *,
           nested: bool = False) -> list:
    """A saga's steps: Step, or Parallel for ``{parallel: [step, step, ...]}`` (not nested). ``step_lines``
    gets each Step's line, for errors found later."""
    built: list = []
    for spec, line in zip(specs, lines, strict=True):
        where.step = None
        if isinstance(spec, dict) and "parallel" in spec:
            _check_keys(spec, {"parallel"}, ("parallel",), "a parallel group", where, line)
            group = spec["parallel"]
            if nested:
                raise where.error("parallel groups do not nest", _line(spec, "parallel"))
            if not isinstance(group, _List) or len(group) < 2:
                raise where.error("parallel must list at least two steps", _line(spec, "parallel"))
            branches = _steps(group, group.item_lines, defaults, handlers, where, step_lines, nested=True)
            try:
                built.append(Parallel(*branches))
            except DefinitionError as exc:
                raise where.error(str(exc), _line(spec, "parallel")) from None
        elif isinstance(spec, dict) and "map" in spec:  # a map of child runs has a "child" key too
            built.append(_map_step(spec, line, defaults, handlers, where))
        elif isinstance(spec, dict) and ("gate" in spec or "child" in spec or "sleep" in spec):
            built.append(_waiting_step(spec, line, handlers, where))
        else:
            built.append(_step(spec, line, defaults, handlers, where))
        if isinstance(built[-1], Step):
            step_lines[id(built[-1])] = _line(spec) or line
            if nested and (built[-1].pivot or str(built[-1].kind) not in ("action", "child")):
                where.step = built[-1].name
                raise where.error("a gate, a sleep, a map or a pivot cannot be in a parallel group: it runs alone",
                                  _line(spec) or line)
    return built


def _saga(spec: Any, line: int | None, handlers: HandlerRegistry, where: _Where) -> Saga:
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        where.saga = spec["name"]  # name the saga in errors about its keys
        where.version = spec.get("version", 1) if isinstance(spec.get("version", 1), int) else None
    _check_keys(spec, SAGA_KEYS, ("name", "steps"), "a saga", where, line)
    name = spec["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise where.error(f"saga name must be an identifier (letters, digits, underscore), got {name!r}",
                          _line(spec, "name"))
    where.saga = name
    version = spec.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise where.error(f"version must be an integer >= 1, got {_type_name(version)} {version!r}",
                          _line(spec, "version"))
    where.version = version
    if "description" in spec and not isinstance(spec["description"], str):
        raise where.error(f"description must be a string, got {_type_name(spec['description'])}",
                          _line(spec, "description"))
    defaults: dict = {}
    if spec.get("defaults") is not None:
        _check_keys(spec["defaults"], STEP_OPTIONS, (), "defaults", where)
        defaults = _options(spec["defaults"], where)
    steps = spec["steps"]
    if not isinstance(steps, _List) or not steps:
        raise where.error(f"steps must be a non-empty list, got {_type_name(steps)}", _line(spec, "steps"))
    step_lines: dict[int, int | None] = {}
    built = _steps(steps, steps.item_lines, defaults, handlers, where, step_lines)
    seen: set[str] = set()
    for step in (s for item in built for s in (item.steps if isinstance(item, Parallel) else (item,))):
        if step.name in seen:
            where.step = step.name
            raise where.error(f"duplicate step name {step.name!r}; give one of them its own `name:`",
                              step_lines.get(id(step)))
        seen.add(step.name)
    where.step = None
    deadline = spec.get("deadline")
    if deadline is not None and (not _is_number(deadline) or deadline <= 0):
        raise where.error(f"deadline must be a number of seconds > 0, got {_type_name(deadline)} {deadline!r}",
                          _line(spec, "deadline"))
    try:
        return Saga(name, built, version=version, register=False, deadline=deadline,
                    max_concurrent_runs=spec.get("max_concurrent_runs"))
    except DefinitionError as exc:
        raise where.error(str(exc), _line(spec, "steps")) from None


def parse_saga_file(path: str | Path, text: str | None = None, *,
                    handlers: HandlerRegistry = handlers) -> list[Saga]:
    """Read and check a saga file; returns its sagas, registered nowhere yet."""
    return [saga for saga, _ in _parse(Path(path), text, handlers)]


def _parse(path: Path, text: str | None, handlers: HandlerRegistry) -> list[tuple[Saga, str]]:
    """The file's sagas, each with a fingerprint of its entry (to recognise it when loaded again)."""
    where = _Where(str(path))
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise where.error(f"cannot read the saga file: {exc.strerror or exc}", None) from None
        except UnicodeDecodeError as exc:
            raise where.error(f"the saga file is not UTF-8 text: {exc.reason} at byte {exc.start}", None) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _BadKey as exc:
        raise where.error(exc.problem, exc.line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise where.error(f"not valid YAML: {problem}", mark.line + 1 if mark else None) from None
    if data is None:
        raise where.error("the file is empty; it needs a `sagas:` list", None)
    _check_keys(data, FILE_KEYS, ("sagas",), "the file", where)
    specs = data["sagas"]
    if not isinstance(specs, _List):
        raise where.error(f"sagas must be a list, got {_type_name(specs)}", _line(data, "sagas"))
    sagas: list[tuple[Saga, str]] = []
    for spec, line in zip(specs, specs.item_lines, strict=True):
        where.saga = where.version = where.step = None
        saga = _saga(spec, line, handlers, where)
        if any((s.name, s.version) == (saga.name, saga.version) for s, _ in sagas):
            raise where.error("defined twice in this file; bump the version to change its steps", _line(spec))
        sagas.append((saga, json.dumps(spec, sort_keys=True, default=str)))
    return sagas


# ---------------------------------------------------------------------------------------------- loading

# Per registry: the sagas that saga files registered, by (name, version), with their entry's fingerprint.
_from_files: "weakref.WeakKeyDictionary[Registry, dict[tuple[str, int], tuple[str, Saga]]]" = \
    weakref.WeakKeyDictionary()


def load_saga_file(path: str | Path, *, handlers: HandlerRegistry = handlers,
                   registry: Registry = default_registry) -> list[Saga]:
    """Check a saga file and register its sagas. All or nothing: an invalid file registers none.

    A saga that a file already registered with the very same entry is kept as it is, so loading a file
    again is harmless (workers, the CLI and the web app each load it; an edited file may add versions).
    A (name, version) registered otherwise, or whose entry changed, is refused: bump the version."""
    path = Path(path)
    parsed = _parse(path, None, handlers)
    known = _from_files.setdefault(registry, {})
    where = _Where(str(path))
    fresh: list[Saga] = []
    result: list[Saga] = []
    for saga, fingerprint in parsed:
        previous = known.get((saga.name, saga.version))
        if previous is not None and previous[0] == fingerprint:
            result.append(previous[1])
            continue
        try:
            registry.get(saga.name, saga.version)
        except UnknownSaga:
            fresh.append(saga)
            result.append(saga)
            continue
        where.saga, where.version = saga.name, saga.version
        origin = "a saga file, with other steps or options" if previous is not None else "a Python module"
        raise where.error(f"is already registered (by {origin}); bump the version to change its steps", None)
    for saga, fingerprint in parsed:
        if saga in fresh:
            registry.add(saga)
            known[(saga.name, saga.version)] = (fingerprint, saga)
    return result


def load_saga_files(paths: Iterable[str | Path], *, handlers: HandlerRegistry = handlers,
                    registry: Registry = default_registry) -> list[Saga]:
    """Load several files in order (see ``load_saga_file``)."""
    loaded: list[Saga] = []
    for path in paths:
        loaded.extend(load_saga_file(path, handlers=handlers, registry=registry))
    return loaded
