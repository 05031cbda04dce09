"""The web app's settings and pure helpers (no servers): token and flower settings, redirects after login,
the timeline's order, and the metrics collector on SQLite."""

import datetime as dt

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sagaflow.client import SagaClient
from sagaflow.config.settings import Settings
from sagaflow.model import Event, Run, StepState
from sagaflow.web.metrics import SagaflowCollector
from sagaflow.web.present import flower_link, timeline
from sagaflow.web.security import host_name, safe_next
from tests.unit.test_stats import filled  # noqa: F401  (fixture)

TOKEN = "0123456789abcdef0123456789abcdef"


def test_web_settings_come_from_the_environment_and_round_trip():
    s = Settings.from_env({"SAGAFLOW_API_TOKEN": f" {TOKEN}\n", "SAGAFLOW_FLOWER_URL": "https://ops.example/flower/",
                           "SAGAFLOW_API_MAX_BODY": "2048", "SAGAFLOW_ALLOWED_HOSTS": "Ops.Example, 10.0.0.5,[::1]",
                           "SAGAFLOW_API_READ_PROTECTED": "true", "SAGAFLOW_TRUSTED_PROXIES": "1"})
    assert (s.api_token, s.flower_url, s.api_max_body) == (TOKEN, "https://ops.example/flower", 2048)
    assert s.allowed_hosts == ("ops.example", "10.0.0.5", "[::1]")
    assert (s.api_read_protected, s.trusted_proxies) == (True, 1)
    assert Settings.from_env(s.as_env()) == s
    defaults = Settings.from_env({})
    assert (defaults.api_token, defaults.flower_url, defaults.api_max_body) == ("", "", 1024 * 1024)
    assert defaults.allowed_hosts == ("localhost", "127.0.0.1", "[::1]")  # loopback only unless told
    assert (defaults.api_read_protected, defaults.trusted_proxies) == (False, 0)
    assert Settings.from_env({"SAGAFLOW_ALLOWED_HOSTS": "*"}).allowed_hosts == ("*",)


