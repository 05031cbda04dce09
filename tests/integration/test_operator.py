"""The operator's day (issue 16), against a real worker, Redis and PostgreSQL: search runs through the
client, the HTTP API and the CLI; resolve a run by hand; restart a final run."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid

import pytest

from sagaflow.app import get_store
from sagaflow.errors import InvalidInput, InvalidTransition
from tests.conftest import ROOT
from tests.web_client import call

pytestmark = pytest.mark.integration


def sagaflow(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sagaflow", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def env(settings, worker):
    return {**os.environ, **settings.as_env(), "SAGAFLOW_LOG_LEVEL": "WARNING"}


def _run_count() -> int:
    return get_store().list_runs(limit=1)[1]


@pytest.fixture
def three(client):
    """Three finished runs with a customer unique to this test: c (2 runs, orders 17 and 18) and d (1)."""
    tag = uuid.uuid4().hex[:8]
    c, d = f"c-{tag}", f"d-{tag}"
    a = client.start("create_booking", {"customer": c, "order": 17}, idempotency_key=f"order-17-{tag}")
    b = client.start("create_booking", {"customer": c, "order": 18}, idempotency_key=f"order-18-{tag}")
    x = client.start("create_booking", {"customer": d, "order": "17"})
    runs = [client.wait(r.id) for r in (a, b, x)]
    return tag, c, d, runs


def _ids(page) -> set:
    return {r["id"] if isinstance(r, dict) else r.id for r in page}


# ---------------------------------------------------------------------------------------------- search


def test_search_through_the_client_each_filter_alone_and_combined(client, three):
    tag, c, d, (a, b, x) = three
    assert _ids(client.list(input={"customer": c})) == {a.id, b.id}
    assert _ids(client.list(input={"customer": d, "order": "17"})) == {x.id}
    assert _ids(client.list(input={"customer": c, "order": "17"})) == {a.id}  # text: "17" finds 17
    assert _ids(client.list(idempotency_key=f"order-18-{tag}")) == {b.id}
    since, until = a.created_at, b.created_at
    assert _ids(client.list(input={"customer": c}, since=since, until=until)) == {a.id}
    assert _ids(client.list(input={"customer": c}, since=b.created_at)) == {b.id}
    assert _ids(client.list(input={"customer": c}, status="succeeded", saga="create_booking")) == {a.id, b.id}
    assert _ids(client.list(input={"customer": c}, status="compensated")) == set()
    for bad in ({"since": dt.datetime(2026, 12, 1)}, {"input": {"a.b": "x"}}, {"input": ["customer"]},
                {"idempotency_key": ""}, {"until": "2026-12-01"}):
        with pytest.raises(InvalidInput):
            client.list(**bad)


def test_search_through_the_http_api(web_url, three):
    tag, c, d, (a, b, x) = three
    base = f"{web_url}/api/runs"
    answer = call("GET", f"{base}?input.customer={c}")
    assert answer.status == 200 and _ids(answer.json["items"]) == {a.id, b.id} and answer.json["total"] == 2
    assert _ids(call("GET", f"{base}?input.customer={c}&input.order=18").json["items"]) == {b.id}
    assert _ids(call("GET", f"{base}?idempotency_key=order-17-{tag}").json["items"]) == {a.id}
    since = b.created_at.isoformat().replace("+00:00", "Z")
    assert _ids(call("GET", f"{base}?input.customer={c}&since={since}").json["items"]) == {b.id}
    assert _ids(call("GET", f"{base}?input.customer={c}&until={since}&status=succeeded").json["items"]) == {a.id}
    for query, message in (("since=yesterday", "since must be an ISO 8601"), ("until=2026-13-01", "until must be"),
                           ("input.a.b=1", "input.<field>"), ("input[customer]=c1", "unknown parameter"),
                           ("input.=1", "input.<field>")):
        answer = call("GET", f"{base}?{query}")
        assert answer.status == 400 and message in answer.json["error"], (query, answer.text)


def test_search_through_the_cli(env, three):
    tag, c, d, (a, b, x) = three
    listed = sagaflow("runs", "--input", f"customer={c}", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert _ids(json.loads(listed.stdout)["items"]) == {a.id, b.id}
    listed = sagaflow("runs", "--input", f"customer={c}", "--key", f"order-18-{tag}", "--since", "2026-01-01",
                      "--json", env=env)
    assert _ids(json.loads(listed.stdout)["items"]) == {b.id}
    text = sagaflow("runs", "--input", f"customer={d}", "--input", "order=17", env=env)
    assert x.id in text.stdout and "1 of 1 runs" in text.stdout
    for args, message in ((["--since", "yesterday"], "--since must be an ISO 8601"),
                          (["--input", "customer"], "--input takes FIELD=VALUE"),
                          (["--input", "a.b=1"], "input field names are")):
        bad = sagaflow("runs", *args, env=env)
        assert bad.returncode != 0 and message in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_a_compensation_failed_run_by_hand_and_refusals(client, web_url, env):
    run = client.wait(client.start("create_booking", {"fail_at": "add_calendar",
                                                      "fail_compensation": {"send_email": 4}}).id)
    assert run.status == "compensation_failed"
    # the note is required: nothing changes without it
    answer = call("POST", f"{web_url}/api/runs/{run.id}/resolve", {})
    assert answer.status == 400 and "a note is required" in answer.json["error"]
    assert call("POST", f"{web_url}/api/runs/{run.id}/resolve", {"note": "  "}).status == 400
    with pytest.raises(InvalidInput, match="a note is required"):
        client.resolve(run.id, "")
    assert client.get(run.id).status == "compensation_failed"

    answer = call("POST", f"{web_url}/api/runs/{run.id}/resolve", {"note": "email retracted by hand"})
    assert answer.status == 202 and answer.json["status"] == "resolved"
    resolved = client.get(run.id)
    assert resolved.status == "resolved" and resolved.is_final and resolved.finished_at is not None
    last = resolved.events[-1]
    assert (last.kind, last.detail) == ("run_resolved", {"note": "email retracted by hand",
                                                          "from": "compensation_failed",
                                                          # who asked (issue 17)
                                                          "actor": "api (no token set)", "source": "api",
                                                          "client": "127.0.0.1"})
    # nothing was published: the history stays as it is
    assert client.get(run.id).events == resolved.events
    # a second resolve, and a resolve of a succeeded run, are refused
    with pytest.raises(InvalidTransition):
        client.resolve(run.id, "again")
    ok = client.wait(client.start("create_booking", {"customer": "r"}).id)
    answer = call("POST", f"{web_url}/api/runs/{ok.id}/resolve", {"note": "no"})
    assert answer.status == 409 and "only a compensation_failed or stuck run" in answer.json["error"]
    bad = sagaflow("resolve", ok.id, "--note", "no", env=env)
    assert bad.returncode == 1 and "only a compensation_failed or stuck run" in bad.stderr
    assert client.get(ok.id).status == "succeeded" and client.get(ok.id).events == ok.events


# ---------------------------------------------------------------------------------------------- restart


def test_restart_of_a_compensated_run_links_both_ways_and_a_live_run_is_refused(client, web_url, env):
    old = client.wait(client.start("create_booking", {"customer": "rs", "fail_at": "send_whatsapp"}).id)
    assert old.status == "compensated"
    answer = call("POST", f"{web_url}/api/runs/{old.id}/restart", {"input": {"customer": "rs"}})
    assert answer.status == 202, answer.text
    new = answer.json
    assert new["id"] != old.id and new["restarted_from"] == old.id and new["input"] == {"customer": "rs"}
    assert client.wait(new["id"]).status == "succeeded"
    linked = [e for e in client.get(old.id).events if e.kind == "run_restarted"]
    assert [e.detail["new_run_id"] for e in linked] == [new["id"]]
    # the client, with the same input
    again = client.restart(old.id)
    assert again.restarted_from == old.id and again.input == old.input and again.saga_version == old.saga_version
    assert client.wait(again.id).status == "compensated"  # the same input fails the same way
    # the CLI
    by_cli = sagaflow("restart", old.id, "--input", '{"customer": "cli"}', "--json", env=env)
    assert by_cli.returncode == 0, by_cli.stderr
    assert json.loads(by_cli.stdout)["restarted_from"] == old.id

    live = client.start("create_booking", {"sleep": {"create_invoice": 3}})
    before = _run_count()
    answer = call("POST", f"{web_url}/api/runs/{live.id}/restart")
    assert answer.status == 409 and "only a final run can be restarted" in answer.json["error"]
    with pytest.raises(InvalidTransition):
        client.restart(live.id)
    assert _run_count() == before
    assert not [e for e in client.get(live.id).events if e.kind == "run_restarted"]
    client.wait(live.id)


# ---------------------------------------------------------------------------------------------- the page


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    yield page
    context.close()


def test_the_page_searches_by_input_field_and_keeps_the_search_in_the_url(page, web_url, three):
    import re

    tag, c, d, (a, b, x) = three
    page.goto(f"{web_url}/")
    page.fill("#search", f"customer={c}")
    with page.expect_navigation():
        page.press("#search", "Enter")
    assert f"q=customer%3D{c}" in page.url
    rows = {r.get_attribute("data-run-id") for r in page.locator("tr[data-run-id]").all()}
    assert rows == {a.id, b.id}
    assert page.input_value("#search") == f"customer={c}"
    # a status filter keeps the search (the counts' links and the select both carry it)
    page.select_option("select[name=status]", "succeeded")
    page.wait_for_url(re.compile(r"status=succeeded"))
    assert "q=customer" in page.url
    assert {r.get_attribute("data-run-id") for r in page.locator("tr[data-run-id]").all()} == {a.id, b.id}
    # a term that is not field=value: a clear 400
    page.goto(f"{web_url}/?q=customer")
    assert "search terms are field=value" in page.content()


def test_the_page_resolves_with_a_note_and_restarts(page, web_url, client):
    failed = client.wait(client.start("create_booking", {"fail_at": "add_calendar",
                                                         "fail_compensation": {"send_email": 4}}).id)
    assert failed.status == "compensation_failed"
    page.goto(f"{web_url}/runs/{failed.id}")
    page.fill("#resolve-note", "email retracted by hand")
    with page.expect_navigation():
        page.click("#resolve-button")
    assert "Resolved by hand" in page.locator(".notice").first.inner_text()
    assert "email retracted by hand" in page.locator("#resolved-note").inner_text()
    assert client.get(failed.id).status == "resolved"
    assert page.locator("#resolve-button").count() == 0

    with page.expect_navigation():
        page.click("#restart-button")
    assert "/runs/" in page.url and failed.id not in page.url
    new_id = page.url.split("/runs/")[1].split("?")[0]
    assert page.locator("#restarted-from").get_attribute("href").endswith(failed.id)
    new = client.get(new_id)
    assert new.restarted_from == failed.id and new.input == failed.input
    client.wait(new_id)
    page.goto(f"{web_url}/runs/{failed.id}")
    assert page.locator("a.restarted-as").get_attribute("href").endswith(new_id)


# ---------------------------------------------------------------------------------------------- deadlines


def test_a_run_past_its_deadline_is_cancelled_by_the_sweeper_and_compensated(client):
    import time

    from sagaflow.runtime.recovery import recover_stalled

    run = client.start("deadline_saga", {"sleep": 10})  # Saga(deadline=2)
    assert run.deadline_at is not None
    assert 1.9 <= (run.deadline_at - run.created_at).total_seconds() <= 2.1
    recover_stalled()  # before the deadline: nothing happens
    assert not [e for e in client.get(run.id).events if e.kind == "deadline_passed"]
    while dt.datetime.now(dt.timezone.utc) < run.deadline_at:
        time.sleep(0.1)
    recover_stalled()  # the sweeper, as beat or `sagaflow recover` runs it
    seen = client.get(run.id)
    assert [e.kind for e in seen.events if e.kind in ("deadline_passed", "cancel_requested")] == [
        "deadline_passed", "cancel_requested"]
    recover_stalled()  # a second sweep does not take the same deadline again
    assert len([e for e in client.get(run.id).events if e.kind == "deadline_passed"]) == 1
    done = client.wait(run.id, timeout=60)
    assert done.status == "cancelled"
    assert done.step("slow").status == "compensated" and done.step("after").status == "skipped"


def test_the_start_deadline_wins_over_the_sagas_and_a_bad_one_is_refused(client):
    run = client.start("deadline_saga", {"sleep": 0}, deadline=60)
    assert 59.9 <= (run.deadline_at - run.created_at).total_seconds() <= 60.1
    assert client.wait(run.id).status == "succeeded"
    before = _run_count()
    for bad in (0, -1, "5", True, float("nan")):
        with pytest.raises(InvalidInput, match="deadline"):
            client.start("deadline_saga", {}, deadline=bad)
    assert _run_count() == before
    plain = client.start("create_booking", {})
    assert plain.deadline_at is None
    client.wait(plain.id)


def test_a_compensation_timeout_limits_the_undo_not_the_action(client):
    # the action sleeps 2 s under its 15 s timeout; the undo sleeps 5 s under its own 1.5 s limit
    run = client.wait(client.start("deadline_saga", {"sleep": 2, "undo_sleep": 5, "fail": True},
                                   deadline=120).id, timeout=60)
    assert run.step("slow").status == "compensation_failed"
    assert run.status == "compensation_failed"
    assert "TimeLimit" in (run.step("slow").compensation_error or "")


# ---------------------------------------------------------------------------------------------- retention


def _age(run_ids, days: int = 40) -> None:
    """Make runs look as if they ran ``days`` ago (the test cannot wait a month)."""
    from sqlalchemy import update

    from sagaflow.store import tables as t

    shift = dt.timedelta(days=days)
    with get_store().engine.begin() as conn:
        for run_id in run_ids:
            run = get_store().get_run(run_id, history=False)
            conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(
                created_at=run.created_at - shift, updated_at=run.updated_at - shift,
                finished_at=run.finished_at - shift if run.finished_at else None))


def _counters(web_url) -> dict:
    """Every counter and histogram sample of /metrics (the gauges of runs now are left out)."""
    samples = {}
    for line in call("GET", f"{web_url}/metrics").text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        if name.split("{")[0].endswith(("_total", "_bucket", "_count", "_sum")):
            samples[name] = float(value)
    return samples


def _busy_sagas() -> set[str]:
    """Sagas with a live run now: earlier tests of the session may leave one that ends at any moment, and
    its counters then move between two scrapes whatever compaction does."""
    from sqlalchemy import select

    from sagaflow.model import LIVE_RUN_STATUSES
    from sagaflow.store import tables as t

    with get_store().engine.connect() as conn:
        return set(conn.execute(select(t.runs.c.saga).distinct().where(
            t.runs.c.status.in_([s.value for s in LIVE_RUN_STATUSES]))).scalars())


def _quiet(samples: dict, busy: set[str]) -> dict:
    return {k: v for k, v in samples.items() if not any(f'saga="{s}"' in k for s in busy)}


def test_prune_deletes_only_old_ended_runs_and_the_metrics_counters_stay(client, web_url, env):
    old_ok = client.wait(client.start("create_booking", {"customer": "prune"}).id)
    old_bad = client.wait(client.start("create_booking", {"fail_at": "send_whatsapp"}).id)
    stuck = client.wait(client.start("create_booking", {"fail_at": "add_calendar",
                                                        "fail_compensation": {"send_email": 4}}).id)
    new_ok = client.wait(client.start("create_booking", {"customer": "prune-new"}).id)
    live = client.start("deadline_saga", {"sleep": 3}, deadline=600)  # another saga: its counters may move
    assert (old_ok.status, old_bad.status, stuck.status) == ("succeeded", "compensated", "compensation_failed")
    _age([old_ok.id, old_bad.id, stuck.id, live.id])
    busy = _busy_sagas()
    before = _counters(web_url)
    assert any(k.startswith("sagaflow_run_duration_seconds_bucket") for k in before)
    total = _run_count()
    # the sweeper compacts the counter log (here at once): the counters read the same before and after,
    # for every saga with no run live meanwhile (create_booking's runs here have all ended)
    get_store().compact_counters()
    compacted = _counters(web_url)
    busy |= _busy_sagas()
    assert any(k.startswith("sagaflow_run_duration_seconds_bucket") for k in _quiet(before, busy))
    assert _quiet(compacted, busy) == _quiet(before, busy)

    dry = sagaflow("prune", "--older-than", "30d", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["runs"] >= 2 and _run_count() == total  # nothing deleted

    done = sagaflow("prune", "--older-than", "30d", env=env)
    assert done.returncode == 0, done.stderr and "deleted" in done.stdout
    remaining = {r.id for r in client.list(limit=1000)}
    assert old_ok.id not in remaining and old_bad.id not in remaining
    assert {stuck.id, new_ok.id, live.id} <= remaining
    assert client.wait(live.id).status == "succeeded"  # the live run went on untouched
    assert client.get(stuck.id).status == "compensation_failed"

    after = _counters(web_url)
    busy |= _busy_sagas()
    for name, value in before.items():
        if 'saga="create_booking"' in name and "create_booking" not in busy:  # pruned, not moved
            assert after[name] == value, name
        else:  # the live run's saga (and any other with a run live) moved on meanwhile: up
            assert after[name] >= value, name  # sums too: whole microseconds, never rounded down

    for args, message in ((["--older-than", "30 days"], "--older-than must be a duration"),
                          (["--older-than", "0d"], "must be a duration"), ([], "Missing option")):
        bad = sagaflow("prune", *args, env=env)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_stats_through_the_client_and_the_cli(client, env):
    client.wait(client.start("create_booking", {"customer": "stats"}).id)
    data = client.stats()
    assert data["total"] >= 1 and data["by_status"]["succeeded"] >= 1
    assert 0 < data["success_rate"] <= 1
    entry = data["run_duration_seconds"]["create_booking/succeeded"]
    assert entry["count"] >= 1 and 0 < entry["p50"] <= entry["max"]
    assert "create_invoice" in data["step_duration_seconds"]["create_booking"]
    shown = sagaflow("stats", env=env)
    assert shown.returncode == 0 and "success rate:" in shown.stdout and "create_booking" in shown.stdout
    assert json.loads(sagaflow("stats", "--json", env=env).stdout)["total"] >= 1
