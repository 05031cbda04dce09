"""The benchmark harness's own logic, with no servers: figures and targets, the plain baseline's canvas,
the bench sagas and the profile summary. `pytest -m bench` runs the whole harness end to end."""

from __future__ import annotations

import pytest
from celery import signature

from bench import harness, plain
from bench.figures import SIZES, Figure, Target, expected_figures, percentile, render_table
from bench.harness import parse_args
from bench.profile import summarize


def test_every_phase_has_figures_and_every_target_of_the_issue_is_among_them():
    names = expected_figures(SIZES["full"])
    assert len(names) == len(set(names))
    for name in ("w1_throughput", "w2_throughput", "w1_latency_p50", "w2_latency_p50", "sql_round_trips_per_step",
                 "step_cost_growth_64_vs_4", "worker_rss_growth", "embedded_demo_seconds",
                 "runs_5000_throughput", "runs_5000_state_bytes_per_run"):
        assert name in names
    assert expected_figures(SIZES["smoke"], ("sql",)) == [
        "sql_round_trips_per_step", "sql_durable_commits_per_step", "sql_round_trips_per_step_listeners",
        "sql_statements_per_step",
        "sql_round_trips_per_start", "w2_sql_round_trips_per_run"]


def test_the_policy_off_phase_has_its_figures():
    assert expected_figures(SIZES["smoke"], ("policy_off",)) == [
        "off_w1_latency_p50", "off_w1_throughput", "off_sql_statements_per_run", "off_sql_round_trips_per_run"]
    assert "policy_off" in parse_args(["--only", "policy_off"]).only


def test_command_line():
    assert parse_args([]).size == "full" and parse_args([]).only == harness.PHASES
    assert parse_args(["--quick"]).size == "quick"
    assert parse_args(["--smoke", "--only", "sql,latency"]).only == ("sql", "latency")
    assert parse_args(["--only", "throughput", "--profile"]).only == ("throughput", "profile")
    with pytest.raises(SystemExit):
        parse_args(["--only", "nope"])
    with pytest.raises(SystemExit):
        parse_args(["--database", "x; drop"])


def test_percentile_is_nearest_rank():
    values = [float(x) for x in range(20, 0, -1)]
    assert percentile(values, 0.5) == 10 and percentile(values, 0.95) == 19
    assert percentile([3.0], 0.95) == 3.0


def test_targets_pass_or_miss_and_never_judge_a_missing_value():
    at_least = Target("ratio", ">=", 0.75)
    assert Figure("t", "t", "runs/s", 80, 100, target=at_least).result == "PASS"
    assert Figure("t", "t", "runs/s", 70, 100, target=at_least).result == "MISS"
    assert Figure("t", "t", "runs/s", None, 100, target=at_least).result is None
    assert Figure("s", "s", "rt", 2.0, target=Target("sagaflow", "<=", 2)).result == "PASS"
    assert Figure("s", "s", "rt", 1.0).to_json()["ratio"] is None


def test_table_marks_figures_whose_runs_were_not_all_checked():
    figures = [Figure("a", "A figure", "ms", 12.3, 10.0, target=Target("ratio", "<=", 1.5)),
               Figure("b", "B figure", "x", 1.0, checked=False)]
    info = {"size": "smoke", "cpus": 2, "loadavg_start": [1.0], "loadavg_end": [1.5], "seconds": 3}
    table = render_table(figures, info, {"outcome_checks_passed": False, "problems": ["2 of 3 runs"]})
    assert "A figure" in table and "1.23" in table and "PASS" in table
    assert "B figure  [UNCHECKED]" in table and "1 problem(s): 2 of 3 runs" in table


