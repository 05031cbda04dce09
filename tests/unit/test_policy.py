"""The compensation policy: the settings, the file and its reloading, the order of precedence, and the sagas
that cannot run plain."""

import logging
import os

import pytest

from sagaflow import Saga, Step
from sagaflow.config.settings import Settings
from sagaflow.errors import DefinitionError
from sagaflow.model.definition import DEFAULT_FORWARD_RETRY, DEFAULT_RETRY, RetryPolicy, registry
from sagaflow.model.policy import PLAIN, SAGA, PolicyError, PolicySource, mode_for, parse


def settings(tmp_path, **env):
    return Settings.from_env({"SAGAFLOW_HOME": str(tmp_path), **env})


def write(path, text):
    """Write and move the modification time on, as an edit a second later would."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(old + 2_000_000_000, old + 2_000_000_000))


def noop(ctx):
    return None


@pytest.fixture
def sagas():
    made = [Saga("pol_plain", [Step("a", noop), Step("b", noop)]),
            Saga("pol_gate", [Step("a", noop)])]
    made[1].gate("approve", signal="approved", timeout=60)
    yield made
    for saga in made:
        registry.remove(saga.name)


# ---------------------------------------------------------------------------------------------- settings

def test_settings_defaults_and_parsing(tmp_path):
    s = settings(tmp_path)
    assert s.saga_enabled and s.saga_operations is None and not s.policy_file_required
    assert s.policy_file.name == "policy.yaml" and s.policy_file.is_absolute()
    s = settings(tmp_path, SAGAFLOW_SAGA_ENABLED="false", SAGAFLOW_SAGA_OPERATIONS=" a, b ,",
                 SAGAFLOW_POLICY_FILE=str(tmp_path / "p.yaml"))
    assert not s.saga_enabled and s.saga_operations == ("a", "b") and s.policy_file_required
    assert settings(tmp_path, SAGAFLOW_SAGA_OPERATIONS="*").saga_operations is None
    assert Settings.from_env(s.as_env()) == s  # a worker gets the same settings
    with pytest.raises(ValueError, match="SAGAFLOW_SAGA_ENABLED"):
        settings(tmp_path, SAGAFLOW_SAGA_ENABLED="maybe")
    with pytest.raises(ValueError, match="stands alone"):
        settings(tmp_path, SAGAFLOW_SAGA_OPERATIONS="a,*")


# ---------------------------------------------------------------------------------------------- the file

def test_the_shipped_example_changes_nothing(tmp_path, sagas):
    from tests.conftest import ROOT

    s = settings(tmp_path, SAGAFLOW_POLICY_FILE=str(ROOT / "config" / "policy.yaml"))
    policy = PolicySource(s.policy_file, True).current()
    assert policy.default is True and policy.sagas == {}
    assert mode_for(sagas[0], s) == SAGA


@pytest.mark.parametrize("text,problem", [
    ("- a\n- b\n", "expected a mapping"),
    ("default: maybe\n", "default: must be on or off"),
    ("defaults: on\n", "unknown key 'defaults'"),
    ("sagas: [a]\n", "expected a mapping of saga name"),
    ("sagas:\n  a: {compensation: off, extra: 1}\n", "saga 'a': expected {compensation: on|off}"),
    ("sagas:\n  a: off\n", "saga 'a': expected {compensation: on|off}"),
    ("sagas:\n  a: {compensation: 2}\n", "compensation: must be on or off"),
    ("sagas:\n  a: {compensation: off}\n  a: {compensation: on}\n", ":3: duplicate key 'a'"),
    ("sagas: {a: [\n", "not valid YAML"),
])
def test_a_malformed_file_is_refused_naming_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "policy.yaml"
    with pytest.raises(PolicyError) as info:
        parse(text, path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_on_off_in_any_spelling(tmp_path):
    policy = parse("default: Off\nsagas:\n  a: {compensation: on}\n  b: {compensation: 'off'}\n"
                   "  c: {compensation: false}\n", tmp_path / "p.yaml")
    assert policy.default is False and policy.sagas == {"a": True, "b": False, "c": False}
    assert parse("", tmp_path / "p.yaml").sagas == {}


def test_an_edit_takes_effect_without_a_restart(tmp_path, sagas):
    path = tmp_path / "policy.yaml"
    write(path, "default: on\n")
    s = settings(tmp_path, SAGAFLOW_POLICY_FILE=str(path))
    assert mode_for(sagas[0], s) == SAGA
    write(path, "sagas:\n  pol_plain: {compensation: off}\n")
    assert mode_for(sagas[0], s) == PLAIN
    write(path, "default: on\n")
    assert mode_for(sagas[0], s) == SAGA


def test_a_bad_edit_keeps_the_last_good_policy_and_logs_an_error(tmp_path, sagas, caplog):
    path = tmp_path / "policy.yaml"
    write(path, "sagas:\n  pol_plain: {compensation: off}\n")
    s = settings(tmp_path, SAGAFLOW_POLICY_FILE=str(path))
    assert mode_for(sagas[0], s) == PLAIN
    write(path, "sagas:\n  pol_plain: {compensation: offf}\n")
    with caplog.at_level(logging.ERROR, logger="sagaflow.policy"):
        assert mode_for(sagas[0], s) == PLAIN
        assert mode_for(sagas[0], s) == PLAIN
    records = [r for r in caplog.records if r.msg == "policy_file_invalid"]
    assert len(records) == 1  # once per change of the file
    assert str(path) in records[0].error and "offf" in records[0].error


def test_a_process_that_never_had_a_good_policy_refuses_to_start_runs(tmp_path, sagas):
    path = tmp_path / "policy.yaml"
    write(path, "default: sometimes\n")
    s = settings(tmp_path, SAGAFLOW_POLICY_FILE=str(path))
    with pytest.raises(PolicyError, match="default: must be on or off"):
        mode_for(sagas[0], s)
    write(path, "default: off\n")  # fixed: the next start works
    assert mode_for(sagas[0], s) == PLAIN


def test_a_file_named_explicitly_must_exist_the_default_one_need_not(tmp_path, sagas):
    s = settings(tmp_path, SAGAFLOW_POLICY_FILE=str(tmp_path / "missing.yaml"))
    with pytest.raises(PolicyError, match="does not exist"):
        mode_for(sagas[0], s)
    s = settings(tmp_path).with_(policy_file=tmp_path / "absent.yaml")
    assert mode_for(sagas[0], s) == SAGA


# ---------------------------------------------------------------------------------------------- precedence

@pytest.mark.parametrize("env,file,expected", [
    ({}, "", SAGA),
    ({"SAGAFLOW_SAGA_ENABLED": "false"}, "", PLAIN),
    ({"SAGAFLOW_SAGA_OPERATIONS": "other"}, "", PLAIN),
    ({"SAGAFLOW_SAGA_OPERATIONS": "other,pol_plain"}, "", SAGA),
    ({"SAGAFLOW_SAGA_OPERATIONS": "*"}, "", SAGA),
    ({"SAGAFLOW_SAGA_ENABLED": "false", "SAGAFLOW_SAGA_OPERATIONS": "pol_plain"}, "", PLAIN),
    ({}, "default: off\n", PLAIN),
    ({"SAGAFLOW_SAGA_OPERATIONS": "pol_plain"}, "default: off\n", SAGA),  # the environment over the default
    ({"SAGAFLOW_SAGA_ENABLED": "false"}, "sagas:\n  pol_plain: {compensation: on}\n", SAGA),  # entry wins
    ({"SAGAFLOW_SAGA_OPERATIONS": "pol_plain"}, "sagas:\n  pol_plain: {compensation: off}\n", PLAIN),
    ({}, "default: off\nsagas:\n  pol_plain: {compensation: on}\n", SAGA),
])
def test_per_saga_entries_override_the_environment_which_overrides_the_default(tmp_path, sagas, env, file, expected):
    path = tmp_path / "policy.yaml"
    write(path, file)
    assert mode_for(sagas[0], settings(tmp_path, SAGAFLOW_POLICY_FILE=str(path), **env)) == expected


# ---------------------------------------------------------------------------------------------- what cannot run plain

def test_a_saga_with_a_gate_cannot_be_switched_off_in_the_file(tmp_path, sagas):
    path = tmp_path / "policy.yaml"
    write(path, "sagas:\n  pol_gate: {compensation: off}\n")
    with pytest.raises(PolicyError, match=r"saga 'pol_gate' cannot have compensation off: its steps approve \(gate\)"):
        mode_for(sagas[1], settings(tmp_path, SAGAFLOW_POLICY_FILE=str(path)))


def test_a_saga_with_a_gate_switched_off_by_the_environment_is_refused_at_start(tmp_path, sagas):
    s = settings(tmp_path, SAGAFLOW_SAGA_ENABLED="0").with_(policy_file=tmp_path / "absent.yaml")
    with pytest.raises(PolicyError, match="saga 'pol_gate' cannot run with compensation off"):
        mode_for(sagas[1], s)
    assert mode_for(sagas[0], s) == PLAIN


# ---------------------------------------------------------------------------------------------- definitions

def test_a_non_atomic_step_without_a_compensation_is_refused_once_the_saga_is_written():
    saga = Saga("pol_non_atomic", register=False)

    @saga.step(non_atomic=True)
    def charge(ctx):
        return None

    with pytest.raises(DefinitionError, match="'charge': non_atomic=True needs a compensation"):
        saga.check_runnable()

    @charge.compensation
    def refund(ctx):
        return None

    saga.check_runnable()  # the decorator form had its chance


def test_a_step_cannot_be_both_best_effort_and_non_atomic():
    saga = Saga("pol_both", [Step("a", noop, noop, best_effort=True, non_atomic=True)], register=False)
    with pytest.raises(DefinitionError, match="cannot be both best_effort .* and non_atomic"):
        saga.check_runnable()


def test_steps_after_the_pivot_retry_forward_harder_unless_they_set_a_policy():
    own = RetryPolicy(max_attempts=2)
    saga = Saga("pol_pivot", [Step("a", noop), Step("p", noop, pivot=True), Step("b", noop),
                              Step("c", noop, retry=own)], register=False)
    assert [saga.retry_policy(i) for i in range(4)] == [DEFAULT_RETRY, DEFAULT_RETRY, DEFAULT_FORWARD_RETRY, own]
    assert DEFAULT_FORWARD_RETRY.max_attempts > DEFAULT_RETRY.max_attempts
    assert DEFAULT_FORWARD_RETRY.max_interval <= DEFAULT_RETRY.max_interval  # the visibility check still holds
