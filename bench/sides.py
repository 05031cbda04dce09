"""The sides a phase runs: sagaflow (with compensation, or switched off by policy), checked in SQL; the plain
Celery chain on Celery's defaults (the baseline) and on sagaflow's settings, checked through the record its
last task writes to Redis; and the peers: celery-saga (bench/peer_celery_saga.py), checked in its Redis
documents, and DBOS (bench/peer_dbos.py), checked in its PostgreSQL tables. Each starts a run, says when it
finished, counts the finished runs and checks that every run ended as it should."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from bench.services import dsn

FINAL = ("succeeded", "compensated", "compensation_failed", "cancelled", "failed")


class Side:
    """What every side has beyond starting and checking runs: a worker to pause while other sides run (only
    DBOS's executors poll when idle, so only they are paused)."""

    label = ""

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


class SagaflowSide(Side):
    """Starts sagaflow runs with SagaClient and checks them in SQL (psycopg2, autocommit, its own connection)."""

    label = "sagaflow"

    def __init__(self, database_url: str) -> None:
        import psycopg2

        from bench.sagas import BY_STEPS
        from sagaflow.client import SagaClient

        self.by_steps = BY_STEPS
        self.client = SagaClient()
        self.pg = psycopg2.connect(dsn(database_url))
        self.pg.autocommit = True

    def sql(self, query: str, params=()) -> list[tuple]:
        with self.pg.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def reset(self) -> None:
        self.sql("TRUNCATE saga_map_items, saga_signals, saga_events, saga_steps, saga_runs")

    def start(self, steps: int, fail_at: int | None) -> str:
        saga = "bench_w2" if fail_at is not None else self.by_steps[steps]
        return self.client.start(saga, {}).id

    def finished_at(self, run_id: str) -> float | None:
        rows = self.sql("SELECT EXTRACT(EPOCH FROM finished_at) FROM saga_runs WHERE id = %s AND status IN %s",
                        (run_id, FINAL))
        return float(rows[0][0]) if rows else None

    def final_count(self) -> int:
        return self.sql("SELECT count(*) FROM saga_runs WHERE status IN %s", (FINAL,))[0][0]

    def last_finish(self) -> float:
        return float(self.sql("SELECT EXTRACT(EPOCH FROM max(finished_at)) FROM saga_runs")[0][0])

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        """Every run succeeded with every step done; or (W2) compensated: the failing step failed and the
        steps before it were each compensated once, latest first."""
        problems = []
        runs = dict(self.sql("SELECT status, count(*) FROM saga_runs GROUP BY status"))
        step_rows = dict(self.sql("SELECT status, count(*) FROM saga_steps GROUP BY status"))
        if fail_at is None:
            if runs != {"succeeded": n}:
                problems.append(f"runs by status {runs}, expected {{'succeeded': {n}}}")
            if step_rows != {"succeeded": n * steps}:
                problems.append(f"steps by status {step_rows}, expected {{'succeeded': {n * steps}}}")
            return problems
        if runs != {"compensated": n}:
            problems.append(f"runs by status {runs}, expected {{'compensated': {n}}}")
        expected_steps = {"compensated": n * fail_at, "failed": n, **({"skipped": n * (steps - fail_at - 1)}
                                                                      if steps - fail_at - 1 else {})}
        if step_rows != expected_steps:
            problems.append(f"steps by status {step_rows}, expected {expected_steps}")
        order = ",".join(f"s{i}" for i in range(fail_at - 1, -1, -1))
        in_order = self.sql(
            "SELECT count(*) FROM (SELECT run_id, string_agg(step, ',' ORDER BY id) AS o FROM saga_events "
            "WHERE kind = 'compensation_succeeded' GROUP BY run_id) x WHERE o = %s", (order,))[0][0]
        if in_order != n:
            problems.append(f"{in_order} of {n} runs compensated exactly {order}, in that order")
        return problems

    def table_bytes(self) -> dict[str, int]:
        names = ("saga_runs", "saga_steps", "saga_events")
        row = self.sql("SELECT " + ", ".join(f"pg_total_relation_size('{t}')" for t in names))[0]
        return dict(zip(names, row, strict=True))


class PolicyOffSide(SagaflowSide):
    """sagaflow runs with compensation switched off by policy (SAGAFLOW_SAGA_ENABLED=false in this process,
    which decides at start): plain chains of the same step tasks, checked in SQL (the run row alone)."""

    label = "sagaflow, compensation off"

    def __init__(self, sagaflow_side: SagaflowSide) -> None:
        self.by_steps = sagaflow_side.by_steps
        self.client = sagaflow_side.client
        self.pg = sagaflow_side.pg

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        problems = []
        runs = dict(self.sql("SELECT status || ' ' || mode, count(*) FROM saga_runs GROUP BY 1"))
        if runs != {"succeeded plain": n}:
            problems.append(f"runs by status and mode {runs}, expected {{'succeeded plain': {n}}}")
        rows = self.sql("SELECT (SELECT count(*) FROM saga_steps), (SELECT count(*) FROM saga_events)")[0]
        if rows != (0, 0):
            problems.append(f"{rows[0]} step rows and {rows[1]} events, expected none (the run row alone)")
        return problems


class OneSagaSide(SagaflowSide):
    """W1 runs of one saga (the limits phase: ``bench_w1_limits`` against ``bench_w1``, both on the sagaflow
    worker, so the two sides share the tables: each checks its own saga's runs only)."""

    def __init__(self, sagaflow_side: SagaflowSide, saga: str, label: str) -> None:
        self.by_steps = {4: saga}
        self.saga = saga
        self.label = label
        self.client = sagaflow_side.client
        self.pg = sagaflow_side.pg

    def reset(self) -> None:
        super().reset()
        self.sql("TRUNCATE saga_slots, saga_slot_waiters, saga_rate_starts")

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        runs = dict(self.sql("SELECT status, count(*) FROM saga_runs WHERE saga = %s GROUP BY status", (self.saga,)))
        steps_done = dict(self.sql("SELECT s.status, count(*) FROM saga_steps s JOIN saga_runs r ON r.id = s.run_id "
                                   "WHERE r.saga = %s GROUP BY s.status", (self.saga,)))
        problems = []
        if runs != {"succeeded": n}:
            problems.append(f"{self.saga} runs by status {runs}, expected {{'succeeded': {n}}}")
        if steps_done != {"succeeded": n * steps}:
            problems.append(f"{self.saga} steps by status {steps_done}, expected {{'succeeded': {n * steps}}}")
        return problems


class PlainSide(Side):
    """Starts plain chains and reads the record their last task writes (bench/plain.py). ``same=True``: the
    chain on sagaflow's Celery settings instead of Celery's defaults plus acks_late."""

    def __init__(self, redis_url: str, errback: str, same: bool = False, env: dict | None = None) -> None:
        import redis

        from bench import plain

        plain.configure(redis_url, env)
        self.plain = plain
        self.app = plain.same_app if same else plain.app
        self.queue = plain.SAME_QUEUE if same else plain.QUEUE
        self.label = "plain, sagaflow's settings" if same else "plain"
        self.key = "plain_same" if same else "plain"
        self.errback = errback
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.phase = "none"

    def reset(self) -> None:
        self.redis.delete(self.plain.outcome_key(self.phase))
        self.phase = uuid.uuid4().hex[:12]

    def start(self, steps: int, fail_at: int | None) -> str:
        run_id = str(uuid.uuid4())
        self.plain.build_chain(run_id, steps, self.phase, fail_at, self.errback, on=self.app).apply_async()
        return run_id

    def finished_at(self, run_id: str) -> float | None:
        value = self.redis.hget(self.plain.outcome_key(self.phase), run_id)
        return float(value.split()[1]) if value else None

    def final_count(self) -> int:
        return self.redis.hlen(self.plain.outcome_key(self.phase))

    def last_finish(self) -> float:
        return max(float(v.split()[1]) for v in self.redis.hvals(self.plain.outcome_key(self.phase)))

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        values = self.redis.hvals(self.plain.outcome_key(self.phase))
        good = sum(v.split()[0] == "1" for v in values)
        if len(values) == n and good == n:
            return []
        what = "ran every step, in order" if fail_at is None else "compensated every earlier step, in reverse"
        return [f"{good} of {n} runs {what} ({len(values)} recorded)"]


class CelerySagaSide(Side):
    """celery-saga 0.1.1 (bench/peer_celery_saga.py): each run is one JSON document in Redis, read back with
    MGET. W1 and W2 only (4 steps)."""

    label = "celery-saga"
    key = "celery_saga"
    FINAL = ("completed", "compensated", "failed")

    def __init__(self, redis_url: str) -> None:
        import redis

        from bench import peer_celery_saga

        peer_celery_saga.configure(redis_url)
        self.peer = peer_celery_saga
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.ids: list[str] = []

    def reset(self) -> None:
        for i in range(0, len(self.ids), 1000):
            self.redis.delete(*(f"celery_saga:{x}" for x in self.ids[i:i + 1000]))
        self.ids = []

    def start(self, steps: int, fail_at: int | None) -> str:
        if steps != self.peer.STEPS:
            raise ValueError(f"the celery-saga peer runs {self.peer.STEPS} steps, not {steps}")
        run_id = self.peer.start(fail_at)
        self.ids.append(run_id)
        return run_id

    def documents(self, ids: list[str]) -> list[dict | None]:
        out: list[dict | None] = []
        for i in range(0, len(ids), 500):
            out += [json.loads(v) if v else None
                    for v in self.redis.mget([f"celery_saga:{x}" for x in ids[i:i + 500]])]
        return out

    @staticmethod
    def _time(doc: dict) -> float:
        return datetime.fromisoformat(doc["updated_at"]).timestamp()

    def finished_at(self, run_id: str) -> float | None:
        (doc,) = self.documents([run_id])
        return self._time(doc) if doc and doc["status"] in self.FINAL else None

    def final_count(self) -> int:
        return sum(1 for d in self.documents(self.ids) if d and d["status"] in self.FINAL)

    def last_finish(self) -> float:
        return max(self._time(d) for d in self.documents(self.ids) if d)

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        docs = self.documents(self.ids)
        if fail_at is None:
            want = ("completed", ["success"] * steps)
        else:
            want = ("compensated", ["compensated"] * fail_at + ["failed"] + ["pending"] * (steps - fail_at - 1))
        good = sum(1 for d in docs if d and (d["status"], [s["status"] for s in d["steps"]]) == want)
        if len(docs) == n and good == n:
            return []
        return [f"{good} of {n} runs ended {want[0]} with steps {want[1]} ({len(docs)} started)"]


class DbosSide(Side):
    """DBOS 3.4 (bench/peer_dbos.py): enqueued with DBOSClient, run by the executor processes, checked in its
    system database. Its executors poll PostgreSQL even when idle, so they are paused (SIGSTOP) while other
    sides run, and resumed (SIGCONT) for their own runs and before a reset."""

    label = "DBOS"
    key = "dbos"

    def __init__(self, database_url: str) -> None:
        import psycopg2
        from dbos import DBOSClient

        from bench import peer_dbos
        from bench.services import dsn

        self.peer = peer_dbos
        self.url = database_url
        self.client: DBOSClient | None = None
        self.pg = psycopg2.connect(dsn(database_url))
        self.pg.autocommit = True
        self.workers: list = []
        self.paused = False

    def connect(self) -> None:
        """Once an executor has created DBOS's tables (a DBOSClient runs no migrations)."""
        from dbos import DBOSClient

        self.client = DBOSClient(system_database_url=self.url)

    def close(self) -> None:
        if self.client is not None:
            self.client.destroy()
        self.pg.close()

    def pause(self) -> None:
        if not self.paused:
            for w in self.workers:
                w.signal_stop()
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            for w in self.workers:
                w.signal_continue()
            self.paused = False

    def sql(self, query: str, params=()) -> list[tuple]:
        with self.pg.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def reset(self) -> None:
        paused = self.paused
        self.resume()  # a paused executor may hold a row lock of its last poll
        self.sql("DELETE FROM dbos.operation_outputs; DELETE FROM dbos.workflow_status")
        if paused:
            self.pause()

    def start(self, steps: int, fail_at: int | None) -> str:
        if steps != self.peer.STEPS:
            raise ValueError(f"the DBOS peer runs {self.peer.STEPS} steps, not {steps}")
        assert self.client is not None
        name = "bench_w2" if fail_at is not None else "bench_w1"
        return self.client.enqueue({"workflow_name": name, "queue_name": self.peer.QUEUE}).get_workflow_id()

    def finished_at(self, run_id: str) -> float | None:
        rows = self.sql("SELECT completed_at FROM dbos.workflow_status WHERE workflow_uuid = %s "
                        "AND status IN ('SUCCESS', 'ERROR')", (run_id,))
        return rows[0][0] / 1000 if rows and rows[0][0] else None

    def final_count(self) -> int:
        return self.sql("SELECT count(*) FROM dbos.workflow_status WHERE status IN ('SUCCESS', 'ERROR')")[0][0]

    def last_finish(self) -> float:
        return self.sql("SELECT max(completed_at) FROM dbos.workflow_status")[0][0] / 1000

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        problems = []
        status = "SUCCESS" if fail_at is None else "ERROR"
        runs = dict(self.sql("SELECT status, count(*) FROM dbos.workflow_status GROUP BY status"))
        if runs != {status: n}:
            problems.append(f"workflows by status {runs}, expected {{{status!r}: {n}}}")
        order = self.peer.expected_order(fail_at)
        in_order = self.sql(
            "SELECT count(*) FROM (SELECT string_agg(function_name, ',' ORDER BY function_id) AS o "
            "FROM dbos.operation_outputs GROUP BY workflow_uuid) x WHERE o = %s", (order,))[0][0]
        if in_order != n:
            problems.append(f"{in_order} of {n} workflows recorded exactly {order}, in that order")
        return problems