def test_plain_chain_gives_each_step_an_errback_task_that_undoes_the_earlier_steps_latest_first():
    links = plain.build_chain("r1", 4, "ph", fail_at=3).tasks
    assert [s.task for s in links] == ["plain.step"] * 3 + ["plain.fail", "plain.done"]
    assert links[0].args == ({},) and links[4].kwargs == {"run_id": "r1", "steps": 4, "phase": "ph"}
    for index, link in enumerate(links):
        (errback,) = map(signature, link.options["link_error"])
        assert errback.task == "plain.undo" and errback.immutable and tuple(errback.args) == ("r1", index, "ph")
    undo = plain.compensation_chain("r1", 3, "ph").tasks
    assert [(s.task, s.kwargs.get("index")) for s in undo] == [
        ("plain.compensate", 2), ("plain.compensate", 1), ("plain.compensate", 0), ("plain.compensated", None)]
    assert undo[0].immutable and undo[0].args == ([],) and not undo[1].immutable
    assert undo[-1].kwargs["expected"] == [2, 1, 0]
    nothing_to_undo = plain.compensation_chain("r1", 0, "ph")
    assert nothing_to_undo.task == "plain.compensated" and nothing_to_undo.immutable


def test_plain_inline_errback_is_the_compensation_chain_itself():
    links = plain.build_chain("r1", 4, "ph", fail_at=3, errback="inline").tasks
    (errback,) = map(signature, links[3].options["link_error"])
    assert [s["task"] for s in errback.tasks][:3] == ["plain.compensate"] * 3


def test_plain_tasks_record_whether_the_run_did_what_it_should(monkeypatch):
    recorded = []
    monkeypatch.setattr(plain, "record", lambda phase, run_id, ok: recorded.append((run_id, ok)))
    results = {}
    for i in range(4):
        results = plain.step.run(results, run_id="r", index=i)
    plain.done.run(results, run_id="r", steps=4, phase="p")
    plain.done.run({"s1": None, "s0": None}, run_id="bad", steps=2, phase="p")
    done = plain.compensate.run([], run_id="w", index=2)
    done = plain.compensate.run(done, run_id="w", index=1)
    plain.compensated.run(done, run_id="w", expected=[2, 1, 0], phase="p")
    assert recorded == [("r", True), ("bad", False), ("w", False)]
    with pytest.raises(plain.PlainFailure):
        plain.fail.run({}, run_id="r", index=3)


def test_bench_sagas_are_no_op_steps_and_w2_fails_for_good_at_its_fourth():
    from bench import sagas
    from sagaflow.errors import NonRetryableError
    from sagaflow.model.definition import StepContext

    ctx = StepContext(run_id="r", saga="bench_w2", step="s3", input={}, attempt=1, idempotency_key="r:s3")
    assert [len(s.steps) for s in (sagas.W1, sagas.W2, sagas.S16, sagas.S64)] == [4, 4, 16, 64]
    assert all(s.compensate is not None for s in sagas.S64.steps)
    with pytest.raises(NonRetryableError):
        sagas.W2.steps[3].action(ctx)
    assert sagas.W2.steps[2].action(ctx) is None


def test_profile_summary_sorts_task_time_by_package(tmp_path):
    main = 'process 10:"python -m sagaflow worker"'
    child = main + ';process 11:"python -m sagaflow worker"'
    task = f"{child};run (billiard/pool.py:1);trace_task (celery/app/trace.py:2);run_step (sagaflow/runtime.py:3)"
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"{task};claim_step (sagaflow/store/repository.py:4);do_execute (sqlalchemy/engine/default.py:5) 6",
        f"{task};apply_async (celery/app/task.py:6);_put (kombu/transport/redis.py:7);"
        f"_read_from_socket (redis/_parsers/socket.py:8) 2",
        f"{task};ensure_json (sagaflow/store/repository.py:9);iterencode (json/encoder.py:10) 2",
        f"{child};run (billiard/pool.py:1);_recv (billiard/connection.py:11) 10",
        f"{main};poll (kombu/utils/eventio.py:12) 5",
    ]) + "\n")
    text = summarize(raw)
    assert "process 11 (pool): 50% inside tasks" in text and "process 10 (main): 100% idle" in text
    assert " 60.0%  PostgreSQL round trip (driver wait)" in text
    assert " 20.0%  Redis round trip (socket)" in text and " 20.0%  JSON encode/decode" in text
    assert " 60.0%  sagaflow: claim_step" in text


