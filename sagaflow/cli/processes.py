"""The long-running commands: a worker, the web app, Flower, and the demo (which starts a worker of its own)."""

from __future__ import annotations

import logging
import sys

import click

from sagaflow.cli.base import POOLS, SECONDS, clean, commands_celery_app, main, open_client, settings_error, setup
from sagaflow.errors import SagaflowError
from sagaflow.logs import LEVELS
from sagaflow.safejson import check_text


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
    settings = setup()
    if pool is None and settings.worker_pool not in POOLS:
        raise settings_error(f"SAGAFLOW_WORKER_POOL must be one of {', '.join(POOLS)}, got {settings.worker_pool!r}")
    if concurrency is None and settings.worker_concurrency < 1:
        raise settings_error(f"SAGAFLOW_WORKER_CONCURRENCY must be at least 1, got {settings.worker_concurrency}")
    from sagaflow.hosting import check_worker

    app = commands_celery_app(settings)
    # The checks every worker of this app runs at worker_init (celery -A too), first here as one line: the
    # Celery settings sagaflow needs, the visibility timeout against every registered saga, a non-atomic step
    # without a compensation, a typo in SAGAFLOW_ALERT_HOOK.
    try:
        check_worker(app)
    except SagaflowError as exc:
        if str(exc).startswith("Celery setting"):
            raise settings_error(exc) from None
        raise click.ClickException(clean(exc)) from None
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
        settings = setup()
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
    settings = setup(need_schema=False)
    app = commands_celery_app(settings)
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


@main.command()
@click.option("--timeout", type=SECONDS, default=120.0, show_default=True, help="Seconds to wait for the runs.")
def demo(timeout) -> None:
    """Run a success and a failure of each example saga, with a worker started for the occasion."""
    from sagaflow.demo import run_demo

    settings = setup(need_schema=False)
    open_client()  # the demo creates the tables itself; the URL, driver and folder must work
    sys.exit(run_demo(settings, timeout=timeout))
