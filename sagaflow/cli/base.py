"""What every `sagaflow` command shares: the settings read once and checked (a bad SAGAFLOW_* value is one
line, exit status 2), the saga modules and files loaded, the database opened with one-line errors, and the
command group that turns every user error into one ``Error: ...`` line."""

from __future__ import annotations

import importlib
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
from sagaflow.logs import escape_controls, setup_logging
from sagaflow.safejson import check_text

MAX_LIMIT = 1000  # runs --limit, as SagaClient.list allows
MAX_OFFSET = 10**12  # runs --offset: far past any table, well inside a 64-bit integer
POOLS = ("prefork", "threads", "solo", "processes", "eventlet", "gevent", "custom")  # Celery's -P



def clean(value) -> str:
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
                raise click.ClickException(clean(
                    f"cannot import saga module {module!r} named in SAGAFLOW_IMPORTS: it imports {exc.name!r}, "
                    f"which is not installed ({exc}); install it in this environment"
                )) from None
            raise click.ClickException(clean(
                f"cannot import saga module {module!r} named in SAGAFLOW_IMPORTS ({exc}); "
                f"run from the project folder or fix SAGAFLOW_IMPORTS"
            )) from None
        except Exception as exc:  # the module itself is broken: say where, and how to see the traceback
            raise click.ClickException(clean(
                f"cannot import saga module {module!r} named in SAGAFLOW_IMPORTS: {where_raised(exc)}; "
                f"fix it (`python -c 'import {module}'` shows the traceback) or fix SAGAFLOW_IMPORTS"
            )) from None
    try:
        app_load_sagas(settings)
    except SagaflowError as exc:  # an invalid saga file: its message names the file, line, saga, handler
        raise click.ClickException(clean(exc)) from None


def where_raised(exc: BaseException) -> str:
    """'ZeroDivisionError: division by zero (tasks/x.py:3)'; a SyntaxError names its file and line itself."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError):
        return text
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{text} ({frames[-1].filename}:{frames[-1].lineno})" if frames else text


class _SettingsError(click.ClickException):
    exit_code = 2


def settings_error(exc) -> click.ClickException:
    """A SAGAFLOW_* setting that is not valid: one line naming it and what it accepts, exit status 2."""
    return _SettingsError(clean(exc))


def settings_from_env():
    """The settings from the environment; an invalid SAGAFLOW_* value is one line naming it (status 2)."""
    try:
        settings = configure()
    except ValueError as exc:  # Settings.from_env names the variable and what it accepts
        raise settings_error(exc) from None
    # Environment bytes that are not UTF-8 arrive as lone surrogates: no driver can use such an address
    # (and a broker URL would fail only after the run's row is written).
    for name in ("SAGAFLOW_DATABASE_URL", "SAGAFLOW_BROKER_URL"):  # unset: both live under SAGAFLOW_HOME
        try:
            if os.environ.get(name):
                check_text(settings.database_url if name == "SAGAFLOW_DATABASE_URL" else settings.broker_url, name)
            else:
                check_text(str(settings.home), "SAGAFLOW_HOME")
        except SagaflowError as exc:
            raise settings_error(exc) from None
    return settings


def database_named() -> str:
    """The configured database, for a message: its URL without the password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(get_settings().database_url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: never echo it (it may hold a password)
        return "named by SAGAFLOW_DATABASE_URL"


def open_client() -> SagaClient:
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
    raise click.ClickException(clean(
        f"cannot open the database {database_named()}: {problem}. Check SAGAFLOW_DATABASE_URL (and SAGAFLOW_HOME "
        f"for the default SQLite file)"))


def setup(need_schema: bool = True):
    settings = settings_from_env()
    try:
        setup_logging(settings.log_level, settings.log_format)
    except ValueError as exc:
        raise settings_error(exc) from None
    commands_celery_app(settings)  # SAGAFLOW_CELERY_APP's module installs sagaflow on the team's app
    load_sagas(settings)
    if need_schema:
        open_client().check_schema()  # SchemaMissing says to run `sagaflow db upgrade`
    return settings


def commands_celery_app(settings):
    """The Celery app the commands use: SAGAFLOW_CELERY_APP's, or sagaflow's own (one line if it fails)."""
    try:
        return celery_app_for_commands(settings)
    except ValueError as exc:
        raise settings_error(exc) from None
    except Exception as exc:  # the user's module itself is broken: say where
        raise click.ClickException(clean(
            f"cannot load SAGAFLOW_CELERY_APP {settings.celery_app!r}: {where_raised(exc)}")) from None


def new_client() -> SagaClient:
    return SagaClient()


def _usage_error(exc: click.UsageError) -> click.ClickException:
    """A malformed option or argument as one line (Click prints the usage first), saying where help is."""
    message = exc.format_message()
    if exc.ctx is not None:
        message += f" (see `{exc.ctx.command_path} --help`)"
    error = click.ClickException(clean(message))
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
            raise click.ClickException(clean(exc)) from None
        except sqlalchemy.exc.OperationalError as exc:
            reason = " ".join(str(exc.orig).split())  # drivers end with newlines and indent their hints
            raise click.ClickException(clean(
                f"cannot use the database {database_named()}: {reason}. Check SAGAFLOW_DATABASE_URL and that the "
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