def test_the_baseline_is_celery_defaults_plus_acks_late_and_the_second_row_has_sagaflows_settings():
    plain.configure(plain.DEFAULT_REDIS_URL, {"SAGAFLOW_PREFETCH": "3", "SAGAFLOW_TASK_EVENTS": "1"})
    try:
        base, same = plain.app.conf, plain.same_app.conf
        assert base.task_acks_late is True and base.task_default_queue == plain.QUEUE
        # Celery's own defaults for the rest: what a user running a plain chain gets
        assert base.worker_prefetch_multiplier == 4 and base.worker_send_task_events is False
        assert base.task_send_sent_event is False and base.worker_consumer == "celery.worker.consumer:Consumer"
        assert same.worker_prefetch_multiplier == 3 and same.worker_send_task_events is True
        assert same.worker_consumer == "sagaflow.inbound:Consumer" and same.task_default_queue == plain.SAME_QUEUE
        links = plain.build_chain("r", 2, "ph", on=plain.same_app).tasks
        assert all(link.app is plain.same_app for link in links)
    finally:
        plain.configure(plain.DEFAULT_REDIS_URL, {})


def test_peers_are_chosen_on_the_command_line_and_a_missing_package_skips_its_row_and_says_so(monkeypatch):
    from bench import core

    assert parse_args([]).peers == ("dbos", "celery-saga")
    assert parse_args(["--peers", "none"]).peers == ()
    with pytest.raises(SystemExit):
        parse_args(["--peers", "temporal"])
    monkeypatch.setattr(core, "missing_package", lambda module: module)
    bench = core.Bench(parse_args(["--smoke"]))
    bench.setup_peers()
    assert bench.peers == [] and len(bench.skipped) == 2
    assert "the DBOS row: its package is not installed" in bench.skipped[0]
    assert "celery-saga" in bench.skipped[1] and "requirements-bench.txt" in bench.skipped[1]


def test_the_systems_table_has_a_row_per_system_and_marks_unchecked_figures():
    from bench.figures import systems_table

    figures = [Figure("w1_throughput", "W1", "runs/s", 80, 200, same=120, peers={"DBOS": 100, "celery-saga": 99}),
               Figure("w2_throughput", "W2", "runs/s", 30, 90, same=40, peers={"DBOS": 50}, checked=False),
               Figure("w1_latency_p50", "W1 p50", "ms", 15, 6, same=9)]
    lines = systems_table(figures)
    assert lines[0].split()[:2] == ["system", "W1"]
    rows = {line.split("  ")[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"plain Celery chain, Celery defaults + acks_late",
                         "plain Celery chain, sagaflow's Celery settings", "DBOS", "celery-saga", "sagaflow"}
    assert rows["DBOS"][1:] == ["100.0", "50.0?", "-", "-"]
    assert rows["celery-saga"][1:] == ["99.0", "-?", "-", "-"]
    assert rows["sagaflow"][1:] == ["80.0", "30.0?", "15.0", "-"]
    assert Figure("x", "x", "runs/s", 80, 200, same=100).ratio_same == 0.8
    assert systems_table([Figure("sql_round_trips_per_step", "s", "rt", 2.0)]) == []


def test_the_dbos_peer_expects_each_step_then_each_compensation_latest_first():
    pytest.importorskip("dbos")
    from bench import peer_dbos

    assert peer_dbos.expected_order(None) == "s0,s1,s2,s3"
    assert peer_dbos.expected_order(3) == "s0,s1,s2,s3_fails,undo_s2,undo_s1,undo_s0"


def test_the_celery_saga_peer_runs_the_same_four_no_op_steps_each_with_its_compensation():
    pytest.importorskip("celery_saga")
    from bench import peer_celery_saga as peer

    for saga, last in ((peer.W1, "peer.s3"), (peer.W2, "peer.s3_fail")):
        steps = saga.plan.flatten()
        assert [s["task_name"] for s in steps] == ["peer.s0", "peer.s1", "peer.s2", last]
        assert [s["compensate_task_name"] for s in steps] == [f"peer.undo_s{i}" for i in range(4)]
    with pytest.raises(peer.PeerFailure):
        peer.FAIL_LAST.run()
    assert peer.STEP[0].run() is None and peer.UNDO[0].run(None) is None
