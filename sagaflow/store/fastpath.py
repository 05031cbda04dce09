"""PostgreSQL: the hot transitions as one hand-written statement each, sent on an autocommit connection.

A step's success path is two of them (claim, complete): two round trips, no BEGIN and COMMIT, and one
commit that waits for the WAL flush (the completion's; CLAIM_STEP says why the claim's need not). Data-
modifying CTEs keep each transition atomic: the guarded UPDATE, its event and the run's ``updated_at``
commit together or not at all, and a concurrent claim re-checks the guard on the row it waited for
(READ COMMITTED), so the compare-and-set semantics of guards.py hold unchanged. The statements are
plain SQL text because building the same CTEs with SQLAlchemy Core cost ten times the database's own time
per call (bench/, "Performance").

The concern modules (claims.py, compensation.py, runs.py) run the same transitions as short transactions
on SQLite, and on PostgreSQL the rare ones (recovery, operator requests) and the case these statements
hand back (a cancel at claim time); each chooses between the two itself (``if self.fast:``). The
store's unit tests run on both.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections import namedtuple
from typing import Any, Callable, Sequence

from sqlalchemy import JSON, bindparam, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from sagaflow.model.events import EventKind
from sagaflow.store.counters import (
    COMPENSATION_DURATION,
    LIVE,
    LOG_INSERT,
    STARTED,
    STEP,
    STEP_DURATION,
    sql_moved,
    sql_observe,
)
from sagaflow.store.tables import UTCDateTime

log = logging.getLogger("sagaflow.store")

# PostgreSQL error codes that mean: the session that PREPAREd is not the one that EXECUTEs (a pooler in
# transaction mode, PgBouncer's pool_mode=transaction, hands each transaction any server connection).
NOT_OUR_SESSION = {"26000", "42P05"}  # prepared statement does not exist / already exists

# Every parameter the statements use: its PostgreSQL type (for PREPARE) and, where Python values need
# converting, its SQLAlchemy type.
PARAMS = {
    "run_id": ("varchar", None), "idx": ("integer", None), "token": ("varchar", None),
    "earlier": ("varchar[]", None), "task_id": ("varchar", None), "start": ("varchar", None),
    "active": ("varchar", None), "now": ("timestamp", UTCDateTime()), "lease": ("timestamp", UTCDateTime()),
    "saga": ("varchar", None), "version": ("integer", None), "input": ("json", JSON()), "key": ("varchar", None),
    "detail": ("json", JSON()),
    "result": ("json", JSON()), "error": ("text", None), "retry_in": ("float8", None),
    "worker": ("varchar", None), "final": ("varchar", None), "traceback": ("text", None),
    "runs": ("json", JSON()), "steps": ("json", JSON()), "status": ("varchar", None), "mode": ("varchar", None),
    "start_at": ("timestamp", UTCDateTime()), "deadline_at": ("timestamp", UTCDateTime()),
    "scheduled": ("json", JSON()), "priority": ("integer", None),
}
_PLACEHOLDER = re.compile(r"(?<![:\w]):(\w+)")


def _json_param(value: Any) -> str:
    return json.dumps(value)


def _timestamp_param(value: dt.datetime | None) -> dt.datetime | None:
    """Naive UTC, as UTCDateTime stores it: an aware value would be cast through the session's time zone."""
    if value is not None and value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


# How the prepared path turns a Python value into the driver's parameter (what the SQLAlchemy type does
# for the text path).
_CONVERT: dict[str, Callable[[Any], Any]] = {"json": _json_param, "timestamp": _timestamp_param}


# Sent before a statement in the same query string: a simple query of several statements is one implicit
# transaction on the server, so this applies to that statement's commit alone, in the same round trip (and
# through PgBouncer in transaction mode too).
NO_FLUSH_WAIT = "SET LOCAL synchronous_commit = off; "


