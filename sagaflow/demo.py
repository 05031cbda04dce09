"""`sagaflow demo`: start a worker, run a success and a failure of each example saga, and print, for each
run, its status and the order in which its actions and compensations ran (from the event history).

On a bare machine it uses SQLite and the embedded broker under SAGAFLOW_HOME; with SAGAFLOW_DATABASE_URL
and SAGAFLOW_BROKER_URL set it uses those. Exits non-zero if a run does not end as expected.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import click

from sagaflow.app import celery_app
from sagaflow.config.settings import Settings
from sagaflow.logs import escape_controls
from sagaflow.model import Run

# (saga, input, expected final status). Names only: the sagas come from SAGAFLOW_IMPORTS (the examples).
SCENARIOS: list[tuple[str, dict, str]] = [
    ("create_booking", {"customer": "c1"}, "succeeded"),
    ("create_booking", {"customer": "c2", "fail_at": "add_calendar"}, "compensated"),
    ("collect_payment", {"amount": 42, "flaky": {"process_payment": 1}}, "succeeded"),
    ("collect_payment", {"amount": 42, "fail_at": "log_analytics"}, "compensated"),
    ("data_ingest", {"source": "s3://bucket/report.pdf"}, "succeeded"),
    ("data_ingest", {"source": "s3://bucket/bad.pdf", "fail_at": "embed",
                     "fail_compensation": {"parse": 1}}, "compensated"),
    # Two branches in parallel, joined before the request; then a branch that fails: the other is undone.
    ("request_data", {"study": "s-42"}, "succeeded"),
    ("request_data", {"study": "s-43", "fail_at": "identify_data_owners"}, "compensated"),
]


def run_demo(settings: Settings, timeout: float = 120.0) -> int:
    from sagaflow.client import SagaClient
    from sagaflow.store.migrate import upgrade

    where = "embedded (SQLite + embedded Redis)" if settings.embedded_broker else "configured"
    click.echo(f"sagaflow demo: {where} database {_safe(settings.database_url)}")
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)

    broker = worker = None
    log_path = settings.home / "demo-worker.log"
    try:
        if settings.embedded_broker:
            from sagaflow.embedded import start_unless_running

            broker = start_unless_running(settings.embedded_socket)
        with open(log_path, "w") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "sagaflow", "worker", "-n", f"demo-{os.getpid()}@%h"],
                env={**os.environ, **settings.as_env()}, stdout=log_file, stderr=subprocess.STDOUT,
            )
        _wait_for_worker(worker, log_path)
        client = SagaClient()
        started = time.monotonic()
        runs = [(client.start(saga, data), expected) for saga, data, expected in SCENARIOS]
        click.echo(f"started {len(runs)} runs; waiting for them to finish")
        failures = 0
        for run, expected in runs:
            final = client.wait(run.id, timeout=timeout)
            ok = final.status == expected
            failures += not ok
            # Stored data, shown with its control characters escaped (as `sagaflow status` does).
            click.echo("\n" + escape_controls(f"{final.saga:<16} {final.status:<12}"
                                              f"{'' if ok else f'  (expected {expected})'}"
                                              f"  input={_short(final.input)}"))
            click.echo(escape_controls(f"  {describe_order(final)}"))
        click.echo(f"\n{len(runs) - failures} of {len(runs)} runs ended as expected "
                   f"in {time.monotonic() - started:.1f} s. Inspect one with: sagaflow status <run id>")
        return 1 if failures else 0
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if broker is not None:
            broker.stop()


def describe_order(run: Run) -> str:
    """'create_invoice -> send_email -> add_calendar FAILED -> undo send_email -> undo create_invoice'."""
    order = []
    for e in run.events:
        if e.kind == "step_succeeded":
            order.append(str(e.step))
        elif e.kind == "step_failed":
            order.append(f"{e.step} FAILED")
        elif e.kind == "group_joined":
            order.append("(branches joined)")
        elif e.kind == "step_retried":
            order.append(f"({e.step} retried)")
        elif e.kind == "compensation_succeeded":
            order.append(f"undo {e.step}")
        elif e.kind == "compensation_retried":
            order.append(f"(undo {e.step} retried)")
    return " -> ".join(order) + f"  [{run.id}]"


def _wait_for_worker(worker: subprocess.Popen, log_path, timeout: float = 60.0) -> None:
    click.echo("starting a worker", nl=False)
    deadline = time.monotonic() + timeout
    while not celery_app.control.ping(timeout=0.5):
        if worker.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text()[-2000:]
            raise click.ClickException(f"the demo worker did not start; its log ({log_path}) ends with:\n{tail}")
        click.echo(".", nl=False)
    click.echo(" ready")


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _short(data: dict) -> str:
    text = ", ".join(f"{k}={v}" for k, v in data.items())
    return text if len(text) <= 70 else text[:67] + "..."
