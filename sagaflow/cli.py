"""The `sagaflow` command: worker | web | flower | start | status | runs | cancel | signal | retry | restart |
resolve | prune | stats | recover | schedule | db | demo.

Whatever a user can get wrong by typing (an option, an argument, a SAGAFLOW_* setting, a saga module or file,
the database address) ends in one line on stderr, ``Error: ...`` saying what to do, and a non-zero exit: 2
for a malformed option or argument and for a SAGAFLOW_* setting that is not valid (naming the variable and
what it accepts), 1 for the rest. Nothing is written before every input has been checked.
Text from stored runs (errors, names, event details) is shown with its control characters escaped, so a
step error holding terminal escape sequences cannot rewrite the operator's terminal; --json output is JSON
(ASCII, escaped) as it stands.
"""

from __future__ import annotations

import getpass
import importlib
import json
import logging
import math
import os
import sys
import traceback

import click
import sqlalchemy.exc

from sagaflow import __version__
from sagaflow.app import celery_app_for_commands, configure, get_settings
from sagaflow.app import load_sagas as app_load_sagas
from sagaflow.client import SagaClient
from sagaflow.errors import SagaflowError
from sagaflow.logs import LEVELS, escape_controls, setup_logging
from sagaflow.model.events import Origin
from sagaflow.model.query import parse_duration, parse_time
from sagaflow.model.schedule import Schedule
from sagaflow.model.snapshots import Run
from sagaflow.safejson import check_text
from sagaflow.safejson import loads as json_loads

MAX_LIMIT = 1000  # runs --limit, as SagaClient.list allows
MAX_OFFSET = 10**12  # runs --offset: far past any table, well inside a 64-bit integer
POOLS = ("prefork", "threads", "solo", "processes", "eventlet", "gevent", "custom")  # Celery's -P


def _clean(value) -> str:
    """Text for the terminal: control characters escaped (one line, no escape sequences)."""
    return escape_controls(str(value))


class _Seconds(click.ParamType):
    """A positive, finite number of seconds (``nan``, ``inf``, 0 and negatives refused)."""

    name = "seconds"

    def convert(self, value, param, ctx):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a positive, finite number of seconds", param, ctx)
        return seconds


SECONDS = _Seconds()


def load_sagas(settings) -> None:
    """Import the modules named in SAGAFLOW_IMPORTS, then load the files in SAGAFLOW_SAGA_FILES."""
    for module in settings.imports:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and not (module == exc.name or module.startswith(exc.name + ".")):
                raise click.ClickException(_clean(
                    f"cannot import saga module {module!r} named in SAGAFLOW_IMPORTS: it imports {exc.name!r}, "
                    f"which is not installed ({exc}); install it in this environment"
                )) from None
            raise click.ClickException(_clean(
                f"cannot import saga module {module!r} named in SAGAFLOW_IMPORTS ({exc}); "
                f"run from the project folder or fix SAGAFLOW_IMPORTS"
            )) from None
        except Exception as exc:  # the module itself is broken: say where, and how to see the traceback
            raise click.ClickException(_clean(
                f"cannot import saga module {module!r} named in SAGAFLOW_IMPORTS: {_where_raised(exc)}; "
                f"fix it (`python -c 'import {module}'` shows the traceback) or fix SAGAFLOW_IMPORTS"
            )) from None
    try:
        app_load_sagas(settings)
    except SagaflowError as exc:  # an invalid saga file: its message names the file, line, saga, handler
        raise click.ClickException(_clean(exc)) from None


