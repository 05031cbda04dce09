"""Compensation on or off, per saga: a capability by design, optional by policy.

Every saga can compensate. Policy decides, at ``client.start``, whether a run uses it: ``mode="saga"`` (the
saga runtime: step rows, claims, events, compensation, recovery) or ``mode="plain"`` (a plain Celery chain
of the same step tasks: each action with its retry policy, no claims, no step rows, no events; the run row
alone records the outcome, ``succeeded`` or ``failed``; nothing is ever undone). The run records its mode.

Where the decision comes from, first match wins:

1. the policy file's entry for the saga (``sagas: {create_booking: {compensation: off}}``);
2. ``SAGAFLOW_SAGA_ENABLED=false``: off for every saga;
3. ``SAGAFLOW_SAGA_OPERATIONS=a,b``: on for the sagas listed, off for the others (``*`` or unset: no say);
4. the policy file's ``default: on|off``;
5. on.

The file (SAGAFLOW_POLICY_FILE, default ``config/policy.yaml``; the default may be absent, a file named
explicitly may not) is read again whenever its modification time or size changes, so an edit applies to the
next start without a restart. An invalid file is refused with an error naming the file and the problem: a
process that already had a good policy keeps it (and logs an ERROR each time the file changes and is still
bad); one that never had one refuses to start runs (PolicyError) until the file is fixed.

A saga with gates, child steps or parallel groups needs the saga runtime (they wait and join in SQL): it
cannot be switched off. A file that tries is refused when it loads (for the sagas this process knows);
otherwise ``client.start`` refuses the run with an error naming the saga.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sagaflow.errors import SagaflowError
from sagaflow.model.declarative import _BadKey, _Loader
from sagaflow.model.definition import registry

log = logging.getLogger("sagaflow.policy")

SAGA = "saga"
PLAIN = "plain"
SWITCHES = {True: True, False: False, "on": True, "off": False, "true": True, "false": False}


class PolicyError(SagaflowError):
    """The policy file is invalid, or policy asks for something a saga cannot do (run plain with gates)."""


@dataclass(frozen=True)
class FilePolicy:
    """What a policy file says: ``default`` (None: the file has no say) and per-saga switches."""

    default: bool | None = None
    sagas: dict[str, bool] = field(default_factory=dict)
    path: Path | None = None


EMPTY = FilePolicy()


def _switch(value, where: str) -> bool:
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, (bool, str)) and key in SWITCHES:
        return SWITCHES[key]
    raise PolicyError(f"{where}: must be on or off, got {value!r}")


def parse(text: str, path: Path) -> FilePolicy:
    """A policy file's text -> FilePolicy; PolicyError naming the file, the line and the problem."""
    try:
        data = yaml.load(text, Loader=_Loader)  # SafeLoader that refuses duplicate keys
    except _BadKey as exc:
        raise PolicyError(f"{path}:{exc.line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return FilePolicy(path=path)
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping with the keys 'default' and 'sagas', "
                          f"got {type(data).__name__}")
    lines = getattr(data, "key_lines", {})

    def where(key: str, sub: str = "") -> str:
        return f"{path}:{lines.get(key, 1)}: {key}{sub}"

    unknown = sorted(set(data) - {"default", "sagas"})
    if unknown:
        raise PolicyError(f"{where(unknown[0])}: unknown key {unknown[0]!r} (allowed: default, sagas)")
    default = _switch(data["default"], where("default")) if "default" in data else None
    sagas_raw = data.get("sagas") or {}
    if not isinstance(sagas_raw, dict):
        raise PolicyError(f"{where('sagas')}: expected a mapping of saga name -> {{compensation: on|off}}, "
                          f"got {type(sagas_raw).__name__}")
    saga_lines = getattr(sagas_raw, "key_lines", {})
    sagas: dict[str, bool] = {}
    for name, entry in sagas_raw.items():
        at = f"{path}:{saga_lines.get(name, lines.get('sagas', 1))}: saga {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"compensation"}:
            raise PolicyError(f"{at}: expected {{compensation: on|off}}, got {entry!r}")
        sagas[name] = _switch(entry["compensation"], f"{at}, compensation")
    return FilePolicy(default=default, sagas=sagas, path=path)


