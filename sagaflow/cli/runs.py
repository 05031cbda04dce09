"""The commands on runs: start, status, runs (search), cancel, signal, retry, restart, resolve, prune, stats
and recover, and how a run is printed."""

from __future__ import annotations

import getpass
import json
import os
import sys

import click

from sagaflow.cli.base import MAX_LIMIT, MAX_OFFSET, SECONDS, clean, main, new_client, setup
from sagaflow.errors import SagaflowError
from sagaflow.model.events import Origin
from sagaflow.model.query import parse_duration, parse_time
from sagaflow.model.snapshots import Run
from sagaflow.safejson import check_text
from sagaflow.safejson import loads as json_loads


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
    settings = setup()
    when = parse_time(at, "--at") if at is not None else None
    if input_file is not None:
        _start_batch(settings, saga, input_file, input_json, idempotency_key, when, delay, wait, timeout, as_json)
        return
    # Parsed under SAGAFLOW_JSON_MAX_DEPTH/_BYTES without recursion: a deep value is refused, not a crash.
    data = json_loads(input_json, "--input", settings.json_limits)
    client = new_client()
    run = client.start(saga, data, idempotency_key=idempotency_key, at=when, delay=delay)  # checks everything first
    if wait:
        run = client.wait(run.id, timeout=timeout)
    print_run(run, as_json, history=wait)
    if wait and run.status != "succeeded":
        sys.exit(1)


def _start_batch(settings, saga, input_file, input_json, idempotency_key, when, delay, wait, timeout,
                 as_json) -> None:
    """``start --input-file``: every line parsed first (a bad one is named, and nothing starts), then one
    start_many; prints a line (or, with --json, an object) per run."""
    if input_json != "{}" or idempotency_key is not None:
        raise click.UsageError("--input-file gives each run's input: leave out --input and --idempotency-key")
    inputs = []
    try:
        for number, line in enumerate(input_file, 1):
            if line.strip():
                data = json_loads(line, f"line {number} of --input-file", settings.json_limits)
                if not isinstance(data, dict):
                    raise click.UsageError(f"line {number} of --input-file: a run's input must be a JSON object, "
                                           f"got {type(data).__name__}; nothing was started")
                inputs.append(data)
    except UnicodeDecodeError as exc:
        raise click.UsageError(f"--input-file is not UTF-8 text ({exc.reason} at byte {exc.start}); nothing "
                               f"was started") from None
    if not inputs:
        raise click.UsageError("--input-file has no lines: nothing to start")
    client = new_client()
    runs = client.start_many(saga, inputs, at=when, delay=delay)  # checks every input before writing any
    if wait:
        runs = [client.wait(run.id, timeout=timeout) for run in runs]
    if as_json:
        click.echo(json.dumps([run.to_dict(history=False) for run in runs], indent=2))
    else:
        for run in runs:
            print_run(run, False, history=False)
    if wait and any(run.status != "succeeded" for run in runs):
        sys.exit(1)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(run_id, as_json) -> None:
    """Show a run: its steps and its event history."""
    setup()
    print_run(new_client().get(run_id), as_json)


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
            raise click.BadParameter(clean(f"--input takes FIELD=VALUE, got {term!r:.80}"))
        fields[field] = value
    if fields:
        filters["input"] = fields
    setup()
    page = new_client().list(status=status_, saga=saga, limit=limit, offset=offset, **filters)
    if as_json:
        click.echo(json.dumps({"items": [r.to_dict(history=False) for r in page], "total": page.total,
                               "total_is_exact": page.total_is_exact}, indent=2))
        return
    for r in page:
        click.echo(clean(f"{r.id}  {r.saga:<18} {r.status:<20} {r.created_at:%Y-%m-%d %H:%M:%S}"))
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
    setup()
    print_run(new_client().cancel(run_id, by=_by(reason)), as_json, history=False)


@main.command()
@click.argument("run_id")
@click.argument("name")
@click.option("--payload", "payload_json", default=None,
              help='The signal\'s payload, any JSON value (the gate\'s result): \'{"approved_by": "ann"}\'.')
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def signal(run_id, name, payload_json, reason, as_json) -> None:
    """Deliver signal NAME to a run: the gate waiting for it passes (a signal sent early is kept for it)."""
    settings = setup()
    payload = None
    if payload_json is not None:
        payload = json_loads(payload_json, "--payload", settings.json_limits)
    print_run(new_client().signal(run_id, name, payload, by=_by(reason)), as_json, history=False)