def _where_raised(exc: BaseException) -> str:
    """'ZeroDivisionError: division by zero (tasks/x.py:3)'; a SyntaxError names its file and line itself."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError):
        return text
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{text} ({frames[-1].filename}:{frames[-1].lineno})" if frames else text


class _SettingsError(click.ClickException):
    exit_code = 2


def _settings_error(exc) -> click.ClickException:
    """A SAGAFLOW_* setting that is not valid: one line naming it and what it accepts, exit status 2."""
    return _SettingsError(_clean(exc))


def _configure():
    """The settings from the environment; an invalid SAGAFLOW_* value is one line naming it (status 2)."""
    try:
        settings = configure()
    except ValueError as exc:  # Settings.from_env names the variable and what it accepts
        raise _settings_error(exc) from None
    # Environment bytes that are not UTF-8 arrive as lone surrogates: no driver can use such an address
    # (and a broker URL would fail only after the run's row is written).
    for name in ("SAGAFLOW_DATABASE_URL", "SAGAFLOW_BROKER_URL"):  # unset: both live under SAGAFLOW_HOME
        try:
            if os.environ.get(name):
                check_text(settings.database_url if name == "SAGAFLOW_DATABASE_URL" else settings.broker_url, name)
            else:
                check_text(str(settings.home), "SAGAFLOW_HOME")
        except SagaflowError as exc:
            raise _settings_error(exc) from None
    return settings


def _database() -> str:
    """The configured database, for a message: its URL without the password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(get_settings().database_url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: never echo it (it may hold a password)
        return "named by SAGAFLOW_DATABASE_URL"


def _open_client() -> SagaClient:
    """A client (it opens the store); a URL that is not one, a dialect or driver not installed, or a SQLite
    folder that cannot be created is one line naming SAGAFLOW_DATABASE_URL."""
    try:
        return SagaClient()
    except sqlalchemy.exc.ArgumentError as exc:  # unparsable URL, unknown dialect (NoSuchModuleError)
        problem = f"{exc}"
    except ImportError as exc:
        extra = " (pip install 'sagaflow[postgres]')" if "psycopg2" in str(exc) else ""
        problem = f"its driver is not installed ({exc}){extra}"
    except OSError as exc:
        problem = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else f"{exc}"
    raise click.ClickException(_clean(
        f"cannot open the database {_database()}: {problem}. Check SAGAFLOW_DATABASE_URL (and SAGAFLOW_HOME "
        f"for the default SQLite file)"))


def _setup(need_schema: bool = True):
    settings = _configure()
    try:
        setup_logging(settings.log_level, settings.log_format)
    except ValueError as exc:
        raise _settings_error(exc) from None
    _celery_app(settings)  # SAGAFLOW_CELERY_APP's module installs sagaflow on the team's app
    load_sagas(settings)
    if need_schema:
        _open_client().check_schema()  # SchemaMissing says to run `sagaflow db upgrade`
    return settings


def _celery_app(settings):
    """The Celery app the commands use: SAGAFLOW_CELERY_APP's, or sagaflow's own (one line if it fails)."""
    try:
        return celery_app_for_commands(settings)
    except ValueError as exc:
        raise _settings_error(exc) from None
    except Exception as exc:  # the user's module itself is broken: say where
        raise click.ClickException(_clean(
            f"cannot load SAGAFLOW_CELERY_APP {settings.celery_app!r}: {_where_raised(exc)}")) from None


def _client() -> SagaClient:
    return SagaClient()


def _usage_error(exc: click.UsageError) -> click.ClickException:
    """A malformed option or argument as one line (Click prints the usage first), saying where help is."""
    message = exc.format_message()
    if exc.ctx is not None:
        message += f" (see `{exc.ctx.command_path} --help`)"
    error = click.ClickException(_clean(message))
    error.exit_code = exc.exit_code  # type: ignore[misc]  # click types it a ClassVar; each instance's is used
    return error


_SHOW_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # `sagaflow db` alone: the help, as it is


class _Group(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):
        try:  # `sagaflow --bogus`: the group's own options, parsed before invoke
            return super().make_context(info_name, args, parent=parent, **extra)
        except _SHOW_HELP:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _SHOW_HELP:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from None
        except (SagaflowError, TimeoutError) as exc:
            raise click.ClickException(_clean(exc)) from None
        except sqlalchemy.exc.OperationalError as exc:
            reason = " ".join(str(exc.orig).split())  # drivers end with newlines and indent their hints
            raise click.ClickException(_clean(
                f"cannot use the database {_database()}: {reason}. Check SAGAFLOW_DATABASE_URL and that the "
                f"server is up"
            )) from None


@click.group(cls=_Group)
@click.version_option(__version__, "--version", prog_name="sagaflow", message="%(prog)s %(version)s")
def main() -> None:
    """sagaflow: sagas on Celery, state in SQL. Settings come from SAGAFLOW_* environment variables."""
    # As `celery -A` and `flask` do: the project folder's modules (SAGAFLOW_IMPORTS=myapp.sagas) import
    # from where the command runs. A console script's sys.path starts with its bin folder, not the cwd.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


# ---------------------------------------------------------------------------------------------- worker


@main.command()
@click.option("-P", "--pool", type=click.Choice(POOLS), default=None,
              help="prefork (default: time limits work), threads or solo.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None, help="Worker processes (default 2).")
@click.option("-Q", "--queues", default=None, help="Comma-separated queues to consume (default: celery).")
@click.option("-l", "--loglevel", type=click.Choice(LEVELS, case_sensitive=False), default=None,
              help="Log level (default SAGAFLOW_LOG_LEVEL or WARNING).")
@click.option("-n", "--hostname", default=None, help="Worker node name, as shown in Flower.")
@click.option("-B", "--beat", is_flag=True,
              help="Also run beat in this worker, which schedules the recovery sweeper (one such worker per "
                   "deployment; or run `celery -A sagaflow.app beat` on its own).")
def worker(pool, concurrency, queues, loglevel, hostname, beat) -> None:
    """Run a Celery worker for every registered saga. Task events are off unless SAGAFLOW_TASK_EVENTS=1;
    `sagaflow flower` switches them on in the workers while it runs."""
    for value, option in ((queues, "--queues"), (hostname, "--hostname")):
        if value is not None:
            check_text(value, option)
    settings = _setup()
    if pool is None and settings.worker_pool not in POOLS:
        raise _settings_error(f"SAGAFLOW_WORKER_POOL must be one of {', '.join(POOLS)}, got {settings.worker_pool!r}")
    if concurrency is None and settings.worker_concurrency < 1:
        raise _settings_error(f"SAGAFLOW_WORKER_CONCURRENCY must be at least 1, got {settings.worker_concurrency}")
    from sagaflow.hosting import check_worker

    app = _celery_app(settings)
    # The checks every worker of this app runs at worker_init (celery -A too), first here as one line: the
    # Celery settings sagaflow needs, the visibility timeout against every registered saga, a non-atomic step
    # without a compensation, a typo in SAGAFLOW_ALERT_HOOK.
    try:
        check_worker(app)
    except SagaflowError as exc:
        if str(exc).startswith("Celery setting"):
            raise _settings_error(exc) from None
        raise click.ClickException(_clean(exc)) from None
    broker = None
    if settings.embedded_broker and app.conf.broker_url == settings.effective_broker_url:
        from sagaflow.embedded import start_unless_running

        broker = start_unless_running(settings.embedded_socket)
        if broker is not None:
            click.echo(f"started the embedded broker on {settings.embedded_socket}", err=True)
    # No -E: events follow worker_send_task_events (SAGAFLOW_TASK_EVENTS), and Flower enables them while it runs.
    argv = ["worker", "-P", pool or settings.worker_pool,
            "-c", str(concurrency or settings.worker_concurrency),
            "-l", (loglevel or settings.log_level).upper()]
    if queues:
        argv += ["-Q", queues]
    if hostname:
        argv += ["-n", hostname]
    if beat:
        settings.home.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule file there
        argv += ["-B"]
    try:
        app.worker_main(argv)
    finally:
        if broker is not None:
            broker.stop()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True)
def web(host, port) -> None:
    """Serve the status page and the JSON API (one process, for a laptop; use gunicorn in production:
    gunicorn 'sagaflow.web:create_app()')."""
    try:
        from werkzeug.serving import run_simple

        from sagaflow.web import create_app
    except ImportError as exc:
        raise click.ClickException(f"sagaflow web needs the [web] extra: pip install 'sagaflow[web]' ({exc})") from None

    try:
        settings = _setup()
    except ValueError as exc:  # a bad SAGAFLOW_* setting (a short API token...): one line, no traceback
        raise click.ClickException(str(exc)) from None
    # Quiet by default: werkzeug logs every request at INFO, shown only with SAGAFLOW_LOG_LEVEL=INFO.
    logging.getLogger("werkzeug").setLevel(settings.log_level)
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]") and not settings.api_token:
        logging.getLogger("sagaflow.web").warning("web_exposed_without_token", extra={
            "host": host, "hint": "anyone who reaches this address can start, cancel and retry runs: set "
                                  "SAGAFLOW_API_TOKEN (and SAGAFLOW_ALLOWED_HOSTS to the names clients use)"})
    loopback_names = {"localhost", "127.0.0.1", "[::1]"}
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]") and set(settings.allowed_hosts) <= loopback_names:
        click.echo(f"note: SAGAFLOW_ALLOWED_HOSTS is {','.join(settings.allowed_hosts)}: requests to any other "
                   f"name or address are refused (400); set it to the names clients use", err=True)
    click.echo(f"sagaflow web on http://{host}:{port}/", err=True)
    run_simple(host, port, create_app(settings), threaded=True)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--url-prefix", default="", help="Serve under this path, e.g. 'flower' behind a proxy.")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(address, port, url_prefix, flower_args) -> None:
    """Run Flower against the configured broker: every step and compensation shows up as a task named
    <saga>.<step> (or <saga>.<step>.compensate). Other Flower options pass through, e.g.
    --basic_auth=user:password, --persistent=True --db=flower.db, --max_tasks=100000."""
    for value, option in ((address, "--address"), (url_prefix, "--url-prefix")):
        check_text(value, option)
    settings = _setup(need_schema=False)
    app = _celery_app(settings)
    if settings.embedded_broker and app.conf.broker_url == settings.effective_broker_url:
        from sagaflow.embedded import EmbeddedRedis

        if not EmbeddedRedis(settings.embedded_socket).is_running():
            raise click.ClickException(
                "the embedded broker is not running: start `sagaflow worker` first (it starts the broker), "
                "or set SAGAFLOW_BROKER_URL")
    try:
        import flower as _flower  # noqa: F401  (the [flower] extra)
    except ImportError:
        raise click.ClickException("sagaflow flower needs the [flower] extra: pip install 'sagaflow[flower]'") from None
    argv = ["flower", f"--address={address}", f"--port={port}"]
    # Workers send task events only when asked (SAGAFLOW_TASK_EVENTS is off by default): Flower asks them,
    # every 5 s while it runs. Said explicitly, so a change of Flower's default cannot leave it blind.
    if not any(a.lstrip("-").startswith("enable_events") for a in flower_args):
        argv.append("--enable_events=True")
    elif not settings.task_events and any(a.lstrip("-").lower() in ("enable_events=false", "enable_events=0")
                                          for a in flower_args):
        click.echo("note: with --enable_events=False Flower shows no tasks unless the workers run with "
                   "SAGAFLOW_TASK_EVENTS=1", err=True)
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix.strip('/')}")
    app.start(argv + list(flower_args))