def plain_blockers(saga) -> list[str]:
    """The steps of ``saga`` (a definition.Saga) that need the saga runtime: gates, child steps, groups."""
    return [f"{step.name} ({'parallel group' if step.group is not None else step.kind})"
            for step in saga.steps if str(step.kind) != "action" or step.group is not None]


class PolicySource:
    """The policy file, read again when its modification time or size changes."""

    def __init__(self, path: Path, required: bool) -> None:
        self.path = path
        self.required = required
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._good: FilePolicy | None = None
        self._error: PolicyError | None = None

    def current(self) -> FilePolicy:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                if self.required:
                    raise PolicyError(f"SAGAFLOW_POLICY_FILE={self.path} does not exist: create it (see "
                                      f"config/policy.yaml) or unset SAGAFLOW_POLICY_FILE") from None
                self._seen, self._good, self._error = None, EMPTY, None  # the optional default file is absent
                return EMPTY
            seen = (st.st_mtime_ns, st.st_size)
            if seen != self._seen:
                self._seen = seen
                try:
                    policy = parse(self.path.read_text(), self.path)
                    check_plain_capable(policy)
                except PolicyError as exc:
                    self._error = exc
                    if self._good is not None:
                        log.error("policy_file_invalid", extra={
                            "file": str(self.path), "error": str(exc),
                            "next": "fix the file; until then the policy loaded before stays in force"})
                else:
                    self._good, self._error = policy, None
                    log.info("policy_loaded", extra={"file": str(self.path), "default": policy.default,
                                                     "sagas": ",".join(f"{k}={'on' if v else 'off'}"
                                                                       for k, v in sorted(policy.sagas.items()))})
            if self._good is None:
                raise self._error or PolicyError(f"{self.path}: no policy loaded")
            return self._good


def check_plain_capable(policy: FilePolicy) -> None:
    """Refuse a file that switches off a saga this process knows and that cannot run plain."""
    known = {saga.name: saga for saga in registry.all()}  # the latest version last
    for name, on in policy.sagas.items():
        if not on and name in known:
            blockers = plain_blockers(known[name])
            if blockers:
                raise PolicyError(f"{policy.path}: saga {name!r} cannot have compensation off: its steps "
                                  f"{', '.join(blockers)} need the saga runtime")


_sources: dict[tuple[Path, bool], PolicySource] = {}
_sources_lock = threading.Lock()


def source(settings) -> PolicySource:
    key = (settings.policy_file, settings.policy_file_required)
    with _sources_lock:
        if key not in _sources:
            _sources[key] = PolicySource(*key)
        return _sources[key]


def compensation_on(saga_name: str, settings, file_policy: FilePolicy) -> bool:
    """The decision for one saga (see the module's docstring for the order)."""
    if saga_name in file_policy.sagas:
        return file_policy.sagas[saga_name]
    if not settings.saga_enabled:
        return False
    if settings.saga_operations is not None:
        return saga_name in settings.saga_operations
    if file_policy.default is not None:
        return file_policy.default
    return True


def mode_for(saga, settings) -> str:
    """``"saga"`` or ``"plain"`` for a new run of ``saga`` (a definition.Saga). Raises PolicyError when the
    policy file is invalid and no good one was loaded before, or when policy switches off a saga that
    cannot run plain. ``settings`` is given by the caller (the client passes the app's): the model reads
    no configuration of its own, only the fields policy_file, policy_file_required, saga_enabled and
    saga_operations of whatever settings object it is handed."""
    if compensation_on(saga.name, settings, source(settings).current()):
        return SAGA
    blockers = plain_blockers(saga)
    if blockers:
        raise PolicyError(
            f"saga {saga.name!r} cannot run with compensation off: its steps {', '.join(blockers)} need the "
            f"saga runtime; switch it on for this saga (`sagas: {{{saga.name}: {{compensation: on}}}}` in "
            f"{settings.policy_file}, or add it to SAGAFLOW_SAGA_OPERATIONS)"
        )
    return PLAIN