@pytest.mark.parametrize("env,message", [
    ({"SAGAFLOW_API_MAX_BODY": "0"}, "SAGAFLOW_API_MAX_BODY must be a positive integer"),
    ({"SAGAFLOW_API_MAX_BODY": "1MB"}, "SAGAFLOW_API_MAX_BODY must be an integer"),
    ({"SAGAFLOW_FLOWER_URL": "javascript:alert(1)"}, "SAGAFLOW_FLOWER_URL must be an http:// or https:// URL"),
    # A token that fails open or is guessable is refused at start, not taken as "no token" or used.
    ({"SAGAFLOW_API_TOKEN": "   "}, "SAGAFLOW_API_TOKEN is blank"),
    ({"SAGAFLOW_API_TOKEN": "\t\n"}, "SAGAFLOW_API_TOKEN is blank"),
    ({"SAGAFLOW_API_TOKEN": "x"}, "SAGAFLOW_API_TOKEN is 1 characters: it needs at least 32"),
    ({"SAGAFLOW_API_TOKEN": TOKEN[:31]}, "SAGAFLOW_API_TOKEN is 31 characters"),
    ({"SAGAFLOW_API_TOKEN": TOKEN[:16] + " " + TOKEN[16:]}, "must be printable ASCII without whitespace"),
    ({"SAGAFLOW_API_TOKEN": TOKEN + "é"}, "must be printable ASCII without whitespace"),
    ({"SAGAFLOW_ALLOWED_HOSTS": "localhost,*"}, "`\\*` means any host and stands alone"),
    ({"SAGAFLOW_ALLOWED_HOSTS": "http://ops.example"}, "is not a host name"),
    ({"SAGAFLOW_ALLOWED_HOSTS": "ops.example:8000"}, "is not a host name"),
    ({"SAGAFLOW_API_READ_PROTECTED": "maybe"}, "SAGAFLOW_API_READ_PROTECTED must be 1 or 0"),
    ({"SAGAFLOW_API_READ_PROTECTED": "true"}, "SAGAFLOW_API_READ_PROTECTED needs SAGAFLOW_API_TOKEN"),
    ({"SAGAFLOW_TRUSTED_PROXIES": "-1"}, "SAGAFLOW_TRUSTED_PROXIES must be 0 or a positive integer"),
])
def test_bad_web_settings_are_refused_with_a_clear_error(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_flower_links():
    assert flower_link("http://f:5555", "abc-1") == "http://f:5555/task/abc-1"
    assert flower_link("", "abc") is None and flower_link("http://f", None) is None


@pytest.mark.parametrize("target,expected", [
    ("/runs/x", "/runs/x"), ("/?status=failed", "/?status=failed"), (None, "/"), ("", "/"),
    ("https://evil.example/", "/"), ("//evil.example/", "/"), ("/\\evil.example", "/"), ("runs", "/"),
    ("/runs/x\r\nSet-Cookie: a=b", "/"), ("/\x00", "/"), ("/a\u2028b", "/"), ("/\x7f", "/"), ("/\tx", "/"),
    ("/runs/café", "/runs/caf%C3%A9"), ("/?status=a%20b", "/?status=a%20b"),
])
def test_after_login_only_local_paths_are_followed(target, expected):
    assert safe_next(target) == expected


@pytest.mark.parametrize("host,name", [
    ("localhost:8000", "localhost"), ("127.0.0.1", "127.0.0.1"), ("[::1]:8000", "[::1]"), ("LOCALHOST.", "localhost"),
    ("attacker.example:80", "attacker.example"), ("a:b", "a:b"),
])
def test_the_host_name_is_the_host_header_without_its_port(host, name):
    assert host_name(host) == name


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _step(i, name, status, started, finished, **kw):
    values = dict(index=i, name=name, status=status, has_compensation=True, attempts=1, compensation_attempts=0,
                  result=None, error=None, compensation_error=None, task_id=f"t{i}", compensation_task_id=None,
                  started_at=T0 + dt.timedelta(seconds=started) if started is not None else None,
                  finished_at=T0 + dt.timedelta(seconds=finished) if finished is not None else None,
                  compensated_at=None)
    values.update(kw)
    return StepState(**values)


def test_the_timeline_puts_compensations_after_the_failure_latest_step_first():
    steps = [_step(0, "a", "compensated", 0, 1, compensation_attempts=2, compensation_task_id="c0"),
             _step(1, "b", "compensated", 1, 2, compensation_task_id="c1"),
             _step(2, "c", "failed", 2, 3, error="boom <b>"),
             _step(3, "d", "skipped", None, None)]
    at = lambda s: T0 + dt.timedelta(seconds=s)  # noqa: E731
    events = [Event(1, "compensation_started", "b", at(4), {"attempt": 1}),
              Event(2, "compensation_succeeded", "b", at(5), None),
              Event(3, "compensation_started", "a", at(5), {"attempt": 1}),
              Event(4, "compensation_retried", "a", at(5.5), {"attempt": 1, "error": "E: flaky"}),
              Event(5, "compensation_started", "a", at(6), {"attempt": 2}),
              Event(6, "compensation_succeeded", "a", at(8), None)]
    run = Run("r", "s", 1, "compensated", {}, None, False, None, T0, at(8), at(8), tuple(steps), tuple(events))

    bars, idle = timeline(run, "http://f")
    assert [(b.kind, b.name, b.status) for b in bars] == [
        ("step", "a", "succeeded"), ("step", "b", "succeeded"), ("step", "c", "failed"),
        ("compensation", "b", "compensated"), ("compensation", "a", "compensated")]
    assert [s.name for s in idle] == ["d"]
    assert [e.text for e in bars[2].errors] == ["failed: boom <b>"]  # raw here; the template escapes it
    assert [e.text for e in bars[4].errors] == ["attempt 1: E: flaky"]
    assert bars[4].attempts == 2 and bars[4].seconds == 3.0
    assert bars[4].flower_url == "http://f/task/c0"
    assert bars[0].left == 0 and bars[4].left + bars[4].width == 100


def test_the_collector_exposes_counters_gauges_and_histograms(store, filled):  # noqa: F811
    store.seed_counters()  # the fixture wrote its rows past the runtime, which counts its own transitions
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SagaflowCollector(lambda: SagaClient(store)))
    text = generate_latest(registry).decode()

    assert 'sagaflow_runs_started_total{saga="pay"} 3.0' in text
    assert 'sagaflow_runs_finished_total{saga="pay",status="compensation_failed"} 2.0' in text
    assert 'sagaflow_runs_compensation_failed{saga="pay"} 1.0' in text
    assert 'sagaflow_runs{saga="book",status="pending"} 0.0' in text
    assert 'sagaflow_retries_total{phase="action",saga="book",step="b"} 1.0' in text
    assert 'sagaflow_compensations_total{outcome="failed",saga="pay",step="a"} 2.0' in text
    assert 'sagaflow_step_duration_seconds_bucket{le="0.25",outcome="succeeded",saga="book",step="a"} 1.0' in text
    assert 'sagaflow_step_duration_seconds_count{outcome="failed",saga="pay",step="b"} 2.0' in text
    assert 'sagaflow_compensation_duration_seconds_count{outcome="failed",saga="pay",step="a"} 2.0' in text
    assert 'sagaflow_compensation_duration_seconds_count{outcome="succeeded",saga="pay",step="a"} 1.0' in text
    assert 'sagaflow_compensation_duration_seconds_sum{outcome="succeeded",saga="pay",step="a"} 1.0' in text
