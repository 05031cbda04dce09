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
        "sql_round_trips_per_step", "sql_round_trips_per_step_listeners", "sql_statements_per_step",
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
