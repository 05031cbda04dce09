"""Worker liveness (issue 14): a worker's main process SIGKILLed mid-step, with the default step time limit
(300 s, so the lease would run for minutes), no --beat and no beat service: a plain `sagaflow worker`
(started afterwards, or already running) notices the dead worker from its missing heartbeats and re-drives
the run within seconds; and fifty sweepers at once re-drive each stalled run once.

Every worker here runs with the default liveness settings (dead after 15 s, sweep offered every 5 s)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from sagaflow import SagaClient
from sagaflow.app import get_settings, get_store
from sagaflow.model.definition import registry
from sagaflow.store.workers import set_current_worker
from sagaflow.tasks.effects import effects_of
from tests.helpers import kinds, wait_for
from tests.workers import start_worker, stop_worker

pytestmark = pytest.mark.integration

ALL_DONE = [("do", "reserve"), ("do", "pay"), ("do", "ship")]
RECOVERY_TIMES: list[float] = []  # seconds from the kill to the run's end, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def saga_registered(settings):
    import tests.sagas_liveness  # noqa: F401 - registers the saga in this process
    yield
    if RECOVERY_TIMES:
        ordered = sorted(RECOVERY_TIMES)
        print(f"\nrecovery after SIGKILL: n={len(ordered)} p50={ordered[len(ordered) // 2]:.1f} s "
              f"max={ordered[-1]:.1f} s")


def live_worker(settings, name: str):
    """A plain `sagaflow worker`: no --beat, the default liveness and step-timeout settings."""
    imports = ",".join(dict.fromkeys((*settings.imports, "tests.sagas_liveness")))
    return start_worker(settings, name, concurrency=2, log_name=f"{name}.log", args=("-Q", "liveness,celery"),
                        env={"SAGAFLOW_IMPORTS": imports})


def worker_id(name: str, proc) -> str:
    return f"{name}@{os.uname().nodename}:{proc.pid}"


def kill_mid_step(client, doomed, step: str = "pay", sleep: float = 5.0):
    run = client.start("liveness", {"sleep": {step: sleep}})
    wait_for(lambda: client.get(run.id).step(step).status == "running", timeout=30, what=f"{step} to start")
    doomed.send_signal(signal.SIGKILL)  # the main process only: its pool children die with it (PDEATHSIG)
    doomed.wait()
    return run, time.monotonic()


def check_recovered(client, run_id: str, killed_at: float, dead: str):
    run = client.wait(run_id, timeout=60)
    took = time.monotonic() - killed_at
    RECOVERY_TIMES.append(took)
    assert run.status == "succeeded", run.status
    assert effects_of(run_id) == ALL_DONE  # each effect exactly once
    recovered = [e for e in run.events if e.kind == "run_recovered"]
    assert len(recovered) == 1 and recovered[0].detail["dead_workers"] == [dead]
    assert run.step("pay").attempts == 2
    assert took < 60
    return run


def test_a_killed_workers_run_is_recovered_by_a_plain_new_worker_within_a_minute(settings):
    client = SagaClient()
    assert registry.get("liveness").steps[1].timeout is None and get_settings().default_step_timeout == 300
    doomed = live_worker(settings, "doomed1")
    try:
        run, killed_at = kill_mid_step(client, doomed)
        rescuer = live_worker(settings, "rescuer1")
        try:
            check_recovered(client, run.id, killed_at, worker_id("doomed1", doomed))
        finally:
            stop_worker(rescuer)
    finally:
        stop_worker(doomed)
    # A clean stop removes the worker from the list; the dead one is still there until forgotten.
    live = [w["id"] for w in get_store().live_workers(3600)]
    assert worker_id("rescuer1", rescuer) not in live


def test_a_live_worker_recovers_a_killed_workers_run_without_any_restart(settings):
    client = SagaClient()
    doomed = live_worker(settings, "doomed2")
    live = []
    try:
        run = client.start("liveness", {"sleep": {"pay": 12.0}})  # outlasts starting two workers
        wait_for(lambda: client.get(run.id).step("pay").status == "running", timeout=30, what="pay to start")
        live = [live_worker(settings, "alive2a"), live_worker(settings, "alive2b")]
        holds = {w["id"]: w["holds"] for w in get_store().live_workers(15)}
        assert holds[worker_id("doomed2", doomed)] == [{"run_id": run.id, "step": "pay", "status": "running"}]
        assert holds[worker_id("alive2a", live[0])] == []
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        check_recovered(client, run.id, time.monotonic(), worker_id("doomed2", doomed))
    finally:
        for proc in (*live, doomed):
            stop_worker(proc)


@pytest.mark.soak  # about 5 minutes: `pytest -m soak -s tests/integration/test_liveness.py` prints p50 and max
def test_ten_kills_each_run_recovered_once_within_a_minute(settings):
    """Measured recovery times: a new doomed worker per kill, one live worker throughout."""
    client = SagaClient()
    rescuer = live_worker(settings, "rescuer3")
    try:
        for i in range(10):
            doomed = live_worker(settings, f"doomed3-{i}")
            try:
                # The rescuer may take the step too: only a run whose step the doomed worker holds counts.
                run = client.start("liveness", {"sleep": {"pay": 3.0}})
                wait_for(lambda r=run: client.get(r.id).step("pay").status == "running", timeout=30,
                         what="pay to start")
                holder = [w["id"] for w in get_store().live_workers(15) if w["holds"]]
                doomed.send_signal(signal.SIGKILL)
                doomed.wait()
                killed_at = time.monotonic()
                if holder != [worker_id(f"doomed3-{i}", doomed)]:
                    client.wait(run.id, timeout=60)
                    assert effects_of(run.id) == ALL_DONE
                    continue
                check_recovered(client, run.id, killed_at, worker_id(f"doomed3-{i}", doomed))
            finally:
                stop_worker(doomed)
    finally:
        stop_worker(rescuer)


def test_fifty_sweepers_at_once_re_drive_each_stalled_run_once(settings):
    from sagaflow.runtime import liveness, recovery

    client = SagaClient()
    store = get_store()
    ghost = f"ghost-{uuid.uuid4().hex[:8]}@nowhere:1"
    saga = registry.get("liveness")
    stalled = []
    set_current_worker(ghost)  # claims made "by" a worker that then dies: lease 300 s, heartbeat gone
    try:
        store.heartbeat(ghost, "nowhere", 1)
        for _ in range(10):
            run_id = str(uuid.uuid4())
            store.create_run(run_id, saga.name, saga.version, {}, [(s.name, s.compensate is not None)
                                                                    for s in saga.steps])
            assert store.claim_step(run_id, 0, f"{uuid.uuid4()}:0", [], 300).attempt == 1
            stalled.append(run_id)
    finally:
        set_current_worker(None)
    assert not set(stalled) & {r for r, _ in store.stalled_runs(600, dead_after=15)}
    store.remove_worker(ghost)  # as if it was gone for good

    re_driven: list[str] = []
    won: list[int] = []
    lock = threading.Lock()

    def sweeper(i: int):
        if i % 2:  # half call the sweeper entry itself (no lease): the take-over's compare-and-set decides
            ids = [r.run_id for r in recovery.recover_stalled()]
        else:      # half offer through the worker's lease, as every worker does each interval
            ids = []
            count = liveness.sweep_once(f"sweeper-{i}", 5)
            if count is not None:
                with lock:
                    won.append(i)
        with lock:
            re_driven.extend(ids)

    threads = [threading.Thread(target=sweeper, args=(i,)) for i in range(50)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(won) <= 1
    events = {run_id: kinds(client.get(run_id), "run_recovered") for run_id in stalled}
    assert all(len(e) == 1 for e in events.values()), events  # each re-driven once, by one sweeper
    assert len([r for r in re_driven if r in stalled]) <= len(stalled)

    worker = live_worker(settings, "after-sweep")
    try:
        for run_id in stalled:
            run = client.wait(run_id, timeout=60)
            assert run.status == "succeeded" and effects_of(run_id) == ALL_DONE
    finally:
        stop_worker(worker)


def test_three_workers_on_three_queues_one_killed_every_run_final_with_each_effect_once(settings):
    """Step(queue=...): each step and its compensation on its queue; errbacks and the sweeper's own work on
    the default queue (worker a); worker b killed mid-step, and a replacement for its queue started."""
    from tests.conftest import ARTIFACTS

    client = SagaClient()
    imports = ",".join(dict.fromkeys((*settings.imports, "tests.sagas_liveness")))

    def worker(name, queues):
        return start_worker(settings, name, concurrency=2, log_name=f"{name}.log", args=("-Q", queues),
                            env={"SAGAFLOW_IMPORTS": imports})

    a, b, c = worker("route-a", "route_a,celery"), worker("route-b", "route_b"), worker("route-c", "route_c")
    b2 = None
    try:
        ok = [client.start("routed", {}) for _ in range(3)]
        undone = [client.start("routed", {"fail_at": "gamma"}) for _ in range(3)]
        for run in ok + undone:
            client.wait(run.id, timeout=60)
        slow = client.start("routed", {"sleep": {"beta": 30}})  # b dies holding it
        wait_for(lambda: client.get(slow.id).step("beta").status == "running", timeout=30, what="beta to start")
        b.send_signal(signal.SIGKILL)
        b.wait()
        b2 = worker("route-b2", "route_b")
        slow = client.wait(slow.id, timeout=120)
    finally:
        for proc in (a, b, c, b2):
            if proc is not None:
                stop_worker(proc)

    node = os.uname().nodename
    for run in ok:
        run = client.get(run.id)
        assert run.status == "succeeded" and effects_of(run.id) == [("do", "alpha"), ("do", "beta"), ("do", "gamma")]
        assert [s.result["node"] for s in run.steps] == [f"route-a@{node}", f"route-b@{node}", f"route-c@{node}"]
    for run in undone:
        run = client.get(run.id)
        assert run.status == "compensated"
        assert effects_of(run.id) == [("do", "alpha"), ("do", "beta"), ("undo", "beta"), ("undo", "alpha")]
    assert slow.status == "succeeded"
    assert effects_of(slow.id) == [("do", "alpha"), ("do", "beta"), ("do", "gamma")]
    assert slow.step("beta").result["node"] == f"route-b2@{node}"
    recovered = [e for e in slow.events if e.kind == "run_recovered"]
    assert len(recovered) == 1 and recovered[0].detail["dead_workers"] == [worker_id("route-b", b)]
    logs = {name: (ARTIFACTS / f"{name}.log").read_text() for name in ("route-a", "route-b", "route-c")}
    assert "routed.beta.compensate[" in logs["route-b"] and "routed.alpha.compensate[" in logs["route-a"]
    assert "routed.beta.compensate[" not in logs["route-a"] + logs["route-c"]
    # The errbacks ran (the runs were compensated) on the default queue: route-a, or the suite's own worker.
    assert "on_step_failed[" not in logs["route-b"] + logs["route-c"]