class Statement:
    """One statement, run either as a server-side prepared statement (planned once per connection: the
    plan is about half of each statement's cost here) or as plain text.

    ``durable=False``: its commit returns without waiting for the WAL flush. Only for a transition whose
    loss in a PostgreSQL crash sends the step back to where it was before it, with nothing after it depending
    on it yet (CLAIM_STEP, CLAIM_COMPENSATION: see there). Every other commit stays durable, and a durable
    commit flushes the WAL up to itself, so the non-durable commits before it become durable with it."""

    def __init__(self, name: str, sql: str, durable: bool = True) -> None:
        self.name = f"sagaflow_{name}"
        self.durable = durable
        prefix = "" if durable else NO_FLUSH_WAIT
        self.params = list(dict.fromkeys(_PLACEHOLDER.findall(sql)))  # in order of first use
        typed = [bindparam(p, type_=PARAMS[p][1]) for p in self.params if PARAMS[p][1] is not None]
        self.plain = text(prefix + sql).bindparams(*typed)
        # EXECUTE goes to the driver as is, with positional parameters converted by _CONVERT.
        self.execute = f"{prefix}EXECUTE {self.name}({', '.join(['%s'] * len(self.params))})"
        self.converters = [_CONVERT.get(PARAMS[p][0], None) for p in self.params]
        self.row_type: Any = None  # a namedtuple of the result's columns, made at the first execution
        numbered = _PLACEHOLDER.sub(lambda m: f"${self.params.index(m.group(1)) + 1}", sql)
        self.prepare = (f"PREPARE {self.name}({', '.join(PARAMS[p][0] for p in self.params)}) AS {numbered}")

    def arguments(self, params: dict) -> tuple:
        return tuple(params[p] if convert is None else convert(params[p])
                     for p, convert in zip(self.params, self.converters, strict=True))


# The claim guard of guards.claimable, for a step moving from :start to :active.
_CLAIMABLE = """(status = :start
           OR (status = :active AND claim = :token AND lease_expires_at < :now)
           OR (status = :active AND claim IS NULL)
           OR (status = :active AND claim = ANY(:earlier)))"""

# Any number of runs of one saga, each with its step rows, its events and the counters' log rows, in one
# statement: client.start (one run) and client.start_many (a batch) alike, whatever the steps' kinds, a
# delayed start (status scheduled, a run_scheduled event after run_started) or a deadline. A run whose
# idempotency key is taken is skipped (ON CONFLICT DO NOTHING); the statement returns the runs it created,
# with their events' ids. A plain run (policy: compensation off) gets no step rows and, started now, no event.
CREATE_RUNS = Statement("create_runs", f"""
WITH given AS (
    SELECT * FROM json_to_recordset(CAST(:runs AS json)) AS r(id varchar, key varchar, input json, ord integer)
), run AS (
    INSERT INTO saga_runs (id, saga, saga_version, status, input, idempotency_key, cancel_requested,
                           created_at, updated_at, mode, start_at, deadline_at, priority)
    SELECT id, CAST(:saga AS varchar), CAST(:version AS integer), CAST(:status AS varchar), input, key, false,
           CAST(:now AS timestamp), CAST(:now AS timestamp), CAST(:mode AS varchar),
           CAST(:start_at AS timestamp), CAST(:deadline_at AS timestamp), CAST(:priority AS integer)
    FROM given ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id
), steps AS (
    INSERT INTO saga_steps (run_id, idx, name, status, has_compensation, attempts, compensation_attempts,
                            compensation_round_attempts, kind, best_effort, non_atomic, pivot, branch_group,
                            signal)
    SELECT run.id, step.idx, step.name, 'pending', step.has_compensation, 0, 0, 0, step.kind,
           step.best_effort, step.non_atomic, step.pivot, step.branch_group, step.signal
    FROM run, json_to_recordset(CAST(:steps AS json)) AS step(idx integer, name varchar, has_compensation boolean,
                                                 kind varchar, best_effort boolean, non_atomic boolean,
                                                 pivot boolean, branch_group integer, signal varchar)
), events AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT run_id, kind, NULL, CAST(:now AS timestamp), detail FROM (
        SELECT run.id AS run_id, given.ord, 0 AS k, '{EventKind.RUN_STARTED.value}' AS kind,
               CAST(:detail AS json) AS detail
        FROM run JOIN given ON given.id = run.id
        WHERE CAST(:mode AS varchar) <> 'plain' OR CAST(:start_at AS timestamp) IS NOT NULL
        UNION ALL
        SELECT run.id, given.ord, 1, '{EventKind.RUN_SCHEDULED.value}', CAST(:scheduled AS json)
        FROM run JOIN given ON given.id = run.id
        WHERE CAST(:start_at AS timestamp) IS NOT NULL
    ) AS e ORDER BY ord, k
    RETURNING run_id, id, kind
), counted AS (
    {LOG_INSERT}
    SELECT m.metric, CAST(:saga AS varchar), '', m.outcome, '', count(*) FROM run,
           (VALUES ('{STARTED}', ''), ('{LIVE}', CAST(:status AS varchar))) AS m(metric, outcome)
    GROUP BY m.metric, m.outcome
)
SELECT run.id,
       min(events.id) FILTER (WHERE events.kind = '{EventKind.RUN_STARTED.value}') AS started_event,
       min(events.id) FILTER (WHERE events.kind = '{EventKind.RUN_SCHEDULED.value}') AS scheduled_event
FROM run LEFT JOIN events ON events.run_id = run.id
GROUP BY run.id""")