# ---------------------------------------------------------------------------------------------- runs


@main.command()
@click.argument("saga")
@click.option("--input", "input_json", default="{}", help='The run\'s input, a JSON object: \'{"customer": "c1"}\'.')
@click.option("--idempotency-key", default=None, help="A second start with the same key returns the first run.")
@click.option("--wait", is_flag=True, help="Wait for a final status and print the whole run.")
@click.option("--timeout", type=SECONDS, default=60.0, show_default=True, help="Seconds to --wait.")
@click.option("--at", "at", default=None,
              help="Start at this time instead of now (ISO 8601; no zone means UTC): the run is scheduled.")
@click.option("--delay", type=SECONDS, default=None, help="Start this many seconds from now: the run is scheduled.")
@click.option("--input-file", type=click.File("r", encoding="utf-8"), default=None,
              help="Start one run per line of this file (JSON lines: each a JSON object, the run's input; "
                   "'-' reads stdin), in one batch (client.start_many): a bad line starts none.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def start(saga, input_json, idempotency_key, at, delay, wait, timeout, input_file, as_json) -> None:
    """Start a run of SAGA (now, or --at a time, or after --delay seconds)."""
    settings = _setup()
    when = parse_time(at, "--at") if at is not None else None
    if input_file is not None:
        _start_batch(saga, input_file, input_json, idempotency_key, when, delay, wait, timeout, as_json)
        return
    # Parsed under SAGAFLOW_JSON_MAX_DEPTH/_BYTES without recursion: a deep value is refused, not a crash.
    data = json_loads(input_json, "--input", settings.json_limits)
    client = _client()
    run = client.start(saga, data, idempotency_key=idempotency_key, at=when, delay=delay)  # checks everything first
    if wait:
        run = client.wait(run.id, timeout=timeout)
    _print_run(run, as_json, history=wait)
    if wait and run.status != "succeeded":
        sys.exit(1)


def _start_batch(saga, input_file, input_json, idempotency_key, when, delay, wait, timeout, as_json) -> None:
    """``start --input-file``: every line parsed first (a bad one is named, and nothing starts), then one
    start_many; prints a line (or, with --json, an object) per run."""
    if input_json != "{}" or idempotency_key is not None:
        raise click.UsageError("--input-file gives each run's input: leave out --input and --idempotency-key")
    limits = get_settings().json_limits
    inputs = []
    try:
        for number, line in enumerate(input_file, 1):
            if line.strip():
                data = json_loads(line, f"line {number} of --input-file", limits)
                if not isinstance(data, dict):
                    raise click.UsageError(f"line {number} of --input-file: a run's input must be a JSON object, "
                                           f"got {type(data).__name__}; nothing was started")
                inputs.append(data)
    except UnicodeDecodeError as exc:
        raise click.UsageError(f"--input-file is not UTF-8 text ({exc.reason} at byte {exc.start}); nothing "
                               f"was started") from None
    if not inputs:
        raise click.UsageError("--input-file has no lines: nothing to start")
    client = _client()
    runs = client.start_many(saga, inputs, at=when, delay=delay)  # checks every input before writing any
    if wait:
        runs = [client.wait(run.id, timeout=timeout) for run in runs]
    if as_json:
        click.echo(json.dumps([run.to_dict(history=False) for run in runs], indent=2))
    else:
        for run in runs:
            _print_run(run, False, history=False)
    if wait and any(run.status != "succeeded" for run in runs):
        sys.exit(1)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(run_id, as_json) -> None:
    """Show a run: its steps and its event history."""
    _setup()
    _print_run(_client().get(run_id), as_json)


@main.command()
@click.option("--status", "status_", default=None, help="Only runs in this status.")
@click.option("--saga", default=None, help="Only runs of this saga.")
@click.option("--since", default=None, help="Only runs started at or after this time (ISO 8601: 2026-12-01, "
                                             "2026-12-01T10:00Z; no zone = UTC).")
@click.option("--until", default=None, help="Only runs started before this time (ISO 8601).")
@click.option("--key", "key", default=None, help="The run started with this idempotency key.")
@click.option("--input", "input_fields", multiple=True, metavar="FIELD=VALUE",
              help="Only runs whose input has this top-level field with this value (repeatable; a text "
                   "comparison: 17 finds 17 and \"17\").")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0, MAX_OFFSET), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def runs(status_, saga, since, until, key, input_fields, limit, offset, as_json) -> None:
    """List runs, newest first; the options filter (all must hold)."""
    if saga is not None:
        check_text(saga, "--saga")  # PostgreSQL refuses a NUL in a query, UTF-8 a lone surrogate
    filters: dict = {}
    try:
        if since is not None:
            filters["since"] = parse_time(since, "--since")
        if until is not None:
            filters["until"] = parse_time(until, "--until")
    except SagaflowError as exc:
        raise click.BadParameter(str(exc)) from None
    if key is not None:
        filters["idempotency_key"] = key
    fields = {}
    for term in input_fields:
        field, sep, value = term.partition("=")
        if not sep:
            raise click.BadParameter(_clean(f"--input takes FIELD=VALUE, got {term!r:.80}"))
        fields[field] = value
    if fields:
        filters["input"] = fields
    _setup()
    page = _client().list(status=status_, saga=saga, limit=limit, offset=offset, **filters)
    if as_json:
        click.echo(json.dumps({"items": [r.to_dict(history=False) for r in page], "total": page.total,
                               "total_is_exact": page.total_is_exact}, indent=2))
        return
    for r in page:
        click.echo(_clean(f"{r.id}  {r.saga:<18} {r.status:<20} {r.created_at:%Y-%m-%d %H:%M:%S}"))
    click.echo(f"{len(page)} of {page.total}{'' if page.total_is_exact else '+'} runs")


