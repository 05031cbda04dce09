"""`sagaflow schedule`: cron schedules that start a saga on every tick (UTC)."""

from __future__ import annotations

import json

import click

from sagaflow.cli.base import clean, main, new_client, setup
from sagaflow.model.schedule import Schedule
from sagaflow.safejson import loads as json_loads


@main.group()
def schedule() -> None:
    """Start a saga on a cron schedule (UTC): add, list, pause, resume, remove."""


def _print_schedule(item: Schedule, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(item.to_dict(), indent=2))
        return
    state = "paused" if item.paused else f"next {item.next_fire_at.isoformat()}"
    click.echo(clean(f"{item.name:<24} {item.saga:<24} {item.cron:<20} catchup={item.catchup:<5} {state}"))


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
    settings = setup()
    data = json_loads(input_json, "--input", settings.json_limits)
    _print_schedule(new_client().add_schedule(name, saga, cron, data, catchup=catchup, paused=paused), as_json)


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_list(as_json) -> None:
    """The schedules, by name."""
    setup()
    items = new_client().schedules()
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
    setup()
    _print_schedule(new_client().pause_schedule(name), as_json)


@schedule.command("resume")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_resume(name, as_json) -> None:
    """Resume schedule NAME from its next tick (the ticks that fell while paused never fire)."""
    setup()
    _print_schedule(new_client().resume_schedule(name), as_json)


@schedule.command("remove")
@click.argument("name")
def schedule_remove(name) -> None:
    """Remove schedule NAME (the runs it started stay)."""
    setup()
    new_client().remove_schedule(name)
    click.echo(clean(f"schedule {name} removed"))