# The claim is the one commit per step that does not wait for the WAL flush (``durable=False``): a step's
# success path is two round trips and one durable commit, the completion's. While PostgreSQL runs, the
# claim is what it always was: visible to every session at its commit, the compare-and-set that makes a
# duplicate delivery back off, the lease and the worker the sweeper's liveness reads. What a PostgreSQL
# crash (not a dropped connection, not a clean restart: both keep every commit) may forget is a claim of
# the last moments whose step has not completed since: the step's completion (or retry, or failure) is a
# durable commit, which makes the claim before it durable too, and the next step is published only after
# it. A forgotten claim leaves the step as it was before it (pending, or held by the retry it took over):
# the holder's completion no longer holds it and is dropped, and the step runs again (its outage retry, or
# the sweeper after SAGAFLOW_STALL_TIMEOUT), with the same idempotency key: the at-least-once that a crash
# during a step already means today (the step's task retries after a database outage and runs it again).
# The counters the claim logs are forgotten with it, in the same transaction.
CLAIM_STEP = Statement("claim_step", f"""
WITH run AS (
    SELECT status, cancel_requested, input FROM saga_runs WHERE id = :run_id
), claimed AS (
    UPDATE saga_steps
    SET status = 'running', attempts = attempts + 1, claim = :token, lease_expires_at = :lease,
        started_at = coalesce(started_at, :now), task_id = :task_id, worker = :worker
    WHERE run_id = :run_id AND idx = :idx AND {_CLAIMABLE}
      AND EXISTS (SELECT 1 FROM run WHERE status IN ('pending', 'running') AND NOT cancel_requested)
    RETURNING attempts, name
), started AS (
    UPDATE saga_runs SET status = 'running', updated_at = :now
    WHERE id = :run_id AND status = 'pending' AND EXISTS (SELECT 1 FROM claimed)
    RETURNING saga
), counted AS (
    {LOG_INSERT}
    SELECT '{LIVE}', saga, '', m.outcome, '', m.value FROM started,
           (VALUES ('pending', -1), ('running', 1)) AS m(outcome, value)
), event AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT :run_id, '{EventKind.STEP_STARTED.value}', name, :now, json_build_object('attempt', attempts) FROM claimed
)
SELECT run.status, run.cancel_requested, run.input, claimed.attempts,
       step.status AS step_status, step.result, step.error
FROM run
LEFT JOIN claimed ON true
LEFT JOIN saga_steps step ON step.run_id = :run_id AND step.idx = :idx""", durable=False)

# An undo's claim skips the flush wait too, for the same reason as a step's: only a PostgreSQL crash can
# forget it, and only if the undo has not completed (nor retried, nor failed) since, each a durable commit.
# The step is then back where it was (succeeded, or held by the earlier attempt) and the undo runs again
# (the sweeper re-drives a compensating run), with the same idempotency key: what a crash during an undo
# already means.
CLAIM_COMPENSATION = Statement("claim_compensation", f"""
WITH run AS (
    SELECT status, input FROM saga_runs WHERE id = :run_id
), claimed AS (
    UPDATE saga_steps
    SET status = 'compensating', compensation_attempts = compensation_attempts + 1,
        compensation_round_attempts = CASE WHEN status = 'succeeded' THEN 1
                                           ELSE compensation_round_attempts + 1 END,
        compensation_started_at = CASE WHEN status = :start OR compensation_started_at IS NULL THEN :now
                                       ELSE compensation_started_at END,
        claim = :token, lease_expires_at = :lease, compensation_task_id = :task_id, worker = :worker
    WHERE run_id = :run_id AND idx = :idx AND {_CLAIMABLE}
      AND EXISTS (SELECT 1 FROM run WHERE status = 'compensating')
    RETURNING compensation_attempts, compensation_round_attempts, name, result
), event AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT :run_id, '{EventKind.COMPENSATION_STARTED.value}', name, :now,
           json_build_object('attempt', compensation_attempts)
    FROM claimed
)
SELECT run.status, run.input, claimed.compensation_attempts, claimed.compensation_round_attempts,
       claimed.result, step.status AS step_status, step.compensation_error
FROM run
LEFT JOIN claimed ON true
LEFT JOIN saga_steps step ON step.run_id = :run_id AND step.idx = :idx""", durable=False)


_RUN_SAGA = "(SELECT saga FROM saga_runs WHERE id = :run_id)"


