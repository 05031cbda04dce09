"""`sagaflow db`: the schema's Alembic migrations, the one place a command runs the store's own code."""

from __future__ import annotations

import sys

import click

from sagaflow.cli.base import clean, database_named, main, open_client, settings_from_env
from sagaflow.safejson import check_text


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
    settings = settings_from_env()
    client = open_client()  # a bad SAGAFLOW_DATABASE_URL, a missing driver or SQLite folder: one line, first
    try:
        getattr(migrate, action)(settings.database_url, revision)
    except alembic.util.CommandError as exc:
        raise click.ClickException(clean(
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
    click.echo(clean(f"database at {_migrate('upgrade', revision)}: {database_named()}"))


@db.command()
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def downgrade(revision, yes) -> None:
    """Undo migrations down to REVISION ('base' drops every sagaflow table, and the runs in them)."""
    check_text(revision, "the revision")
    settings_from_env()
    if not yes and _known_revision(revision):  # an unknown one fails below, listing the known ones
        what = "drops every sagaflow table and every run in them" if revision == "base" else \
            "drops the tables and columns added after it"
        if not sys.stdin.isatty():
            raise click.ClickException(clean(
                f"downgrading {database_named()} to {revision} {what}: add --yes to confirm"))
        click.confirm(clean(f"Downgrading {database_named()} to {revision} {what}. Continue?"), abort=True,
                      err=True)
    click.echo(clean(f"database at {_migrate('downgrade', revision)}: {database_named()}"))


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    from sagaflow.store.migrate import MIGRATIONS

    return revision == "base" or revision in {r.revision for r in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}


@db.command()
def current() -> None:
    """Print the database's revision (and whether it is the latest)."""
    from sagaflow.store import migrate

    settings_from_env()
    revision = open_client().schema_revision()
    head = migrate.head_revision()
    if revision is None:
        click.echo(clean(f"base (no tables): {database_named()}; run `sagaflow db upgrade`"))
    else:
        where = " (head)" if revision == head else f" (head is {head}: run `sagaflow db upgrade`)"
        click.echo(clean(f"{revision}{where}: {database_named()}"))


@db.command()
def history() -> None:
    """List the migrations, newest first, marking the database's own."""
    from alembic.script import ScriptDirectory

    from sagaflow.store.migrate import MIGRATIONS

    settings_from_env()
    revision = open_client().schema_revision()
    for script in ScriptDirectory(str(MIGRATIONS)).walk_revisions():
        mark = "  (current)" if script.revision == revision else ""
        click.echo(clean(f"{script.revision}  {(script.doc or '').splitlines()[0] if script.doc else ''}{mark}"))
