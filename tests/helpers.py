from __future__ import annotations

import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from sqlalchemy import event

from sagaflow.model.declarative import load_saga_file
from sagaflow.model.definition import Registry, registry
from sagaflow.store import fastpath


def load_yaml_sagas(tmp_path: Path, handlers, text: str):
    """The sagas of a YAML file written from ``text`` (dedented), into a registry of their own."""
    path = tmp_path / "sagas.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return load_saga_file(path, handlers=handlers, registry=Registry())


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def wait_until_flower_enabled_events(flower_url: str, run_once: Callable[[], set], timeout: float = 60):
    """Flower tells the workers to send task events every 5 s (the first time 5 s after it starts; their
    events are off by default), and shows only the tasks that ran after that. Probe: ``run_once`` runs a saga
    to its end and returns its step task ids; again until Flower lists one of them."""
    from tests.web_client import call

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = run_once()
        for _ in range(10):
            if ids & set(call("GET", f"{flower_url}/api/tasks?limit=1000").json):
                return
            time.sleep(0.2)
    raise AssertionError(f"flower listed no task of a run within {timeout} s: it did not enable events")


def kinds(run, *only: str) -> list[tuple[str, str | None]]:
    return [(e.kind, e.step) for e in run.events if not only or e.kind in only]


def expected_after_failure(saga: str, failed: str) -> list[tuple[str, str]]:
    """Effects of a run of ``saga`` whose step ``failed`` fails for good: the earlier steps, then the undo of
    each of them that has a compensation, latest first."""
    steps = registry.get(saga).steps
    k = [s.name for s in steps].index(failed)
    done = steps[:k]
    return [("do", s.name) for s in done] + [("undo", s.name) for s in reversed(done) if s.compensate]


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (a prefork worker's pool processes), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@contextmanager
def round_trips(store):
    """Counts what goes to the database: statements (SQLAlchemy's before_cursor_execute, and the fast path's
    prepared statements, which go to the driver directly), and the BEGIN/COMMIT/ROLLBACK and pool pings of
    the transactional engine (psycopg2 sends each as a query of its own)."""
    counts = {"n": 0}

    def one(*_args, **_kwargs):
        counts["n"] += 1

    engines = {store.engine, store.fast.engine} if store.fast else {store.engine}
    hooks = [(e, name) for e in engines for name in ("before_cursor_execute", "begin", "commit", "rollback")]
    hooks += [(store.engine.pool, "checkout")]  # pool_pre_ping: a SELECT 1 on each checkout
    for target, name in hooks:
        event.listen(target, name, one)
    fastpath.STATEMENT_HOOKS.append(one)
    try:
        yield counts
    finally:
        fastpath.STATEMENT_HOOKS.remove(one)
        for target, name in hooks:
            event.remove(target, name, one)