def _update_held(active: str, assignments: str, kind: EventKind, detail: str, touch: bool = True,
                 duration: tuple[str, str, str] | None = None):
    """A transition of the step this delivery holds: status :active and claim :token. ``touch`` moves the
    run's updated_at too; a step's success does not (one row write less per step): the recovery sweeper
    reads its finished_at instead (recovery.stalled). claims.HELD lists the same transitions for the
    transactional path (Claims._held). The event counts (counters.STEP); ``duration``: (histogram, outcome,
    the column its start is in) observes the step's or the compensation round's duration too."""
    saga = _RUN_SAGA
    observed = f"""
    UNION ALL {sql_observe(duration[0], saga, 'name', f"'{duration[1]}'", duration[2], 'held')}""" if duration else ""
    touch_run = """, touch AS (
    UPDATE saga_runs SET updated_at = :now WHERE id = :run_id AND EXISTS (SELECT 1 FROM held)
)""" if touch else ""
    return Statement(kind.value, f"""
WITH held AS (
    UPDATE saga_steps SET {assignments}
    WHERE run_id = :run_id AND idx = :idx AND status = '{active}' AND claim = :token
    RETURNING name, attempts, compensation_attempts, started_at, compensation_started_at
), event AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT :run_id, '{kind.value}', name, :now, {detail} FROM held
), counted AS (
    {LOG_INSERT}
    SELECT '{STEP}', {saga}, name, '{kind.value}', '', 1 FROM held{observed}
){touch_run}
SELECT count(*) FROM held""")


# A failed attempt's event carries its traceback when there is one (claims.with_traceback on the other path).
def _with_traceback(detail: str) -> str:
    """``detail`` (a json_build_object call) with the key ``traceback`` when :traceback is not NULL."""
    return f"json_strip_nulls({detail[:-1]}, 'traceback', CAST(:traceback AS text)))"


HELD = {
    EventKind.STEP_SUCCEEDED: _update_held(
        "running", "status = 'succeeded', result = :result, error = NULL, finished_at = :now, "
                   "lease_expires_at = NULL",
        EventKind.STEP_SUCCEEDED, "json_build_object('attempt', attempts)", touch=False,
        duration=(STEP_DURATION, "succeeded", "started_at")),
    EventKind.STEP_RETRIED: _update_held(
        "running", "lease_expires_at = :lease, error = :error",
        EventKind.STEP_RETRIED, _with_traceback(
            "json_build_object('attempt', attempts, 'error', :error, 'retry_in', :retry_in)")),
    EventKind.STEP_FAILED: _update_held(
        "running", "status = 'failed', error = :error, finished_at = :now, lease_expires_at = NULL",
        EventKind.STEP_FAILED, _with_traceback("json_build_object('error', :error)"),
        duration=(STEP_DURATION, "failed", "started_at")),
    EventKind.COMPENSATION_RETRIED: _update_held(
        "compensating", "lease_expires_at = :lease, compensation_error = :error",
        EventKind.COMPENSATION_RETRIED, _with_traceback(
            "json_build_object('attempt', compensation_attempts, 'error', :error, 'retry_in', :retry_in)")),
    EventKind.COMPENSATION_FAILED: _update_held(
        "compensating", "status = 'compensation_failed', compensation_error = :error, lease_expires_at = NULL",
        EventKind.COMPENSATION_FAILED, _with_traceback("json_build_object('error', :error)"),
        duration=(COMPENSATION_DURATION, "failed", "compensation_started_at")),
}

# The last step's completion finishes the run in the same statement (no separate finish task), unless a
# cancel came in: then the run stays running and the step's task raises SagaCancelled into its errback.
# One INSERT writes both events, so their ids keep their order (CTEs run in no defined order).
COMPLETE_LAST_STEP = Statement("complete_last_step", f"""
WITH held AS (
    UPDATE saga_steps
    SET status = 'succeeded', result = :result, error = NULL, finished_at = :now, lease_expires_at = NULL
    WHERE run_id = :run_id AND idx = :idx AND status = 'running' AND claim = :token
    RETURNING name, attempts, started_at
), run AS (
    UPDATE saga_runs
    SET updated_at = :now,
        status = CASE WHEN status = 'running' AND NOT cancel_requested THEN 'succeeded' ELSE status END,
        finished_at = CASE WHEN status = 'running' AND NOT cancel_requested THEN :now ELSE finished_at END
    WHERE id = :run_id AND EXISTS (SELECT 1 FROM held)
    RETURNING status, saga, created_at
), events AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT :run_id, '{EventKind.STEP_SUCCEEDED.value}', name, :now, json_build_object('attempt', attempts) FROM held
    UNION ALL
    SELECT :run_id, '{EventKind.RUN_SUCCEEDED.value}', NULL, :now, CAST(NULL AS json)
    FROM run WHERE status = 'succeeded'
), counted AS (
    {LOG_INSERT}
    SELECT '{STEP}', run.saga, held.name, '{EventKind.STEP_SUCCEEDED.value}', '', 1 FROM held, run
    UNION ALL {sql_observe(STEP_DURATION, 'run.saga', 'held.name', "'succeeded'", 'held.started_at', 'held, run')}
    UNION ALL {sql_moved('saga', "'running'", 'status', 'created_at', 'run', "status = 'succeeded'")}
)
SELECT (SELECT status FROM run) AS status""")