@main.command()
@click.argument("run_id")
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def retry(run_id, reason, as_json) -> None:
    """Resume the compensations of a run in compensation_failed."""
    setup()
    print_run(new_client().retry(run_id, by=_by(reason)), as_json, history=False)


@main.command()
@click.argument("run_id")
@click.option("--input", "input_json", default=None,
              help="The new run's input (a JSON object); default: the old run's.")
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def restart(run_id, input_json, reason, as_json) -> None:
    """Start a new run of a final run's saga, with its input (or --input); the two are linked."""
    settings = setup()
    data = json_loads(input_json, "--input", settings.json_limits) if input_json is not None else None
    if data is not None and not isinstance(data, dict):
        raise click.BadParameter("--input must be a JSON object")
    print_run(new_client().restart(run_id, data, by=_by(reason)), as_json, history=False)


@main.command()
@click.argument("run_id")
@click.option("--note", required=True, help="How the run was settled by hand (kept in its history).")
@click.option("--reason", default=None, help="Why (kept with the event in the run's history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def resolve(run_id, note, reason, as_json) -> None:
    """Settle a compensation_failed or stuck run by hand: it becomes resolved, nothing more runs."""
    setup()
    print_run(new_client().resolve(run_id, note, by=_by(reason)), as_json, history=False)


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
    setup()
    result = new_client().prune(age, dry_run=dry_run)
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
    setup()
    data = new_client().stats(saga)
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
        click.echo(clean(f"{name}: " + ", ".join(f"{s} {n}" for s, n in per_status.items())))
    for key, entry in data["run_duration_seconds"].items():
        click.echo(clean(f"  {key:<36} n={entry['count']} p50={entry['p50']:.3f}s p90={entry['p90']:.3f}s "
                          f"p99={entry['p99']:.3f}s max={entry['max']:.3f}s"))


@main.command()
@click.option("--stall-timeout", type=SECONDS, default=None,
              help="Seconds without progress before a run counts as stalled (default SAGAFLOW_STALL_TIMEOUT).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def recover(stall_timeout, as_json) -> None:
    """Re-drive stalled runs now: the recovery sweeper that beat runs every SAGAFLOW_RECOVERY_INTERVAL.
    Safe to run while workers and other sweepers run."""
    settings = setup()
    from sagaflow.runtime.recovery import recover_stalled

    done = recover_stalled(stall_timeout)
    for r in done:
        if as_json:
            click.echo(json.dumps({"run_id": r.run_id, "saga": r.saga, "action": r.action, "index": r.index,
                                   "revoked": list(r.revoked)}))
        else:
            click.echo(clean(f"{r.run_id}  {r.saga:<18} {r.action}"
                              + (f" from step {r.index}" if r.action in ("resume", "errback") else "")))
    if not as_json:
        stall = settings.stall_timeout if stall_timeout is None else stall_timeout
        click.echo(f"{len(done)} stalled runs re-driven (stall timeout {stall:g} s)", err=True)


def print_run(run: Run, as_json: bool, history: bool = True) -> None:
    if as_json:
        click.echo(json.dumps(run.to_dict(history=history), indent=2))
        return
    # Every line through clean: errors, names and event details are stored data, and may hold anything.
    click.echo(clean(f"run {run.id}  {run.saga} v{run.saga_version}  {run.status}"
                      + ("  (cancel requested)" if run.cancel_requested and not run.is_final else "")
                      + (f"  (starts at {run.start_at.isoformat()})"
                         if run.status == "scheduled" and run.start_at else "")))
    if run.error:
        click.echo(clean(f"error: {run.error}"))
    if not history:
        return
    for s in run.steps:
        error = s.compensation_error or s.error or ""
        click.echo(clean(f"  {s.index:>2} {s.name:<22} {s.status:<20} attempts={s.attempts}"
                          + (f" undo_attempts={s.compensation_attempts}" if s.compensation_attempts else "")
                          + (f"  until {s.deadline_at.isoformat()}" if s.status == "waiting" and s.deadline_at
                             else "")
                          + (f"  {error}" if error else "")))
    for e in run.events:
        detail = " ".join(f"{k}={v}" for k, v in (e.detail or {}).items())
        click.echo(clean(f"  {e.at:%H:%M:%S.%f}"[:-3] + f"  {e.kind:<24} {e.step or '':<22} {detail}"))