def _by(reason: str | None) -> Origin:
    """Who asks, as the operator event records it: the OS user running the command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = f"uid {os.getuid()}"
    return Origin(actor=user, source="cli", reason=reason)


@main.command()
@click.argument("run_id")
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel(run_id, reason, as_json) -> None:
    """Cancel a pending, running or waiting run: it stops before its next step and undoes what completed."""
    _setup()
    _print_run(_client().cancel(run_id, by=_by(reason)), as_json, history=False)


@main.command()
@click.argument("run_id")
@click.argument("name")
@click.option("--payload", "payload_json", default=None,
              help='The signal\'s payload, any JSON value (the gate\'s result): \'{"approved_by": "ann"}\'.')
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def signal(run_id, name, payload_json, reason, as_json) -> None:
    """Deliver signal NAME to a run: the gate waiting for it passes (a signal sent early is kept for it)."""
    settings = _setup()
    payload = None
    if payload_json is not None:
        payload = json_loads(payload_json, "--payload", settings.json_limits)
    _print_run(_client().signal(run_id, name, payload, by=_by(reason)), as_json, history=False)


@main.command()
@click.argument("run_id")
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def retry(run_id, reason, as_json) -> None:
    """Resume the compensations of a run in compensation_failed."""
    _setup()
    _print_run(_client().retry(run_id, by=_by(reason)), as_json, history=False)


@main.command()
@click.argument("run_id")
@click.option("--input", "input_json", default=None,
              help="The new run's input (a JSON object); default: the old run's.")
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def restart(run_id, input_json, reason, as_json) -> None:
    """Start a new run of a final run's saga, with its input (or --input); the two are linked."""
    settings = _setup()
    data = json_loads(input_json, "--input", settings.json_limits) if input_json is not None else None
    if data is not None and not isinstance(data, dict):
        raise click.BadParameter("--input must be a JSON object")
    _print_run(_client().restart(run_id, data, by=_by(reason)), as_json, history=False)