# (``'run_' || status`` in the two statements below is EventKind.run_ended(status), in SQL: run_compensated,
# run_cancelled.)
# A compensation's completion finishes the compensation when no other undo remains (compensated, or
# cancelled when a cancel started it), whatever the position of the step in its chain. An undo that gave up
# counts as remaining: its errback ends the run compensation_failed (compensation._finish_compensation).
COMPLETE_COMPENSATION = Statement("complete_compensation", f"""
WITH held AS (
    UPDATE saga_steps
    SET status = 'compensated', compensation_error = NULL, compensated_at = :now, lease_expires_at = NULL
    WHERE run_id = :run_id AND idx = :idx AND status = 'compensating' AND claim = :token
    RETURNING name, compensation_started_at
), remaining AS (
    SELECT count(*) AS n FROM saga_steps
    WHERE run_id = :run_id AND idx <> :idx
      AND ((has_compensation AND status IN ('succeeded', 'compensating')) OR status = 'compensation_failed')
), run AS (
    UPDATE saga_runs
    SET updated_at = :now,
        status = CASE WHEN status = 'compensating' AND (SELECT n FROM remaining) = 0
                      THEN CASE WHEN cancel_requested THEN 'cancelled' ELSE 'compensated' END
                      ELSE status END,
        finished_at = CASE WHEN status = 'compensating' AND (SELECT n FROM remaining) = 0 THEN :now
                           ELSE finished_at END
    WHERE id = :run_id AND EXISTS (SELECT 1 FROM held)
    RETURNING status, saga, created_at
), events AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT :run_id, '{EventKind.COMPENSATION_SUCCEEDED.value}', name, :now, CAST(NULL AS json) FROM held
    UNION ALL
    SELECT :run_id, 'run_' || status, NULL, :now, NULL FROM run WHERE status IN ('compensated', 'cancelled')
), counted AS (
    {LOG_INSERT}
    SELECT '{STEP}', run.saga, held.name, '{EventKind.COMPENSATION_SUCCEEDED.value}', '', 1 FROM held, run
    UNION ALL {sql_observe(COMPENSATION_DURATION, 'run.saga', 'held.name', "'succeeded'",
                           'held.compensation_started_at', 'held, run')}
    UNION ALL {sql_moved('saga', "'compensating'", 'status', 'created_at', 'run',
                         "status IN ('compensated', 'cancelled')")}
)
SELECT (SELECT status FROM run) AS status""")


def _compensation_begins(run_guard: str = "true") -> str:
    """The CTEs that move a live run to compensating, shared by the errback (BEGIN_COMPENSATION) and a
    failure that begins its own undos (FAIL_AND_COMPENSATE): ``todo`` (the steps to undo), ``old`` (the
    status the run leaves, pending or running, read under the row lock the UPDATE then holds; ``run_guard``
    must hold too), ``run`` (running -> compensating, or straight to compensated or cancelled with nothing
    to undo) and ``skipped`` (the steps that never started)."""
    return f"""todo AS (
    SELECT idx FROM saga_steps WHERE run_id = :run_id AND status = 'succeeded' AND has_compensation
), old AS (
    SELECT id, status FROM saga_runs
    WHERE id = :run_id AND status IN ('pending', 'running') AND {run_guard} FOR UPDATE
), run AS (
    UPDATE saga_runs
    SET updated_at = :now,
        status = CASE WHEN EXISTS (SELECT 1 FROM todo) THEN 'compensating'
                      WHEN saga_runs.cancel_requested THEN 'cancelled' ELSE 'compensated' END,
        finished_at = CASE WHEN EXISTS (SELECT 1 FROM todo) THEN NULL ELSE :now END
    FROM old
    WHERE saga_runs.id = old.id AND saga_runs.status = old.status
    RETURNING saga_runs.status, old.status AS was, saga_runs.saga, saga_runs.created_at
), skipped AS (
    UPDATE saga_steps SET status = 'skipped'
    WHERE run_id = :run_id AND status = 'pending' AND EXISTS (SELECT 1 FROM run)
)"""


# The run's end event when the move ended it at once (``'run_' || status`` is EventKind.run_ended(status), in
# SQL: run_compensated, run_cancelled), and what the move does to the live gauge and the ended counters.
_RUN_ENDED_EVENT = ("SELECT :run_id, 'run_' || status, NULL, :now, CAST(NULL AS json) FROM run "
                    "WHERE status <> 'compensating'")
_RUN_MOVED = sql_moved('saga', 'was', 'status', 'created_at', 'run')
_TODO = "(SELECT array_agg(idx ORDER BY idx DESC) FROM todo) AS todo"

# The errback: running -> compensating, with the step it was fired for recorded as failed if it is still
# running (lost: hard time limit, dead process) and the steps that never started as skipped; with nothing
# to undo, the run ends at once. The steps to undo are read in the statement's snapshot: in a linear saga
# no other step can complete meanwhile (the chain is at the failed step).
BEGIN_COMPENSATION = Statement("begin_compensation", f"""
WITH {_compensation_begins()}, lost AS (
    UPDATE saga_steps SET status = 'failed', error = :error, finished_at = :now, lease_expires_at = NULL
    WHERE run_id = :run_id AND idx = :idx AND status = 'running' AND EXISTS (SELECT 1 FROM run)
    RETURNING name, started_at
), events AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT :run_id, '{EventKind.STEP_FAILED.value}', name, :now, json_build_object('error', :error) FROM lost
    UNION ALL
    {_RUN_ENDED_EVENT}
), counted AS (
    {LOG_INSERT}
    SELECT '{STEP}', run.saga, lost.name, '{EventKind.STEP_FAILED.value}', '', 1 FROM lost, run
    UNION ALL {sql_observe(STEP_DURATION, 'run.saga', 'lost.name', "'failed'", 'lost.started_at', 'lost, run')}
    UNION ALL {_RUN_MOVED}
)
SELECT (SELECT status FROM run) AS status, {_TODO}""")

# A step of a linear saga failed for good in its own task: its failure and the errback's move to
# compensating (the same CTEs) in one statement, so the step's task publishes the undos itself, with no
# errback hop. Only for the delivery that holds the step (claim :token); the run moves only if it is still
# live, else ``status`` is NULL and the errback decides as before (runtime/steps.py).
FAIL_AND_COMPENSATE = Statement("fail_and_compensate", f"""
WITH held AS (
    UPDATE saga_steps SET status = 'failed', error = :error, finished_at = :now, lease_expires_at = NULL
    WHERE run_id = :run_id AND idx = :idx AND status = 'running' AND claim = :token
    RETURNING name, started_at
), {_compensation_begins("EXISTS (SELECT 1 FROM held)")}, touched AS (
    -- the run was not live (the errback decides): the step's failure still moves its updated_at
    UPDATE saga_runs SET updated_at = :now
    WHERE id = :run_id AND EXISTS (SELECT 1 FROM held) AND NOT EXISTS (SELECT 1 FROM old)
), events AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT :run_id, '{EventKind.STEP_FAILED.value}', name, :now,
           {_with_traceback("json_build_object('error', :error)")} FROM held
    UNION ALL
    {_RUN_ENDED_EVENT}
), counted AS (
    {LOG_INSERT}
    SELECT '{STEP}', {_RUN_SAGA}, held.name, '{EventKind.STEP_FAILED.value}', '', 1 FROM held
    UNION ALL {sql_observe(STEP_DURATION, _RUN_SAGA, 'held.name', "'failed'", 'held.started_at', 'held')}
    UNION ALL {_RUN_MOVED}
)
SELECT (SELECT count(*) FROM held) AS held, (SELECT status FROM run) AS status, {_TODO}""")

FINISH_RUN = Statement("finish_run", f"""
WITH done AS (
    UPDATE saga_runs SET status = 'succeeded', updated_at = :now, finished_at = :now
    WHERE id = :run_id AND status = 'running' AND NOT cancel_requested
    RETURNING id, saga, created_at, status
), event AS (
    INSERT INTO saga_events (run_id, kind, step, at, detail)
    SELECT id, '{EventKind.RUN_SUCCEEDED.value}', NULL, :now, NULL FROM done
), counted AS (
    {LOG_INSERT}
    {sql_moved('saga', "'running'", 'status', 'created_at', 'done')}
)
SELECT count(*) FROM done""")

# A plain run (policy: compensation off) is created by CREATE_RUNS (the run row and its counters) and ends in
# one statement: no step rows, no events.
END_PLAIN_RUN = Statement("end_plain_run", f"""
WITH old AS (
    SELECT id, status FROM saga_runs
    WHERE id = :run_id AND status IN ('pending', 'running') AND mode = 'plain' FOR UPDATE
), done AS (
    UPDATE saga_runs SET status = :final, updated_at = :now, finished_at = :now, error = :error
    FROM old WHERE saga_runs.id = old.id AND saga_runs.status = old.status
    RETURNING saga_runs.saga, saga_runs.created_at, saga_runs.status, old.status AS was
), counted AS (
    {LOG_INSERT}
    {sql_moved('saga', 'was', 'status', 'created_at', 'done')}
)
SELECT count(*) FROM done""")