@main.command()
@click.argument("run_id")
@click.option("--note", required=True, help="How the run was settled by hand (kept in its history).")
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def resolve(run_id, note, reason, as_json) -> None:
    """Settle a compensation_failed or stuck run by hand: it becomes resolved, nothing more runs."""
    _setup()
    _print_run(_client().resolve(run_id, note, by=_by(reason)), as_json, history=False)


@main.command()
@click.option("--older-than", "older_than", required=True, metavar="DURATION",
              help="Delete runs that ended longer ago than this: 90s, 15m, 12h, 30d.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(older_than, dry_run, as_json) -> None:
    """Delete old runs that ended (succeeded, compensated, cancelled, failed, resolved), with their steps,
    events and signals; never a live, waiting, stuck or compensation_failed run. Metrics keep their counts."""
    try:
        age = parse_duration(older_than, "--older-than")
    except SagaflowError as exc:
        raise click.BadParameter(str(exc)) from None
    _setup()
    result = _client().prune(age, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"runs": result.runs, "by_status": result.by_status, "dry_run": result.dry_run,
                               "cutoff": result.cutoff.isoformat() if result.cutoff else None}, indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    detail = ", ".join(f"{status} {n}" for status, n in sorted(result.by_status.items()))
    click.echo(f"{verb} {result.runs} run{'' if result.runs == 1 else 's'} that ended before "
               f"{result.cutoff:%Y-%m-%d %H:%M:%S} UTC{f' ({detail})' if detail else ''}")


@main.command()
@click.option("--saga", default=None, help="Only runs of this saga.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(saga, as_json) -> None:
    """Counts by status and saga, success rate, run and step duration percentiles."""
    if saga is not None:
        check_text(saga, "--saga")
    _setup()
    data = _client().stats(saga)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"runs: {data['total']}")
    for status, n in data["by_status"].items():
        if n:
            click.echo(f"  {status:<20} {n}")
    rate = data["success_rate"]
    click.echo(f"success rate: {'-' if rate is None else f'{rate:.1%}'} of the runs that ended")
    for name, per_status in data["by_saga"].items():
        click.echo(_clean(f"{name}: " + ", ".join(f"{s} {n}" for s, n in per_status.items())))
    for key, entry in data["run_duration_seconds"].items():
        click.echo(_clean(f"  {key:<36} n={entry['count']} p50={entry['p50']:.3f}s p90={entry['p90']:.3f}s "
                          f"p99={entry['p99']:.3f}s max={entry['max']:.3f}s"))


@main.command()
@click.option("--stall-timeout", type=SECONDS, default=None,
              help="Seconds without progress before a run counts as stalled (default SAGAFLOW_STALL_TIMEOUT).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def recover(stall_timeout, as_json) -> None:
    """Re-drive stalled runs now: the recovery sweeper that beat runs every SAGAFLOW_RECOVERY_INTERVAL.
    Safe to run while workers and other sweepers run."""
    settings = _setup()
    from sagaflow.runtime.recovery import recover_stalled

    done = recover_stalled(stall_timeout)
    for r in done:
        if as_json:
            click.echo(json.dumps({"run_id": r.run_id, "saga": r.saga, "action": r.action, "index": r.index,
                                   "revoked": list(r.revoked)}))
        else:
            click.echo(_clean(f"{r.run_id}  {r.saga:<18} {r.action}"
                              + (f" from step {r.index}" if r.action in ("resume", "errback") else "")))
    if not as_json:
        stall = settings.stall_timeout if stall_timeout is None else stall_timeout
        click.echo(f"{len(done)} stalled runs re-driven (stall timeout {stall:g} s)", err=True)


def _print_run(run: Run, as_json: bool, history: bool = True) -> None:
    if as_json:
        click.echo(json.dumps(run.to_dict(history=history), indent=2))
        return
    # Every line through _clean: errors, names and event details are stored data, and may hold anything.
    click.echo(_clean(f"run {run.id}  {run.saga} v{run.saga_version}  {run.status}"
                      + ("  (cancel requested)" if run.cancel_requested and not run.is_final else "")
                      + (f"  (starts at {run.start_at.isoformat()})"
                         if run.status == "scheduled" and run.start_at else "")))
    if run.error:
        click.echo(_clean(f"error: {run.error}"))
    if not history:
        return
    for s in run.steps:
        error = s.compensation_error or s.error or ""
        click.echo(_clean(f"  {s.index:>2} {s.name:<22} {s.status:<20} attempts={s.attempts}"
                          + (f" undo_attempts={s.compensation_attempts}" if s.compensation_attempts else "")
                          + (f"  until {s.deadline_at.isoformat()}" if s.status == "waiting" and s.deadline_at
                             else "")
                          + (f"  {error}" if error else "")))
    for e in run.events:
        detail = " ".join(f"{k}={v}" for k, v in (e.detail or {}).items())
        click.echo(_clean(f"  {e.at:%H:%M:%S.%f}"[:-3] + f"  {e.kind:<24} {e.step or '':<22} {detail}"))


# ---------------------------------------------------------------------------------------------- db


@main.group()
def schedule() -> None:
    """Start a saga on a cron schedule (UTC): add, list, pause, resume, remove."""


def _print_schedule(item: Schedule, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(item.to_dict(), indent=2))
        return
    state = "paused" if item.paused else f"next {item.next_fire_at.isoformat()}"
    click.echo(_clean(f"{item.name:<24} {item.saga:<24} {item.cron:<20} catchup={item.catchup:<5} {state}"))


@schedule.command("add")
@click.argument("name")
@click.option("--saga", required=True, help="The saga each tick starts.")
@click.option("--cron", required=True, help='A cron expression in UTC: "0 2 * * *" (02:00 every day); six '
                                            'fields put the seconds last.')
@click.option("--input", "input_json", default="{}", help="Each run's input, a JSON object.")
@click.option("--catchup", type=click.Choice(["skip", "once"]), default=None,
              help="Ticks missed while no worker swept: skip them, or run once (default SAGAFLOW_SCHEDULE_CATCHUP).")
@click.option("--paused", is_flag=True, help="Add it paused (sagaflow schedule resume starts it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_add(name, saga, cron, input_json, catchup, paused, as_json) -> None:
    """Add schedule NAME: start --saga on every tick of --cron, one run per tick."""
    settings = _setup()
    data = json_loads(input_json, "--input", settings.json_limits)
    _print_schedule(_client().add_schedule(name, saga, cron, data, catchup=catchup, paused=paused), as_json)


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_list(as_json) -> None:
    """The schedules, by name."""
    _setup()
    items = _client().schedules()
    if as_json:
        click.echo(json.dumps([item.to_dict() for item in items], indent=2))
        return
    for item in items:
        _print_schedule(item, False)


@schedule.command("pause")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_pause(name, as_json) -> None:
    """Pause schedule NAME: no tick fires until it is resumed."""
    _setup()
    _print_schedule(_client().pause_schedule(name), as_json)


@schedule.command("resume")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_resume(name, as_json) -> None:
    """Resume schedule NAME from its next tick (the ticks that fell while paused never fire)."""
    _setup()
    _print_schedule(_client().resume_schedule(name), as_json)


@schedule.command("remove")
@click.argument("name")
def schedule_remove(name) -> None:
    """Remove schedule NAME (the runs it started stay)."""
    _setup()
    _client().remove_schedule(name)
    click.echo(_clean(f"schedule {name} removed"))


@main.group()
def db() -> None:
    """Database schema (Alembic migrations shipped with sagaflow)."""


def _migrate(action: str, revision: str) -> str:
    """Run alembic's upgrade or downgrade to REVISION; an unknown or unreachable revision is one line that
    lists the known ones. Returns where the database is now ('0002 (head)'): upgrading to an older revision
    changes nothing, and says so."""
    import alembic.util

    # The schema commands are the one place a face runs the store's migrations (Alembic) directly.
    from sagaflow.store import migrate

    check_text(revision, "the revision")
    settings = _configure()
    client = _open_client()  # a bad SAGAFLOW_DATABASE_URL, a missing driver or SQLite folder: one line, first
    try:
        getattr(migrate, action)(settings.database_url, revision)
    except alembic.util.CommandError as exc:
        raise click.ClickException(_clean(
            f"cannot {action} to revision {revision!r}: {exc}. Revisions: {_revisions()} "
            f"(`sagaflow db upgrade` goes to head; `sagaflow db downgrade base` drops every table)")) from None
    current = client.schema_revision()
    return "base (no tables)" if current is None else current + (
        " (head)" if current == migrate.head_revision() else "")


def _revisions() -> str:
    from alembic.script import ScriptDirectory

    from sagaflow.store.migrate import MIGRATIONS

    return ", ".join(["head"] + [r.revision for r in ScriptDirectory(str(MIGRATIONS)).walk_revisions()] + ["base"])


@db.command()
@click.argument("revision", default="head")
def upgrade(revision) -> None:
    """Create or update the tables (to REVISION, default head)."""
    click.echo(_clean(f"database at {_migrate('upgrade', revision)}: {_database()}"))


@db.command()
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def downgrade(revision, yes) -> None:
    """Undo migrations down to REVISION ('base' drops every sagaflow table, and the runs in them)."""
    check_text(revision, "the revision")
    _configure()
    if not yes and _known_revision(revision):  # an unknown one fails below, listing the known ones
        what = "drops every sagaflow table and every run in them" if revision == "base" else \
            "drops the tables and columns added after it"
        if not sys.stdin.isatty():
            raise click.ClickException(_clean(
                f"downgrading {_database()} to {revision} {what}: add --yes to confirm"))
        click.confirm(_clean(f"Downgrading {_database()} to {revision} {what}. Continue?"), abort=True,
                      err=True)
    click.echo(_clean(f"database at {_migrate('downgrade', revision)}: {_database()}"))


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    from sagaflow.store.migrate import MIGRATIONS

    return revision == "base" or revision in {r.revision for r in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}


@db.command()
def current() -> None:
    """Print the database's revision (and whether it is the latest)."""
    from sagaflow.store import migrate

    _configure()
    revision = _open_client().schema_revision()
    head = migrate.head_revision()
    if revision is None:
        click.echo(_clean(f"base (no tables): {_database()}; run `sagaflow db upgrade`"))
    else:
        where = " (head)" if revision == head else f" (head is {head}: run `sagaflow db upgrade`)"
        click.echo(_clean(f"{revision}{where}: {_database()}"))


@db.command()
def history() -> None:
    """List the migrations, newest first, marking the database's own."""
    from alembic.script import ScriptDirectory

    from sagaflow.store.migrate import MIGRATIONS

    _configure()
    revision = _open_client().schema_revision()
    for script in ScriptDirectory(str(MIGRATIONS)).walk_revisions():
        mark = "  (current)" if script.revision == revision else ""
        click.echo(_clean(f"{script.revision}  {(script.doc or '').splitlines()[0] if script.doc else ''}{mark}"))


# ---------------------------------------------------------------------------------------------- demo


@main.command()
@click.option("--timeout", type=SECONDS, default=120.0, show_default=True, help="Seconds to wait for the runs.")
def demo(timeout) -> None:
    """Run a success and a failure of each example saga, with a worker started for the occasion."""
    from sagaflow.demo import run_demo

    settings = _setup(need_schema=False)
    _open_client()  # the demo creates the tables itself; the URL, driver and folder must work
    sys.exit(run_demo(settings, timeout=timeout))


if __name__ == "__main__":
    main()