# Called with the engine after each prepared statement, which bypasses SQLAlchemy's execution events: the
# bench's statement counters listen here too (bench/sqlcount.py).
STATEMENT_HOOKS: list[Callable[[Engine], None]] = []

ALL = (CREATE_RUNS, CLAIM_STEP, CLAIM_COMPENSATION, COMPLETE_LAST_STEP, COMPLETE_COMPENSATION,
       BEGIN_COMPENSATION, FAIL_AND_COMPENSATE, FINISH_RUN, END_PLAIN_RUN, *HELD.values())


def _undos(row) -> list[int] | None:
    """What a move to compensating returns: the steps to undo, latest first ([] when the run ended at once),
    or None when the run was not live."""
    if row.status is None:
        return None
    return list(row.todo or []) if row.status == "compensating" else []


class FastPath:
    """The statements above, on an autocommit engine. Each method returns the raw row; the Store
    turns it into its usual answer. ``prepared=False`` sends them as text, for a connection pooler that
    does not keep sessions (PgBouncer in transaction mode)."""

    def __init__(self, engine: Engine, prepared: bool = True) -> None:
        self.engine = engine
        self.prepared = prepared
        if prepared:
            @event.listens_for(engine, "connect")
            def _prepare(dbapi_conn, _record):
                if not self.prepared:
                    return
                with dbapi_conn.cursor() as cur:
                    try:
                        for statement in ALL:
                            cur.execute(statement.prepare)
                    except engine.dialect.loaded_dbapi.Error as exc:
                        # A new connection whose session already has them: a pooler shares sessions.
                        if getattr(exc, "pgcode", None) not in NOT_OUR_SESSION:
                            raise
                        self._pooler_detected(exc)

    def _pooler_detected(self, exc: Exception) -> None:
        """A transaction-mode pooler (PgBouncer) is between us and PostgreSQL: the statements are sent as
        text from now on in this process, as SAGAFLOW_PREPARED_STATEMENTS=false would (one planning each)."""
        if self.prepared:
            self.prepared = False
            log.warning("prepared_statements_off", extra={
                "reason": f"{getattr(exc, 'pgcode', '')} {str(exc).strip()[:120]}",
                "next": "the hot statements go as text: behind PgBouncer in transaction mode, set "
                        "SAGAFLOW_PREPARED_STATEMENTS=false to skip this detection"})

    def _one(self, statement: Statement, **params):
        rows = self._rows(statement, False, params)
        return rows[0] if rows else None

    def _all(self, statement: Statement, **params) -> list:
        return self._rows(statement, True, params)

    def _rows(self, statement: Statement, many: bool, params: dict) -> list:
        """The statement's first row (``many`` False) or all its rows, as a list."""
        if not self.prepared:
            with self.engine.connect() as conn:
                result = conn.execute(statement.plain, {p: params[p] for p in statement.params})
                if many:
                    return list(result)
                first = result.first()
                return [first] if first is not None else []
        # The prepared statements go straight to the driver: going through SQLAlchemy's Connection and
        # result objects cost about as much Python time as the database spent on the statement.
        arguments = statement.arguments(params)
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            raw = self.engine.raw_connection()
        except dbapi_error as exc:  # connecting, or preparing on connect (_prepare), failed
            raise DBAPIError.instance(None, None, exc, dbapi_error, connection_invalidated=True,
                                      dialect=self.engine.dialect) from exc
        try:
            cursor = raw.cursor()
            try:
                cursor.execute(statement.execute, arguments)
                rows: list | None = list(cursor.fetchall()) if many else [cursor.fetchone()]
                if statement.row_type is None:
                    # mypy types only namedtuples whose fields are written in the source, not read at run time
                    statement.row_type = namedtuple(  # type: ignore[misc]
                        "Row", [d[0] for d in cursor.description], rename=True)
            finally:
                cursor.close()
        except dbapi_error as exc:
            if getattr(exc, "pgcode", None) in NOT_OUR_SESSION:  # EXECUTE reached another session: it ran nothing
                self._pooler_detected(exc)
                rows = None
            else:
                # As SQLAlchemy would: a dropped connection leaves the pool, and the error is SQLAlchemy's
                # (OperationalError...), which the runtime's database-outage retries catch.
                invalidated = self.engine.dialect.is_disconnect(exc, raw.dbapi_connection, None)
                if invalidated:
                    raw.invalidate(exc)
                raise DBAPIError.instance(statement.execute, arguments, exc, dbapi_error,
                                          connection_invalidated=invalidated, dialect=self.engine.dialect) from exc
        finally:
            raw.close()
        if rows is None:  # sent again as text, on a connection of its own
            return self._rows(statement, many, params)
        for hook in STATEMENT_HOOKS:
            hook(self.engine)
        return [statement.row_type(*row) for row in rows if row is not None]

    def create_runs(self, saga: str, version: int, runs: Sequence[tuple[str, dict, str | None]], steps: Sequence,
                    now: dt.datetime, *, mode: str, status: str, start_at: dt.datetime | None,
                    deadline_at: dt.datetime | None, priority: int = 0) -> dict[str, tuple[int | None, int | None]]:
        """CREATE_RUNS of ``runs`` ((id, input, idempotency key), the keys distinct): {id of each run created:
        (its run_started event's id, its run_scheduled event's id)}; a run whose key is taken is left out."""
        rows = self._all(
            CREATE_RUNS, saga=saga, version=version, status=status, mode=mode, now=now, start_at=start_at,
            deadline_at=deadline_at, priority=priority, detail={"saga": saga, "version": version},
            scheduled={"start_at": start_at.isoformat()} if start_at is not None else {},
            runs=[{"id": run_id, "key": key, "input": input, "ord": i} for i, (run_id, input, key) in enumerate(runs)],
            steps=[{"idx": i, "name": s.name, "has_compensation": s.has_compensation, "kind": s.kind,
                    "best_effort": s.best_effort, "non_atomic": s.non_atomic, "pivot": s.pivot,
                    "branch_group": s.group, "signal": s.signal} for i, s in enumerate(steps)])
        return {row.id: (row.started_event, row.scheduled_event) for row in rows}

    def claim_step(self, run_id: str, idx: int, token: str, earlier: Sequence[str], lease: dt.datetime,
                   now: dt.datetime, worker: str | None = None):
        return self._one(CLAIM_STEP, run_id=run_id, idx=idx, token=token, earlier=list(earlier), lease=lease,
                         now=now, task_id=token.rsplit(":", 1)[0], start="pending", active="running",
                         worker=worker)

    def claim_compensation(self, run_id: str, idx: int, token: str, earlier: Sequence[str], lease: dt.datetime,
                           now: dt.datetime, worker: str | None = None):
        return self._one(CLAIM_COMPENSATION, run_id=run_id, idx=idx, token=token, earlier=list(earlier),
                         lease=lease, now=now, task_id=token.rsplit(":", 1)[0], start="succeeded",
                         active="compensating", worker=worker)

    def update_held(self, kind: EventKind, run_id: str, idx: int, token: str, now: dt.datetime, *,
                    result: Any = None, error: str | None = None, lease: dt.datetime | None = None,
                    retry_in: float | None = None, traceback: str | None = None) -> bool:
        return bool(self._one(HELD[kind], run_id=run_id, idx=idx, token=token, now=now, result=result,
                              error=error, lease=lease, retry_in=retry_in, traceback=traceback)[0])

    def complete_last_step(self, run_id: str, idx: int, token: str, result: Any, now: dt.datetime) -> str | None:
        """The run's status after, or None when this delivery no longer held the step."""
        return self._one(COMPLETE_LAST_STEP, run_id=run_id, idx=idx, token=token, result=result, now=now).status

    def complete_compensation(self, run_id: str, idx: int, token: str, now: dt.datetime) -> str | None:
        """The run's status after, or None when this delivery no longer held the compensation."""
        return self._one(COMPLETE_COMPENSATION, run_id=run_id, idx=idx, token=token, now=now).status

    def begin_compensation(self, run_id: str, idx: int, lost_error: str, now: dt.datetime) -> list[int] | None:
        """The steps to undo, latest first; None when the run was not live (another errback began it)."""
        return _undos(self._one(BEGIN_COMPENSATION, run_id=run_id, idx=idx, error=lost_error, now=now))

    def fail_and_compensate(self, run_id: str, idx: int, token: str, error: str, traceback: str | None,
                            now: dt.datetime) -> tuple[bool, list[int] | None]:
        """(this delivery held the step, the steps to undo latest first: None when the run was not live)."""
        row = self._one(FAIL_AND_COMPENSATE, run_id=run_id, idx=idx, token=token, error=error,
                        traceback=traceback, now=now)
        return (True, _undos(row)) if row.held else (False, None)

    def finish_run(self, run_id: str, now: dt.datetime) -> bool:
        return bool(self._one(FINISH_RUN, run_id=run_id, now=now)[0])

    def end_plain_run(self, run_id: str, final: str, error: str | None, now: dt.datetime) -> bool:
        return bool(self._one(END_PLAIN_RUN, run_id=run_id, final=final, error=error, now=now)[0])
